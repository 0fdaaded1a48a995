/**
 * A float64 FlashMHA, written out without tfjs, for the layer tests:
 * projections, RoPE, then attention by test/oracle.ts's oracleForward, or,
 * with a key padding mask (which that oracle has no input for), by
 * `maskedAttentionOracle` below, itself checked against oracleForward.
 */
import {OracleOptions, OracleProblem, oracleForward} from '../oracle';

export interface LayerWeights {
  /** name (without the layer prefix) -> values. */
  [name: string]: Float64Array;
}

export interface LayerConfig {
  embedDim: number;
  numHeads: number;
  numHeadsKV: number;
  headDim: number;
  causal: boolean;
  softmaxScale?: number;
  windowSize: [number, number];
  softcap: number;
  useAlibi: boolean;
  rotaryEmbDim: number;
  rotaryEmbBase: number;
  rotaryEmbInterleaved: boolean;
  crossAttention: boolean;
  alibiSlopes: number[];
}

/** y[r, o] = sum_i x[r, i] w[i, o] + bias[o]. */
export function project(
    x: Float64Array, rows: number, inDim: number, w: Float64Array,
    bias: Float64Array|undefined): Float64Array {
  const outDim = w.length / inDim;
  const y = new Float64Array(rows * outDim);
  for (let r = 0; r < rows; r++) {
    for (let o = 0; o < outDim; o++) {
      let sum = bias ? bias[o] : 0;
      for (let i = 0; i < inDim; i++) {
        sum += x[r * inDim + i] * w[i * outDim + o];
      }
      y[r * outDim + o] = sum;
    }
  }
  return y;
}

/** Columns [from, from + width) of a [rows, cols] matrix. */
function columns(
    x: Float64Array, rows: number, cols: number, from: number, width: number): Float64Array {
  const y = new Float64Array(rows * width);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < width; c++) {
      y[r * width + c] = x[r * cols + from + c];
    }
  }
  return y;
}

/** RoPE on [B, S, H, D] in place semantics (returns a copy). */
export function rotary(
    x: Float64Array, batch: number, seq: number, heads: number, dim: number, rotDim: number,
    base: number, interleaved: boolean): Float64Array {
  const y = Float64Array.from(x);
  const half = rotDim / 2;
  for (let b = 0; b < batch; b++) {
    for (let p = 0; p < seq; p++) {
      for (let h = 0; h < heads; h++) {
        const off = ((b * seq + p) * heads + h) * dim;
        for (let i = 0; i < half; i++) {
          const angle = p * Math.pow(base, -(2 * i) / rotDim);
          const [a, c] = interleaved ? [off + 2 * i, off + 2 * i + 1] : [off + i, off + i + half];
          y[a] = x[a] * Math.cos(angle) - x[c] * Math.sin(angle);
          y[c] = x[c] * Math.cos(angle) + x[a] * Math.sin(angle);
        }
      }
    }
  }
  return y;
}

/**
 * Attention with a key mask `[B][Sk]` (true = keep), straight from the
 * formulas: a row with no visible key is 0.
 */
