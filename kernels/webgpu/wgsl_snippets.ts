/**
 * WGSL pieces shared by the fused WebGPU kernels (forward and backward), so
 * that both compute exactly the same scores and dropout bits as the
 * reference (src/dropout.ts, docs/design.md, "Semantics").
 *
 * Every function here returns WGSL source text. Names start with `fa_` to
 * stay clear of a kernel's own identifiers. Constants that change the code
 * (which options are on) are arguments of the generators: a kernel must put
 * them in its pipeline key (`scoreKey`).
 */
import {bindingsWGSL, UniformField, uniformStructWGSL} from './own_pipeline';

/**
 * "Masked" and "no key seen yet" inside kernels: the lowest finite float32,
 * below every finite score, so rows whose scores are all tiny (e.g. -1e33)
 * still get their softmax. WGSL constants cannot be infinite and
 * implementations may assume no infinities, hence a finite sentinel that
 * kernels compare against explicitly; -inf is written as raw bits.
 */
export const FA_NEG_BIG = '-0x1.fffffep+127f';
/** Bits of float32 -Infinity (write through a u32 view of the buffer). */
export const FA_NEG_INF_BITS = 0xff800000;

/**
 * Philox4x32-10 (src/dropout.ts) in WGSL:
 *   fn fa_mulhilo(a: u32, b: u32) -> vec2<u32>      // (hi, lo) of a * b
 *   fn fa_philox(ctr: vec4<u32>, key: vec2<u32>) -> vec4<u32>
 * WGSL has no 32x32->64 multiply, so the high half is built from 16-bit
 * halves (every partial product fits in 32 bits).
 */
export function philoxWGSL(): string {
  return `
fn fa_mulhilo(a: u32, b: u32) -> vec2<u32> {
  let aLo = a & 0xffffu;
  let aHi = a >> 16u;
  let bLo = b & 0xffffu;
  let bHi = b >> 16u;
  let lolo = aLo * bLo;
  let mid1 = aHi * bLo;
  let mid2 = aLo * bHi;
  let carry = ((lolo >> 16u) + (mid1 & 0xffffu) + (mid2 & 0xffffu)) >> 16u;
  let hi = aHi * bHi + (mid1 >> 16u) + (mid2 >> 16u) + carry;
  return vec2<u32>(hi, a * b);
}

fn fa_philox(ctr: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
  var c = ctr;
  var k = key;
  for (var round = 0u; round < 10u; round++) {
    let p0 = fa_mulhilo(0xD2511F53u, c.x);
    let p1 = fa_mulhilo(0xCD9E8D57u, c.z);
    c = vec4<u32>(p1.x ^ c.y ^ k.x, p1.y, p0.x ^ c.w ^ k.y, p0.y);
    k = k + vec2<u32>(0x9E3779B9u, 0xBB67AE85u);
  }
  return c;
}
`;
}

/**
 * Dropout multipliers of the 4 keys `4 * quad .. 4 * quad + 3` of query row
 * `i` of (batch b, head h): `keepScale` where kept, 0 where dropped.
 *   fn fa_dropout4(b: u32, h: u32, i: u32, quad: u32, seed: vec2<u32>,
 *                  threshold: u32, keepScale: f32) -> vec4<f32>
 * Needs philoxWGSL().
 */
export function dropoutWGSL(): string {
  return `
fn fa_dropout4(b: u32, h: u32, i: u32, quad: u32, seed: vec2<u32>,
               threshold: u32, keepScale: f32) -> vec4<f32> {
  let w = fa_philox(vec4<u32>(quad, i, h, b), seed);
  return select(vec4<f32>(0.0), vec4<f32>(keepScale), w >= vec4<u32>(threshold));
}
`;
}

/** Which score options are compiled in (all other values are uniforms). */
export interface ScoreOptions {
  softcap: boolean;
  alibi: boolean;
  /** A left window bound exists (windowLeft >= 0). */
  windowLeft: boolean;
  /** A right window bound exists (windowRight >= 0; causal gives 0). */
  windowRight: boolean;
  /**
   * Per-batch sequence lengths (a `seqlens` binding, `[B, 2]` int32 of
   * (seqlenQ_b, seqlenK_b)): rows and keys past them see nothing, and the
   * diagonal of causal/window/ALiBi is `i + seqlenK_b - seqlenQ_b`.
   */
  seqlens?: boolean;
  /**
   * With seqlens, keep the padded diagonal `i + Sk - Sq` (key padding
   * masks; FlashAttentionAttrs.paddedDiagonal).
   */
  paddedDiagonal?: boolean;
  /**
   * With seqlens: the packed varlen layout (FlashAttentionAttrs.packedBatch).
   * Sequence b's rows start at its cumulative length: `seqlens` is then the
   * `[B + 1]` cuSeqlensQ, and a `cuK` binding cuSeqlensK; the lengths are
   * the differences (fa_packed_length). Rows and keys, dropout and ALiBi keep
   * their indices inside the sequence.
   */
  packed?: boolean;
}

