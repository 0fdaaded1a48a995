/**
 * WGSL of the attention-dataflow ladder (benchmarks/attention_skeleton.ts,
 * issue 15): forward kernels over Q, K, V f16 in storage, each rung adding
 * one piece of the real dataflow of subgroup-matrix attention, where S
 * must leave the matrix registers (their layout is opaque) to be read
 * element-wise and come back as a P matrix:
 *
 * - R0: S = Q K^T only, summed over the key tiles into the same
 *   accumulators (stored once at the end, so no product is dead).
 * - R1: R0 + O += P V with P = f16(S): S stored to a workgroup scratch,
 *   barrier, converted to f16 P by the lanes, barrier, loaded as a left
 *   matrix. No exponentials.
 * - R2: R1 + the softmax, in one of two ways: `online`, one running max
 *   per subgroup (subgroupMax), O rescaled with
 *   subgroupMatrixScalarMultiply where it grows, exact row sums; or
 *   `two-pass`, pass 1 finds the row maxima (S only), pass 2 P = exp(S - m)
 *   with no rescale at all (1.5x the matrix work).
 * - R3: R2 with Q, K, V and P split into hi + lo f16 parts, three
 *   products per product (lo hi + hi lo + hi hi).
 * - R1h, R2h (`halfScores`): R1, R2 with S accumulated in f16 result
 *   matrices and stored straight into P's f16 array: the opaque-layout
 *   round trip alone (store, barrier, load) in R1h, the softmax in place
 *   in R2h.
 *
 * Q's matrices are loaded once into registers; K and V matrices straight
 * from storage or from tiles staged in workgroup memory (vec4 copies).
 * Each subgroup owns RB blocks of M query rows and touches only its own
 * rows of the scratch and of P. Not the library's kernels: no masks, no
 * scaling into f16's range, whole tiles only (S a multiple of the tiles).
 *
 * The stand-in (MatrixShape.standIn) replaces the built-ins by the strict
 * plain loops of kernels/webgpu/subgroup_matrix_wgsl.ts, and subgroup
 * reductions by workgroup memory, so the same tiling runs on SwiftShader
 * (test/attention_skeleton.test.ts).
 *
 * Bindings: qIn, kIn, vIn (read-only storage: each the hi parts [H][S][D], then
 * the lo parts), o (f32 [H][S][D]), uniforms {one, seq, scaleLog2, loOff};
 * dispatch (S / BR, H).
 */
import type {MatrixShape} from '../kernels/webgpu/subgroup_matrix';
import {assertWorkgroupAlignment, matrixLoadWGSL, matrixStoreWGSL, MatrixView, splitStoreWGSL, standInAlignedWGSL, standInElementWGSL, standInHelpersWGSL, standInIndexWGSL, standInPlaceWGSL, subgroupIdsWGSL, subgroupParamsWGSL, zeroResultWGSL} from '../kernels/webgpu/subgroup_matrix_wgsl';
import {loopBoundWGSL, standInMmaFnWGSL} from '../kernels/webgpu/flash_attention_subgroup_matrix_webgpu';
import {range} from '../kernels/webgpu/wgsl_snippets';

import {SUBGROUP_MATRIX_HEADER} from './raw_webgpu';

export type Rung = 0|1|2|3;
export type SkeletonSoftmax = 'online'|'two-pass';

