/**
 * The two-pass FlashAttention forward on subgroup matrices (tensor cores
 * from WGSL), whose O accumulators never leave the matrix registers.
 *
 * Why two passes. The online softmax rescales O by exp(m_old - m_new) per
 * row after every key tile; WGSL subgroup matrices have an opaque layout,
 * so a per-row scale means storing O to workgroup memory, scaling and
 * reloading it (the one-pass kernel of
 * flash_attention_subgroup_matrix_webgpu.ts does that, per key tile).
 * Here pass 1 computes S = Q K^T tile by tile and reduces each row's exact
 * max and sum of exp, i.e. its log-sum-exp L; pass 2 computes S again,
 * forms P = exp(S - L) (already normalised: no rescale, ever) and
 * accumulates O += P V in matrix accumulators that stay in registers until
 * the end. The extra Q K^T costs half as much matrix work again, but O
 * makes no round trip through workgroup memory and the softmax needs no
 * barrier-separated max/rescale steps.
 *
 * Tiling. A workgroup owns BR = M * RB * SG query rows of one (batch,
 * head): subgroup g owns RB blocks of M rows, so every K or V matrix it
 * loads from workgroup memory serves RB products. Q is loaded into matrix
 * registers once (staged through the operand array, then that memory holds
 * K, V and P). Per key tile, K (and in pass 2 V) are read from global
 * memory as vec4s by the whole workgroup, split once into workgroup memory
 * and shared by all subgroups. Barriers per key tile: 3 in pass 1, 4 in
 * pass 2.
 *
 * Precision as in the one-pass kernel: `split` stores hi and lo float16
 * parts of every scaled operand and accumulates lo*hi + hi*lo + hi*hi in
 * f32; Q is scaled per workgroup, K per key tile (the same scale in both
 * passes, so both compute the same S), V by one power of two per workgroup
 * from its max |v| over the workgroup's keys (found in pass 1), undone on
 * the output: a per-tile V scale could not be undone on accumulators that
 * span tiles.
 *
 * Stand-in (MatrixShape.standIn): every matrix built-in becomes a plain
 * loop of the same semantics (subgroup_matrix_wgsl.ts), Q's matrices are
 * a workgroup array each subgroup copies its rows into where the real path
 * loads them, and row reductions go through workgroup memory.
 */
import {matrixShapeKey} from './subgroup_matrix';
import {assertWorkgroupAlignment, MatrixView as View, splitStoreWGSL} from './subgroup_matrix_wgsl';
import {absMaxWGSL as absMax, KEY_TILES_WGSL, MatrixForwardConfig, matrixTileSizes, kvRowWGSL as kvRow, loopBoundWGSL, matrixForwardMainStartWGSL, matrixForwardPreambleWGSL, qRegistersWGSL, qStagingWGSL, scoreParamsWGSL, STANDIN_FNS, suitedTileSizes} from './flash_attention_subgroup_matrix_webgpu';
import {pvProductsWGSL, scoreProductsWGSL, twoPassMatrixOps, twoPassRowsWGSL, twoPassSoftmaxWGSL} from './flash_attention_subgroup_matrix_two_pass_wgsl';
import {range, scoreKey, VEC4_COMPONENTS as COMP} from './wgsl_snippets';

/**
 * Everything baked into one pipeline: the one-pass kernel's configuration
 * (its `subgroups` each owning `rowBlocks` blocks of M rows here) and:
 */
export interface TwoPassForwardConfig extends MatrixForwardConfig {
  /** Blocks of M query rows per subgroup (BR = M * rowBlocks * subgroups). */
  rowBlocks: number;
  /**
   * Pass 1 finds each row's max only (no exponentials); pass 2 sums the
   * row's P = exp(S - max) itself and O is divided by that sum on the way
   * out (a per-row scale of the values read from the scratch).
   */
  rowMaxOnly?: boolean;
}

export interface TwoPassTileSizes {
  br: number;
  bc: number;
  threads: number;
  /** Lanes per row in the softmax. */
  lpr: number;
  /** Output columns per chunk of the final store through the scratch. */
  cv: number;
  /** Elements of the operand array (Q staging, then K, V and P). */
  ops: number;
}

type Dims = Pick<TwoPassForwardConfig, 'headDim'|'headDimV'|'shape'|'subgroups'|'rowBlocks'|'bc'>;

