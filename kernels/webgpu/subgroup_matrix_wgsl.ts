/**
 * WGSL of the subgroup-matrix built-ins the tensor-core kernels use, and
 * their portable stand-ins, generated for one MatrixShape.
 *
 * Real built-ins (Dawn's `chromium_experimental_subgroup_matrix`): loads and
 * stores with the layout as a template argument
 * (`subgroupMatrixLoad<T, row_major>(p, offset, stride)`; the form with a
 * bool argument is deprecated), offset and stride in array elements;
 * accumulators made with a fill value the compiler cannot fold (the zero
 * constructor becomes OpConstantNull, which the Vulkan CTS does not cover);
 * the subgroup and lane from the `subgroup_id` and
 * `subgroup_invocation_id` built-ins.
 *
 * Stand-in (MatrixShape.standIn, for devices without the feature, e.g.
 * SwiftShader in CI): plain loops with the built-ins' semantics, made
 * strict so that code relying on more than the built-ins promise fails:
 *  - a result's elements are spread over the lanes in a scrambled order
 *    (the real layout is opaque: only a store, a barrier and a load may
 *    move results between lanes);
 *  - subgroups and lanes are numbered in reverse of local_invocation_index
 *    (WGSL does not promise any relation);
 *  - the stride is raised to the matrix's minor extent and a matrix that
 *    would run past its array is read or written at offset 0 with that
 *    stride (Tint's robustness transform);
 *  - f16 is emulated in f32 with pack2x16float rounding, values beyond
 *    f16's range going to +-infinity as a hardware conversion rounds them;
 *  - a load or store whose offset or stride breaks Vulkan's alignment rule
 *    (in the real element sizes) gives NaN.
 * Where a workgroup array starts is up to the driver: that is checked on
 * the WGSL instead (assertWorkgroupAlignment).
 */
import type {MatrixShape} from './subgroup_matrix';

/**
 * A matrix operand in workgroup memory: `arr` (the hi part; the lo part is
 * `arr` with `Lo` appended), the element offset of its first element,
 * its stride, whether it is stored column-major, and the array's length:
 * a number, or a WGSL u32 expression for a runtime-sized storage array
 * (e.g. `arrayLength(&kh)`: the storage-loaded forward loads from storage).
 */
export interface MatrixView {
  arr: string;
  off: string;
  stride: string;
  colMajor: boolean;
  len: number|string;
}

/** WGSL: `subgroupMatrixLoad` of view `v` as the matrix type `type`. */
export function matrixLoadWGSL(shape: MatrixShape, type: string, v: MatrixView): string {
  return shape.diagnose?.legacyBuiltins ?
      `subgroupMatrixLoad<${type}>(&${v.arr}, ${v.off}, ${v.colMajor}, ${v.stride})` :
      `subgroupMatrixLoad<${type}, ${v.colMajor ? 'col_major' : 'row_major'}>(&${v.arr}, ${
          v.off}, ${v.stride})`;
}

/** WGSL: row-major `subgroupMatrixStore` of `value` at `arr[off]`. */
export function matrixStoreWGSL(
    shape: MatrixShape, arr: string, off: string, value: string, stride: string): string {
  return shape.diagnose?.legacyBuiltins ?
      `subgroupMatrixStore(&${arr}, ${off}, ${value}, false, ${stride});` :
      `subgroupMatrixStore<row_major>(&${arr}, ${off}, ${value}, ${stride});`;
}

/**
 * WGSL of a zero f32 result matrix. `zero` is a WGSL f32 expression worth
 * 0 that the compiler cannot fold (from a uniform).
 */
export function zeroResultWGSL(shape: MatrixShape, zero: string): string {
  const type = `subgroup_matrix_result<f32, ${shape.N}, ${shape.M}>`;
  return shape.diagnose?.nullAccumulator ? `${type}()` : `${type}(${zero})`;
}

/**
 * The real path's extra entry-point parameters (the subgroup built-ins),
 * with a leading comma; none in the stand-in.
 */
export function subgroupParamsWGSL(shape: MatrixShape): string {
  return shape.standIn               ? '' :
      shape.diagnose?.indexSubgroups ? `,
        @builtin(subgroup_invocation_id) sgLane: u32` :
                                       `,
        @builtin(subgroup_id) sgId: u32,
        @builtin(subgroup_invocation_id) sgLane: u32`;
}

/**
 * WGSL declaring `g` (this invocation's subgroup, 0 .. subgroups - 1) and
 * `ln` (its lane): the built-ins on the real path; in the stand-in a
 * numbering from `lid` that differs from the obvious one (see above).
 */