export interface SkeletonConfig {
  shape: MatrixShape;
  rung: Rung;
  /** R2 and R3 only. */
  softmax: SkeletonSoftmax;
  headDim: number;
  /** Blocks of M query rows per subgroup. */
  rowBlocks: number;
  subgroups: number;
  /** Keys per tile (BC). */
  keyTile: number;
  /** Where K's and V's matrices are loaded from. */
  kvFrom: 'storage'|'workgroup';
  /**
   * Rows of the scratch and of P padded by 16 bytes, so that the lanes'
   * element-wise reads and writes of neighbouring rows fall in different
   * banks (unpadded, rows of 32 f32 all start in the same bank).
   */
  pad?: boolean;
  /**
   * R1, R2: S accumulated in f16 result matrices (an f16 -> f16
   * configuration) and stored straight into P's f16 array: no f32 scratch,
   * no conversion pass in R1, the softmax in place in R2.
   */
  halfScores?: boolean;
  /** Q's matrices loaded from storage at each product instead of held in registers. */
  reloadQ?: boolean;
  /**
   * Each lane's CPL columns of a row contiguous, as first written (their
   * reads of neighbouring rows hit one bank), instead of interleaved with
   * the row's other lanes and rotated by the row.
   */
  naiveLanes?: boolean;
  /**
   * No barriers between the steps on a subgroup's own rows (S stored, read,
   * P written, loaded): a data race WGSL does not allow, run only to
   * measure what those barriers cost (the check says whether the hardware
   * happened to keep the order). K/V from storage only.
   */
  noBarriers?: boolean;
}

/** Row strides, in elements, of the f32 scratch and of P (f16 on the real path). */
export function skeletonStrides(c: SkeletonConfig): {scratch: number, p: number} {
  return {scratch: c.keyTile + (c.pad ? 4 : 0), p: c.keyTile + (c.pad ? 8 : 0)};
}

/** Query rows per workgroup. */
export function skeletonRows(c: SkeletonConfig): number {
  return c.subgroups * c.rowBlocks * c.shape.M;
}

/** Workgroup memory bytes of `c` (the real element sizes). */
export function skeletonWorkgroupBytes(c: SkeletonConfig): number {
  const parts = c.rung === 3 ? 2 : 1;
  const br = skeletonRows(c);
  const strides = skeletonStrides(c);
  const scratch = c.rung === 0 || c.halfScores ? 0 : br * strides.scratch * 4;
  const p = c.rung === 0 ? 0 : br * strides.p * 2 * parts;
  const tiles =
      c.kvFrom === 'workgroup' ? (c.rung === 0 ? 1 : 2) * c.keyTile * c.headDim * 2 * parts : 0;
  const red = c.shape.standIn ? c.subgroups * c.shape.lanes * 4 : 0;
  return scratch + p + tiles + red;
}

/** Why `c` cannot be generated, or null. */
export function skeletonProblem(c: SkeletonConfig): string|null {
  const {M, N, K, lanes} = c.shape;
  const lpr = lanes / M;
  if (lanes % M !== 0 || c.keyTile % N !== 0 || c.keyTile % K !== 0 || c.headDim % K !== 0 ||
      c.headDim % N !== 0 || c.keyTile % lpr !== 0 || c.headDim % lpr !== 0 ||
      c.headDim % 8 !== 0) {
    return `D=${c.headDim}, BC=${c.keyTile} do not suit ${M}x${N}x${K} matrices of ${lanes} lanes`;
  }
  if (c.noBarriers && c.kvFrom === 'workgroup') {
    return 'staged K/V tiles need their barriers';
  }
  if (c.halfScores && (c.rung === 0 || c.rung === 3)) {
    return `R${c.rung} has no f16 scores`;
  }
  if (c.rung === 0 && c.keyTile > c.headDim) {
    return `R0 stores its BC=${c.keyTile} columns into rows of D=${c.headDim}`;
  }
  return null;
}

/** A short name of `c`'s rung and tiling, for tables. */
export function skeletonName(c: SkeletonConfig): string {
  const h = c.halfScores ? 'h' : '';
  const rung = c.rung < 2 ? `R${c.rung}${h}` : `R${c.rung}${h} ${c.softmax}`;
  const flags = [
    c.pad ? ', padded' : '', c.reloadQ ? ', Q reloaded' : '', c.naiveLanes ? ', naive lanes' : '',
    c.noBarriers ? ', NO BARRIERS' : ''
  ].join('');
  return `${rung} D=${c.headDim} rows ${c.rowBlocks * c.shape.M}/sg x ${c.subgroups} sg, BC=${
      c.keyTile}, K/V ${c.kvFrom === 'workgroup' ? 'wg' : 'storage'}${flags}`;
}

