/**
 * WGSL shared by the backward's programs: the uniform block, and the score
 * and dropout functions of wgsl_snippets.ts (the forward's, so both passes
 * compute the same scores and dropout bits), with what the backward adds:
 * the derivative of the score with respect to scale * q.k.
 */
import type {FlashAttentionAttrs} from '../../src/kernel_names';
import type {AttentionShapes} from '../../src/checks';
import {dropoutThreshold} from '../../src/dropout';

import {bindingsWGSL, OwnPipelineSpec, packUniforms, StorageBinding, UniformField, uniformStructWGSL} from './own_pipeline';
import {dropoutWGSL, keyRangeWGSL, philoxWGSL, queryRangeWGSL, ScoreOptions, scoreKey, scoreOptionsFromAttrs, scoreWGSL} from './wgsl_snippets';

/** What is baked into a program (and so into its pipeline key). */
export interface GradFeatures extends ScoreOptions {
  dropout: boolean;
}

export function gradFeatures(
    attrs: FlashAttentionAttrs, hasAlibi: boolean, hasSeqlens = false): GradFeatures {
  return {...scoreOptionsFromAttrs(attrs, hasAlibi, hasSeqlens), dropout: attrs.dropoutRate > 0};
}

export function featureKey(f: GradFeatures): string {
  return `${scoreKey(f)}dp${+ f.dropout}`;
}

/**
 * The uniform block `p` every backward program declares: runtime values
 * only (what changes the code is in the pipeline key instead). The WGSL
 * struct and the bytes are both generated from this list.
 */
export const GRAD_UNIFORMS: readonly UniformField[] = [
  ['batch', 'i32'],
  ['seqQ', 'i32'],
  ['seqK', 'i32'],
  ['heads', 'i32'],
  ['headsKV', 'i32'],
  ['windowLeft', 'i32'],
  ['windowRight', 'i32'],
  ['alibiPerBatch', 'i32'],
  ['seedLo', 'u32'],
  ['seedHi', 'u32'],
  ['threshold', 'u32'],
  ['scale', 'f32'],
  ['softcap', 'f32'],
  ['keepScale', 'f32'],
  // Rows of q and of k in a packed varlen call (0 otherwise).
  ['totalQ', 'i32'],
  ['totalK', 'i32'],
  // The dS scratch (GradTiles.dsScratch): the first (batch, kv head) of
  // the chunk a dispatch covers, and the scratch's first vec2 in `stats`.
  ['unit0', 'i32'],
  ['dsBase', 'i32'],
];

/**
 * WGSL of a backward program's bindings (in runOwnPipeline's order, then
 * the uniform block `p`) and of the uniform struct.
 */
export function gradBindingsWGSL(
    inputs: readonly StorageBinding[], outputs: readonly StorageBinding[]): string {
  return `
${uniformStructWGSL('Params', GRAD_UNIFORMS)}
${bindingsWGSL(inputs, outputs, {
    name: 'p',
    type: 'Params'
  })}
`;
}

/** WGSL `const NAME = value;` lines, one per entry. */
export function constsWGSL(values: Readonly<Record<string, number>>): string {
  return Object.entries(values).map(([name, value]) => `const ${name} = ${value};`).join('\n');
}

/** The (lse, Delta) pairs of the delta pass (and, after them, the dS scratch). */
const STATS_BINDING: StorageBinding = {
  name: 'stats',
  type: 'vec2<f32>'
};

/**
 * The inputs of the dK/dV and dQ passes: q, k, v, dO, the (lse, Delta)
 * pairs of the delta pass, and the ALiBi slopes when compiled in.
 * (Per-batch lengths come at the end of `stats`: see
 * FlashAttentionGradDeltaProgram.) `withStats` false: all but `stats` (a
 * dK/dV pass that stores dS binds it read_write instead).
 */
export function gradInputs(f: GradFeatures, withStats = true): StorageBinding[] {
  return [
    {name: 'q', type: 'f32'},
    {name: 'k', type: 'f32'},
    {name: 'v', type: 'f32'},
    {name: 'dy', type: 'f32'},
    ...(withStats ? [STATS_BINDING] : []),
    ...(f.alibi ? [{name: 'slopes', type: 'f32'}] : []),
  ];
}

/** Where a dispatch of a chunked dS-scratch backward starts (gradUniforms). */
export interface DsChunkUniforms {
  /** The chunk's first (batch, kv head) pair. */
  unit0: number;
  /** The scratch's first vec2 in `stats` (after the rows and the lengths). */
  dsBase: number;
}

const NO_DS_CHUNK: DsChunkUniforms = {
  unit0: 0,
  dsBase: 0
};

/** totalQ and totalK of a call that is not packed. */
const NOT_PACKED = {
  totalQ: 0,
  totalK: 0
};

