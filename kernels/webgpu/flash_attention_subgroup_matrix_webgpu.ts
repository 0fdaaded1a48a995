/**
 * The FlashAttention forward on subgroup matrices (tensor cores from WGSL):
 * S = Q K^T and O += P V as f16 x f16 -> f32 matrix products, the online
 * softmax in f32 as in the SIMT kernel (flash_attention_webgpu.ts).
 *
 * Precision. `split` (the default, float32-accurate): every f32 operand x
 * is scaled by a power of two s (exact), then split into hi = f16(x s) and
 * lo = f16(x s - hi), and a product a b is computed as
 * a_hi b_hi + a_hi b_lo + a_lo b_hi, each in f32 (f16 x f16 products are
 * exact in f32); the dropped a_lo b_lo and the rounding of lo leave about
 * 2^-22 relative error per product, the CUDA kernels' bf16 scheme with a
 * wider mantissa. The scale keeps x s inside f16's range and its hi above
 * f16's subnormals: per Q tile, K tile and V tile, s = 2^-e with the tile's
 * max |x| = f 2^e, f in [0.5, 1) (so |x s| < 1), undone in f32 on S and on
 * each tile's P V. Without `split` (precision 'float16') only hi exists:
 * one product, about 2^-11 relative error per operand.
 *
 * Tiling. A workgroup owns BR = M * NSG query rows of one (batch, head);
 * subgroup g owns rows g*M .. g*M+M-1 of every matrix product and of the
 * softmax (LPR = lanes / M lanes per row, each 4-key quads of S and 4-wide
 * column quads of O). Per key tile of BC keys:
 *   K, V -> registers; their max |x| -> workgroup atomics; K split into
 *   workgroup memory (row-major [BC][D], read as K^T column-major);
 *   S = Q K^T, M x N blocks over D/K steps -> scratch [BR][BC] (f32);
 *   V split over K ([BC][Dv]); softmax of the thread's scores from scratch,
 *   P split -> [BR][BC]; O *= alpha (O lives in the threads' registers);
 *   O += P V in chunks of CV output columns through the scratch.
 *
 * Stand-in (MatrixShape.standIn): the same code with each matrix built-in
 * replaced by a plain loop of the same semantics, made strict
 * (subgroup_matrix_wgsl.ts: scrambled result layout across lanes, reversed
 * subgroup numbering, the built-ins' bounds handling and alignment rule,
 * f16 overflow to infinity) and row reductions through workgroup memory:
 * SwiftShader (no f16, no subgroups) runs the tiling, indexing and split
 * arithmetic.
 */
import {MatrixShape, matrixShapeKey} from './subgroup_matrix';
import {assertWorkgroupAlignment, matrixLoadWGSL, matrixStoreWGSL, MatrixView as View, standInElementWGSL, standInAlignedWGSL, standInHelpersWGSL, splitStoreWGSL, standInIndexWGSL, standInPlaceWGSL, subgroupIdsWGSL, subgroupParamsWGSL, zeroResultWGSL} from './subgroup_matrix_wgsl';
import {dropoutWGSL, keyRangeWGSL, philoxWGSL, scoreKey, ScoreOptions, scoreWGSL, FA_NEG_INF_BITS, forwardBindingsWGSL, forwardTileWGSL, maxAllWGSL as maxAll, range, VEC4_COMPONENTS as COMP} from './wgsl_snippets';

/** Everything baked into one pipeline. */
export interface MatrixForwardConfig {
  headDim: number;
  headDimV: number;
  shape: MatrixShape;
  /** Subgroups per workgroup (BR = M * subgroups). */
  subgroups: number;
  /** Keys per tile. */
  bc: number;
  /** hi/lo split (float32-accurate) or one f16 product. */
  split: boolean;
  score: ScoreOptions;
  alibiMode: 0|1|2;
  dropout: boolean;
  /** Heaviest query tiles first (causal-like masks). */
  reverseRows: boolean;
}

