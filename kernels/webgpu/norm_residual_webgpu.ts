/**
 * FusedNorm's forward with a residual add or dropout in one pass (webgpu):
 * z = dropout(x) + residual and y = norm(z) * gamma (+ beta), both written
 * by one workgroup per row. tfjs programs have one output, which made this
 * two dispatches (z, then y); a decoded token runs two such norms per
 * block, and at one token per step each dispatch costs more CPU time to
 * record than its GPU work.
 *
 * Each thread keeps the columns it writes (c = tid, tid + WG, ...) and the
 * row statistics use the same reductions and thread count as the two-pass
 * programs of fused_norm_webgpu.ts, so y and z are the same numbers.
 *
 * Bindings (own_pipeline.ts): x, residual, gamma, beta (unused ones bound
 * to x); outputs y, z; uniforms.
 */
import {NORM_DROPOUT_STREAM} from '../../src/train/kernel_names';

import type {OwnPipelineSpec} from './own_pipeline';
import {rowReduceWGSL, rowThreads} from './tfjs_program';
import {dropoutWGSL, philoxWGSL} from './wgsl_snippets';

export interface NormResidualConfig {
  rms: boolean;
  residual: boolean;
  dropout: boolean;
  /** Threads per row (rowThreads of the row length). */
  threads: number;
}

export function normResidualConfig(
    cols: number, rms: boolean, residual: boolean, dropout: boolean): NormResidualConfig {
  return {rms, residual, dropout, threads: rowThreads(cols)};
}

export class NormResidualForwardProgram implements OwnPipelineSpec {
  readonly key: string;
  readonly numInputs = 4;
  readonly numOutputs = 2;
  readonly hasUniforms = true;
  readonly label = 'fused-norm-residual';

  constructor(private readonly config: NormResidualConfig) {
    const {rms, residual, dropout, threads} = config;
    this.key = `norm-residual-${+ rms}${+ residual}${+ dropout}-${threads}`;
  }

  readonly code = (): string => {
    const {rms, residual, dropout, threads} = this.config;
    const beta = rms ? '' : ' + beta[c]';
    return `
struct Uniforms {
  rows: i32, cols: i32, eps: f32, threshold: u32, keepScale: f32, seedLo: u32, seedHi: u32,
}
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> residual: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read_write> z: array<f32>;
@group(0) @binding(6) var<uniform> uniforms: Uniforms;
${dropout ? philoxWGSL() + dropoutWGSL() : ''}
${rowReduceWGSL(threads)}
@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  const WG = ${threads};
  let row = i32(wid.x + wid.y * nwg.x);
  if (row >= uniforms.rows) { return; }  // whole workgroups: uniform
  let tid = i32(lid);
  let C = uniforms.cols;
  let base = row * C;
  var s = 0.0;
  for (var c = tid; c < C; c += WG) {
    var v = x[base + c];${
        dropout ? `
    let keep = fa_dropout4(0u, ${NORM_DROPOUT_STREAM}u, u32(row), u32(c) >> 2u,
        vec2<u32>(uniforms.seedLo, uniforms.seedHi), uniforms.threshold, uniforms.keepScale);
    v = v * keep[c & 3];` :
                  ''}${
        residual ? `
    v = v + residual[base + c];` :
                   ''}
    z[base + c] = v;
    s += ${rms ? 'v * v' : 'v'};
  }
${
        rms ? `  let mean = 0.0;
  let rstd = inverseSqrt(rowSum(s, tid) / f32(C) + uniforms.eps);` :
              `  let mean = rowSum(s, tid) / f32(C);
  var sq = 0.0;
  for (var c = tid; c < C; c += WG) { let d = z[base + c] - mean; sq += d * d; }
  let rstd = inverseSqrt(rowSum(sq, tid) / f32(C) + uniforms.eps);`}
  for (var c = tid; c < C; c += WG) {
    y[base + c] = (z[base + c] - mean) * rstd * gamma[c]${beta};
  }
}
`;
  };
}