/**
 * Workgroup barriers per key tile on the real path (both passes of the
 * two-pass softmax), as generated: what each subgroup waits for.
 */
export function skeletonBarriersPerTile(c: SkeletonConfig): number {
  const staged = c.kvFrom === 'workgroup' ? 1 : 0;
  const own = c.noBarriers ? 0 : 1;
  if (c.rung === 0) {
    return 2 * staged;
  }
  // K staged; S stored (before: the array free, where nothing else
  // separates it from the last tile's reads; after: S visible).
  const sStore = (lead: boolean) => staged + (staged === 1 || !lead ? 0 : own) + own;
  // V staged or P written, before P V.
  const pv = staged === 1 ? 1 : c.rung === 1 && c.halfScores ? 0 : own;
  const pass1 = c.rung >= 2 && c.softmax === 'two-pass' ? sStore(true) : 0;
  return sStore(c.halfScores === true) + pv + pass1;
}

/** Matrix multiply-accumulate flops of one call on [H][S][D] (4 S^2 D H is attention's). */
export function skeletonMatrixFlops(c: SkeletonConfig, heads: number, seq: number): number {
  const products = [1, 2, 2, 2][c.rung] + (c.rung >= 2 && c.softmax === 'two-pass' ? 1 : 0);
  return 2 * seq * seq * c.headDim * heads * products * (c.rung === 3 ? 3 : 1);
}

export function skeletonWGSL(c: SkeletonConfig): string {
  const problem = skeletonProblem(c);
  if (problem != null) {
    throw new Error(`attention skeleton: ${problem}`);
  }
  const code = source(c);
  assertWorkgroupAlignment(code, `attention skeleton ${skeletonName(c)}`);
  return code;
}