export interface MatrixTileSizes {
  br: number;
  bc: number;
  threads: number;
  /** Lanes per row in the softmax. */
  lpr: number;
  /** Output columns per P V chunk. */
  cv: number;
}

/** Tile sizes, or null when the head dims do not suit the matrix shape. */
export function matrixTileSizes(
    c: {headDim: number, headDimV: number, shape: MatrixShape, subgroups: number, bc: number}):
    MatrixTileSizes|null {
  const {M, N, K, lanes} = c.shape;
  const lpr = lanes / M;
  const quad = 4 * lpr;
  if (!Number.isInteger(lpr) || c.headDim % K !== 0 || c.headDimV % N !== 0 || c.bc % N !== 0 ||
      c.bc % K !== 0 || c.bc % quad !== 0 || c.headDimV % quad !== 0 || (M * N) % lanes !== 0) {
    return null;
  }
  let cv = 0;
  for (let w = c.bc - c.bc % N; w >= N; w -= N) {
    if (c.headDimV % w === 0 && w % quad === 0) {
      cv = w;
      break;
    }
  }
  if (cv === 0) {
    return null;
  }
  return {br: M * c.subgroups, bc: c.bc, threads: lanes * c.subgroups, lpr, cv};
}

/** Bytes of workgroup memory of a configuration. */
export function matrixWorkgroupBytes(c: MatrixForwardConfig): number {
  const s = matrixTileSizes(c)!;
  const parts = c.split ? 2 : 1;
  const elem = c.shape.standIn ? 4 : 2;
  const q = s.br * c.headDim;
  const kv = s.bc * Math.max(c.headDim, c.headDimV);
  const p = s.br * s.bc;
  return parts * elem * (q + kv + p) + 4 * s.br * s.bc + 4 * wmaxSlots(c.shape) +
      (workgroupReductions(c.shape) && s.lpr > 1 ? 4 * s.threads : 0);
}

/**
 * Atomics in `wmax`: 2 are used; 8 keep its 32 bytes from shifting the
 * matrix arrays off their 16-byte alignment (WORKGROUP_SIZE_MULTIPLE).
 */
function wmaxSlots(shape: MatrixShape): number {
  return shape.diagnose?.unalignedWorkgroup ? 2 : 8;
}

/** Whether row and tile reductions go through workgroup memory (no subgroup operations). */
function workgroupReductions(shape: MatrixShape): boolean {
  return shape.standIn || shape.diagnose?.workgroupReductions === true;
}

export function matrixForwardKey(c: MatrixForwardConfig): string {
  return `fa_fwd_sm_d${c.headDim}_dv${c.headDimV}_${matrixShapeKey(c.shape)}_g${c.subgroups}_bc${
      c.bc}_sp${+ c.split}_${scoreKey(c.score)}_al${c.alibiMode}_do${+ c.dropout}_rv${
      + c.reverseRows}`;
}

/** Field order of the uniform struct (all 4-byte scalars). */
export const MATRIX_FORWARD_UNIFORMS = [
  ['seqQ', 'i32'],
  ['seqK', 'i32'],
  ['heads', 'i32'],
  ['groups', 'i32'],
  ['headsKV', 'i32'],
  ['numQTiles', 'i32'],
  ['totalGroups', 'i32'],
  ['gridX', 'i32'],
  ['scale', 'f32'],
  ['softcap', 'f32'],
  ['left', 'i32'],
  ['right', 'i32'],
  ['seedLo', 'u32'],
  ['seedHi', 'u32'],
  ['threshold', 'u32'],
  ['keepScale', 'f32'],
  ['one', 'i32'],
] as const;

// WGSL shared by this program, the two-pass one and the storage-loaded one
// (flash_attention_subgroup_matrix_two_pass_webgpu.ts).

type ForwardParts = Pick<MatrixForwardConfig, 'shape'|'score'|'dropout'|'alibiMode'>;

/**
 * The start of a forward program: extensions, score and key-range
 * functions, dropout, bindings and the matrix shape's constants M, N, K,
 * LANES and LPR (the caller's constants follow). `bindings` replaces the
 * fused forward's uniforms and bindings (the storage-loaded forward's own).
 */
