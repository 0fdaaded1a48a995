/**
 * Backward pass over key blocks: one workgroup holds BC keys of one
 * (batch, kv head) and accumulates their dK and dV in registers while it
 * walks every query row that can see them, for every query head of the
 * group (GQA/MQA: the group's gradients are summed here, in a fixed order,
 * with no atomics and no repeated K/V). P is recomputed from lse.
 *
 * Per block of BR query rows:
 *   S  = Q K^T, dP = dO V^T        (thread: MR rows x 4 adjacent keys)
 *                                  (with `split`: S and dP on separate
 *                                  halves of the workgroup)
 *   P  = exp(score(S) - lse), Pd = P * keep
 *   dV += Pd^T dO                  (thread: 4 keys x 4 dims per vec4)
 *   dS = P * (dP * keep - Delta) * score' * scale
 *   dK += dS^T Q
 * With the dS scratch (GradTiles.dsScratch) dS is also stored for the dQ
 * pass (dsScratchWGSL). Head dims are padded to multiples of 4 with zeros in workgroup memory, so
 * every load is a vec4. The next block's Q/dO rows are read into registers
 * while the current block computes: without that the pass waits on those
 * loads (benchmarks/RESULTS.md, backward tuning).
 */
import {dkdvSlicedStorageBytes, dkdvSlicedTilesValid} from './flash_attention_grad_dkdv_sliced_webgpu';
import {DKDV_DS_HEAD, featureKey, fetchRowStatsWGSL, fetchRowsWGSL, GradFeatures, GradPassProgram, gradPassWGSL, prefetchSlots, queryBlockStorageWGSL, scoresToDsWGSL, storeDsWGSL, storeRowStatsWGSL, storeRowsWGSL, sPhase, sPhaseValid, sPhaseWGSL} from './flash_attention_grad_wgsl';

export interface DkDvTiles {
  /** Keys per workgroup (multiple of 4). */
  bc: number;
  /** Query rows per step. */
  br: number;
  /** Invocations per workgroup. */
  threads: number;
  /**
   * S and dP by separate halves of the invocations (SPhase.split); off
   * unless set.
   */
  split?: boolean;
  /**
   * Q and dO streamed in this many head-dim slices
   * (FlashAttentionGradDkDvSlicedProgram); unset: whole rows.
   */
  dimChunks?: number;
  /**
   * With dimChunks: K^T and V^T are streamed in slices beside Q and dO
   * instead of resident (docs/webgpu_tuning.md, "Streamed backward").
   */
  streamed?: boolean;
  /**
   * With dimChunks: false reads each slice just before it is stored, not
   * while the previous one is multiplied (no prefetch registers); default true.
   */
  prefetch?: boolean;
}

/** Workgroup storage bytes of the program (must fit the device limit). */
export function dkdvStorageBytes(t: DkDvTiles, d: number, dv: number): number {
  if (t.dimChunks != null) {
    return dkdvSlicedStorageBytes(t, d, dv);
  }
  const d4 = Math.ceil(d / 4);
  const dv4 = Math.ceil(dv / 4);
  return 16 * (t.bc * (d4 + dv4) + t.br * (d4 + 1 + dv4 + 1) + t.br * t.bc / 4) + 8 * t.br;
}

/** Are the tiles consistent (every thread mapping divides evenly)? */
export function dkdvTilesValid(t: DkDvTiles): boolean {
  if (t.dimChunks != null) {
    return dkdvSlicedTilesValid(t);
  }
  return !t.streamed && sPhaseValid(t.bc, t.br, t.threads, t.split) && t.threads % (t.bc / 4) === 0;
}

