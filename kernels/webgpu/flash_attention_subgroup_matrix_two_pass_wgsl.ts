/**
 * WGSL shared by the two forwards built on two passes over the key tiles
 * (flash_attention_subgroup_matrix_two_pass_webgpu.ts, operands staged in
 * workgroup memory, and flash_attention_subgroup_matrix_storage_webgpu.ts,
 * operands loaded from storage): the softmax on the scores in the scratch
 * (pass 1's row statistics, pass 2's P), the rows' merge across lanes and
 * log-sum-exp, and the output through the scratch. The two differ only in
 * how the scores are unscaled and where P goes, which their callers pass.
 */
import {MatrixShape} from './subgroup_matrix';
import {matrixLoadWGSL, matrixStoreWGSL, MatrixView as View} from './subgroup_matrix_wgsl';
import {loopBoundWGSL, resultDeclWGSL, standInMmaFnWGSL} from './flash_attention_subgroup_matrix_webgpu';
import {FA_NEG_INF_BITS, maxAllWGSL as maxAll, range, VEC4_COMPONENTS as COMP} from './wgsl_snippets';

/**
 * The matrix operations both kernels write with: stand-in multiply-
 * accumulates (one function per kind of operand views, collected in
 * `standInFns` for the STANDIN_FNS mark), accumulator declarations, stores
 * to the [BR][BC] scratch `scr`, left and right f16 loads, and row block
 * rb's first row.
 */
export function twoPassMatrixOps(shape: MatrixShape) {
  const {M, N, K, standIn} = shape;
  const standInFns = new Map<string, string>();
  const standInMma = (name: string, acc: string, l: View, r: View) => {
    const fn = `sm_mma_${name}`;
    if (!standInFns.has(fn)) {
      standInFns.set(fn, standInMmaFnWGSL(shape, fn, l, r));
    }
    return `${fn}(&${acc}, ln, ${l.off}, ${r.off});`;
  };
  return {
    standInFns,
    standInMma,
    resultDecl: (name: string) => resultDeclWGSL(shape, name),
    storeScr: (acc: string, off: string) => standIn ? `sm_store_scr(&${acc}, ln, ${off});` :
                                                      matrixStoreWGSL(shape, 'scr', off, acc, 'BC'),
    left: (v: View) => matrixLoadWGSL(shape, `subgroup_matrix_left<f16, ${K}, ${M}>`, v),
    right: (v: View) => matrixLoadWGSL(shape, `subgroup_matrix_right<f16, ${N}, ${K}>`, v),
    rowOff: (rb: number) => `(g * RB + ${rb}u) * M`,
  };
}

/**
 * S = Q K^T of this subgroup's row blocks and the tile's BC keys, into the
 * scratch: Q's and K's matrices from the views `qView` and `kView` at the
 * WGSL offset prefixes `qBase` and `kBase`. On the real path Q's matrices
 * are registers qm{rb}_{ks}_{p}; `qLoads`, where given, declares them per
 * depth step (on a line of its own, empty when it returns '').
 */
export function scoreProductsWGSL(
    c: {shape: MatrixShape, rowBlocks: number, headDim: number, split: boolean},
    ops: ReturnType<typeof twoPassMatrixOps>, qView: (p: string, off: string) => View,
    kView: (p: string, off: string) => View, qBase: string, kBase: string,
    qLoads?: (ks: number) => string): string {
  const {K, standIn} = c.shape;
  const rbs = range(c.rowBlocks);
  const parts = c.split ? ['h', 'l'] : ['h'];
  const pairs = c.split ? [['l', 'h'], ['h', 'l'], ['h', 'h']] : [['h', 'h']];
  const decls = rbs.map(rb => ops.resultDecl(`s${rb}`)).join('\n      ');
  const stores =
      rbs.map(rb => ops.storeScr(`s${rb}`, `${ops.rowOff(rb)} * BC + cb * N`)).join('\n      ');
  if (standIn) {
    const lim = (n: string) => loopBoundWGSL(c.shape, n);
    return `for (var cb = 0u; cb < ${lim('BC / N')}; cb++) {
      ${decls}
      for (var ks = 0u; ks < ${lim('D / K')}; ks++) {
        ${
        rbs.flatMap(
               rb => pairs.map(
                   ([a, b]) => ops.standInMma(
                       `q${a}_k${b}`, `s${rb}`, qView(a, `${qBase}${ops.rowOff(rb)} * D + ks * K`),
                       kView(b, `${kBase}cb * N * D + ks * K`))))
            .join('\n        ')}
      }
      ${stores}
    }`;
  }
  const step = (ks: number) => `{
        ${
      parts.map(p => `let k${p} = ${ops.right(kView(p, `${kBase}cb * N * D + ${ks * K}u`))};`)
          .join('\n        ')}${qLoads == null ? '' : `\n        ${qLoads(ks)}`}
        ${
      rbs.flatMap(
             rb => pairs.map(
                 ([a, b]) => `s${rb} = subgroupMatrixMultiplyAccumulate(qm${rb}_${ks}_${a}, k${
                     b}, s${rb});`))
          .join('\n        ')}
      }`;
  return `for (var cb = 0u; cb < BC / N; cb++) {
      ${decls}
      ${range(c.headDim / K).map(step).join('\n      ')}
      ${stores}
    }`;
}