export function scoreOptionsFromAttrs(
    attrs: {
      softcap: number,
      windowLeft: number,
      windowRight: number,
      paddedDiagonal?: boolean,
      packedBatch?: number
    },
    hasAlibi: boolean, hasSeqlens = false): ScoreOptions {
  return {
    softcap: attrs.softcap > 0,
    alibi: hasAlibi,
    windowLeft: attrs.windowLeft >= 0,
    windowRight: attrs.windowRight >= 0,
    seqlens: hasSeqlens,
    paddedDiagonal: hasSeqlens && attrs.paddedDiagonal === true,
    packed: hasSeqlens && attrs.packedBatch! > 0,
  };
}

/** The part of a pipeline key that scoreWGSL's options decide. */
export function scoreKey(o: ScoreOptions): string {
  return `sc${+ o.softcap}al${+ o.alibi}wl${+ o.windowLeft}wr${+ o.windowRight}sl${+ !!o.seqlens}${
      o.paddedDiagonal ? 'pd' : ''}${o.packed ? 'pk' : ''}`;
}

/**
 * The score pipeline of docs/design.md, "Semantics" (scale -> softcap -> alibi -> mask):
 *
 *   struct FaScore {scale, softcap, slope: f32, diag (= Sk - Sq),
 *                   left, right, seqK, seqQ: i32}
 *   fn fa_with_lengths(p: FaScore, lenQ: i32, lenK: i32) -> FaScore
 *       a batch row's own lengths (options with seqlens only)
 *   fn fa_tanh(x: f32) -> f32                    // overflow-free tanh
 *   fn fa_visible(i: i32, j: i32, p: FaScore) -> bool
 *       key j < seqK and inside the window of query i (and, with
 *       seqlens, row i < seqQ)
 *   fn fa_visible4(i: i32, j: vec4<i32>, p: FaScore) -> vec4<bool>
 *       the same for 4 keys, without branches
 *   fn fa_score(qk: f32, i: i32, j: i32, p: FaScore) -> f32
 *       the final score of a visible key (qk = q . k, unscaled)
 *   fn fa_capped(qk: f32, p: FaScore) -> f32
 *       scale then softcap only (no alibi): what the softcap derivative
 *       needs is 1 - (fa_capped / softcap)^2
 *
 * Unused option values in FaScore are ignored (e.g. `left` without a left
 * bound), so a kernel can always fill every field.
 */
export function scoreWGSL(o: ScoreOptions): string {
  return `
struct FaScore {
  scale: f32,
  softcap: f32,
  slope: f32,
  diag: i32,
  left: i32,
  right: i32,
  seqK: i32,
  seqQ: i32,
}

// Only the batch row's own tokens count: keys past seqlenK_b are padding,
// and the diagonal is aligned to the row's own bottom-right corner (or,
// for key padding masks, stays at the padded Sk - Sq).
fn fa_with_lengths(p: FaScore, lenQ: i32, lenK: i32) -> FaScore {
  var r = p;
  r.seqQ = lenQ;
  r.seqK = lenK;
  ${o.paddedDiagonal ? '' : 'r.diag = lenK - lenQ;'}
  return r;
}

${o.packed ? packedWGSL() : ''}
fn fa_tanh(x: f32) -> f32 {
  // exp of a non-positive argument cannot overflow.
  let t = exp(-2.0 * abs(x));
  let r = (1.0 - t) / (1.0 + t);
  return select(r, -r, x < 0.0);
}

fn fa_visible(i: i32, j: i32, p: FaScore) -> bool {
  var ok = j >= 0 && j < p.seqK;
  ${o.seqlens ? 'ok = ok && i < p.seqQ;' : ''}
  let d = i + p.diag;
  ${o.windowLeft ? 'ok = ok && j >= d - p.left;' : ''}
  ${o.windowRight ? 'ok = ok && j <= d + p.right;' : ''}
  return ok;
}

// Four keys at once, branch-free (software rasterizers compile the
// short-circuit form of many unrolled masks very slowly).
fn fa_visible4(i: i32, j: vec4<i32>, p: FaScore) -> vec4<bool> {
  var ok = (j >= vec4<i32>(0)) & (j < vec4<i32>(p.seqK));
  ${o.seqlens ? 'ok = ok & vec4<bool>(i < p.seqQ);' : ''}
  let d = i + p.diag;
  ${o.windowLeft ? 'ok = ok & (j >= vec4<i32>(d - p.left));' : ''}
  ${o.windowRight ? 'ok = ok & (j <= vec4<i32>(d + p.right));' : ''}
  return ok;
}

fn fa_capped(qk: f32, p: FaScore) -> f32 {
  let s = qk * p.scale;
  ${o.softcap ? 'return p.softcap * fa_tanh(s / p.softcap);' : 'return s;'}
}

fn fa_score(qk: f32, i: i32, j: i32, p: FaScore) -> f32 {
  var s = fa_capped(qk, p);
  ${o.alibi ? 's = s - p.slope * f32(abs(i + p.diag - j));' : ''}
  return s;
}
`;
}