/** The uniform block's bytes for one call (packedRows: a packed call's rows). */
export function gradUniforms(
    shapes: AttentionShapes, attrs: FlashAttentionAttrs, alibiShape: readonly number[],
    packedRows = NOT_PACKED, dsChunk = NO_DS_CHUNK): ArrayBuffer {
  const dropout = attrs.dropoutRate > 0;
  return packUniforms(GRAD_UNIFORMS, {
    batch: shapes.batch,
    seqQ: shapes.seqQ,
    seqK: shapes.seqK,
    heads: shapes.heads,
    headsKV: shapes.headsKV,
    windowLeft: attrs.windowLeft,
    windowRight: attrs.windowRight,
    alibiPerBatch: alibiShape.length === 2 ? 1 : 0,
    seedLo: attrs.seedLo,
    seedHi: attrs.seedHi,
    threshold: dropout ? dropoutThreshold(attrs.dropoutRate) : 0,
    scale: attrs.softmaxScale,
    softcap: attrs.softcap,
    keepScale: dropout ? 1 / (1 - attrs.dropoutRate) : 1,
    ...packedRows,
    ...dsChunk,
  });
}

/**
 * Functions every backward program uses (needs `p` and, with ALiBi, a
 * `slopes` binding):
 *   fn gradRows(b: i32) -> GradRows   where batch row b's rows are: its
 *       first query and key row q0, k0, the rows it may read and write
 *       rowsQ, rowsK, and its (lse, Delta) of head h, row i at
 *       stats[stat0 + h * statHead + i]; packed varlen calls read the
 *       cumulative lengths from the end of `stats`
 *   fn gradScoreParams(b: i32, h: i32) -> FaScore   (batch row b's lengths)
 *   fa_key_range / fa_query_range (wgsl_snippets.ts)
 *   fn gradScore(qk: f32, i: i32, j: i32, sp: FaScore) -> vec2<f32>
 *       (final score, d score / d (scale * qk)); the softcap derivative is
 *       1 - tanh^2 = 1 - (capped / softcap)^2
 *   fn gradKeep4(b, h, i, j0: i32) -> vec4<f32>   (dropout, j0 % 4 == 0)
 */
export function gradCommonWGSL(f: GradFeatures): string {
  return `
${scoreWGSL(f)}
${keyRangeWGSL(f)}
${queryRangeWGSL(f)}
${f.dropout ? philoxWGSL() + dropoutWGSL() : ''}
${gradRowsWGSL(f)}
fn gradScoreParams(b: i32, h: i32) -> FaScore {
  var slope = 0.0;
  ${f.alibi ? 'slope = slopes[select(h, b * p.heads + h, p.alibiPerBatch != 0)];' : ''}
  let sp = FaScore(p.scale, p.softcap, slope, p.seqK - p.seqQ, p.windowLeft,
                   p.windowRight, p.seqK, p.seqQ);
  ${
      f.packed      ? `let rows = gradRows(b);
  return fa_with_lengths(sp, rows.rowsQ, rows.rowsK);` :
          f.seqlens ? `let lens = bitcast<vec2<i32>>(stats[p.batch * p.heads * p.seqQ + b]);
  return fa_with_lengths(sp, lens.x, lens.y);` :
                      'return sp;'}
}
fn gradScore(qk: f32, i: i32, j: i32, sp: FaScore) -> vec2<f32> {
  var ds = 1.0;
  ${
      f.softcap ? `
  let th = fa_capped(qk, sp) / p.softcap;
  ds = 1.0 - th * th;` :
                  ''}
  return vec2<f32>(fa_score(qk, i, j, sp), ds);
}
${
      f.dropout ? `
fn gradKeep4(b: i32, h: i32, i: i32, j0: i32) -> vec4<f32> {
  return fa_dropout4(u32(b), u32(h), u32(i), u32(j0) >> 2u,
                     vec2<u32>(p.seedLo, p.seedHi), p.threshold, p.keepScale);
}` :
                  ''}
`;
}

/** gradRows (see gradCommonWGSL): padded, or packed varlen rows. */
function gradRowsWGSL(f: GradFeatures): string {
  const rows = f.packed ?
      `let at = p.heads * p.totalQ;
  let c0 = bitcast<vec2<i32>>(stats[at + b]);
  let c1 = bitcast<vec2<i32>>(stats[at + b + 1]);
  return GradRows(c0.x, c0.y, fa_packed_length(c0.x, c1.x, p.totalQ, p.seqQ),
                  fa_packed_length(c0.y, c1.y, p.totalK, p.seqK), c0.x, p.totalQ);` :
      `return GradRows(b * p.seqQ, b * p.seqK, p.seqQ, p.seqK, b * p.heads * p.seqQ,
                  p.seqQ);`;
  return `struct GradRows {
  q0: i32,
  k0: i32,
  rowsQ: i32,
  rowsK: i32,
  stat0: i32,
  statHead: i32,
}
fn gradRows(b: i32) -> GradRows {
  ${rows}
}`;
}

