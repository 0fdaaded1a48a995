/**
 * The fused FlashAttention forward program in WGSL (FlashAttention-2's
 * forward: one pass over K/V per query tile, online softmax in f32).
 *
 * One workgroup owns BR query rows of one (batch, head) and walks the key
 * tiles of BC keys that any of its rows can see (tiles that the causal or
 * window mask hides completely are never visited). Per key tile:
 *   S = Q K^T        Q tile and K tile in workgroup memory, each thread a
 *                    TM x (4*NQ) register tile of S
 *   scores           scale -> softcap -> alibi -> mask (mask only on tiles
 *                    that cross a boundary), then the running row max
 *                    (reduced over the TX threads of a row by subgroup
 *                    shuffles, or through workgroup memory without them)
 *   P = exp(S - m)   rescales the running sum and output; dropout applied
 *                    to P (not to the sum), bits from Philox as the reference
 *   O += P V         P through workgroup memory; V replaces K in the same
 *                    buffer; each thread a TM x (4*NJ) register tile of O
 * Global loads of the next K tile (and of this tile's V) are issued into
 * registers before the math that precedes their use, so their latency
 * overlaps it.
 *
 * Threads: TX per row group x TY row groups; thread (ty, tx) owns rows
 * ty + TY*i (i < TM), key columns 4*(tx + TX*q) + e (q < NQ, e < 4: whole
 * quads, so one Philox call gives a thread's 4 dropout bits) and output
 * columns 4*(tx + TX*jj) + e. K rows in workgroup memory are XOR-swizzled
 * per quad so that the TX threads reading different keys hit different
 * banks.
 *
 * Outer-product mode (ForwardTiles.outer): Q^T, K^T and P^T live in
 * workgroup memory instead, thread rows are 4 * (ty + TY * a) + b, keys
 * whole quads; each head-dim step (and each key of P V) is one vec4 load
 * per 4 rows and per 4 keys (columns) and their outer product, which cuts
 * the workgroup-memory loads per FMA (flash_attention_forward_wgsl.ts).
 * P^T's row quads are XOR-swizzled by key quad, so that its
 * stores do not all land in one bank.
 *
 * Head-dim slices (ForwardTiles.dimChunks, outer mode): K^T and V pass
 * through workgroup memory a slice of the head dim at a time, so that a
 * 64-row Q^T tile fits beside them at D=128 (slicedKeyLoopWGSL); Q^T can
 * be streamed with K^T instead of resident (streamQuery), and the slices
 * can alternate between two buffers, one barrier each (doubleBuffer).
 */
import {bindingsWGSL, uniformStructWGSL} from './own_pipeline';
import {epilogueWGSL, ForwardLayout, keyLoopWGSL, keyOffsetsWGSL, loadQueryTileWGSL, rowStateWGSL, workgroupStorageWGSL, xorSwizzleMask} from './flash_attention_forward_wgsl';
import {dropoutWGSL, FA_NEG_BIG, FA_NEG_INF_BITS, forwardBindingsWGSL, forwardTileWGSL, keyRangeWGSL, philoxWGSL, range, scoreKey, ScoreOptions, scoreWGSL} from './wgsl_snippets';

