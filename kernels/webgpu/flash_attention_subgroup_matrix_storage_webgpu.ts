/**
 * The storage-loaded FlashAttention forward on subgroup matrices: the
 * two-pass kernel (flash_attention_subgroup_matrix_two_pass_webgpu.ts: exact
 * log-sum-exp in pass 1, P = exp(S - L) and O += P V in matrix
 * accumulators in pass 2) with its Q, K and V matrices loaded straight
 * from storage buffers, never staged in workgroup memory.
 *
 * A pre-pass (flash_attention_subgroup_matrix_split_webgpu.ts) has written
 * each operand as padded row-major float16 matrices per (batch, head), hi
 * and lo parts in the split mode, with one power-of-two scale per tile of
 * rows: M rows for Q, BC keys for K and V. Here:
 *  - Q: each subgroup loads its row blocks' matrices once, from storage.
 *  - S = Q K^T with K's matrices loaded from storage (column-major views
 *    of the row-major [keys][D] array), stored to the f32 scratch; each
 *    score is unscaled by its row block's Q scale times the tile's K scale.
 *  - V: O's accumulators span key tiles, so V's per-tile scale cannot be
 *    undone on them; it goes into P instead: O = sum_t (P_t 2^(e_t - E))
 *    (V_t 2^-e_t) 2^E, E the largest V exponent of the workgroup's key
 *    tiles (read from the scales, no reduction). P 2^(e_t - E) <= P <= 1
 *    (dropout's 1 / (1 - rate) is applied to O instead), so it stays in
 *    f16's range; E is undone once on the output.
 * Workgroup memory holds the S scratch [BR][BC] f32 and P [BR][BC] (hi/lo)
 * only, each subgroup using its own rows: no subgroup reads another's
 * data. Barriers per key tile: 2 in pass 1 (S stored / read before the
 * next store), 2 in pass 2 (S stored; P stored), and none for operands.
 *
 * Stand-in (MatrixShape.standIn): the built-ins as plain loops of the same
 * semantics (subgroup_matrix_wgsl.ts) on f32 storage arrays holding
 * f16-rounded values, with the bounds and alignment rules applied to the
 * storage arrays' runtime lengths.
 */
import {matrixShapeKey} from './subgroup_matrix';
import {assertWorkgroupAlignment, MatrixView as View, splitStoreWGSL} from './subgroup_matrix_wgsl';
import {KEY_TILES_WGSL, MATRIX_FORWARD_UNIFORMS, matrixForwardMainStartWGSL, matrixForwardPreambleWGSL, scoreParamsWGSL, STANDIN_FNS, suitedTileSizes} from './flash_attention_subgroup_matrix_webgpu';
import {TwoPassForwardConfig, twoPassTileSizes} from './flash_attention_subgroup_matrix_two_pass_webgpu';
import {pvProductsWGSL, scoreProductsWGSL, twoPassMatrixOps, twoPassRowsWGSL, twoPassSoftmaxWGSL} from './flash_attention_subgroup_matrix_two_pass_wgsl';
import {bindingsWGSL, StorageBinding, uniformStructWGSL} from './own_pipeline';
import {range, scoreKey, VEC4_COMPONENTS as COMP} from './wgsl_snippets';

/** The two-pass kernel's configuration and where Q's matrices live. */
export interface StorageForwardConfig extends TwoPassForwardConfig {
  /**
   * Q's matrices loaded from storage at each use (L1/L2-resident) instead
   * of once into registers: frees Q's registers for more row blocks.
   */
  reloadQ: boolean;
}

/**
 * The two-pass kernel's uniforms, the operands' padded lengths, and where
 * each operand's parts (hi, lo) and scales start in `ops` and `scales`.
 */
export const STORAGE_FORWARD_UNIFORMS = [
  ...MATRIX_FORWARD_UNIFORMS,
  ['seqQPad', 'i32'],
  ['seqKPad', 'i32'],
  ['qhOff', 'u32'],
  ['qlOff', 'u32'],
  ['khOff', 'u32'],
  ['klOff', 'u32'],
  ['vhOff', 'u32'],
  ['vlOff', 'u32'],
  ['qsOff', 'u32'],
  ['ksOff', 'u32'],
  ['vsOff', 'u32'],
] as const;

type Dims = Pick<StorageForwardConfig, 'headDim'|'headDimV'|'shape'|'subgroups'|'rowBlocks'|'bc'>;

/** Bytes of workgroup memory: S scratch and P, plus the stand-in's row reductions. */
export function storageWorkgroupBytes(c: Dims&{split: boolean}): number {
  const s = twoPassTileSizes(c)!;
  const parts = c.split ? 2 : 1;
  const elem = c.shape.standIn ? 4 : 2;
  const standInBytes = c.shape.standIn && s.lpr > 1 ? 4 * s.threads : 0;
  return (parts * elem + 4) * s.br * s.bc + standInBytes;
}