/**
 * WGSL of a packed varlen call's zeroing (ScoreOptions.packed; empty
 * otherwise): the first workgroup of each (sequence b, head) writes zeros
 * to the query-side (`side` 'q': head `h`) or key-side ('k': head `hk`)
 * rows that no sequence covers and b owns (fa_packed_gaps), in each
 * `[total, heads, w]` output of `outputs`, by the T invocations (`t`).
 */
export function zeroGapsWGSL(
    f: GradFeatures, side: 'q'|'k', ...outputs: Array<[string, string]>): string {
  if (!f.packed) {
    return '';
  }
  const [heads, head, total] =
      side === 'q' ? ['p.heads', 'h', 'p.totalQ'] : ['p.headsKV', 'hk', 'p.totalK'];
  const [start, rows] = side === 'q' ? ['q0', 'rowsQ'] : ['k0', 'rowsK'];
  const gaps = `fa_packed_gaps(b, p.batch, gr.${start}, gr.${rows},
                                  gradRows(min(b + 1, p.batch - 1)).${start}, ${total})`;
  const zero = ([out, w]: [string, string]) => `for (var e = t; e < n * ${w}; e += T) {
        ${out}[((lo + e / ${w}) * ${heads} + ${head}) * ${w} + e % ${w}] = 0.0;
      }`;
  return `if (wg.x == 0u) {
    let gapRanges = ${gaps};
    for (var g = 0; g < 2; g++) {
      let lo = select(gapRanges.z, gapRanges.x, g == 0);
      let n = select(gapRanges.w, gapRanges.y, g == 0) - lo;
      ${outputs.map(zero).join('\n      ')}
    }
  }`;
}

/** The sizes both query-side passes (dK/dV and dQ) bake into their WGSL. */
export interface GradPassSizes {
  d: number;
  dv: number;
  bc: number;
  br: number;
  threads: number;
  s: SPhase;
  /** The accumulation's dim stride (threads sharing a row). */
  xt: number;
}

/**
 * Which gradients a pass writes: 'k' the dK/dV pass (one workgroup per key
 * block of a kv head), 'q' the dQ pass (one per query block of a head).
 */
export type GradSide = 'k'|'q';

/** Each side's outputs, with the WGSL constant of their row width. */
const GRAD_OUTPUTS: Readonly<Record<GradSide, ReadonlyArray<[string, string]>>> = {
  k: [['dk', 'D'], ['dv', 'DV']],
  q: [['dq', 'D']],
};

/**
 * A dK/dV or dQ program (whole tiles or sliced) as runOwnPipeline takes it:
 * gradInputs, then the side's outputs, then the uniform block.
 */
export abstract class GradPassProgram implements OwnPipelineSpec {
  readonly numInputs: number;
  readonly numOutputs: number;
  readonly hasUniforms = true;
  protected source = '';

  /**
   * `dsScratch` (GradTiles.dsScratch): the dK/dV pass binds `stats`
   * read_write after its outputs (it stores dS there), the dQ pass reads dS
   * from it; both cover one chunk of (batch, kv head) pairs per dispatch.
   */
  constructor(readonly key: string, f: GradFeatures, side: GradSide, dsScratch = false) {
    const storesDs = dsScratch && side === 'k';
    this.numInputs = gradInputs(f, !storesDs).length;
    this.numOutputs = GRAD_OUTPUTS[side].length + (storesDs ? 1 : 0);
  }

  code(): string {
    return this.source;
  }
}

/**
 * A whole dK/dV or dQ program: its bindings (gradInputs, then the side's
 * outputs), gradCommonWGSL, the constants both passes use (D, DV, D4, DV4,
 * BC, BR, T, SC, MR, XT) and the pass's `extra` ones, the workgroup
 * `storage`, then `fn main` with the side's prologue before `body`:
 *   'k': t, j0 (the first key), b, hk, groups (query heads per kv head), gr,
 *        the packed gaps of dk/dv zeroed, and the key tile in kT/vT
 *        (loadKeyTileWGSL, K's row stride `kStride`; null: not loaded)
 *   'q': t, dqBlockWGSL's names, the packed gaps of dq zeroed.
 * With `dsScratch` (GradPassProgram), workgroup row y covers pair
 * y + p.unit0 ('k') or query head y + p.unit0 * groups ('q') of the
 * (batch, head) grid, and dsScratchWGSL's `dsAt` is declared; the 'k' side
 * binds `stats` read_write after dk and dv.
 */