/**
 * The packed varlen layout's sequence bounds (ScoreOptions.packed):
 *   fn fa_packed_length(start: i32, next: i32, total: i32, maxLen: i32) -> i32
 *       rows of the sequence at `start` (next: the following one's start):
 *       cut to maxLen and to the tensor's `total` rows
 *   fn fa_packed_gaps(b: i32, nb: i32, start: i32, len: i32, next: i32,
 *                     total: i32) -> vec4<i32>
 *       the rows [x, y) and [z, w) that no sequence covers and sequence b
 *       of nb owns: those before the first sequence (b == 0), and those
 *       after its rows up to the next sequence's start (the end of the
 *       tensor for the last). Empty unless cuSeqlens leaves rows out or a
 *       sequence exceeds maxLen; their outputs and gradients are zeros.
 */
function packedWGSL(): string {
  return `
fn fa_packed_length(start: i32, next: i32, total: i32, maxLen: i32) -> i32 {
  return clamp(min(next, total) - start, 0, maxLen);
}

fn fa_packed_gaps(b: i32, nb: i32, start: i32, len: i32, next: i32, total: i32) -> vec4<i32> {
  let before = select(0, clamp(start, 0, total), b == 0);
  let lo = clamp(start + len, 0, total);
  let hi = select(clamp(next, lo, total), total, b == nb - 1);
  return vec4<i32>(0, before, lo, hi);
}
`;
}

/**
 * The range of key indices [lo, hi) that any query row in [row0, row1) can
 * see (window and causal), clipped to [0, seqK); empty when lo >= hi. For
 * kernels that compute their key range on the GPU from uniforms:
 *   fn fa_key_range(row0: i32, row1: i32, p: FaScore) -> vec2<i32>  // [lo, hi)
 *   fn fa_tile_unmasked(row0, row1, col0, col1: i32, p: FaScore) -> bool
 *       every row of [row0, row1) sees every key of [col0, col1)
 * With seqlens, rows past the batch row's seqQ see nothing: a query tile
 * that starts past it gets the empty range (0, 0) and so no key tile.
 * Needs scoreWGSL() (for FaScore).
 */
export function keyRangeWGSL(o: ScoreOptions): string {
  return `
fn fa_key_range(row0: i32, row1In: i32, p: FaScore) -> vec2<i32> {
  var row1 = row1In;
  ${
      o.seqlens ? `row1 = min(row1, p.seqQ);
  if (row1 <= row0) {
    return vec2<i32>(0, 0);
  }` :
                  ''}
  var lo = 0;
  var hi = p.seqK;
  ${o.windowLeft ? 'lo = max(0, row0 + p.diag - p.left);' : ''}
  ${o.windowRight ? 'hi = min(p.seqK, row1 - 1 + p.diag + p.right + 1);' : ''}
  return vec2<i32>(lo, hi);
}

fn fa_tile_unmasked(row0: i32, row1: i32, col0: i32, col1: i32, p: FaScore) -> bool {
  var ok = col1 <= p.seqK;
  ${o.seqlens ? 'ok = ok && row1 <= p.seqQ;' : ''}
  ${o.windowRight ? 'ok = ok && col1 - 1 <= row0 + p.diag + p.right;' : ''}
  ${o.windowLeft ? 'ok = ok && col0 >= row1 - 1 + p.diag - p.left;' : ''}
  return ok;
}
`;
}

