/**
 * The dK/dV pass with Q and dO streamed in head-dim slices
 * (DkDvTiles.dimChunks; docs/webgpu_tuning.md, "Backward at head dims
 * above 64"): for head dims where K^T, V^T and whole Q/dO rows leave room
 * for only a few rows per step (D=128: 8), K^T and V^T stay resident and
 * Q, dO pass through one buffer of BR rows x SW4 quads, so a step can
 * take 16-32 rows. Per step of BR rows of one query head:
 *   A. for each slice c of Q:   S += Q_c K_c^T       (thread: MR rows x 4 keys)
 *      P = exp(score(S) - lse), pS = P * keep
 *   B. for each slice c of dO:  dP += dO_c V_c^T, dV[:, c] += pS^T dO_c
 *      dS = P * (dP * keep - Delta) * score' * scale -> pS
 *   C. for each slice c of Q:   dK[:, c] += dS^T Q_c  (thread: 4 keys x slice quads)
 * so Q is read twice per step and dO once. A thread's accumulators hold its
 * key quad's dims in every slice (quads kx + n XT of each). Every sum runs
 * over the same terms in a fixed order: deterministic, no atomics; query
 * heads of a GQA group are summed in the workgroup as in the unsliced pass.
 *
 * `streamed` (DkDvTiles.streamed; docs/webgpu_tuning.md, "Streamed
 * backward"): K^T and V^T are not resident either; each slice of Q (dO)
 * in A (B) comes with the same slice of K^T (V^T) through a second buffer,
 * re-read every step (the workgroup's keys stay hot in L1/L2). That frees
 * the 32 KiB they take at D=128 for 64 keys and 256 invocations.
 *
 * With the dS scratch (GradTiles.dsScratch) the dS of each step is also
 * stored for the dQ pass (dsScratchWGSL).
 */
import type {DkDvTiles} from './flash_attention_grad_dkdv_webgpu';
import {DKDV_DS_HEAD, featureKey, fetchRowStatsWGSL, GradFeatures, GradPassProgram, gradPassWGSL, prefetchSlots, sPhase, sPhaseValid, sPhaseWGSL, storeDsWGSL, storeRowStatsWGSL} from './flash_attention_grad_wgsl';
import {perSliceWGSL, sliceNames, sliceQuads, sliceStreamWGSL, streamedStorageBytes, swizzledRowsWGSL} from './flash_attention_grad_sliced_wgsl';

/** Workgroup storage bytes of the sliced program. */
export function dkdvSlicedStorageBytes(t: DkDvTiles, d: number, dv: number): number {
  const sw4 = sliceQuads(d, dv, t.dimChunks!);
  if (t.streamed) {
    return streamedStorageBytes(t.bc, t.br, sw4);
  }
  const kvRows = 4 * sw4 * t.dimChunks!;  // K^T and V^T rows, padded to whole slices
  const sliceStride = swizzledRowsWGSL('sliceAt', sw4).stride;
  return 16 * (2 * kvRows * (t.bc / 4) + t.br * sliceStride + t.br * t.bc / 4) + 8 * t.br;
}

/** Sliced tiles: the S phase divides evenly, every key quad has whole lanes. */
export function dkdvSlicedTilesValid(t: DkDvTiles): boolean {
  const c = t.dimChunks!;
  return Number.isInteger(c) && c >= 1 && !t.split && sPhaseValid(t.bc, t.br, t.threads) &&
      t.threads % (t.bc / 4) === 0;
}

