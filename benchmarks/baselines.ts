/**
 * What tfjs users write today: attention composed from matMul and softmax,
 * holding the whole `[B, H, Sq, Sk]` score tensor. It is the "composed"
 * baseline of the benchmarks and of the demo (the anchor of docs/design.md, "Performance method":
 * "tfjs-webgpu composed ops" was measured on this formulation).
 */
import * as tf from '@tensorflow/tfjs-core';

export interface ComposedAttentionOptions {
  causal?: boolean;
  softmaxScale?: number;
}

/**
 * q `[B, Sq, H, D]`, k `[B, Sk, H, D]`, v `[B, Sk, H, Dv]` -> `[B, Sq, H, Dv]`.
 * Causal is bottom-right aligned, as in flashAttention. Differentiable by
 * tfjs autodiff.
 */
export function composedAttention(
    q: tf.Tensor4D, k: tf.Tensor4D, v: tf.Tensor4D,
    opts: ComposedAttentionOptions = {}): tf.Tensor4D {
  return tf.tidy(() => {
    const [, seqQ, , headDim] = q.shape;
    const seqK = k.shape[1];
    const scale = opts.softmaxScale ?? 1 / Math.sqrt(headDim);
    const qh = tf.transpose(q, [0, 2, 1, 3]);
    const kh = tf.transpose(k, [0, 2, 1, 3]);
    const vh = tf.transpose(v, [0, 2, 1, 3]);
    let scores = tf.mul(tf.matMul(qh, kh, false, true), scale);
    if (opts.causal) {
      scores = tf.add(scores, causalBias(seqQ, seqK));
    }
    const probs = tf.softmax(scores);
    return tf.transpose(tf.matMul(probs, vh), [0, 2, 1, 3]) as tf.Tensor4D;
  });
}

const NEG = -1e9;

/**
 * `[Sq, Sk]`: 0 where key j <= i + Sk - Sq, else -1e9. Built by GPU ops
 * from two index ranges, as users do (bandPart-style), not filled on the
 * host and uploaded: a per-call host cost that users do not pay and the
 * baseline should not either.
 */
export function causalBias(seqQ: number, seqK: number): tf.Tensor2D {
  return tf.tidy(() => {
    const rows = tf.reshape(tf.range(seqK - seqQ, seqK, 1, 'int32'), [seqQ, 1]);
    const cols = tf.reshape(tf.range(0, seqK, 1, 'int32'), [1, seqK]);
    return tf.mul(tf.cast(tf.greater(cols, rows), 'float32'), NEG) as tf.Tensor2D;
  });
}