function source(c: SkeletonConfig): string {
  const {shape, rung} = c;
  const {M, N, K, lanes, standIn} = shape;
  const RB = c.rowBlocks;
  const D = c.headDim;
  const BC = c.keyTile;
  const {scratch: SS, p: PS} = skeletonStrides(c);
  const BR = skeletonRows(c);
  const threads = c.subgroups * lanes;
  const epl = M * N / lanes;
  const lpr = lanes / M;
  const split = rung === 3;
  const parts = split ? ['', 'Lo'] : [''];
  const staged = c.kvFrom === 'workgroup';
  const twoPass = rung >= 2 && c.softmax === 'two-pass';
  const half = c.halfScores === true;
  // A barrier that only orders steps on the subgroup's own rows.
  const ownBarrier = c.noBarriers ? '' : 'workgroupBarrier();';
  const elem = standIn ? 'f32' : 'f16';
  const lim = (n: string) => loopBoundWGSL(shape, n);
  const rbs = range(RB);
  const sBlocks = range(BC / N);
  const oBlocks = range(D / N);
  const dSteps = range(D / K);
  const kSteps = range(BC / K);
  // Split products, small terms first: [left part, right part].
  const pairs = split ? [['Lo', ''], ['', 'Lo'], ['', '']] : [['', '']];
  const partOff = (p: string) => p === 'Lo' ? 'u.loOff + ' : '';

  // Operand views (the stand-in's functions take the offsets as arguments).
  const stor = (arr: string) => `arrayLength(&${arr})`;
  const qView = (p: string, rb: string, kd: string): MatrixView => ({
    arr: 'qIn',
    off: `${partOff(p)}base + (row0 + ${rb} * M) * D + ${kd} * K`,
    stride: 'D',
    colMajor: false,
    len: stor('qIn')
  });
  // K and V tiles, `row` keys into the tile and `col` into the head dim:
  // from their staged workgroup copies or straight from storage.
  const kvView =
      (name: 'k'|'v', p: string, row: string, col: string, colMajor: boolean): MatrixView =>
          staged ?
      {arr: `${name}T${p}`, off: `${row} * D + ${col}`, stride: 'D', colMajor, len: BC * D} :
      {
        arr: `${name}In`,
        off: `${partOff(p)}base + (t + ${row}) * D + ${col}`,
        stride: 'D',
        colMajor,
        len: stor(`${name}In`)
      };
  const kView = (p: string, kd: string, cb: string) =>
      kvView('k', p, `${cb} * N`, `${kd} * K`, true);
  const vView = (p: string, ks: string, cd: string) =>
      kvView('v', p, `${ks} * K`, `${cd} * N`, false);
  const pView = (p: string, rb: string, ks: string): MatrixView => ({
    arr: `p${p}`,
    off: `(g * RB + ${rb}) * M * PS + ${ks} * K`,
    stride: 'PS',
    colMajor: false,
    len: BR * PS
  });
  const leftT = `subgroup_matrix_left<f16, ${K}, ${M}>`;
  const rightT = `subgroup_matrix_right<f16, ${N}, ${K}>`;

  // The stand-in's multiply-accumulate functions, one per pair of arrays.
  const fns = new Map<string, string>();
  const standInMma = (acc: string, l: MatrixView, r: MatrixView) => {
    const fn = `sm_mma_${l.arr}_${r.arr}`;
    if (!fns.has(fn)) {
      fns.set(fn, standInMmaFnWGSL(shape, fn, l, r));
    }
    return `${fn}(&${acc}, ln, ${l.off}, ${r.off});`;
  };
  // The stand-in's row-major stores of an accumulator, per destination.
  const standInStore = (arr: string, stride: string, len: number|string, f16 = false) => {
    const fn = `sm_store_${arr}`;
    if (!fns.has(fn)) {
      const view: MatrixView = {arr, off: 'off', stride, colMajor: false, len};
      fns.set(
          fn,
          `
fn ${fn}(acc: ptr<function, array<f32, ${epl}>>, ln: u32, off: u32) {
  let at = ${standInPlaceWGSL(view, M, N)};
  let ok = ${standInAlignedWGSL(view, M, N, f16 ? 2 : 4)};
  for (var e = 0u; e < ${lim(`${epl}u`)}; e++) {
    let idx = ${standInElementWGSL(shape, 'e', 'ln')};
    ${arr}[${standInIndexWGSL(view, 'at', 'idx / N', 'idx % N')}] = ${
              f16 ? 'sm_h((*acc)[e])' : '(*acc)[e]'} * ok;
  }
}`);
    }
    return fn;
  };
  // Accumulators (f16 ones for half scores; the stand-in accumulates in
  // f32 and rounds when it stores).
  const zeroOf = (f16: boolean) => standIn ? `array<f32, ${epl}>()` :
      f16 ? `subgroup_matrix_result<f16, ${N}, ${M}>(f16(zero))` :
            zeroResultWGSL(shape, 'zero');
  const declAcc = (name: string, f16 = false) => `var ${name} = ${zeroOf(f16)};`;
  const zeroAcc = (name: string, f16 = false) => `${name} = ${zeroOf(f16)};`;
  const storeAcc =
      (acc: string, arr: string, off: string, stride: string, len: number|string, f16 = false) =>
          standIn ? `${standInStore(arr, stride, len, f16)}(&${acc}, ln, ${off});` :
                    matrixStoreWGSL(shape, arr, off, acc, stride);
  const scaleAcc = (acc: string, f: string) => standIn ?
      `for (var e = 0u; e < ${lim(`${epl}u`)}; e++) { ${acc}[e] *= ${f}; }` :
      `${acc} = subgroupMatrixScalarMultiply(${acc}, ${f});`;

  // Q's matrices in registers (the stand-in reads them from storage).
  const qRegs = standIn || c.reloadQ ?
      '' :
      rbs.flatMap(
             rb => dSteps.flatMap(
                 kd => parts.map(
                     p => `let q${rb}_${kd}${p} = ${
                         matrixLoadWGSL(shape, leftT, qView(p, `${rb}u`, `${kd}u`))};`)))
          .join('\n  ');

  // S (+)= Q K^T of key tile t into s{rb}_{cb}.
  const sProducts = () => {
    if (standIn) {
      return `for (var kd = 0u; kd < ${lim('D / K')}; kd++) {
      ${
          rbs.flatMap(
                 rb => sBlocks.flatMap(
                     cb => pairs.map(
                         ([a, b]) => standInMma(
                             `s${rb}_${cb}`, qView(a, `${rb}u`, 'kd'), kView(b, 'kd', `${cb}u`)))))
              .join('\n      ')}
    }`;
    }
    const kParts = split ? ['', 'Lo'] : [''];
    return dSteps
        .flatMap(
            kd => sBlocks.map(
                cb => `{
      ${
                    kParts
                        .map(
                            p => `let kr${p} = ${
                                matrixLoadWGSL(shape, rightT, kView(p, `${kd}u`, `${cb}u`))};`)
                        .join('\n      ')}
      ${
                    rbs.flatMap(
                           rb => pairs.map(
                               ([a, b]) => `s${rb}_${cb} = subgroupMatrixMultiplyAccumulate(${
                                   c.reloadQ ?
                                       matrixLoadWGSL(shape, leftT, qView(a, `${rb}u`, `${kd}u`)) :
                                       `q${rb}_${kd}${a}`}, kr${b}, s${rb}_${cb});`))
                        .join('\n      ')}
    }`)).join('\n    ');
  };

  // O += P V of key tile t into o{rb}_{cd}.
  const pvProducts = () => {
    if (standIn) {
      return `for (var ks = 0u; ks < ${lim('BC / K')}; ks++) {
      ${
          rbs.flatMap(
                 rb => oBlocks.flatMap(
                     cd => pairs.map(
                         ([a, b]) => standInMma(
                             `o${rb}_${cd}`, pView(a, `${rb}u`, 'ks'), vView(b, 'ks', `${cd}u`)))))
              .join('\n      ')}
    }`;
    }
    return kSteps
        .map(
            ks => `{
      ${
                rbs.flatMap(
                       rb => parts.map(
                           p => `let p${rb}${p} = ${
                               matrixLoadWGSL(shape, leftT, pView(p, `${rb}u`, `${ks}u`))};`))
                    .join('\n      ')}
      ${
                oBlocks
                    .map(
                        cd => `{
        ${
                            parts
                                .map(
                                    p => `let vr${p} = ${
                                        matrixLoadWGSL(
                                            shape, rightT, vView(p, `${ks}u`, `${cd}u`))};`)
                                .join('\n        ')}
        ${
                            rbs.flatMap(
                                   rb => pairs.map(
                                       ([a, b]) =>
                                           `o${rb}_${cd} = subgroupMatrixMultiplyAccumulate(p${rb}${
                                               a}, vr${b}, o${rb}_${cd});`))
                                .join('\n        ')}
      }`).join('\n      ')}
    }`).join('\n    ');
  };

  // K or V tile t copied into kT / vT (every part).
  const stage = (src: string, dst: string) =>
      parts
          .map(
              p => standIn ? `for (var e = lid; e < ${lim('BC * D')}; e += THREADS) {
      ${dst}${p}[e] = ${src}[${partOff(p)}base + t * D + e];
    }` :
                             `for (var e = lid; e < BC * D / 4u; e += THREADS) {
      let x = ${src}[(${partOff(p)}base + t * D) / 4u + e];
      ${range(4).map(i => `${dst}${p}[4u * e + ${i}u] = x[${i}];`).join(' ')}
    }`).join('\n    ');

  // Reductions: over the subgroup's lanes, and over a row's LPR lanes.
  const subgroupMax = (x: string) => standIn ? `sm_sg_max(${x}, g, ln)` : `subgroupMax(${x})`;
  const rowMerge = (x: string, op: 'max'|'+') => {
    if (lpr === 1) {
      return '';
    }
    if (standIn) {
      const lanesOfRow = range(lpr).map(i => `red[g * LANES + ln - lc + ${i}u]`);
      const merged =
          op === 'max' ? lanesOfRow.reduce((a, b) => `max(${a}, ${b})`) : lanesOfRow.join(' + ');
      return `workgroupBarrier();
  red[g * LANES + ln] = ${x};
  workgroupBarrier();
  ${x} = ${merged};`;
    }
    return range(Math.log2(lpr))
        .map(i => {
          const other = `subgroupShuffleXor(${x}, ${1 << i}u)`;
          return op === 'max' ? `${x} = max(${x}, ${other});` : `${x} = ${x} + ${other};`;
        })
        .join('\n  ');
  };

  // The lane's part of a row of row block rb in the scratch / P.
  // Column j of a lane's CPL: interleaved with the row's other lanes and
  // rotated by the row, so that the lanes of a step hit distinct banks.
  const ownRow = (rb: number, stride: string) => `((g * RB + ${rb}u) * M + lr) * ${stride}`;
  const col = c.naiveLanes ? 'lc * CPL + j' : 'lc + LPR * ((j + lr) % CPL)';
  const forOwn = (body: (rb: number) => string) =>
      rbs.map(rb => `for (var j = 0u; j < ${lim('CPL')}; j++) {
      let col = ${col};
      let at = ${ownRow(rb, 'SS')} + col;
      let atP = ${ownRow(rb, 'PS')} + col;
      ${body(rb)}
    }`).join('\n    ');
  // A score as f32: from the scratch, or (half scores) from P in place.
  const score = half ? (standIn ? 'p[atP]' : 'f32(p[atP])') : 'scr[at]';

  // S stored (to the scratch, or to P), after a barrier where the array
  // may still be read from the last tile with no barrier since (`lead`):
  // pass 1's reads, or P V's loads of P holding half scores.
  const storeS = (lead: boolean) =>
      [...(staged || !lead ? [] : [ownBarrier]),
       ...rbs.flatMap(
           rb => sBlocks.map(
               cb => half ? storeAcc(
                                `s${rb}_${cb}`, 'p', `(g * RB + ${rb}u) * M * PS + ${cb}u * N`,
                                'PS', BR * PS, true) :
                            storeAcc(
                                `s${rb}_${cb}`, 'scr', `(g * RB + ${rb}u) * M * SS + ${cb}u * N`,
                                'SS', BR * SS))),
       ownBarrier,
  ].join('\n    ');
  const stageK = staged ? `${stage('kIn', 'kT')}
    workgroupBarrier();` :
                          '';
  const stageV = staged ? stage('vIn', 'vT') : '';
  const sDecls = rbs.flatMap(rb => sBlocks.map(cb => declAcc(`s${rb}_${cb}`, half))).join('\n  ');
  const sZero = rbs.flatMap(rb => sBlocks.map(cb => zeroAcc(`s${rb}_${cb}`, half))).join('\n    ');
  const oDecls = rbs.flatMap(rb => oBlocks.map(cd => declAcc(`o${rb}_${cd}`))).join('\n  ');
  const oStore = rbs.flatMap(
                        rb => oBlocks.map(
                            cd => storeAcc(
                                `o${rb}_${cd}`, 'o', `base + (row0 + ${rb}u * M) * D + ${cd}u * N`,
                                'D', stor('o'))))
                     .join('\n  ');
  const writeP = (x: string) =>
      split ? splitStoreWGSL(x, 'p[atP]', 'pLo[atP]') : `p[atP] = sm_h(${x});`;

  let body: string;
  if (rung === 0) {
    body = `${sDecls}
  for (var t = 0u; t < u.seq; t += BC) {
    ${stageK}
    ${sProducts()}
    ${staged ? 'workgroupBarrier();' : ''}
  }
  ${
        rbs.flatMap(
               rb => sBlocks.map(
                   cb => storeAcc(
                       `s${rb}_${cb}`, 'o', `base + (row0 + ${rb}u * M) * D + ${cb}u * N`, 'D',
                       stor('o'))))
            .join('\n  ')}`;
  } else if (rung === 1) {
    body = `${sDecls}
  ${oDecls}
  for (var t = 0u; t < u.seq; t += BC) {
    ${stageK}
    ${sZero}
    ${sProducts()}
    ${storeS(half)}
    ${stageV}
    ${half ? '' : forOwn(() => 'p[atP] = sm_h(scr[at]);')}
    ${
        staged   ? 'workgroupBarrier();' :
            half ? '' :
                   ownBarrier}
    ${pvProducts()}
  }
  ${oStore}`;
  } else {
    // Each lane's row (lr) of every row block and its CPL columns (lc).
    const rowState = rbs.map(rb => `var l${rb} = 0.0;`).join('\n  ');
    let softmax: string;
    let pass1 = '';
    if (twoPass) {
      pass1 = `${rbs.map(rb => `var m${rb} = -1e30;`).join('\n  ')}
  for (var t = 0u; t < u.seq; t += BC) {
    ${stageK}
    ${sZero}
    ${sProducts()}
    ${storeS(true)}
    ${forOwn(rb => `m${rb} = max(m${rb}, ${score} * u.scaleLog2);`)}
  }
  ${rbs.map(rb => rowMerge(`m${rb}`, 'max')).join('\n  ')}`;
      softmax = forOwn(rb => `let e = exp2(${score} * u.scaleLog2 - m${rb});
      l${rb} += e;
      ${writeP('e')}`);
    } else {
      // One running max per subgroup: O's rescale is one scalar per matrix.
      softmax = `var tmax = -1e30;
    ${forOwn(() => `tmax = max(tmax, ${score});`)}
    let mNew = max(mRun, ${subgroupMax('tmax')} * u.scaleLog2);
    if (mNew > mRun) {
      let alpha = exp2(mRun - mNew);
      ${rbs.flatMap(rb => oBlocks.map(cd => scaleAcc(`o${rb}_${cd}`, 'alpha'))).join('\n      ')}
      ${rbs.map(rb => `l${rb} *= alpha;`).join(' ')}
      mRun = mNew;
    }
    ${forOwn(rb => `let e = exp2(${score} * u.scaleLog2 - mRun);
      l${rb} += e;
      ${writeP('e')}`)}`;
    }
    body = `${sDecls}
  ${oDecls}
  ${rowState}
  ${twoPass ? '' : 'var mRun = -1e30;'}
  ${pass1}
  for (var t = 0u; t < u.seq; t += BC) {
    ${stageK}
    ${sZero}
    ${sProducts()}
    ${storeS(half)}
    ${stageV}
    ${softmax}
    ${staged ? 'workgroupBarrier();' : ownBarrier}
    ${pvProducts()}
  }
  ${rbs.map(rb => rowMerge(`l${rb}`, '+')).join('\n  ')}
  // O leaves once, then each lane divides its part of its rows by l.
  ${oStore}
  storageBarrier();
  ${rbs.map(rb => `for (var j = 0u; j < ${lim('D / LPR')}; j++) {
    let at = base + (row0 + ${rb}u * M + lr) * D + lc * (D / LPR) + j;
    o[at] = o[at] / l${rb};
  }`).join('\n  ')}`;
  }

  const kvType = standIn ? 'f32' : staged ? 'vec4<f16>' : 'f16';
  const declare = (arr: string, n: number) =>
      parts.map(p => `var<workgroup> ${arr}${p}: array<${elem}, ${n}>;`).join('\n');
  return `${standIn ? '' : SUBGROUP_MATRIX_HEADER}
struct Uniforms {
  one: f32,
  seq: u32,
  scaleLog2: f32,
  loOff: u32,
}
@group(0) @binding(0) var<storage, read> qIn: array<${elem}>;
@group(0) @binding(1) var<storage, read> kIn: array<${kvType}>;
@group(0) @binding(2) var<storage, read> vIn: array<${kvType}>;
@group(0) @binding(3) var<storage, read_write> o: array<f32>;
@group(0) @binding(4) var<uniform> u: Uniforms;

const M = ${M}u;
const N = ${N}u;
const K = ${K}u;
const LANES = ${lanes}u;
const LPR = ${lpr}u;
const RB = ${RB}u;
const BC = ${BC}u;
const D = ${D}u;
const CPL = ${BC / lpr}u;
const SS = ${SS}u;
const PS = ${PS}u;
const THREADS = ${threads}u;

${rung === 0 || half ? '' : `var<workgroup> scr: array<f32, ${BR * SS}>;`}
${rung === 0 ? '' : declare('p', BR * PS)}
${staged ? declare('kT', BC * D) : ''}
${staged && rung > 0 ? declare('vT', BC * D) : ''}
${standIn ? `var<workgroup> red: array<f32, ${c.subgroups * lanes}>;` : ''}
${standInHelpersWGSL(shape)}
${
      standIn ? `
// Stand-in for subgroupMax: through workgroup memory.
fn sm_sg_max(x: f32, g: u32, ln: u32) -> f32 {
  workgroupBarrier();
  red[g * LANES + ln] = x;
  workgroupBarrier();
  var r = x;
  for (var i = 0u; i < ${lim('LANES')}; i++) {
    r = max(r, red[g * LANES + i]);
  }
  return r;
}` :
                ''}
${[...fns.values()].join('\n')}

@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32${subgroupParamsWGSL(shape)}) {
  ${subgroupIdsWGSL(shape, c.subgroups)}
  let zero = u.one - 1.0;
  let base = wg.y * u.seq * D;
  let row0 = wg.x * ${BR}u + g * RB * M;
  let lr = ln / LPR;
  let lc = ln % LPR;
  ${qRegs}
  ${body}
}`;
}