export function matrixForwardPreambleWGSL(c: ForwardParts, lpr: number, bindings?: string): string {
  const {M, N, K, lanes, standIn} = c.shape;
  return `${standIn ? '' : `enable f16;
enable chromium_experimental_subgroup_matrix;
enable subgroups;
diagnostic(off, chromium.subgroup_matrix_uniformity);`}
${scoreWGSL(c.score)}
${keyRangeWGSL(c.score)}
${c.dropout ? philoxWGSL() + dropoutWGSL() : ''}

${bindings ?? forwardBindingsWGSL(MATRIX_FORWARD_UNIFORMS, {
    qkType: 'vec4<f32>',
    vType: 'vec4<f32>',
    alibi: c.alibiMode !== 0
  })}

const M = ${M}u;
const N = ${N}u;
const K = ${K}u;
const LANES = ${lanes}u;
const LPR = ${lpr}u;`;
}

/** Where the caller puts its stand-in multiply-accumulate functions (a `.replace` at the end). */
export const STANDIN_FNS = '__STANDIN_FNS__';

/**
 * The stand-in helpers (and its store to the [BR][BC] scratch `scr`), the
 * STANDIN_FNS mark, then `main` up to its row range, subgroup ids and the
 * accumulators' zero: whole workgroups past the last tile return together
 * (the matrix built-ins need uniform flow).
 */
export function matrixForwardMainStartWGSL(
    c: Pick<MatrixForwardConfig, 'shape'|'subgroups'|'reverseRows'>, br: number, bc: number,
    threads: number): string {
  const {M, N, lanes, standIn} = c.shape;
  const epl = M * N / lanes;
  const scrView: View = {arr: 'scr', off: 'off', stride: 'BC', colMajor: false, len: br * bc};
  return `${standInHelpersWGSL(c.shape)}
${
      standIn ? `
// Stand-in for a row-major subgroupMatrixStore(&scr, off, acc, BC).
fn sm_store_scr(acc: ptr<function, array<f32, ${epl}>>, ln: u32, off: u32) {
  let atS = ${standInPlaceWGSL(scrView, M, N)};
  let ok = ${standInAlignedWGSL(scrView, M, N, 4)};
  for (var e = 0u; e < ${epl}u * u32(u.one); e++) {
    let idx = ${standInElementWGSL(c.shape, 'e', 'ln')};
    scr[${standInIndexWGSL(scrView, 'atS', 'idx / N', 'idx % N')}] = (*acc)[e] * ok;
  }
}` :
                ''}
${STANDIN_FNS}

@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32${subgroupParamsWGSL(c.shape)}) {
  let groupId = i32(wg.x + wg.y * u32(u.gridX));
  // Whole workgroups leave together: the matrix built-ins need uniform flow.
  if (groupId >= u.totalGroups) {
    return;
  }
  ${forwardTileWGSL('groupId', c.reverseRows)}
  let r0 = qTile * i32(BR);
  let rEnd = min(r0 + i32(BR), u.seqQ);
  ${subgroupIdsWGSL(c.shape, c.subgroups)}
  ${standIn ? '' : `// Accumulators start from this (see zeroResultWGSL).
  let accZero = f32(u.one) - 1.0;`}`;
}

/** `main`'s score parameters `sp` (at two spaces' indent). */
export function scoreParamsWGSL(alibiMode: 0|1|2): string {
  return `var sp: FaScore;
  sp.scale = u.scale;
  sp.softcap = u.softcap;
  sp.slope = ${
      alibiMode === 0     ? '0.0' :
          alibiMode === 1 ? 'slopes[h]' :
                            'slopes[b * u.heads + h]'};
  sp.diag = u.seqK - u.seqQ;
  sp.left = u.left;
  sp.right = u.right;
  sp.seqK = u.seqK;`;
}

