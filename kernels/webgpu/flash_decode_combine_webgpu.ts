/**
 * The second pass of split-KV decoding: merges the partial results of the
 * splits of each query row (flash_decode_split_webgpu.ts) into `out` and
 * `lse`. One workgroup per row (there are few: B x Sq x H). The threads
 * share the splits for the row's overall max and sum (tree reductions in
 * workgroup memory: no thread walks every split alone), then each writes
 * its output dims, loading the partial results of COMBINE_BATCH splits
 * before using any (loads in flight together; the pass is latency-bound).
 *
 * A row whose splits saw no key gets out = 0 and lse = -Infinity
 * (written as raw bits: WGSL has no infinity literal).
 *
 * Bindings: partAcc, partMaxSum; outputs out [B, Sq, H, Dv], lse [B, H, Sq]
 * (as u32 bits); uniforms.
 */
import {FA_NEG_BIG, FA_NEG_INF_BITS, range} from './wgsl_snippets';

export const COMBINE_THREADS = 128;
const COMBINE_BATCH = 4;

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

var<workgroup> scratch: array<f32, T>;

// The tree reductions below need T to be a power of two.
fn reduce_max(t: i32, x: f32) -> f32 {
  scratch[t] = x;
  workgroupBarrier();
  for (var stride = T / 2; stride > 0; stride /= 2) {
    if (t < stride) { scratch[t] = max(scratch[t], scratch[t + stride]); }
    workgroupBarrier();
  }
  let result = scratch[0];
  workgroupBarrier();
  return result;
}

fn reduce_sum(t: i32, x: f32) -> f32 {
  scratch[t] = x;
  workgroupBarrier();
  for (var stride = T / 2; stride > 0; stride /= 2) {
    if (t < stride) { scratch[t] = scratch[t] + scratch[t + stride]; }
    workgroupBarrier();
  }
  let result = scratch[0];
  workgroupBarrier();
  return result;
}

@compute @workgroup_size(${COMBINE_THREADS})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let row = i32(wid.x + wid.y * nwg.x);  // (b * Sq + i) * H + h
  if (row >= u.rowsTotal) { return; }
  let t = i32(lid);
  let base = row * u.numSplits;
  var localMax = NEG_BIG;
  for (var s = t; s < u.numSplits; s += T) { localMax = max(localMax, partMaxSum[2 * (base + s)]); }
  let m = reduce_max(t, localMax);
  var localSum = 0.0;
  for (var s = t; s < u.numSplits; s += T) {
    localSum += partMaxSum[2 * (base + s) + 1] * exp(partMaxSum[2 * (base + s)] - m);
  }
  let total = reduce_sum(t, localSum);
  let inv = select(0.0, 1.0 / total, total > 0.0);
  for (var d = t; d < DV; d += T) {
    var o = 0.0;
    for (var s = 0; s < u.numSplits; s += ${COMBINE_BATCH}) {
${
        range(COMBINE_BATCH)
            .map(x => `      let s${x} = min(s + ${x}, u.numSplits - 1);
      let w${x} = select(0.0, exp(partMaxSum[2 * (base + s${x})] - m), s + ${x} < u.numSplits);
      let a${x} = partAcc[(base + s${x}) * DV + d];`)
            .join('\n')}
      o += ${range(COMBINE_BATCH).map(x => `a${x} * w${x}`).join(' + ')};
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