export function gradPassWGSL(
    f: GradFeatures, side: GradSide, z: GradPassSizes, extra: Readonly<Record<string, number>>,
    storage: string, body: string, kStride: string|null = 'SC', dsScratch = false): string {
  const outputs = GRAD_OUTPUTS[side];
  const gaps = zeroGapsWGSL(f, side, ...outputs);
  const unit = dsScratch ? '(i32(wg.y) + p.unit0)' : 'i32(wg.y)';
  const prologue = side === 'k' ? `let j0 = i32(wg.x) * BC;
  let b = ${unit} / p.headsKV;
  let hk = ${unit} % p.headsKV;
  let groups = p.heads / p.headsKV;
  let gr = gradRows(b);
  ${gaps}

  ${kStride != null ? loadKeyTileWGSL(kStride) : ''}` :
                                  `${dqBlockWGSL(dsScratch)}
  ${gaps}`;
  const storesDs = dsScratch && side === 'k';
  const bindings = gradBindingsWGSL(gradInputs(f, !storesDs), [
    ...outputs.map(([name]) => ({name, type: 'f32'})),
    ...(storesDs ? [STATS_BINDING] : []),
  ]);
  return `${bindings}
${gradCommonWGSL(f)}
${dsScratch ? dsScratchWGSL() : ''}
${constsWGSL({
    D: z.d,
    DV: z.dv,
    D4: Math.ceil(z.d / 4),
    DV4: Math.ceil(z.dv / 4),
    BC: z.bc,
    BR: z.br,
    T: z.threads,
    SC: z.s.sc,
    MR: z.s.mr,
    XT: z.xt,
    ...extra,
  })}

${storage}

@compute @workgroup_size(T)
fn main(@builtin(workgroup_id) wg: vec3<u32>,${
      side === 'q' ? `
        @builtin(num_workgroups) nwg: vec3<u32>,` :
                     ''}
        @builtin(local_invocation_index) lid: u32) {
  let t = i32(lid);
  ${prologue}${body}}
`;
}

/**
 * WGSL placing a dQ pass's workgroup: `let i0` (its first query row), `b`,
 * `h`, `hk` and the score parameters `sp`. Under causal-like masks (a right
 * bound only) later rows see more keys, so the heaviest query blocks are
 * dispatched first. Uses `wg` and `nwg`; `chunked`: row y of the grid is
 * query head y + p.unit0 * (heads per kv head) (a dS-scratch chunk).
 */
export function dqBlockWGSL(chunked = false): string {
  const y = chunked ? '(i32(wg.y) + p.unit0 * (p.heads / p.headsKV))' : 'i32(wg.y)';
  return `let heavyLast = p.windowLeft < 0 && p.windowRight >= 0;
  let i0 = select(i32(wg.x), i32(nwg.x) - 1 - i32(wg.x), heavyLast) * BR;
  let b = ${y} / p.heads;
  let h = ${y} % p.heads;
  let hk = h / (p.heads / p.headsKV);
  let gr = gradRows(b);
  let sp = gradScoreParams(b, h);`;
}

/**
 * The dS scratch (GradTiles.dsScratch): the dK/dV pass stores each dS
 * tile it computes after the (lse, Delta) pairs in `stats`, and the dQ
 * pass reads it back instead of recomputing S, P, dP and dS. Query head y
 * of a chunk (0 .. its heads) holds rows 0 .. p.seqQ - 1 of whole key
 * quads, 0 .. ceil(p.seqK / 4) - 1, each quad two vec2s:
 *   fn dsAt(y: i32, i: i32, jq: i32) -> i32   (jq % 4 == 0)
 * Both passes walk the same key quads (tiles start at multiples of 4).
 */
export function dsScratchWGSL(): string {
  return `fn dsAt(y: i32, i: i32, jq: i32) -> i32 {
  return p.dsBase + ((y * p.seqQ + i) * ((p.seqK + 3) / 4) + jq / 4) * 2;
}`;
}

/**
 * A dK/dV workgroup's query head `h` as a head of its dS-scratch chunk
 * (workgroup row y holds kv head hk of the chunk's y-th pair).
 */
export const DKDV_DS_HEAD = 'i32(wg.y) * groups + h - hk * groups';

/**
 * WGSL storing dS `dsv` of row `i`, keys jq .. jq + 3 of the chunk's query
 * head `y` (dK/dV pass; rows and quads past the sequences are skipped).
 */
export function storeDsWGSL(y: string, dsv: string): string {
  return `if (i < p.seqQ && jq < p.seqK) {
          let at = dsAt(${y}, i, jq);
          stats[at] = ${dsv}.xy;
          stats[at + 1] = ${dsv}.zw;
        }`;
}

/**
 * Register prefetch of a dQ pass's dS tile from the scratch, rows
 * [i0, i0 + BR) of its query head x keys [j0, j0 + BC): `fetchDsTileWGSL`
 * into `dsReg` (`prefetchSlots(br * sc, threads)` vec4s), `storeDsTileWGSL`
 * into `pS[r * SC + quad]` after the next barrier. Only elements the mask
 * shows are read (zeros elsewhere): exactly those the dK/dV pass stored, as
 * a row that sees a key of a key block is among the rows that block visits
 * (fa_query_range). Uses `t`, `T`, `i0`, `sp`, `wg`.
 */
