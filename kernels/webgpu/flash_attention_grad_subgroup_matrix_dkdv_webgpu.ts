/**
 * The dK/dV pass of the tensor-core backward with dK and dV in matrix
 * accumulators (the 'accumulated' plan of
 * flash_attention_grad_subgroup_matrix.ts).
 *
 * Why. The first matrix backward (flash_attention_grad_subgroup_matrix_webgpu.ts)
 * stores every product to f32 workgroup memory and adds it up in threads,
 * since each operand tile has its own scale. Here the lse and Delta are
 * known (delta pass), so P = exp(S - lse) needs no rescale and dV += P^T dO,
 * dK += dS^T Q can stay in `subgroup_matrix_result` accumulators over all
 * query blocks, leaving once at the end, like the two-pass forward's O.
 *
 * Tiling. A workgroup owns BC = M * KB * SG keys of one (batch, kv head):
 * subgroup g owns KB blocks of M keys and computes everything for them:
 * S^T = K Q^T and dP^T = V dO^T (its key rows x BR query columns, into the
 * f32 scratch), then, after the elementwise step, dV += P^T dO and
 * dK += dS^T Q (P^T and dS^T read row-major from [BC][BR] f16 arrays).
 * Each matrix part is loaded once per use site (fewer loads per MMA; see
 * docs/tensor_cores.md for what bounds the pass): K's and V's left matrices once
 * per pass where they fit the registers (at most 16), Q^T and dO^T once
 * per (row block, step), P^T and dS^T once per step.
 * Per query block: 4 barriers (Q/dO split, S/dP stored, P/dS split, and
 * the products done before the next block overwrites Q and dO).
 *
 * Scales (docs/tensor_cores.md, "The backward with matrix accumulators"):
 * a read-only pass 0 finds max |q|, |dO| over the rows the workgroup
 * visits and max |k|, |v| of its keys: one power of two per operand per
 * workgroup, so S and dP come out of the f32 scratch at fixed scales. P
 * and dS span orders of magnitude (P ~ 1/S where attention is diffuse);
 * a fixed bound would leave most of them as f16 subnormals. So each
 * subgroup keeps running exponents of its block maxima of P and dS; where
 * a block raises one, that subgroup's dV or dK accumulators are multiplied
 * down by the power of two (subgroupMatrixScalarMultiply: exact), and P,
 * dS are split at the running exponent: every product of an accumulator
 * has one scale.
 *
 * Stand-in (MatrixShape.standIn): the built-ins as plain loops
 * (subgroup_matrix_wgsl.ts), accumulators as per-lane arrays.
 */
import * as tf from '@tensorflow/tfjs-core';

import type {OwnPipelineSpec} from './own_pipeline';
import {MatrixShape, matrixShapeKey} from './subgroup_matrix';
import {assertWorkgroupAlignment, matrixLoadWGSL, matrixStoreWGSL, MatrixOpsWGSL, MatrixView as View, standInAlignedWGSL, standInElementWGSL, standInIndexWGSL, standInPlaceWGSL, subgroupIdsWGSL, subgroupParamsWGSL, zeroResultWGSL} from './subgroup_matrix_wgsl';
import {constsWGSL, featureKey, GradFeatures, gradBindingsWGSL, gradCommonWGSL} from './flash_attention_grad_wgsl';
import {matrixGradInputs} from './flash_attention_grad_subgroup_matrix_webgpu';
import {absMaxWGSL as absMax} from './flash_attention_subgroup_matrix_webgpu';
import {range} from './wgsl_snippets';

/** The accumulated dK/dV pass's tiling. */
export interface MatrixDkdvTiles {
  /** Subgroups per workgroup. */
  subgroups: number;
  /** Blocks of M keys per subgroup (BC = M * keyBlocks * subgroups). */
  keyBlocks: number;
  /** Query rows per block. */
  br: number;
}

export interface MatrixDkdvConfig extends MatrixDkdvTiles {
  headDim: number;
  headDimV: number;
  shape: MatrixShape;
  split: boolean;
}

/** Keys per workgroup. */
export function dkdvKeys(c: MatrixDkdvConfig): number {
  return c.shape.M * c.keyBlocks * c.subgroups;
}

