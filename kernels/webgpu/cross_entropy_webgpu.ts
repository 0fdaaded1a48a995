/**
 * WGSL programs of the fused softmax cross-entropy (SoftmaxCrossEntropy /
 * SoftmaxCrossEntropyGrad on webgpu): the forward reads each row of logits
 * once for its log-sum-exp (online max and sum), then once more only with
 * label smoothing; the backward writes dLogits in one elementwise pass.
 */
import {ElementwiseProgram, RowWiseProgram} from './row_program';

/** Threads of the loss pass without smoothing (one thread per row). */
const LOSS_THREADS = 64;

/** lse `[N]` of logits `[N, V]`, one workgroup per row. */
export class CrossEntropyLseProgram extends RowWiseProgram {
  constructor(shape: [number, number]) {
    super(['logits'], shape, [shape[0]], 'crossEntropyLse');
  }

  getUserCode(): string {
    return this.rowMain('logits', 'V', `
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
  }`);
  }
}

/**
 * loss `[N]` = lse - (1 - eps) logits[label] - eps mean(logits) + zLoss lse^2.
 * With smoothing one workgroup sums each row; else one thread per row.
 */
export class CrossEntropyLossProgram extends RowWiseProgram {
  constructor(shape: [number, number], private readonly smoothing: boolean) {
    super(
        ['logits', 'labels', 'lse'], shape, [shape[0]], `crossEntropyLoss_${+ smoothing}`,
        'smoothing : f32, zLoss : f32,');
    if (!smoothing) {
      this.workgroupSize = [LOSS_THREADS, 1, 1];
      this.dispatch = [Math.ceil(shape[0] / LOSS_THREADS), 1, 1];
      this.shaderKey = `crossEntropyLoss_0_${LOSS_THREADS}`;
    }
  }

  getUserCode(): string {
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
    return this.rowMain('logits', 'V', `
  var s = 0.0;
  for (var c = tid; c < V; c += WG) {
    s += logits[base + c];
  }
  let rowMean = rowSum(s, tid) / f32(V);
  if (valid && tid == 0) {
    ${finish}
  }`);
  }
}

/**
 * dLogits = dLoss * (softmax * (1 + 2 zLoss lse) - (1 - eps) onehot - eps/V),
 * softmax recomputed from the saved lse.
 */
export class CrossEntropyGradProgram extends ElementwiseProgram {
  constructor(shape: [number, number]) {
    super(
        ['dLoss', 'logits', 'labels', 'lse'], shape, 'crossEntropyGrad',
        'smoothing : f32, zLoss : f32,');
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
