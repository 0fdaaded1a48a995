/**
 * WGSL shared by the head-dim-sliced backward passes
 * (flash_attention_grad_dkdv_sliced_webgpu.ts,
 * flash_attention_grad_dq_sliced_webgpu.ts; docs/webgpu_tuning.md,
 * "Backward at head dims above 64"): one pass keeps the operand it reuses
 * resident and streams the other through one workgroup buffer, `sliceS`,
 * in `dimChunks` slices of the head dim. Each slice is read into the
 * private `sliceReg` while the previous one is multiplied, then stored to
 * `sliceS` between two barriers.
 */

/** Quads (vec4s) of the head dim in one slice: both widths round up to it. */
export function sliceQuads(d: number, dv: number, chunks: number): number {
  return Math.ceil(Math.max(Math.ceil(d / 4), Math.ceil(dv / 4)) / chunks);
}

/**
 * `body` once per slice c in [0, chunks), each in its own block with
 * `const c`: the slice loops hold barriers, which compilers are slow to
 * unroll, and a thread's accumulator indices depend on c; unrolled here,
 * they are constants (registers, not local memory).
 */
export function perSliceWGSL(chunks: number, body: string): string {
  return Array
      .from({length: chunks}, (_, c) => `{
      const c = ${c};
      ${body}
    }`)
      .join('\n    ');
}

/**
 * WGSL `fn NAME(row: i32, col: i32) -> i32`: the index of vec4 `col` of row
 * `row` of a workgroup array with `cols` vec4s per row. Where a warp reads
 * one column of rows a multiple of 128 bytes apart, they would share a bank:
 * rows of a multiple of 8 vec4s are stored XOR-swizzled (col ^ (row & 7),
 * which stays in the row), other widths padded by one vec4 (odd stride).
 * Returns the WGSL and the row stride in vec4s.
 */
export function swizzledRowsWGSL(name: string, cols: number): {wgsl: string, stride: number} {
  const swizzle = cols % 8 === 0;
  const stride = swizzle ? cols : cols + 1;
  return {
    wgsl: `fn ${name}(row: i32, col: i32) -> i32 {
  return row * ${stride} + ${swizzle ? '(col ^ (row & 7))' : 'col'};
}`,
    stride
  };
}

/**
 * Where a slice stream keeps its slice: the private prefetch array `reg`
 * (`pf` vec4s, a WGSL constant), the workgroup array `buffer` and its index
 * function `at`.
 */
export interface SliceNames {
  reg: string;
  buffer: string;
  at: string;
  pf: string;
}

/** The one stream of the sliced passes: `sliceReg`, `sliceS`, PF. */
export function sliceNames(at: string): SliceNames {
  return {reg: 'sliceReg', buffer: 'sliceS', at, pf: 'PF'};
}

/**
 * Workgroup bytes of a pass that streams both operands (DkDvTiles.streamed,
 * DqTiles.streamed): a slice of BR rows (`rowAt`), a slice of BC keys
 * (`keyAt`, transposed), P/dS, and (lse, Delta) per row. The same in both
 * passes.
 */
export function streamedStorageBytes(bc: number, br: number, sw4: number): number {
  const rowStride = swizzledRowsWGSL('rowAt', sw4).stride;
  const keyStride = swizzledRowsWGSL('keyAt', bc / 4).stride;
  return 16 * (br * rowStride + 4 * sw4 * keyStride + br * bc / 4) + 8 * br;
}

/**
 * WGSL functions reading a slice into a private prefetch array and storing
 * it to workgroup memory, for the row side (`rows`: Q or dO), the key side
 * (`keys`: K or V transposed) or both (the streamed passes), each with its
 * own SliceNames. Uses the constants T, D, DV, SW4 (quads per slice) and
 * the pf constants, and the bindings q, dy, k, v, p.
 *
 * `rowQuad(fromQ, row, head, x4)`: quad x4 of row `row` (of the whole
 * tensor) of q (or dy), zero past D (DV).
 *
 * rows: `fetchRowSlice(fromQ, row0, h, c, t, gr)` reads quads
 * [c SW4, (c + 1) SW4) of query rows [row0, row0 + BR) of head h of q (or
 * dy) as item e = r * SW4 + quad; `storeRowSlice(t)` writes item e to
 * `buffer[at(r, quad)]`.
 *
 * keys: `fetchKeySlice(fromK, j0, c, t, hk, gr)` reads dims
 * [4 c SW4, 4 (c + 1) SW4) of keys [j0, j0 + 4 SC) of kv head hk of k (or
 * v), transposed as quads of keys, item e = quad * 4 SW4 + x;
 * `storeKeySlice(t)` writes item e to `buffer[at(x, quad)]`.
 * Zeros past the batch row's rows or keys, and past D or DV.
 */