export class FlashAttentionGradDkDvSlicedProgram extends GradPassProgram {
  /** `dsScratch`: also store each dS tile to the scratch (GradTiles.dsScratch). */
  constructor(d: number, dv: number, tiles: DkDvTiles, f: GradFeatures, dsScratch = false) {
    const {bc, br, threads} = tiles;
    const chunks = tiles.dimChunks!;
    const s = sPhase(bc, br, threads);
    const sw4 = sliceQuads(d, dv, chunks);
    const slice = swizzledRowsWGSL('sliceAt', sw4);
    const xt = threads / s.sc;       // accumulation: lanes per key quad
    const nq = Math.ceil(sw4 / xt);  // accumulation: quads per slice per thread
    const streamed = tiles.streamed === true;
    const prefetch = tiles.prefetch !== false;
    const keys = swizzledRowsWGSL('keyAt', s.sc);
    super(
        `flashAttentionGradDkDvSliced_${d}_${dv}_${bc}_${br}_${threads}_c${chunks}${
            streamed ? 'st' : ''}${prefetch ? '' : 'p0'}${dsScratch ? '_ds' : ''}_${featureKey(f)}`,
        f, 'k', dsScratch);
    const inSlice = sw4 % xt === 0 ? 'true' : 'xl < SW4';
    // acc[(c NQ + n) 4 + key] += weights[key] * sliceS row r, quad xl.
    const accumulate = (acc: string) => `
        for (var n = 0; n < NQ; n++) {
          let xl = kx + n * XT;
          if (${inSlice}) {
            let row = sliceS[sliceAt(r, xl)];
            let a = (c * NQ + n) * 4;
            ${acc}[a] += w.x * row;
            ${acc}[a + 1] += w.y * row;
            ${acc}[a + 2] += w.z * row;
            ${acc}[a + 3] += w.w * row;
          }
        }`;
    // Dim x + e of the thread's key quad in `tile` (resident), or of the
    // slice in keyS (streamed; `tile` is in it).
    const col = (tile: string, e: number) => streamed ?
        `keyS[keyAt(xl * 4 + ${e}, sQuad)]` :
        `${tile}[${e > 0 ? `(x + ${e})` : 'x'} * SC + sQuad]`;
    // acc[m] += the thread's rows of sliceS . (slice c's dims of its key
    // quad in `tile`), dims in order.
    const products = (acc: string, tile: string) => `
        for (var xl = 0; xl < SW4; xl++) {
          let x = (c * SW4 + xl) * 4;
          let col0 = ${col(tile, 0)};
          let col1 = ${col(tile, 1)};
          let col2 = ${col(tile, 2)};
          let col3 = ${col(tile, 3)};
          for (var m = 0; m < MR; m++) {
            let row = sliceS[sliceAt(sRow + m, xl)];
            ${acc}[m] += row.x * col0;
            ${acc}[m] += row.y * col1;
            ${acc}[m] += row.z * col2;
            ${acc}[m] += row.w * col3;
          }
        }`;
    // One slice: store the prefetched one (and its key slice, `withKeys`
    // where streamed), then read the next (`next`): here, while the slice
    // is multiplied, or without prefetch at the end of the slice
    // (`afterSlice`), just before the next one is stored.
    const sliceStep = (next: string, withKeys = false) => `
      workgroupBarrier();
      storeRowSlice(t);${withKeys && streamed ? '\n      storeKeySlice(t);' : ''}
      workgroupBarrier();
      ${prefetch ? next : ''}`;
    const afterSlice = (next: string) => prefetch ? '' : `\n      ${next}\n    `;
    // Streamed: a line reading the next key slice (`args` of fetchKeySlice
    // before t), indented by `indent`.
    const nextKeys = (args: string, indent: string) =>
        streamed ? `\n${indent}fetchKeySlice(${args}, t, hk, gr);` : '';
    // A stores its key slice beside the row slice and reads the next (K's
    // next, or V's first); B reads V's next (the next step's K is read in C).
    const storeKeysInA = streamed ? '\n      storeKeySlice(t);' : '';
    const nextInA = `fetchRowSlice(c + 1 < DC, i0, h, select(0, c + 1, c + 1 < DC), t, gr);${
        nextKeys('c + 1 < DC, j0, select(0, c + 1, c + 1 < DC)', '      ')}`;
    const nextInB = `fetchRowSlice(c + 1 >= DC, i0, h, select(c + 1, 0, c + 1 >= DC), t, gr);${
        streamed ? `
      if (c + 1 < DC) {${nextKeys('false, j0, c + 1', '        ')}
      }` :
                   ''}`;
    // C reads Q's next slice, or the next step's first (and its K slice and
    // row statistics).
    const nextInC = `if (c + 1 < DC) {
        fetchRowSlice(true, i0, h, c + 1, t, gr);
      } else if (step + 1 < steps) {
        let hn = hk * groups + (step + 1) / nBlocks;
        let iN = iLo + ((step + 1) % nBlocks) * BR;
        fetchRowSlice(true, iN, hn, 0, t, gr);${nextKeys('true, j0, 0', '        ')}
        ${fetchRowStatsWGSL('iN', 'hn', br, threads)}
      }`;
    // Key j's dims of accumulator `acc` to `out` ([B, Sk, Hk, w]).
    const storeKeyRow = (out: string, acc: string, w: string) => `
      for (var c = 0; c < DC; c++) {
        for (var n = 0; n < NQ; n++) {
          let quad = ${acc}[(c * NQ + n) * 4 + c4];
          for (var e = 0; e < 4; e++) {
            let x = (c * SW4 + kx + n * XT) * 4 + e;
            if (kx + n * XT < SW4 && x < ${w}) {
              ${out}[((gr.k0 + j) * p.headsKV + hk) * ${w} + x] = quad[e];
            }
          }
        }
      }`;
    const keyStorage = streamed ?
        `// One slice of K or V, transposed: dim x of key quad kq at keyAt(x, kq).
var<workgroup> keyS: array<vec4<f32>, ${4 * sw4 * keys.stride}>;
${keys.wgsl}` :
        `// K and V transposed, four keys per vec4: kT[x * SC + quad], rows padded
// with zeros to whole slices.
var<workgroup> kT: array<vec4<f32>, ${4 * sw4 * chunks * s.sc}>;
var<workgroup> vT: array<vec4<f32>, ${4 * sw4 * chunks * s.sc}>;`;
    const keyStream = {reg: 'keyReg', buffer: 'keyS', at: 'keyAt', pf: 'PFK'};
    const storage = `${keyStorage}
// One slice of BR query rows of Q or dO, row r's quad x at sliceAt(r, x).
var<workgroup> sliceS: array<vec4<f32>, ${br * slice.stride}>;
${slice.wgsl}
// P * keep, then dS.
var<workgroup> pS: array<vec4<f32>, ${br * s.sc}>;
var<workgroup> lseS: array<f32, BR>;
var<workgroup> deltaS: array<f32, BR>;
${sliceStreamWGSL(d, dv, {rows: sliceNames('sliceAt'), ...(streamed ? {keys: keyStream} : {})})}`;
    const consts = {
      DC: chunks,
      SW4: sw4,
      NQ: nq,
      PF: prefetchSlots(br * sw4, threads),
      ...(streamed ? {PFK: prefetchSlots(s.sc * 4 * sw4, threads)} : {}),
    };
    const padKeys = `
  // Rows past the head dims, up to whole slices: zeros.
  for (var e = t; e < (4 * SW4 * DC - 4 * D4) * SC; e += T) { kT[4 * D4 * SC + e] = vec4<f32>(0.0); }
  for (var e = t; e < (4 * SW4 * DC - 4 * DV4) * SC; e += T) { vT[4 * DV4 * SC + e] = vec4<f32>(0.0); }
`;
    this.source = gradPassWGSL(
        f, 'k', {d, dv, bc, br, threads, s, xt}, consts, storage,
        `${streamed ? '' : padKeys}
  // dkAcc[(c * NQ + n) * 4 + key]: key 4 kq + key, dims of quad
  // c * SW4 + kx + n * XT.
  var dkAcc: array<vec4<f32>, ${4 * nq * chunks}>;
  var dvAcc: array<vec4<f32>, ${4 * nq * chunks}>;
  for (var n = 0; n < ${4 * nq * chunks}; n++) {
    dkAcc[n] = vec4<f32>(0.0);
    dvAcc[n] = vec4<f32>(0.0);
  }

  let rows = fa_query_range(j0, j0 + BC, gradScoreParams(b, hk * groups));
  let iLo = rows.x;
  let iHi = rows.y - 1;
${sPhaseWGSL(s)}
  let kx = t % XT;
  let kq = t / XT;

  let nBlocks = select(0, (iHi - iLo) / BR + 1, iHi >= iLo);
  let steps = groups * nBlocks;
  var stReg: array<vec2<f32>, ${prefetchSlots(br, threads)}>;
  if (steps > 0) {
    fetchRowSlice(true, iLo, hk * groups, 0, t, gr);${nextKeys('true, j0, 0', '    ')}
    ${fetchRowStatsWGSL('iLo', 'hk * groups', br, threads)}
  }
  for (var step = 0; step < steps; step++) {
    let h = hk * groups + step / nBlocks;
    let i0 = iLo + (step % nBlocks) * BR;
    let sp = gradScoreParams(b, h);
    var s: array<vec4<f32>, MR>;
    var dp: array<vec4<f32>, MR>;
    ${f.dropout ? 'var keep: array<vec4<f32>, MR>;' : ''}
    for (var m = 0; m < MR; m++) {
      s[m] = vec4<f32>(0.0);
      dp[m] = vec4<f32>(0.0);
    }
    // A: S over the slices of Q.
    ${perSliceWGSL(chunks, `
      workgroupBarrier();
      storeRowSlice(t);${storeKeysInA}
      if (c == 0) {
        ${storeRowStatsWGSL(br, threads)}
      }
      workgroupBarrier();
      ${prefetch ? nextInA : ''}
      if (sActive) {
        ${products('s', 'kT')}
      }
    ${afterSlice(nextInA)}`)}
    // P * keep to pS; s[m] becomes P * score' * scale (0 where masked).
    if (sActive) {
      for (var m = 0; m < MR; m++) {
        let r = sRow + m;
        let i = i0 + r;
        let jq = j0 + sQuad * 4;
        ${f.dropout ? 'keep[m] = gradKeep4(b, h, i, jq);' : ''}
        var pv = vec4<f32>(0.0);
        var a = vec4<f32>(0.0);
        for (var c4 = 0; c4 < 4; c4++) {
          let j = jq + c4;
          if (i < p.seqQ && fa_visible(i, j, sp)) {
            let sc = gradScore(s[m][c4], i, j, sp);
            let prob = exp(sc.x - lseS[r]);
            pv[c4] = prob${f.dropout ? ' * keep[m][c4]' : ''};
            a[c4] = prob * sc.y * p.scale;
          }
        }
        pS[r * SC + sQuad] = pv;
        s[m] = a;
      }
    }
    // B: dP and dV over the slices of dO.
    ${perSliceWGSL(chunks, `
      ${sliceStep(nextInB, true)}
      if (sActive) {
        ${products('dp', 'vT')}
      }
      for (var r = 0; r < BR; r++) {
        let w = pS[r * SC + kq];
        ${accumulate('dvAcc')}
      }
    ${afterSlice(nextInB)}`)}
    workgroupBarrier();
    if (sActive) {
      for (var m = 0; m < MR; m++) {
        let r = sRow + m;
        let dsv = s[m] * (dp[m]${f.dropout ? ' * keep[m]' : ''} - deltaS[r]);
        pS[r * SC + sQuad] = dsv;${
            dsScratch ? `
        let i = i0 + r;
        let jq = j0 + sQuad * 4;
        ${storeDsWGSL(DKDV_DS_HEAD, 'dsv')}` :
                        ''}
      }
    }
    // C: dK over the slices of Q; the last reads the next step's first.
    ${perSliceWGSL(chunks, `
      ${sliceStep(nextInC)}
      for (var r = 0; r < BR; r++) {
        let w = pS[r * SC + kq];
        ${accumulate('dkAcc')}
      }
    ${afterSlice(nextInC)}`)}
  }

  for (var c4 = 0; c4 < 4; c4++) {
    let j = j0 + kq * 4 + c4;
    if (j < gr.rowsK) {
      ${storeKeyRow('dk', 'dkAcc', 'D')}
      ${storeKeyRow('dv', 'dvAcc', 'DV')}
    }
  }
`,
        streamed ? null : 'SC', dsScratch);
  }
}
