/**
 * The phases of the fused forward's WGSL (flash_attention_webgpu.ts puts
 * them together), one generator each, in the order a workgroup runs them:
 *
 *   loadQueryTileWGSL     Q tile -> workgroup memory, once
 *   keyLoopWGSL           per key tile:
 *     K/V tile loaders      global -> workgroup memory, directly or through
 *                           registers one phase ahead (both modes)
 *     scoresWGSL            S = Q K^T on the thread's register tile
 *     onlineSoftmaxWGSL     scale, mask, row max, P = exp(S - m), rescale
 *     storeProbsWGSL        P (or P^T) -> workgroup memory
 *     probsTimesValuesWGSL  O += P V
 *   (slicedKeyLoopWGSL: the same per key tile with K^T and V in head-dim
 *   slices, ForwardTiles.dimChunks)
 *   epilogueWGSL          row sums, O / l and the log-sum-exp
 *
 * Every generator takes the ForwardLayout: the tiling's sizes and the
 * index maps of the mode (classic or outer product). The WGSL constants
 * (BR, BC, TX, TY, THREADS, DQ4, DV4, KVW, VW, NEG) are declared by
 * forwardWGSL.
 */
import type {ForwardConfig, ForwardTiles, TileSizes} from './flash_attention_webgpu';
import {maxAllWGSL, range, VEC4_COMPONENTS as COMP} from './wgsl_snippets';

/** A forward configuration with its sizes and index maps worked out. */
export interface ForwardLayout {
  config: ForwardConfig;
  tiles: ForwardTiles;
  sizes: TileSizes;
  /** Outer-product mode (ForwardTiles.outer). */
  outer: boolean;
  /**
   * A thread's key columns are whole quads 4 * (tx + TX * q) + e (dropout
   * needs them: one Philox call per quad; the outer mode reads them as
   * vec4s); otherwise tx + TX * (4 q + e).
   */
  quadColumns: boolean;
  /** Row stride of the K/V tile in workgroup memory, in vec4s (KVW). */
  kvStride: number;
  /** XOR mask of the classic K tile's per-quad swizzle (0: none). */
  keySwizzleMask: number;
  /** XOR mask of the outer mode's P^T row-quad swizzle (0: none). */
  probsSwizzleMask: number;
  /** K and V go through registers one phase ahead of their use. */
  prefetch: boolean;
  /** The thread's rows i < TM, key quads q < NQ, output quads jj < NJ. */
  rows: number[];
  keyQuads: number[];
  outQuads: number[];
}

/**
 * The largest power of two <= 8 that divides `n`, minus one: an XOR of the
 * low bits with this mask keeps an index inside its group of `n`.
 */
export function xorSwizzleMask(n: number): number {
  let width = 1;
  while (width < 8 && n % (width * 2) === 0) {
    width *= 2;
  }
  return width - 1;
}

/** `base`, `base + 1u`, ...: the x-th index of an unrolled loop body. */
function unrolled(base: string, x: number): string {
  return x === 0 ? base : `${base} + ${x}u`;
}

/** Workgroup-tile row of a thread's i-th row. */
function tileRow(L: ForwardLayout, i: number): string {
  return L.outer ? `(4u * (ty + TY * ${i >> 2}u) + ${i & 3}u)` : `(ty + TY * ${i}u)`;
}

