/**
 * RowGather on webgpu: `out[i, :] = rowIndex[i] > 0 ? x[rowIndex[i] - 1, :] : 0`
 * for `x [N, C]`, in one pass with one thread per output element (a vec4
 * of them when C is a multiple of 4). It replaces the composed
 * "concat a zero row, then gather" of src/varlen.ts's pad and unpad, which
 * copies the whole source once more and runs tfjs's general gather.
 */
import {TfjsWebGPUProgram} from './tfjs_program';

const THREADS = 64;

export class RowGatherProgram implements TfjsWebGPUProgram {
  variableNames = ['x', 'rowIndex'];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: {x: number[]};
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [THREADS, 1, 1];
  size = true;
  outputComponent: number;
  variableComponents: number[];

  /** `rows`: the output's rows M; `cols`: C, the row length of x and out. */
  constructor(rows: number, cols: number) {
    this.outputShape = [rows, cols];
    this.dispatchLayout = {x: [0, 1]};
    const lanes = cols % 4 === 0 ? 4 : 1;
    this.outputComponent = lanes;
    this.variableComponents = [lanes, 1];
    this.dispatch = [Math.ceil((rows * cols) / lanes / THREADS), 1, 1];
    this.shaderKey = `rowGather_${lanes}`;
  }

  getUserCode(): string {
    const lanes = this.outputComponent;
    const type = lanes === 4 ? 'vec4<f32>' : 'f32';
    return `
fn main(index: i32) {
  if (index < uniforms.size) {
    let cols = uniforms.xShape[1] / ${lanes};
    let row = index / cols;
    let source = rowIndex[row];
    var value = ${type}(0.0);
    if (source > 0 && source <= uniforms.xShape[0]) {
      value = x[(source - 1) * cols + index - row * cols];
    }
    result[index] = value;
  }
}
`;
  }
}
