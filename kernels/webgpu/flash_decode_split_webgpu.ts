/**
 * The first pass of split-KV decoding (flash-decoding): attention of a few
 * query rows over one slice of a KV cache.
 *
 * With one new token, attention has only B x H query rows: one workgroup
 * per row would leave most of a GPU idle while it streams the cache. So the
 * key range of each row is split over `numSplits` workgroups; each writes
 * its unnormalized partial output with its running max and sum, and the
 * combine pass (flash_decode_combine_webgpu.ts) merges them.
 *
 * Decoding is bound by the bytes of K and V read, so the kernel is laid out
 * for memory: a workgroup serves one (batch, kv head, row chunk, split),
 * where the rows of a chunk are the query rows (i, g) that read the same kv
 * head (GQA), so each key and value is read once for all of them. Per tile
 * of TILE keys (one per thread):
 *   1. thread t reads key tile0 + t as vec4s, K_BATCH loads issued before
 *      any is used (in flight together even where the compiler does not
 *      unroll), and scores it for every row (the queries sit in workgroup
 *      memory, read as broadcasts);
 *   2. the tile's max joins the running max of each row through one
 *      workgroup atomicMax on order-preserving float bits, by the threads
 *      whose score beats the running max only (after the first tiles, few):
 *      no serial pass over the scores; the max is exact, so the result does
 *      not depend on thread timing;
 *   3. every thread turns its scores into probabilities; thread
 *      (keyLane, dimLane) then accumulates P V for the vec4 of value dims
 *      dimLane over keys keyLane, keyLane + KEY_LANES, ...: the threads of
 *      a lane read one value row as consecutive vec4s (coalesced), V_BATCH
 *      rows in flight per thread.
 * The key lanes' partial outputs and sums are added once per split.
 *
 * Bindings: q, kCache, vCache, slopes; outputs partAcc
 * [B*Sq*H, numSplits, Dv] and partMaxSum [B*Sq*H, numSplits, 2]; uniforms,
 * which end with the valid keys of each batch row (`seqlensK`, packed in
 * vec4s: a uniform write costs no buffer upload per step).
 */
import type {ScoreOptions} from './wgsl_snippets';
import {FA_NEG_BIG, keyRangeWGSL, range, scoreKey, scoreWGSL} from './wgsl_snippets';

/** Keys per tile = threads per workgroup. */
export const DECODE_TILE = 128;
/** Most query rows one workgroup serves (registers: rows x Dv / TILE). */
export const DECODE_MAX_ROWS = 8;

export interface DecodeSplitConfig {
  headDim: number;
  headDimV: number;
  /** Query heads per kv head (H / Hk). */
  groups: number;
  seqQ: number;
  /** Query rows per workgroup (<= DECODE_MAX_ROWS). */
  rows: number;
  /** Batch size rounded up to 4, over 4 (vec4s of seqlensK). */
  batchVec4: number;
  score: ScoreOptions;
}

/** Uniform fields in order (all 4 bytes). */
export const DECODE_SPLIT_UNIFORMS = [
  'heads',
  'headsKV',
  'seqMax',
  'numSplits',
  'splitKeys',
  'rowChunks',
  'alibiPerBatch',
  'groupsTotal',
  'scale',
  'softcap',
  'left',
  'right',
] as const;
// 12 fields of 4 bytes: the seqlensK vec4s that follow start 16-aligned.

export class DecodeSplitProgram {
  readonly key: string;

  constructor(readonly config: DecodeSplitConfig) {
    const c = config;
    this.key = `decode-split-d${c.headDim}v${c.headDimV}g${c.groups}q${c.seqQ}r${c.rows}` +
        `b${c.batchVec4}${scoreKey(c.score)}`;
  }