/**
 * O += P V over a tile's BC keys into the accumulators o{rb}_{cb}: P's and
 * V's matrices from the views `pView` and `vView` at the WGSL offset
 * prefixes `pBase` and `vBase`; split products as lo*hi + hi*lo + hi*hi.
 */
export function pvProductsWGSL(
    c: {shape: MatrixShape, rowBlocks: number, headDimV: number, split: boolean},
    ops: ReturnType<typeof twoPassMatrixOps>, pView: (p: string, off: string) => View,
    vView: (p: string, off: string) => View, pBase: string, vBase: string): string {
  const {N, standIn} = c.shape;
  const rbs = range(c.rowBlocks);
  const oBlocks = range(c.headDimV / N);
  const parts = c.split ? ['h', 'l'] : ['h'];
  const pairs = c.split ? [['l', 'h'], ['h', 'l'], ['h', 'h']] : [['h', 'h']];
  const pAt = (rb: number) => `${pBase}${ops.rowOff(rb)} * BC + ks * K`;
  const vAt = (cb: number) => `${vBase}ks * K * DV + ${cb * N}u`;
  if (standIn) {
    return `for (var ks = 0u; ks < ${loopBoundWGSL(c.shape, 'BC / K')}; ks++) {
      ${
        oBlocks
            .flatMap(
                cb => rbs.flatMap(
                    rb => pairs.map(
                        ([a, b]) => ops.standInMma(
                            `p${a}_v${b}`, `o${rb}_${cb}`, pView(a, pAt(rb)), vView(b, vAt(cb))))))
            .join('\n      ')}
    }`;
  }
  return `for (var ks = 0u; ks < BC / K; ks++) {
      ${
      rbs.flatMap(rb => parts.map(p => `let p${rb}${p} = ${ops.left(pView(p, pAt(rb)))};`))
          .join('\n      ')}
      ${
      oBlocks
          .map(
              cb => `{
        ${parts.map(p => `let v${p} = ${ops.right(vView(p, vAt(cb)))};`).join('\n        ')}
        ${
                  rbs.flatMap(
                         rb => pairs.map(
                             ([a, b]) => `o${rb}_${cb} = subgroupMatrixMultiplyAccumulate(p${rb}${
                                 a}, v${b}, o${rb}_${cb});`))
                      .join('\n        ')}
      }`).join('\n      ')}
    }`;
}

/** `main`'s lane in its row and row block rb's scratch row and query row. */
export function twoPassRowsWGSL(rowBlocks: number): string {
  return `let lc = ln % LPR;
  ${
      range(rowBlocks)
          .map(rb => `let rowS${rb} = ((g * RB + ${rb}u) * M + ln / LPR) * BC;
  let row${rb} = r0 + i32((g * RB + ${rb}u) * M + ln / LPR);`)
          .join('\n  ')}`;
}

/** What the two-pass softmax and epilogue depend on. */
export interface TwoPassSoftmaxConfig {
  rowBlocks: number;
  /** Pass 1 finds the row's max only (TwoPassForwardConfig.rowMaxOnly). */
  rowMaxOnly?: boolean;
  dropout: boolean;
  standIn: boolean;
  /** Matrix columns (MatrixShape.N). */
  n: number;
  /** Lanes per row. */
  lpr: number;
  /** Keys per tile. */
  bc: number;
  /** Output columns per chunk of the final store. */
  cv: number;
  /** Output columns (DV). */
  dv: number;
  /** WGSL after `scores *` undoing the operands' scales for row block rb. */
  unscale: (rb: number) => string;
  /** WGSL prefix of P's offset in its array (e.g. `POFF + `), or ''. */
  pBase: string;
  /** WGSL storing the vec4 `p` at element `at` of P (hi and lo parts). */
  storeP: string;
  /** Dropout's keep scale, applied to P (WGSL). */
  dropoutScale: string;
  /** WGSL storing accumulator `acc` to the scratch at `off`. */
  storeScr: (acc: string, off: string) => string;
  /** WGSL of row block rb's first row (in M-row units of the workgroup). */
  rowOff: (rb: number) => string;
}

