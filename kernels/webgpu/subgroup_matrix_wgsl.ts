/**
 * WGSL of the subgroup-matrix built-ins the tensor-core backward uses (and
 * their portable stand-ins), generated for one MatrixShape: a product
 * C = A B of workgroup-memory operands, split into hi/lo float16 parts or
 * not, stored as float32 into workgroup memory.
 *
 * Stand-in: each built-in becomes a plain loop of the same semantics (an
 * M x N result spread over the subgroup's lanes, element e of lane l at
 * index e * lanes + l) and f16 is emulated in f32 by pack2x16float
 * rounding, so SwiftShader runs the same tiling, indexing and split
 * arithmetic as a GPU with the feature.
 */
import type {MatrixShape} from './subgroup_matrix';

/**
 * A matrix operand in workgroup memory: `arr` (the hi part; the lo part is
 * `arr` with `Lo` appended), the element offset of its first element,
 * its row stride, and whether it is stored column-major.
 */
export interface MatrixView {
  arr: string;
  off: string;
  stride: string;
  colMajor: boolean;
}

export class MatrixOpsWGSL {
  /**
   * `one` is a WGSL expression worth 1 that the compiler cannot fold: the
   * stand-in's loop bounds are multiplied by it, since SwiftShader unrolls
   * constant loops fully and then takes seconds per pipeline.
   */
  constructor(readonly shape: MatrixShape, readonly split: boolean, private readonly one: string) {}

  /** Element type of the operands in workgroup memory. */
  get elem(): string {
    return this.shape.standIn ? 'f32' : 'f16';
  }

  /** Names of an operand's parts (hi, then lo when split). */
  parts(arr: string): string[] {
    return this.split ? [arr, `${arr}Lo`] : [arr];
  }

  /** A loop bound: `n` on the real path, `n * one` in the stand-in. */
  lim(n: string): string {
    return this.shape.standIn ? `(${n}) * ${this.one}` : n;
  }

  /** `enable` lines of the real path (none in the stand-in). */
  enables(): string {
    return this.shape.standIn ? '' : `enable f16;
enable chromium_experimental_subgroup_matrix;
enable subgroups;
diagnostic(off, chromium.subgroup_matrix_uniformity);`;
  }

  /** Workgroup arrays of an operand's parts. */
  declare(arr: string, elements: number): string {
    return this.parts(arr)
        .map(a => `var<workgroup> ${a}: array<${this.elem}, ${elements}>;`)
        .join('\n');
  }

  /**
   * WGSL storing float32 `x` (already scaled into f16's range) at `arr[at]`
   * as its hi (and lo) float16 parts.
   */
  splitStore(arr: string, at: string, x: string): string {
    return this.split ? `{ let x = ${x}; let hi = sm_h(x); ${arr}[${at}] = hi; ${arr}Lo[${
                            at}] = sm_h(x - f32(hi)); }` :
                        `${arr}[${at}] = sm_h(${x});`;
  }

  /**
   * WGSL: `out[outOff + r * outStride + c] = (A B)[r][c]` for the
   * rows x cols result, A rows x depth (`a`), B depth x cols (`b`). Views
   * are given per block: `a(rowBlock, kStep)`, `b(kStep, colBlock)` as WGSL
   * expressions of the u32 variables `rb`, `ks`, `cb`. Subgroup `g` takes
   * every SG-th M x N block. Uses `g`, `ln` (lane) and the constant `SG`.
   */
  product(
      rows: number, cols: number, depth: number, a: MatrixView, b: MatrixView, out: string,
      outStride: number): string {
    const {M, N, K, lanes} = this.shape;
    const colBlocks = cols / N;
    const blocks = `for (var blk = g; blk < ${this.lim(`${rows / M * colBlocks}u`)}; blk += SG) {
      let rb = blk / ${colBlocks}u;
      let cb = blk % ${colBlocks}u;`;
    const outAt = `rb * ${M * outStride}u + cb * ${N}u`;
    if (this.shape.standIn) {
      // One result element per (lane, e) as the built-ins spread it; the
      // K steps and the split's products in one loop (no functions, no
      // accumulator arrays: SwiftShader compiles those slowly).
      const li = a.colMajor ? `k * ${a.stride} + r` : `r * ${a.stride} + k`;
      const ri = b.colMajor ? `c * ${b.stride} + k` : `k * ${b.stride} + c`;
      const terms = this.split ?
          [
            `${a.arr}Lo[li] * ${b.arr}[ri]`, `${a.arr}[li] * ${b.arr}Lo[ri]`,
            `${a.arr}[li] * ${b.arr}[ri]`
          ] :
          [`${a.arr}[li] * ${b.arr}[ri]`];
      return `${blocks}
      for (var e = 0u; e < ${this.lim(`${M * N / lanes}u`)}; e++) {
        let idx = e * ${lanes}u + ln;
        let r = idx / ${N}u;
        let c = idx % ${N}u;
        var sum = 0.0;
        for (var kk = 0u; kk < ${this.lim(`${depth}u`)}; kk++) {
          let ks = kk / ${K}u;
          let k = kk % ${K}u;
          let li = ${a.off} + ${li};
          let ri = ${b.off} + ${ri};
          ${terms.map(t => `sum = fma(${t.replace(' * ', ', ')}, sum);`).join('\n          ')}
        }
        ${out}[${outAt} + r * ${outStride}u + c] = sum;
      }
    }`;
    }
    return `${blocks}
      var acc = subgroup_matrix_result<f32, ${N}, ${M}>();
      for (var ks = 0u; ks < ${depth / K}u; ks++) {
        ${this.products('acc', a, b)}
      }
      subgroupMatrixStore(&${out}, ${outAt}, acc, false, ${outStride}u);
    }`;
  }

  /** sm_h: f32 to f16 (emulated in the stand-in). */
  helpers(): string {
    return this.shape.standIn ? `fn sm_h(x: f32) -> f32 {
  return unpack2x16float(pack2x16float(vec2<f32>(x, 0.0))).x;
}` :
                                `fn sm_h(x: f32) -> f16 {
  return f16(x);
}`;
  }

  /** The split's products, small terms first, then hi x hi. */
  private products(acc: string, a: MatrixView, b: MatrixView): string {
    const {M, N, K} = this.shape;
    const lo = (v: MatrixView) => ({...v, arr: `${v.arr}Lo`});
    const pairs = this.split ? [[lo(a), b], [a, lo(b)], [a, b]] : [[a, b]];
    const load = (v: MatrixView, type: string) =>
        `subgroupMatrixLoad<${type}>(&${v.arr}, ${v.off}, ${v.colMajor}, ${v.stride})`;
    return pairs
        .map(
            ([l, r]) => `${acc} = subgroupMatrixMultiplyAccumulate(${
                load(l, `subgroup_matrix_left<f16, ${K}, ${M}>`)}, ${
                load(r, `subgroup_matrix_right<f16, ${N}, ${K}>`)}, ${acc});`)
        .join('\n        ');
  }
}