/**
 * The rows [lo, hi) of queries that can see any key in [col0, col1): the
 * transpose of fa_key_range, for backward kernels that walk key tiles.
 * Empty (lo >= hi) for a key tile past the batch row's keys.
 *   fn fa_query_range(col0: i32, col1: i32, p: FaScore) -> vec2<i32>
 */
export function queryRangeWGSL(o: ScoreOptions): string {
  return `
fn fa_query_range(col0: i32, col1In: i32, p: FaScore) -> vec2<i32> {
  let col1 = min(col1In, p.seqK);
  if (col1 <= col0) {
    return vec2<i32>(0, 0);
  }
  var lo = 0;
  var hi = p.seqQ;
  // Query i sees key j iff i + diag - left <= j <= i + diag + right.
  ${o.windowRight ? 'lo = max(0, col0 - p.diag - p.right);' : ''}
  ${o.windowLeft ? 'hi = min(p.seqQ, col1 - 1 - p.diag + p.left + 1);' : ''}
  return vec2<i32>(lo, hi);
}
`;
}

/**
 * WGSL placing a forward workgroup (both forward kernels) from its query
 * tile number `tileId` (WGSL): `var qTile`, the tile of head `h` (kv head
 * `hk`) of batch row `b`. With `reverseRows` the heaviest query tiles
 * (causal-like masks) come first. Uses the uniforms numQTiles, heads and
 * groups of `u`.
 */
export function forwardTileWGSL(tileId: string, reverseRows: boolean): string {
  return `var qTile = ${tileId} % u.numQTiles;
  ${reverseRows ? 'qTile = u.numQTiles - 1 - qTile;' : ''}
  let bh = ${tileId} / u.numQTiles;
  let h = bh % u.heads;
  let b = bh / u.heads;
  let hk = h / u.groups;`;
}

/** 0, 1, ..., n - 1: the indices a generator unrolls over. */
export function range(n: number): number[] {
  return Array.from({length: n}, (_, i) => i);
}

/** The components of a WGSL vec4, by index. */
export const VEC4_COMPONENTS = ['x', 'y', 'z', 'w'] as const;

/** WGSL max() of all terms, as a balanced tree (WGSL's max takes two). */
export function maxAllWGSL(terms: string[]): string {
  if (terms.length === 1) {
    return terms[0];
  }
  const half = Math.ceil(terms.length / 2);
  return `max(${maxAllWGSL(terms.slice(0, half))}, ${maxAllWGSL(terms.slice(half))})`;
}

/**
 * The uniform struct `Uniforms` and the bindings of a fused forward program
 * (both forward kernels), in the order its inputs and outputs are bound:
 * q, k, v as `qb`, `kb`, `vb` (element types `qkType`, `qkType`, `vType`),
 * the ALiBi slopes and per-batch lengths (`seqlens`, and `cuK` when packed)
 * when compiled in, the
 * outputs `outb` (`vType`) and `lseb` (log-sum-exp bits), the uniforms `u`.
 */
export function forwardBindingsWGSL(
    uniforms: readonly UniformField[],
    o: {qkType: string, vType: string, alibi: boolean, seqlens?: boolean, packed?: boolean}):
    string {
  const inputs = [
    {name: 'qb', type: o.qkType},
    {name: 'kb', type: o.qkType},
    {name: 'vb', type: o.vType},
    ...(o.alibi ? [{name: 'slopes', type: 'f32'}] : []),
    // (seqlenQ_b, seqlenK_b) per batch row.
    ...(o.seqlens ? [{name: 'seqlens', type: 'i32'}] : []),
    // Packed varlen: seqlens is cuSeqlensQ, and this cuSeqlensK.
    ...(o.packed ? [{name: 'cuK', type: 'i32'}] : []),
  ];
  const outputs = [{name: 'outb', type: o.vType}, {name: 'lseb', type: 'u32'}];
  return `${uniformStructWGSL('Uniforms', uniforms)}

${bindingsWGSL(inputs, outputs, {name: 'u', type: 'Uniforms'})}`;
}