export function subgroupIdsWGSL(shape: MatrixShape, subgroups: number): string {
  const {lanes} = shape;
  if (shape.standIn) {
    return `let g = ${subgroups - 1}u - lid / ${lanes}u;
  let ln = ${lanes - 1}u - lid % ${lanes}u;`;
  }
  return shape.diagnose?.indexSubgroups ? `let g = lid / ${lanes}u;
  let ln = lid % ${lanes}u;` :
                                          `let g = sgId;
  let ln = sgLane;`;
}

/**
 * WGSL: where element `e` of lane `ln`'s share of an M x N result lies in
 * the matrix (row-major index) in the stand-in: a fixed scramble, so that
 * no code can depend on it.
 */
export function standInElementWGSL(shape: MatrixShape, e: string, ln: string): string {
  const {M, N, lanes} = shape;
  const size = M * N;
  // An odd multiplier coprime with size makes the map a permutation.
  let mul = 5;
  while (gcd(mul, size) !== 1) {
    mul += 2;
  }
  return `((${e} * ${lanes}u + ${ln}) * ${mul}u + 3u) % ${size}u`;
}

function gcd(a: number, b: number): number {
  return b === 0 ? a : gcd(b, a % b);
}

/**
 * Bytes every workgroup variable of a tensor-core kernel spans a multiple
 * of. Vulkan's cooperative-matrix loads and stores need 16-byte aligned
 * pointers, and WGSL lets the driver place workgroup variables in any
 * order, each only at its type's own alignment: one variable of 8 bytes
 * (the forward's first `wmax`) can leave every array after it 8 bytes off,
 * and each matrix row is then read 4 f16 elements early (docs/tensor_cores.md).
 * With every size a multiple of 32 (the backward's arrays always were),
 * any placement keeps every array aligned.
 */
export const WORKGROUP_SIZE_MULTIPLE = 32;

const WORKGROUP_ELEMENT_BYTES: Record<string, number> = {
  'f16': 2,
  'f32': 4,
  'u32': 4,
  'i32': 4,
  'atomic<u32>': 4,
  'atomic<i32>': 4,
  'vec2<f32>': 8,
  'vec4<f32>': 16,
};

/**
 * The workgroup variables of `code` whose byte size is not a multiple of
 * WORKGROUP_SIZE_MULTIPLE (or cannot be read), as messages; [] when all are.
 * Array lengths may be literals or the module's `const NAME = n;` values.
 */
export function workgroupAlignmentProblems(code: string): string[] {
  const consts = new Map<string, number>();
  for (const m of code.matchAll(/const\s+(\w+)\s*=\s*(\d+)u?\s*;/g)) {
    consts.set(m[1], Number(m[2]));
  }
  const problems: string[] = [];
  for (const m of code.matchAll(/var<workgroup>\s+(\w+)\s*:\s*([^;]+);/g)) {
    const [, name, type] = m;
    const arr = /^array<\s*(.+?)\s*,\s*(\w+)\s*>$/.exec(type.trim());
    const elem = WORKGROUP_ELEMENT_BYTES[(arr != null ? arr[1] : type).replace(/\s/g, '')];
    const count = arr == null ? 1 : /^\d+$/.test(arr[2]) ? Number(arr[2]) : consts.get(arr[2]);
    if (elem == null || count == null) {
      problems.push(`${name}: cannot read the size of ${type.trim()}`);
    } else if (elem * count % WORKGROUP_SIZE_MULTIPLE !== 0) {
      problems.push(`${name}: ${type.trim()} spans ${elem * count} bytes, not a multiple of ${
          WORKGROUP_SIZE_MULTIPLE}`);
    }
  }
  return problems;
}

/**
 * Throws where a tensor-core kernel's workgroup variable would break the
 * alignment of the others (see WORKGROUP_SIZE_MULTIPLE).
 */
export function assertWorkgroupAlignment(code: string, kernel: string): void {
  const problems = workgroupAlignmentProblems(code);
  if (problems.length > 0) {
    throw new Error(`${kernel}: workgroup variables not sized in multiples of ${
        WORKGROUP_SIZE_MULTIPLE} bytes: ${problems.join('; ')}`);
  }
}

/**
 * sm_hi: the float16 "hi" part of a float32, computed without a float16
 * round trip: the low 13 mantissa bits cleared leave the 11 significant
 * bits f16 holds, so the f32 difference x - hi is exact. The obvious
 * `x - f32(f16(x))` is not safe: on an H100 through Dawn/Vulkan the
 * compiler folded f32(f16(x)) to x (benchmarks/subgroup_matrix_probe.ts,
 * case 5), every lo part came out 0 and the split kept f16 accuracy.
 */