/**
 * Float64 reference of rung `rung` on q, k, v (the values the kernel sees:
 * hi + lo for R3), [H][S][D] each; R0's output has its BC columns of every
 * row (the rest 0).
 */
export function skeletonReference(
    rung: Rung, q: Float64Array, k: Float64Array, v: Float64Array, heads: number, seq: number,
    d: number, keyTile: number): Float64Array {
  const out = new Float64Array(heads * seq * d);
  const scale = 1 / Math.sqrt(d);
  const s = new Float64Array(seq);
  for (let h = 0; h < heads; h++) {
    const base = h * seq * d;
    for (let i = 0; i < seq; i++) {
      for (let j = 0; j < seq; j++) {
        let dot = 0;
        for (let x = 0; x < d; x++) {
          dot += q[base + i * d + x] * k[base + j * d + x];
        }
        s[j] = dot;
      }
      const row = base + i * d;
      if (rung === 0) {
        for (let j = 0; j < seq; j++) {
          out[row + j % keyTile] += s[j];
        }
        continue;
      }
      let weights = s;
      if (rung >= 2) {
        const m = Math.max(...s);
        weights = s.map(x => Math.exp((x - m) * scale));
        const l = weights.reduce((a, b) => a + b, 0);
        weights = weights.map(w => w / l);
      }
      for (let j = 0; j < seq; j++) {
        for (let x = 0; x < d; x++) {
          out[row + x] += weights[j] * v[base + j * d + x];
        }
      }
    }
  }
  return out;
}

/** max |got - want| / max |want| over the elements `want` sets (R0: its BC columns). */
export function skeletonError(
    rung: Rung, got: ArrayLike<number>, want: Float64Array, d: number, keyTile: number): number {
  let err = 0;
  let top = 0;
  for (let i = 0; i < want.length; i++) {
    if (rung === 0 && i % d >= keyTile) {
      continue;
    }
    err = Math.max(err, Math.abs(got[i] - want[i]));
    top = Math.max(top, Math.abs(want[i]));
  }
  return err / top;
}