/** Tile column of element e of the thread's key quad q. */
function keyColumn(L: ForwardLayout, q: number, e: number): string {
  return L.quadColumns ? `(4u * (tx + TX * ${q}u) + ${e}u)` : `(tx + TX * ${4 * q + e}u)`;
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

/**
 * WGSL of chunk `chunk` (4 dims) of global row `rowIndex` of `buf`: vec4
 * arrays when the width is a multiple of 4, else scalars via scalarQuad.
 */
function globalQuad(buf: string, width: number, rowIndex: string, chunk: string): string {
  return width % 4 === 0 ? `${buf}[(${rowIndex}) * ${width / 4}u + ${chunk}]` :
                           scalarQuad(buf, rowIndex, chunk, width);
}

/** The global row of key `j` of K and V (kBase: forwardWGSL's sequence rows). */
function keyRow(j: string): string {
  return `u32((kBase + ${j}) * u.headsKV + hk)`;
}

/**
 * `arr[...][pos % 4] = val.e` for the 4 dims of chunk `ch`: a transposed
 * store (dim-major, `width` entries per dim) of one vec4.
 */
function scatterQuad(
    arr: string, width: string, ch: string, pos: string, val: string, offset = ''): string {
  return range(4)
      .map(
          e => `${arr}[${offset}(4u * ${ch} + ${e}u) * (${width} / 4u) + ${pos} / 4u][${
              pos} % 4u] = ${val}.${COMP[e]};`)
      .join(' ');
}

/** `off + ` (an index offset into a slice buffer), or nothing for offset 0. */
function plus(offset: string): string {
  return offset === '' || offset === '0u' ? '' : `${offset} + `;
}

/** Q tile -> workgroup memory: Q row-major (classic) or Q^T (outer). */
export function loadQueryTileWGSL(L: ForwardLayout): string {
  const {br, dq4, threads} = L.sizes;
  const [row, chunk, store] = L.outer ?
      ['idx % BR', 'idx / BR', scatterQuad('qs', 'BR', 'ch', 'r', 'val')] :
      ['idx / DQ4', 'idx % DQ4', 'qs[r * DQ4 + ch] = val;'];
  return `// ${L.outer ? 'Q^T' : 'Q'} tile -> workgroup memory (rows past seqQ are zeros).
  for (var n = 0u; n < ${Math.ceil(br * dq4 / threads)}u; n++) {
    let idx = lid + THREADS * n;
    if (idx < BR * DQ4) {
      let r = ${row};
      let ch = ${chunk};
      let row = r0 + i32(r);
      var val = vec4<f32>(0.0);
      if (row < rowsQ) {
        val = ${globalQuad('qb', L.config.headDim, 'u32((qBase + row) * u.heads + h)', 'ch')};
      }
      ${store}
    }
  }`;
}

/**
 * How one operand's tile (K or V) is loaded: item `idx` of `items` is
 * chunk `chunkOf(idx)` of key `keyOf(idx)`; `store` writes it to workgroup
 * memory; `registers` name the prefetch registers (`count` per thread).
 */
interface TileOperand {
  items: string;
  count: number;
  registers: string;
  keyOf: (idx: string) => string;
  chunkOf: (idx: string) => string;
  load: (row: string, chunk: string) => string;
  store: (idx: string, val: string) => string;
  /**
   * Rows other than keys (a streamed Q^T): the bound on the tile row and
   * the global row of tile row `j`; keys (rowsK, keyRow) when absent.
   */
  rows?: {limit: string, global: (j: string) => string};
}

function keyOperand(L: ForwardLayout): TileOperand {
  const {bc, dq4, threads} = L.sizes;
  const common = {
    items: 'BC * DQ4',
    count: Math.ceil(bc * dq4 / threads),
    registers: 'kr',
    load: (row: string, chunk: string) => globalQuad('kb', L.config.headDim, row, chunk),
  };
  if (L.outer) {
    // K^T, the key index fastest: a warp's scalar stores hit consecutive banks.
    return {
      ...common,
      keyOf: idx => `${idx} % BC`,
      chunkOf: idx => `${idx} / BC`,
      store: (idx, val) => scatterQuad('kvs', 'BC', `(${idx} / BC)`, `(${idx} % BC)`, val),
    };
  }
  const swizzled = (key: string, ch: string) => L.quadColumns ?
      `${key} * KVW + ((${ch}) ^ ((${key} >> 2u) & ${L.keySwizzleMask}u))` :
      `${key} * KVW + ${ch}`;
  return {
    ...common,
    keyOf: idx => `${idx} / DQ4`,
    chunkOf: idx => `${idx} % DQ4`,
    store: (idx, val) => `kvs[${swizzled(`(${idx} / DQ4)`, `${idx} % DQ4`)}] = ${val};`,
  };
}

function valueOperand(L: ForwardLayout): TileOperand {
  const {bc, dv4, threads} = L.sizes;
  // V rows: the classic mode's K/V stride, or the outer mode's own VW.
  const stride = L.outer ? 'VW' : 'KVW';
  return {
    items: 'BC * DV4',
    count: Math.ceil(bc * dv4 / threads),
    registers: 'vr',
    keyOf: idx => `${idx} / DV4`,
    chunkOf: idx => `${idx} % DV4`,
    load: (row, chunk) => globalQuad('vb', L.config.headDimV, row, chunk),
    store: (idx, val) => `kvs[(${idx} / DV4) * ${stride} + ${idx} % DV4] = ${val};`,
  };
}

/** `let j` and `val` = the operand's item `idx` of the tile at key `jBase`. */
function loadItem(op: TileOperand, jBase: string, idx: string, guard: string): string {
  const limit = op.rows?.limit ?? 'rowsK';
  const globalRow = op.rows?.global ?? keyRow;
  return `let j = ${jBase} + i32(${op.keyOf(idx)});
      var val = vec4<f32>(0.0);
      if (${guard}j < ${limit}) {
        val = ${op.load(globalRow('j'), `(${op.chunkOf(idx)})`)};
      }`;
}

/** The tile at key `jBase`: global -> workgroup memory. */
function loadTileWGSL(op: TileOperand, jBase: string): string {
  return `for (var idx = lid; idx < ${op.items}; idx += THREADS) {
      ${loadItem(op, jBase, 'idx', '')}
      ${op.store('idx', 'val')}
    }`;
}

/** The tile at key `jBase`: global -> the operand's registers. */
function fetchTileWGSL(op: TileOperand, jBase: string): string {
  return range(op.count)
      .map(n => `{
      let idx = lid + THREADS * ${n}u;
      ${loadItem(op, jBase, 'idx', `idx < ${op.items} && `)}
      ${op.registers}${n} = val;
    }`)
      .join('\n    ');
}

/** The operand's registers -> workgroup memory. */
function storeTileWGSL(op: TileOperand): string {
  return range(op.count)
      .map(n => `{
      let idx = lid + THREADS * ${n}u;
      if (idx < ${op.items}) { ${op.store('idx', `${op.registers}${n}`)} }
    }`)
      .join('\n    ');
}

/** WGSL lines as a block, indented by `indent` (the closing brace by 2 less). */
function block(lines: string[], indent = '        '): string {
  return `{\n${indent}${lines.join(`\n${indent}`)}\n${indent.slice(2)}}`;
}

/**
 * `acc += (row i of a row quad) * col` for an outer product: `rowQuad${i/4}`
 * holds rows 4 (i / 4) .. 4 (i / 4) + 3 of the 4 x 4 product's left side.
 */
function outerFMA(acc: string, rowQuad: string, i: number, col: string): string {
  return `${acc} = fma(vec4<f32>(${rowQuad}${i >> 2}.${COMP[i & 3]}), ${col}, ${acc});`;
}

/** `var` declarations of the thread's score accumulators. */
function scoreAccumulatorsWGSL(L: ForwardLayout): string {
  return L.rows.map(i => L.keyQuads.map(q => `var s${i}_${q} = vec4<f32>(0.0);`).join(' '))
      .join('\n    ');
}

/**
 * S = Q K^T on the thread's TM x 4NQ tile, as FMA chains (a dot() would
 * round differently and cost an extra multiply). Classic: per head-dim
 * chunk, each row's Q quad against each key's K quad; unrolled x4 at small
 * head dims so that offsets become constants (at larger ones the hoisted
 * loads cost more than they save). Outer: per head dim, the outer product
 * of 4 rows x 4 keys from Q^T and K^T.
 */
function scoresWGSL(L: ForwardLayout): string {
  return L.outer ? outerScoresWGSL(L) : classicScoresWGSL(L);
}

function classicScoresWGSL(L: ForwardLayout): string {
  const dq4 = L.sizes.dq4;
  const runtimeLoops = L.config.runtimeLoops;
  const unroll = !runtimeLoops && dq4 % 4 === 0 && dq4 <= 16 ? 4 : 1;
  const keyChunk = (ch: string, q: number) => L.quadColumns ? `((${ch}) ^ kSw${q})` : ch;
  // s.e += q . k, dims in order.
  const dotFMAs = (i: number, q: number, e: number) => {
    const acc = `s${i}_${q}.${COMP[e]}`;
    const a = `a${i}`;
    return `${acc} = fma(${a}.w, kv.w, fma(${a}.z, kv.z, fma(${a}.y, kv.y, fma(${a}.x, kv.x, ${
        acc}))));`;
  };
  const key = (ch: string, q: number, e: number) => block([
    `let kv = kvs[kOff${q}_${e} + ${keyChunk(ch, q)}];`,
    ...L.rows.map(i => dotFMAs(i, q, e)),
  ]);
  const chunk = (ch: string) => block(
      [
        ...L.rows.map(i => `let a${i} = qs[qBase${i} + ${ch}];`),
        ...L.keyQuads.flatMap(q => range(4).map(e => key(ch, q, e))),
      ],
      '      ');
  return `// S = Q K^T on this thread's TM x 4NQ tile.
    ${scoreAccumulatorsWGSL(L)}
    ${L.rows.map(i => `let qBase${i} = (ty + TY * ${i}u) * DQ4;`).join(' ')}
    for (var ch = 0u; ch < ${runtimeLoops ? 'u32(u.loopDQ4)' : 'DQ4'}; ch += ${unroll}u) {
      ${range(unroll).map(x => chunk(unrolled('ch', x))).join('\n      ')}
    }`;
}

function outerScoresWGSL(L: ForwardLayout): string {
  const bound = L.config.runtimeLoops ? 'u32(u.loopDQ4) * 4u' : `${4 * L.sizes.dq4}u`;
  return `// S = Q K^T: per head-dim step, outer products of 4 rows x 4 keys.
    ${scoreAccumulatorsWGSL(L)}
    ${outerScoreStepsWGSL(L, 4 * L.sizes.dq4, bound, 0)}`;
}

/**
 * The outer mode's S += Q^T K^T over `steps` head dims (loop bound
 * `bound`): K^T's dims from 0 in `kvs`, Q^T's from `qDim0`.
 */
function outerScoreStepsWGSL(
    L: ForwardLayout, steps: number, bound: string, qDim0: number, qOffset = '',
    kOffset = ''): string {
  const wanted = L.tiles.unroll ?? 8;
  const unroll = steps % wanted === 0 ? wanted : steps % 8 === 0 ? 8 : 4;
  const qDim = (d: string) => qDim0 === 0 ? d : `${qDim0}u + ${d}`;
  const step = (d: string) => block([
    ...range(L.tiles.tm / 4)
        .map(a => `let a${a} = qs[${plus(qOffset)}(${qDim(d)}) * (BR / 4u) + ty + TY * ${a}u];`),
    ...L.keyQuads.map(
        q => `let k${q} = kvs[${plus(kOffset)}(${d}) * (BC / 4u) + tx + TX * ${q}u];`),
    ...L.rows.map(i => L.keyQuads.map(q => outerFMA(`s${i}_${q}`, 'a', i, `k${q}`)).join(' ')),
  ]);
  return `for (var d = 0u; d < ${bound}; d += ${unroll}u) {
      ${range(unroll).map(x => step(unrolled('d', x))).join('\n      ')}
    }`;
}

/**
 * WGSL reducing the per-thread values `vals[i]` (row i's) over the TX
 * threads of each row: by subgroup shuffles, or through workgroup memory
 * `red` without subgroups.
 */
function rowReduceWGSL(L: ForwardLayout, vals: string[], op: 'max'|'add'): string {
  const {tx, ty} = L.tiles;
  if (tx === 1) {
    return '';
  }
  const combine = (a: string, b: string) => op === 'max' ? `max(${a}, ${b})` : `(${a} + ${b})`;
  if (L.config.subgroups) {
    // Butterfly: after log2(TX) exchanges every thread holds the total.
    const butterfly = (v: string) =>
        range(Math.log2(tx))
            .map(s => `${v} = ${combine(v, `subgroupShuffleXor(${v}, ${1 << s}u)`)};`);
    return vals.flatMap(butterfly).join('\n      ');
  }
  const slot = (i: number) => `(ty + ${ty}u * ${i}u) * ${tx}u`;
  const total = (i: number) => range(tx - 1).reduce(
      (expr, x) => combine(expr, `red[${slot(i)} + ${x + 1}u]`), `red[${slot(i)}]`);
  return `${vals.map((v, i) => `red[${slot(i)} + tx] = ${v};`).join('\n      ')}
      workgroupBarrier();
      ${vals.map((v, i) => `${v} = ${total(i)};`).join('\n      ')}`;
}

/**
 * Scores (scale -> softcap -> alibi; the mask only on tiles that cross the
 * edge of the keys or of the window), then the online softmax: the running
 * row max m, P = exp(S - m), the running sum l and output O rescaled by
 * exp(m_old - m_new), dropout applied to P (not to the sum).
 */
function onlineSoftmaxWGSL(L: ForwardLayout): string {
  const c = L.config;
  const acc = (i: number, q: number) => `s${i}_${q}`;
  const column = (q: number, e: number) => `(j0 + i32(${keyColumn(L, q, e)}))`;
  const plainScale = !(c.score.alibi || c.score.softcap);
  const scale =
      L.rows.map(i => L.keyQuads.map(q => `${acc(i, q)} = ${acc(i, q)} * u.scale;`).join(' '))
          .join('\n    ');
  const scores = L.rows.flatMap(
      i => L.keyQuads.flatMap(
          q => range(4).map(
              e => `${acc(i, q)}.${COMP[e]} = fa_score(${acc(i, q)}.${COMP[e]}, row${i}, ${
                  column(q, e)}, sp);`)));
  const offsets = L.quadColumns ? '0, 1, 2, 3' : range(4).map(e => e * L.tiles.tx).join(', ');
  const masks = L.rows.flatMap(
      i => L.keyQuads.map(
          q => `${acc(i, q)} = select(vec4<f32>(NEG), ${acc(i, q)}, fa_visible4(row${
              i}, vec4<i32>(${column(q, 0)}) + vec4<i32>(${offsets}), sp));`));
  const dropout = (i: number, q: number) => `${acc(i, q)} = ${
      acc(i, q)} * fa_dropout4(u32(b), u32(h), u32(row${i}), u32(j0 >> 2u) + tx + TX * ${
      q}u, vec2<u32>(u.seedLo, u.seedHi), u.threshold, u.keepScale);`;
  const rowUpdate = (i: number) => `{
      let mNew = max(m${i}, mx${i});
      // A row that has seen no visible key keeps m = NEG exactly;
      // subtracting 0 instead sends its masked scores to exp(NEG) = 0.
      let mUse = select(mNew, 0.0, mNew == NEG);
      let alpha = select(exp(m${i} - mUse), 0.0, m${i} == NEG);
      m${i} = mNew;
      ${L.keyQuads.map(q => `${acc(i, q)} = exp(${acc(i, q)} - vec4<f32>(mUse));`).join('\n      ')}
      l${i} = l${i} * alpha${L.keyQuads.map(q => ` + dot(${acc(i, q)}, vec4<f32>(1.0))`).join('')};
      ${L.outQuads.map(jj => `o${i}_${jj} = o${i}_${jj} * alpha;`).join(' ')}
      ${c.dropout ? L.keyQuads.map(q => dropout(i, q)).join('\n      ') : ''}
    }`;
  const rowMax = (i: number) =>
      `var mx${i} = ${maxAllWGSL(L.keyQuads.flatMap(q => COMP.map(x => `${acc(i, q)}.${x}`)))};`;
  return `// Scores, then the online softmax. Only tiles that cross the edge of
    // the keys or of the window need the mask.
    let fullTile = fa_tile_unmasked(r0, rEnd, j0, j0 + i32(BC), sp);
    ${plainScale ? scale : ''}
    ${plainScale ? '' : scores.join('\n    ')}
    if (!fullTile) {
      ${masks.join('\n      ')}
    }
    ${L.rows.map(rowMax).join('\n    ')}
    ${rowReduceWGSL(L, L.rows.map(i => `mx${i}`), 'max')}
    ${L.rows.map(rowUpdate).join('\n    ')}`;
}

/**
 * P -> workgroup memory. Classic: row-major `ps` (whole quads, or scalars
 * when the columns are not quads). Outer: P^T, its row quads XOR-swizzled
 * by key quad so that the stores of the TX threads of a row group (keys 4
 * apart: one bank unswizzled) hit different banks.
 */
function storeProbsWGSL(L: ForwardLayout): string {
  if (L.outer) {
    const mask = L.probsSwizzleMask;
    const rowQuad = (a: number, q: number) =>
        mask === 0 ? `ty + TY * ${a}u` : `((ty + TY * ${a}u) ^ ((tx + TX * ${q}u) & ${mask}u))`;
    // Key e of quad q: its 4 rows of row quad a as one vec4.
    const store = (a: number, q: number, e: number) => {
      const probs = range(4).map(r => `s${4 * a + r}_${q}.${COMP[e]}`).join(', ');
      return `ps[(4u * (tx + TX * ${q}u) + ${e}u) * (BR / 4u) + ${rowQuad(a, q)}] = vec4<f32>(${
          probs});`;
    };
    return range(L.tiles.tm / 4)
        .flatMap(a => L.keyQuads.flatMap(q => range(4).map(e => store(a, q, e))))
        .join('\n    ');
  }
  const scalarStore = (i: number, q: number, e: number) => `{ let f = (ty + TY * ${i}u) * BC + ${
      keyColumn(L, q, e)}; ps[f / 4u][f % 4u] = s${i}_${q}.${COMP[e]}; }`;
  const store = (i: number, q: number) => L.quadColumns ?
      `ps[(ty + TY * ${i}u) * (BC / 4u) + tx + TX * ${q}u] = s${i}_${q};` :
      range(4).map(e => scalarStore(i, q, e)).join(' ');
  return L.rows.map(i => L.keyQuads.map(q => store(i, q)).join('\n    ')).join('\n    ');
}

/**
 * O += P V on the thread's TM x 4NJ tile. Classic: per key quad, each
 * row's P quad times 4 V rows. Outer: per key, the outer product of 4 rows
 * (a P^T quad) x 4 output columns (a V quad).
 */
function probsTimesValuesWGSL(L: ForwardLayout): string {
  return L.outer ? outerProbsTimesValuesWGSL(L) : classicProbsTimesValuesWGSL(L);
}

function classicProbsTimesValuesWGSL(L: ForwardLayout): string {
  const key = (e: number) => block([
    `let vo = (4u * cc + ${e}u) * KVW + tx;`,
    ...L.outQuads.map(jj => `let v${jj} = kvs[vo + ${jj * L.tiles.tx}u];`),
    ...L.rows.map(i => L.outQuads.map(jj => `o${i}_${jj} += p${i}.${COMP[e]} * v${jj};`).join(' ')),
  ]);
  return `// O += P V on this thread's TM x 4NJ tile.
    for (var cc = 0u; cc < ${L.config.runtimeLoops ? 'u32(u.loopBC4)' : 'BC / 4u'}; cc++) {
      ${L.rows.map(i => `let p${i} = ps[(ty + TY * ${i}u) * (BC / 4u) + cc];`).join('\n      ')}
      ${range(4).map(key).join('\n      ')}
    }`;
}

/**
 * Keys of one outer-mode P V iteration. Software devices keep x8 at most:
 * big unrolled bodies compile slowly there. A power of two >= 4, so that
 * the P^T swizzle XOR is hoisted (see outerProbsTimesValuesWGSL).
 */
function outerValueUnroll(L: ForwardLayout): number {
  const bc = L.sizes.bc;
  const wanted = Math.min(L.tiles.unroll ?? 16, L.config.runtimeLoops ? 8 : 16);
  return [16, 8, 4].find(u => u <= wanted && bc % u === 0)!;
}

/**
 * `o${i}_${jj} += P V` for the output quads `quads` (jj of each), whose V
 * quad sits at column `tx + TX * local` of `kvs` rows `stride` wide: every
 * output quad of the thread (VW), or one head-dim slice's (VWC).
 */
function outerProbsTimesValuesWGSL(
    L: ForwardLayout, quads = L.outQuads.map(jj => ({jj, local: jj})), stride = 'VW',
    offset = ''): string {
  const unroll = outerValueUnroll(L);
  const mask = L.probsSwizzleMask;
  const rowQuads = range(L.tiles.tm / 4);
  // Keys of one iteration: key0 (a multiple of the unroll) + x, so
  //   ((key0 + x) >> 2) & mask
  //     = ((key0 >> 2) & mask & ~(unroll / 4 - 1)) | ((x >> 2) & mask):
  // one XOR per row quad and iteration, a constant one per key (otherwise
  // the XOR is computed per key).
  const hoist = mask !== 0 && unroll >= 4 && (unroll & (unroll - 1)) === 0;
  const plainRow = (a: number) => `ty + TY * ${a}u`;
  const probsRow = (a: number, key: string, x: number) => mask === 0 ? plainRow(a) :
      hoist ? `(pr${a} ^ ${(x >> 2) & mask}u)` :
              `((${plainRow(a)}) ^ (((${key}) >> 2u) & ${mask}u))`;
  const step = (key: string, x: number) => block([
    ...rowQuads.map(a => `let p${a} = ps[(${key}) * (BR / 4u) + ${probsRow(a, key, x)}];`),
    ...quads.map(
        o => `let v${o.jj} = kvs[${plus(offset)}(${key}) * ${stride} + tx + TX * ${o.local}u];`),
    ...L.rows.map(i => quads.map(o => outerFMA(`o${i}_${o.jj}`, 'p', i, `v${o.jj}`)).join(' ')),
  ]);
  const hoistedRows = rowQuads.map(
      a => `let pr${a} = (ty + TY * ${a}u) ^ ((key >> 2u) & ${mask & ~(unroll / 4 - 1)}u);`);
  const bound = L.config.runtimeLoops ? 'u32(u.loopBC4) * 4u' : 'BC';
  return `// O += P V: per key, outer products of 4 rows x 4 output columns.
    for (var key = 0u; key < ${bound}; key += ${unroll}u) {
      ${hoist ? hoistedRows.join(' ') : ''}
      ${range(unroll).map(x => step(unrolled('key', x), x)).join('\n      ')}
    }`;
}

/**
 * The classic mode's offsets of the thread's key columns in the K tile,
 * and with quad columns the per-quad swizzle of its head-dim chunks.
 */
export function keyOffsetsWGSL(L: ForwardLayout): string {
  if (L.outer) {
    return '';
  }
  const offsets = L.keyQuads.map(
      q => range(4).map(e => `let kOff${q}_${e} = ${keyColumn(L, q, e)} * KVW;`).join(' '));
  const swizzles = L.quadColumns ?
      L.keyQuads.map(q => `let kSw${q} = (tx + TX * ${q}u) & ${L.keySwizzleMask}u;`) :
      [];
  return `// Key offsets (swizzled) of this thread's columns in workgroup memory.
  ${offsets.join('\n  ')}
  ${swizzles.join('\n  ')}`;
}

/**
 * The loop over the workgroup's key tiles [tBegin, tEnd). Per tile:
 *   barrier; K -> workgroup memory; this tile's V -> registers; barrier;
 *   S = Q K^T; online softmax; barrier (S is done with K);
 *   V -> workgroup memory over K; P -> workgroup memory; the next K tile
 *   -> registers; barrier; O += P V.
 * With the prefetch, each global load is issued a phase before its store,
 * so that its latency overlaps the math in between.
 */
export function keyLoopWGSL(L: ForwardLayout): string {
  if (L.sizes.sliced) {
    return slicedKeyLoopWGSL(L);
  }
  const keys = keyOperand(L);
  const values = valueOperand(L);
  const registers = (op: TileOperand) =>
      range(op.count).map(n => `var ${op.registers}${n} = vec4<f32>(0.0);`).join(' ');
  const prologue = `// Prefetch of the first K tile into registers.
  ${registers(keys)}
  ${registers(values)}
  if (tBegin < tEnd) {
    ${fetchTileWGSL(keys, 'tBegin * i32(BC)')}
  }`;
  return `${L.prefetch ? prologue : ''}

  for (var kt = tBegin; kt < tEnd; kt++) {
    let j0 = kt * i32(BC);
    workgroupBarrier();
    ${L.prefetch ? storeTileWGSL(keys) : loadTileWGSL(keys, 'j0')}
    ${L.prefetch ? fetchTileWGSL(values, 'j0') : ''}
    workgroupBarrier();

    ${scoresWGSL(L)}

    ${onlineSoftmaxWGSL(L)}
    workgroupBarrier();
    // V over K, P -> workgroup memory; the next K tile into registers.
    ${L.prefetch ? storeTileWGSL(values) : loadTileWGSL(values, 'j0')}
    ${storeProbsWGSL(L)}
    ${
      L.prefetch ? `if (kt + 1 < tEnd) {
      ${fetchTileWGSL(keys, 'j0 + i32(BC)')}
    }` :
                   ''}
    workgroupBarrier();

    ${probsTimesValuesWGSL(L)}
  }`;
}

/**
 * A global load of `chunk` of `buf` (row width `width`, DQ4 or DV4 vec4s
 * named by `limit`) that gives zeros past the row's end: a sliced tile's
 * last slice may reach past the head dim.
 */
function paddedQuad(
    buf: string, width: number, limit: string, padded: boolean, row: string,
    chunk: string): string {
  return padded ?
      `select(vec4<f32>(0.0), ${globalQuad(buf, width, row, `min(${chunk}, ${limit} - 1u)`)}, ${
          chunk} < ${limit})` :
      globalQuad(buf, width, row, chunk);
}

/**
 * Head-dim slice `slice` of the K tile, as K^T [4 DC4][BC] in `kvs` at
 * `offset` (a slice buffer).
 */
function keySliceOperand(L: ForwardLayout, slice: number, offset: string): TileOperand {
  const {bc, dc4, dq4, chunks, threads} = L.sizes;
  const padded = dc4 * chunks > dq4;
  return {
    items: 'BC * DC4',
    count: Math.ceil(bc * dc4 / threads),
    registers: 'kr',
    keyOf: idx => `${idx} % BC`,
    chunkOf: idx => `${slice * dc4}u + ${idx} / BC`,
    load: (row, chunk) => paddedQuad('kb', L.config.headDim, 'DQ4', padded, row, chunk),
    store: (idx, val) =>
        scatterQuad('kvs', 'BC', `(${idx} / BC)`, `(${idx} % BC)`, val, plus(offset)),
  };
}

/**
 * Head-dim slice `slice` of the workgroup's Q rows (ForwardTiles.streamQuery),
 * as Q^T [4 DC4][BR] in `qs` at `offset`; rows past the sequence are zeros.
 */
function querySliceOperand(L: ForwardLayout, slice: number, offset: string): TileOperand {
  const {br, dc4, dq4, chunks, threads} = L.sizes;
  const padded = dc4 * chunks > dq4;
  return {
    items: 'BR * DC4',
    count: Math.ceil(br * dc4 / threads),
    registers: 'qr',
    keyOf: idx => `${idx} % BR`,
    chunkOf: idx => `${slice * dc4}u + ${idx} / BR`,
    load: (row, chunk) => paddedQuad('qb', L.config.headDim, 'DQ4', padded, row, chunk),
    store: (idx, val) =>
        scatterQuad('qs', 'BR', `(${idx} / BR)`, `(${idx} % BR)`, val, plus(offset)),
    rows: {limit: 'rowsQ', global: j => `u32((qBase + ${j}) * u.heads + h)`},
  };
}

/** Head-dim slice `slice` of the V tile, as V [BC][VWC] in `kvs` at `offset`. */
function valueSliceOperand(L: ForwardLayout, slice: number, offset: string): TileOperand {
  const {bc, vcw, dv4, threads} = L.sizes;
  const padded = vcw * (slice + 1) > dv4;
  return {
    items: 'BC * VWC',
    count: Math.ceil(bc * vcw / threads),
    registers: 'vr',
    keyOf: idx => `${idx} / VWC`,
    chunkOf: idx => `${slice * vcw}u + ${idx} % VWC`,
    load: (row, chunk) => paddedQuad('vb', L.config.headDimV, 'DV4', padded, row, chunk),
    store: (idx, val) => `kvs[${plus(offset)}${idx}] = ${val};`,
  };
}

/** One step of the sliced key loop: the operands it places, and where. */
interface SliceStep {
  operands: Array<{op: TileOperand, base: string}>;
  /** Offsets of its K^T or V buffer and (score slices) of its Q^T one. */
  kvOffset: string;
  qOffset: string;
}

/**
 * The key loop of the sliced outer mode (ForwardTiles.dimChunks,
 * streamQuery, doubleBuffer): per key tile, S accumulates over the slices
 * of K^T (each with its Q^T slice when Q is streamed; otherwise Q^T stays
 * in workgroup memory for the whole loop, its slices past DQ4 zero:
 * workgroup memory starts zeroed and the Q load never writes there), then
 * after the online softmax and P^T, O's columns over the slices of V.
 * Each slice takes a barrier pair, or one barrier with two slice buffers
 * used in turn (a slice is stored into one while the other is read; the
 * barrier of the slice in between orders them). With the prefetch the
 * next slice (K's, then V's, then the next tile's first) is loaded into
 * registers while the current one is multiplied.
 */
function slicedKeyLoopWGSL(L: ForwardLayout): string {
  const {chunks, valueChunks, dc4, nj, buffers} = L.sizes;
  const streamQuery = L.tiles.streamQuery === true;
  const perTile = chunks + valueChunks;
  // Slice n of a tile uses buffer n % 2 of the tile's own parity; with an
  // odd number of slices per tile the parity alternates between tiles.
  const offset = (n: number, size: string) => {
    if (buffers === 1) {
      return '';
    }
    if (perTile % 2 === 0) {
      return n % 2 === 0 ? '' : size;
    }
    return `(((u32(kt - tBegin) + ${n % 2}u) & 1u) * ${size})`;
  };
  const scoreSteps: SliceStep[] = range(chunks).map(c => {
    const kvOffset = offset(c, 'KVSLICE');
    const qOffset = streamQuery ? offset(c, 'QSLICE') : '';
    const operands = [{op: keySliceOperand(L, c, kvOffset), base: 'j0'}];
    if (streamQuery) {
      operands.push({op: querySliceOperand(L, c, qOffset), base: 'r0'});
    }
    return {operands, kvOffset, qOffset};
  });
  const valueSteps: SliceStep[] = range(valueChunks).map(v => {
    const kvOffset = offset(chunks + v, 'KVSLICE');
    return {operands: [{op: valueSliceOperand(L, v, kvOffset), base: 'j0'}], kvOffset, qOffset: ''};
  });
  const registers = (step: SliceStep) =>
      step.operands
          .map(({op}) => range(op.count).map(n => `var ${op.registers}${n} = vec4<f32>(0.0);`))
          .flat()
          .join(' ');
  // A slice into workgroup memory: from its registers, or loaded directly.
  const place = (step: SliceStep) =>
      step.operands.map(({op, base}) => L.prefetch ? storeTileWGSL(op) : loadTileWGSL(op, base))
          .join('\n    ');
  // Its registers from global memory, at the tile of key `jBase`.
  const fetchAt = (step: SliceStep, jBase: string) =>
      step.operands.map(({op, base}) => fetchTileWGSL(op, base === 'j0' ? jBase : base))
          .join('\n    ');
  const steps = 4 * dc4;
  const bound =
      L.config.runtimeLoops ? `(u32(u.loopDQ4) + ${chunks - 1}u) / ${chunks}u * 4u` : `${steps}u`;
  const all = [...scoreSteps, ...valueSteps];
  // The next slice's registers: this tile's, or the next tile's first.
  const fetchNext = (n: number) => {
    if (!L.prefetch) {
      return '';
    }
    return n + 1 < perTile ? fetchAt(all[n + 1], 'j0') : `if (kt + 1 < tEnd) {
      ${fetchAt(all[0], 'j0 + i32(BC)')}
    }`;
  };
  const slice = (n: number, extra: string, math: string) =>
      `${buffers === 1 ? 'workgroupBarrier();' : ''}
    ${place(all[n])}
    ${extra}
    ${fetchNext(n)}
    workgroupBarrier();
    ${math}`;
  const scoreSlice = (c: number) => {
    // A resident Q^T holds every slice; a streamed one only this one.
    const qDim0 = streamQuery ? 0 : c * steps;
    const {qOffset, kvOffset} = scoreSteps[c];
    return slice(c, '', `// S += Q^T K^T over head-dim slice ${c}.
    ${outerScoreStepsWGSL(L, steps, bound, qDim0, qOffset, kvOffset)}`);
  };
  const perSlice = nj / valueChunks;
  const quads = (v: number) => range(perSlice).map(local => ({jj: v * perSlice + local, local}));
  const valueSlice = (v: number) => slice(
      chunks + v, v === 0 ? storeProbsWGSL(L) : '', `// O += P V on output columns of V slice ${v}.
    ${outerProbsTimesValuesWGSL(L, quads(v), 'VWC', valueSteps[v].kvOffset)}`);
  const prologue = `// Prefetch of the first slice into registers.
  ${[all[0], all[chunks]].map(registers).join('\n  ')}
  if (tBegin < tEnd) {
    ${fetchAt(all[0], 'tBegin * i32(BC)')}
  }`;
  return `${L.prefetch ? prologue : ''}

  for (var kt = tBegin; kt < tEnd; kt++) {
    let j0 = kt * i32(BC);
    ${scoreAccumulatorsWGSL(L)}
    ${range(chunks).map(scoreSlice).join('\n    ')}

    ${onlineSoftmaxWGSL(L)}
    ${range(valueChunks).map(valueSlice).join('\n    ')}
  }`;
}

/**
 * Row sums over the TX threads of each row, then per valid row O / l and
 * (one thread per row) the log-sum-exp m + log(l), -inf for rows that saw
 * no key. With split-KV, at this split's offsets.
 */
export function epilogueWGSL(L: ForwardLayout, negInfBits: number): string {
  const dv = L.config.headDimV;
  const storeOut = dv % 4 === 0 ? 'outb[outRow * DV4 + ch] = val;' :
                                  range(4)
                                      .map(
                                          e => `if (ch * 4u + ${e}u < ${dv}u) { outb[outRow * ${
                                              dv}u + ch * 4u + ${e}u] = val.${COMP[e]}; }`)
                                      .join('\n        ');
  const outQuad = (i: number, jj: number) => `{
      let ch = tx + TX * ${jj}u;
      if (ch < DV4) {
        let val = o${i}_${jj} * inv;
        ${storeOut}
      }
    }`;
  const row = (i: number) => `if (row${i} < rowsQ) {
    let inv = select(0.0, 1.0 / l${i}, l${i} > 0.0);
    let outRow = u32(split * u.splitRows + (qBase + row${i}) * u.heads + h);
    ${L.outQuads.map(jj => outQuad(i, jj)).join('\n    ')}
    if (tx == 0u) {
      lseb[u32(split * u.splitLse + lseBase + row${i})] =
          select(${negInfBits}u, bitcast<u32>(m${i} + log(l${i})), l${i} > 0.0);
    }
  }`;
  return `// Row sums over the TX threads of each row, then the outputs.
  ${rowReduceWGSL(L, L.rows.map(i => `l${i}`), 'add')}
  ${L.rows.map(row).join('\n  ')}`;
}

/** The thread's rows, and its running max, sum and output registers. */
export function rowStateWGSL(L: ForwardLayout): string {
  return `${L.rows.map(i => `let row${i} = r0 + i32(${tileRow(L, i)});`).join('\n  ')}
  ${L.rows.map(i => `var m${i} = NEG;\n  var l${i} = 0.0;`).join('\n  ')}
  ${
      L.rows.map(i => L.outQuads.map(jj => `var o${i}_${jj} = vec4<f32>(0.0);`).join(' '))
          .join('\n  ')}`;
}

/** Workgroup memory: the Q tile, the K/V tile and P (classic or outer). */
export function workgroupStorageWGSL(L: ForwardLayout): string {
  const {br, bc, dq4, vWidth} = L.sizes;
  const reduction = L.config.subgroups || L.tiles.tx === 1 ?
      '' :
      `var<workgroup> red: array<f32, ${br * L.tiles.tx}>;`;
  if (L.outer && L.sizes.sliced) {
    const {chunks, dc4, vcw, buffers} = L.sizes;
    const kvSlice = bc * Math.max(dc4, vcw);
    const query = L.tiles.streamQuery ?
        `${buffers * br * dc4}>;  // Q^T slices [${buffers}][4 DC4][BR]` :
        `${br * dc4 * chunks}>;  // Q^T [4 DC4 chunks][BR]`;
    return `var<workgroup> qs: array<vec4<f32>, ${query}
// K^T [4 DC4][BC] or V [BC][VWC] slices, ${buffers} buffer(s).
var<workgroup> kvs: array<vec4<f32>, ${buffers * kvSlice}>;
var<workgroup> ps: array<vec4<f32>, ${br * bc / 4}>;  // P^T [BC][BR]
const DC4 = ${dc4}u;
const VWC = ${vcw}u;
const KVSLICE = ${kvSlice}u;
const QSLICE = ${br * dc4}u;
${reduction}`;
  }
  if (L.outer) {
    return `var<workgroup> qs: array<vec4<f32>, ${br * dq4}>;  // Q^T [4 DQ4][BR]
var<workgroup> kvs: array<vec4<f32>, ${Math.max(bc * dq4, bc * vWidth)}>;  // K^T, then V [BC][VW]
var<workgroup> ps: array<vec4<f32>, ${br * bc / 4}>;  // P^T [BC][BR]
const VW = ${vWidth}u;
${reduction}`;
  }
  return `var<workgroup> qs: array<vec4<f32>, ${br * dq4}>;
var<workgroup> kvs: array<vec4<f32>, ${bc * L.kvStride}>;
var<workgroup> ps: array<vec4<f32>, ${br * bc / 4}>;

${reduction}`;
}
