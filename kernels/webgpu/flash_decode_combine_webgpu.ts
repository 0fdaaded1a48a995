/**
 * The second pass of split-KV decoding: merges the partial results of the
 * splits of each query row (flash_decode_split_webgpu.ts) into `out` and
 * `lse`. One workgroup per row; every thread finds the row's overall max
 * and sum (few splits), then writes its share of the output dims.
 *
 * A row whose splits saw no key gets out = 0 and lse = -Infinity
 * (written as raw bits: WGSL has no infinity literal).
 *
 * Bindings: partAcc, partMaxSum; outputs out [B, Sq, H, Dv], lse [B, H, Sq]
 * (as u32 bits); uniforms.
 */
import {FA_NEG_BIG, FA_NEG_INF_BITS} from './wgsl_snippets';

export const COMBINE_THREADS = 64;

export const DECODE_COMBINE_UNIFORMS = ['heads', 'seqQ', 'numSplits', 'rowsTotal'] as const;

export class DecodeCombineProgram {
  readonly key: string;

  constructor(readonly headDimV: number) {
    this.key = `decode-combine-v${headDimV}`;
  }

  getUserCode(): string {
    return `
struct Uniforms { heads: i32, seqQ: i32, numSplits: i32, rowsTotal: i32 }
@group(0) @binding(0) var<storage, read> partAcc: array<f32>;
@group(0) @binding(1) var<storage, read> partMaxSum: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read_write> lse: array<u32>;
@group(0) @binding(4) var<uniform> u: Uniforms;

const DV = ${this.headDimV};
const T = ${COMBINE_THREADS};
const NEG_BIG = ${FA_NEG_BIG};

@compute @workgroup_size(${COMBINE_THREADS})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let row = i32(wid.x + wid.y * nwg.x);  // (b * Sq + i) * H + h
  if (row >= u.rowsTotal) { return; }
  let t = i32(lid);
  let base = row * u.numSplits;
  var m = NEG_BIG;
  for (var s = 0; s < u.numSplits; s++) { m = max(m, partMaxSum[2 * (base + s)]); }
  var total = 0.0;
  for (var s = 0; s < u.numSplits; s++) {
    total += partMaxSum[2 * (base + s) + 1] * exp(partMaxSum[2 * (base + s)] - m);
  }
  let inv = select(0.0, 1.0 / total, total > 0.0);
  for (var d = t; d < DV; d += T) {
    var o = 0.0;
    for (var s = 0; s < u.numSplits; s++) {
      o += partAcc[(base + s) * DV + d] * exp(partMaxSum[2 * (base + s)] - m);
    }
    out[row * DV + d] = o * inv;
  }
  if (t == 0) {
    let h = row % u.heads;
    let bi = row / u.heads;
    let i = bi % u.seqQ;
    let b = bi / u.seqQ;
    let value = select(bitcast<u32>(m + log(total)), ${FA_NEG_INF_BITS}u, total <= 0.0);
    lse[(b * u.heads + h) * u.seqQ + i] = value;
  }
}
`;
  }
}
