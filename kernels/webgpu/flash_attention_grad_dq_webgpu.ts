/**
 * Backward pass over query blocks: one workgroup holds BR query rows of one
 * (batch, head) and accumulates their dQ in registers over every key block
 * they can see (WGSL has no float atomics, so dQ is not scattered from the
 * key-block pass; S and dP are recomputed here instead).
 *
 * Per block of BC keys:
 *   S  = Q K^T, dP = dO V^T        (thread: MR rows x 4 adjacent keys)
 *                                  (with `split`: S and dP on separate
 *                                  halves of the workgroup)
 *   dS = P * (dP * keep - Delta) * score' * scale,  P = exp(score(S) - lse)
 *   dQ += dS K                     (thread: NR rows x ND dims)
 * With the dS scratch (GradTiles.dsScratch) dS is read from what the dK/dV
 * pass stored instead (dsScratchWGSL): dQ += dS K alone, no V, Q or dO.
 * Rows that see no key get dQ = 0. The next K/V tile is read into registers
 * while the current one computes: without that the pass waits on those
 * loads (benchmarks/RESULTS.md, backward tuning).
 */
import {dqSlicedStorageBytes, dqSlicedTilesValid} from './flash_attention_grad_dq_sliced_webgpu';
import {dqKeyRangeWGSL, featureKey, fetchDsTileWGSL, fetchKeyTileWGSL, GradFeatures, GradPassProgram, gradPassWGSL, loadQueryBlockWGSL, prefetchSlots, queryBlockStorageWGSL, scoresToDsWGSL, storeDsTileWGSL, storeKeyTileWGSL, sPhase, sPhaseValid} from './flash_attention_grad_wgsl';

export interface DqTiles {
  /** Query rows per workgroup. */
  br: number;
  /** Keys per step (multiple of 4). */
  bc: number;
  threads: number;
  /**
   * S and dP by separate halves of the invocations (SPhase.split); off
   * unless set.
   */
  split?: boolean;
  /**
   * K and V streamed in this many head-dim slices
   * (FlashAttentionGradDqSlicedProgram); unset: whole tiles.
   */
  dimChunks?: number;
  /**
   * With dimChunks: the rows of Q and dO are streamed in slices beside K
   * and V instead of resident (docs/webgpu_tuning.md, "Streamed backward").
   */
  streamed?: boolean;
  /**
   * With dimChunks: false reads each slice just before it is stored, not
   * while the previous one is multiplied (no prefetch registers); default true.
   */
  prefetch?: boolean;
}

/**
 * Row stride (in vec4s) of the transposed K tile: odd, so that a quarter
 * warp reading consecutive dims of one key quad hits distinct banks.
 */
function kStride(sc: number): number {
  return sc % 2 === 1 ? sc : sc + 1;
}

/**
 * Workgroup storage bytes of the program (must fit the device limit);
 * `dsScratch`: of its mode that reads dS (K and the dS tile only).
 */
export function dqStorageBytes(t: DqTiles, d: number, dv: number, dsScratch = false): number {
  if (t.dimChunks != null) {
    return dqSlicedStorageBytes(t, d, dv, dsScratch);
  }
  const sc = t.bc / 4;
  const d4 = Math.ceil(d / 4);
  const dv4 = Math.ceil(dv / 4);
  if (dsScratch) {
    return 16 * (4 * d4 * kStride(sc) + t.br * sc);
  }
  return 16 * (t.br * (d4 + 1 + dv4 + 1) + 4 * d4 * kStride(sc) + 4 * dv4 * sc + t.br * sc) +
      8 * t.br;
}

/** Rows per thread in the dQ accumulation. */
function rowsPerThread(t: DqTiles): number {
  return Math.min(4, t.br);
}

export function dqTilesValid(t: DqTiles): boolean {
  if (t.dimChunks != null) {
    return dqSlicedTilesValid(t);
  }
  const qt = t.br / rowsPerThread(t);
  return !t.streamed && sPhaseValid(t.bc, t.br, t.threads, t.split) && Number.isInteger(qt) &&
      t.threads % qt === 0;
}

