/**
 * The shape of a program for tfjs-backend-webgpu's `runWebGPUProgram`
 * (its WebGPUProgram interface), for the training kernels. Unlike
 * own_pipeline.ts these record into tfjs's own command encoder, so a
 * training step's norms and losses add dispatches but no queue submits.
 *
 * tfjs generates each shader's bindings: `result` (the output) and one
 * `array<f32|i32>` per name in `variableNames`, all used by the code (the
 * pipeline layout is 'auto'), plus `uniforms` with each input's shape
 * (`<name>Shape`), `outShape`, `size` when asked, and the fields of
 * `uniforms` (filled by the caller's ProgramUniform, in order). The code
 * defines `fn main(index: i32)`, index being the global invocation index.
 */
export interface TfjsWebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: {x: number[]};
  dispatch: [number, number, number];
  workgroupSize: [number, number, number];
  size?: boolean;
  uniforms?: string;
  getUserCode(): string;
}

export type ProgramUniform = Array<{type: 'float32' | 'int32' | 'uint32', data: number[]}>;

/** Threads that share one row of a row-wise program. */
export function rowThreads(cols: number): number {
  return cols >= 2048 ? 256 : cols >= 512 ? 128 : 64;
}

/**
 * `fn rowSum(v: f32, tid: i32) -> f32` (and rowMax): a fixed-order tree
 * reduction over the workgroup; call from uniform control flow.
 */
export function rowReduceWGSL(threads: number): string {
  return `
var<workgroup> rowPartial: array<f32, ${threads}>;
fn rowSum(v: f32, tid: i32) -> f32 {
  rowPartial[tid] = v;
  workgroupBarrier();
  for (var s = ${threads / 2}; s > 0; s >>= 1u) {
    if (tid < s) {
      rowPartial[tid] += rowPartial[tid + s];
    }
    workgroupBarrier();
  }
  let total = rowPartial[0];
  workgroupBarrier();
  return total;
}
fn rowMax(v: f32, tid: i32) -> f32 {
  rowPartial[tid] = v;
  workgroupBarrier();
  for (var s = ${threads / 2}; s > 0; s >>= 1u) {
    if (tid < s) {
      rowPartial[tid] = max(rowPartial[tid], rowPartial[tid + s]);
    }
    workgroupBarrier();
  }
  let total = rowPartial[0];
  workgroupBarrier();
  return total;
}
`;
}
