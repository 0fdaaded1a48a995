/**
 * The float64 oracle of the fused training ops (norms with residual and
 * dropout, softmax cross-entropy): their formulas written out row by row in
 * plain TypeScript, no tfjs. Layouts: x, residual, z, y `[N, C]`; logits
 * `[N, V]`; labels `[N]`.
 */
import {dropoutThreshold, philox4x32} from '../src/dropout';
import {NORM_DROPOUT_STREAM} from '../src/train/kernel_names';

export interface NormProblem {
  rows: number;
  cols: number;
  x: Float64Array;
  residual: Float64Array|null;
  gamma: Float64Array;
  /** null for RMSNorm. */
  beta: Float64Array|null;
  rms: boolean;
  epsilon: number;
  dropoutRate: number;
  seed: number;
}

/** The scaled keep-mask of the norm's dropout: 1/(1-rate) or 0 per element. */
export function oracleNormMask(p: NormProblem): Float64Array {
  const mask = new Float64Array(p.rows * p.cols).fill(1);
  if (p.dropoutRate === 0) {
    return mask;
  }
  const seedLo = p.seed % 2 ** 32;
  const seedHi = Math.floor(p.seed / 2 ** 32);
  const threshold = dropoutThreshold(p.dropoutRate);
  const words = new Uint32Array(4);
  for (let i = 0; i < p.rows; i++) {
    for (let j = 0; j < p.cols; j++) {
      philox4x32(j >>> 2, i, NORM_DROPOUT_STREAM, 0, seedLo, seedHi, words);
      mask[i * p.cols + j] = words[j & 3] >= threshold ? 1 / (1 - p.dropoutRate) : 0;
    }
  }
  return mask;
}

interface RowStats {
  z: Float64Array;
  xhat: Float64Array;
  rstd: Float64Array;
}

function normStats(p: NormProblem, mask: Float64Array): RowStats {
  const {rows, cols} = p;
  const z = new Float64Array(rows * cols);
  const xhat = new Float64Array(rows * cols);
  const rstd = new Float64Array(rows);
  for (let i = 0; i < rows; i++) {
    const o = i * cols;
    let mean = 0;
    for (let j = 0; j < cols; j++) {
      z[o + j] = p.x[o + j] * mask[o + j] + (p.residual ? p.residual[o + j] : 0);
      mean += z[o + j] / cols;
    }
    if (p.rms) {
      mean = 0;
    }
    let variance = 0;
    for (let j = 0; j < cols; j++) {
      variance += (z[o + j] - mean) ** 2 / cols;
    }
    rstd[i] = 1 / Math.sqrt(variance + p.epsilon);
    for (let j = 0; j < cols; j++) {
      xhat[o + j] = (z[o + j] - mean) * rstd[i];
    }
  }
  return {z, xhat, rstd};
}

export function oracleNormForward(p: NormProblem): {y: Float64Array, z: Float64Array} {
  const {z, xhat} = normStats(p, oracleNormMask(p));
  const y = new Float64Array(p.rows * p.cols);
  for (let k = 0; k < y.length; k++) {
    const j = k % p.cols;
    y[k] = xhat[k] * p.gamma[j] + (p.beta ? p.beta[j] : 0);
  }
  return {y, z};
}

export interface NormGradients {
  dx: Float64Array;
  dresidual: Float64Array;
  dgamma: Float64Array;
  dbeta: Float64Array;
}