/** Tile sizes, or null when the head dims do not suit the matrix shape. */
export function twoPassTileSizes(c: Dims): TwoPassTileSizes|null {
  // The one-pass kernel's constraints (head dims, key tile, softmax quads,
  // output chunk); only the rows per workgroup differ.
  const s = matrixTileSizes(c);
  if (s == null) {
    return null;
  }
  const br = c.shape.M * c.rowBlocks * c.subgroups;
  const ops = Math.max(br * c.headDim, c.bc * (c.headDim + c.headDimV) + br * c.bc);
  return {br, bc: c.bc, threads: s.threads, lpr: s.lpr, cv: s.cv, ops};
}

/** Bytes of workgroup memory of a configuration. */
export function twoPassWorkgroupBytes(c: Dims&{split: boolean}): number {
  const s = twoPassTileSizes(c)!;
  const parts = c.split ? 2 : 1;
  const elem = c.shape.standIn ? 4 : 2;
  const qOwn = c.shape.standIn ? s.br * c.headDim : 0;
  // The stand-in's own arrays: Q's "registers", atomics, lane reductions.
  const standInBytes = c.shape.standIn ? 4 * 8 + (s.lpr > 1 ? 4 * s.threads : 0) : 0;
  return parts * elem * (s.ops + qOwn) + 4 * s.br * s.bc + standInBytes;
}

export function twoPassForwardKey(c: TwoPassForwardConfig): string {
  return `fa_fwd_sm2_d${c.headDim}_dv${c.headDimV}_${matrixShapeKey(c.shape)}_g${c.subgroups}_rb${
      c.rowBlocks}_bc${c.bc}_sp${+ c.split}_${scoreKey(c.score)}_al${c.alibiMode}_do${
      + c.dropout}_rv${+ c.reverseRows}_mx${+ (c.rowMaxOnly === true)}`;
}

export function twoPassForwardWGSL(c: TwoPassForwardConfig): string {
  const code = twoPassSource(c);
  assertWorkgroupAlignment(code, 'FlashAttention two-pass forward (subgroup matrices)');
  return code;
}