export function fetchDsTileWGSL(j0: string, br: number, sc: number, threads: number): string {
  return `
    for (var u = 0; u < ${prefetchSlots(br * sc, threads)}; u++) {
      let e = t + u * T;
      let i = i0 + e / SC;
      let jq = ${j0} + (e % SC) * 4;
      var val = vec4<f32>(0.0);
      if (e < BR * SC && i < p.seqQ) {
        let shown = fa_visible4(i, vec4<i32>(jq) + vec4<i32>(0, 1, 2, 3), sp);
        let at = dsAt(i32(wg.y), i, jq);
        if (all(shown)) {
          val = vec4<f32>(stats[at], stats[at + 1]);
        } else {
          for (var c4 = 0; c4 < 4; c4++) {
            if (shown[c4]) { val[c4] = stats[at + c4 / 2][c4 % 2]; }
          }
        }
      }
      dsReg[u] = val;
    }`;
}

export function storeDsTileWGSL(br: number, sc: number, threads: number): string {
  return `for (var u = 0; u < ${prefetchSlots(br * sc, threads)}; u++) {
      let e = t + u * T;
      if (e < BR * SC) { pS[e] = dsReg[u]; }
    }`;
}

/**
 * WGSL of a dQ pass's key range and thread layout: `jLo`, `jHi` (the keys
 * its rows can see, from a BC-aligned start; none past the batch row's
 * queries), sPhaseWGSL's names, and `qx`, `qr` (the accumulation's dim lane
 * and row group). Uses `i0`, `sp`, `t`.
 */
export function dqKeyRangeWGSL(s: SPhase): string {
  return `// Keys some row of the block can see; the start aligned to BC (so key
  // quads are aligned for the dropout words).
  // (None for a block past the batch row's queries: it writes zeros.)
  let keys = fa_key_range(i0, min(i0 + BR, p.seqQ), sp);
  let jLo = (keys.x / BC) * BC;
  let jHi = keys.y - 1;
${sPhaseWGSL(s)}
  let qx = t % XT;
  let qr = t / XT;`;
}

/**
 * The S = Q K^T / dP = dO V^T phase's thread layout, shared by both passes:
 * BC/4 key quads (SC) times SR row groups of MR rows. A warp covers at most
 * 8 quads and so several row groups: its K loads are at most 128 bytes
 * wide (one shared-memory wavefront) and its Q loads touch a few rows.
 *
 * With `split`, the first half of the invocations computes S and the
 * second half dP, each half over the same (row group, key quad) layout:
 * where BC x BR is small next to the invocations (D >= 96, whose tiles
 * must be small to fit workgroup memory), half of them would otherwise
 * sit idle while the others load K and V, and each of a thread's row
 * loads then feeds only one of the two products.
 */
export interface SPhase {
  sc: number;
  sr: number;
  mr: number;
  /** Quads per group of adjacent threads. */
  wq: number;
  /** S and dP by separate halves of the workgroup. */
  split: boolean;
  /** Invocations per product: all of them, or half with `split`. */
  lanes: number;
}

export function sPhase(bc: number, br: number, threads: number, split = false): SPhase {
  const sc = bc / 4;
  const lanes = split ? Math.floor(threads / 2) : threads;
  const sr = Math.min(br, Math.floor(lanes / sc));
  return {sc, sr, mr: br / sr, wq: Math.min(sc, 8), split, lanes};
}

/** Do the S phase's divisions come out even? */
export function sPhaseValid(bc: number, br: number, threads: number, split = false): boolean {
  if (bc % 4 !== 0 || bc < 4 || (split && threads % 2 !== 0)) {
    return false;
  }
  const s = sPhase(bc, br, threads, split);
  return s.sr >= 1 && Number.isInteger(s.mr) && s.sc % s.wq === 0;
}

/**
 * WGSL: `let sQuad`, `let sRow` (first of MR rows), `let sActive` (the
 * invocation computes a product), `let sDpHalf` (the product is dP, with
 * `split`) and `let sOwner` (the invocation computes dS of its rows and
 * key quad) for invocation `t`.
 */
export function sPhaseWGSL(s: SPhase): string {
  const lane = s.split ? `t % ${s.lanes}` : 't';
  return `
  let sT = ${lane};
  let sLane = sT % ${s.wq};
  let sRest = sT / ${s.wq};
  let sQuad = (sRest / ${s.sr}) * ${s.wq} + sLane;
  let sRow = (sRest % ${s.sr}) * ${s.mr};
  let sActive = sT < ${s.sc * s.sr};
  let sDpHalf = ${s.split ? `t >= ${s.lanes}` : 'false'};
  let sOwner = sActive && !sDpHalf;`;
}

/**
 * WGSL loading rows [row0, row0 + rows) of head `head` of a query-side
 * [B, S, H, W] tensor (q, dO) into workgroup vec4 rows
 * `dst[r * stride + xq]` (zero from row `seq` on, and beyond W). Uses `t`,
 * `T` and `gr` (gradRows).
 */
