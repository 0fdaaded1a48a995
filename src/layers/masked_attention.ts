/**
 * Attention composed of tfjs ops that also takes a key mask. The fused
 * FlashAttention kernels take key padding masks only, so FlashMHA runs
 * this path for a key mask that is not a padding mask (a false followed
 * by a true in some row; checked where the mask is in host memory,
 * docs/varlen.md). It holds the `[B, H, Sq, Sk]` scores,
 * like the attention users compose today; semantics otherwise match
 * flashAttention (docs/design.md, "Semantics"): scale, softcap, ALiBi, window/causal
 * (bottom-right aligned), GQA; a query row that sees no key gives zeros.
 * Its dropout draws a fresh random mask with tf.randomUniform (not the
 * op's seeded Philox mask).
 */
import * as tf from '@tensorflow/tfjs-core';

export interface MaskedAttentionOptions {
  causal?: boolean;
  softmaxScale?: number;
  windowSize?: [number, number];
  softcap?: number;
  /** `[H]` or `[B, H]`. */
  alibiSlopes?: tf.Tensor|null;
  dropoutRate?: number;
  /** `[B, Sk]`, true (or non-zero) = the key may be attended to. */
  keyMask?: tf.Tensor|null;
}

/** `[B, Sk, Hk, D]` -> `[B, Sk, Hk * groups, D]`: head h reads kv head floor(h / groups). */
export function repeatKVHeads(x: tf.Tensor4D, groups: number): tf.Tensor4D {
  if (groups === 1) {
    return x;
  }
  return tf.tidy(() => {
    const [batch, seq, headsKV, dim] = x.shape;
    // Rank 4, whose tile has a gradient in tfjs (rank 5 has none).
    const tiled = tf.tile(tf.reshape(x, [batch * seq, headsKV, 1, dim]), [1, 1, groups, 1]);
    return tf.reshape(tiled, [batch, seq, headsKV * groups, dim]) as tf.Tensor4D;
  });
}

/** `[Sq, Sk]`: 1 where query i may see key j under the window, else 0. */
function windowTable(seqQ: number, seqK: number, left: number, right: number): tf.Tensor2D {
  const values = new Float32Array(seqQ * seqK);
  for (let i = 0; i < seqQ; i++) {
    const diagonal = i + seqK - seqQ;
    for (let j = 0; j < seqK; j++) {
      const visible = (left < 0 || j >= diagonal - left) && (right < 0 || j <= diagonal + right);
      values[i * seqK + j] = visible ? 1 : 0;
    }
  }
  return tf.tensor2d(values, [seqQ, seqK]);
}

/** `[Sq, Sk]`: |i + Sk - Sq - j|, the ALiBi distance. */
function distanceTable(seqQ: number, seqK: number): tf.Tensor2D {
  const values = new Float32Array(seqQ * seqK);
  for (let i = 0; i < seqQ; i++) {
    for (let j = 0; j < seqK; j++) {
      values[i * seqK + j] = Math.abs(i + seqK - seqQ - j);
    }
  }
  return tf.tensor2d(values, [seqQ, seqK]);
}

/**
 * q `[B, Sq, H, D]`, k `[B, Sk, Hk, D]`, v `[B, Sk, Hk, Dv]` ->
 * `[B, Sq, H, Dv]`. Differentiable by tfjs autodiff.
 */
export function maskedAttention(
    q: tf.Tensor4D, k: tf.Tensor4D, v: tf.Tensor4D,
    opts: MaskedAttentionOptions = {}): tf.Tensor4D {
  return tf.tidy(() => {
    const [batch, seqQ, heads, headDim] = q.shape;
    const seqK = k.shape[1];
    const groups = heads / k.shape[2];
    const scale = opts.softmaxScale ?? 1 / Math.sqrt(headDim);
    const qh = tf.transpose(q, [0, 2, 1, 3]);
    const kh = tf.transpose(repeatKVHeads(k, groups), [0, 2, 1, 3]);
    const vh = tf.transpose(repeatKVHeads(v, groups), [0, 2, 1, 3]);
    let scores: tf.Tensor = tf.mul(tf.matMul(qh, kh, false, true), scale);
    if (opts.softcap != null && opts.softcap > 0) {
      scores = tf.mul(tf.tanh(tf.div(scores, opts.softcap)), opts.softcap);
    }
    if (opts.alibiSlopes != null) {
      const slopes = opts.alibiSlopes.rank === 1 ?
          tf.reshape(opts.alibiSlopes, [1, heads, 1, 1]) :
          tf.reshape(opts.alibiSlopes, [batch, heads, 1, 1]);
      scores = tf.sub(scores, tf.mul(slopes, distanceTable(seqQ, seqK)));
    }
    let [left, right] = opts.windowSize ?? [-1, -1];
    if (opts.causal) {
      right = 0;
    }
    // allowed: [1 or B, 1, Sq, Sk] of 0/1.
    let allowed: tf.Tensor|null = null;
    if (left >= 0 || right >= 0) {
      allowed = tf.reshape(windowTable(seqQ, seqK, left, right), [1, 1, seqQ, seqK]);
    }
    if (opts.keyMask != null) {
      const keys =
          tf.reshape(tf.cast(tf.cast(opts.keyMask, 'bool'), 'float32'), [batch, 1, 1, seqK]);
      allowed = allowed == null ? keys : tf.mul(allowed, keys);
    }
    let probs: tf.Tensor;
    if (allowed == null) {
      probs = tf.softmax(scores);
    } else {
      // Hidden keys get -1e30 (exp underflows to 0); multiplying by
      // `allowed` afterwards turns a row that sees no key into zeros.
      const bias = tf.mul(tf.sub(allowed, 1), 1e30);
      probs = tf.mul(tf.softmax(tf.add(scores, bias)), allowed);
    }
    const rate = opts.dropoutRate ?? 0;
    if (rate > 0) {
      const keep = tf.cast(tf.greaterEqual(tf.randomUniform(probs.shape), rate), 'float32');
      probs = tf.mul(probs, tf.div(keep, 1 - rate));
    }
    return tf.transpose(tf.matMul(probs, vh), [0, 2, 1, 3]) as tf.Tensor4D;
  });
}