export class FlashAttentionGradDqProgram extends GradPassProgram {
  /**
   * `dsScratch`: read each dS tile from the scratch the dK/dV pass wrote
   * (GradTiles.dsScratch) instead of recomputing it; no V, Q or dO.
   */
  constructor(d: number, dv: number, tiles: DqTiles, f: GradFeatures, dsScratch = false) {
    const {bc, br, threads} = tiles;
    const s = sPhase(bc, br, threads, tiles.split);
    const d4 = Math.ceil(d / 4);
    const dv4 = Math.ceil(dv / 4);
    const kst = kStride(s.sc);
    const nr = rowsPerThread(tiles);
    const qt = br / nr;       // accumulation: row groups
    const xt = threads / qt;  // accumulation: dim stride
    const nd = Math.ceil(d / xt);
    super(
        `flashAttentionGradDq_${d}_${dv}_${bc}_${br}_${threads}_${s.split ? 'split_' : ''}${
            dsScratch ? 'ds_' : ''}${featureKey(f)}`,
        f, 'q', dsScratch);
    // dQ += dS K with the thread's NR dS rows held in registers and K read
    // one vec4 at a time: faster than holding K's dims and reading dS per row
    // (benchmarks/RESULTS.md, backward tuning).
    const accumulate = `
    for (var quad = 0; quad < SC; quad++) {
      var dsr: array<vec4<f32>, NR>;
      for (var m = 0; m < NR; m++) {
        dsr[m] = pS[(qr * NR + m) * SC + quad];
      }
      for (var n = 0; n < ${nd}; n++) {
        let kv = kT[min(qx + n * XT, D - 1) * KST + quad];
        for (var m = 0; m < NR; m++) {
          dqAcc[m][n] += dot(dsr[m], kv);
        }
      }
    }`;
    const keyTile = `
  var kReg: array<vec4<f32>, ${prefetchSlots(s.sc * 4 * d4, threads)}>;
  var vReg: array<vec4<f32>, ${prefetchSlots(s.sc * 4 * dv4, threads)}>;
  if (jLo <= jHi) {
    let j0 = jLo;
    ${fetchKeyTileWGSL('j0', s.sc, d4, dv4, threads)}
  }
  for (var j0 = jLo; j0 <= jHi; j0 += BC) {
    workgroupBarrier();
    ${storeKeyTileWGSL('KST', s.sc, d4, dv4, threads)}
    workgroupBarrier();
    if (j0 + BC <= jHi) {
      ${fetchKeyTileWGSL('j0 + BC', s.sc, d4, dv4, threads)}
    }`;
    const storage = `// K and V transposed, four keys per vec4: kT[x * KST + quad]; K serves
// both S = Q K^T (a key quad per load) and dQ += dS K (dot of 4 keys).
var<workgroup> kT: array<vec4<f32>, ${4 * d4 * kst}>;
var<workgroup> vT: array<vec4<f32>, ${4 * dv4 * s.sc}>;
// pS holds dS.
${queryBlockStorageWGSL(br, d4, dv4, s.sc)}`;
    // dS from the scratch: the K tile and the dS tile are prefetched
    // together, and the block multiplies once.
    const dsKeyTile = `
  var kReg: array<vec4<f32>, ${prefetchSlots(s.sc * 4 * d4, threads)}>;
  var dsReg: array<vec4<f32>, ${prefetchSlots(br * s.sc, threads)}>;
  if (jLo <= jHi) {
    let j0 = jLo;
    ${fetchKeyTileWGSL('j0', s.sc, d4, dv4, threads, false)}
    ${fetchDsTileWGSL('j0', br, s.sc, threads)}
  }
  for (var j0 = jLo; j0 <= jHi; j0 += BC) {
    workgroupBarrier();
    ${storeKeyTileWGSL('KST', s.sc, d4, dv4, threads, false)}
    ${storeDsTileWGSL(br, s.sc, threads)}
    workgroupBarrier();
    if (j0 + BC <= jHi) {
      ${fetchKeyTileWGSL('j0 + BC', s.sc, d4, dv4, threads, false)}
      ${fetchDsTileWGSL('j0 + BC', br, s.sc, threads)}
    }`;
    const dsStorage = `// K transposed, four keys per vec4: kT[x * KST + quad].
var<workgroup> kT: array<vec4<f32>, ${4 * d4 * kst}>;
// The block's dS, read from the scratch.
var<workgroup> pS: array<vec4<f32>, ${br * s.sc}>;`;
    const keyBlocks = dsScratch ? `${dsKeyTile}
` :
                                  `${keyTile}

    ${scoresToDsWGSL(s, 'KST', d4, dv4, f, false, 'pS[r * SC + sQuad] = dsv;')}
    workgroupBarrier();
`;
    this.source = gradPassWGSL(
        f, 'q', {d, dv, bc, br, threads, s, xt}, {NR: nr, KST: kst},
        dsScratch ? dsStorage : storage, `
  ${dsScratch ? '' : loadQueryBlockWGSL(d, d4, dv, dv4)}

  var dqAcc: array<array<f32, ${nd}>, NR>;
  for (var m = 0; m < NR; m++) {
    for (var n = 0; n < ${nd}; n++) { dqAcc[m][n] = 0.0; }
  }

  ${dqKeyRangeWGSL(s)}
${keyBlocks}${accumulate}
  }

  for (var m = 0; m < NR; m++) {
    let i = i0 + qr * NR + m;
    if (i < gr.rowsQ) {
      let base = ((gr.q0 + i) * p.heads + h) * D;
      for (var n = 0; n < ${nd}; n++) {
        let x = qx + n * XT;
        if (x < D) { dq[base + x] = dqAcc[m][n]; }
      }
    }
  }
`,
        'SC', dsScratch);
  }
}
