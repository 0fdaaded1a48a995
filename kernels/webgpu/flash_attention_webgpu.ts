/**
 * The fused FlashAttention forward program in WGSL (FlashAttention-2's
 * forward: one pass over K/V per query tile, online softmax in f32).
 *
 * One workgroup owns BR query rows of one (batch, head) and walks the key
 * tiles of BC keys that any of its rows can see (tiles that the causal or
 * window mask hides completely are never visited). Per key tile:
 *   S = Q K^T        Q tile and K tile in workgroup memory, each thread a
 *                    TM x (4*NQ) register tile of S
 *   scores           scale -> softcap -> alibi -> mask (mask only on tiles
 *                    that cross a boundary), then the running row max
 *                    (reduced over the TX threads of a row by subgroup
 *                    shuffles, or through workgroup memory without them)
 *   P = exp(S - m)   rescales the running sum and output; dropout applied
 *                    to P (not to the sum), bits from Philox as the reference
 *   O += P V         P through workgroup memory; V replaces K in the same
 *                    buffer; each thread a TM x (4*NJ) register tile of O
 * Global loads of the next K tile (and of this tile's V) are issued into
 * registers before the math that precedes their use, so their latency
 * overlaps it.
 *
 * Threads: TX per row group x TY row groups; thread (ty, tx) owns rows
 * ty + TY*i (i < TM), key columns 4*(tx + TX*q) + e (q < NQ, e < 4: whole
 * quads, so one Philox call gives a thread's 4 dropout bits) and output
 * columns 4*(tx + TX*jj) + e. K rows in workgroup memory are XOR-swizzled
 * per quad so that the TX threads reading different keys hit different
 * banks.
 *
 * Outer-product mode (ForwardTiles.outer): Q^T, K^T and P^T live in
 * workgroup memory instead, thread rows are 4 * (ty + TY * a) + b, keys
 * whole quads; each head-dim step (and each key of P V) is one vec4 load
 * per 4 rows and per 4 keys (columns) and their outer product, which cuts
 * the workgroup-memory loads per FMA (see outerParts in forwardWGSL).
 * P^T's row quads are XOR-swizzled by key quad (swizzleP), so that its
 * stores do not all land in one bank.
 */
import {dropoutWGSL, FA_NEG_BIG, FA_NEG_INF_BITS, keyRangeWGSL, philoxWGSL, scoreKey, ScoreOptions, scoreWGSL} from './wgsl_snippets';

/** The register/workgroup tiling of one pipeline. */
export interface ForwardTiles {
  /** Rows per thread. */
  tm: number;
  /** Threads sharing a row (a power of two). */
  tx: number;
  /** Key quads per thread: BC = 4 * TX * NQ. */
  nq: number;
  /** Row groups: BR = TM * TY; threads = TX * TY. */
  ty: number;
  /**
   * Outer-product mode (TM a multiple of 4): Q^T, K^T and P^T in workgroup
   * memory, so that per head-dim step (and per key in P V) a thread loads
   * one vec4 per 4 rows and one per 4 keys (or 4 output columns) and does
   * their outer product. K^T and V take turns in one buffer (less
   * workgroup memory, more workgroups per SM, for a third barrier per key
   * tile). Rows of a thread: 4 * (ty + TY * a) + b.
   */
  outer?: boolean;
}

/** Everything baked into one forward pipeline. */
export interface ForwardConfig {
  headDim: number;
  headDimV: number;
  tiles: ForwardTiles;
  score: ScoreOptions;
  /** 0 none, 1 slopes [H], 2 slopes [B, H]. */
  alibiMode: 0|1|2;
  dropout: boolean;
  /** Row reductions by subgroupShuffleXor (needs TX <= subgroup size). */
  subgroups: boolean;
  /** Heaviest query tiles first (causal-like masks). */
  reverseRows: boolean;
  /**
   * Split-KV (flash-decoding): the key tiles of a query tile are divided
   * among `u.numSplits` workgroups, each writing its normalized partial
   * output and log-sum-exp at `split * u.splitRows` / `split * u.splitLse`;
   * splitCombineWGSL merges them. Gives short sequences and small
   * batch x heads enough workgroups to fill the GPU.
   */
  splitKeys?: boolean;
  /**
   * Inner loop bounds from uniforms instead of constants: software
   * rasterizers (SwiftShader) unroll constant loops fully, which makes
   * pipeline creation take minutes.
   */
  runtimeLoops: boolean;
  /** Register prefetch of K/V forced on/off (tests; default usePrefetch). */
  prefetch?: boolean;
}

export interface TileSizes {
  br: number;
  bc: number;
  threads: number;
  dq4: number;
  dv4: number;
  nj: number;
  kvw: number;
  /** Outer mode: the V row stride in vec4s (every thread's columns). */
  vw: number;
}

export function tileSizes(c: {headDim: number, headDimV: number, tiles: ForwardTiles}): TileSizes {
  const {tm, tx, nq, ty} = c.tiles;
  const dq4 = Math.ceil(c.headDim / 4);
  const dv4 = Math.ceil(c.headDimV / 4);
  const nj = Math.ceil(dv4 / tx);
  return {
    br: tm * ty,
    bc: 4 * tx * nq,
    threads: tx * ty,
    dq4,
    dv4,
    nj,
    kvw: Math.max(dq4, tx * nj),
    vw: tx * nj
  };
}

/** Bytes of workgroup memory a configuration uses. */
export function workgroupBytes(
    c: {headDim: number, headDimV: number, tiles: ForwardTiles}, subgroups: boolean): number {
  const s = tileSizes(c);
  const red = subgroups ? 0 : s.br * c.tiles.tx * 4;
  if (c.tiles.outer) {
    // Q^T, K^T and V (one buffer for both) and P^T.
    const kv = Math.max(s.bc * s.dq4, s.bc * s.vw);
    return 16 * (s.br * s.dq4 + kv) + 4 * s.br * s.bc + red;
  }
  // K/V rows padded by one vec4 (the non-dropout layout, see forwardWGSL).
  return 16 * (s.br * s.dq4 + s.bc * (s.kvw + 1)) + 4 * s.br * s.bc + red;
}

