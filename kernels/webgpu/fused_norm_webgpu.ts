/**
 * WGSL programs of the fused norms (FusedNorm / FusedNormGrad on webgpu).
 * One workgroup per row for the row-wise passes; the statistics are
 * recomputed from z wherever needed instead of being stored.
 */
import {NORM_DROPOUT_STREAM} from '../../src/train/kernel_names';

import {ElementwiseProgram, RowWiseProgram} from './row_program';
import {TfjsWebGPUProgram} from './tfjs_program';
import {dropoutWGSL, philoxWGSL} from './wgsl_snippets';

/** The row's mean (0 for RMSNorm) and 1/sqrt(var + eps), from `z`. */
function rowStatsWGSL(rms: boolean): string {
  return rms ? `
  var sq = 0.0;
  for (var c = tid; c < C; c += WG) { let v = z[base + c]; sq += v * v; }
  let mean = 0.0;
  let rstd = inverseSqrt(rowSum(sq, tid) / f32(C) + uniforms.eps);` :
               `
  var s = 0.0;
  for (var c = tid; c < C; c += WG) { s += z[base + c]; }
  let mean = rowSum(s, tid) / f32(C);
  var sq = 0.0;
  for (var c = tid; c < C; c += WG) { let v = z[base + c] - mean; sq += v * v; }
  let rstd = inverseSqrt(rowSum(sq, tid) / f32(C) + uniforms.eps);`;
}

/** z = dropout(x) + residual, elementwise (also dx = dropout(dz)). */
export class NormResidualProgram extends ElementwiseProgram {
  constructor(
      shape: [number, number], private readonly dropout: boolean,
      private readonly residual: boolean) {
    super(
        residual ? ['x', 'residual'] : ['x'], shape, `normResidual_${+ dropout}${+ residual}`,
        dropout ? 'threshold : u32, keepScale : f32, seedLo : u32, seedHi : u32,' : undefined);
  }

  getUserCode(): string {
    return `
${this.dropout ? philoxWGSL() + dropoutWGSL() : ''}
fn main(index: i32) {
  if (index < uniforms.size) {
    var v = x[index];
    ${
        this.dropout ? `
    let C = uniforms.outShape[1];
    let row = u32(index / C);
    let col = u32(index % C);
    let keep = fa_dropout4(0u, ${NORM_DROPOUT_STREAM}u, row, col >> 2u,
        vec2<u32>(uniforms.seedLo, uniforms.seedHi), uniforms.threshold, uniforms.keepScale);
    v = v * keep[col & 3u];` :
                       ''}
    ${this.residual ? 'v = v + residual[index];' : ''}
    result[index] = v;
  }
}
`;
  }
}

/**
 * A row-wise pass over z `[N, C]` that starts with the row's statistics
 * (`mean`, `rstd`; the epsilon is the uniform `eps`).
 */
abstract class NormRowProgram extends RowWiseProgram {
  constructor(
      variableNames: string[], shape: [number, number], outputShape: number[], key: string,
      protected readonly rms: boolean) {
    super(variableNames, shape, outputShape, `${key}_${+ rms}`, 'eps : f32,');
  }

  protected normMain(body: string): string {
    return this.rowMain('z', 'C', rowStatsWGSL(this.rms) + body);
  }
}

/** y = norm(z) * gamma (+ beta): one workgroup per row. */
export class NormForwardProgram extends NormRowProgram {
  constructor(shape: [number, number], rms: boolean) {
    super(rms ? ['z', 'gamma'] : ['z', 'gamma', 'beta'], shape, shape, 'normForward', rms);
  }

  getUserCode(): string {
    return this.normMain(`
  if (valid) {
    for (var c = tid; c < C; c += WG) {
      result[base + c] = (z[base + c] - mean) * rstd * gamma[c]${this.rms ? '' : ' + beta[c]'};
    }
  }`);
  }
}

/**
 * dz = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dzOut, g = dy * gamma
 * (RMSNorm: without mean(g)); dzOut is the gradient of the z output.
 */
export class NormBackwardProgram extends NormRowProgram {
  constructor(shape: [number, number], rms: boolean) {
    super(['dy', 'z', 'gamma', 'dzOut'], shape, shape, 'normBackward', rms);
  }

  getUserCode(): string {
    return this.normMain(`
  var sg = 0.0;
  var sgx = 0.0;
  for (var c = tid; c < C; c += WG) {
    let g = dy[base + c] * gamma[c];
    sg += g;
    sgx += g * (z[base + c] - mean) * rstd;
  }
  let meanG = ${this.rms ? '0.0' : 'rowSum(sg, tid) / f32(C)'};
  let meanGX = rowSum(sgx, tid) / f32(C);
  if (valid) {
    for (var c = tid; c < C; c += WG) {
      let xhat = (z[base + c] - mean) * rstd;
      let g = dy[base + c] * gamma[c];
      result[base + c] = rstd * (g - meanG - xhat * meanGX) + dzOut[base + c];
    }
  }`);
  }
}

/** `[N, 2]`: each row's mean (0 for RMSNorm) and rstd, for the column sums. */
export class NormStatsProgram extends NormRowProgram {
  constructor(shape: [number, number], rms: boolean) {
    super(['z'], shape, [shape[0], 2], 'normStats', rms);
  }

  getUserCode(): string {
    return this.normMain(`
  if (valid && tid == 0) {
    result[2 * row] = mean;
    result[2 * row + 1] = rstd;
  }`);
  }
}

// Column sums: COLS adjacent columns per workgroup (contiguous reads), each
// summed by LANES threads over interleaved rows, then a fixed-order tree.
const COLS = 16;
const LANES = 16;

/**
 * Sum over rows of dy * xhat (dgamma; inputs dy, z, stats) or of dy
 * (dbeta; input dy): `[C]`.
 */
export class NormColumnSumProgram implements TfjsWebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = {x: [0]};
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [COLS * LANES, 1, 1];

  constructor(shape: [number, number], private readonly timesXhat: boolean) {
    this.variableNames = timesXhat ? ['dy', 'z', 'stats'] : ['dy'];
    this.outputShape = [shape[1]];
    this.dispatch = [Math.ceil(shape[1] / COLS), 1, 1];
    this.shaderKey = `normColumnSum_${+ timesXhat}`;
  }

  getUserCode(): string {
    const term = this.timesXhat ? 'dy[i] * (z[i] - stats[2 * r]) * stats[2 * r + 1]' : 'dy[i]';
    return `
var<workgroup> colPartial: array<f32, ${COLS * LANES}>;
fn main(index: i32) {
  let tid = i32(localId.x);
  let lane = tid / ${COLS};
  let col = (index / ${COLS * LANES}) * ${COLS} + tid % ${COLS};
  let N = uniforms.dyShape[0];
  let C = uniforms.dyShape[1];
  var s = 0.0;
  if (col < C) {
    for (var r = lane; r < N; r += ${LANES}) {
      let i = r * C + col;
      s += ${term};
    }
  }
  colPartial[tid] = s;
  workgroupBarrier();
  for (var stride = ${LANES / 2}; stride > 0; stride >>= 1u) {
    if (lane < stride) {
      colPartial[tid] += colPartial[tid + stride * ${COLS}];
    }
    workgroupBarrier();
  }
  if (lane == 0 && col < C) {
    result[col] = colPartial[tid];
  }
}
`;
  }
}