/** The register/workgroup tiling of one pipeline. */
export interface ForwardTiles {
  /** Rows per thread. */
  tm: number;
  /** Threads sharing a row (a power of two). */
  tx: number;
  /** Key quads per thread: BC = 4 * TX * NQ. */
  nq: number;
  /** Row groups: BR = TM * TY; threads = TX * TY. */
  ty: number;
  /**
   * Outer-product mode (TM a multiple of 4): Q^T, K^T and P^T in workgroup
   * memory, so that per head-dim step (and per key in P V) a thread loads
   * one vec4 per 4 rows and one per 4 keys (or 4 output columns) and does
   * their outer product. K^T and V take turns in one buffer (less
   * workgroup memory, more workgroups per SM, for a third barrier per key
   * tile). Rows of a thread: 4 * (ty + TY * a) + b.
   */
  outer?: boolean;
  /**
   * Outer-product mode only: K^T and V go through workgroup memory in this
   * many slices of the head dim (a barrier pair each), so that a 64-row Q^T
   * tile fits beside them at D=128 (docs/webgpu_tuning.md, "Head dims above
   * 64"). 1 or absent: whole tiles.
   */
  dimChunks?: number;
  /**
   * Outer-product mode only: Q^T is not resident but streamed beside K^T,
   * slice by slice, every key tile (from L2, where the tile's rows stay
   * hot). Frees the 32 KiB a 64-row Q^T takes at D=128, so that 64 x 64
   * tiles with 256 invocations fit 48 KiB.
   */
  streamQuery?: boolean;
  /**
   * Outer-product mode only: two slice buffers used in turn, so that a
   * slice is stored while the previous one is multiplied: one barrier per
   * slice instead of a pair.
   */
  doubleBuffer?: boolean;
  /**
   * Outer-product mode only: head-dim steps of S and keys of P V per
   * unrolled loop body, at most (4, 8 or 16; default 8 and 16). A smaller
   * body holds fewer loads in flight: fewer registers at large head dims.
   */
  unroll?: number;
}

/** Everything baked into one forward pipeline. */
export interface ForwardConfig {
  headDim: number;
  headDimV: number;
  tiles: ForwardTiles;
  score: ScoreOptions;
  /** 0 none, 1 slopes [H], 2 slopes [B, H]. */
  alibiMode: 0|1|2;
  dropout: boolean;
  /** Row reductions by subgroupShuffleXor (needs TX <= subgroup size). */
  subgroups: boolean;
  /** Heaviest query tiles first (causal-like masks). */
  reverseRows: boolean;
  /**
   * Split-KV (flash-decoding): the key tiles of a query tile are divided
   * among `u.numSplits` workgroups, each writing its normalized partial
   * output and log-sum-exp at `split * u.splitRows` / `split * u.splitLse`;
   * splitCombineWGSL merges them. Gives short sequences and small
   * batch x heads enough workgroups to fill the GPU.
   */
  splitKeys?: boolean;
  /**
   * Inner loop bounds from uniforms instead of constants: software
   * rasterizers (SwiftShader) unroll constant loops fully, which makes
   * pipeline creation take minutes.
   */
  runtimeLoops: boolean;
  /** Register prefetch of K/V forced on/off (tests; default usePrefetch). */
  prefetch?: boolean;
}

/** The sizes a tiling gives (see the thread layout above). */
export interface TileSizes {
  /** Query rows and keys per tile, threads per workgroup. */
  br: number;
  bc: number;
  threads: number;
  /** Head dims of Q/K and of V in vec4s. */
  dq4: number;
  dv4: number;
  /** Output quads per thread: columns 4 * (tx + TX * jj) + e, jj < NJ. */
  nj: number;
  /** Width of the shared K/V tile rows in vec4s (K's or V's, the wider). */
  kvWidth: number;
  /** Outer mode: the V row stride in vec4s (every thread's columns). */
  vWidth: number;
  /** Head-dim slices of K^T and V (ForwardTiles.dimChunks; 1: none). */
  chunks: number;
  /** Width of one K^T slice in vec4s (DQ4 when unsliced; the last may pad). */
  dc4: number;
  /** Width of one V slice in vec4s: TX * NJ / valueChunks. */
  vcw: number;
  /**
   * Slices of V: `chunks`, or fewer when a thread has fewer output quads
   * (each slice holds at least one quad of every thread).
   */
  valueChunks: number;
  /**
   * The key loop streams K^T and V through slice buffers
   * (slicedKeyLoopWGSL): head-dim slices, a streamed Q or double buffers.
   */
  sliced: boolean;
  /** Slice buffers of K^T / V (and of Q^T when streamed): 2 double-buffered. */
  buffers: number;
}