/** The workgroup's Q rows into registers qr0..qr{nQL-1} and this thread's max |q| (`qmax`). */
export function qRegistersWGSL(nQL: number): string {
  return `var qmax = 0.0;
  ${
      range(nQL)
          .map(n => `var qr${n} = vec4<f32>(0.0);
  {
    let idx = lid + THREADS * ${n}u;
    let r = r0 + i32(idx / DQ4);
    if (idx < BR * DQ4 && r < u.seqQ) {
      qr${n} = qb[u32((b * u.seqQ + r) * u.heads + h) * DQ4 + idx % DQ4];
    }
    qmax = max(qmax, ${absMaxWGSL(`qr${n}`)});
  }`).join('\n  ')}`;
}

/**
 * The registers qr0..qr{nQL-1} (qRegistersWGSL) into the workgroup's Q rows
 * ([BR][D]): `store` gives the WGSL writing vec4 register `qr` at element `at`.
 */
export function qStagingWGSL(nQL: number, store: (qr: string) => string): string {
  return range(nQL)
      .map(n => `{
    let idx = lid + THREADS * ${n}u;
    if (idx < BR * DQ4) {
      let at = (idx / DQ4) * D + 4u * (idx % DQ4);
      ${store(`qr${n}`)}
    }
  }`).join('\n  ');
}

/** The key tiles [tBegin, tEnd) that rows r0..rEnd-1 can see. */
export const KEY_TILES_WGSL = `let keys = fa_key_range(r0, rEnd, sp);
  let tBegin = keys.x / i32(BC);
  let tEnd = select(tBegin, (keys.y + i32(BC) - 1) / i32(BC), keys.y > keys.x);`;

/** WGSL: max |x| over the components of vec4 `v`. */
export function absMaxWGSL(v: string): string {
  return `max(max(abs(${v}.x), abs(${v}.y)), max(abs(${v}.z), abs(${v}.w)))`;
}

/** WGSL: the K/V row of key `j` of this (batch, KV head). */
export function kvRowWGSL(j: string): string {
  return `u32((b * u.seqK + ${j}) * u.headsKV + hk)`;
}

/**
 * Loop bound `n`: a constant on the real path; in the stand-in multiplied
 * by a uniform 1, since SwiftShader unrolls constant loops fully and then
 * takes seconds per pipeline.
 */
export function loopBoundWGSL(shape: MatrixShape, n: string): string {
  return shape.standIn ? `(${n}) * u32(u.one)` : n;
}

/** A zeroed accumulator `name`: a matrix result, or the stand-in's per-lane array. */
export function resultDeclWGSL(shape: MatrixShape, name: string): string {
  return shape.standIn ? `var ${name} = array<f32, ${shape.M * shape.N / shape.lanes}>();` :
                         `var ${name} = ${zeroResultWGSL(shape, 'accZero')};`;
}

/**
 * The stand-in's function `fn`(acc, ln, offL, offR) for
 * subgroupMatrixMultiplyAccumulate(load(l at offL), load(r at offR), acc).
 */
export function standInMmaFnWGSL(shape: MatrixShape, fn: string, l: View, r: View): string {
  const {M, N, K, lanes} = shape;
  const epl = M * N / lanes;
  const lim = (n: string) => loopBoundWGSL(shape, n);
  const lv = {...l, off: 'offL'};
  const rv = {...r, off: 'offR'};
  return `
// Stand-in for subgroupMatrixMultiplyAccumulate(load(${l.arr}), load(${r.arr}), acc).
fn ${fn}(acc: ptr<function, array<f32, ${epl}>>, ln: u32, offL: u32, offR: u32) {
  let atL = ${standInPlaceWGSL(lv, M, K)};
  let atR = ${standInPlaceWGSL(rv, K, N)};
  let ok = ${standInAlignedWGSL(lv, M, K, 2)} * ${standInAlignedWGSL(rv, K, N, 2)};
  for (var e = 0u; e < ${lim(`${epl}u`)}; e++) {
    let idx = ${standInElementWGSL(shape, 'e', 'ln')};
    let r = idx / ${N}u;
    let c = idx % ${N}u;
    var sum = (*acc)[e];
    for (var k = 0u; k < ${lim(`${K}u`)}; k++) {
      sum = fma(${l.arr}[${standInIndexWGSL(lv, 'atL', 'r', 'k')}], ${r.arr}[${
      standInIndexWGSL(rv, 'atR', 'k', 'c')}], sum);
    }
    (*acc)[e] = sum * ok;
  }
}`;
}

