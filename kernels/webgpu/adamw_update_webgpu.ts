/**
 * Fused AdamW: one variable's update in place, param, first and second
 * moment in one pass over memory, with the hyperparameters, bias
 * corrections and gradient scale read from the GPU state buffer:
 *
 *   g = grad * gradScale
 *   m = beta1 * m + (1 - beta1) * g
 *   v = beta2 * v + (1 - beta2) * g^2
 *   p = p * (1 - lr * weightDecay) - lr * (m / c1) / (sqrt(v / c2) + epsilon)
 *
 * Bindings: grad, state (read); param, m, v (read_write); uniforms {size,
 * numWorkgroups}.
 */
import type {OwnPipelineSpec} from './own_pipeline';
import {ADAMW_STATE_STRUCT, ADAMW_WORKGROUP, adamWUniformsWGSL} from './adamw_state_wgsl';

/** Most workgroups per variable (a grid-stride loop covers the rest). */
export const UPDATE_MAX_WORKGROUPS = 4096;

export function updateWorkgroups(size: number): number {
  return Math.max(1, Math.min(UPDATE_MAX_WORKGROUPS, Math.ceil(size / ADAMW_WORKGROUP)));
}

export function adamWUpdateProgram(): OwnPipelineSpec {
  return {
    key: 'fusedAdamW/update',
    label: 'fused AdamW update',
    numInputs: 2,
    numOutputs: 3,
    hasUniforms: true,
    code: () => `
${ADAMW_STATE_STRUCT}
${adamWUniformsWGSL([
      'size', 'numWorkgroups'
    ])}
@group(0) @binding(0) var<storage, read> grad: array<f32>;
@group(0) @binding(1) var<storage, read> state: AdamWState;
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<uniform> u: Uniforms;

@compute @workgroup_size(${ADAMW_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let lr = state.learningRate;
  let decay = 1.0 - lr * state.weightDecay;
  let stride = ${ADAMW_WORKGROUP}u * u.numWorkgroups;
  for (var i = wid.x * ${ADAMW_WORKGROUP}u + lid; i < u.size; i = i + stride) {
    let g = grad[i] * state.gradScale;
    let mi = state.beta1 * m[i] + state.oneMinusBeta1 * g;
    let vi = state.beta2 * v[i] + state.oneMinusBeta2 * (g * g);
    m[i] = mi;
    v[i] = vi;
    let mHat = mi / state.biasCorrection1;
    let vHat = vi / state.biasCorrection2;
    param[i] = param[i] * decay - lr * mHat / (sqrt(vHat) + state.epsilon);
  }
}`,
  };
}