export function sliceStreamWGSL(
    d: number, dv: number, streams: {rows?: SliceNames, keys?: SliceNames}): string {
  // One element of a [rows, heads, w] tensor, or a quad where w % 4 == 0.
  const quad = (src: string, w: number, heads: string) => w % 4 === 0 ?
      `let base = (row * ${heads} + head) * ${w} + x4 * 4;
    return vec4<f32>(${src}[base], ${src}[base + 1], ${src}[base + 2], ${src}[base + 3]);` :
      `var val = vec4<f32>(0.0);
    for (var c = 0; c < 4; c++) {
      let x = x4 * 4 + c;
      if (x < ${w}) { val[c] = ${src}[(row * ${heads} + head) * ${w} + x]; }
    }
    return val;`;
  const rowQuad = `
fn rowQuad(fromQ: bool, row: i32, head: i32, x4: i32) -> vec4<f32> {
  if (fromQ) {
    if (x4 >= D4) { return vec4<f32>(0.0); }
    ${quad('q', d, 'p.heads')}
  }
  if (x4 >= DV4) { return vec4<f32>(0.0); }
  ${quad('dy', dv, 'p.heads')}
}`;
  const rowSide = ({reg, buffer, at, pf}: SliceNames) => `
fn fetchRowSlice(fromQ: bool, row0: i32, h: i32, c: i32, t: i32, gr: GradRows) {
  for (var u = 0; u < ${pf}; u++) {
    let e = t + u * T;
    let i = row0 + e / SW4;
    var val = vec4<f32>(0.0);
    if (e < BR * SW4 && i < gr.rowsQ) {
      val = rowQuad(fromQ, gr.q0 + i, h, c * SW4 + e % SW4);
    }
    ${reg}[u] = val;
  }
}
fn storeRowSlice(t: i32) {
  for (var u = 0; u < ${pf}; u++) {
    let e = t + u * T;
    if (e < BR * SW4) { ${buffer}[${at}(e / SW4, e % SW4)] = ${reg}[u]; }
  }
}`;
  const keySide = ({reg, buffer, at, pf}: SliceNames) => `
fn fetchKeySlice(fromK: bool, j0: i32, c: i32, t: i32, hk: i32, gr: GradRows) {
  for (var u = 0; u < ${pf}; u++) {
    let e = t + u * T;
    let x = c * 4 * SW4 + e % (4 * SW4);
    let quad = e / (4 * SW4);
    var val = vec4<f32>(0.0);
    if (e < SC * 4 * SW4) {
      for (var c4 = 0; c4 < 4; c4++) {
        let j = j0 + quad * 4 + c4;
        if (j < gr.rowsK) {
          let row = (gr.k0 + j) * p.headsKV + hk;
          if (fromK) {
            if (x < D) { val[c4] = k[row * D + x]; }
          } else if (x < DV) {
            val[c4] = v[row * DV + x];
          }
        }
      }
    }
    ${reg}[u] = val;
  }
}
fn storeKeySlice(t: i32) {
  for (var u = 0; u < ${pf}; u++) {
    let e = t + u * T;
    if (e < SC * 4 * SW4) { ${buffer}[${at}(e % (4 * SW4), e / (4 * SW4))] = ${reg}[u]; }
  }
}`;
  // One private array per stream (a shared one is declared once).
  const regs = [streams.rows, streams.keys].filter(n => n != null) as SliceNames[];
  const declared = [...new Map(regs.map(n => [n.reg, n])).values()];
  return `
${declared.map(n => `var<private> ${n.reg}: array<vec4<f32>, ${n.pf}>;`).join('\n')}
${rowQuad}
${streams.rows != null ? rowSide(streams.rows) : ''}${
      streams.keys != null ? keySide(streams.keys) : ''}`;
}
