/**
 * The FlashAttention backward's dK/dV and dQ passes on subgroup matrices
 * (tensor cores from WGSL), after the SIMT delta pass
 * (flash_attention_grad_delta_webgpu.ts). The passes have the SIMT
 * passes' structure (flash_attention_grad_dkdv_webgpu.ts,
 * flash_attention_grad_dq_webgpu.ts) and share their WGSL: the uniform
 * block, scores, masks, dropout and the dS step (flash_attention_grad_wgsl.ts).
 * The five products are matrix products into float32 workgroup memory:
 *   dK/dV pass (BC keys of a kv head; steps over the group's heads and
 *   blocks of BR rows):  S = Q K^T, dP = dO V^T, dV += P^T dO, dK += dS^T Q
 *   dQ pass (BR rows of a head; steps over blocks of BC keys):
 *                        S = Q K^T, dP = dO V^T, dQ += dS K
 * Accumulators live in registers (each thread a strided share of the
 * block), summed in a fixed order: deterministic, no atomics on data.
 *
 * Precision as in the forward (flash_attention_subgroup_matrix_webgpu.ts):
 * every operand tile (Q, dO, K, V, P, dS) is scaled by a power of two from
 * its max |x| (workgroup atomics on the float bits), split into hi/lo f16
 * parts (or only hi for precision 'float16'), and each product is unscaled
 * in f32.
 */
import * as tf from '@tensorflow/tfjs-core';

import type {OwnPipelineSpec, StorageBinding} from './own_pipeline';
import {MatrixShape, matrixShapeKey} from './subgroup_matrix';
import {assertWorkgroupAlignment, MatrixOpsWGSL, MatrixView, subgroupIdsWGSL, subgroupParamsWGSL} from './subgroup_matrix_wgsl';
import {absMaxWGSL as absMax} from './flash_attention_subgroup_matrix_webgpu';
import {constsWGSL, dqBlockWGSL, featureKey, GradFeatures, gradBindingsWGSL, gradCommonWGSL, probsAndDsWGSL, sPhase, sPhaseValid, sPhaseWGSL} from './flash_attention_grad_wgsl';

export type MatrixGradPass = 'dkdv'|'dq';

/** A backward tiling (both passes use the same one). */
export interface MatrixGradTiles {
  /** Subgroups per workgroup. */
  subgroups: number;
  /** Query rows per block. */
  br: number;
  /** Keys per block. */
  bc: number;
}

export interface MatrixGradConfig extends MatrixGradTiles {
  headDim: number;
  headDimV: number;
  shape: MatrixShape;
  split: boolean;
}

/** Are all products' dims multiples of the matrix shape, and the dS step even? */
export function matrixGradValid(c: MatrixGradConfig): boolean {
  const {M, N, K, lanes} = c.shape;
  const d = c.headDim;
  const dv = c.headDimV;
  const div = (a: number, b: number) => a % b === 0;
  // S and dP; dV and dK; dQ; the stand-in's spread of a result over lanes.
  return div(d, 4) && div(dv, 4) && div(c.br, M) && div(c.bc, N) && div(d, K) && div(dv, K) &&
      div(c.bc, M) && div(dv, N) && div(d, N) && div(c.br, K) && div(c.bc, K) &&
      div(M * N, lanes) && sPhaseValid(c.bc, c.br, lanes * c.subgroups);
}

/** Workgroup bytes of a pass. */
export function matrixGradBytes(c: MatrixGradConfig, pass: MatrixGradPass): number {
  const elem = (c.shape.standIn ? 4 : 2) * (c.split ? 2 : 1);
  const {br, bc} = c;
  const d = c.headDim;
  const dv = c.headDimV;
  const operands = br * (d + dv) + bc * (d + dv) + br * bc;
  const out = pass === 'dkdv' ? bc * Math.max(d, dv) : br * d;
  return elem * operands + 4 * (2 * br * bc + out + 2 * br) + 4 * 8;
}

export function matrixGradKey(c: MatrixGradConfig, pass: MatrixGradPass, f: GradFeatures): string {
  return `fa_grad_sm_${pass}_d${c.headDim}_dv${c.headDimV}_${matrixShapeKey(c.shape)}_g${
      c.subgroups}_br${c.br}_bc${c.bc}_sp${+ c.split}_${featureKey(f)}`;
}

/**
 * The inputs of every subgroup-matrix backward pass, in binding order: q,
 * k, v, dO as vec4 rows, the delta pass's (lse, Delta), the slopes.
 */
