/**
 * The dQ pass with K and V streamed in head-dim slices (DqTiles.dimChunks;
 * docs/webgpu_tuning.md, "Backward at head dims above 64"): for head dims
 * where whole Q/dO rows and K/V tiles leave room for only a few keys per
 * step (D=128: 8), the BR rows of Q and dO stay resident and K, V pass
 * through one buffer of SW4 quads of dims x BC keys, so a step can take
 * 16-32 keys. Per block of BC keys:
 *   A. for each slice c of K:  S += Q_c K_c^T       (thread: MR rows x 4 keys)
 *   B. for each slice c of V:  dP += dO_c V_c^T
 *      dS = P * (dP * keep - Delta) * score' * scale -> pS
 *   C. for each slice c of K:  dQ[:, c] += dS K_c    (thread: NR rows x slice dims)
 * so K is read twice per block and V once. A thread's accumulators hold its
 * rows' dims in every slice (dims qx + n XT of each). Rows that see no key
 * get dQ = 0; every sum has a fixed order (deterministic).
 *
 * `streamed` (DqTiles.streamed; docs/webgpu_tuning.md, "Streamed
 * backward"): the rows of Q and dO are not resident either; each slice of
 * K (V) in A (B) comes with the same slice of Q (dO) through a second
 * buffer, re-read every block (the workgroup's rows stay hot in L1/L2).
 * That frees the 33 KiB they take at D=128 for 64 rows and 256
 * invocations.
 *
 * With the dS scratch (GradTiles.dsScratch) A and B are replaced by
 * reading the block's dS from what the dK/dV pass stored; only K streams.
 */
import type {DqTiles} from './flash_attention_grad_dq_webgpu';
import {dqKeyRangeWGSL, featureKey, fetchDsTileWGSL, GradFeatures, GradPassProgram, gradPassWGSL, loadRowStatsWGSL, prefetchSlots, probsAndDsWGSL, sPhase, sPhaseValid, storeDsTileWGSL} from './flash_attention_grad_wgsl';
import {perSliceWGSL, sliceNames, sliceQuads, sliceStreamWGSL, streamedStorageBytes, swizzledRowsWGSL} from './flash_attention_grad_sliced_wgsl';

/** Rows per thread in the dQ accumulation. */
function rowsPerThread(t: DqTiles): number {
  return Math.min(4, t.br);
}

export function dqSlicedStorageBytes(t: DqTiles, d: number, dv: number, dsScratch = false): number {
  const sw4 = sliceQuads(d, dv, t.dimChunks!);
  if (dsScratch) {
    // A slice of K and the dS tile.
    return 16 * (4 * sw4 * swizzledRowsWGSL('keyAt', t.bc / 4).stride + t.br * t.bc / 4);
  }
  if (t.streamed) {
    return streamedStorageBytes(t.bc, t.br, sw4);
  }
  const sc = t.bc / 4;
  const rowStride = swizzledRowsWGSL('qAt', sw4 * t.dimChunks!).stride;
  const keyStride = swizzledRowsWGSL('keyAt', sc).stride;
  return 16 * (2 * t.br * rowStride + 4 * sw4 * keyStride + t.br * sc) + 8 * t.br;
}

export function dqSlicedTilesValid(t: DqTiles): boolean {
  const c = t.dimChunks!;
  const qt = t.br / rowsPerThread(t);
  return Number.isInteger(c) && c >= 1 && !t.split && sPhaseValid(t.bc, t.br, t.threads) &&
      Number.isInteger(qt) && t.threads % qt === 0;
}