export function loadRowsWGSL(
    src: string, dst: string, w: number, w4: number, stride: number, rows: string, seq: string,
    heads: string, row0: string, head: string): string {
  return `
    for (var e = t; e < ${rows} * ${w4}; e += T) {
      let r = e / ${w4};
      let xq = e % ${w4};
      let i = ${row0} + r;
      var val = vec4<f32>(0.0);
      if (i < ${seq}) {
        ${rowQuadWGSL(src, w, heads, head)}
      }
      ${dst}[r * ${stride} + xq] = val;
    }`;
}

/**
 * WGSL setting `val` to dims 4 xq .. 4 xq + 3 of query row `i` of head
 * `head` of a query-side tensor (zero beyond W). Uses `gr` (gradRows).
 */
function rowQuadWGSL(src: string, w: number, heads: string, head: string): string {
  return `let base = ((gr.q0 + i) * ${heads} + ${head}) * ${w} + xq * 4;
        ${
      w % 4 === 0 ?
          `val = vec4<f32>(${src}[base], ${src}[base + 1], ${src}[base + 2], ${src}[base + 3]);` :
          `
        for (var c = 0; c < 4; c++) {
          if (xq * 4 + c < ${w}) { val[c] = ${src}[base + c]; }
        }`}`;
}

/**
 * WGSL setting `val` to dim `x` of keys j0 + 4 quad .. j0 + 4 quad + 3 of
 * `src` ([B, Sk, Hk, W]; zero past the batch row's keys). Uses `gr`, `hk`.
 */
function keyQuadWGSL(src: string, w: string, j0: string): string {
  return `for (var c = 0; c < 4; c++) {
          let j = ${j0} + quad * 4 + c;
          if (j < gr.rowsK) { val[c] = ${src}[((gr.k0 + j) * p.headsKV + hk) * ${w} + x]; }
        }`;
}

/**
 * WGSL loading a query block for both passes: rows [i0, i0 + BR) of head
 * `h` of q and dO into `qS`/`doS` (rows padded by one vec4) and their
 * (lse, Delta) into `lseS`/`deltaS`. Uses `t`, `T`, `gr`, `i0`, `h`.
 */
export function loadQueryBlockWGSL(d: number, d4: number, dv: number, dv4: number): string {
  return `${loadRowsWGSL('q', 'qS', d, d4, d4 + 1, 'BR', 'gr.rowsQ', 'p.heads', 'i0', 'h')}
    ${loadRowsWGSL('dy', 'doS', dv, dv4, dv4 + 1, 'BR', 'gr.rowsQ', 'p.heads', 'i0', 'h')}
    ${loadRowStatsWGSL()}`;
}

/**
 * WGSL loading the (lse, Delta) of rows [i0, i0 + BR) of head `h` into
 * `lseS`/`deltaS` (zero past the batch row's queries). Uses `t`, `T`, `gr`.
 */
export function loadRowStatsWGSL(): string {
  return `for (var r = t; r < BR; r += T) {
      let i = i0 + r;
      var st = vec2<f32>(0.0);
      if (i < gr.rowsQ) { st = stats[gr.stat0 + h * gr.statHead + i]; }
      lseS[r] = st.x;
      deltaS[r] = st.y;
    }`;
}

/**
 * Register prefetch of the (lse, Delta) of a row block (the dK/dV passes):
 * `fetchRowStatsWGSL` reads those of rows [i0, i0 + BR) of head `h` into
 * `stReg` (an array of `prefetchSlots(br, threads)` vec2s),
 * `storeRowStatsWGSL` writes them to `lseS`/`deltaS` after the next barrier.
 * Uses `t`, `T`, `gr`.
 */
export function fetchRowStatsWGSL(i0: string, h: string, br: number, threads: number): string {
  return `
    for (var u = 0; u < ${prefetchSlots(br, threads)}; u++) {
      let i = ${i0} + t + u * T;
      stReg[u] = vec2<f32>(0.0);
      if (t + u * T < BR && i < gr.rowsQ) { stReg[u] = stats[gr.stat0 + ${h} * gr.statHead + i]; }
    }`;
}

export function storeRowStatsWGSL(br: number, threads: number): string {
  return `for (var u = 0; u < ${prefetchSlots(br, threads)}; u++) {
      let r = t + u * T;
      if (r < BR) {
        lseS[r] = stReg[u].x;
        deltaS[r] = stReg[u].y;
      }
    }`;
}

// acc[m] += rows[sRow + m] . (dims of the thread's key quad), dims in order.
function productsWGSL(
    acc: string, rows: string, rowStride: number, tile: string, stride: string, w4: string) {
  return `
      for (var xq = 0; xq < ${w4}; xq++) {
        let col0 = ${tile}[(xq * 4) * ${stride} + sQuad];
        let col1 = ${tile}[(xq * 4 + 1) * ${stride} + sQuad];
        let col2 = ${tile}[(xq * 4 + 2) * ${stride} + sQuad];
        let col3 = ${tile}[(xq * 4 + 3) * ${stride} + sQuad];
        for (var m = 0; m < MR; m++) {
          let row = ${rows}[(sRow + m) * ${rowStride} + xq];
          ${acc}[m] += row.x * col0;
          ${acc}[m] += row.y * col1;
          ${acc}[m] += row.z * col2;
          ${acc}[m] += row.w * col3;
        }
      }`;
}

