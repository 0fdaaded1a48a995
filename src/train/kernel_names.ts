/**
 * Kernel names, inputs and attributes of the fused training ops (the norms
 * with residual and dropout, softmax cross-entropy). Every backend kernel
 * sees the same normalized attributes; absent optional inputs are tensors
 * of shape [0], so the gradient can save them like any other input.
 */
import type {NamedTensorInfoMap, TensorInfo} from '@tensorflow/tfjs-core';

/**
 * z = dropout(x) + residual, y = norm(z) * gamma (+ beta).
 * Inputs `{x [N, C], residual [N, C] | [0], gamma [C], beta [C] | [0]}`.
 * Outputs `[y [N, C], z [N, C]]`.
 */
export const FusedNorm = 'FusedNorm';
/**
 * Inputs `{dy, dz (gradient of the z output), z, gamma}`; outputs
 * `[dzTotal, dx, dgamma, dbeta]`, dbeta of shape [0] for RMSNorm.
 */
export const FusedNormGrad = 'FusedNormGrad';

export interface FusedNormInputs extends NamedTensorInfoMap {
  x: TensorInfo;
  residual: TensorInfo;
  gamma: TensorInfo;
  beta: TensorInfo;
}

export interface FusedNormAttrs {
  /** RMSNorm (no centering, no beta) instead of LayerNorm. */
  rms: boolean;
  epsilon: number;
  /** Probability of dropping an element of x before the residual add. */
  dropoutRate: number;
  seedLo: number;
  seedHi: number;
  /**
   * The caller keeps z (returnResidual). When it does not, z's gradient is
   * zero and the backward makes it on the device: the tape would make it
   * on the host (an upload of [N, C] zeros per call).
   */
  returnResidual: boolean;
}

/**
 * Per-row softmax cross-entropy of logits `[N, V]` against int32 labels
 * `[N]`. Outputs `[loss [N], lse [N]]` (lse: log-sum-exp of the row).
 */
export const SoftmaxCrossEntropy = 'SoftmaxCrossEntropy';
/** Inputs `{dLoss [N], logits, labels, lse}`; output `[dLogits [N, V]]`. */
export const SoftmaxCrossEntropyGrad = 'SoftmaxCrossEntropyGrad';

export interface SoftmaxCrossEntropyAttrs {
  /** Weight moved from the label to the uniform distribution, in [0, 1). */
  labelSmoothing: number;
  /** Coefficient of the z-loss term zLoss * lse^2 (PaLM); 0 = off. */
  zLoss: number;
}

/**
 * The Philox counter word that keeps the norms' dropout stream apart from
 * attention's (whose third counter word is a head index): the norm's bit of
 * (row i, column j) is word j & 3 of philox((j >> 2, i, NORM_DROPOUT_STREAM,
 * 0), seed).
 */
export const NORM_DROPOUT_STREAM = 0x4e4f524d;

/**
 * Rotary embedding of `x [B, S, H, D]` by tables `cos, sin [S, rotaryDim/2]`
 * in one pass. Output `[y]`, x's shape. `inverse` rotates by -theta (the
 * gradient: the rotation's transpose).
 */
export const FusedRotary = 'FusedRotary';

export interface FusedRotaryAttrs {
  rotaryDim: number;
  interleaved: boolean;
  inverse: boolean;
}

/**
 * gelu_new (the tanh approximation) of any tensor, elementwise in one pass:
 * 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2 / pi). Forward only:
 * callers give it their own gradient (demo/gpt.ts's geluNew).
 */
export const FusedGelu = 'FusedGelu';

/**
 * A dense layer on a few rows, y = act(x w + bias), x `[M, K]`, w `[K, N]`,
 * bias `[N]` (x when `hasBias` is false), in one pass: what a decode step's MLP needs (tfjs's
 * fused matMul has no GELU). Inference only (no gradient). Output `[y]`.
 */
export const FusedDense = 'FusedDense';

export type FusedDenseActivation = 'linear'|'relu'|'gelu_new';

export interface FusedDenseAttrs {
  activation: FusedDenseActivation;
  hasBias: boolean;
}

/**
 * A norm and the dense layer after it, for decode steps: z = x (+ residual),
 * y = act((norm(z) * gamma (+ beta)) w + bias). Inputs `{x [M, K], residual,
 * gamma [K], beta, w [K, N], bias}`, absent ones given as x; outputs
 * `[y [M, N], z [M, K]]`. Inference only (no gradient).
 */
export const FusedNormDense = 'FusedNormDense';

export interface FusedNormDenseAttrs extends FusedDenseAttrs {
  rms: boolean;
  epsilon: number;
  hasResidual: boolean;
  hasBeta: boolean;
}