/** Floats per thread that the register prefetch of K and V needs. */
export function prefetchFloats(c: {headDim: number, headDimV: number, tiles: ForwardTiles}):
    number {
  const s = tileSizes(c);
  return 4 * (Math.ceil(s.bc * s.dq4 / s.threads) + Math.ceil(s.bc * s.dv4 / s.threads));
}

/**
 * Global loads of K/V go through registers ahead of their use unless that
 * takes too many registers (large head dims) or loops are not unrolled.
 */
export function usePrefetch(c: ForwardConfig): boolean {
  return !c.runtimeLoops && (c.prefetch ?? prefetchFloats(c) <= 64);
}

export function forwardKey(c: ForwardConfig): string {
  const t = c.tiles;
  const tiling = `tm${t.tm}tx${t.tx}nq${t.nq}ty${t.ty}${t.outer ? 'o' : ''}`;
  const flags = `al${c.alibiMode}_do${+ c.dropout}_sg${+ c.subgroups}_rv${+ c.reverseRows}_rl${
      + c.runtimeLoops}_pf${c.prefetch ?? '-'}_sk${+ !!c.splitKeys}`;
  return `fa_fwd_d${c.headDim}_dv${c.headDimV}_${tiling}_${scoreKey(c.score)}_${flags}`;
}

/** Field order of the uniform struct (all 4-byte scalars). */
export const FORWARD_UNIFORMS = [
  ['seqQ', 'i32'],     ['seqK', 'i32'],      ['heads', 'i32'],       ['groups', 'i32'],
  ['headsKV', 'i32'],  ['numQTiles', 'i32'], ['totalGroups', 'i32'], ['gridX', 'i32'],
  ['scale', 'f32'],    ['softcap', 'f32'],   ['left', 'i32'],        ['right', 'i32'],
  ['seedLo', 'u32'],   ['seedHi', 'u32'],    ['threshold', 'u32'],   ['keepScale', 'f32'],
  ['loopDQ4', 'i32'],  ['loopBC4', 'i32'],   ['numSplits', 'i32'],   ['splitRows', 'i32'],
  ['splitLse', 'i32'],
] as const;

function range(n: number): number[] {
  return Array.from({length: n}, (_, i) => i);
}

const COMP = ['x', 'y', 'z', 'w'];

/** max() of all terms as a balanced tree. */
function maxAll(terms: string[]): string {
  if (terms.length === 1) {
    return terms[0];
  }
  const half = Math.ceil(terms.length / 2);
  return `max(${maxAll(terms.slice(0, half))}, ${maxAll(terms.slice(half))})`;
}

/**
 * WGSL of 4 consecutive elements (chunk `chunk`) of row `rowIndex` of a
 * scalar array of row width `width`, zeros past the row's end (head dims
 * that are not a multiple of 4).
 */
function scalarQuad(buf: string, rowIndex: string, chunk: string, width: number): string {
  const element = (e: number) => `select(0.0, ${buf}[min((${rowIndex}) * ${width}u + ${
      chunk} * 4u + ${e}u, arrayLength(&${buf}) - 1u)], ${chunk} * 4u + ${e}u < ${width}u)`;
  return `vec4<f32>(${range(4).map(element).join(', ')})`;
}