/**
 * The S phase's products, shared by the dK/dV and dQ passes: each thread's
 * `s[m] = q . k` and `dp[m] = dO . v` for its MR rows and one quad of keys,
 * from `qS`/`doS` (rows padded by one vec4) and the transposed `kT`
 * (row stride `kStride`) and `vT` (stride `SC`). Dims are summed in order,
 * as the forward sums them, so the recomputed scores match the forward's
 * bits as closely as possible.
 */
export function scoresAndDpWGSL(kStride: string, d4: number, dv4: number): string {
  return `var s: array<vec4<f32>, MR>;
      var dp: array<vec4<f32>, MR>;
      for (var m = 0; m < MR; m++) {
        s[m] = vec4<f32>(0.0);
        dp[m] = vec4<f32>(0.0);
      }
      ${productsWGSL('s', 'qS', d4 + 1, 'kT', kStride, 'D4')}
      ${productsWGSL('dp', 'doS', dv4 + 1, 'vT', 'SC', 'DV4')}`;
}

/**
 * The whole S phase of a block, for either layout of `s` (sPhase): S and
 * dP (scoresAndDpWGSL), then dS by probsAndDsWGSL(f, withP, rowEnd) on the
 * invocations where `sOwner`. With `split`, the dP half hands its dP to the
 * S half through `pS` (the element each owner then overwrites with its
 * rowEnd), behind one more barrier; so the caller must have finished
 * reading `pS` (a barrier) before this runs. Same sums in the same order
 * either way.
 */
export function scoresToDsWGSL(
    s: SPhase, kStride: string, d4: number, dv4: number, f: GradFeatures, withP: boolean,
    rowEnd: string): string {
  if (!s.split) {
    return `if (sActive) {
        ${scoresAndDpWGSL(kStride, d4, dv4)}
        ${probsAndDsWGSL(f, withP, rowEnd)}
      }`;
  }
  return `var s: array<vec4<f32>, MR>;
      var dp: array<vec4<f32>, MR>;
      for (var m = 0; m < MR; m++) {
        s[m] = vec4<f32>(0.0);
        dp[m] = vec4<f32>(0.0);
      }
      if (sActive) {
        if (sDpHalf) {
          ${productsWGSL('dp', 'doS', dv4 + 1, 'vT', 'SC', 'DV4')}
          for (var m = 0; m < MR; m++) { pS[(sRow + m) * SC + sQuad] = dp[m]; }
        } else {
          ${productsWGSL('s', 'qS', d4 + 1, 'kT', kStride, 'D4')}
        }
      }
      workgroupBarrier();
      if (sOwner) {
        for (var m = 0; m < MR; m++) { dp[m] = pS[(sRow + m) * SC + sQuad]; }
        ${probsAndDsWGSL(f, withP, rowEnd)}
      }`;
}

/**
 * The step after scoresAndDpWGSL, shared by both passes: for each of the
 * thread's MR rows and its key quad `jq`, `dsv` = dS = P * (dP * keep -
 * Delta) * score' * scale, with P = exp(score(S) - lse) recomputed, and with
 * `withP` also `pv` = P * keep (both zero where masked); then `rowEnd`, WGSL
 * that stores them (it may use r, m, dsv and pv). Uses `b`, `h`, `i0`, `j0`
 * and `sp`.
 */
export function probsAndDsWGSL(f: GradFeatures, withP: boolean, rowEnd: string): string {
  return `for (var m = 0; m < MR; m++) {
        let r = sRow + m;
        let i = i0 + r;
        let jq = j0 + sQuad * 4;
        ${f.dropout ? 'let keep = gradKeep4(b, h, i, jq);' : 'let keep = vec4<f32>(1.0);'}
        ${withP ? 'var pv = vec4<f32>(0.0);' : ''}
        var dsv = vec4<f32>(0.0);
        for (var c = 0; c < 4; c++) {
          let j = jq + c;
          if (i < p.seqQ && fa_visible(i, j, sp)) {
            let sc = gradScore(s[m][c], i, j, sp);
            let prob = exp(sc.x - lseS[r]);
            ${withP ? 'pv[c] = prob * keep[c];' : ''}
            dsv[c] = prob * (dp[m][c] * keep[c] - deltaS[r]) * sc.y * p.scale;
          }
        }
        ${rowEnd}
      }`;
}

/**
 * Workgroup storage of a query block, shared by both passes: q and dO rows
 * (`qS`, `doS`), the S phase's output `pS[r * SC + quad]`, and the rows'
 * (lse, Delta) as `lseS`, `deltaS`.
 */