const SPLIT_HI_WGSL = `fn sm_hi(x: f32) -> f32 {
  return bitcast<f32>(bitcast<u32>(x) & 0xffffe000u);
}`;

/**
 * WGSL storing float32 `x` (already scaled into f16's range) as float16
 * parts: `hi = ...` (the lvalue `hi`) and, when `lo` is given, the rest.
 */
export function splitStoreWGSL(x: string, hi: string, lo: string|null): string {
  return lo == null ? `${hi} = sm_h(${x});` :
                      `{ let x = ${x}; let h = sm_hi(x); ${hi} = sm_h(h); ${lo} = sm_h(x - h); }`;
}

/**
 * WGSL helpers: sm_hi (above); sm_h, f32 to f16 (emulated in the stand-in:
 * to f16 and back, overflowing to infinity); and the stand-in's sm_place
 * (the built-ins' bounds handling: returns the offset and stride a load or
 * store really uses).
 */
export function standInHelpersWGSL(shape: MatrixShape): string {
  if (!shape.standIn) {
    return `${SPLIT_HI_WGSL}
fn sm_h(x: f32) -> f16 {
  return f16(x);
}`;
  }
  return `${SPLIT_HI_WGSL}
// f16(x) as f32: round to nearest even, beyond f16's range +-infinity.
fn sm_h(x: f32) -> f32 {
  if (abs(x) >= 65520.0) {
    return bitcast<f32>(select(0xff800000u, 0x7f800000u, x > 0.0));
  }
  return unpack2x16float(pack2x16float(vec2<f32>(x, 0.0))).x;
}

// 1 where a matrix's offset and stride, in bytes of the real element type
// (eb: 2 for f16 operands, 4 for f32 results), meet Vulkan's alignment
// rule for cooperative-matrix loads and stores (the lesser of 16 bytes
// and a row's, or column's, bytes); NaN where not, to poison the result.
fn sm_aligned(off: u32, stride: u32, minor: u32, eb: u32) -> f32 {
  let a = min(16u, minor * eb);
  let ok = (off * eb) % a == 0u && (stride * eb) % a == 0u;
  return select(bitcast<f32>(0x7fc00000u | (off & 0u)), 1.0, ok);
}

// Offset and stride a matrix load/store uses: the stride raised to the
// minor extent; offset 0 and that stride where the matrix would run past
// the array's len elements.
fn sm_place(off: u32, stride: u32, minor: u32, major: u32, len: u32) -> vec2<u32> {
  let s = max(stride, minor);
  if (off + s * (major - 1u) + minor <= len) {
    return vec2<u32>(off, s);
  }
  return vec2<u32>(0u, minor);
}`;
}

/**
 * WGSL: `sm_place` of view `v` for a rows x cols matrix (the stand-in's
 * effective offset (.x) and stride (.y)).
 */
export function standInPlaceWGSL(v: MatrixView, rows: number, cols: number, off = v.off): string {
  const [minor, major] = v.colMajor ? [rows, cols] : [cols, rows];
  const len = typeof v.len === 'number' ? `${v.len}u` : v.len;
  return `sm_place(${off}, ${v.stride}, ${minor}u, ${major}u, ${len})`;
}

/**
 * WGSL: `sm_aligned` of view `v` for a rows x cols matrix of `elemBytes`
 * bytes per element on the real path (1, or NaN where misaligned).
 */
export function standInAlignedWGSL(
    v: MatrixView, rows: number, cols: number, elemBytes: number, off = v.off): string {
  return `sm_aligned(${off}, ${v.stride}, ${v.colMajor ? rows : cols}u, ${elemBytes}u)`;
}

/** WGSL: index of element (r, c) of view `v` placed at `place` (a vec2 offset, stride). */
export function standInIndexWGSL(v: MatrixView, place: string, r: string, c: string): string {
  return v.colMajor ? `${place}.x + ${c} * ${place}.y + ${r}` :
                      `${place}.x + ${r} * ${place}.y + ${c}`;
}