export function tileSizes(c: {headDim: number, headDimV: number, tiles: ForwardTiles}): TileSizes {
  const {tm, tx, nq, ty} = c.tiles;
  const chunks = Math.max(1, c.tiles.dimChunks ?? 1);
  const dq4 = Math.ceil(c.headDim / 4);
  const dv4 = Math.ceil(c.headDimV / 4);
  const quadsPerThread = Math.ceil(dv4 / tx);
  const valueChunks = Math.min(chunks, quadsPerThread);
  // Sliced: every slice holds the same number of each thread's quads.
  const nj = Math.ceil(quadsPerThread / valueChunks) * valueChunks;
  const sliced = chunks > 1 || c.tiles.streamQuery === true || c.tiles.doubleBuffer === true;
  return {
    br: tm * ty,
    bc: 4 * tx * nq,
    threads: tx * ty,
    dq4,
    dv4,
    nj,
    kvWidth: Math.max(dq4, tx * nj),
    vWidth: tx * nj,
    chunks,
    dc4: Math.ceil(dq4 / chunks),
    vcw: tx * nj / valueChunks,
    valueChunks,
    sliced,
    buffers: c.tiles.doubleBuffer ? 2 : 1,
  };
}

/** Bytes of workgroup memory a configuration uses. */
export function workgroupBytes(
    c: {headDim: number, headDimV: number, tiles: ForwardTiles}, subgroups: boolean): number {
  const s = tileSizes(c);
  const red = subgroups ? 0 : s.br * c.tiles.tx * 4;
  if (c.tiles.outer && s.sliced) {
    // Q^T (padded to whole slices; one slice per buffer when streamed),
    // K^T or V slice buffers, and P^T.
    const query = c.tiles.streamQuery ? s.buffers * s.br * s.dc4 : s.br * s.dc4 * s.chunks;
    const slice = s.buffers * s.bc * Math.max(s.dc4, s.vcw);
    return 16 * (query + slice) + 4 * s.br * s.bc + red;
  }
  if (c.tiles.outer) {
    // Q^T, K^T and V (one buffer for both) and P^T.
    const kv = Math.max(s.bc * s.dq4, s.bc * s.vWidth);
    return 16 * (s.br * s.dq4 + kv) + 4 * s.br * s.bc + red;
  }
  // K/V rows padded by one vec4 (the layout without quad columns).
  return 16 * (s.br * s.dq4 + s.bc * (s.kvWidth + 1)) + 4 * s.br * s.bc + red;
}

/** Floats per thread that the register prefetch of K and V needs. */
export function prefetchFloats(c: {headDim: number, headDimV: number, tiles: ForwardTiles}):
    number {
  const s = tileSizes(c);
  if (s.sliced) {
    // One slice of K^T (with Q^T's when streamed) or of V ahead.
    const query = c.tiles.streamQuery ? Math.ceil(s.br * s.dc4 / s.threads) : 0;
    return 4 *
        Math.max(Math.ceil(s.bc * s.dc4 / s.threads) + query, Math.ceil(s.bc * s.vcw / s.threads));
  }
  return 4 * (Math.ceil(s.bc * s.dq4 / s.threads) + Math.ceil(s.bc * s.dv4 / s.threads));
}

/**
 * Global loads of K/V go through registers ahead of their use unless that
 * takes too many registers (large head dims) or loops are not unrolled.
 */
export function usePrefetch(c: ForwardConfig): boolean {
  return !c.runtimeLoops && (c.prefetch ?? prefetchFloats(c) <= 64);
}

export function forwardKey(c: ForwardConfig): string {
  const t = c.tiles;
  const chunks = (t.dimChunks ?? 1) > 1 ? `c${t.dimChunks}` : '';
  const stream =
      `${t.streamQuery ? 'qs' : ''}${t.doubleBuffer ? 'db' : ''}${t.unroll ? `u${t.unroll}` : ''}`;
  const tiling = `tm${t.tm}tx${t.tx}nq${t.nq}ty${t.ty}${t.outer ? 'o' : ''}${chunks}${stream}`;
  const flags = `al${c.alibiMode}_do${+ c.dropout}_sg${+ c.subgroups}_rv${+ c.reverseRows}_rl${
      + c.runtimeLoops}_pf${c.prefetch ?? '-'}_sk${+ !!c.splitKeys}`;
  return `fa_fwd_d${c.headDim}_dv${c.headDimV}_${tiling}_${scoreKey(c.score)}_${flags}`;
}