export function queryBlockStorageWGSL(br: number, d4: number, dv4: number, sc: number): string {
  return `
// Query-side rows as dim quads, one vec4 of padding per row so that the
// rows a warp reads fall in different banks.
var<workgroup> qS: array<vec4<f32>, ${br * (d4 + 1)}>;
var<workgroup> doS: array<vec4<f32>, ${br * (dv4 + 1)}>;
var<workgroup> pS: array<vec4<f32>, ${br * sc}>;
var<workgroup> lseS: array<f32, BR>;
var<workgroup> deltaS: array<f32, BR>;`;
}

/**
 * Loads the key tile starting at `j0` into workgroup memory, transposed as
 * quads of keys: `kT[x * kStride + quad]` holds dim x of keys
 * 4 quad .. 4 quad + 3 (zero past Sk or D), `vT` likewise with stride SC.
 */
export function loadKeyTileWGSL(kStride: string): string {
  const one = (src: string, dst: string, w: string, w4: string, stride: string) => `
    for (var e = t; e < SC * 4 * ${w4}; e += T) {
      let x = e % (4 * ${w4});
      let quad = e / (4 * ${w4});
      var val = vec4<f32>(0.0);
      if (x < ${w}) {
        ${keyQuadWGSL(src, w, 'j0')}
      }
      ${dst}[x * ${stride} + quad] = val;
    }`;
  return one('k', 'kT', 'D', 'D4', kStride) + one('v', 'vT', 'DV', 'DV4', 'SC');
}

/**
 * Register prefetch of a row tile (the WGSL of loadRowsWGSL in two halves):
 * `fetchRowsWGSL` reads rows [row0, row0 + rows) of head `head` into the
 * thread's `reg` (an array of `prefetchSlots(rows * w4, threads)` vec4s),
 * `storeRowsWGSL` writes them to workgroup memory after the next barrier.
 * Issued before a tile's products, the global loads are in flight while it
 * computes. Uses `t`, `T` and `gr` (gradRows).
 */
export function prefetchSlots(items: number, threads: number): number {
  return Math.ceil(items / threads);
}

export function fetchRowsWGSL(
    src: string, reg: string, w: number, w4: number, rows: number, threads: number, seq: string,
    heads: string, row0: string, head: string): string {
  const items = rows * w4;
  return `
    for (var u = 0; u < ${prefetchSlots(items, threads)}; u++) {
      let e = t + u * T;
      let r = e / ${w4};
      let xq = e % ${w4};
      let i = ${row0} + r;
      var val = vec4<f32>(0.0);
      if (e < ${items} && i < ${seq}) {
        ${rowQuadWGSL(src, w, heads, head)}
      }
      ${reg}[u] = val;
    }`;
}

export function storeRowsWGSL(
    reg: string, dst: string, w4: number, stride: number, rows: number, threads: number): string {
  const items = rows * w4;
  return `
    for (var u = 0; u < ${prefetchSlots(items, threads)}; u++) {
      let e = t + u * T;
      if (e < ${items}) { ${dst}[(e / ${w4}) * ${stride} + e % ${w4}] = ${reg}[u]; }
    }`;
}

/**
 * Register prefetch of the key tile starting at `j0` (loadKeyTileWGSL in
 * two halves): `fetchKeyTileWGSL` into `kReg`/`vReg` (arrays of
 * `prefetchSlots(SC * 4 * D4, T)` and `prefetchSlots(SC * 4 * DV4, T)`
 * vec4s), `storeKeyTileWGSL` into `kT` (row stride `kStride`) and `vT`.
 * `withV` false: K only (a dQ pass that reads dS needs no V).
 */
export function fetchKeyTileWGSL(
    j0: string, sc: number, d4: number, dv4: number, threads: number, withV = true): string {
  const one = (src: string, reg: string, w: string, w4: number) => `
    for (var u = 0; u < ${prefetchSlots(sc * 4 * w4, threads)}; u++) {
      let e = t + u * T;
      let x = e % ${4 * w4};
      let quad = e / ${4 * w4};
      var val = vec4<f32>(0.0);
      if (e < ${sc * 4 * w4} && x < ${w}) {
        ${keyQuadWGSL(src, w, j0)}
      }
      ${reg}[u] = val;
    }`;
  return one('k', 'kReg', 'D', d4) + (withV ? one('v', 'vReg', 'DV', dv4) : '');
}

export function storeKeyTileWGSL(
    kStride: string, sc: number, d4: number, dv4: number, threads: number, withV = true): string {
  const one = (reg: string, dst: string, stride: string, w4: number) => `
    for (var u = 0; u < ${prefetchSlots(sc * 4 * w4, threads)}; u++) {
      let e = t + u * T;
      if (e < ${sc * 4 * w4}) { ${dst}[(e % ${4 * w4}) * ${stride} + e / ${4 * w4}] = ${reg}[u]; }
    }`;
  return one('kReg', 'kT', kStride, d4) + (withV ? one('vReg', 'vT', 'SC', dv4) : '');
}