/** Do the products' dims divide into the matrix shape? */
export function matrixDkdvValid(c: MatrixDkdvConfig): boolean {
  const {M, N, K, lanes} = c.shape;
  const div = (a: number, b: number) => a % b === 0;
  // S^T / dP^T (BR in N columns, D and DV in K steps), dV and dK (BR in
  // K steps, D and DV in N columns), the stand-in's result spread, f16
  // rows of BR elements 16-byte aligned.
  return div(c.br, N) && div(c.br, K) && div(c.headDim, K) && div(c.headDimV, K) &&
      div(c.headDim, N) && div(c.headDimV, N) && div(c.headDim, 4) && div(c.headDimV, 4) &&
      div(M * N, lanes) && div(c.br, 8) && div(M, 4) && c.keyBlocks >= 1 && c.subgroups >= 1 &&
      // Pass 0's four maxima per invocation fit the scratch.
      M * c.keyBlocks * c.br >= 4 * lanes;
}

/** Workgroup bytes. */
export function matrixDkdvBytes(c: MatrixDkdvConfig): number {
  const elem = (c.shape.standIn ? 4 : 2) * (c.split ? 2 : 1);
  const bc = dkdvKeys(c);
  const {br} = c;
  const operands = bc * (c.headDim + c.headDimV) + br * (c.headDim + c.headDimV) + 2 * bc * br;
  return elem * operands + 4 * 2 * bc * br +
      (c.shape.standIn ? 4 * c.shape.lanes * c.subgroups : 0);
}

export function matrixDkdvKey(c: MatrixDkdvConfig, f: GradFeatures): string {
  return `fa_grad_sm_acc_dkdv_d${c.headDim}_dv${c.headDimV}_${matrixShapeKey(c.shape)}_g${
      c.subgroups}_kb${c.keyBlocks}_br${c.br}_sp${+ c.split}_${featureKey(f)}`;
}

/**
 * The accumulated dK/dV pass. Inputs as the other backward passes' (q, k,
 * v, dO as vec4 rows, the delta pass's (lse, Delta), slopes); outputs dK,
 * dV.
 */
export class FlashAttentionGradDkdvMatrixProgram implements OwnPipelineSpec {
  readonly key: string;
  readonly numInputs: number;
  readonly numOutputs = 2;
  readonly hasUniforms = true;
  readonly label = 'FlashAttentionGrad dkdv (subgroup matrices, accumulated)';
  private readonly source: string;

  constructor(c: MatrixDkdvConfig, f: GradFeatures) {
    tf.util.assert(
        matrixDkdvValid(c),
        () => `subgroup-matrix dK/dV pass: invalid tiling ${
            JSON.stringify({...c, shape: undefined})} for ${JSON.stringify(c.shape)}`);
    this.key = matrixDkdvKey(c, f);
    const inputs = matrixGradInputs(f);
    this.numInputs = inputs.length;
    const outputs = [{name: 'dk', type: 'f32'}, {name: 'dv', type: 'f32'}];
    this.source = dkdvWGSL(c, f, gradBindingsWGSL(inputs, outputs));
    assertWorkgroupAlignment(this.source, this.label);
  }

  code(): string {
    return this.source;
  }
}