/**
 * Field order of the uniform struct (all 4-byte scalars). batch, totalQ
 * and totalK: packed varlen calls' sequences and rows of q and of k.
 */
export const FORWARD_UNIFORMS = [
  ['seqQ', 'i32'],     ['seqK', 'i32'],      ['heads', 'i32'],       ['groups', 'i32'],
  ['headsKV', 'i32'],  ['numQTiles', 'i32'], ['totalGroups', 'i32'], ['gridX', 'i32'],
  ['scale', 'f32'],    ['softcap', 'f32'],   ['left', 'i32'],        ['right', 'i32'],
  ['seedLo', 'u32'],   ['seedHi', 'u32'],    ['threshold', 'u32'],   ['keepScale', 'f32'],
  ['loopDQ4', 'i32'],  ['loopBC4', 'i32'],   ['numSplits', 'i32'],   ['splitRows', 'i32'],
  ['splitLse', 'i32'], ['batch', 'i32'],     ['totalQ', 'i32'],      ['totalK', 'i32'],
] as const;

/** The sizes and index maps the phase generators share. */
export function forwardLayout(c: ForwardConfig): ForwardLayout {
  const t = c.tiles;
  const outer = t.outer === true;
  if (outer && t.tm % 4 !== 0) {
    throw new Error(
        `FlashAttention forward: the outer-product tiling needs TM % 4 == 0, got ${t.tm}`);
  }
  if (t.dimChunks != null && !(Number.isInteger(t.dimChunks) && t.dimChunks >= 1)) {
    throw new Error(
        `FlashAttention forward: dimChunks must be a positive integer, got ${t.dimChunks}`);
  }
  if ((t.dimChunks ?? 1) > 1 && !outer) {
    throw new Error(`FlashAttention forward: head-dim slices (dimChunks = ${
        t.dimChunks}) need the outer-product tiling`);
  }
  if (t.unroll != null && ![4, 8, 16].includes(t.unroll)) {
    throw new Error(`FlashAttention forward: unroll must be 4, 8 or 16, got ${t.unroll}`);
  }
  if ((t.streamQuery || t.doubleBuffer || t.unroll != null) && !outer) {
    const what = t.streamQuery ? 'streamQuery' : t.doubleBuffer ? 'doubleBuffer' : 'unroll';
    throw new Error(`FlashAttention forward: ${what} needs the outer-product tiling`);
  }
  const sizes = tileSizes(c);
  const quadColumns = c.dropout || outer;
  return {
    config: c,
    tiles: t,
    sizes,
    outer,
    quadColumns,
    // Without quad columns, K/V rows are padded by a vec4 against bank
    // conflicts; with them, K rows are XOR-swizzled per key quad instead.
    kvStride: quadColumns ? sizes.kvWidth : sizes.kvWidth + 1,
    keySwizzleMask: xorSwizzleMask(sizes.dq4),
    probsSwizzleMask: xorSwizzleMask(sizes.br / 4),
    prefetch: usePrefetch(c),
    rows: range(t.tm),
    keyQuads: range(t.nq),
    outQuads: range(sizes.nj),
  };
}

/**
 * WGSL placing batch row b's rows in the tensors, for the phases' loads and
 * stores: `qBase`, `kBase` (its first query and key row), `rowsQ`,
 * `rowsK` (rows it may read and write) and `lseBase` (its lse row of
 * head h); with seqlens, its lengths in `sp`. Packed varlen: the rows
 * start at the cumulative lengths, only the sequence's own rows are
 * touched, the workgroups of query tile 0 zero the rows no sequence
 * covers (fa_packed_gaps), and tiles past the sequence stop at once.
 */