/** Gradients of sum(y * dy) + sum(z * dz) with respect to the inputs. */
export function oracleNormBackward(
    p: NormProblem, dy: Float64Array, dzOut: Float64Array): NormGradients {
  const {rows, cols} = p;
  const mask = oracleNormMask(p);
  const {xhat, rstd} = normStats(p, mask);
  const dx = new Float64Array(rows * cols);
  const dresidual = new Float64Array(rows * cols);
  const dgamma = new Float64Array(cols);
  const dbeta = new Float64Array(cols);
  for (let i = 0; i < rows; i++) {
    const o = i * cols;
    let meanG = 0;
    let meanGX = 0;
    for (let j = 0; j < cols; j++) {
      const g = dy[o + j] * p.gamma[j];
      meanG += g / cols;
      meanGX += g * xhat[o + j] / cols;
      dgamma[j] += dy[o + j] * xhat[o + j];
      dbeta[j] += dy[o + j];
    }
    if (p.rms) {
      meanG = 0;
    }
    for (let j = 0; j < cols; j++) {
      const g = dy[o + j] * p.gamma[j];
      const dz = rstd[i] * (g - meanG - xhat[o + j] * meanGX) + dzOut[o + j];
      dresidual[o + j] = dz;
      dx[o + j] = dz * mask[o + j];
    }
  }
  return {dx, dresidual, dgamma, dbeta};
}

export interface CrossEntropyProblem {
  rows: number;
  vocab: number;
  logits: Float64Array;
  labels: Int32Array;
  labelSmoothing: number;
  zLoss: number;
}

function rowLse(p: CrossEntropyProblem, i: number): number {
  let max = -Infinity;
  for (let j = 0; j < p.vocab; j++) {
    max = Math.max(max, p.logits[i * p.vocab + j]);
  }
  let sum = 0;
  for (let j = 0; j < p.vocab; j++) {
    sum += Math.exp(p.logits[i * p.vocab + j] - max);
  }
  return max + Math.log(sum);
}

/** Per-row loss: -sum_j target_j log softmax_j + zLoss lse^2, target smoothed. */
export function oracleCrossEntropy(p: CrossEntropyProblem): Float64Array {
  const loss = new Float64Array(p.rows);
  const eps = p.labelSmoothing;
  for (let i = 0; i < p.rows; i++) {
    const lse = rowLse(p, i);
    let l = 0;
    for (let j = 0; j < p.vocab; j++) {
      const target = (j === p.labels[i] ? 1 - eps : 0) + eps / p.vocab;
      l -= target * (p.logits[i * p.vocab + j] - lse);
    }
    loss[i] = l + p.zLoss * lse * lse;
  }
  return loss;
}

/** Gradient of sum(loss * dLoss) with respect to the logits. */
export function oracleCrossEntropyBackward(
    p: CrossEntropyProblem, dLoss: Float64Array): Float64Array {
  const grad = new Float64Array(p.rows * p.vocab);
  const eps = p.labelSmoothing;
  for (let i = 0; i < p.rows; i++) {
    const lse = rowLse(p, i);
    for (let j = 0; j < p.vocab; j++) {
      const prob = Math.exp(p.logits[i * p.vocab + j] - lse);
      const target = (j === p.labels[i] ? 1 - eps : 0) + eps / p.vocab;
      grad[i * p.vocab + j] = dLoss[i] * (prob * (1 + 2 * p.zLoss * lse) - target);
    }
  }
  return grad;
}

/**
 * Rotary embedding of x `[B, S, H, D]` at positions 0..S-1 with
 * theta_j = s * base^(-2j / rotaryDim); `inverse` rotates by -theta (which
 * is also the gradient: the rotation's transpose applied to dy).
 */
export function oracleRotary(
    x: Float64Array, shape: number[], rotaryDim: number, base: number, interleaved: boolean,
    inverse = false): Float64Array {
  const [batch, seq, heads, dim] = shape;
  const half = rotaryDim / 2;
  const y = Float64Array.from(x);
  for (let b = 0; b < batch; b++) {
    for (let s = 0; s < seq; s++) {
      for (let h = 0; h < heads; h++) {
        const o = ((b * seq + s) * heads + h) * dim;
        for (let j = 0; j < half; j++) {
          const theta = (inverse ? -s : s) * Math.pow(base, -2 * j / rotaryDim);
          const [i1, i2] = interleaved ? [o + 2 * j, o + 2 * j + 1] : [o + j, o + j + half];
          y[i1] = x[i1] * Math.cos(theta) - x[i2] * Math.sin(theta);
          y[i2] = x[i2] * Math.cos(theta) + x[i1] * Math.sin(theta);
        }
      }
    }
  }
  return y;
}
