/**
 * Keras's MultiHeadAttention in float64, written out with loops (no tfjs):
 * projections with the Keras weight layout, scaled dot products, Keras's
 * masked softmax (masked scores get -1e9 added in float32, so a fully
 * masked row averages every key, unlike flashAttention's zero rows), and the output
 * projection. Checks the test harness's reference and this package's layer.
 */

export interface KerasMHAOracleWeights {
  /** [E, H, keyDim], [H, keyDim]; likewise key; value with valueDim. */
  query: {kernel: Float64Array, bias: Float64Array|null};
  key: {kernel: Float64Array, bias: Float64Array|null};
  value: {kernel: Float64Array, bias: Float64Array|null};
  /** [H, valueDim, O], [O]. */
  output: {kernel: Float64Array, bias: Float64Array|null};
}

export interface KerasMHAOracleProblem {
  batch: number;
  seqQ: number;
  seqK: number;
  /** Last dims of query, value and key. */
  queryDim: number;
  valueDim: number;
  keyInputDim: number;
  heads: number;
  keyDim: number;
  headDimV: number;
  outDim: number;
  query: Float64Array;
  value: Float64Array;
  /** null: key = value. */
  key: Float64Array|null;
  weights: KerasMHAOracleWeights;
  /** [B, Sq, Sk] of 0/1, or null. */
  attentionMask: Float64Array|null;
  /** Keras's causal mask: query i sees keys j <= i (top-left aligned). */
  causal: boolean;
}

/** x [N, In] times kernel [In, Out] plus bias [Out]: [N, Out]. */
function project(
    x: Float64Array, rows: number, inDim: number, kernel: Float64Array, bias: Float64Array|null,
    outDim: number): Float64Array {
  const y = new Float64Array(rows * outDim);
  for (let r = 0; r < rows; r++) {
    for (let o = 0; o < outDim; o++) {
      let acc = bias ? bias[o] : 0;
      for (let i = 0; i < inDim; i++) {
        acc += x[r * inDim + i] * kernel[i * outDim + o];
      }
      y[r * outDim + o] = acc;
    }
  }
  return y;
}

/** Returns the output `[B, Sq, outDim]` and the scores `[B, H, Sq, Sk]`. */
export function kerasMHAOracle(p: KerasMHAOracleProblem):
    {out: Float64Array, scores: Float64Array} {
  const {batch: B, seqQ: T, seqK: S, heads: H, keyDim: Dk, headDimV: Dv} = p;
  const w = p.weights;
  const q = project(p.query, B * T, p.queryDim, w.query.kernel, w.query.bias, H * Dk);
  const k = project(
      p.key ?? p.value, B * S, p.key ? p.keyInputDim : p.valueDim, w.key.kernel, w.key.bias,
      H * Dk);
  const v = project(p.value, B * S, p.valueDim, w.value.kernel, w.value.bias, H * Dv);
  const context = new Float64Array(B * T * H * Dv);
  const scores = new Float64Array(B * H * T * S);
  const row = new Float64Array(S);
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      for (let t = 0; t < T; t++) {
        let max = -Infinity;
        for (let s = 0; s < S; s++) {
          let dot = 0;
          for (let d = 0; d < Dk; d++) {
            dot += q[((b * T + t) * H + h) * Dk + d] * k[((b * S + s) * H + h) * Dk + d];
          }
          let score = dot / Math.sqrt(Dk);
          const visible = (p.attentionMask == null || p.attentionMask[(b * T + t) * S + s] !== 0) &&
              (!p.causal || s <= t);
          if (!visible) {
            // As float32 does: a score near -1e9 is -1e9 (ulp 64), so a
            // fully masked row is uniform.
            score = Math.fround(Math.fround(score) - 1e9);
          }
          row[s] = score;
          max = Math.max(max, score);
        }
        let sum = 0;
        for (let s = 0; s < S; s++) {
          row[s] = Math.exp(row[s] - max);
          sum += row[s];
        }
        for (let s = 0; s < S; s++) {
          const prob = row[s] / sum;
          scores[((b * H + h) * T + t) * S + s] = prob;
          for (let d = 0; d < Dv; d++) {
            context[((b * T + t) * H + h) * Dv + d] += prob * v[((b * S + s) * H + h) * Dv + d];
          }
        }
      }
    }
  }
  const out = project(context, B * T, H * Dv, w.output.kernel, w.output.bias, p.outDim);
  return {out, scores};
}