/** The tile sizes `sizes` of `c`, or an error: its head dims do not suit the tiling. */
export function suitedTileSizes<T>(sizes: T|null, c: {headDim: number, headDimV: number}): T {
  if (sizes == null) {
    throw new Error(`FlashAttention forward: head dims D=${c.headDim}, Dv=${
        c.headDimV} do not suit the subgroup-matrix tiling`);
  }
  return sizes;
}

export function matrixForwardWGSL(c: MatrixForwardConfig): string {
  const code = forwardSource(c);
  if (!c.shape.diagnose?.unalignedWorkgroup) {
    assertWorkgroupAlignment(code, 'FlashAttention forward (subgroup matrices)');
  }
  return code;
}

function forwardSource(c: MatrixForwardConfig): string {
  const sizes = suitedTileSizes(matrixTileSizes(c), c);
  const {M, N, K, standIn} = c.shape;
  const {br, bc, threads, lpr, cv} = sizes;
  const d = c.headDim;
  const dv = c.headDimV;
  const dq4 = d / 4;
  const dv4 = dv / 4;
  const kvw = Math.max(d, dv);
  const nq = bc / (4 * lpr);
  const nj = dv / (4 * lpr);
  const elem = standIn ? 'f32' : 'f16';
  const parts = c.split ? ['h', 'l'] : ['h'];
  const wgRed = workgroupReductions(c.shape);

  const lim = (n: string) => loopBoundWGSL(c.shape, n);
  // Matrix built-ins or their stand-ins.
  const standInFns = new Map<string, string>();
  const resultDecl = (name: string) => resultDeclWGSL(c.shape, name);
  const mma = (acc: string, l: View, r: View) => {
    if (!standIn) {
      return `${acc} = subgroupMatrixMultiplyAccumulate(${
          matrixLoadWGSL(c.shape, `subgroup_matrix_left<f16, ${K}, ${M}>`, l)}, ${
          matrixLoadWGSL(c.shape, `subgroup_matrix_right<f16, ${N}, ${K}>`, r)}, ${acc});`;
    }
    const fn = `sm_mma_${l.arr}_${r.arr}`;
    if (!standInFns.has(fn)) {
      standInFns.set(fn, standInMmaFnWGSL(c.shape, fn, l, r));
    }
    return `${fn}(&${acc}, ln, ${l.off}, ${r.off});`;
  };
  const store = (acc: string, off: string) => standIn ?
      `sm_store_scr(&${acc}, ln, ${off});` :
      matrixStoreWGSL(c.shape, 'scr', off, acc, 'BC');
  // Split products: the small terms first, then hi x hi.
  const products = (acc: string, l: (p: string) => View, r: (p: string) => View) =>
      (c.split ? [['l', 'h'], ['h', 'l'], ['h', 'h']] : [['h', 'h']])
          .map(([a, b]) => mma(acc, l(a), r(b)))
          .join('\n        ');

  const qView = (p: string): View =>
      ({arr: `q${p}`, off: 'qOff + ks * K', stride: 'D', colMajor: false, len: br * d});
  const kView = (p: string): View =>
      ({arr: `kv${p}`, off: 'cb * N * D + ks * K', stride: 'D', colMajor: true, len: bc * kvw});
  const pView = (p: string): View =>
      ({arr: `p${p}`, off: 'pOff + ks * K', stride: 'BC', colMajor: false, len: br * bc});
  const vView = (p: string): View =>
      ({arr: `kv${p}`, off: 'ks * K * DV + cb * N', stride: 'DV', colMajor: false, len: bc * kvw});

  const sBlocks = `for (var cb = 0u; cb < ${lim('BC / N')}; cb++) {
      ${resultDecl('acc')}
      for (var ks = 0u; ks < ${lim('D / K')}; ks++) {
        ${products('acc', qView, kView)}
      }
      ${store('acc', 'sOff + cb * N')}
    }`;
  const nChunks = dv / cv;
  const pvChunk = (ch: number) => `for (var cbl = 0u; cbl < ${lim('CV / N')}; cbl++) {
      let cb = ${ch * cv / N}u + cbl;
      ${resultDecl('acc')}
      for (var ks = 0u; ks < ${lim('BC / K')}; ks++) {
        ${products('acc', pView, vView)}
      }
      ${store('acc', 'sOff + cbl * N')}
    }
    workgroupBarrier();
    ${
      range(cv / (4 * lpr))
          .map(x => {
            const jj = ch * cv / (4 * lpr) + x;
            return `{
      let base = rr * BC + 4u * (lc + LPR * ${jj}u) - ${ch * cv}u;
      o${jj} = fma(vec4<f32>(scr[base], scr[base + 1u], scr[base + 2u], scr[base + 3u]), vec4<f32>(vinv), o${
                jj});
    }`;
          })
          .join('\n    ')}`;

  const nKL = Math.ceil(bc * dq4 / threads);
  const nVL = Math.ceil(bc * dv4 / threads);
  const nQL = Math.ceil(br * dq4 / threads);
  // Split a vec4 into the hi (and lo) arrays at element offset `at`.
  const splitStore = (prefix: string, at: string, v: string, scale: string) =>
      range(4)
          .map(e => {
            const x = `${v}.${COMP[e]} * ${scale}`;
            return splitStoreWGSL(
                x, `${prefix}h[${at} + ${e}u]`, c.split ? `${prefix}l[${at} + ${e}u]` : null);
          })
          .join('\n      ');
  // Row reductions over a row's LPR lanes, and tile maxima: subgroup
  // operations on the real path; workgroup memory and one atomic per
  // invocation in the stand-in (portable: no subgroups needed) and where
  // the diagnosis asks for it.
  const reduceLanes = (v: string, op: 'max'|'add') => {
    if (!wgRed) {
      return range(Math.log2(lpr))
          .map(
              i => op === 'max' ? `${v} = max(${v}, subgroupShuffleXor(${v}, ${1 << i}u));` :
                                  `${v} = ${v} + subgroupShuffleXor(${v}, ${1 << i}u);`)
          .join(' ');
    }
    if (lpr === 1) {
      return '';
    }
    const terms = range(lpr).map(x => `red[g * LANES + ln - lc + ${x}u]`);
    return `workgroupBarrier();
    red[g * LANES + ln] = ${v};
    workgroupBarrier();
    ${v} = ${op === 'max' ? maxAll(terms) : terms.join(' + ')};`;
  };
  const atomicMaxOf = (v: string, slot: number) =>
      wgRed ? `atomicMax(&wmax[${slot}], bitcast<u32>(${v}));` : `{
    let m = subgroupMax(${v});
    if (sgLane == 0u) { atomicMax(&wmax[${slot}], bitcast<u32>(m)); }
  }`;
  const expOf = (slot: number) =>
      `clamp(frexp(bitcast<f32>(atomicLoad(&wmax[${slot}]))).exp, -100, 100)`;

  return `${matrixForwardPreambleWGSL(c, lpr)}
const BR = ${br}u;
const BC = ${bc}u;
const CV = ${cv}u;
const D = ${d}u;
const DV = ${dv}u;
const DQ4 = ${dq4}u;
const DV4 = ${dv4}u;
const THREADS = ${threads}u;
const NEG = -1e30;

${parts.map(p => `var<workgroup> q${p}: array<${elem}, ${br * d}>;`).join('\n')}
${
             parts
                 .map(
                     p => `var<workgroup> kv${p}: array<${elem}, ${
                         bc * kvw}>;  // K [BC][D], then V [BC][DV]`)
                 .join('\n')}