export function forwardWGSL(c: ForwardConfig): string {
  const t = c.tiles;
  const {br, bc, threads, dq4, dv4, nj, kvw, vw} = tileSizes(c);
  const outer = t.outer === true;
  if (outer && t.tm % 4 !== 0) {
    throw new Error(
        `FlashAttention forward: the outer-product tiling needs TM % 4 == 0, got ${t.tm}`);
  }
  // Workgroup-tile row of a thread's i-th row.
  const rowOf = (i: number) =>
      outer ? `(4u * (ty + TY * ${i >> 2}u) + ${i & 3}u)` : `(ty + TY * ${i}u)`;
  const vecQK = c.headDim % 4 === 0;
  const vecV = c.headDimV % 4 === 0;
  // Swizzle width: the largest power of two <= 8 that divides DQ4, so that
  // chunk ^ key stays inside the row.
  let swz = 1;
  while (swz < 8 && dq4 % (swz * 2) === 0) {
    swz *= 2;
  }
  const swm = swz - 1;
  const rowsI = range(t.tm);
  const quads = range(t.nq);
  const outJ = range(nj);
  const bindings: string[] = [];
  let binding = 0;
  const qkType = vecQK ? 'vec4<f32>' : 'f32';
  bindings.push(`@group(0) @binding(${binding++}) var<storage, read> qb: array<${qkType}>;`);
  bindings.push(`@group(0) @binding(${binding++}) var<storage, read> kb: array<${qkType}>;`);
  const vType = vecV ? 'vec4<f32>' : 'f32';
  bindings.push(`@group(0) @binding(${binding++}) var<storage, read> vb: array<${vType}>;`);
  if (c.alibiMode !== 0) {
    bindings.push(`@group(0) @binding(${binding++}) var<storage, read> slopes: array<f32>;`);
  }
  if (c.score.seqlens) {
    // (seqlenQ_b, seqlenK_b) per batch row.
    bindings.push(`@group(0) @binding(${binding++}) var<storage, read> seqlens: array<i32>;`);
  }
  bindings.push(`@group(0) @binding(${binding++}) var<storage, read_write> outb: array<${vType}>;`);
  bindings.push(`@group(0) @binding(${binding++}) var<storage, read_write> lseb: array<u32>;`);
  bindings.push(`@group(0) @binding(${binding++}) var<uniform> u: Uniforms;`);

  // Row bases are in vec4 units when the head dim is a multiple of 4, else
  // in units of "rows": for the scalar path rowVec * 4 would be wrong, so
  // scalar paths pass a float index divided by 4 only when exact. To keep
  // one code path, scalar rows use base = row * D and index base + 4c + e.
  const qkRowBase = (rowIndex: string) => vecQK ? `(${rowIndex}) * ${dq4}u` : `(${rowIndex})`;
  const loadQKRow = (buf: string, rowIndex: string, chunk: string) => vecQK ?
      `${buf}[${qkRowBase(rowIndex)} + ${chunk}]` :
      scalarQuad(buf, rowIndex, chunk, c.headDim);
  const loadVRow = (rowIndex: string, chunk: string) => vecV ?
      `vb[(${rowIndex}) * ${dv4}u + ${chunk}]` :
      scalarQuad('vb', rowIndex, chunk, c.headDimV);


  const nKLoads = Math.ceil(bc * dq4 / threads);
  const nVLoads = Math.ceil(bc * dv4 / threads);
  const nQLoads = Math.ceil(br * dq4 / threads);

  const kRow = (j: string) => `u32((b * u.seqK + ${j}) * u.headsKV + hk)`;
  // Key columns of a thread: with dropout, whole quads 4*(tx + TX*q) + e
  // (one Philox call per quad), K rows XOR-swizzled per quad against bank
  // conflicts; without, columns tx + TX*(4q + e), K rows padded by a vec4.
  const quadCols = c.dropout || outer;
  const kvStride = quadCols ? kvw : kvw + 1;
  const kSwizzled = (key: string, ch: string) =>
      quadCols ? `${key} * KVW + ((${ch}) ^ ((${key} >> 2u) & ${swm}u))` : `${key} * KVW + ${ch}`;
  const colOf = (q: number, e: number) =>
      quadCols ? `(4u * (tx + TX * ${q}u) + ${e}u)` : `(tx + TX * ${4 * q + e}u)`;
  const prefetch = usePrefetch(c);
  const prologueK = !prefetch ? '' : `// Prefetch of the first K tile into registers.
  ${range(nKLoads).map(n => `var kr${n} = vec4<f32>(0.0);`).join(' ')}
  ${range(nVLoads).map(n => `var vr${n} = vec4<f32>(0.0);`).join(' ')}
  if (tBegin < tEnd) {
    let j0 = tBegin * i32(BC);
    ${range(nKLoads).map(n => `{
      let idx = lid + THREADS * ${n}u;
      let j = j0 + i32(idx / DQ4);
      if (idx < BC * DQ4 && j < u.seqK) {
        kr${n} = ${loadQKRow('kb', kRow('j'), '(idx % DQ4)')};
      }
    }`).join('\n    ')}
  }`;
  const storeK = prefetch ? `// K tile: registers -> workgroup memory, swizzled per key quad.
    ${range(nKLoads).map(n => `{
      let idx = lid + THREADS * ${n}u;
      if (idx < BC * DQ4) {
        kvs[${kSwizzled('(idx / DQ4)', 'idx % DQ4')}] = kr${n};
      }
    }`).join('\n    ')}` :
                            `// K tile -> workgroup memory, swizzled per key quad.
    for (var idx = lid; idx < BC * DQ4; idx += THREADS) {
      let key = idx / DQ4;
      let j = j0 + i32(key);
      var val = vec4<f32>(0.0);
      if (j < u.seqK) {
        val = ${loadQKRow('kb', kRow('j'), '(idx % DQ4)')};
      }
      kvs[${kSwizzled('key', 'idx % DQ4')}] = val;
    }`;
  const loadV = !prefetch ? '' : `// This tile's V into registers (stored after S is done with K).
    ${range(nVLoads).map(n => `{
      let idx = lid + THREADS * ${n}u;
      let j = j0 + i32(idx / DV4);
      vr${n} = vec4<f32>(0.0);
      if (idx < BC * DV4 && j < u.seqK) {
        vr${n} = ${loadVRow(kRow('j'), '(idx % DV4)')};
      }
    }`).join('\n    ')}`;
  const storeV = prefetch ? range(nVLoads)
                                .map(n => `{
      let idx = lid + THREADS * ${n}u;
      if (idx < BC * DV4) {
        kvs[(idx / DV4) * KVW + idx % DV4] = vr${n};
      }
    }`).join('\n    ') :
                            `for (var idx = lid; idx < BC * DV4; idx += THREADS) {
      let j = j0 + i32(idx / DV4);
      var val = vec4<f32>(0.0);
      if (j < u.seqK) {
        val = ${loadVRow(kRow('j'), '(idx % DV4)')};
      }
      kvs[(idx / DV4) * KVW + idx % DV4] = val;
    }`;
  const nextK = !prefetch ? '' : `// Next K tile into registers.
    if (kt + 1 < tEnd) {
      let jn = j0 + i32(BC);
      ${range(nKLoads).map(n => `{
        let idx = lid + THREADS * ${n}u;
        let j = jn + i32(idx / DQ4);
        kr${n} = vec4<f32>(0.0);
        if (idx < BC * DQ4 && j < u.seqK) {
          kr${n} = ${loadQKRow('kb', kRow('j'), '(idx % DQ4)')};
        }
      }`).join('\n      ')}
    }`;

  // S += Q K^T over head-dim chunks, as FMA chains (a dot() would round
  // differently and cost an extra multiply). Unrolled x4 at small head dims,
  // so that offsets become constants; at larger ones the hoisted loads of an
  // unrolled loop cost more than they save (benchmarks/RESULTS.md).
  const qkUnroll = !c.runtimeLoops && dq4 % 4 === 0 && dq4 <= 16 ? 4 : 1;
  const qkBody = (ch: string) => `{
      ${rowsI.map(i => `let a${i} = qs[qBase${i} + ${ch}];`).join('\n      ')}
      ${
      quads
          .map(
              q => range(4)
                       .map(
                           e => `{
        let kv = kvs[kOff${q}_${e} + ${quadCols ? `((${ch}) ^ kSw${q})` : ch}];
        ${
                               rowsI
                                   .map(
                                       i => `s${i}_${q}.${COMP[e]} = fma(a${i}.w, kv.w, fma(a${
                                           i}.z, kv.z, fma(a${i}.y, kv.y, fma(a${i}.x, kv.x, s${
                                           i}_${q}.${COMP[e]}))));`)
                                   .join('\n        ')}
      }`).join('\n      '))
          .join('\n      ')}
    }`;
  const qkLoop = `${rowsI.map(i => `let qBase${i} = (ty + TY * ${i}u) * DQ4;`).join(' ')}
    for (var ch = 0u; ch < ${c.runtimeLoops ? 'u32(u.loopDQ4)' : 'DQ4'}; ch += ${qkUnroll}u) {
      ${range(qkUnroll).map(x => qkBody(x === 0 ? 'ch' : `ch + ${x}u`)).join('\n      ')}
    }`;
  const reduce = (v: string, op: 'max'|'add') => {
    const lines: string[] = [];
    for (let o = 1; o < t.tx; o *= 2) {
      lines.push(
          op === 'max' ? `${v} = max(${v}, subgroupShuffleXor(${v}, ${o}u));` :
                         `${v} = ${v} + subgroupShuffleXor(${v}, ${o}u);`);
    }
    return lines.join('\n      ');
  };
  /** Reduce per-thread values `vals[i]` over the TX threads of each row. */
  const rowReduce = (vals: string[], op: 'max'|'add') => {
    if (t.tx === 1) {
      return '';
    }
    if (c.subgroups) {
      return vals.map(v => reduce(v, op)).join('\n      ');
    }
    const combine = (a: string, b: string) => op === 'max' ? `max(${a}, ${b})` : `(${a} + ${b})`;
    return `${
        vals.map((v, i) => `red[(ty + ${t.ty}u * ${i}u) * ${t.tx}u + tx] = ${v};`).join('\n      ')}
      workgroupBarrier();
      ${
        vals.map((v, i) => {
              const base = `(ty + ${t.ty}u * ${i}u) * ${t.tx}u`;
              let expr = `red[${base}]`;
              for (let x = 1; x < t.tx; x++) {
                expr = combine(expr, `red[${base} + ${x}u]`);
              }
              return `${v} = ${expr};`;
            })
            .join('\n      ')}`;
  };

  const scoreLines: string[] = [];
  for (const i of rowsI) {
    for (const q of quads) {
      for (const e of range(4)) {
        const acc = `s${i}_${q}.${COMP[e]}`;
        const j = `(j0 + i32(${colOf(q, e)}))`;
        const needsPos = c.score.alibi || c.score.softcap;
        if (needsPos) {
          scoreLines.push(`${acc} = fa_score(${acc}, row${i}, ${j}, sp);`);
        }
        if (e === 0) {
          const offsets = quadCols ? '0, 1, 2, 3' : `0, ${t.tx}, ${2 * t.tx}, ${3 * t.tx}`;
          scoreLines.push(`if s${i}_${q} = select(vec4<f32>(NEG), s${i}_${q}, fa_visible4(row${
              i}, vec4<i32>(${j}) + vec4<i32>(${offsets}), sp));`);
        }
      }
    }
  }
  const plainScale = !(c.score.alibi || c.score.softcap);


  /**
   * The outer-product mode's storage, Q load and key loop. Per key tile:
   *   barrier A; V_t -> vs (PV of the last tile is done); next K -> regs;
   *   S = Q K^T; softmax; P^T -> ps; barrier B; K_t+1 -> ks (S is done);
   *   next V -> regs; O += P V.
   * Q^T/K^T are stored with the row/key index fastest, so that the scalar
   * stores of a warp hit consecutive banks.
   */
  function outerParts(): {outerDecls: string, outerQLoad: string, outerLoop: string} {
    const rq = range(t.tm / 4);
    // P^T rows XOR-swizzled per key quad, so that the P^T stores of the TX
    // threads of a row group (keys 4 apart: one bank unswizzled) hit
    // different banks: row quad ^ ((key >> 2) & mask) stays inside the
    // BR / 4 quads of a key (mask + 1 a power of two <= 8 dividing BR / 4).
    let pSwizzle = 1;
    while (pSwizzle < 8 && (br / 4) % (pSwizzle * 2) === 0) {
      pSwizzle *= 2;
    }
    const pSwizzleMask = pSwizzle - 1;
    const ksName = 'kvs';
    const vsName = 'kvs';
    const outerDecls = `var<workgroup> qs: array<vec4<f32>, ${br * dq4}>;  // Q^T [4 DQ4][BR]
var<workgroup> kvs: array<vec4<f32>, ${Math.max(bc * dq4, bc * vw)}>;  // K^T, then V [BC][VW]
var<workgroup> ps: array<vec4<f32>, ${br * bc / 4}>;  // P^T [BC][BR]
const VW = ${vw}u;`;
    const scatter = (arr: string, width: string, ch: string, pos: string, val: string) =>
        range(4)
            .map(
                e => `${arr}[(4u * ${ch} + ${e}u) * (${width} / 4u) + ${pos} / 4u][${pos} % 4u] = ${
                    val}.${COMP[e]};`)
            .join(' ');
    const outerQLoad = `// Q^T tile -> workgroup memory (rows past seqQ are zeros).
  for (var n = 0u; n < ${nQLoads}u; n++) {
    let idx = lid + THREADS * n;
    if (idx < BR * DQ4) {
      let r = idx % BR;
      let ch = idx / BR;
      let row = r0 + i32(r);
      var val = vec4<f32>(0.0);
      if (row < u.seqQ) {
        val = ${loadQKRow('qb', `u32((b * u.seqQ + row) * u.heads + h)`, 'ch')};
      }
      ${scatter('qs', 'BR', 'ch', 'r', 'val')}
    }
  }`;
    // K element idx: key idx % BC, chunk idx / BC; V: key idx / DV4, chunk idx % DV4.
    const kLoad = (jBase: string, idx: string) => `{
        let j = ${jBase} + i32(${idx} % BC);
        if (${idx} < BC * DQ4 && j < u.seqK) {
          val = ${loadQKRow('kb', kRow('j'), `(${idx} / BC)`)};
        }
      }`;
    const vLoad = (jBase: string, idx: string) => `{
        let j = ${jBase} + i32(${idx} / DV4);
        if (${idx} < BC * DV4 && j < u.seqK) {
          val = ${loadVRow(kRow('j'), `(${idx} % DV4)`)};
        }
      }`;
    const kStore = (idx: string, val: string) => `if (${idx} < BC * DQ4) { ${
        scatter(ksName, 'BC', `(${idx} / BC)`, `(${idx} % BC)`, val)} }`;
    const vStore = (idx: string, val: string) =>
        `if (${idx} < BC * DV4) { ${vsName}[(${idx} / DV4) * VW + ${idx} % DV4] = ${val}; }`;
    type Load = (jBase: string, idx: string) => string;
    type Store = (idx: string, val: string) => string;
    // Direct (no prefetch): global -> workgroup memory for tile jBase.
    const direct = (load: Load, store: Store, items: string) => (jBase: string) =>
        `for (var idx = lid; idx < ${items}; idx += THREADS) {
      var val = vec4<f32>(0.0);
      ${load(jBase, 'idx')}
      ${store('idx', 'val')}
    }`;
    // Prefetch: global -> registers `${reg}N`, later registers -> workgroup memory.
    const toRegs = (load: Load, reg: string, n: number) => (jBase: string) => range(n)
                                                                                  .map(i => `{
      let idx = lid + THREADS * ${i}u;
      var val = vec4<f32>(0.0);
      ${load(jBase, 'idx')}
      ${reg}${i} = val;
    }`).join('\n    ');
    const fromRegs = (store: Store, reg: string, n: number, sep: string) => range(n)
                                                                                .map(i => `{
      let idx = lid + THREADS * ${i}u;
      ${store('idx', `${reg}${i}`)}
    }`).join(sep);
    const kDirect = direct(kLoad, kStore, 'BC * DQ4');
    const vDirect = direct(vLoad, vStore, 'BC * DV4');
    const kRegs = toRegs(kLoad, 'kr', nKLoads);
    const vRegs = toRegs(vLoad, 'vr', nVLoads);
    const kFromRegs = fromRegs(kStore, 'kr', nKLoads, '\n      ');
    const vFromRegs = fromRegs(vStore, 'vr', nVLoads, '\n    ');

    // Head-dim steps per loop iteration (must divide 4 * DQ4).
    const headSteps = 4 * dq4;
    // P V keys per loop iteration (power of two >= 4, so that the P^T
    // swizzle XOR is hoisted); software devices keep x8 at most: big
    // unrolled bodies compile slowly there.
    const pvUnroll = !c.runtimeLoops && bc % 16 === 0 ? 16 : bc % 8 === 0 ? 8 : 4;
    const qkSteps = headSteps % 8 === 0 ? 8 : 4;
    const qkStep = (d: string) => `{
        ${rq.map(a => `let a${a} = qs[(${d}) * (BR / 4u) + ty + TY * ${a}u];`).join('\n        ')}
        ${
        quads.map(q => `let k${q} = ${ksName}[(${d}) * (BC / 4u) + tx + TX * ${q}u];`)
            .join('\n        ')}
        ${
        rowsI
            .map(
                i => quads
                         .map(
                             q => `s${i}_${q} = fma(vec4<f32>(a${i >> 2}.${COMP[i & 3]}), k${q}, s${
                                 i}_${q});`)
                         .join(' '))
            .join('\n        ')}
      }`;
    // Keys of one P V iteration: key0 (a multiple of UP) + x, x < UP, so
    // ((key0 + x) >> 2) & MASK
    //     = ((key0 >> 2) & MASK & ~(UP / 4 - 1)) | ((x >> 2) & MASK):
    // per iteration one XOR per row quad, per key a constant one (UP a
    // power of two >= 4; otherwise the XOR is computed per key).
    const hoistSwizzle = pSwizzleMask !== 0 && pvUnroll >= 4 && (pvUnroll & (pvUnroll - 1)) === 0;
    const plainRow = (a: number) => `ty + TY * ${a}u`;
    // P^T row quad `a` of key `key` (the x-th of its iteration).
    const pRow = (a: number, key: string, x: number) => pSwizzleMask === 0 ? plainRow(a) :
        hoistSwizzle ? `(pr${a} ^ ${(x >> 2) & pSwizzleMask}u)` :
                       `((${plainRow(a)}) ^ (((${key}) >> 2u) & ${pSwizzleMask}u))`;
    // P^T row quad `a` for the keys of this thread's key quad `q`.
    const pStoreRow = (a: number, q: number) => pSwizzleMask === 0 ?
        plainRow(a) :
        `((${plainRow(a)}) ^ ((tx + TX * ${q}u) & ${pSwizzleMask}u))`;
    const pvStep = (key: string, x: number) => `{
        ${
        rq.map(a => `let p${a} = ps[(${key}) * (BR / 4u) + ${pRow(a, key, x)}];`)
            .join('\n        ')}
        ${
        outJ.map(jj => `let v${jj} = ${vsName}[(${key}) * VW + tx + TX * ${jj}u];`)
            .join('\n        ')}
        ${
        rowsI
            .map(
                i => outJ.map(
                             jj => `o${i}_${jj} = fma(vec4<f32>(p${i >> 2}.${COMP[i & 3]}), v${
                                 jj}, o${i}_${jj});`)
                         .join(' '))
            .join('\n        ')}
      }`;
    const pStore =
        rq.map(
              a => quads
                       .map(
                           q => range(4)
                                    .map(
                                        e => `ps[(4u * (tx + TX * ${q}u) + ${e}u) * (BR / 4u) + ${
                                            pStoreRow(a, q)}] = vec4<f32>(${
                                            range(4)
                                                .map(b => `s${4 * a + b}_${q}.${COMP[e]}`)
                                                .join(', ')});`)
                                    .join('\n    '))
                       .join('\n    '))
            .join('\n    ');

    const qkLoopOuter = `// S = Q K^T: per head-dim step, outer products of 4 rows x 4 keys.
    ${sInit}
    for (var d = 0u; d < ${c.runtimeLoops ? 'u32(u.loopDQ4) * 4u' : `${headSteps}u`};
         d += ${qkSteps}u) {
      ${range(qkSteps).map(x => qkStep(x === 0 ? 'd' : `d + ${x}u`)).join('\n      ')}
    }`;
    const pvLoopOuter = `// O += P V: per key, outer products of 4 rows x 4 output columns.
    for (var key = 0u; key < ${c.runtimeLoops ? 'u32(u.loopBC4) * 4u' : 'BC'};
         key += ${pvUnroll}u) {
      ${
    !hoistSwizzle ? '' :
                    rq.map(
                          a => `let pr${a} = (ty + TY * ${a}u) ^ ((key >> 2u) & ${
                              pSwizzleMask & ~(pvUnroll / 4 - 1)}u);`)
                        .join(' ')}
      ${
        range(pvUnroll)
            .map(x => pvStep(x === 0 ? 'key' : `key + ${x}u`, x))
            .join('\n      ')}
    }`;
    const regDecls = prefetch ?
        `${range(nKLoads).map(n => `var kr${n} = vec4<f32>(0.0);`).join(' ')}
  ${range(nVLoads).map(n => `var vr${n} = vec4<f32>(0.0);`).join(' ')}` :
        '';
    // Like the classic loop: K^T and V take turns in one buffer.
    const outerLoop = `${regDecls}
  ${
        prefetch ? `if (tBegin < tEnd) {
    let jb = tBegin * i32(BC);
    ${kRegs('jb')}
  }` :
                   ''}

  for (var kt = tBegin; kt < tEnd; kt++) {
    let j0 = kt * i32(BC);
    let more = kt + 1 < tEnd;
    workgroupBarrier();
    ${prefetch ? kFromRegs : kDirect('j0')}
    ${prefetch ? vRegs('j0') : ''}
    workgroupBarrier();

    ${qkLoopOuter}

    ${softmaxCode}
    workgroupBarrier();
    // V over K^T, P^T -> workgroup memory; the next K tile into registers.
    ${prefetch ? vFromRegs : vDirect('j0')}
    ${pStore}
    ${
        prefetch ? `if (more) {
      ${kRegs('j0 + i32(BC)')}
    }` :
                   ''}
    workgroupBarrier();

    ${pvLoopOuter}
  }
`;
    return {outerDecls, outerQLoad, outerLoop};
  }

  const sInit =
      rowsI.map(i => quads.map(q => `var s${i}_${q} = vec4<f32>(0.0);`).join(' ')).join('\n    ');
  const softmaxCode = `// Scores, then the online softmax. Only tiles that cross the edge of
    // the keys or of the window need the mask.
    let fullTile = fa_tile_unmasked(r0, rEnd, j0, j0 + i32(BC), sp);
    ${
      !plainScale ? '' :
                    rowsI.map(i => quads.map(q => `s${i}_${q} = s${i}_${q} * u.scale;`).join(' '))
                        .join('\n    ')}
    ${scoreLines.filter(l => !l.startsWith('if')).join('\n    ')}
    if (!fullTile) {
      ${scoreLines.filter(l => l.startsWith('if')).map(l => l.slice(3)).join('\n      ')}
    }
    ${
      rowsI
          .map(i => `var mx${i} = ${maxAll(quads.flatMap(q => COMP.map(x => `s${i}_${q}.${x}`)))};`)
          .join('\n    ')}
    ${rowReduce(rowsI.map(i => `mx${i}`), 'max')}
    ${
      rowsI
          .map(
              i => `{
      let mNew = max(m${i}, mx${i});
      // A row that has seen no visible key keeps m = NEG exactly;
      // subtracting 0 instead sends its masked scores to exp(NEG) = 0.
      let mUse = select(mNew, 0.0, mNew == NEG);
      let alpha = select(exp(m${i} - mUse), 0.0, m${i} == NEG);
      m${i} = mNew;
      ${quads.map(q => `s${i}_${q} = exp(s${i}_${q} - vec4<f32>(mUse));`).join('\n      ')}
      l${i} = l${i} * alpha${quads.map(q => ` + dot(s${i}_${q}, vec4<f32>(1.0))`).join('')};
      ${outJ.map(jj => `o${i}_${jj} = o${i}_${jj} * alpha;`).join(' ')}
      ${
                  !c.dropout ?
                      '' :
                      quads
                          .map(
                              q => `s${i}_${q} = s${i}_${q} * fa_dropout4(u32(b), u32(h), u32(row${
                                  i}), u32(j0 >> 2u) + tx + TX * ${
                                  q}u, vec2<u32>(u.seedLo, u.seedHi), u.threshold, ${
                                   ''}u.keepScale);`)
                          .join('\n      ')}
    }`).join('\n    ')}`;
                  const classicDecls = `var<workgroup> qs: array<vec4<f32>, ${br * dq4}>;
var<workgroup> kvs: array<vec4<f32>, ${bc * kvStride}>;
var<workgroup> ps: array<vec4<f32>, ${br * bc / 4}>;
`;
                  const classicQLoad = `// Q tile -> workgroup memory (rows past seqQ are zeros).
  for (var n = 0u; n < ${nQLoads}u; n++) {
    let idx = lid + THREADS * n;
    if (idx < BR * DQ4) {
      let r = idx / DQ4;
      let ch = idx % DQ4;
      let row = r0 + i32(r);
      var val = vec4<f32>(0.0);
      if (row < u.seqQ) {
        val = ${loadQKRow('qb', `u32((b * u.seqQ + row) * u.heads + h)`, 'ch')};
      }
      qs[r * DQ4 + ch] = val;
    }
  }`;
                  const classicKeyOffsets =
                      `// Key offsets (swizzled) of this thread's columns in workgroup memory.
  ${
                          quads
                              .map(
                                  q => range(4)
                                           .map(e => `let kOff${q}_${e} = ${colOf(q, e)} * KVW;`)
                                           .join(' '))
                              .join('\n  ')}
  ${quadCols ? quads.map(q => `let kSw${q} = (tx + TX * ${q}u) & ${swm}u;`).join('\n  ') : ''}`;
                  const classicLoop = `${prologueK}

  for (var kt = tBegin; kt < tEnd; kt++) {
    let j0 = kt * i32(BC);
    workgroupBarrier();
    ${storeK}
    ${loadV}
    workgroupBarrier();

    // S = Q K^T on this thread's TM x 4NQ tile.
    ${sInit}
    ${qkLoop}

    ${softmaxCode}
    workgroupBarrier();
    // V -> workgroup memory (over K), P -> workgroup memory.
    ${storeV}
    ${
                      rowsI
                          .map(
                              i => quads
                                       .map(
                                           q => quadCols ?
                                               `ps[(ty + TY * ${i}u) * (BC / 4u) + tx + TX * ${
                                                   q}u] = s${i}_${q};` :
                                               range(4)
                                                   .map(
                                                       e => `{ let f = (ty + TY * ${i}u) * BC + ${
                                                           colOf(q, e)}; ps[f / 4u][f % 4u] = s${
                                                           i}_${q}.${COMP[e]}; }`)
                                                   .join(' '))
                                       .join('\n    '))
                          .join('\n    ')}
    ${nextK}
    workgroupBarrier();

    // O += P V on this thread's TM x 4NJ tile.
    for (var cc = 0u; cc < ${c.runtimeLoops ? 'u32(u.loopBC4)' : 'BC / 4u'}; cc++) {
      ${rowsI.map(i => `let p${i} = ps[(ty + TY * ${i}u) * (BC / 4u) + cc];`).join('\n      ')}
      ${
                      range(4)
                          .map(
                              e => `{
        let vo = (4u * cc + ${e}u) * KVW + tx;
        ${outJ.map(jj => `let v${jj} = kvs[vo + ${jj * t.tx}u];`).join('\n        ')}
        ${
                                  rowsI
                                      .map(
                                          i => outJ.map(
                                                       jj => `o${i}_${jj} += p${i}.${COMP[e]} * v${
                                                           jj};`)
                                                   .join(' '))
                                      .join('\n        ')}
      }`).join('\n      ')}
    }
  }`;
                  const {outerDecls, outerQLoad, outerLoop} =
                      outer ? outerParts() : {outerDecls: '', outerQLoad: '', outerLoop: ''};

                  return `${c.subgroups ? 'enable subgroups;' : ''}
${scoreWGSL(c.score)}
${keyRangeWGSL(c.score)}
${c.dropout ? philoxWGSL() + dropoutWGSL() : ''}

struct Uniforms {
${FORWARD_UNIFORMS.map(([n, ty]) => `  ${n}: ${ty},`).join('\n')}
}

${bindings.join('\n')}

const BR = ${br}u;
const BC = ${bc}u;
const TY = ${t.ty}u;
const TX = ${t.tx}u;
const THREADS = ${threads}u;
const DQ4 = ${dq4}u;
const DV4 = ${dv4}u;
const KVW = ${kvStride}u;
const NEG = ${FA_NEG_BIG};

${outer ? outerDecls : classicDecls}
${c.subgroups || t.tx === 1 ? '' : `var<workgroup> red: array<f32, ${br * t.tx}>;`}

@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let groupId = i32(wg.x + wg.y * u32(u.gridX));
  if (groupId >= u.totalGroups) {
    return;
  }
  // Split-KV: the splits of one query tile are neighbours (Q shared in cache).
  let split = ${c.splitKeys ? 'groupId % u.numSplits' : '0'};
  let tileId = ${c.splitKeys ? 'groupId / u.numSplits' : 'groupId'};
  var qTile = tileId % u.numQTiles;
  ${c.reverseRows ? 'qTile = u.numQTiles - 1 - qTile;' : ''}
  let bh = tileId / u.numQTiles;
  let h = bh % u.heads;
  let b = bh / u.heads;
  let hk = h / u.groups;
  let tx = lid % TX;
  let ty = lid / TX;
  let r0 = qTile * i32(BR);
  let rEnd = min(r0 + i32(BR), u.seqQ);

  var sp: FaScore;
  sp.scale = u.scale;
  sp.softcap = u.softcap;
  sp.slope = ${['0.0', 'slopes[h]', 'slopes[b * u.heads + h]'][c.alibiMode]};
  sp.diag = u.seqK - u.seqQ;
  sp.left = u.left;
  sp.right = u.right;
  sp.seqK = u.seqK;
  sp.seqQ = u.seqQ;
  ${c.score.seqlens ? 'sp = fa_with_lengths(sp, seqlens[2 * b], seqlens[2 * b + 1]);' : ''}

  ${outer ? outerQLoad : classicQLoad}
  let keys = fa_key_range(r0, rEnd, sp);
  let tFirst = keys.x / i32(BC);
  let tLast = select(tFirst, (keys.y + i32(BC) - 1) / i32(BC), keys.y > keys.x);
  ${
                      c.splitKeys ? `// This split's share of the visible key tiles (possibly none).
  let perSplit = (tLast - tFirst + u.numSplits - 1) / u.numSplits;
  let tBegin = min(tLast, tFirst + split * perSplit);
  let tEnd = min(tLast, tBegin + perSplit);` :
                                    `let tBegin = tFirst;
  let tEnd = tLast;`}

  ${rowsI.map(i => `let row${i} = r0 + i32(${rowOf(i)});`).join('\n  ')}
  ${rowsI.map(i => `var m${i} = NEG;\n  var l${i} = 0.0;`).join('\n  ')}
  ${rowsI.map(i => outJ.map(jj => `var o${i}_${jj} = vec4<f32>(0.0);`).join(' ')).join('\n  ')}
  ${outer ? '' : classicKeyOffsets}

  ${outer ? outerLoop : classicLoop}
  // Row sums over the TX threads of each row, then the outputs.
  ${rowReduce(rowsI.map(i => `l${i}`), 'add')}
  ${
                      rowsI
                          .map(
                              i => `if (row${i} < u.seqQ) {
    let inv = select(0.0, 1.0 / l${i}, l${i} > 0.0);
    let outRow = u32(split * u.splitRows + (b * u.seqQ + row${i}) * u.heads + h);
    ${
                                  outJ.map(
                                          jj => `{
      let ch = tx + TX * ${jj}u;
      if (ch < DV4) {
        let val = o${i}_${jj} * inv;
        ${
                                              vecV ? 'outb[outRow * DV4 + ch] = val;' :
                                                     range(4)
                                                         .map(
                                                             e => `if (ch * 4u + ${e}u < ${
                                                                 c.headDimV}u) { outb[outRow * ${
                                                                 c.headDimV}u + ch * 4u + ${
                                                                 e}u] = val.${COMP[e]}; }`)
                                                         .join('\n        ')}
      }
    }`).join('\n    ')}
    if (tx == 0u) {
      lseb[u32(split * u.splitLse + (b * u.heads + h) * u.seqQ + row${i})] =
          select(${FA_NEG_INF_BITS}u, bitcast<u32>(m${i} + log(l${i})), l${i} > 0.0);
    }
  }`).join('\n  ')}
}
`;
}

