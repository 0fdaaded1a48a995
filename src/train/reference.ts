/**
 * Composed-ops reference of the fused training ops, forward and backward,
 * for every backend without fused kernels. The backward is the analytic
 * gradient (not autodiff of the forward): the gradients of tfjs's mean and
 * sum build ones(x.shape) on the host, which a training step cannot afford.
 */
import * as tf from '@tensorflow/tfjs-core';

import {fillDropoutMask} from '../dropout';

import {FusedNormAttrs, NORM_DROPOUT_STREAM, SoftmaxCrossEntropyAttrs} from './kernel_names';

/** The scaled keep-mask of a norm's dropout, `[N, C]` (1/(1-rate) or 0). */
export function normDropoutMask(rows: number, cols: number, attrs: FusedNormAttrs): tf.Tensor2D {
  const mask = new Float32Array(rows * cols);
  fillDropoutMask(
      mask, 0, attrs.seedLo, attrs.seedHi, attrs.dropoutRate, 0, NORM_DROPOUT_STREAM, 0, rows, 0,
      cols);
  return tf.tensor2d(mask, [rows, cols]);
}

/** `[xhat, rstd]` of z `[N, C]`: the normalized rows and 1/sqrt(var + eps). */
function normalize(z: tf.Tensor2D, attrs: FusedNormAttrs): [tf.Tensor2D, tf.Tensor2D] {
  const centered = attrs.rms ? z : tf.sub(z, tf.mean(z, -1, true));
  const rstd =
      tf.rsqrt(tf.add(tf.mean(tf.square(centered), -1, true), attrs.epsilon)) as tf.Tensor2D;
  return [tf.mul(centered, rstd), rstd];
}

/** `[y, z]` of FusedNorm. `residual`/`beta` of size 0 mean absent. */
export function referenceNormForward(
    x: tf.Tensor2D, residual: tf.Tensor, gamma: tf.Tensor1D, beta: tf.Tensor,
    attrs: FusedNormAttrs): [tf.Tensor2D, tf.Tensor2D] {
  return tf.tidy(() => {
    const [rows, cols] = x.shape;
    let z: tf.Tensor2D = attrs.dropoutRate > 0 ? tf.mul(x, normDropoutMask(rows, cols, attrs)) : x;
    if (residual.size > 0) {
      z = tf.add(z, residual);
    }
    // A fresh tensor even when z is x: the kernel's outputs are its own.
    z = attrs.dropoutRate > 0 || residual.size > 0 ? z : tf.clone(x);
    let y = tf.mul(normalize(z, attrs)[0], gamma);
    if (!attrs.rms && beta.size > 0) {
      y = tf.add(y, beta);
    }
    return [y as tf.Tensor2D, z];
  });
}

/**
 * `[dzTotal, dx, dgamma, dbeta]` of FusedNorm from dy, the gradient of the
 * z output, the saved z and gamma. dbeta has shape [0] for RMSNorm.
 */
export function referenceNormBackward(
    dy: tf.Tensor2D, dzOut: tf.Tensor2D, z: tf.Tensor2D, gamma: tf.Tensor1D,
    attrs: FusedNormAttrs): [tf.Tensor2D, tf.Tensor2D, tf.Tensor1D, tf.Tensor1D] {
  return tf.tidy(() => {
    const [xhat, rstd] = normalize(z, attrs);
    const g = tf.mul(dy, gamma);
    let inner = tf.sub(g, tf.mul(xhat, tf.mean(tf.mul(g, xhat), -1, true)));
    if (!attrs.rms) {
      inner = tf.sub(inner, tf.mean(g, -1, true));
    }
    const dz = tf.add(tf.mul(inner, rstd), dzOut) as tf.Tensor2D;
    const dx = attrs.dropoutRate > 0 ?
        tf.mul(dz, normDropoutMask(z.shape[0], z.shape[1], attrs)) as tf.Tensor2D :
        tf.clone(dz);
    const dgamma = tf.sum(tf.mul(dy, xhat), 0) as tf.Tensor1D;
    const dbeta = attrs.rms ? tf.zeros([0]) as tf.Tensor1D : tf.sum(dy, 0) as tf.Tensor1D;
    return [dz, dx, dgamma, dbeta];
  });
}

/** `[loss [N], lse [N]]` of SoftmaxCrossEntropy. */
export function referenceCrossEntropyForward(
    logits: tf.Tensor2D, labels: tf.Tensor1D,
    attrs: SoftmaxCrossEntropyAttrs): [tf.Tensor1D, tf.Tensor1D] {
  return tf.tidy(() => {
    const vocab = logits.shape[1];
    const lse = tf.logSumExp(logits, -1) as tf.Tensor1D;
    const picked = tf.sum(tf.mul(tf.oneHot(labels, vocab), logits), -1);
    let loss = tf.sub(lse, tf.mul(picked, 1 - attrs.labelSmoothing));
    if (attrs.labelSmoothing > 0) {
      loss = tf.sub(loss, tf.mul(tf.mean(logits, -1), attrs.labelSmoothing));
    }
    if (attrs.zLoss > 0) {
      loss = tf.add(loss, tf.mul(tf.square(lse), attrs.zLoss));
    }
    return [loss as tf.Tensor1D, lse];
  });
}

/**
 * dLogits = dLoss * (softmax * (1 + 2 zLoss lse) - (1 - eps) onehot - eps / V).
 */
export function referenceCrossEntropyBackward(
    dLoss: tf.Tensor1D, logits: tf.Tensor2D, labels: tf.Tensor1D, lse: tf.Tensor1D,
    attrs: SoftmaxCrossEntropyAttrs): tf.Tensor2D {
  return tf.tidy(() => {
    const vocab = logits.shape[1];
    let probs = tf.exp(tf.sub(logits, tf.expandDims(lse, 1)));
    if (attrs.zLoss > 0) {
      probs = tf.mul(probs, tf.expandDims(tf.add(tf.mul(lse, 2 * attrs.zLoss), 1), 1));
    }
    let grad = tf.sub(probs, tf.mul(tf.oneHot(labels, vocab), 1 - attrs.labelSmoothing));
    if (attrs.labelSmoothing > 0) {
      grad = tf.sub(grad, attrs.labelSmoothing / vocab);
    }
    return tf.mul(grad, tf.expandDims(dLoss, 1)) as tf.Tensor2D;
  });
}