export class MatrixOpsWGSL {
  /**
   * `one` is a WGSL expression worth 1 that the compiler cannot fold: the
   * stand-in's loop bounds are multiplied by it, since SwiftShader unrolls
   * constant loops fully and then takes seconds per pipeline; the real
   * path's accumulators are filled with `one - 1`.
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
    return splitStoreWGSL(x, `${arr}[${at}]`, this.split ? `${arr}Lo[${at}]` : null);
  }

  /**
   * WGSL: `out[outOff + r * outStride + c] = (A B)[r][c]` for the
   * rows x cols result, A rows x depth (`a`), B depth x cols (`b`). Views
   * are given per block: `a(rowBlock, kStep)`, `b(kStep, colBlock)` as WGSL
   * expressions of the u32 variables `rb`, `ks`, `cb`. Subgroup `g` takes
   * every SG-th M x N block. Uses `g`, `ln` (lane) and the constant `SG`;
   * `out` has `outLen` elements.
   */
  product(
      rows: number, cols: number, depth: number, a: MatrixView, b: MatrixView, out: string,
      outStride: number, outLen: number): string {
    const {M, N, K, lanes} = this.shape;
    const colBlocks = cols / N;
    const blocks = `for (var blk = g; blk < ${this.lim(`${rows / M * colBlocks}u`)}; blk += SG) {
      let rb = blk / ${colBlocks}u;
      let cb = blk % ${colBlocks}u;`;
    const outAt = `rb * ${M * outStride}u + cb * ${N}u`;
    if (this.shape.standIn) {
      // One result element per (lane, e) as the built-ins spread it, the
      // split's products in the K loop (no functions, no accumulator
      // arrays: SwiftShader compiles those slowly).
      const outView: MatrixView =
          {arr: out, off: outAt, stride: `${outStride}u`, colMajor: false, len: outLen};
      const terms = this.split ?
          [
            `${a.arr}Lo[li] * ${b.arr}[ri]`, `${a.arr}[li] * ${b.arr}Lo[ri]`,
            `${a.arr}[li] * ${b.arr}[ri]`
          ] :
          [`${a.arr}[li] * ${b.arr}[ri]`];
      return `${blocks}
      let atO = ${standInPlaceWGSL(outView, M, N)};
      for (var e = 0u; e < ${this.lim(`${M * N / lanes}u`)}; e++) {
        let idx = ${standInElementWGSL(this.shape, 'e', 'ln')};
        let r = idx / ${N}u;
        let c = idx % ${N}u;
        var sum = 0.0;
        var ok = ${standInAlignedWGSL(outView, M, N, 4)};
        for (var ks = 0u; ks < ${this.lim(`${depth / K}u`)}; ks++) {
          let atA = ${standInPlaceWGSL(a, M, K)};
          let atB = ${standInPlaceWGSL(b, K, N)};
          ok = ok * ${standInAlignedWGSL(a, M, K, 2)} * ${standInAlignedWGSL(b, K, N, 2)};
          for (var k = 0u; k < ${this.lim(`${K}u`)}; k++) {
            let li = ${standInIndexWGSL(a, 'atA', 'r', 'k')};
            let ri = ${standInIndexWGSL(b, 'atB', 'k', 'c')};
            ${terms.map(t => `sum = fma(${t.replace(' * ', ', ')}, sum);`).join('\n            ')}
          }
        }
        ${out}[${standInIndexWGSL(outView, 'atO', 'r', 'c')}] = sum * ok;
      }
    }`;
    }
    return `${blocks}
      var acc = ${zeroResultWGSL(this.shape, `f32(${this.one}) - 1.0`)};
      for (var ks = 0u; ks < ${depth / K}u; ks++) {
        ${this.products('acc', a, b)}
      }
      ${matrixStoreWGSL(this.shape, out, outAt, 'acc', `${outStride}u`)}
    }`;
  }

  /** sm_h (f32 to f16; emulated in the stand-in) and the stand-in's sm_place. */
  helpers(): string {
    return standInHelpersWGSL(this.shape);
  }

  /** The split's products, small terms first, then hi x hi. */
  private products(acc: string, a: MatrixView, b: MatrixView): string {
    const {M, N, K} = this.shape;
    const lo = (v: MatrixView) => ({...v, arr: `${v.arr}Lo`});
    const pairs = this.split ? [[lo(a), b], [a, lo(b)], [a, b]] : [[a, b]];
    return pairs
        .map(
            ([l, r]) => `${acc} = subgroupMatrixMultiplyAccumulate(${
                matrixLoadWGSL(this.shape, `subgroup_matrix_left<f16, ${K}, ${M}>`, l)}, ${
                matrixLoadWGSL(this.shape, `subgroup_matrix_right<f16, ${N}, ${K}>`, r)}, ${acc});`)
        .join('\n        ');
  }
}