/**
 * Merges the partial results of split-KV: per output element, the splits'
 * outputs weighted by exp(lse_s - max lse), in split order (deterministic).
 * Splits that saw no key (lse = -inf) weigh 0; a row no split saw gets
 * out = 0 and lse = -inf, as without splits. Bindings: partial out
 * [n, B, Sq, H, Dv], partial lse bits [n, B, H, Sq]; out, lse bits;
 * uniforms (COMBINE_UNIFORMS).
 */
export function splitCombineWGSL(): string {
  return `struct Uniforms {
${COMBINE_UNIFORMS.map(([n, ty]) => `  ${n}: ${ty},`).join('\n')}
}
@group(0) @binding(0) var<storage, read> partOut: array<f32>;
@group(0) @binding(1) var<storage, read> partLse: array<u32>;
@group(0) @binding(2) var<storage, read_write> outb: array<f32>;
@group(0) @binding(3) var<storage, read_write> lseb: array<u32>;
@group(0) @binding(4) var<uniform> u: Uniforms;

@compute @workgroup_size(${COMBINE_THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let idx = (wg.x + wg.y * u.gridX) * ${COMBINE_THREADS}u + lid;
  if (idx >= u.elements) {
    return;
  }
  // out is [B, Sq, H, Dv]; lse is [B, H, Sq].
  let e = idx % u.headDimV;
  let row = idx / u.headDimV;
  let h = row % u.heads;
  let bs = row / u.heads;
  let s = bs % u.seqQ;
  let b = bs / u.seqQ;
  let li = (b * u.heads + h) * u.seqQ + s;
  var mx = 0.0;
  var seen = false;
  for (var n = 0u; n < u.numSplits; n++) {
    let bits = partLse[n * u.splitLse + li];
    if (bits != ${FA_NEG_INF_BITS}u) {
      let x = bitcast<f32>(bits);
      mx = select(x, max(mx, x), seen);
      seen = true;
    }
  }
  var den = 0.0;
  var acc = 0.0;
  for (var n = 0u; n < u.numSplits; n++) {
    let bits = partLse[n * u.splitLse + li];
    if (bits != ${FA_NEG_INF_BITS}u) {
      let w = exp(bitcast<f32>(bits) - mx);
      den += w;
      acc += w * partOut[n * u.splitRows * u.headDimV + idx];
    }
  }
  outb[idx] = select(0.0, acc / den, seen);
  if (e == 0u) {
    lseb[li] = select(${FA_NEG_INF_BITS}u, bitcast<u32>(mx + log(den)), seen);
  }
}
`;
}

export const COMBINE_THREADS = 64;

/** Field order of the combine pass's uniforms (all u32). */
export const COMBINE_UNIFORMS = [
  ['elements', 'u32'],
  ['headDimV', 'u32'],
  ['heads', 'u32'],
  ['seqQ', 'u32'],
  ['numSplits', 'u32'],
  ['splitRows', 'u32'],
  ['splitLse', 'u32'],
  ['gridX', 'u32'],
] as const;