  getUserCode(): string {
    const {headDim, headDimV, groups, seqQ, rows, batchVec4, score} = this.config;
    const T = DECODE_TILE;
    const d4 = headDim / 4;
    const dv4 = headDimV / 4;
    const dimLanes = Math.min(dv4, T);
    const keyLanes = Math.floor(T / dimLanes);
    const vec4sPerThread = Math.ceil(dv4 / dimLanes);
    const keysPerLane = Math.ceil(T / keyLanes);
    const kBatch = [4, 2, 1].find(n => d4 % n === 0)!;
    const vBatch = [4, 2, 1].find(n => keysPerLane % n === 0)!;
    const kLoads = range(kBatch).map(x => `      let k${x} = kCache[kBase + d + ${x}];`).join('\n');
    const kDots = range(kBatch)
                      .map(x => `        dots[r] += dot(qTile[r * D4 + d + ${x}], k${x});`)
                      .join('\n');
    const vLoads = range(vBatch)
                       .map(
                           x => `        let key${x} = (c + ${x}) * KEY_LANES + keyLane;
        let vBase${x} = ((b * u.seqMax + tile0 + min(key${x}, count - 1)) * u.headsKV + hk) * DV4;
${
                               range(vec4sPerThread)
                                   .map(
                                       e => `        let v${x}_${e} = vCache[vBase${
                                           x} + min(dimLane + ${e} * DIM_LANES, DV4 - 1)];`)
                                   .join('\n')}`)
                       .join('\n');
    const vAccumulate =
        range(vBatch)
            .map(
                x => `          let w${x} = select(0.0, probs[r * T + min(key${x}, T - 1)], key${
                    x} < count);
          rowSum[r] += w${x};
${
                    range(vec4sPerThread)
                        .map(e => `          acc[r * VPT + ${e}] += w${x} * v${x}_${e};`)
                        .join('\n')}`)
            .join('\n');
    const alibiSlope =
        score.alibi ? 'slopes[select(h, b * u.heads + h, u.alibiPerBatch != 0)]' : '0.0';
    return `${scoreWGSL(score)}${keyRangeWGSL(score)}
struct Uniforms {
  heads: i32, headsKV: i32, seqMax: i32, numSplits: i32, splitKeys: i32,
  rowChunks: i32, alibiPerBatch: i32, groupsTotal: i32,
  scale: f32, softcap: f32, left: i32, right: i32,
  seqlensK: array<vec4<i32>, ${batchVec4}>,
}
@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> kCache: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> vCache: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> slopes: array<f32>;
@group(0) @binding(4) var<storage, read_write> partAcc: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> partMaxSum: array<f32>;
@group(0) @binding(6) var<uniform> u: Uniforms;

const T = ${T};
const ROWS = ${rows};
const GROUP_ROWS = ${groups * seqQ};
const D4 = ${d4};
const DV4 = ${dv4};
const SQ = ${seqQ};
const G = ${groups};
const DIM_LANES = ${dimLanes};
const KEY_LANES = ${keyLanes};
const KEYS_PER_LANE = ${keysPerLane};
const K_BATCH = ${kBatch};
const V_BATCH = ${vBatch};
const VPT = ${vec4sPerThread};
const NEG_BIG = ${FA_NEG_BIG};

var<workgroup> qTile: array<vec4<f32>, ${rows * d4}>;
var<workgroup> probs: array<f32, ${rows * T}>;
var<workgroup> maxBits: array<atomic<i32>, ${rows}>;
var<workgroup> accLanes: array<vec4<f32>, ${vec4sPerThread * T}>;
var<workgroup> sumLanes: array<f32, ${keyLanes}>;

// Float bits as an i32 that orders like the float (negatives flipped).
fn ordered_bits(x: f32) -> i32 {
  let bits = bitcast<i32>(x);
  return bits ^ ((bits >> 31u) & 0x7fffffff);
}

fn from_ordered_bits(o: i32) -> f32 {
  return bitcast<f32>(o ^ ((o >> 31u) & 0x7fffffff));
}

@compute @workgroup_size(${T})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let t = i32(lid);
  let flat = i32(wid.x + wid.y * nwg.x);
  if (flat >= u.groupsTotal) { return; }
  let split = flat % u.numSplits;
  let chunk = (flat / u.numSplits) % u.rowChunks;
  let bk = flat / (u.numSplits * u.rowChunks);  // b * Hk + hk
  let hk = bk % u.headsKV;
  let b = bk / u.headsKV;
  let seqK = u.seqlensK[b / 4][b % 4];
  // Group row n = i * G + g: query row i of head hk * G + g.
  let n0 = chunk * ROWS;
  let nRows = min(ROWS, GROUP_ROWS - n0);
  for (var x = t; x < ROWS * D4; x += T) {
    let r = x / D4;
    if (r < nRows) {
      let n = n0 + r;
      let h = hk * G + n % G;
      qTile[x] = q[((b * SQ + n / G) * u.heads + h) * D4 + x % D4];
    }
  }
  if (t < ROWS) { atomicStore(&maxBits[t], ordered_bits(NEG_BIG)); }
  var p = FaScore(u.scale, u.softcap, 0.0, seqK - SQ, u.left, u.right, seqK, SQ);
  let i0 = n0 / G;
  let i1 = (n0 + nRows - 1) / G + 1;
  let range = fa_key_range(i0, i1, p);
  let lo = max(range.x, split * u.splitKeys);
  let hi = min(range.y, (split + 1) * u.splitKeys);
  // P V lanes: threads past KEY_LANES * DIM_LANES only score keys.
  let dimLane = t % DIM_LANES;
  let keyLane = t / DIM_LANES;
  var rowMax: array<f32, ROWS>;
  var rowSum: array<f32, ROWS>;
  var acc: array<vec4<f32>, ${rows * vec4sPerThread}>;
  for (var r = 0; r < ROWS; r++) {
    rowMax[r] = NEG_BIG;
    rowSum[r] = 0.0;
  }
  for (var x = 0; x < ROWS * VPT; x++) { acc[x] = vec4<f32>(0.0); }
  workgroupBarrier();
  for (var tile0 = lo; tile0 < hi; tile0 += T) {
    let j = tile0 + t;
    var s: array<f32, ROWS>;
    var dots: array<f32, ROWS>;
    for (var r = 0; r < ROWS; r++) { dots[r] = 0.0; }
    // Keys past hi read a valid row (branch-free loads) and score NEG_BIG.
    let kBase = ((b * u.seqMax + min(j, hi - 1)) * u.headsKV + hk) * D4;
    for (var d = 0; d < D4; d += K_BATCH) {
${kLoads}
      for (var r = 0; r < ROWS; r++) {
${kDots}
      }
    }
    for (var r = 0; r < ROWS; r++) {
      let n = n0 + r;
      let i = n / G;
      s[r] = NEG_BIG;
      if (r < nRows && j < hi && fa_visible(i, j, p)) {
        let h = hk * G + n % G;
        p.slope = ${alibiSlope};
        s[r] = fa_score(dots[r], i, j, p);
      }
      if (s[r] > rowMax[r]) { atomicMax(&maxBits[r], ordered_bits(s[r])); }
    }
    workgroupBarrier();
    for (var r = 0; r < ROWS; r++) {
      let newMax = from_ordered_bits(atomicLoad(&maxBits[r]));
      let alpha = exp(rowMax[r] - newMax);
      rowMax[r] = newMax;
      rowSum[r] *= alpha;
      for (var e = 0; e < VPT; e++) { acc[r * VPT + e] *= alpha; }
      // Masked keys keep NEG_BIG: weight 0 even while newMax is NEG_BIG.
      probs[r * T + t] = select(0.0, exp(s[r] - newMax), s[r] > 0.5 * NEG_BIG);
    }
    workgroupBarrier();
    let count = min(T, hi - tile0);
    if (keyLane < KEY_LANES) {
      // V_BATCH rows loaded before any use: that many in flight per thread
      // whether or not the compiler unrolls. Keys past count read a valid
      // row with weight 0; dims past DV4 are never written out.
      for (var c = 0; c < KEYS_PER_LANE; c += V_BATCH) {
${vLoads}
        for (var r = 0; r < ROWS; r++) {
${vAccumulate}
        }
      }
    }
    workgroupBarrier();
  }
  // Add the key lanes. Row n of the group is output row
  // (b, i, h) = ((b * SQ + i) * H + h).
  for (var r = 0; r < ROWS; r++) {
    for (var e = 0; e < VPT; e++) { accLanes[e * T + t] = acc[r * VPT + e]; }
    if (dimLane == 0 && keyLane < KEY_LANES) { sumLanes[keyLane] = rowSum[r]; }
    workgroupBarrier();
    if (r < nRows && keyLane == 0) {
      let n = n0 + r;
      let row = (b * SQ + n / G) * u.heads + hk * G + n % G;
      let slot = row * u.numSplits + split;
      for (var e = 0; e < VPT; e++) {
        let d = dimLane + e * DIM_LANES;
        var total = vec4<f32>(0.0);
        for (var k = 0; k < KEY_LANES; k++) { total += accLanes[e * T + k * DIM_LANES + dimLane]; }
        if (d < DV4) { partAcc[slot * DV4 + d] = total; }
      }
      if (t == 0) {
        var sum = 0.0;
        for (var k = 0; k < KEY_LANES; k++) { sum += sumLanes[k]; }
        partMaxSum[2 * slot] = rowMax[r];
        partMaxSum[2 * slot + 1] = sum;
      }
    }
    workgroupBarrier();
  }
}
`;
  }
}