function dkdvWGSL(c: MatrixDkdvConfig, f: GradFeatures, bindings: string): string {
  const {M, N, K, lanes, standIn} = c.shape;
  const {br, subgroups, keyBlocks} = c;
  const bc = dkdvKeys(c);
  const d = c.headDim;
  const dv = c.headDimV;
  const threads = lanes * subgroups;
  const epl = M * N / lanes;
  const mo = new MatrixOpsWGSL(c.shape, c.split, 'u32(min(p.batch, 1))');
  const lim = (n: number|string) => mo.lim(`${n}u`);
  const parts = (arr: string) => mo.parts(arr);
  // Split products (left part, right part): the small terms first.
  const pairs = c.split ? [[1, 0], [0, 1], [0, 0]] : [[0, 0]];
  const lengths: Record<string, number> =
      {kS: bc * d, vS: bc * dv, qS: br * d, oS: br * dv, pT: bc * br, dsT: bc * br};
  const view = (arr: string, off: string, stride: number, colMajor = false): View =>
      ({arr, off, stride: `${stride}u`, colMajor, len: lengths[arr]});
  const part = (v: View, i: number): View => ({...v, arr: parts(v.arr)[i]});
  const keyRow = (kb: string) => `(g * ${keyBlocks}u + ${kb}) * ${M}u`;

  // One product family: `acc(kb, cb)` += sum over ks < steps of
  // left(kb, ks) right(ks, cb), kb < KB, cb < cols. Views take WGSL u32
  // expressions. Real path: kb, cb unrolled (named accumulators), ks a
  // loop; stand-in: loops, accumulators in one per-lane array.
  const standInFns = new Map<string, string>();
  const standInMma = (l: View, r: View, accLen: number) => {
    const name = `sm_mma_${l.arr}_${r.arr}_${+ l.colMajor}${+ r.colMajor}_${accLen}`;
    if (!standInFns.has(name)) {
      const lv = {...l, off: 'offL'};
      const rv = {...r, off: 'offR'};
      standInFns.set(
          name,
          `
fn ${name}(acc: ptr<function, array<f32, ${accLen}>>, base: u32, ln: u32, offL: u32,
    offR: u32) {
  let atL = ${standInPlaceWGSL(lv, M, K)};
  let atR = ${standInPlaceWGSL(rv, K, N)};
  let ok = ${standInAlignedWGSL(lv, M, K, 2)} * ${standInAlignedWGSL(rv, K, N, 2)};
  for (var e = 0u; e < ${lim(epl)}; e++) {
    let idx = ${standInElementWGSL(c.shape, 'e', 'ln')};
    let r = idx / ${N}u;
    let c = idx % ${N}u;
    var sum = (*acc)[base + e];
    for (var k = 0u; k < ${lim(K)}; k++) {
      sum = fma(${l.arr}[${standInIndexWGSL(lv, 'atL', 'r', 'k')}], ${r.arr}[${
              standInIndexWGSL(rv, 'atR', 'k', 'c')}], sum);
    }
    (*acc)[base + e] = sum * ok;
  }
}`);
    }
    return name;
  };
  const standInStore = (arr: string, accLen: number) => {
    const name = `sm_store_${arr}_${accLen}`;
    if (!standInFns.has(name)) {
      const v: View = {arr, off: 'off', stride: `${br}u`, colMajor: false, len: bc * br};
      standInFns.set(name, `
fn ${name}(acc: ptr<function, array<f32, ${accLen}>>, base: u32, ln: u32, off: u32) {
  let at = ${standInPlaceWGSL(v, M, N)};
  let ok = ${standInAlignedWGSL(v, M, N, 4)};
  for (var e = 0u; e < ${lim(epl)}; e++) {
    let idx = ${standInElementWGSL(c.shape, 'e', 'ln')};
    ${arr}[${standInIndexWGSL(v, 'at', 'idx / N', 'idx % N')}] = (*acc)[base + e] * ok;
  }
}`);
    }
    return name;
  };
  const leftType = `subgroup_matrix_left<f16, ${K}, ${M}>`;
  const rightType = `subgroup_matrix_right<f16, ${N}, ${K}>`;

  type ViewAt = (x: string, y: string) => View;
  /**
   * acc(kb, cb) += sum_ks left(kb, ks) right(ks, cb): `accName` names the
   * real path's accumulators, `accArr` the stand-in's array (blocks at
   * (kb * cols + cb) * EPL).
   */
  const accumulate =
      (left: ViewAt, right: ViewAt, steps: number, cols: number,
       accName: (kb: number, cb: number) => string, accArr: string) => {
        if (standIn) {
          const len = keyBlocks * cols * epl;
          return `for (var kb = 0u; kb < ${lim(keyBlocks)}; kb++) {
      for (var cb = 0u; cb < ${lim(cols)}; cb++) {
        for (var ks = 0u; ks < ${lim(steps)}; ks++) {
          ${
              pairs
                  .map(([a, b]) => {
                    const l = part(left('kb', 'ks'), a);
                    const r = part(right('ks', 'cb'), b);
                    return `${standInMma(l, r, len)}(&${accArr}, (kb * ${cols}u + cb) * ${
                        epl}u, ln, ${l.off}, ${r.off});`;
                  })
                  .join('\n          ')}
        }
      }
    }`;
        }
        const nParts = c.split ? 2 : 1;
        return `for (var ks = 0u; ks < ${steps}u; ks++) {
      ${
            range(keyBlocks)
                .flatMap(
                    kb => range(nParts).map(
                        pp => `let l${kb}_${pp} = ${
                            matrixLoadWGSL(c.shape, leftType, part(left(`${kb}u`, 'ks'), pp))};`))
                .join('\n      ')}
      ${
            range(cols)
                .map(
                    cb => `{
        ${
                        range(nParts)
                            .map(
                                pp => `let r${pp} = ${
                                    matrixLoadWGSL(
                                        c.shape, rightType, part(right('ks', `${cb}u`), pp))};`)
                            .join('\n        ')}
        ${
                        range(keyBlocks)
                            .flatMap(
                                kb => pairs.map(
                                    ([a, b]) =>
                                        `${accName(kb, cb)} = subgroupMatrixMultiplyAccumulate(l${
                                            kb}_${a}, r${b}, ${accName(kb, cb)});`))
                            .join('\n        ')}
      }`).join('\n      ')}
    }`;
      };

  // Where K's and V's left matrices stay in registers for the whole pass
  // (real path, at most 16 of them: 64 registers a lane), the prefix of
  // their names, by the scratch their product goes to.
  const heldLeft = new Map<string, string>();
  const leftCount = keyBlocks * (d + dv) / K * (c.split ? 2 : 1);
  if (!standIn && leftCount <= 16) {
    heldLeft.set('sT', 'kl');
    heldLeft.set('dpT', 'vl');
  }

  // S^T = K Q^T into sT and dP^T = V dO^T into dpT (this subgroup's key
  // rows, all BR query columns): fresh accumulators per (kb, qb).
  const transposedScores = (l: ViewAt, r: ViewAt, steps: number, out: string) => {
    const qbs = br / N;
    const outOff = (kb: string, qb: string) => `${keyRow(kb)} * ${br}u + ${qb} * ${N}u`;
    if (standIn) {
      return `for (var kb = 0u; kb < ${lim(keyBlocks)}; kb++) {
      for (var qb = 0u; qb < ${lim(qbs)}; qb++) {
        var acc = array<f32, ${epl}>();
        for (var ks = 0u; ks < ${lim(steps)}; ks++) {
          ${
          pairs
              .map(([a, b]) => {
                const lv = part(l('kb', 'ks'), a);
                const rv = part(r('ks', 'qb'), b);
                return `${standInMma(lv, rv, epl)}(&acc, 0u, ln, ${lv.off}, ${rv.off});`;
              })
              .join('\n          ')}
        }
        ${standInStore(out, epl)}(&acc, 0u, ln, ${outOff('kb', 'qb')});
      }
    }`;
    }
    // Each right part loaded once per (qb, ks), each left part once per
    // (kb, ks): from the registers where K and V live there (`held`).
    const nParts = c.split ? 2 : 1;
    const held = heldLeft.get(out);
    const leftName = (kb: number, ks: number, a: number) =>
        held != null ? `${held}${kb}_${ks}_${a}` : `l${kb}_${a}`;
    return range(qbs)
        .map(
            qb => `{
      ${
                range(keyBlocks)
                    .map(kb => `var acc${kb} = ${zeroResultWGSL(c.shape, 'accZero')};`)
                    .join('\n      ')}
      ${
                range(steps)
                    .map(
                        ks => `{
        ${
                            range(nParts)
                                .map(
                                    b => `let r${b} = ${
                                        matrixLoadWGSL(
                                            c.shape, rightType, part(r(`${ks}u`, `${qb}u`), b))};`)
                                .join('\n        ')}
        ${
                            range(keyBlocks)
                                .flatMap(
                                    kb =>
                                        [...(held != null ?
                                                 [] :
                                                 range(nParts).map(
                                                     a => `let l${kb}_${a} = ${
                                                         matrixLoadWGSL(
                                                             c.shape, leftType,
                                                             part(l(`${kb}u`, `${ks}u`), a))};`)),
                                         ...pairs.map(
                                             ([a, b]) =>
                                                 `acc${kb} = subgroupMatrixMultiplyAccumulate(${
                                                     leftName(kb, ks, a)}, r${b}, acc${kb});`)])
                                .join('\n        ')}
      }`).join('\n      ')}
      ${
                range(keyBlocks)
                    .map(
                        kb => matrixStoreWGSL(
                            c.shape, out, outOff(`${kb}u`, `${qb}u`), `acc${kb}`, `${br}u`))
                    .join('\n      ')}
    }`).join('\n    ');
  };

  // Views. K and V rows [BC][W] row-major are S^T's and dP^T's left
  // operands; Q and dO [BR][W] read column-major are their right operands
  // (Q^T, dO^T), read row-major the right operands of dK and dV; P^T and
  // dS^T ([BC][BR] row-major) the left ones.
  const kLeft: ViewAt = (kb, ks) => view('kS', `${keyRow(kb)} * ${d}u + ${ks} * ${K}u`, d);
  const vLeft: ViewAt = (kb, ks) => view('vS', `${keyRow(kb)} * ${dv}u + ${ks} * ${K}u`, dv);
  const qT: ViewAt = (ks, qb) => view('qS', `${qb} * ${N * d}u + ${ks} * ${K}u`, d, true);
  const oT: ViewAt = (ks, qb) => view('oS', `${qb} * ${N * dv}u + ${ks} * ${K}u`, dv, true);
  const pLeft: ViewAt = (kb, ks) => view('pT', `${keyRow(kb)} * ${br}u + ${ks} * ${K}u`, br);
  const dsLeft: ViewAt = (kb, ks) => view('dsT', `${keyRow(kb)} * ${br}u + ${ks} * ${K}u`, br);
  const qRight: ViewAt = (ks, cb) => view('qS', `${ks} * ${K * d}u + ${cb} * ${N}u`, d);
  const oRight: ViewAt = (ks, cb) => view('oS', `${ks} * ${K * dv}u + ${cb} * ${N}u`, dv);

  const dkName = (kb: number, cb: number) => `dk${kb}_${cb}`;
  const dvName = (kb: number, cb: number) => `dv${kb}_${cb}`;
  const accDecls = standIn ?
      `var dkAcc = array<f32, ${keyBlocks * (d / N) * epl}>();
  var dvAcc = array<f32, ${keyBlocks * (dv / N) * epl}>();` :
      range(keyBlocks)
          .flatMap(
              kb =>
                  [...range(d / N).map(cb => dkName(kb, cb)),
                   ...range(dv / N).map(cb => dvName(kb, cb))])
          .map(name => `var ${name} = ${zeroResultWGSL(c.shape, 'accZero')};`)
          .join('\n  ');

  // Rows of a query-side [B, S, H, W] input (q, dy) of head h, or a
  // key-side one (k, v) of kv head hk, as vec4 index.
  const qRow = (i: string) => `u32((b * p.seqQ + ${i}) * p.heads + h)`;
  const kRow = (j: string) => `u32((b * p.seqK + ${j}) * p.headsKV + hk)`;

  // K and V rows into registers (with their max |x|), split after pass 0.
  const nK = Math.ceil(bc * d / 4 / threads);
  const nV = Math.ceil(bc * dv / 4 / threads);
  const keyFetch = (src: string, reg: string, w4: number, n: number, mx: string) => `
  var ${reg}: array<vec4<f32>, ${n}>;
  for (var u = 0u; u < ${lim(n)}; u++) {
    let e = lid + u * T;
    let j = j0 + i32(e / ${w4}u);
    var val = vec4<f32>(0.0);
    if (e < ${bc * w4}u && j < p.seqK) {
      val = ${src}[${kRow('j')} * ${w4}u + e % ${w4}u];
    }
    ${reg}[u] = val;
    ${mx} = max(${mx}, ${absMax('val')});
  }`;
  const splitVec = (arr: string, at: string, v: string, scale: string) =>
      range(4)
          .map(x => mo.splitStore(arr, `${at} + ${x}u`, `${v}.${'xyzw'[x]} * ${scale}`))
          .join('\n      ');
  const keyStash = (arr: string, reg: string, w4: number, n: number, scale: string) => `
  for (var u = 0u; u < ${lim(n)}; u++) {
    let e = lid + u * T;
    if (e < ${bc * w4}u) {
      ${splitVec(arr, '4u * e', `${reg}[u]`, scale)}
    }
  }`;
  // Pass 0's scan of a query-side input over the visited rows.
  const rowScan = (src: string, w4: number, mx: string) => `
    for (var e = lid; e < u32(nRows) * ${w4}u; e += T) {
      let x = ${src}[${qRow(`iLo + i32(e / ${w4}u)`)} * ${w4}u + e % ${w4}u];
      ${mx} = max(${mx}, ${absMax('x')});
    }`;
  // Q and dO rows of the block into registers (before the barrier), then
  // split (after it). Rows outside [iLo, iHi) are zero: their scale may
  // exceed the workgroup's, and 0 * inf would poison dK.
  const nQ = Math.ceil(br * d / 4 / threads);
  const nO = Math.ceil(br * dv / 4 / threads);
  const rowFetch = (src: string, reg: string, w4: number, n: number) => `
    var ${reg}: array<vec4<f32>, ${n}>;
    for (var u = 0u; u < ${lim(n)}; u++) {
      let e = lid + u * T;
      let i = i0 + i32(e / ${w4}u);
      var val = vec4<f32>(0.0);
      if (e < ${br * w4}u && i < iHi) {
        val = ${src}[${qRow('i')} * ${w4}u + e % ${w4}u];
      }
      ${reg}[u] = val;
    }`;
  const rowStash = (arr: string, reg: string, w4: number, n: number, scale: string) => `
    for (var u = 0u; u < ${lim(n)}; u++) {
      let e = lid + u * T;
      if (e < ${br * w4}u) {
        ${splitVec(arr, '4u * e', `${reg}[u]`, scale)}
      }
    }`;

  // The elementwise step, each subgroup on its own key rows (all BR query
  // rows): per (query row, key quad), P * keep and dS from S^T and dP^T,
  // written back in place (f32); then their block maxima over the
  // subgroup, the running exponents pExp / dsExp raised where exceeded
  // (the accumulators multiplied down to match), and P, dS split at those
  // exponents into pT and dsT. Each lane reads back only what it wrote.
  const exponent = (x: string) => `clamp(frexp(${x}).exp, -100, 100)`;
  const quads = keyBlocks * M / 4;
  const perLane = Math.ceil(br * quads / lanes);
  const ownItems = (body: string) => `for (var u = 0u; u < ${lim(perLane)}; u++) {
      let item = ln + u * ${lanes}u;
      if (item < ${br * quads}u) {
        let il = item % BR;
        let jq = g * ${quads}u + item / BR;
        ${body}
      }
    }`;
  const subgroupMax = (x: string, name: string) => standIn ? `red[g * ${lanes}u + ln] = ${x};
    workgroupBarrier();
    var ${name} = 0.0;
    for (var x = 0u; x < ${lim(lanes)}; x++) {
      ${name} = max(${name}, red[g * ${lanes}u + x]);
    }
    workgroupBarrier();` :
                                                             `let ${name} = subgroupMax(${x});`;
  // acc *= f for every accumulator of a family.
  const rescale =
      (arr: string, cols: number, name: (kb: number, cb: number) => string, f: string) => standIn ?
      `for (var e = 0u; e < ${lim(keyBlocks * cols * epl)}; e++) { ${arr}[e] *= ${f}; }` :
      range(keyBlocks)
          .flatMap(kb => range(cols).map(cb => name(kb, cb)))
          .map(n => `${n} = subgroupMatrixScalarMultiply(${n}, ${f});`)
          .join('\n    ');
  const elementwise = `var pmax = 0.0;
    var dsmax = 0.0;
    ${ownItems(`let i = i0 + i32(il);
        let jb = j0 + i32(4u * jq);
        ${f.dropout ? 'let keep = gradKeep4(b, h, i, jb);' : 'let keep = vec4<f32>(1.0);'}
        // The row's (lse, Delta) from the delta pass.
        var st = vec2<f32>(0.0);
        if (i < iHi) {
          st = stats[(b * p.heads + h) * p.seqQ + i];
        }
        for (var x = 0u; x < 4u; x++) {
          let at = (4u * jq + x) * BR + il;
          let j = jb + i32(x);
          var pv = 0.0;
          var dsv = 0.0;
          if (i < iHi && fa_visible(i, j, sp)) {
            let sc = gradScore(sT[at] * sUnscale, i, j, sp);
            let prob = exp(sc.x - st.x);
            pv = prob * keep[x];
            dsv = prob * (dpT[at] * dpUnscale * keep[x] - st.y) * sc.y * p.scale;
          }
          sT[at] = pv;
          dpT[at] = dsv;
          pmax = max(pmax, abs(pv));
          dsmax = max(dsmax, abs(dsv));
        }`)}
    ${subgroupMax('pmax', 'pBlock')}
    ${subgroupMax('dsmax', 'dsBlock')}
    // A block of zeros (all masked) leaves the exponents as they are.
    let pNew = max(pExp, select(-1000, ${exponent('pBlock')}, pBlock > 0.0));
    let dsNew = max(dsExp, select(-1000, ${exponent('dsBlock')}, dsBlock > 0.0));
    let pDown = ldexp(1.0, max(pExp - pNew, -126));
    let dsDown = ldexp(1.0, max(dsExp - dsNew, -126));
    ${rescale('dvAcc', dv / N, dvName, 'pDown')}
    ${rescale('dkAcc', d / N, dkName, 'dsDown')}
    pExp = pNew;
    dsExp = dsNew;
    let pScale = ldexp(1.0, -clamp(pExp, -126, 126));
    let dsScale = ldexp(1.0, -clamp(dsExp, -126, 126));
    ${ownItems(`for (var x = 0u; x < 4u; x++) {
          let at = (4u * jq + x) * BR + il;
          ${mo.splitStore('pT', 'at', 'sT[at] * pScale')}
          ${mo.splitStore('dsT', 'at', 'dpT[at] * dsScale')}
        }`)}`;

  // dK and dV out through the scratch, N columns at a time (dK in sT, dV
  // in dpT), their scales undone.
  const chunks = Math.max(d, dv) / N;
  const outChunk = (cb: number) => {
    const targets: Array<[string, string, number, (kb: number, cb: number) => string]> = [];
    if (cb < d / N) {
      targets.push(['sT', 'dkAcc', d, dkName]);
    }
    if (cb < dv / N) {
      targets.push(['dpT', 'dvAcc', dv, dvName]);
    }
    const stores = targets.map(
        ([scr, arr, w, name]) => standIn ?
            `for (var kb = 0u; kb < ${lim(keyBlocks)}; kb++) {
    ${standInStore(scr, keyBlocks * (w / N) * epl)}(&${arr}, (kb * ${w / N}u + ${cb}u) * ${
                epl}u, ln, ${keyRow('kb')} * BR);
  }` :
            range(keyBlocks)
                .map(
                    kb => matrixStoreWGSL(
                        c.shape, scr, `${keyRow(`${kb}u`)} * BR`, name(kb, cb), `${br}u`))
                .join('\n  '));
    const writes = targets.map(([scr, , w]) => {
      const out = scr === 'sT' ? 'dk' : 'dv';
      return `for (var e = lid; e < ${lim(bc * N)}; e += T) {
    let j = j0 + i32(e / ${N}u);
    if (j < p.seqK) {
      ${out}[${kRow('j')} * ${w}u + ${cb * N}u + e % ${N}u] = ${scr}[(e / ${N}u) * BR + e % ${N}u];
    }
  }`;
    });
    return `workgroupBarrier();
  ${stores.join('\n  ')}
  workgroupBarrier();
  ${writes.join('\n  ')}`;
  };


  // K's and V's left matrices into registers once (see heldLeft).
  const heldLoads = heldLeft.size === 0 ?
      '' :
      `workgroupBarrier();
  ${
              [['kl', kLeft, d], ['vl', vLeft, dv]]
                  .flatMap(
                      ([prefix, at, w]) => range(keyBlocks).flatMap(
                          kb =>
                              range((w as number) / K)
                                  .flatMap(
                                      ks => range(c.split ? 2 : 1)
                                                .map(
                                                    a => `let ${prefix}${kb}_${ks}_${a} = ${
                                                        matrixLoadWGSL(
                                                            c.shape, leftType,
                                                            part(
                                                                (at as ViewAt)(`${kb}u`, `${ks}u`),
                                                                a))};`))))
                  .join('\n  ')}`;

  const code = `${mo.enables()}
${bindings}
${gradCommonWGSL(f)}
${constsWGSL({
    BR: br,
    BC: bc,
    T: threads,
    SG: subgroups
  })}
const M = ${M}u;
const N = ${N}u;

// f16 parts: K [BC][D], V [BC][DV], Q [BR][D], dO [BR][DV] (row-major),
// P^T and dS^T [BC][BR].
${mo.declare('kS', bc * d)}
${mo.declare('vS', bc * dv)}
${mo.declare('qS', br * d)}
${mo.declare('oS', br * dv)}
${mo.declare('pT', bc * br)}
${mo.declare('dsT', bc * br)}
// S^T and dP^T in f32 ([BC][BR]), at the end chunks of dK and dV.
var<workgroup> sT: array<f32, ${bc * br}>;
var<workgroup> dpT: array<f32, ${bc * br}>;
${
      standIn ? `// The stand-in's subgroup maxima.
var<workgroup> red: array<f32, ${threads}>;` :
                ''}

${mo.helpers()}
__STANDIN_FNS__

@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32${subgroupParamsWGSL(c.shape)}) {
  ${subgroupIdsWGSL(c.shape, subgroups)}
  ${
      standIn ?
          '' :
          '// Accumulators start from this (see zeroResultWGSL).\n  let accZero = f32(min(p.batch, 1)) - 1.0;'}
  let j0 = i32(wg.x) * BC;
  let b = i32(wg.y) / p.headsKV;
  let hk = i32(wg.y) % p.headsKV;
  let groups = p.heads / p.headsKV;
  // Query rows that can see some key of the workgroup (any head of the group).
  let rows = fa_query_range(j0, j0 + BC, gradScoreParams(b, hk * groups));
  let iLo = rows.x;
  let iHi = rows.y;
  let nRows = max(iHi - iLo, 0);
  let nBlocks = (nRows + BR - 1) / BR;

  // Pass 0 (reads only): the maxima that fix every operand's scale.
  var kmax = 0.0;
  var vmax = 0.0;
  ${keyFetch('k', 'kReg', d / 4, nK, 'kmax')}
  ${keyFetch('v', 'vReg', dv / 4, nV, 'vmax')}
  var qmax = 0.0;
  var omax = 0.0;
  for (var hh = 0; hh < groups; hh++) {
    let h = hk * groups + hh;
    ${rowScan('q', d / 4, 'qmax')}
    ${rowScan('dy', dv / 4, 'omax')}
  }
  // Every invocation's maxima through the scratch (free until the first
  // block's products), read back by all: no atomics, a fixed order.
  var mine = array<f32, 4>(qmax, omax, kmax, vmax);
  for (var x = 0u; x < 4u; x++) {
    sT[lid * 4u + x] = mine[x];
  }
  workgroupBarrier();
  var all = array<f32, 4>();
  for (var u = 0u; u < ${lim(threads)}; u++) {
    for (var x = 0u; x < 4u; x++) {
      all[x] = max(all[x], sT[u * 4u + x]);
    }
  }
  let qmaxAll = all[0];
  let omaxAll = all[1];
  let kmaxAll = all[2];
  let vmaxAll = all[3];
  // Powers of two taking each operand's max |x| into [0.5, 1).
  let qe = ${exponent('qmaxAll')};
  let oe = ${exponent('omaxAll')};
  let ke = ${exponent('kmaxAll')};
  let ve = ${exponent('vmaxAll')};
  let qScale = ldexp(1.0, -qe);
  let oScale = ldexp(1.0, -oe);
  let sUnscale = ldexp(1.0, qe + ke);
  let dpUnscale = ldexp(1.0, oe + ve);
  // This subgroup's running exponents of P and dS (see the elementwise step).
  var pExp = -1000;
  var dsExp = -1000;
  ${keyStash('kS', 'kReg', d / 4, nK, 'ldexp(1.0, -ke)')}
  ${keyStash('vS', 'vReg', dv / 4, nV, 'ldexp(1.0, -ve)')}
  ${heldLoads}

  ${accDecls}
  let steps = groups * nBlocks;
  for (var step = 0; step < steps; step++) {
    let h = hk * groups + step / nBlocks;
    let i0 = iLo + (step % nBlocks) * BR;
    let sp = gradScoreParams(b, h);
    ${rowFetch('q', 'qReg', d / 4, nQ)}
    ${rowFetch('dy', 'oReg', dv / 4, nO)}
    // The previous block's products are done with Q, dO, P and dS.
    workgroupBarrier();
    ${rowStash('qS', 'qReg', d / 4, nQ, 'qScale')}
    ${rowStash('oS', 'oReg', dv / 4, nO, 'oScale')}
    workgroupBarrier();
    ${transposedScores(kLeft, qT, d / K, 'sT')}
    ${transposedScores(vLeft, oT, dv / K, 'dpT')}
    workgroupBarrier();
    ${elementwise}
    workgroupBarrier();
    ${accumulate(pLeft, oRight, br / K, dv / N, dvName, 'dvAcc')}
    ${accumulate(dsLeft, qRight, br / K, d / N, dkName, 'dkAcc')}
  }

  // Each subgroup's scales undone on its accumulators, then out.
  let dkUnscale = ldexp(1.0, clamp(dsExp + qe, -126, 126));
  let dvUnscale = ldexp(1.0, clamp(pExp + oe, -126, 126));
  ${rescale('dkAcc', d / N, dkName, 'dkUnscale')}
  ${rescale('dvAcc', dv / N, dvName, 'dvUnscale')}
  ${range(chunks).map(outChunk).join('\n  ')}
}
`;
  return code.replace('__STANDIN_FNS__', [...standInFns.values()].join('\n'));
}