function twoPassSource(c: TwoPassForwardConfig): string {
  const sizes = suitedTileSizes(twoPassTileSizes(c), c);
  const {N, K, standIn} = c.shape;
  const {br, bc, threads, lpr, cv, ops} = sizes;
  const rbs = range(c.rowBlocks);
  const d = c.headDim;
  const dv = c.headDimV;
  const dq4 = d / 4;
  const dv4 = dv / 4;
  const elem = standIn ? 'f32' : 'f16';
  const parts = c.split ? ['h', 'l'] : ['h'];
  const kOff = 0;
  const vOff = bc * d;
  const pOff = bc * (d + dv);
  const lim = (n: string) => loopBoundWGSL(c.shape, n);

  // Operand views (per part); `off` are WGSL expressions.
  const qView = (p: string, off: string): View => ({
    arr: standIn ? `q${p}` : `op${p}`,
    off,
    stride: 'D',
    colMajor: false,
    len: standIn ? br * d : ops
  });
  const kView = (p: string, off: string): View =>
      ({arr: `op${p}`, off, stride: 'D', colMajor: true, len: ops});
  const vView = (p: string, off: string): View =>
      ({arr: `op${p}`, off, stride: 'DV', colMajor: false, len: ops});
  const pView = (p: string, off: string): View =>
      ({arr: `op${p}`, off, stride: 'BC', colMajor: false, len: ops});

  const matrixOps = twoPassMatrixOps(c.shape);
  const {standInFns, resultDecl, storeScr, left, rowOff} = matrixOps;

  // S = Q K^T for this subgroup's RB x M rows and the tile's BC keys, into
  // the scratch ([BR][BC] f32).
  const sBlocks = scoreProductsWGSL(c, matrixOps, qView, kView, '', '');

  // O += P V over the tile's keys; accumulators o{rb}_{cb} stay in registers.
  const oBlocks = range(dv / N);
  const pvBlocks = pvProductsWGSL(c, matrixOps, pView, vView, 'POFF + ', 'VOFF + ');

  const nKL = Math.ceil(bc * dq4 / threads);
  const nVL = Math.ceil(bc * dv4 / threads);
  const nQL = Math.ceil(br * dq4 / threads);
  // Split a vec4 into the hi (and lo) arrays `arr` at element offset `at`.
  const splitStore = (arr: string, at: string, v: string, scale: string) =>
      range(4)
          .map(
              e => splitStoreWGSL(
                  `${v}.${COMP[e]} * ${scale}`, `${arr}h[${at} + ${e}u]`,
                  c.split ? `${arr}l[${at} + ${e}u]` : null))
          .join('\n        ');
  // K tile (and in pass 2 V) from global memory into registers, then
  // split into workgroup memory at the workgroup's fixed scales.
  const
      loadTile =
          (pass: 1|2) =>
              `let j0 = kt * i32(BC);
    let full = fa_tile_unmasked(r0, rEnd, j0, j0 + i32(BC), sp);
    ${range(nKL).map(n => `var kr${n} = vec4<f32>(0.0);
    {
      let idx = lid + THREADS * ${n}u;
      let j = j0 + i32(idx / DQ4);
      if (idx < BC * DQ4 && j < u.seqK) {
        kr${n} = kb[${kvRow('j')} * DQ4 + idx % DQ4];
      }
    }`).join('\n    ')}
    ${
                  pass === 1 ? '' :
                               range(nVL)
                                   .map(n => `var vr${n} = vec4<f32>(0.0);
    {
      let idx = lid + THREADS * ${n}u;
      let j = j0 + i32(idx / DV4);
      if (idx < BC * DV4 && j < u.seqK) {
        vr${n} = vb[${kvRow('j')} * DV4 + idx % DV4];
      }
    }`).join('\n    ')}
    ${pass === 2 ? 'workgroupBarrier();  // the previous tile\'s P V is done with V and P' : ''}
    ${range(nKL).map(n => `{
      let idx = lid + THREADS * ${n}u;
      if (idx < BC * DQ4) {
        let at = KOFF + (idx / DQ4) * D + 4u * (idx % DQ4);
        ${splitStore('op', 'at', `kr${n}`, 'kScale')}
      }
    }`).join('\n    ')}
    ${
                  pass === 1 ? '' :
                               range(nVL)
                                   .map(n => `{
      let idx = lid + THREADS * ${n}u;
      if (idx < BC * DV4) {
        let at = VOFF + (idx / DV4) * DV + 4u * (idx % DV4);
        ${splitStore('op', 'at', `vr${n}`, 'vScale')}
      }
    }`).join('\n    ')}
    workgroupBarrier();`;

  // The workgroup's max |q|, |k|, |v| (slots 0, 1, 2): on the real path
  // subgroupMax, then one value per subgroup through the scratch (free at
  // that point); in the stand-in (no subgroups) workgroup atomics.
  const maxima = ['qmax', 'kmax', 'vmax'];
  const reduceMaxima = standIn ?
      `${maxima.map((v, i) => `atomicMax(&wmax[${i}], bitcast<u32>(${v}));`).join('\n  ')}
  workgroupBarrier();
  ${maxima.map((v, i) => `let ${v}All = bitcast<f32>(atomicLoad(&wmax[${i}]));`).join('\n  ')}` :
      `${maxima.map(v => `let ${v}Sg = subgroupMax(${v});`).join('\n  ')}
  if (sgLane == 0u) {
    ${maxima.map((v, i) => `scr[g * 4u + ${i}u] = ${v}Sg;`).join('\n    ')}
  }
  workgroupBarrier();
  ${maxima.map(v => `var ${v}All = 0.0;`).join('\n  ')}
  for (var sg = 0u; sg < SG; sg++) {
    ${maxima.map((v, i) => `${v}All = max(${v}All, scr[sg * 4u + ${i}u]);`).join('\n    ')}
  }`;
  const exponent = (v: string) => `clamp(frexp(${v}).exp, -100, 100)`;

  const softmax = twoPassSoftmaxWGSL({
    ...c,
    standIn,
    n: N,
    lpr,
    bc,
    cv,
    dv,
    unscale: () => ' unscale',
    pBase: 'POFF + ',
    storeP: splitStore('op', 'at', 'p', '1.0'),
    dropoutScale: 'u.keepScale',
    storeScr,
    rowOff,
  });

  return `${matrixForwardPreambleWGSL(c, lpr)}
const RB = ${c.rowBlocks}u;
const BR = ${br}u;
const BC = ${bc}u;
const D = ${d}u;
const DV = ${dv}u;
const DQ4 = ${dq4}u;
const DV4 = ${dv4}u;
const THREADS = ${threads}u;
const SG = ${c.subgroups}u;
const KOFF = ${kOff}u;
const VOFF = ${vOff}u;
const POFF = ${pOff}u;
const NEG = -1e30;

// Q staging, then per key tile K [BC][D] at KOFF, V [BC][DV] at VOFF and
// P [BR][BC] at POFF.
${parts.map(p => `var<workgroup> op${p}: array<${elem}, ${ops}>;`).join('\n')}
${
             standIn ? parts
                           .map(
                               p => `var<workgroup> q${p}: array<${elem}, ${
                                   br * d}>;  // the stand-in's Q "registers"`)
                           .join('\n') :
                       ''}