export function matrixGradInputs(f: GradFeatures): StorageBinding[] {
  return [
    {name: 'q', type: 'vec4<f32>'},
    {name: 'k', type: 'vec4<f32>'},
    {name: 'v', type: 'vec4<f32>'},
    {name: 'dy', type: 'vec4<f32>'},
    {name: 'stats', type: 'vec2<f32>'},
    ...(f.alibi ? [{name: 'slopes', type: 'f32'}] : []),
  ];
}

/** An operand tile: `rows` rows of one head of a [B, S, H, W] input. */
interface OperandTile {
  /** The input binding, the thread's registers, the workgroup f16 parts. */
  src: string;
  reg: string;
  arr: string;
  /** W / 4. */
  w4: number;
  rows: number;
  /** WGSL: the input's sequence length and heads, the first row, the head. */
  seq: string;
  heads: string;
  row0: string;
  head: string;
  /** WGSL name of the tile's scale exponent (x is stored as x 2^-e). */
  e: string;
  /** Its max |x| slot in wmax. */
  slot: number;
}

/**
 * One pass of the subgroup-matrix backward. Inputs as the SIMT passes'
 * (q, k, v, dO as vec4 rows, the delta pass's (lse, Delta), slopes).
 */
export class FlashAttentionGradMatrixProgram implements OwnPipelineSpec {
  readonly key: string;
  readonly numInputs: number;
  readonly numOutputs: number;
  readonly hasUniforms = true;
  readonly label: string;
  private readonly source: string;

  constructor(c: MatrixGradConfig, pass: MatrixGradPass, f: GradFeatures) {
    tf.util.assert(
        matrixGradValid(c),
        () => `subgroup-matrix backward: invalid tiling ${
            JSON.stringify({...c, shape: undefined})} for ${JSON.stringify(c.shape)}`);
    this.key = matrixGradKey(c, pass, f);
    this.label = `FlashAttentionGrad ${pass} (subgroup matrices)`;
    const inputs = matrixGradInputs(f);
    const outputs = pass === 'dkdv' ? [{name: 'dk', type: 'f32'}, {name: 'dv', type: 'f32'}] :
                                      [{name: 'dq', type: 'f32'}];
    this.numInputs = inputs.length;
    this.numOutputs = outputs.length;
    this.source = gradMatrixWGSL(c, pass, f, gradBindingsWGSL(inputs, outputs));
  }

  code(): string {
    return this.source;
  }
}

