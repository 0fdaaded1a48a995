/**
 * A pre-norm and the dense layer after it in one pass (FusedNormDense on
 * webgpu), for decode steps: z = x (+ residual), y = act(norm(z) w + bias).
 * In a pre-norm GPT every MLP and the logits start with a norm; at one
 * token per step each dispatch costs more CPU time to record than its GPU
 * work, so the norm is recomputed by every workgroup of the row (K values:
 * cheap) instead of being a pass of its own.
 *
 * Each workgroup: the row's z into workgroup memory (the row's first
 * workgroup also writes z, the next residual stream), the statistics with
 * the reductions of the fused norms (fused_norm_webgpu.ts), the normalized
 * row in place, then one output column per thread as in dense_webgpu.ts.
 *
 * Bindings (own_pipeline.ts): x, residual, gamma, beta, w, bias (x for the
 * absent ones); outputs y, z; uniforms.
 */
import type {FusedDenseActivation} from '../../src/train/kernel_names';

import {activationWGSL, DENSE_THREADS} from './dense_webgpu';
import type {OwnPipelineSpec} from './own_pipeline';
import {rowReduceWGSL} from './tfjs_program';

/** Longest row kept in workgroup memory (16 KiB). */
export const NORM_DENSE_MAX_INNER = 4096;

export interface NormDenseConfig {
  /** Row length K (the workgroup array's size). */
  inner: number;
  rms: boolean;
  residual: boolean;
  beta: boolean;
  bias: boolean;
  activation: FusedDenseActivation;
}

export class FusedNormDenseProgram implements OwnPipelineSpec {
  readonly key: string;
  readonly numInputs = 6;
  readonly numOutputs = 2;
  readonly hasUniforms = true;
  readonly label = 'fused-norm-dense';

  constructor(private readonly config: NormDenseConfig) {
    const {inner, rms, residual, beta, bias, activation} = config;
    this.key = `fused-norm-dense-${inner}-${+ rms}${+ residual}${+ beta}${+ bias}-${activation}`;
  }

  readonly code = (): string => {
    const {inner, rms, residual, beta, bias, activation} = this.config;
    return `
struct Uniforms { rows: i32, cols: i32, colGroups: i32, eps: f32 }
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> residual: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read> w: array<f32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
@group(0) @binding(7) var<storage, read_write> z: array<f32>;
@group(0) @binding(8) var<uniform> u: Uniforms;

const K = ${inner};
const WG = ${DENSE_THREADS};
var<workgroup> xn: array<f32, K>;
${rowReduceWGSL(DENSE_THREADS)}
@compute @workgroup_size(${DENSE_THREADS})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let group = i32(wid.x + wid.y * nwg.x);
  let row = group / u.colGroups;
  if (row >= u.rows) { return; }  // whole workgroups: uniform
  let colGroup = group % u.colGroups;
  let tid = i32(lid);
  let base = row * K;
  var s = 0.0;
  for (var c = tid; c < K; c += WG) {
    let v = x[base + c]${residual ? ' + residual[base + c]' : ''};
    xn[c] = v;
    if (colGroup == 0) { z[base + c] = v; }
    s += ${rms ? 'v * v' : 'v'};
  }
${
        rms ? `  let mean = 0.0;
  let rstd = inverseSqrt(rowSum(s, tid) / f32(K) + u.eps);` :
              `  let mean = rowSum(s, tid) / f32(K);
  var sq = 0.0;
  for (var c = tid; c < K; c += WG) { let d = xn[c] - mean; sq += d * d; }
  let rstd = inverseSqrt(rowSum(sq, tid) / f32(K) + u.eps);`}
  for (var c = tid; c < K; c += WG) {
    xn[c] = (xn[c] - mean) * rstd * gamma[c]${beta ? ' + beta[c]' : ''};
  }
  workgroupBarrier();
  let col = colGroup * WG + tid;
  if (col >= u.cols) { return; }
  var acc = 0.0;
  for (var k = 0; k < K; k++) {
    acc += xn[k] * w[k * u.cols + col];
  }
  let v = acc${bias ? ' + bias[col]' : ''};
  y[row * u.cols + col] = ${activationWGSL(activation)};
}
`;
  };
}