function sequenceRowsWGSL(c: ForwardConfig): string {
  if (!c.score.packed) {
    return `${
        c.score.seqlens ? 'sp = fa_with_lengths(sp, seqlens[2 * b], seqlens[2 * b + 1]);' : ''}
  let qBase = b * u.seqQ;
  let kBase = b * u.seqK;
  let rowsQ = u.seqQ;
  let rowsK = u.seqK;
  let lseBase = (b * u.heads + h) * u.seqQ;`;
  }
  const vec4Out = c.headDimV % 4 === 0;
  const width = vec4Out ? 'i32(DV4)' : `${c.headDimV}`;
  return `let qBase = seqlens[b];
  let kBase = cuK[b];
  let rowsQ = fa_packed_length(qBase, seqlens[b + 1], u.totalQ, u.seqQ);
  let rowsK = fa_packed_length(kBase, cuK[b + 1], u.totalK, u.seqK);
  let lseBase = h * u.totalQ + qBase;
  sp = fa_with_lengths(sp, rowsQ, rowsK);
  if (qTile == 0) {
    let gaps = fa_packed_gaps(b, u.batch, qBase, rowsQ, seqlens[b + 1], u.totalQ);
    for (var g = 0; g < 2; g++) {
      let lo = select(gaps.z, gaps.x, g == 0);
      let n = (select(gaps.w, gaps.y, g == 0) - lo) * ${width};
      for (var e = i32(lid); e < n; e += i32(THREADS)) {
        let r = lo + e / ${width};
        outb[u32((split * u.splitRows + r * u.heads + h) * ${width} + e % ${width})] = ${
      vec4Out ? 'vec4<f32>(0.0)' : '0.0'};
        if (e % ${width} == 0) {
          lseb[u32(split * u.splitLse + h * u.totalQ + r)] = ${FA_NEG_INF_BITS}u;
        }
      }
    }
  }
  if (qTile * i32(BR) >= rowsQ) {
    return;
  }`;
}

/** The forward program's WGSL: the phases of flash_attention_forward_wgsl.ts. */
export function forwardWGSL(c: ForwardConfig): string {
  const L = forwardLayout(c);
  const t = c.tiles;
  const {br, bc, threads, dq4, dv4} = L.sizes;
  const bindings = forwardBindingsWGSL(FORWARD_UNIFORMS, {
    qkType: c.headDim % 4 === 0 ? 'vec4<f32>' : 'f32',
    vType: c.headDimV % 4 === 0 ? 'vec4<f32>' : 'f32',
    alibi: c.alibiMode !== 0,
    seqlens: c.score.seqlens,
    packed: c.score.packed,
  });
  const slope = ['0.0', 'slopes[h]', 'slopes[b * u.heads + h]'][c.alibiMode];
  const splitRange = c.splitKeys ? `// This split's share of the visible key tiles (possibly none).
  let perSplit = (tLast - tFirst + u.numSplits - 1) / u.numSplits;
  let tBegin = min(tLast, tFirst + split * perSplit);
  let tEnd = min(tLast, tBegin + perSplit);` :
                                   `let tBegin = tFirst;
  let tEnd = tLast;`;
  return `${c.subgroups ? 'enable subgroups;' : ''}
${scoreWGSL(c.score)}
${keyRangeWGSL(c.score)}
${c.dropout ? philoxWGSL() + dropoutWGSL() : ''}

${bindings}

const BR = ${br}u;
const BC = ${bc}u;
const TY = ${t.ty}u;
const TX = ${t.tx}u;
const THREADS = ${threads}u;
const DQ4 = ${dq4}u;
const DV4 = ${dv4}u;
const KVW = ${L.kvStride}u;
const NEG = ${FA_NEG_BIG};

${workgroupStorageWGSL(L)}

@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let groupId = i32(wg.x + wg.y * u32(u.gridX));
  if (groupId >= u.totalGroups) {
    return;
  }
  // Split-KV: the splits of one query tile are neighbours (Q shared in cache).
  let split = ${c.splitKeys ? 'groupId % u.numSplits' : '0'};
  let tileId = ${c.splitKeys ? 'groupId / u.numSplits' : 'groupId'};
  ${forwardTileWGSL('tileId', c.reverseRows)}
  let tx = lid % TX;
  let ty = lid / TX;
  let r0 = qTile * i32(BR);
  let rEnd = min(r0 + i32(BR), u.seqQ);

  var sp: FaScore;
  sp.scale = u.scale;
  sp.softcap = u.softcap;
  sp.slope = ${slope};
  sp.diag = u.seqK - u.seqQ;
  sp.left = u.left;
  sp.right = u.right;
  sp.seqK = u.seqK;
  sp.seqQ = u.seqQ;
  ${sequenceRowsWGSL(c)}

  ${t.streamQuery ? '// Q^T slices are streamed with K^T (the key loop).' : loadQueryTileWGSL(L)}
  let keys = fa_key_range(r0, rEnd, sp);
  let tFirst = keys.x / i32(BC);
  let tLast = select(tFirst, (keys.y + i32(BC) - 1) / i32(BC), keys.y > keys.x);
  ${splitRange}

  ${rowStateWGSL(L)}
  ${keyOffsetsWGSL(L)}

  ${keyLoopWGSL(L)}
  ${epilogueWGSL(L, FA_NEG_INF_BITS)}
}
`;
}