export function maskedAttentionOracle(
    p: OracleProblem, o: OracleOptions, keyMask: boolean[][]): Float64Array {
  const {batch, seqQ, seqK, heads, headsKV, headDim, headDimV} = p;
  const scale = o.softmaxScale ?? 1 / Math.sqrt(headDim);
  let [left, right] = o.windowSize ?? [-1, -1];
  if (o.causal) {
    right = 0;
  }
  const out = new Float64Array(batch * seqQ * heads * headDimV);
  for (let b = 0; b < batch; b++) {
    for (let h = 0; h < heads; h++) {
      const hk = Math.floor(h / (heads / headsKV));
      for (let i = 0; i < seqQ; i++) {
        const diagonal = i + seqK - seqQ;
        const keys: number[] = [];
        const scores: number[] = [];
        for (let j = 0; j < seqK; j++) {
          if (!keyMask[b][j] || (left >= 0 && j < diagonal - left) ||
              (right >= 0 && j > diagonal + right)) {
            continue;
          }
          let s = 0;
          for (let d = 0; d < headDim; d++) {
            s += p.q[((b * seqQ + i) * heads + h) * headDim + d] *
                p.k[((b * seqK + j) * headsKV + hk) * headDim + d];
          }
          s *= scale;
          if (o.softcap) {
            s = o.softcap * Math.tanh(s / o.softcap);
          }
          if (p.alibiSlopes) {
            const slope =
                p.alibiSlopes.length === heads ? p.alibiSlopes[h] : p.alibiSlopes[b * heads + h];
            s -= slope * Math.abs(diagonal - j);
          }
          keys.push(j);
          scores.push(s);
        }
        if (keys.length === 0) {
          continue;
        }
        const max = Math.max(...scores);
        const weights = scores.map(s => Math.exp(s - max));
        const total = weights.reduce((a, w) => a + w, 0);
        keys.forEach((j, n) => {
          for (let d = 0; d < headDimV; d++) {
            out[((b * seqQ + i) * heads + h) * headDimV + d] +=
                weights[n] / total * p.v[((b * seqK + j) * headsKV + hk) * headDimV + d];
          }
        });
      }
    }
  }
  return out;
}

/**
 * The layer in float64: x `[B, Sq, E]` (and xKV `[B, Sk, Ekv]`) -> `[B, Sq, E]`.
 */
export function layerOracle(
    c: LayerConfig, w: LayerWeights, batch: number, x: Float64Array, seqQ: number,
    xKV?: {values: Float64Array, seq: number, dim: number}, keyMask?: boolean[][]): Float64Array {
  const {numHeads: heads, numHeadsKV: headsKV, headDim: dim, embedDim} = c;
  let q: Float64Array;
  let k: Float64Array;
  let v: Float64Array;
  let seqK = seqQ;
  if (c.crossAttention) {
    seqK = xKV!.seq;
    q = project(x, batch * seqQ, embedDim, w['q/kernel'], w['q/bias']);
    const kv = project(xKV!.values, batch * seqK, xKV!.dim, w['kv/kernel'], w['kv/bias']);
    // kv features: [2, Hk, D].
    k = columns(kv, batch * seqK, 2 * headsKV * dim, 0, headsKV * dim);
    v = columns(kv, batch * seqK, 2 * headsKV * dim, headsKV * dim, headsKV * dim);
  } else {
    const width = (heads + 2 * headsKV) * dim;
    const qkv = project(x, batch * seqQ, embedDim, w['qkv/kernel'], w['qkv/bias']);
    q = columns(qkv, batch * seqQ, width, 0, heads * dim);
    k = columns(qkv, batch * seqQ, width, heads * dim, headsKV * dim);
    v = columns(qkv, batch * seqQ, width, (heads + headsKV) * dim, headsKV * dim);
  }
  if (c.rotaryEmbDim > 0) {
    q = rotary(q, batch, seqQ, heads, dim, c.rotaryEmbDim, c.rotaryEmbBase, c.rotaryEmbInterleaved);
    k = rotary(
        k, batch, seqK, headsKV, dim, c.rotaryEmbDim, c.rotaryEmbBase, c.rotaryEmbInterleaved);
  }
  const problem: OracleProblem = {
    batch,
    seqQ,
    seqK,
    heads,
    headsKV,
    headDim: dim,
    headDimV: dim,
    q,
    k,
    v,
    alibiSlopes: c.useAlibi ? Float64Array.from(c.alibiSlopes.map(Math.fround)) : null,
  };
  const options: OracleOptions = {
    causal: c.causal,
    softmaxScale: c.softmaxScale,
    windowSize: c.windowSize,
    softcap: c.softcap,
  };
  const attention = keyMask ? maskedAttentionOracle(problem, options, keyMask) :
                              oracleForward(problem, options).out;
  return project(attention, batch * seqQ, heads * dim, w['out/kernel'], w['out/bias']);
}
