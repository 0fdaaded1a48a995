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
 * A workgroup serves one (batch, kv head, row chunk, split): the rows of a
 * chunk are query rows (i, g) that all read the same kv head (GQA), so each
 * key and value is read once for all of them. Per tile of TILE keys:
 *   1. thread t computes the scores of key tile0 + t for every row of the
 *      chunk (the queries sit in workgroup memory);
 *   2. thread r < rows updates row r's running max and sum and turns the
 *      tile's scores into probabilities;
 *   3. thread t accumulates dims t, t + TILE, ... of P V for every row
 *      (consecutive threads read consecutive values: coalesced).
 *
 * Bindings: q, kCache, vCache, slopes; outputs partAcc
 * [B*Sq*H, numSplits, Dv] and partMaxSum [B*Sq*H, numSplits, 2]; uniforms,
 * which end with the valid keys of each batch row (`seqlensK`, packed in
 * vec4s: a uniform write costs no buffer upload per step).
 */
import type {ScoreOptions} from './wgsl_snippets';
import {FA_NEG_BIG, keyRangeWGSL, scoreKey, scoreWGSL} from './wgsl_snippets';

/** Keys per tile = threads per workgroup. */
export const DECODE_TILE = 64;
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
    const dimsPerThread = Math.ceil(headDimV / T);
    return `${scoreWGSL(score)}${keyRangeWGSL(score)}
struct Uniforms {
  heads: i32, headsKV: i32, seqMax: i32, numSplits: i32, splitKeys: i32,
  rowChunks: i32, alibiPerBatch: i32, groupsTotal: i32,
  scale: f32, softcap: f32, left: i32, right: i32,
  seqlensK: array<vec4<i32>, ${batchVec4}>,
}
@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> kCache: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> vCache: array<f32>;
@group(0) @binding(3) var<storage, read> slopes: array<f32>;
@group(0) @binding(4) var<storage, read_write> partAcc: array<f32>;
@group(0) @binding(5) var<storage, read_write> partMaxSum: array<f32>;
@group(0) @binding(6) var<uniform> u: Uniforms;

const T = ${T};
const ROWS = ${rows};
const GROUP_ROWS = ${groups * seqQ};
const D4 = ${d4};
const DV = ${headDimV};
const SQ = ${seqQ};
const G = ${groups};
const DPT = ${dimsPerThread};
const NEG_BIG = ${FA_NEG_BIG};

var<workgroup> qTile: array<vec4<f32>, ${rows * d4}>;
var<workgroup> probs: array<f32, ${rows * T}>;
var<workgroup> rowAlpha: array<f32, ${rows}>;

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
  var p = FaScore(u.scale, u.softcap, 0.0, seqK - SQ, u.left, u.right, seqK, SQ);
  let i0 = n0 / G;
  let i1 = (n0 + nRows - 1) / G + 1;
  let range = fa_key_range(i0, i1, p);
  let lo = max(range.x, split * u.splitKeys);
  let hi = min(range.y, (split + 1) * u.splitKeys);
  var rowMax = NEG_BIG;
  var rowSum = 0.0;
  var acc: array<f32, ${rows * dimsPerThread}>;
  for (var x = 0; x < ${rows * dimsPerThread}; x++) { acc[x] = 0.0; }
  workgroupBarrier();
  for (var tile0 = lo; tile0 < hi; tile0 += T) {
    let j = tile0 + t;
    var dots: array<f32, ROWS>;
    for (var r = 0; r < ROWS; r++) { dots[r] = 0.0; }
    if (j < hi) {
      let kBase = ((b * u.seqMax + j) * u.headsKV + hk) * D4;
      for (var d = 0; d < D4; d++) {
        let kv = kCache[kBase + d];
        for (var r = 0; r < ROWS; r++) { dots[r] += dot(qTile[r * D4 + d], kv); }
      }
    }
    for (var r = 0; r < ROWS; r++) {
      let n = n0 + r;
      let i = n / G;
      var s = NEG_BIG;
      if (r < nRows && j < hi && fa_visible(i, j, p)) {
        let h = hk * G + n % G;
        p.slope = ${
        score.alibi ? 'slopes[select(h, b * u.heads + h, u.alibiPerBatch != 0)]' : '0.0'};
        s = fa_score(dots[r], i, j, p);
      }
      probs[r * T + t] = s;
    }
    workgroupBarrier();
    if (t < ROWS) {
      let base = t * T;
      var tileMax = NEG_BIG;
      for (var c = 0; c < T; c++) { tileMax = max(tileMax, probs[base + c]); }
      let newMax = max(rowMax, tileMax);
      let alpha = exp(rowMax - newMax);
      var sum = 0.0;
      for (var c = 0; c < T; c++) {
        let s = probs[base + c];
        // Masked keys keep NEG_BIG: weight 0 even while newMax is NEG_BIG.
        let e = select(0.0, exp(s - newMax), s > 0.5 * NEG_BIG);
        probs[base + c] = e;
        sum += e;
      }
      rowSum = rowSum * alpha + sum;
      rowMax = newMax;
      rowAlpha[t] = alpha;
    }
    workgroupBarrier();
    let count = min(T, hi - tile0);
    for (var r = 0; r < ROWS; r++) {
      let alpha = rowAlpha[r];
      for (var e = 0; e < DPT; e++) { acc[r * DPT + e] *= alpha; }
    }
    for (var c = 0; c < count; c++) {
      let vBase = ((b * u.seqMax + tile0 + c) * u.headsKV + hk) * DV;
      for (var e = 0; e < DPT; e++) {
        let d = t + e * T;
        if (d < DV) {
          let vd = vCache[vBase + d];
          for (var r = 0; r < ROWS; r++) { acc[r * DPT + e] += probs[r * T + c] * vd; }
        }
      }
    }
    workgroupBarrier();
  }
  // Row n of the group is output row (b, i, h) = ((b * SQ + i) * H + h).
  for (var r = 0; r < nRows; r++) {
    let n = n0 + r;
    let row = (b * SQ + n / G) * u.heads + hk * G + n % G;
    let slot = row * u.numSplits + split;
    for (var e = 0; e < DPT; e++) {
      let d = t + e * T;
      if (d < DV) { partAcc[slot * DV + d] = acc[r * DPT + e]; }
    }
    if (t == r) {
      partMaxSum[2 * slot] = rowMax;
      partMaxSum[2 * slot + 1] = rowSum;
    }
  }
}
`;
  }
}
