/**
 * What the training kernels' programs share: the tfjs program fields of a
 * row-wise pass (one workgroup per row of an `[N, C]` input, for the norms'
 * and the loss's reductions) and of an elementwise pass (one thread per
 * output element), and the WGSL entry of a row-wise pass.
 */
import {rowReduceWGSL, rowThreads, TfjsWebGPUProgram} from './tfjs_program';

/** Threads of an elementwise pass's workgroup. */
const ELEMENTWISE_THREADS = 64;

/** The axes of a shape, as tfjs's dispatchLayout lists them. */
const axes = (shape: number[]) => shape.map((_, i) => i);

/** One workgroup of rowThreads(C) threads per row of an `[N, C]` input. */
export abstract class RowWiseProgram implements TfjsWebGPUProgram {
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: {x: number[]};
  dispatch: [number, number, number];
  workgroupSize: [number, number, number];

  /** `key`: the shader's variant (threads are appended). */
  constructor(
      public variableNames: string[], shape: [number, number], outputShape: number[], key: string,
      public uniforms?: string) {
    const threads = rowThreads(shape[1]);
    this.outputShape = outputShape;
    this.dispatchLayout = {x: axes(outputShape)};
    this.workgroupSize = [threads, 1, 1];
    this.dispatch = [shape[0], 1, 1];
    this.shaderKey = `${key}_${threads}`;
  }

  abstract getUserCode(): string;

  /**
   * `fn main` with the workgroup's reductions (rowSum, rowMax) and, before
   * `body`: WG (threads), tid, row, `cols` (the row's length, from input
   * `input`), valid (a real row) and base (the row's first element; rows
   * past the end read row 0 so that every thread reaches the barriers).
   */
  protected rowMain(input: string, cols: string, body: string): string {
    const threads = this.workgroupSize[0];
    return `
${rowReduceWGSL(threads)}
fn main(index: i32) {
  const WG = ${threads};
  let tid = i32(localId.x);
  let row = index / WG;
  let ${cols} = uniforms.${input}Shape[1];
  let valid = row < uniforms.${input}Shape[0];
  let base = select(0, row * ${cols}, valid);
  ${body}
}
`;
  }
}

/** One thread per element of the output (`index < uniforms.size`). */
export abstract class ElementwiseProgram implements TfjsWebGPUProgram {
  outputShape: number[];
  dispatchLayout: {x: number[]};
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [ELEMENTWISE_THREADS, 1, 1];
  size = true;

  constructor(
      public variableNames: string[], shape: number[], public shaderKey: string,
      public uniforms?: string) {
    this.outputShape = shape;
    this.dispatchLayout = {x: axes(shape)};
    const elements = shape.reduce((a, b) => a * b, 1);
    this.dispatch = [Math.ceil(elements / ELEMENTWISE_THREADS), 1, 1];
  }

  abstract getUserCode(): string;
}