var<workgroup> scr: array<f32, ${br * bc}>;  // S, then chunks of O
${
             standIn ? `// The stand-in's max |q|, |k|, |v| (bits of floats >= 0).
var<workgroup> wmax: array<atomic<u32>, 8>;` :
                       ''}
${standIn && lpr > 1 ? `var<workgroup> red: array<f32, ${threads}>;` : ''}

${matrixForwardMainStartWGSL(c, br, bc, threads)}
  ${twoPassRowsWGSL(c.rowBlocks)}

  ${scoreParamsWGSL(c.alibiMode)}

  // Q tile: registers and its max |q|.
  ${qRegistersWGSL(nQL)}

  // Pass 0: max |k| and |v| over the workgroup's keys (reads only), so
  // that both passes split K and V at one fixed scale each: no per-tile
  // reductions, and O's accumulators span tiles of one V scale.
  ${KEY_TILES_WGSL}
  var kmax = 0.0;
  var vmax = 0.0;
  for (var kt = tBegin; kt < tEnd; kt++) {
    let j0 = kt * i32(BC);
    ${
             range(nKL)
                 .map(n => `{
      let idx = lid + THREADS * ${n}u;
      let j = j0 + i32(idx / DQ4);
      if (idx < BC * DQ4 && j < u.seqK) {
        let x = kb[${kvRow('j')} * DQ4 + idx % DQ4];
        kmax = max(kmax, ${absMax('x')});
      }
    }`).join('\n    ')}
    ${
             range(nVL)
                 .map(n => `{
      let idx = lid + THREADS * ${n}u;
      let j = j0 + i32(idx / DV4);
      if (idx < BC * DV4 && j < u.seqK) {
        let x = vb[${kvRow('j')} * DV4 + idx % DV4];
        vmax = max(vmax, ${absMax('x')});
      }
    }`).join('\n    ')}
  }
  ${reduceMaxima}
  // Powers of two taking each operand's max |x| into [0.5, 1).
  let qe = ${exponent('qmaxAll')};
  let ke = ${exponent('kmaxAll')};
  let ve = ${exponent('vmaxAll')};
  let qScale = ldexp(1.0, -qe);
  let kScale = ldexp(1.0, -ke);
  let vScale = ldexp(1.0, -ve);
  let unscale = ldexp(1.0, qe + ke);
  let vinv = ldexp(1.0, ve);

  // Q scaled and split into workgroup memory, from where each subgroup
  // loads its Q matrices once.
  ${qStagingWGSL(nQL, qr => splitStore('op', 'at', qr, 'qScale'))}
  workgroupBarrier();
  ${
             standIn ? `// The stand-in's "matrix loads" of Q: this subgroup's rows, copied
  // from the staging memory at the point where the real path loads them.
  for (var i = ln; i < ${lim('RB * M * D')}; i += LANES) {
    let at = g * RB * M * D + i;
    ${parts.map(p => `q${p}[at] = op${p}[at];`).join(' ')}
  }` :
                       rbs.flatMap(
                              rb => range(d / K).flatMap(
                                  ks => parts.map(
                                      p => `let qm${rb}_${ks}_${p} = ${
                                          left(qView(p, `${rowOff(rb)} * D + ${ks * K}u`))};`)))
                           .join('\n  ')}
  // The first key tile's K store overwrites the Q staging.
  workgroupBarrier();

  ${
             rbs.map(rb => `var m${rb} = NEG;
  var l${rb} = 0.0;`)
                 .join('\n  ')}

  // Pass 1: each row's max and sum of exp over all its keys.
  for (var kt = tBegin; kt < tEnd; kt++) {
    ${loadTile(1)}
    ${sBlocks}
    workgroupBarrier();
    ${rbs.map(softmax.pass1Stats).join('\n    ')}
  }

  ${softmax.afterPass1}

  // Pass 2: P = exp(S - lse), O += P V in matrix accumulators.
  ${rbs.flatMap(rb => oBlocks.map(cb => resultDecl(`o${rb}_${cb}`))).join('\n  ')}
  for (var kt = tBegin; kt < tEnd; kt++) {
    ${loadTile(2)}
    ${sBlocks}
    workgroupBarrier();
    ${rbs.map(softmax.pass2P).join('\n    ')}
    workgroupBarrier();
    ${pvBlocks}
  }
  ${softmax.afterPass2}

  // O out through the scratch, CV columns at a time, V's scale (and with
  // rowMaxOnly the row's sum of P) undone.
  ${softmax.outRows('vinv')}
  ${softmax.output}
}
`.replace(STANDIN_FNS, [...standInFns.values()].join('\n'));
}
