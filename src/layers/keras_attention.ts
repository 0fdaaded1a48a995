/**
 * Keras's attention with an explicit mask, in composed tfjs ops: what
 * flashAttention cannot express (an arbitrary mask, Keras's treatment of
 * fully masked rows, the attention scores as an output). Follows Keras's
 * `_masked_softmax`: masked scores get -1e9 added (so a fully masked row
 * averages all keys, as in Keras), then softmax, then dropout of the
 * probabilities in training.
 */
import * as tf from '@tensorflow/tfjs-core';

/** Keras's large negative number for float32 masks. */
const MASKED_SCORE = -1e9;

/**
 * q `[B, T, H, Dk]`, k `[B, S, H, Dk]`, v `[B, S, H, Dv]`; mask broadcast
 * to `[B, H, T, S]` from `[B, T, S]` (or fewer leading dims), 1 = attend.
 * Returns the context `[B, T, H, Dv]` and the probabilities
 * `[B, H, T, S]` (before dropout, as Keras returns them).
 */
export function kerasMaskedAttention(
    q: tf.Tensor4D, k: tf.Tensor4D, v: tf.Tensor4D, mask: tf.Tensor|null, scale: number,
    dropoutRate: number): [tf.Tensor4D, tf.Tensor4D] {
  return tf.tidy(() => {
    // Keras scales the query before the product.
    const qh = tf.transpose(tf.mul(q, tf.scalar(scale)), [0, 2, 1, 3]);
    const kh = tf.transpose(k, [0, 2, 1, 3]);
    const vh = tf.transpose(v, [0, 2, 1, 3]);
    let scores: tf.Tensor = tf.matMul(qh, kh, false, true);
    if (mask != null) {
      let m = tf.cast(mask, 'float32');
      // Keras expands the mask at the heads axis (-3) up to the scores' rank.
      while (m.rank < 4) {
        m = tf.expandDims(m, -3);
      }
      scores = tf.add(scores, tf.mul(tf.sub(tf.scalar(1), m), tf.scalar(MASKED_SCORE)));
    }
    const probs = tf.softmax(scores) as tf.Tensor4D;
    const kept = dropoutRate > 0 ? tf.dropout(probs, dropoutRate) : probs;
    const context = tf.transpose(tf.matMul(kept, vh), [0, 2, 1, 3]) as tf.Tensor4D;
    return [context, probs];
  });
}

/** Keras's causal mask `[1, T, S]`: query i sees keys j <= i. */
export function kerasCausalMask(seqQ: number, seqK: number): tf.Tensor3D {
  return tf.tidy(() => {
    const rows = tf.reshape(tf.range(0, seqQ, 1, 'int32'), [1, seqQ, 1]);
    const cols = tf.reshape(tf.range(0, seqK, 1, 'int32'), [1, 1, seqK]);
    return tf.greaterEqual(rows, cols) as tf.Tensor3D;
  });
}
