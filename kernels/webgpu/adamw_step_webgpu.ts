/**
 * Fused AdamW, once per optimizer step (before the updates): advances the
 * step counter and the bias corrections in the GPU state buffer, and, with
 * clipping, adds up the gradients' partial sums of squares into the global
 * norm and the gradient scale clipNorm / max(norm, clipNorm).
 *
 * Bias corrections 1 - beta^t follow c(t+1) = (1 - beta) + beta * c(t),
 * all terms positive, so no cancellation at small t (1 - pow(beta, t) in
 * float32 loses 4 digits at beta2 = 0.999).
 *
 * Bindings: partials (read), state (read_write), uniforms {numPartials}.
 */
import type {OwnPipelineSpec} from './own_pipeline';
import {ADAMW_STATE_STRUCT, ADAMW_WORKGROUP, adamWUniformsWGSL, workgroupSumWGSL} from './adamw_state_wgsl';

export function adamWStepProgram(): OwnPipelineSpec {
  return {
    key: 'fusedAdamW/step',
    label: 'fused AdamW step counter and global norm',
    numInputs: 1,
    numOutputs: 1,
    hasUniforms: true,
    code: () => `
${ADAMW_STATE_STRUCT}
${adamWUniformsWGSL(['numPartials'])}
@group(0) @binding(0) var<storage, read> partials: array<f32>;
@group(0) @binding(1) var<storage, read_write> state: AdamWState;
@group(0) @binding(2) var<uniform> u: Uniforms;
${workgroupSumWGSL()}

@compute @workgroup_size(${ADAMW_WORKGROUP})
fn main(@builtin(local_invocation_index) lid: u32) {
  var sum = 0.0;
  for (var i = lid; i < u.numPartials; i = i + ${ADAMW_WORKGROUP}u) {
    sum = sum + partials[i];
  }
  let total = workgroupSum(sum, lid);
  if (lid == 0u) {
    state.step = state.step + 1u;
    state.biasCorrection1 = state.oneMinusBeta1 + state.beta1 * state.biasCorrection1;
    state.biasCorrection2 = state.oneMinusBeta2 + state.beta2 * state.biasCorrection2;
    var scale = 1.0;
    if (u.numPartials > 0u) {
      let norm = sqrt(total);
      state.gradNorm = norm;
      if (state.clipNorm > 0.0 && norm > state.clipNorm) {
        scale = state.clipNorm / norm;
      }
    }
    state.gradScale = scale;
  }
}`,
  };
}