function gradMatrixWGSL(
    c: MatrixGradConfig, pass: MatrixGradPass, f: GradFeatures, bindings: string): string {
  const {br, bc, subgroups} = c;
  const d = c.headDim;
  const dv = c.headDimV;
  const threads = c.shape.lanes * subgroups;
  const s = sPhase(bc, br, threads);
  // A runtime 1 (batch >= 1 whenever a workgroup runs): see MatrixOpsWGSL.
  const mo = new MatrixOpsWGSL(c.shape, c.split, 'u32(min(p.batch, 1))');
  const lim = (n: string) => mo.lim(n);

  // The operand tiles: Q and dO rows of query block i0 of head h, K and V
  // rows of key block j0 of kv head hk.
  const queryRows = {rows: br, seq: 'p.seqQ', heads: 'p.heads', row0: 'i0', head: 'h'};
  const keyRows = {rows: bc, seq: 'p.seqK', heads: 'p.headsKV', row0: 'j0', head: 'hk'};
  // Slots of wmax: one per operand tile, P and dS (the dQ pass has no P).
  const slot = pass === 'dkdv' ? {q: 0, o: 1, p: 2, ds: 3, k: 4, v: 5} :
                                 {q: 0, o: 1, p: -1, ds: 4, k: 2, v: 3};
  const tile =
      (at: typeof queryRows, src: string, reg: string, arr: string, w: number, e: string,
       maxSlot: number): OperandTile => ({...at, src, reg, arr, w4: w / 4, e, slot: maxSlot});
  // WGSL: the index of row i of the tile's head, in rows of the input.
  const rowIndex = (t: OperandTile) => `u32((b * ${t.seq} + i) * ${t.heads} + ${t.head})`;
  const qTile = tile(queryRows, 'q', 'qReg', 'qS', d, 'qe', slot.q);
  const oTile = tile(queryRows, 'dy', 'oReg', 'oS', dv, 'oe', slot.o);
  const kTile = tile(keyRows, 'k', 'kReg', 'kS', d, 'ke', slot.k);
  const vTile = tile(keyRows, 'v', 'vReg', 'vS', dv, 've', slot.v);

  // The tile's rows into its registers, their max |x| into its slot.
  const fetch = (t: OperandTile) => {
    const n = Math.ceil(t.rows * t.w4 / threads);
    return `var ${t.reg}: array<vec4<f32>, ${n}>;
    {
      var mx = 0.0;
      for (var u = 0u; u < ${lim(`${n}u`)}; u++) {
        let e = lid + u * T;
        let i = ${t.row0} + i32(e / ${t.w4}u);
        var val = vec4<f32>(0.0);
        if (e < ${t.rows * t.w4}u && i < ${t.seq}) {
          val = ${t.src}[${rowIndex(t)} * ${t.w4}u + e % ${t.w4}u];
        }
        ${t.reg}[u] = val;
        mx = max(mx, ${absMax('val')});
      }
      atomicMax(&wmax[${t.slot}], bitcast<u32>(mx));
    }`;
  };
  // After a barrier: the registers, scaled by 2^-e, split into the tile's
  // `arr` ([rows][W], row-major).
  const stash = (t: OperandTile) => {
    const n = Math.ceil(t.rows * t.w4 / threads);
    return `for (var u = 0u; u < ${lim(`${n}u`)}; u++) {
      let e = lid + u * T;
      if (e < ${t.rows * t.w4}u) {
        let xs = ${t.reg}[u] * ldexp(1.0, -${t.e});
        ${
            ['x', 'y', 'z', 'w']
                .map((comp, i) => mo.splitStore(t.arr, `4u * e + ${i}u`, `xs.${comp}`))
                .join('\n        ')}
      }
    }`;
  };
  // Float32 scratch `scr` ([BR][BC]) scaled by 2^-e, split into `arr`.
  const stashScratch = (scr: string, arr: string, e: string) =>
      `for (var u = 0u; u < ${lim(`${Math.ceil(br * bc / threads)}u`)}; u++) {
      let e = lid + u * T;
      if (e < BR * BC) {
        ${mo.splitStore(arr, 'e', `${scr}[e] * ldexp(1.0, -${e})`)}
      }
    }`;
  // acc (registers) += scrO[0 .. n) * 2^e, n = rows * w.
  const accumulate = (acc: string, n: number, e: string) =>
      `for (var u = 0u; u < ${lim(`${Math.ceil(n / threads)}u`)}; u++) {
      let e = lid + u * T;
      if (e < ${n}u) { ${acc}[u] += scrO[e] * ldexp(1.0, ${e}); }
    }`;
  const accDecl = (acc: string, n: number) => `var ${acc}: array<f32, ${Math.ceil(n / threads)}>;
  for (var u = 0u; u < ${lim(`${Math.ceil(n / threads)}u`)}; u++) { ${acc}[u] = 0.0; }`;
  // Stores acc ([rows][w] elements of the block) to the rows of `out`
  // ([B, S, H, w]) that tile `t` covers.
  const storeAcc = (acc: string, out: string, t: OperandTile) => {
    const w = 4 * t.w4;
    return `for (var u = 0u; u < ${lim(`${Math.ceil(t.rows * w / threads)}u`)}; u++) {
    let e = lid + u * T;
    let i = ${t.row0} + i32(e / ${w}u);
    if (e < ${t.rows * w}u && i < ${t.seq}) {
      ${out}[${rowIndex(t)} * ${w}u + e % ${w}u] = ${acc}[u];
    }
  }`;
  };
  const rowStats = `for (var r = lid; r < BR; r += T) {
      let i = i0 + i32(r);
      var st = vec2<f32>(0.0);
      if (i < p.seqQ) { st = stats[(b * p.heads + h) * p.seqQ + i]; }
      lseS[r] = st.x;
      deltaS[r] = st.y;
    }`;
  const exponent = (slot: number) =>
      `clamp(frexp(bitcast<f32>(atomicLoad(&wmax[${slot}]))).exp, -60, 60)`;
  const reset = (...slots: number[]) => slots.length === 0 ?
      '' :
      `if (g == 0u) { ${slots.map(i => `atomicStore(&wmax[${i}], 0u);`).join(' ')} }`;
  // Tiles a and b (registers, then after a barrier their exponents and f16
  // parts); `beforeBarrier` is WGSL to run while their loads are in flight.
  const loadTiles = (a: OperandTile, b: OperandTile, beforeBarrier = '') => `${fetch(a)}
    ${fetch(b)}
    ${beforeBarrier}
    workgroupBarrier();
    let ${a.e} = ${exponent(a.slot)};
    let ${b.e} = ${exponent(b.slot)};
    ${stash(a)}
    ${stash(b)}`;

  // Operand arrays' lengths (the stand-in checks bounds as the built-ins do).
  const lengths:
      Record<string, number> = {qS: br * d, oS: br * dv, kS: bc * d, vS: bc * dv, mS: br * bc};
  const rowMajor = (arr: string, off: string, stride: number): MatrixView =>
      ({arr, off, stride: `${stride}u`, colMajor: false, len: lengths[arr]});
  const colMajor = (arr: string, off: string, stride: number): MatrixView =>
      ({arr, off, stride: `${stride}u`, colMajor: true, len: lengths[arr]});
  const outElems = pass === 'dkdv' ? bc * Math.max(d, dv) : br * d;
  const {M, N, K} = c.shape;
  // S = Q K^T and dP = dO V^T (K, V row-major [BC][W] read as K^T).
  const scoresAndDp = () => `${
      mo.product(
          br, bc, d, rowMajor('qS', `rb * ${M * d}u + ks * ${K}u`, d),
          colMajor('kS', `cb * ${N * d}u + ks * ${K}u`, d), 'scrS', bc, br * bc)}
    ${
      mo.product(
          br, bc, dv, rowMajor('oS', `rb * ${M * dv}u + ks * ${K}u`, dv),
          colMajor('vS', `cb * ${N * dv}u + ks * ${K}u`, dv), 'scrP', bc, br * bc)}`;
  // The SIMT passes' dS step on the thread's MR rows x key quad, reading S
  // and dP from the scratch; P * keep and dS go back in their place.
  const probsAndDs = (withP: boolean, sUnscale: string, dpUnscale: string) => `{
      var pmax = 0.0;
      var dsmax = 0.0;
      if (sActive) {
        var s: array<vec4<f32>, MR>;
        var dp: array<vec4<f32>, MR>;
        for (var m = 0; m < MR; m++) {
          let at = u32((sRow + m) * BC + sQuad * 4);
          s[m] = vec4<f32>(scrS[at], scrS[at + 1u], scrS[at + 2u], scrS[at + 3u]) * ${sUnscale};

          dp[m] = vec4<f32>(scrP[at], scrP[at + 1u], scrP[at + 2u], scrP[at + 3u]) * ${dpUnscale};

        }
        ${probsAndDsWGSL(f, withP, `let at = u32(r * BC + sQuad * 4);
        for (var x = 0u; x < 4u; x++) {
          ${withP ? 'scrS[at + x] = pv[x];' : ''}
          scrP[at + x] = dsv[x];
        }
        ${withP ? `pmax = max(pmax, ${absMax('pv')});` : ''}
        dsmax = max(dsmax, ${absMax('dsv')});`)}
      }
      ${withP ? 'atomicMax(&wmax[SLOT_P], bitcast<u32>(pmax));' : ''}
      atomicMax(&wmax[SLOT_DS], bitcast<u32>(dsmax));
    }`;

  // With all four operand tiles stashed: S, dP, then P * keep (withP) and
  // dS in place of S and dP, their max |x| in wmax. `done` are the slots
  // free from here.
  const scoresAndDs = (withP: boolean, ...done: number[]) => `workgroupBarrier();
    ${reset(...done)}
    ${scoresAndDp()}
    workgroupBarrier();
    ${probsAndDs(withP, 'ldexp(1.0, qe + ke)', 'ldexp(1.0, oe + ve)')}
    workgroupBarrier();`;
  // One accumulated product: the scratch `from` (P or dS, exponent `e`)
  // split into mS, then `acc` (n elements) += `product` (into scrO) * 2^accE.
  // `done` are the slots free once it is split.
  const accumulateProduct =
      (from: string, e: string, product: string, acc: string, n: number, accE: string,
       ...done: number[]) => `${stashScratch(from, 'mS', e)}
    workgroupBarrier();
    ${reset(...done)}
    ${product}
    workgroupBarrier();
    ${accumulate(acc, n, accE)}`;
  // dV += P^T dO and dK += dS^T Q (P and dS are [BR][BC] in mS: read
  // column-major as P^T, dS^T); dQ += dS K.
  const dvProduct = mo.product(
      bc, dv, br, colMajor('mS', `ks * ${K * bc}u + rb * ${M}u`, bc),
      rowMajor('oS', `ks * ${K * dv}u + cb * ${N}u`, dv), 'scrO', dv, outElems);
  const dkProduct = mo.product(
      bc, d, br, colMajor('mS', `ks * ${K * bc}u + rb * ${M}u`, bc),
      rowMajor('qS', `ks * ${K * d}u + cb * ${N}u`, d), 'scrO', d, outElems);
  const dqProduct = mo.product(
      br, d, bc, rowMajor('mS', `rb * ${M * bc}u + ks * ${K}u`, bc),
      rowMajor('kS', `ks * ${K * d}u + cb * ${N}u`, d), 'scrO', d, outElems);

  const dkdvBody = () => `
  let j0 = i32(wg.x) * BC;
  let b = i32(wg.y) / p.headsKV;
  let hk = i32(wg.y) % p.headsKV;
  let groups = p.heads / p.headsKV;
  ${loadTiles(kTile, vTile)}
  ${accDecl('dkAcc', bc * d)}
  ${accDecl('dvAcc', bc * dv)}
  // Query rows that can see some key of this block.
  let rows = fa_query_range(j0, j0 + BC, gradScoreParams(b, hk * groups));
  let iLo = rows.x;
  let nBlocks = select(0, (rows.y - 1 - iLo) / BR + 1, rows.y > iLo);
  let steps = groups * nBlocks;
  for (var step = 0; step < steps; step++) {
    let h = hk * groups + step / nBlocks;
    let i0 = iLo + (step % nBlocks) * BR;
    let sp = gradScoreParams(b, h);
    workgroupBarrier();
    ${loadTiles(qTile, oTile, rowStats)}
    ${scoresAndDs(true, slot.q, slot.o)}
    let pe = ${exponent(slot.p)};
    let dse = ${exponent(slot.ds)};
    ${accumulateProduct('scrS', 'pe', dvProduct, 'dvAcc', bc * dv, 'pe + oe', slot.p)}
    ${accumulateProduct('scrP', 'dse', dkProduct, 'dkAcc', bc * d, 'dse + qe')}
    ${reset(slot.ds)}
  }
  ${storeAcc('dkAcc', 'dk', kTile)}
  ${storeAcc('dvAcc', 'dv', vTile)}`;

  const dqBody = () => `
  ${dqBlockWGSL()}
  ${loadTiles(qTile, oTile, rowStats)}
  ${accDecl('dqAcc', br * d)}
  // Keys some row of the block can see, from a BC-aligned start (dropout
  // words are per key quad).
  let keys = fa_key_range(i0, min(i0 + BR, p.seqQ), sp);
  for (var j0 = (keys.x / BC) * BC; j0 < keys.y; j0 += BC) {
    workgroupBarrier();
    ${loadTiles(kTile, vTile)}
    ${scoresAndDs(false, slot.k, slot.v)}
    let dse = ${exponent(slot.ds)};
    ${accumulateProduct('scrP', 'dse', dqProduct, 'dqAcc', br * d, 'dse + ke', slot.ds)}
  }
  ${storeAcc('dqAcc', 'dq', qTile)}`;

  const body = pass === 'dkdv' ? dkdvBody() : dqBody();
  const code = `${mo.enables()}
${bindings}
${gradCommonWGSL(f)}
${constsWGSL({
    BR: br,
    BC: bc,
    T: threads,
    SG: subgroups,
    SC: s.sc,
    MR: s.mr
  })}
const SLOT_P = 2;
const SLOT_DS = ${slot.ds};

// Operands as f16 parts ([rows][W], row-major); mS holds P, then dS.
${mo.declare('qS', br * d)}
${mo.declare('oS', br * dv)}
${mo.declare('kS', bc * d)}
${mo.declare('vS', bc * dv)}
${mo.declare('mS', br * bc)}
// Products in f32: S, dP (then P * keep, dS), and the accumulated product.
var<workgroup> scrS: array<f32, ${br * bc}>;
var<workgroup> scrP: array<f32, ${br * bc}>;
var<workgroup> scrO: array<f32, ${outElems}>;
var<workgroup> lseS: array<f32, BR>;
var<workgroup> deltaS: array<f32, BR>;
// Max |x| of operand tiles (bits of floats >= 0).
var<workgroup> wmax: array<atomic<u32>, 8>;

${mo.helpers()}

@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32${subgroupParamsWGSL(c.shape)}) {
  let t = i32(lid);
  ${subgroupIdsWGSL(c.shape, subgroups)}
${sPhaseWGSL(s)}
${body}
}
`;
  assertWorkgroupAlignment(code, `FlashAttentionGrad ${pass} (subgroup matrices)`);
  return code;
}