export interface TwoPassSoftmaxWGSL {
  /** Pass 1 on a tile's scores: the row's max (and sum of exp). */
  pass1Stats: (rb: number) => string;
  /** After pass 1: lanes merged; the log-sum-exp, or the row's max alone. */
  afterPass1: string;
  /** Pass 2 on a tile's scores: P, stored for the P V product. */
  pass2P: (rb: number) => string;
  /** After pass 2 (rowMaxOnly): the row's sum merged, the log-sum-exp. */
  afterPass2: string;
  /** The rows' output factors, `scale` over the sum with rowMaxOnly. */
  outRows: (scale: string) => string;
  /** O out through the scratch, CV columns at a time. */
  output: string;
}

export function twoPassSoftmaxWGSL(c: TwoPassSoftmaxConfig): TwoPassSoftmaxWGSL {
  const rbs = range(c.rowBlocks);
  const nq = c.bc / (4 * c.lpr);

  // Scores of this thread's key quads for row block rb, unscaled, masked.
  const scores = (rb: number) =>
      range(nq)
          .map(
              q => `var s${rb}_${q} = vec4<f32>(0.0);
    {
      let at = rowS${rb} + 4u * (lc + LPR * ${q}u);
      s${rb}_${q} = vec4<f32>(scr[at], scr[at + 1u], scr[at + 2u], scr[at + 3u]) *${c.unscale(rb)};
      let jv = vec4<i32>(j0 + i32(4u * (lc + LPR * ${q}u))) + vec4<i32>(0, 1, 2, 3);
      // Masks only on tiles that cross a mask edge (uniform branch).
      if (full) {
        ${
                  range(4)
                      .map(
                          e => `s${rb}_${q}.${COMP[e]} = fa_score(s${rb}_${q}.${COMP[e]}, row${
                              rb}, jv.${COMP[e]}, sp);`)
                      .join('\n        ')}
      } else {
        let vis = fa_visible4(row${rb}, jv, sp);
        ${
                  range(4)
                      .map(
                          e => `s${rb}_${q}.${COMP[e]} = select(NEG, fa_score(s${rb}_${q}.${
                              COMP[e]}, row${rb}, jv.${COMP[e]}, sp), vis.${COMP[e]});`)
                      .join('\n        ')}
      }
    }`).join('\n    ');

  const rowMax = (rb: number) => maxAll(range(nq).map(
      q => `max(max(s${rb}_${q}.x, s${rb}_${q}.y), max(s${rb}_${q}.z, s${rb}_${q}.w))`));
  const pass1Stats = (rb: number) => c.rowMaxOnly ?
      `${scores(rb)}
    m${rb} = max(m${rb}, ${rowMax(rb)});` :
      `${scores(rb)}
    {
      let mx = ${rowMax(rb)};
      let mNew = max(m${rb}, mx);
      // A row with no visible key yet keeps m = NEG; subtracting 0 instead
      // sends its masked scores to exp(NEG) = 0.
      let mUse = select(mNew, 0.0, mNew < -1e29);
      l${rb} = l${rb} * exp(m${rb} - mUse)${
          range(nq)
              .map(q => ` + dot(exp(s${rb}_${q} - vec4<f32>(mUse)), vec4<f32>(1.0))`)
              .join('')};
      m${rb} = mNew;
    }`;

  // P = exp(S - lse) (or exp(S - max) with rowMaxOnly, summed here) times
  // the dropout mask, into this subgroup's rows of P.
  const pass2P = (rb: number) => `${scores(rb)}
    ${
      range(nq)
          .map(
              q => `{
      ${
                  c.rowMaxOnly ? `var p = exp(s${rb}_${q} - vec4<f32>(mRow${rb}));
      l${rb} += dot(p, vec4<f32>(1.0));` :
                                 `var p = select(vec4<f32>(0.0), exp(s${rb}_${q} - vec4<f32>(lse${
                                     rb})), vec4<bool>(l${rb} > 0.0));`}
      ${
                  c.dropout ?
                      `p = p * fa_dropout4(u32(b), u32(h), u32(row${
                          rb}), u32(j0 >> 2u) + lc + LPR * ${
                          q}u, vec2<u32>(u.seedLo, u.seedHi), u.threshold, ${c.dropoutScale});` :
                      ''}
      let at = ${c.pBase}rowS${rb} + 4u * (lc + LPR * ${q}u);
      ${c.storeP}
    }`).join('\n    ')}`;

  const lseStore = (rb: number) => `let lse${rb} = m${rb} + log(l${rb});
  if (row${rb} < u.seqQ && lc == 0u) {
    lseb[u32((b * u.heads + h) * u.seqQ + row${rb})] =
        select(${FA_NEG_INF_BITS}u, bitcast<u32>(lse${rb}), l${rb} > 0.0);
  }`;

  const afterPass1 = `// The row's (m, l) over its LPR lanes${
      c.rowMaxOnly ? ' (l is 0 here)' : ', and its log-sum-exp'}.
  ${rbs.map(rb => `var mine${rb} = m${rb};`).join('\n  ')}
  ${rbs.map(rb => mergeRowWGSL(rb, c.lpr, c.standIn)).join('\n  ')}
  ${
      c.rowMaxOnly ? rbs.map(rb => `// Rows without a visible key: every P is exp(NEG) = 0.
  let mRow${rb} = select(m${rb}, 0.0, m${rb} < -1e29);`)
                         .join('\n  ') :
                     rbs.map(lseStore).join('\n  ')}`;

  const afterPass2 = c.rowMaxOnly ?
      `// The row's sum of P over its LPR lanes (all at the row's max), the
  // log-sum-exp.
  ${rbs.map(rb => `mine${rb} = m${rb};`).join('\n  ')}
  ${rbs.map(rb => mergeRowWGSL(rb, c.lpr, c.standIn)).join('\n  ')}
  ${rbs.map(lseStore).join('\n  ')}` :
      '';

  const outRows = (scale: string) =>
      rbs.map(
             rb => c.rowMaxOnly ? `let oRow${rb} = select(0.0, ${scale} / l${rb}, l${rb} > 0.0);` :
                                  `let oRow${rb} = ${scale};`)
          .join('\n  ');

  const outChunk = (ch: number) => {
    const blocks = range(c.cv / c.n).map(x => ch * c.cv / c.n + x);
    return `workgroupBarrier();
  ${
        rbs.flatMap(
               rb => blocks.map(
                   (cb, x) => c.storeScr(`o${rb}_${cb}`, `${c.rowOff(rb)} * BC + ${x * c.n}u`)))
            .join('\n  ')}
  workgroupBarrier();
  ${
        rbs.map(
               rb => `if (row${rb} < u.seqQ) {
    let outRow = u32((b * u.seqQ + row${rb}) * u.heads + h);
    ${
                   range(c.cv / (4 * c.lpr))
                       .map(x => `{
      let at = rowS${rb} + 4u * (lc + LPR * ${x}u);
      outb[outRow * DV4 + ${ch * c.cv / 4}u + lc + LPR * ${x}u] =
          vec4<f32>(scr[at], scr[at + 1u], scr[at + 2u], scr[at + 3u]) * oRow${rb};
    }`).join('\n    ')}
  }`).join('\n  ')}`;
  };

  return {
    pass1Stats,
    afterPass1,
    pass2P,
    afterPass2,
    outRows,
    output: range(c.dv / c.cv).map(outChunk).join('\n  '),
  };
}