${parts.map(p => `var<workgroup> p${p}: array<${elem}, ${br * bc}>;`).join('\n')}
var<workgroup> scr: array<f32, ${br * bc}>;  // S, then chunks of P V
// Max |x| of a tile (bits of a float >= 0) in slots 0 and 1; sized so
// that no array is placed off its 16-byte alignment.
var<workgroup> wmax: array<atomic<u32>, ${wmaxSlots(c.shape)}>;
${wgRed && lpr > 1 ? `var<workgroup> red: array<f32, ${threads}>;` : ''}

${matrixForwardMainStartWGSL(c, br, bc, threads)}
  let rr = g * M + ln / LPR;
  let lc = ln % LPR;
  let row = r0 + i32(rr);
  let qOff = g * M * D;
  let sOff = g * M * BC;
  let pOff = g * M * BC;

  ${scoreParamsWGSL(c.alibiMode)}

  // Q tile: registers, its max |q|, then scaled and split into workgroup memory.
  ${qRegistersWGSL(nQL)}
  ${atomicMaxOf('qmax', 0)}
  workgroupBarrier();
  let qe = ${expOf(0)};
  let qScale = ldexp(1.0, -qe);
  ${qStagingWGSL(nQL, qr => splitStore('q', 'at', qr, 'qScale'))}
  workgroupBarrier();
  // Resets by a whole subgroup: no lane diverges from its subgroup right
  // before the matrix built-ins, which need all of its lanes.
  if (g == 0u) {
    atomicStore(&wmax[0], 0u);
  }

  ${KEY_TILES_WGSL}
  var m = NEG;
  var l = 0.0;
  ${range(nj).map(jj => `var o${jj} = vec4<f32>(0.0);`).join(' ')}
  ${range(nKL).map(n => `var kr${n} = vec4<f32>(0.0);`).join(' ')}
  ${range(nVL).map(n => `var vr${n} = vec4<f32>(0.0);`).join(' ')}

  for (var kt = tBegin; kt < tEnd; kt++) {
    let j0 = kt * i32(BC);
    workgroupBarrier();
    // K and V tiles -> registers, their max |x| -> wmax.
    var kmax = 0.0;
    var vmax = 0.0;
    ${
             range(nKL)
                 .map(n => `{
      let idx = lid + THREADS * ${n}u;
      let j = j0 + i32(idx / DQ4);
      kr${n} = vec4<f32>(0.0);
      if (idx < BC * DQ4 && j < u.seqK) {
        kr${n} = kb[${kvRowWGSL('j')} * DQ4 + idx % DQ4];
      }
      kmax = max(kmax, ${absMaxWGSL(`kr${n}`)});
    }`).join('\n    ')}
    ${
             range(nVL)
                 .map(n => `{
      let idx = lid + THREADS * ${n}u;
      let j = j0 + i32(idx / DV4);
      vr${n} = vec4<f32>(0.0);
      if (idx < BC * DV4 && j < u.seqK) {
        vr${n} = vb[${kvRowWGSL('j')} * DV4 + idx % DV4];
      }
      vmax = max(vmax, ${absMaxWGSL(`vr${n}`)});
    }`).join('\n    ')}
    ${atomicMaxOf('kmax', 0)}
    ${atomicMaxOf('vmax', 1)}
    workgroupBarrier();
    let ke = ${expOf(0)};
    let ve = ${expOf(1)};
    let kScale = ldexp(1.0, -ke);
    ${
             range(nKL)
                 .map(n => `{
      let idx = lid + THREADS * ${n}u;
      if (idx < BC * DQ4) {
        let at = (idx / DQ4) * D + 4u * (idx % DQ4);
        ${splitStore('kv', 'at', `kr${n}`, 'kScale')}
      }
    }`).join('\n    ')}
    workgroupBarrier();
    if (g == 0u) {
      atomicStore(&wmax[0], 0u);
      atomicStore(&wmax[1], 0u);
    }

    // S = Q K^T: this subgroup's M rows x BC keys -> scratch.
    ${sBlocks}
    workgroupBarrier();

    // V over K (every subgroup is done with K).
    let vScale = ldexp(1.0, -ve);
    ${
             range(nVL)
                 .map(n => `{
      let idx = lid + THREADS * ${n}u;
      if (idx < BC * DV4) {
        let at = (idx / DV4) * DV + 4u * (idx % DV4);
        ${splitStore('kv', 'at', `vr${n}`, 'vScale')}
      }
    }`).join('\n    ')}

    // Scores of this thread's key quads, then the online softmax.
    let unscale = ldexp(1.0, qe + ke);
    ${
             range(nq)
                 .map(
                     q => `let kk${q} = 4u * (lc + LPR * ${q}u);
    var s${q} = vec4<f32>(scr[rr * BC + kk${q}], scr[rr * BC + kk${q} + 1u], scr[rr * BC + kk${
                         q} + 2u], scr[rr * BC + kk${q} + 3u]) * unscale;
    {
      let jv = vec4<i32>(j0 + i32(kk${q})) + vec4<i32>(0, 1, 2, 3);
      let vis = fa_visible4(row, jv, sp);
      ${
                         range(4)
                             .map(
                                 e => `s${q}.${COMP[e]} = select(NEG, fa_score(s${q}.${
                                     COMP[e]}, row, jv.${COMP[e]}, sp), vis.${COMP[e]});`)
                             .join('\n      ')}
    }`).join('\n    ')}
    var mx = ${maxAll(range(nq).map(q => `max(max(s${q}.x, s${q}.y), max(s${q}.z, s${q}.w))`))};
    ${reduceLanes('mx', 'max')}
    let mNew = max(m, mx);
    // A row with no visible key yet keeps m = NEG; subtracting 0 instead
    // sends its masked scores (and alpha) to exp(NEG) = 0.
    let mUse = select(mNew, 0.0, mNew < -1e29);
    let alpha = exp(m - mUse);
    m = mNew;
    ${range(nq).map(q => `s${q} = exp(s${q} - vec4<f32>(mUse));`).join('\n    ')}
    l = l * alpha${range(nq).map(q => ` + dot(s${q}, vec4<f32>(1.0))`).join('')};
    ${range(nj).map(jj => `o${jj} = o${jj} * alpha;`).join(' ')}
    ${
             c.dropout ?
                 range(nq)
                     .map(
                         q => `s${q} = s${
                             q} * fa_dropout4(u32(b), u32(h), u32(row), u32(j0 >> 2u) + lc + LPR * ${
                             q}u, vec2<u32>(u.seedLo, u.seedHi), u.threshold, u.keepScale);`)
                     .join('\n    ') :
                 ''}
    ${
             range(nq)
                 .map(q => `{
      let at = rr * BC + kk${q};
      ${splitStore('p', 'at', `s${q}`, '1.0')}
    }`).join('\n    ')}
    let vinv = ldexp(1.0, ve);
    workgroupBarrier();

    // O += P V, CV output columns at a time through the scratch.
    ${range(nChunks).map(ch => pvChunk(ch)).join('\n    workgroupBarrier();\n    ')}
  }

  ${reduceLanes('l', 'add')}
  if (row < u.seqQ) {
    let inv = select(0.0, 1.0 / l, l > 0.0);
    let outRow = u32((b * u.seqQ + row) * u.heads + h);
    ${range(nj).map(jj => `outb[outRow * DV4 + lc + LPR * ${jj}u] = o${jj} * inv;`).join('\n    ')}
    if (lc == 0u) {
      lseb[u32((b * u.heads + h) * u.seqQ + row)] =
          select(${FA_NEG_INF_BITS}u, bitcast<u32>(m + log(l)), l > 0.0);
    }
  }
}
`.replace(STANDIN_FNS, [...standInFns.values()].join('\n'));
}
