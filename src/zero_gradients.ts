/**
 * Zero gradients known as such without reading them: when the op disposes
 * its lse output unused, the gradient tfjs's tape gives for it (dLse) is
 * zeros the tape made; a fused kernel that folds dLse in (Delta =
 * rowsum(dO * O) - dLse) can tell so here instead of reading the tensor.
 */
import type * as tf from '@tensorflow/tfjs-core';

/** The data of the marked tensors (tfjs data ids are objects). */
const zeroData = new WeakSet<object>();

/** Records that `t` is the zero gradient of an lse nothing used. */
export function markZeroLseGradient(t: tf.TensorInfo): void {
  zeroData.add(t.dataId);
}

/** Was `t` marked (markZeroLseGradient)? Tensors are immutable: still zero. */
export function isZeroLseGradient(t: tf.TensorInfo): boolean {
  return zeroData.has(t.dataId);
}