/**
 * Merges the partial results of split-KV: per output element, the splits'
 * outputs weighted by exp(lse_s - max lse), in split order (deterministic).
 * Splits that saw no key (lse = -inf) weigh 0; a row no split saw gets
 * out = 0 and lse = -inf, as without splits. Bindings: partial out
 * [n, B, Sq, H, Dv], partial lse bits [n, B, H, Sq]; out, lse bits;
 * uniforms (COMBINE_UNIFORMS).
 */
export function splitCombineWGSL(): string {
  const bindings = bindingsWGSL(
      [{name: 'partOut', type: 'f32'}, {name: 'partLse', type: 'u32'}],
      [{name: 'outb', type: 'f32'}, {name: 'lseb', type: 'u32'}], {name: 'u', type: 'Uniforms'});
  return `${uniformStructWGSL('Uniforms', COMBINE_UNIFORMS)}
${bindings}

@compute @workgroup_size(${COMBINE_THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let idx = (wg.x + wg.y * u.gridX) * ${COMBINE_THREADS}u + lid;
  if (idx >= u.elements) {
    return;
  }
  // out is [B, Sq, H, Dv]; lse is [B, H, Sq].
  let e = idx % u.headDimV;
  let row = idx / u.headDimV;
  let h = row % u.heads;
  let bs = row / u.heads;
  let s = bs % u.seqQ;
  let b = bs / u.seqQ;
  let li = (b * u.heads + h) * u.seqQ + s;
  var mx = 0.0;
  var seen = false;
  for (var n = 0u; n < u.numSplits; n++) {
    let bits = partLse[n * u.splitLse + li];
    if (bits != ${FA_NEG_INF_BITS}u) {
      let x = bitcast<f32>(bits);
      mx = select(x, max(mx, x), seen);
      seen = true;
    }
  }
  var den = 0.0;
  var acc = 0.0;
  for (var n = 0u; n < u.numSplits; n++) {
    let bits = partLse[n * u.splitLse + li];
    if (bits != ${FA_NEG_INF_BITS}u) {
      let w = exp(bitcast<f32>(bits) - mx);
      den += w;
      acc += w * partOut[n * u.splitRows * u.headDimV + idx];
    }
  }
  outb[idx] = select(0.0, acc / den, seen);
  if (e == 0u) {
    lseb[li] = select(${FA_NEG_INF_BITS}u, bitcast<u32>(mx + log(den)), seen);
  }
}
`;
}

export const COMBINE_THREADS = 64;

/** Field order of the combine pass's uniforms (all u32). */
export const COMBINE_UNIFORMS = [
  ['elements', 'u32'],
  ['headDimV', 'u32'],
  ['heads', 'u32'],
  ['seqQ', 'u32'],
  ['numSplits', 'u32'],
  ['splitRows', 'u32'],
  ['splitLse', 'u32'],
  ['gridX', 'u32'],
] as const;
