/**
 * WGSL programs of the fused softmax cross-entropy (SoftmaxCrossEntropy /
 * SoftmaxCrossEntropyGrad on webgpu): the forward reads each row of logits
 * once for its log-sum-exp (online max and sum), then once more only with
 * label smoothing; the backward writes dLogits in one elementwise pass.
 */
import {rowReduceWGSL, rowThreads, TfjsWebGPUProgram} from './tfjs_program';

/** lse `[N]` of logits `[N, V]`, one workgroup per row. */
export class CrossEntropyLseProgram implements TfjsWebGPUProgram {
  variableNames = ['logits'];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = {x: [0]};
  dispatch: [number, number, number];
  workgroupSize: [number, number, number];

  constructor(shape: [number, number]) {
    const threads = rowThreads(shape[1]);
    this.outputShape = [shape[0]];
    this.workgroupSize = [threads, 1, 1];
    this.dispatch = [shape[0], 1, 1];
    this.shaderKey = `crossEntropyLse_${threads}`;
  }

  getUserCode(): string {
    const threads = this.workgroupSize[0];
    return `
${rowReduceWGSL(threads)}
fn main(index: i32) {
  const WG = ${threads};
  let tid = i32(localId.x);
  let row = index / WG;
  let V = uniforms.logitsShape[1];
  let valid = row < uniforms.logitsShape[0];
  let base = select(0, row * V, valid);
  // Online max and sum per thread, then the row's max and rescaled sum.
  var m = -3.4e38;
  var s = 0.0;
  for (var c = tid; c < V; c += WG) {
    let v = logits[base + c];
    let mNew = max(m, v);
    s = s * exp(m - mNew) + exp(v - mNew);
    m = mNew;
  }
  let rowMaxValue = rowMax(m, tid);
  let total = rowSum(s * exp(m - rowMaxValue), tid);
  if (valid && tid == 0) {
    result[row] = rowMaxValue + log(total);
  }
}
`;
  }
}

/**
 * loss `[N]` = lse - (1 - eps) logits[label] - eps mean(logits) + zLoss lse^2.
 * With smoothing one workgroup sums each row; else one thread per row.
 */
export class CrossEntropyLossProgram implements TfjsWebGPUProgram {
  variableNames = ['logits', 'labels', 'lse'];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = {x: [0]};
  dispatch: [number, number, number];
  workgroupSize: [number, number, number];
  uniforms = 'smoothing : f32, zLoss : f32,';

  constructor(shape: [number, number], private readonly smoothing: boolean) {
    const threads = smoothing ? rowThreads(shape[1]) : 64;
    this.outputShape = [shape[0]];
    this.workgroupSize = [threads, 1, 1];
    this.dispatch = [smoothing ? shape[0] : Math.ceil(shape[0] / 64), 1, 1];
    this.shaderKey = `crossEntropyLoss_${+ smoothing}_${threads}`;
  }

  getUserCode(): string {
    const threads = this.workgroupSize[0];
    const finish = `
    let label = labels[row];
    let l = lse[row];
    result[row] = l - (1.0 - uniforms.smoothing) * logits[base + label]
        - uniforms.smoothing * rowMean + uniforms.zLoss * l * l;`;
    if (!this.smoothing) {
      return `
fn main(index: i32) {
  let row = index;
  let V = uniforms.logitsShape[1];
  if (row < uniforms.logitsShape[0]) {
    let base = row * V;
    let rowMean = 0.0;
    ${finish}
  }
}
`;
    }
    return `
${rowReduceWGSL(threads)}
fn main(index: i32) {
  const WG = ${threads};
  let tid = i32(localId.x);
  let row = index / WG;
  let V = uniforms.logitsShape[1];
  let valid = row < uniforms.logitsShape[0];
  let base = select(0, row * V, valid);
  var s = 0.0;
  for (var c = tid; c < V; c += WG) {
    s += logits[base + c];
  }
  let rowMean = rowSum(s, tid) / f32(V);
  if (valid && tid == 0) {
    ${finish}
  }
}
`;
  }
}

/**
 * dLogits = dLoss * (softmax * (1 + 2 zLoss lse) - (1 - eps) onehot - eps/V),
 * softmax recomputed from the saved lse.
 */
export class CrossEntropyGradProgram implements TfjsWebGPUProgram {
  variableNames = ['dLoss', 'logits', 'labels', 'lse'];
  outputShape: number[];
  shaderKey = 'crossEntropyGrad';
  dispatchLayout = {x: [0, 1]};
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [64, 1, 1];
  size = true;
  uniforms = 'smoothing : f32, zLoss : f32,';

  constructor(shape: [number, number]) {
    this.outputShape = shape;
    this.dispatch = [Math.ceil(shape[0] * shape[1] / 64), 1, 1];
  }

  getUserCode(): string {
    return `
fn main(index: i32) {
  if (index < uniforms.size) {
    let V = uniforms.outShape[1];
    let row = index / V;
    let col = index % V;
    let l = lse[row];
    let p = exp(logits[index] - l) * (1.0 + 2.0 * uniforms.zLoss * l);
    let onehot = select(0.0, 1.0 - uniforms.smoothing, col == labels[row]);
    result[index] = dLoss[row] * (p - onehot - uniforms.smoothing / f32(V));
  }
}
`;
  }
}
