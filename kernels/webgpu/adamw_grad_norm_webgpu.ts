/**
 * Fused AdamW, gradient clipping: the sum of squares of one variable's
 * gradient, one partial sum per workgroup, written into the optimizer's
 * partial-sums buffer at this variable's offset (the step program adds them
 * up on the GPU, so the global norm never goes to the host).
 *
 * Bindings: grad (read), partials (read_write), uniforms {size,
 * numWorkgroups, offset}.
 */
import type {OwnPipelineSpec} from './own_pipeline';
import {ADAMW_WORKGROUP, adamWUniformsWGSL, workgroupSumWGSL} from './adamw_state_wgsl';

/** Most workgroups (partial sums) per variable. */
export const GRAD_NORM_MAX_WORKGROUPS = 64;

export function gradNormWorkgroups(size: number): number {
  return Math.max(1, Math.min(GRAD_NORM_MAX_WORKGROUPS, Math.ceil(size / (ADAMW_WORKGROUP * 16))));
}

export function adamWGradNormProgram(): OwnPipelineSpec {
  return {
    key: 'fusedAdamW/gradNorm',
    label: 'fused AdamW gradient sum of squares',
    numInputs: 1,
    numOutputs: 1,
    hasUniforms: true,
    code: () => `
${adamWUniformsWGSL([
      'size', 'numWorkgroups', 'offset'
    ])}
@group(0) @binding(0) var<storage, read> grad: array<f32>;
@group(0) @binding(1) var<storage, read_write> partials: array<f32>;
@group(0) @binding(2) var<uniform> u: Uniforms;
${workgroupSumWGSL()}

@compute @workgroup_size(${ADAMW_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let stride = ${ADAMW_WORKGROUP}u * u.numWorkgroups;
  var sum = 0.0;
  for (var i = wid.x * ${ADAMW_WORKGROUP}u + lid; i < u.size; i = i + stride) {
    let g = grad[i];
    sum = sum + g * g;
  }
  let total = workgroupSum(sum, lid);
  if (lid == 0u) {
    partials[u.offset + wid.x] = total;
  }
}`,
  };
}