export function storageForwardKey(c: StorageForwardConfig): string {
  return `fa_fwd_smst_d${c.headDim}_dv${c.headDimV}_${matrixShapeKey(c.shape)}_g${c.subgroups}_rb${
      c.rowBlocks}_bc${c.bc}_sp${+ c.split}_${scoreKey(c.score)}_al${c.alibiMode}_do${
      + c.dropout}_rv${+ c.reverseRows}_rq${+ c.reloadQ}_mx${+ (c.rowMaxOnly === true)}`;
}

/** Input bindings, in order: the pre-pass's operands and scales, then the slopes. */
function storageForwardInputs(c: Pick<StorageForwardConfig, 'alibiMode'|'shape'>):
    StorageBinding[] {
  return [
    {name: 'ops', type: c.shape.standIn ? 'f32' : 'f16'},
    {name: 'scales', type: 'f32'},
    ...(c.alibiMode !== 0 ? [{name: 'slopes', type: 'f32'}] : []),
  ];
}

export function storageForwardWGSL(c: StorageForwardConfig): string {
  const code = storageSource(c);
  assertWorkgroupAlignment(code, 'FlashAttention storage-loaded forward (subgroup matrices)');
  return code;
}

function storageSource(c: StorageForwardConfig): string {
  const sizes = suitedTileSizes(twoPassTileSizes(c), c);
  const {N, K, standIn} = c.shape;
  const {br, bc, threads, lpr, cv} = sizes;
  const rbs = range(c.rowBlocks);
  const d = c.headDim;
  const dv = c.headDimV;
  const elem = standIn ? 'f32' : 'f16';
  const parts = c.split ? ['h', 'l'] : ['h'];
  const len = standIn ? 'arrayLength(&ops)' : 0;

  // Operand views (per part): Q, K, V in storage (`ops`, each part from
  // its uniform offset), P in workgroup memory.
  const qView = (p: string, off: string): View =>
      ({arr: 'ops', off: `u.q${p}Off + ${off}`, stride: 'D', colMajor: false, len});
  const kView = (p: string, off: string): View =>
      ({arr: 'ops', off: `u.k${p}Off + ${off}`, stride: 'D', colMajor: true, len});
  const vView = (p: string, off: string): View =>
      ({arr: 'ops', off: `u.v${p}Off + ${off}`, stride: 'DV', colMajor: false, len});
  const pView = (p: string, off: string): View =>
      ({arr: `p${p}`, off, stride: 'BC', colMajor: false, len: br * bc});

  const matrixOps = twoPassMatrixOps(c.shape);
  const {standInFns, resultDecl, storeScr, left, rowOff} = matrixOps;
  // Q's left matrix of row block rb, depth step ks, part p, from storage.
  const qMatrix = (rb: number, ks: number, p: string) =>
      `let qm${rb}_${ks}_${p} = ${left(qView(p, `qOff + ${rowOff(rb)} * D + ${ks * K}u`))};`;

  // S = Q K^T of this subgroup's row blocks and the tile's BC keys, into
  // the scratch; K's matrices from storage at kOff (the tile's first key).
  const sBlocks = scoreProductsWGSL(
      c, matrixOps, qView, kView, 'qOff + ', 'kOff + ',
      ks => c.reloadQ ? rbs.flatMap(rb => parts.map(p => qMatrix(rb, ks, p))).join('\n        ') :
                        '');

  // O += P V over the tile's keys; V's matrices from storage at vOff.
  const oBlocks = range(dv / N);
  const pvBlocks = pvProductsWGSL(c, matrixOps, pView, vView, '', 'vOff + ');

  // The tile's first key, its mask test and its operands' places.
  const tileStart = `let j0 = kt * i32(BC);
    let full = fa_tile_unmasked(r0, rEnd, j0, j0 + i32(BC), sp);
    let kOff = kvBase * D + u32(j0) * D;
    let vOff = kvBase * DV + u32(j0) * DV;
    let kUn = scales[u.ksOff + kvTile0 + u32(kt)];`;

  // P = exp(S - lse) times the tile's V factor 2^(e_t - E) <= 1, split
  // into this subgroup's rows of p: at most 1, inside f16's range.
  const softmax = twoPassSoftmaxWGSL({
    ...c,
    standIn,
    n: N,
    lpr,
    bc,
    cv,
    dv,
    // The scores' line breaks where the product of two scales is long.
    unscale: rb => `\n          (qUn${rb} * kUn)`,
    pBase: '',
    storeP:
        range(4)
            .map(
                e => splitStoreWGSL(
                    `p.${COMP[e]} * vFold`, `ph[at + ${e}u]`, c.split ? `pl[at + ${e}u]` : null))
            .join('\n      '),
    dropoutScale: '1.0',
    storeScr,
    rowOff,
  });

  const inputs = storageForwardInputs(c);
  const outputs = [{name: 'outb', type: 'vec4<f32>'}, {name: 'lseb', type: 'u32'}];
  const bindings = `${uniformStructWGSL('Uniforms', STORAGE_FORWARD_UNIFORMS)}

${bindingsWGSL(inputs, outputs, {name: 'u', type: 'Uniforms'})}`;
  return `${matrixForwardPreambleWGSL(c, lpr, bindings)}
const RB = ${c.rowBlocks}u;
const BR = ${br}u;
const BC = ${bc}u;
const D = ${d}u;
const DV = ${dv}u;
const DV4 = ${dv / 4}u;
const THREADS = ${threads}u;
const SG = ${c.subgroups}u;
const NEG = -1e30;

// Per key tile: S [BR][BC] (then chunks of O) and P [BR][BC]; subgroup g
// uses rows g * RB * M .. (g + 1) * RB * M - 1 of both.
var<workgroup> scr: array<f32, ${br * bc}>;
${parts.map(p => `var<workgroup> p${p}: array<${elem}, ${br * bc}>;`).join('\n')}
${standIn && lpr > 1 ? `var<workgroup> red: array<f32, ${threads}>;` : ''}

${matrixForwardMainStartWGSL(c, br, bc, threads)}
  ${twoPassRowsWGSL(c.rowBlocks)}

  ${scoreParamsWGSL(c.alibiMode)}
  ${KEY_TILES_WGSL}

  // Where this (batch, head)'s operands start: Q's rows r0.. and the KV
  // head's keys (padded lengths), and their first scale tiles.
  let qOff = u32((b * u.heads + h) * u.seqQPad + r0) * D;
  let kvBase = u32((b * u.headsKV + hk) * u.seqKPad);
  let kvTile0 = kvBase / BC;
  ${
             rbs.map(
                    rb => `let qUn${
                        rb} = scales[u.qsOff + u32((b * u.heads + h) * u.seqQPad + r0) / M +
      g * RB + ${rb}u];`)
                 .join('\n  ')}

  // V's largest scale over the workgroup's key tiles (2^E): P is scaled by
  // each tile's 2^(e_t - E) <= 1 and O by 2^E at the end.
  var vTop = 0.0;
  for (var kt = tBegin; kt < tEnd; kt++) {
    vTop = max(vTop, scales[u.vsOff + kvTile0 + u32(kt)]);
  }

  ${
             standIn || c.reloadQ ?
                 '' :
                 `// Q's matrices, once, from storage.
  ${
                     rbs.flatMap(
                            rb => range(d / K).flatMap(ks => parts.map(p => qMatrix(rb, ks, p))))
                         .join('\n  ')}`}

  ${
             rbs.map(rb => `var m${rb} = NEG;
  var l${rb} = 0.0;`)
                 .join('\n  ')}

  // Pass 1: each row's max and sum of exp over all its keys.
  for (var kt = tBegin; kt < tEnd; kt++) {
    ${tileStart}
    ${sBlocks}
    workgroupBarrier();
    ${rbs.map(softmax.pass1Stats).join('\n    ')}
    // The next tile's S overwrites the scratch.
    workgroupBarrier();
  }

  ${softmax.afterPass1}

  // Pass 2: P = exp(S - lse), O += P V in matrix accumulators. The S store
  // follows the previous tile's last reads of the scratch and P's loads by
  // a barrier each (the one after S, the one after P).
  ${rbs.flatMap(rb => oBlocks.map(cb => resultDecl(`o${rb}_${cb}`))).join('\n  ')}
  for (var kt = tBegin; kt < tEnd; kt++) {
    ${tileStart}
    let vFold = scales[u.vsOff + kvTile0 + u32(kt)] / vTop;
    ${sBlocks}
    workgroupBarrier();
    ${rbs.map(softmax.pass2P).join('\n    ')}
    workgroupBarrier();
    ${pvBlocks}
  }
  ${softmax.afterPass2}

  // O out through the scratch, CV columns at a time, V's 2^E (and
  // dropout's 1 / (1 - rate), kept out of P's f16 range) undone.
  let oScale = vTop${c.dropout ? ' * u.keepScale' : ''};
  ${softmax.outRows('oScale')}
  ${softmax.output}
}
`.replace(STANDIN_FNS, [...standInFns.values()].join('\n'));
}