export class FlashAttentionGradDkDvProgram extends GradPassProgram {
  /** `dsScratch`: also store each dS tile to the scratch (GradTiles.dsScratch). */
  constructor(d: number, dv: number, tiles: DkDvTiles, f: GradFeatures, dsScratch = false) {
    const {bc, br, threads} = tiles;
    const s = sPhase(bc, br, threads, tiles.split);
    const d4 = Math.ceil(d / 4);
    const dv4 = Math.ceil(dv / 4);
    const xt = threads / s.sc;      // accumulation: dim-quad stride
    const nd = Math.ceil(d4 / xt);  // accumulation: dim quads per thread
    const ndv = Math.ceil(dv4 / xt);
    super(
        `flashAttentionGradDkDv_${d}_${dv}_${bc}_${br}_${threads}_${s.split ? 'split_' : ''}${
            dsScratch ? 'ds_' : ''}${featureKey(f)}`,
        f, 'k', dsScratch);
    // acc[c * n + ...] += weights[c] * row r of `rows`, for the thread's
    // dim quads (dV += Pd^T dO, dK += dS^T Q).
    const accumulate = (acc: string, weights: string, rows: string, w4: number, n: number) => `
        for (var n = 0; n < ${n}; n++) {
          let xq = kx + n * XT;
          if (${w4 % xt === 0 ? 'true' : `xq < ${w4}`}) {
            let row = ${rows}[r * ${w4 + 1} + xq];
            ${acc}[n] += ${weights}.x * row;
            ${acc}[${n} + n] += ${weights}.y * row;
            ${acc}[${2 * n} + n] += ${weights}.z * row;
            ${acc}[${3 * n} + n] += ${weights}.w * row;
          }
        }`;
    // Key j's dims of the thread's accumulator `acc` (acc[c * n + ...]) to
    // `out` ([B, Sk, Hk, w]), skipping the padding dims past w.
    const storeKeyRow = (out: string, acc: string, n: number, w: string) => `
      for (var n = 0; n < ${n}; n++) {
        let quad = ${acc}[c * ${n} + n];
        for (var e = 0; e < 4; e++) {
          let x = (kx + n * XT) * 4 + e;
          if (x < ${w}) { ${out}[((gr.k0 + j) * p.headsKV + hk) * ${w} + x] = quad[e]; }
        }
      }`;
    // One step per (query head of the group, block of BR rows).
    const rowLoop = `
  let nBlocks = select(0, (iHi - iLo) / BR + 1, iHi >= iLo);
  let steps = groups * nBlocks;
  var qReg: array<vec4<f32>, ${prefetchSlots(br * d4, threads)}>;
  var oReg: array<vec4<f32>, ${prefetchSlots(br * dv4, threads)}>;
  var stReg: array<vec2<f32>, ${prefetchSlots(br, threads)}>;
  if (steps > 0) {
    let hn = hk * groups;
    ${fetchRowsWGSL('q', 'qReg', d, d4, br, threads, 'gr.rowsQ', 'p.heads', 'iLo', 'hn')}
    ${fetchRowsWGSL('dy', 'oReg', dv, dv4, br, threads, 'gr.rowsQ', 'p.heads', 'iLo', 'hn')}
    ${fetchRowStatsWGSL('iLo', 'hn', br, threads)}
  }
  for (var step = 0; step < steps; step++) {
    let h = hk * groups + step / nBlocks;
    let i0 = iLo + (step % nBlocks) * BR;
    let sp = gradScoreParams(b, h);
    workgroupBarrier();
    ${storeRowsWGSL('qReg', 'qS', d4, d4 + 1, br, threads)}
    ${storeRowsWGSL('oReg', 'doS', dv4, dv4 + 1, br, threads)}
    ${storeRowStatsWGSL(br, threads)}
    workgroupBarrier();
    if (step + 1 < steps) {
      let hn = hk * groups + (step + 1) / nBlocks;
      let iN = iLo + ((step + 1) % nBlocks) * BR;
      ${fetchRowsWGSL('q', 'qReg', d, d4, br, threads, 'gr.rowsQ', 'p.heads', 'iN', 'hn')}
      ${fetchRowsWGSL('dy', 'oReg', dv, dv4, br, threads, 'gr.rowsQ', 'p.heads', 'iN', 'hn')}
      ${fetchRowStatsWGSL('iN', 'hn', br, threads)}
    }
`;
    const storage = `// K and V transposed, four keys per vec4: kT[x * SC + quad] (x < 4 * D4).
var<workgroup> kT: array<vec4<f32>, ${4 * d4 * s.sc}>;
var<workgroup> vT: array<vec4<f32>, ${4 * dv4 * s.sc}>;
// pS holds P * keep, then dS.
${queryBlockStorageWGSL(br, d4, dv4, s.sc)}`;
    this.source = gradPassWGSL(
        f, 'k', {d, dv, bc, br, threads, s, xt}, {}, storage,
        `

  // dkAcc[c * ND + n]: key (4 * kq + c), dims 4 * (kx + n * XT) + 0..3.
  var dkAcc: array<vec4<f32>, ${4 * nd}>;
  var dvAcc: array<vec4<f32>, ${4 * ndv}>;
  for (var n = 0; n < ${4 * nd}; n++) { dkAcc[n] = vec4<f32>(0.0); }
  for (var n = 0; n < ${4 * ndv}; n++) { dvAcc[n] = vec4<f32>(0.0); }

  // Query rows that can see some key of this block (none past the batch
  // row's keys: such a block writes zeros at once).
  let rows = fa_query_range(j0, j0 + BC, gradScoreParams(b, hk * groups));
  let iLo = rows.x;
  let iHi = rows.y - 1;
${sPhaseWGSL(s)}
  let kx = t % XT;           // accumulation: first dim quad
  let kq = t / XT;           // accumulation: key quad

${rowLoop}

      var ds: array<vec4<f32>, MR>;
      ${
            scoresToDsWGSL(
                s, 'SC', d4, dv4, f, true,
                `pS[r * SC + sQuad] = pv;
        ds[m] = dsv;${
                    dsScratch ? `
        ${storeDsWGSL(DKDV_DS_HEAD, 'dsv')}` :
                                ''}`)}
      workgroupBarrier();
      for (var r = 0; r < BR; r++) {
        let pv = pS[r * SC + kq];
        ${accumulate('dvAcc', 'pv', 'doS', dv4, ndv)}
      }
      workgroupBarrier();
      if (sOwner) {
        for (var m = 0; m < MR; m++) {
          pS[(sRow + m) * SC + sQuad] = ds[m];
        }
      }
      workgroupBarrier();
      for (var r = 0; r < BR; r++) {
        let dsv = pS[r * SC + kq];
        ${accumulate('dkAcc', 'dsv', 'qS', d4, nd)}
      }
    }

  for (var c = 0; c < 4; c++) {
    let j = j0 + kq * 4 + c;
    if (j < gr.rowsK) {
      ${storeKeyRow('dk', 'dkAcc', nd, 'D')}
      ${storeKeyRow('dv', 'dvAcc', ndv, 'DV')}
    }
  }
`,
        'SC', dsScratch);
  }
}
