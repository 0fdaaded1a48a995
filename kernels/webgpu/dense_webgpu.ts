/**
 * A dense layer on a few rows with its bias and activation in one pass
 * (FusedDense on webgpu): y = act(x w + bias), x `[M, K]`, w `[K, N]`.
 * tfjs's fused matMul has no GELU, so a decoded token's MLP was a matMul
 * and a GELU pass; at one token per step each dispatch costs more CPU time
 * to record than its GPU work, so this one pass replaces both.
 *
 * Made for decode steps (M of a few rows, FUSED_DENSE_MAX_ROWS): one
 * thread per output element, walking K in order (no tiling); the
 * threads of a workgroup read consecutive columns of w (coalesced) and
 * the same element of x.
 *
 * Bindings (own_pipeline.ts): x, w, bias (x when absent); output y;
 * uniforms.
 */
import type {FusedDenseActivation} from '../../src/train/kernel_names';

import type {OwnPipelineSpec} from './own_pipeline';

export const DENSE_THREADS = 64;

/** gelu_new as in gelu_webgpu.ts: x sigmoid(2 k (x + a x^3)). */
const GELU_2K = 2 * Math.sqrt(2 / Math.PI);
const GELU_2KA = GELU_2K * 0.044715;

/** The activation of `v` (an f32 expression of v). */
export function activationWGSL(activation: FusedDenseActivation): string {
  return activation === 'gelu_new' ? `v / (1.0 + exp(-v * (${GELU_2K} + ${GELU_2KA} * v * v)))` :
      activation === 'relu' ? 'max(v, 0.0)' :
                              'v';
}

export class FusedDenseProgram implements OwnPipelineSpec {
  readonly key: string;
  readonly numInputs = 3;
  readonly numOutputs = 1;
  readonly hasUniforms = true;
  readonly label = 'fused-dense';

  constructor(readonly activation: FusedDenseActivation, readonly hasBias: boolean) {
    this.key = `fused-dense-${activation}-${+ hasBias}`;
  }

  /** Workgroups: one per DENSE_THREADS columns of each row. */
  static workgroups(rows: number, cols: number): number {
    return rows * Math.ceil(cols / DENSE_THREADS);
  }

  readonly code = (): string => {
    return `
struct Uniforms { rows: i32, inner: i32, cols: i32, colGroups: i32 }
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> u: Uniforms;

@compute @workgroup_size(${DENSE_THREADS})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let group = i32(wid.x + wid.y * nwg.x);
  let row = group / u.colGroups;
  let col = (group % u.colGroups) * ${DENSE_THREADS} + i32(lid);
  if (row >= u.rows || col >= u.cols) { return; }
  let xBase = row * u.inner;
  var acc = 0.0;
  for (var k = 0; k < u.inner; k++) {
    acc += x[xBase + k] * w[k * u.cols + col];
  }
  let v = acc${this.hasBias ? ' + bias[col]' : ''};
  y[row * u.cols + col] = ${activationWGSL(this.activation)};
}
`;
  };
}