export class FlashAttentionGradDqSlicedProgram extends GradPassProgram {
  /**
   * `dsScratch`: read each block's dS from the scratch the dK/dV pass wrote
   * (GradTiles.dsScratch) instead of A and B; only C's K slices stream.
   */
  constructor(d: number, dv: number, tiles: DqTiles, f: GradFeatures, dsScratch = false) {
    const {bc, br, threads} = tiles;
    const chunks = tiles.dimChunks!;
    const s = sPhase(bc, br, threads);
    const sw4 = sliceQuads(d, dv, chunks);
    const rows = swizzledRowsWGSL('qAt', sw4 * chunks);
    const keys = swizzledRowsWGSL('keyAt', s.sc);
    const nr = rowsPerThread(tiles);
    const xt = threads / (br / nr);       // accumulation: lanes per row group
    const nds = Math.ceil(4 * sw4 / xt);  // accumulation: dims per slice per thread
    const streamed = tiles.streamed === true;
    const prefetch = tiles.prefetch !== false;
    const rowSlice = swizzledRowsWGSL('rowAt', sw4);
    super(
        `flashAttentionGradDqSliced_${d}_${dv}_${bc}_${br}_${threads}_c${chunks}${
            streamed ? 'st' : ''}${prefetch ? '' : 'p0'}${dsScratch ? '_ds' : ''}_${featureKey(f)}`,
        f, 'q', dsScratch);
    // Row r's quad xl of slice c: of `tile` (resident), or of the slice in
    // rowS (streamed; `tile` is in it).
    const rowOf = (tile: string) =>
        streamed ? 'rowS[rowAt(sRow + m, xl)]' : `${tile}[qAt(sRow + m, c * SW4 + xl)]`;
    // acc[m] += the thread's rows of `tile` . slice c's dims of its key
    // quad, dims in order.
    const products = (acc: string, tile: string) => `
        for (var xl = 0; xl < SW4; xl++) {
          let col0 = sliceS[keyAt(xl * 4, sQuad)];
          let col1 = sliceS[keyAt(xl * 4 + 1, sQuad)];
          let col2 = sliceS[keyAt(xl * 4 + 2, sQuad)];
          let col3 = sliceS[keyAt(xl * 4 + 3, sQuad)];
          for (var m = 0; m < MR; m++) {
            let row = ${rowOf(tile)};
            ${acc}[m] += row.x * col0;
            ${acc}[m] += row.y * col1;
            ${acc}[m] += row.z * col2;
            ${acc}[m] += row.w * col3;
          }
        }`;
    // One slice: store the prefetched one (and its row slice, `withRows`
    // where streamed), then read the next (`next`): here, while the slice
    // is multiplied, or without prefetch at the end of the slice
    // (`afterSlice`), just before the next one is stored.
    const slice = (next: string, withRows = false) => `
      workgroupBarrier();
      storeKeySlice(t);${withRows && streamed ? '\n      storeRowSlice(t);' : ''}
      workgroupBarrier();
      ${prefetch ? next : ''}`;
    const afterSlice = (next: string) => prefetch ? '' : `\n      ${next}\n    `;
    // Streamed: a line reading the next row slice (`args` of fetchRowSlice
    // between i0 and t: head, slice), indented by `indent`.
    const nextRows = (fromQ: string, args: string, indent: string) =>
        streamed ? `\n${indent}fetchRowSlice(${fromQ}, i0, ${args}, t, gr);` : '';
    // A reads K's next slice (or V's first) and, streamed, Q's (or dO's); B
    // reads V's next (or K's first, for C) and dO's next (the next block's
    // Q is read in C).
    const nextInA = `fetchKeySlice(c + 1 < DC, j0, select(0, c + 1, c + 1 < DC), t, hk, gr);${
        nextRows('c + 1 < DC', 'h, select(0, c + 1, c + 1 < DC)', '      ')}`;
    const nextInB = `fetchKeySlice(c + 1 >= DC, j0, select(c + 1, 0, c + 1 >= DC), t, hk, gr);${
        streamed ? `
      if (c + 1 < DC) {${nextRows('false', 'h, c + 1', '        ')}
      }` :
                   ''}`;
    // C reads K's next slice, or the next block's first (and its Q slice).
    const nextInC = `if (c + 1 < DC) {
        fetchKeySlice(true, j0, c + 1, t, hk, gr);
      } else if (j0 + BC <= jHi) {
        fetchKeySlice(true, j0 + BC, 0, t, hk, gr);${nextRows('true', 'h, 0', '        ')}
      }`;
    const inSlice = (4 * sw4) % xt === 0 ? 'true' : 'xl < 4 * SW4';
    const consts = {
      NR: nr,
      DC: chunks,
      SW4: sw4,
      QW: rows.stride,
      NDS: nds,
      PF: prefetchSlots(s.sc * 4 * sw4, threads),
      ...(streamed ? {PFR: prefetchSlots(br * sw4, threads)} : {}),
    };
    const rowStorage = streamed ?
        `// One slice of the rows of Q or dO: quad x of row r at rowAt(r, x).
var<workgroup> rowS: array<vec4<f32>, ${br * rowSlice.stride}>;
${rowSlice.wgsl}` :
        `// Q and dO rows as dim quads, zeros to whole slices: quad x of row r at
// qAt(r, x).
var<workgroup> qS: array<vec4<f32>, ${br * rows.stride}>;
var<workgroup> doS: array<vec4<f32>, ${br * rows.stride}>;
${rows.wgsl}`;
    const rowStream = {reg: 'rowReg', buffer: 'rowS', at: 'rowAt', pf: 'PFR'};
    const loadRows = `
  for (var e = t; e < BR * QW; e += T) {
    let i = i0 + e / QW;
    var qv = vec4<f32>(0.0);
    var ov = vec4<f32>(0.0);
    if (i < gr.rowsQ) {
      qv = rowQuad(true, gr.q0 + i, h, e % QW);
      ov = rowQuad(false, gr.q0 + i, h, e % QW);
    }
    qS[qAt(e / QW, e % QW)] = qv;
    doS[qAt(e / QW, e % QW)] = ov;
  }`;
    const storage = `${rowStorage}
// One slice of K or V, transposed: dim x of key quad kq at keyAt(x, kq).
var<workgroup> sliceS: array<vec4<f32>, ${4 * sw4 * keys.stride}>;
${keys.wgsl}
// dS.
var<workgroup> pS: array<vec4<f32>, ${br * s.sc}>;
var<workgroup> lseS: array<f32, BR>;
var<workgroup> deltaS: array<f32, BR>;
${sliceStreamWGSL(d, dv, {keys: sliceNames('keyAt'), ...(streamed ? {rows: rowStream} : {})})}`;
    // dQ over the slices of K for the block's dS in pS.
    const accumulateC = `
      for (var quad = 0; quad < SC; quad++) {
        var dsr: array<vec4<f32>, NR>;
        for (var m = 0; m < NR; m++) {
          dsr[m] = pS[(qr * NR + m) * SC + quad];
        }
        for (var n = 0; n < NDS; n++) {
          let xl = qx + n * XT;
          if (${inSlice}) {
            let kv = sliceS[keyAt(xl, quad)];
            for (var m = 0; m < NR; m++) {
              dqAcc[m][c * NDS + n] += dot(dsr[m], kv);
            }
          }
        }
      }`;
    const initDq = `
  var dqAcc: array<array<f32, ${nds * chunks}>, NR>;
  for (var m = 0; m < NR; m++) {
    for (var n = 0; n < ${nds * chunks}; n++) { dqAcc[m][n] = 0.0; }
  }

  ${dqKeyRangeWGSL(s)}
`;
    const storeDq = `
  for (var m = 0; m < NR; m++) {
    let i = i0 + qr * NR + m;
    if (i < gr.rowsQ) {
      let base = ((gr.q0 + i) * p.heads + h) * D;
      for (var c = 0; c < DC; c++) {
        for (var n = 0; n < NDS; n++) {
          let x = c * 4 * SW4 + qx + n * XT;
          if (qx + n * XT < 4 * SW4 && x < D) { dq[base + x] = dqAcc[m][c * NDS + n]; }
        }
      }
    }
  }
`;
    if (dsScratch) {
      // Each block: dS from the scratch with K's first slice, then C; the
      // last slice reads the next block's first K slice and dS.
      const nextDs = `if (c + 1 < DC) {
        fetchKeySlice(true, j0, c + 1, t, hk, gr);
      } else if (j0 + BC <= jHi) {
        fetchKeySlice(true, j0 + BC, 0, t, hk, gr);
        ${fetchDsTileWGSL('j0 + BC', br, s.sc, threads)}
      }`;
      this.source = gradPassWGSL(
          f, 'q', {d, dv, bc, br, threads, s, xt}, consts, `
// One slice of K, transposed: dim x of key quad kq at keyAt(x, kq).
var<workgroup> sliceS: array<vec4<f32>, ${4 * sw4 * keys.stride}>;
${keys.wgsl}
// The block's dS, read from the scratch.
var<workgroup> pS: array<vec4<f32>, ${br * s.sc}>;
${sliceStreamWGSL(d, dv, {keys: sliceNames('keyAt')})}`,
          `${initDq}
  var dsReg: array<vec4<f32>, ${prefetchSlots(br * s.sc, threads)}>;
  if (jLo <= jHi) {
    fetchKeySlice(true, jLo, 0, t, hk, gr);
    ${fetchDsTileWGSL('jLo', br, s.sc, threads)}
  }
  for (var j0 = jLo; j0 <= jHi; j0 += BC) {
    ${perSliceWGSL(chunks, `
      workgroupBarrier();
      storeKeySlice(t);
      if (c == 0) {
        ${storeDsTileWGSL(br, s.sc, threads)}
      }
      workgroupBarrier();
      ${prefetch ? nextDs : ''}
      ${accumulateC}
    ${afterSlice(nextDs)}`)}
  }
${storeDq}`,
          'SC', true);
      return;
    }
    this.source = gradPassWGSL(
        f, 'q', {d, dv, bc, br, threads, s, xt}, consts, storage, `${streamed ? '' : loadRows}
  ${loadRowStatsWGSL()}
${initDq}
  if (jLo <= jHi) {
    fetchKeySlice(true, jLo, 0, t, hk, gr);${nextRows('true', 'h, 0', '    ')}
  }
  for (var j0 = jLo; j0 <= jHi; j0 += BC) {
    var s: array<vec4<f32>, MR>;
    var dp: array<vec4<f32>, MR>;
    for (var m = 0; m < MR; m++) {
      s[m] = vec4<f32>(0.0);
      dp[m] = vec4<f32>(0.0);
    }
    // A: S over the slices of K.
    ${perSliceWGSL(chunks, `
      ${slice(nextInA, true)}
      if (sActive) {
        ${products('s', 'qS')}
      }
    ${afterSlice(nextInA)}`)}
    // B: dP over the slices of V, then dS.
    ${perSliceWGSL(chunks, `
      ${slice(nextInB, true)}
      if (sActive) {
        ${products('dp', 'doS')}
      }
    ${afterSlice(nextInB)}`)}
    if (sActive) {
      ${probsAndDsWGSL(f, false, 'pS[r * SC + sQuad] = dsv;')}
    }
    // C: dQ over the slices of K; the last reads the next block's first.
    ${perSliceWGSL(chunks, `
      ${slice(nextInC)}
      ${accumulateC}
    ${afterSlice(nextInC)}`)}
  }
${storeDq}`);
  }
}