/**
 * WGSL merging the row's per-lane (m, l) partials of row block rb (each
 * lane's l at its own m) into the row's max and sum at that max, on every
 * lane of the row: subgroup shuffles on the real path, workgroup memory
 * (`red`) in the stand-in.
 */
export function mergeRowWGSL(rb: number, lpr: number, standIn: boolean): string {
  if (lpr === 1) {
    return '';
  }
  const m = `m${rb}`;
  const l = `l${rb}`;
  if (!standIn) {
    return range(Math.log2(lpr))
        .map(i => `{
    let mo = subgroupShuffleXor(${m}, ${1 << i}u);
    let lo = subgroupShuffleXor(${l}, ${1 << i}u);
    let mNew = max(${m}, mo);
    let mUse = select(mNew, 0.0, mNew < -1e29);
    ${l} = ${l} * exp(${m} - mUse) + lo * exp(mo - mUse);
    ${m} = mNew;
  }`).join('\n  ');
  }
  const lanes = range(lpr).map(x => `red[g * LANES + ln - lc + ${x}u]`);
  return `workgroupBarrier();
  red[g * LANES + ln] = ${m};
  workgroupBarrier();
  ${m} = ${maxAll(lanes)};
  workgroupBarrier();
  red[g * LANES + ln] = ${l} * exp(mine${rb} - select(${m}, 0.0, ${m} < -1e29));
  workgroupBarrier();
  ${l} = ${lanes.join(' + ')};`;
}
