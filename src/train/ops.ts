/**
 * The fused training ops: layerNorm / rmsNorm with fused dropout and
 * residual add (flash_attn's dropout_add_layer_norm) and softmax
 * cross-entropy over a large vocabulary. Real tfjs ops: they run through
 * `engine.runKernel` (fused kernel) or `runKernelFunc` (reference), record
 * on the tape and free every intermediate.
 */
import * as tf from '@tensorflow/tfjs-core';

import {randomSeed, splitSeed} from '../dropout';
import {describeValue, FlashAttentionError} from '../errors';
import {checkOptions, OptionSpec} from '../options';

import {hasFusedKernel} from '../dispatch';
import {getImpl} from '../flags';

import {useFusedTrainingKernel} from './dispatch';
import {FusedDense, FusedDenseActivation, FusedDenseAttrs, FusedGelu, FusedNormDense, FusedNormDenseAttrs, FusedNorm, FusedNormAttrs, FusedNormGrad, FusedRotary, FusedRotaryAttrs, SoftmaxCrossEntropy, SoftmaxCrossEntropyAttrs, SoftmaxCrossEntropyGrad} from './kernel_names';
import {referenceCrossEntropyBackward, referenceCrossEntropyForward, referenceNormBackward, referenceNormForward} from './reference';

type GradMap = Record<string, () => tf.Tensor>;

interface KernelFuncRunner {
  runKernelFunc(params: {
    forwardFunc: (backend: tf.KernelBackend, save: (t: tf.Tensor[]) => void) => tf.Tensor[],
    backwardsFunc: (dys: tf.Tensor|tf.Tensor[], saved: tf.Tensor[]) => GradMap,
    inputs: tf.NamedTensorMap,
    attrs: tf.NamedAttrMap,
  }): tf.Tensor[];
}

export interface NormOptions {
  /** Added to dropout(x) before normalizing; same shape as x. */
  residual?: tf.Tensor;
  /** Probability of zeroing an element of x (training only), in [0, 1). */
  dropoutRate?: number;
  /** Integer in [0, 2^53): the dropout mask's Philox key. Random if absent. */
  seed?: number;
  /** Added to the variance; default 1e-5 (LayerNorm), 1e-6 (RMSNorm). */
  epsilon?: number;
  /** Also return z = dropout(x) + residual (the next residual stream). */
  returnResidual?: boolean;
}

/** A bad argument: a FlashAttentionError naming it, like the attention ops'. */
function fail(opName: string, argument: string, expected: string, actual: unknown): never {
  throw new FlashAttentionError(
      opName, argument, expected, typeof actual === 'string' ? actual : describeValue(actual));
}

function checkFloat(t: unknown, name: string, opName: string): tf.Tensor {
  if (!(t instanceof tf.Tensor) || t.isDisposed) {
    fail(
        opName, name, 'a live float32 tf.Tensor', t instanceof tf.Tensor ? 'a disposed tensor' : t);
  }
  if (t.dtype !== 'float32') {
    fail(opName, name, 'of dtype float32', t.dtype);
  }
  return t;
}

const isRate = (v: unknown) => typeof v === 'number' && v >= 0 && v < 1;
const isSeed = (v: unknown) => Number.isInteger(v) && (v as number) >= 0 && (v as number) < 2 ** 53;
const isBoolean = (v: unknown) => typeof v === 'boolean';

/** The options of layerNorm and rmsNorm (strict: unknown keys are errors). */
const NORM_OPTION_SPECS: readonly OptionSpec[] = [
  {
    name: 'residual',
    expected: 'a float32 tf.Tensor of x\'s shape',
    valid: v => v instanceof tf.Tensor
  },
  {
    name: 'dropoutRate',
    expected: 'a number in [0, 1)',
    valid: isRate,
    aliases: ['dropout_p', 'dropout']
  },
  {name: 'seed', expected: 'an integer in [0, 2^53)', valid: isSeed},
  {
    name: 'epsilon',
    expected: 'a finite number > 0',
    valid: v => typeof v === 'number' && v > 0 && Number.isFinite(v),
    aliases: ['eps']
  },
  {name: 'returnResidual', expected: 'a boolean', valid: isBoolean, aliases: ['prenorm']},
];

/** The options of softmaxCrossEntropy. */
const CROSS_ENTROPY_OPTION_SPECS: readonly OptionSpec[] = [
  {
    name: 'labelSmoothing',
    expected: 'a number in [0, 1)',
    valid: isRate,
    aliases: ['label_smoothing']
  },
  {
    name: 'zLoss',
    expected: 'a finite number >= 0',
    valid: v => typeof v === 'number' && v >= 0 && Number.isFinite(v),
    aliases: ['z_loss', 'lse_square_scale']
  },
];

/** FusedNorm's gradient (fused kernel or reference); saved: x, residual, gamma, beta, z. */
function normGradFunc(
    dys: tf.Tensor|tf.Tensor[], saved: tf.Tensor[], attrs: tf.NamedAttrMap): GradMap {
  const [dy, dzTape] = dys as tf.Tensor2D[];
  const [, residual, gamma, beta, z] = saved;
  const a = attrs as unknown as FusedNormAttrs;
  const dzOut = a.returnResidual ? dzTape : tf.zerosLike(dzTape);
  const [dz, dx, dgamma, dbeta] = useFusedTrainingKernel(FusedNormGrad) ?
      tf.engine().runKernel(FusedNormGrad, {dy, dz: dzOut, z, gamma}, attrs) as tf.Tensor[] :
      referenceNormBackward(dy, dzOut, z as tf.Tensor2D, gamma as tf.Tensor1D, a);
  const hasResidual = residual.size > 0;
  if (!hasResidual) {
    dz.dispose();
  }
  return {
    x: () => dx,
    residual: () => hasResidual ? dz : tf.zerosLike(residual),
    gamma: () => dgamma,
    beta: () => a.rms ? tf.zerosLike(beta) : dbeta,
  };
}

export const fusedNormGradConfig: tf.GradConfig = {
  kernelName: FusedNorm,
  inputsToSave: ['x', 'residual', 'gamma', 'beta'],
  outputsToSave: [false, true],
  gradFunc: normGradFunc,
};

function runNorm(
    opName: string, rms: boolean, x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor|null,
    opts: NormOptions): tf.Tensor|[tf.Tensor, tf.Tensor] {
  opts = checkOptions<NormOptions>(
      opts ?? {}, opName, NORM_OPTION_SPECS, 'opts',
      'an options object ({residual, dropoutRate, ...}) or undefined');
  checkFloat(x, 'x', opName);
  if (x.rank < 1 || x.shape[x.rank - 1] === 0) {
    fail(opName, 'x', 'of rank >= 1 with a non-empty last axis', `shape [${x.shape}]`);
  }
  const cols = x.shape[x.rank - 1];
  checkFloat(gamma, 'gamma', opName);
  if (gamma.rank !== 1 || gamma.shape[0] !== cols) {
    fail(opName, 'gamma', `of shape [${cols}] (x's last axis)`, `[${gamma.shape}]`);
  }
  if (beta != null) {
    checkFloat(beta, 'beta', opName);
    if (beta.rank !== 1 || beta.shape[0] !== cols) {
      fail(opName, 'beta', `of shape [${cols}] (x's last axis)`, `[${beta.shape}]`);
    }
  }
  if (opts.residual != null) {
    checkFloat(opts.residual, 'residual', opName);
    if (!tf.util.arraysEqual(opts.residual.shape, x.shape)) {
      fail(opName, 'residual', `of x's shape [${x.shape}]`, `[${opts.residual.shape}]`);
    }
  }
  const epsilon = opts.epsilon ?? (rms ? 1e-6 : 1e-5);
  const dropoutRate = opts.dropoutRate ?? 0;
  const seed = dropoutRate > 0 ? opts.seed ?? randomSeed() : 0;
  const attrs: FusedNormAttrs =
      {rms, epsilon, dropoutRate, ...splitSeed(seed), returnResidual: opts.returnResidual === true};
  const kernelAttrs = attrs as unknown as tf.NamedAttrMap;

  const rows = x.size / cols;
  const x2 = tf.reshape(x, [rows, cols]) as tf.Tensor2D;
  const residual = opts.residual != null ? tf.reshape(opts.residual, [rows, cols]) : tf.zeros([0]);
  const shift = beta ?? tf.zeros([0]);
  const inputs = {x: x2, residual, gamma, beta: shift};
  let y: tf.Tensor, z: tf.Tensor;
  if (useFusedTrainingKernel(FusedNorm)) {
    [y, z] = tf.engine().runKernel(FusedNorm, inputs, kernelAttrs) as tf.Tensor[];
  } else {
    const engine = tf.engine() as unknown as KernelFuncRunner;
    [y, z] = engine.runKernelFunc({
      forwardFunc: (_backend, save) => {
        const [yr, zr] = referenceNormForward(x2, residual, gamma as tf.Tensor1D, shift, attrs);
        save([x2, residual, gamma, shift, zr]);
        return [yr, zr];
      },
      backwardsFunc: (dys, saved) => normGradFunc(dys, saved, kernelAttrs),
      inputs,
      attrs: kernelAttrs,
    });
  }
  const out = tf.reshape(y, x.shape);
  if (!opts.returnResidual) {
    return out;
  }
  return [out, tf.reshape(z, x.shape)];
}

type NormResult = tf.Tensor|[tf.Tensor, tf.Tensor];

/**
 * LayerNorm over the last axis of `dropout(x) + residual`, scaled by gamma
 * and shifted by beta, in one kernel where the backend has it.
 *
 * @returns y (x's shape), or `[y, z]` with `returnResidual` (z = the sum
 *     that was normalized, the next residual stream of a pre-norm block).
 */
function layerNorm_(
    x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, opts: NormOptions = {}): NormResult {
  return tf.tidy(() => runNorm('layerNorm', false, x, gamma, beta, opts));
}

/** RMSNorm: `z / sqrt(mean(z^2) + eps) * gamma`, z as in layerNorm. */
function rmsNorm_(x: tf.Tensor, gamma: tf.Tensor, opts: NormOptions = {}): NormResult {
  return tf.tidy(() => runNorm('rmsNorm', true, x, gamma, null, opts));
}

export interface NormOp<A extends unknown[]> {
  (...args: [...A, NormOptions&{returnResidual: true}]): [tf.Tensor, tf.Tensor];
  (...args: [...A, (NormOptions & {returnResidual?: false})?]): tf.Tensor;
  (...args: [...A, NormOptions?]): NormResult;
}

export const layerNorm = tf.op({layerNorm_}) as NormOp<[tf.Tensor, tf.Tensor, tf.Tensor]>;
export const rmsNorm = tf.op({rmsNorm_}) as NormOp<[tf.Tensor, tf.Tensor]>;

export interface CrossEntropyOptions {
  /** Weight moved from the label to the uniform distribution, in [0, 1). */
  labelSmoothing?: number;
  /** Adds zLoss * logsumexp^2 per row (keeps logits from drifting); >= 0. */
  zLoss?: number;
}

/** SoftmaxCrossEntropy's gradient; saved: logits, labels, lse. */
function crossEntropyGradFunc(
    dys: tf.Tensor|tf.Tensor[], saved: tf.Tensor[], attrs: tf.NamedAttrMap): GradMap {
  const [dLoss] = dys as tf.Tensor1D[];
  const [logits, labels, lse] = saved;
  const dLogits = useFusedTrainingKernel(SoftmaxCrossEntropyGrad) ?
      tf.engine().runKernel(SoftmaxCrossEntropyGrad, {dLoss, logits, labels, lse}, attrs) as
          tf.Tensor :
      referenceCrossEntropyBackward(
          dLoss, logits as tf.Tensor2D, labels as tf.Tensor1D, lse as tf.Tensor1D,
          attrs as unknown as SoftmaxCrossEntropyAttrs);
  return {logits: () => dLogits, labels: () => tf.zerosLike(labels)};
}

export const softmaxCrossEntropyGradConfig: tf.GradConfig = {
  kernelName: SoftmaxCrossEntropy,
  inputsToSave: ['logits', 'labels'],
  outputsToSave: [false, true],
  gradFunc: crossEntropyGradFunc,
};

/**
 * Per-row softmax cross-entropy of `logits [N, V]` against int32 class ids
 * `labels [N]`, fused: the forward keeps only each row's log-sum-exp, the
 * backward writes softmax - onehot in one pass over the logits.
 * loss = lse - (1 - s) * logits[label] - s * mean(logits) + zLoss * lse^2.
 *
 * @returns the loss of each row, `[N]`.
 */
function softmaxCrossEntropy_(
    logits: tf.Tensor2D, labels: tf.Tensor1D, opts: CrossEntropyOptions = {}): tf.Tensor1D {
  const opName = 'softmaxCrossEntropy';
  checkFloat(logits, 'logits', opName);
  opts = checkOptions<CrossEntropyOptions>(
      opts ?? {}, opName, CROSS_ENTROPY_OPTION_SPECS, 'opts',
      'an options object ({labelSmoothing, zLoss}) or undefined');
  if (logits.rank !== 2 || logits.shape[1] === 0) {
    fail(opName, 'logits', 'of shape [N, V] with V > 0', `[${logits.shape}]`);
  }
  if (!(labels instanceof tf.Tensor) || labels.isDisposed) {
    fail(opName, 'labels', 'a live int32 tf.Tensor of class ids [N]', labels);
  }
  if (labels.dtype !== 'int32') {
    fail(opName, 'labels', 'of dtype int32', labels.dtype);
  }
  if (labels.rank !== 1 || labels.shape[0] !== logits.shape[0]) {
    fail(opName, 'labels', `of shape [${logits.shape[0]}] (logits' rows)`, `[${labels.shape}]`);
  }
  const labelSmoothing = opts.labelSmoothing ?? 0;
  const zLoss = opts.zLoss ?? 0;
  const attrs: SoftmaxCrossEntropyAttrs = {labelSmoothing, zLoss};
  const kernelAttrs = attrs as unknown as tf.NamedAttrMap;
  const inputs = {logits, labels};
  let loss: tf.Tensor, lse: tf.Tensor;
  if (useFusedTrainingKernel(SoftmaxCrossEntropy)) {
    [loss, lse] = tf.engine().runKernel(SoftmaxCrossEntropy, inputs, kernelAttrs) as tf.Tensor[];
  } else {
    const engine = tf.engine() as unknown as KernelFuncRunner;
    [loss, lse] = engine.runKernelFunc({
      forwardFunc: (_backend, save) => {
        const [l, s] = referenceCrossEntropyForward(logits, labels, attrs);
        save([logits, labels, s]);
        return [l, s];
      },
      backwardsFunc: (dys, saved) => crossEntropyGradFunc(dys, saved, kernelAttrs),
      inputs,
      attrs: kernelAttrs,
    });
  }
  lse.dispose();
  return loss as tf.Tensor1D;
}

export const softmaxCrossEntropy = tf.op({softmaxCrossEntropy_});

/**
 * tf.losses-style mean softmax cross-entropy: `labels` are class ids of any
 * shape (int32, or float as model.fit passes them), `logits` that shape
 * plus the vocabulary axis. Usable as `model.compile({loss: ...})` through
 * `(yTrue, yPred) => softmaxCrossEntropyLoss(yTrue, yPred)`.
 */
export function softmaxCrossEntropyLoss(
    labels: tf.Tensor, logits: tf.Tensor, opts: CrossEntropyOptions = {}): tf.Scalar {
  return tf.tidy(() => {
    const vocab = logits.shape[logits.rank - 1];
    const ids = labels.dtype === 'int32' ? labels : tf.cast(labels, 'int32');
    const rows = tf.reshape(logits, [-1, vocab]) as tf.Tensor2D;
    const losses = softmaxCrossEntropy(rows, tf.reshape(ids, [-1]) as tf.Tensor1D, opts);
    // The mean as a product with a vector made on the device: the gradient
    // of tf.mean builds its ones on the host (an upload every step).
    const n = losses.shape[0];
    return tf.reshape(tf.matMul(tf.reshape(losses, [1, n]), tf.fill([n, 1], 1 / n)), []) as
        tf.Scalar;
  });
}

/** FusedRotary's gradient: the inverse rotation of dy (tables are constants). */
export const fusedRotaryGradConfig: tf.GradConfig = {
  kernelName: FusedRotary,
  inputsToSave: ['cos', 'sin'],
  gradFunc: (dy: tf.Tensor|tf.Tensor[], saved: tf.Tensor[], attrs: tf.NamedAttrMap): GradMap => {
    const [cos, sin] = saved;
    const a = attrs as unknown as FusedRotaryAttrs;
    return {
      x: () => tf.engine().runKernel(
                   FusedRotary, {x: dy as tf.Tensor, cos, sin},
                   {...a, inverse: !a.inverse} as unknown as tf.NamedAttrMap) as tf.Tensor,
      cos: () => tf.zerosLike(cos),
      sin: () => tf.zerosLike(sin),
    };
  },
};

/**
 * The rotary embedding of `x [B, S, H, D]` (positions 0..S-1) in one fused
 * kernel, or null when the active backend has none (or
 * FLASH_ATTENTION_IMPL is 'reference'): the caller then composes it.
 * `cos`, `sin`: `[S, rotaryDim / 2]` tables.
 */
export function fusedRotaryOrNull(
    x: tf.Tensor4D, cos: tf.Tensor2D, sin: tf.Tensor2D, rotaryDim: number,
    interleaved: boolean): tf.Tensor4D|null {
  if (!useFusedTrainingKernel(FusedRotary)) {
    return null;
  }
  const attrs: FusedRotaryAttrs = {rotaryDim, interleaved, inverse: false};
  return tf.engine().runKernel(FusedRotary, {x, cos, sin}, attrs as unknown as tf.NamedAttrMap) as
      tf.Tensor4D;
}

/**
 * gelu_new of `x` (the tanh approximation) in one fused elementwise kernel,
 * or null when the active backend has none (or FLASH_ATTENTION_IMPL is
 * 'reference'): the caller then composes it. No gradient is registered:
 * wrap it in a tf.customGrad with the analytic derivative.
 */
export function fusedGeluOrNull<T extends tf.Tensor>(x: T): T|null {
  if (!useFusedTrainingKernel(FusedGelu)) {
    return null;
  }
  tf.util.assert(x.dtype === 'float32', () => `fusedGeluOrNull: x must be float32, got ${x.dtype}`);
  return tf.engine().runKernel(FusedGelu, {x}) as T;
}

/**
 * Checks w `[K, N]`, bias `[N]` and the activation of a dense layer on x
 * `[M, K]`; false when a fused kernel should not take it (reference
 * implementation, too many rows, empty tensors).
 */
function denseCheck(
    x: tf.Tensor2D, w: tf.Tensor2D, bias: tf.Tensor1D|null, activation: FusedDenseActivation,
    opName: string): boolean {
  checkFloat(w, 'w', opName);
  if (w.rank !== 2 || w.shape[0] !== x.shape[1]) {
    fail(opName, 'w', `of shape [K = ${x.shape[1]}, N] (x's last axis)`, `[${w.shape}]`);
  }
  if (bias != null) {
    checkFloat(bias, 'bias', opName);
    if (bias.rank !== 1 || bias.shape[0] !== w.shape[1]) {
      fail(opName, 'bias', `of shape [N = ${w.shape[1]}]`, `[${bias.shape}]`);
    }
  }
  if (!['linear', 'relu', 'gelu_new'].includes(activation)) {
    fail(opName, 'activation', '\'linear\', \'relu\' or \'gelu_new\'', activation);
  }
  return getImpl() !== 'reference' && x.shape[0] <= FUSED_DENSE_MAX_ROWS && x.size > 0 &&
      w.size > 0;
}

/** Most rows fusedDenseOrNull takes (its kernel walks K per output: decode-sized). */
export const FUSED_DENSE_MAX_ROWS = 8;

const DENSE_OP = 'fusedDenseOrNull';

/**
 * act(x w + bias) for x `[M, K]`, w `[K, N]`, bias `[N]` (or null) in one
 * kernel, where the active backend has one and M <= FUSED_DENSE_MAX_ROWS;
 * else null (the caller composes it, e.g. tf.fused.matMul and a GELU).
 * For decode steps, whose MLP is otherwise a matMul and a GELU pass.
 * Inference only: no gradient is registered. Never throws for a missing
 * kernel, whatever FLASH_ATTENTION_IMPL says: it is an optimization.
 */
export function fusedDenseOrNull(
    x: tf.Tensor2D, w: tf.Tensor2D, bias: tf.Tensor1D|null,
    activation: FusedDenseActivation): tf.Tensor2D|null {
  checkFloat(x, 'x', DENSE_OP);
  if (x.rank !== 2) {
    fail(DENSE_OP, 'x', 'of rank 2 [M, K]', `shape [${x.shape}]`);
  }
  if (!denseCheck(x, w, bias, activation, DENSE_OP) ||
      !hasFusedKernel(FusedDense, tf.getBackend())) {
    return null;
  }
  const attrs: FusedDenseAttrs = {activation, hasBias: bias != null};
  // Without a bias, x stands in for it (never read): no tensor made per call.
  return tf.engine().runKernel(
             FusedDense, {x, w, bias: bias ?? x}, attrs as unknown as tf.NamedAttrMap) as
      tf.Tensor2D;
}

/** Longest row fusedNormDenseOrNull takes (its kernel keeps a row in workgroup memory). */
export const FUSED_NORM_DENSE_MAX_INNER = 4096;

export interface NormDenseArgs {
  /** `[M, K]`, M <= FUSED_DENSE_MAX_ROWS. */
  x: tf.Tensor2D;
  /** Added to x before the norm (x's shape). */
  residual?: tf.Tensor2D|null;
  /** RMSNorm instead of LayerNorm. */
  rms: boolean;
  epsilon: number;
  gamma: tf.Tensor1D;
  beta?: tf.Tensor1D|null;
  /** `[K, N]` and `[N]`. */
  w: tf.Tensor2D;
  bias?: tf.Tensor1D|null;
  activation: FusedDenseActivation;
}

const NORM_DENSE_OP = 'fusedNormDenseOrNull';

/**
 * A pre-norm and the dense layer after it in one kernel, for decode steps:
 * z = x + residual, y = act((norm(z) * gamma + beta) w + bias); `[y, z]`,
 * or null where the active backend has no such kernel, M >
 * FUSED_DENSE_MAX_ROWS or K > FUSED_NORM_DENSE_MAX_INNER (the caller then
 * runs the norm and the dense layer). Inference only: no gradient.
 */
export function fusedNormDenseOrNull(args: NormDenseArgs): [tf.Tensor2D, tf.Tensor2D]|null {
  const {x, residual, gamma, beta, w, bias} = args;
  checkFloat(x, 'x', NORM_DENSE_OP);
  if (x.rank !== 2) {
    fail(NORM_DENSE_OP, 'x', 'of rank 2 [M, K]', `shape [${x.shape}]`);
  }
  const [, inner] = x.shape;
  const vectors = [['gamma', gamma], ['beta', beta]] as const;
  for (const [name, t] of vectors) {
    if (t != null) {
      checkFloat(t, name, NORM_DENSE_OP);
      if (t.rank !== 1 || t.shape[0] !== inner) {
        fail(NORM_DENSE_OP, name, `of shape [K = ${inner}] (x's last axis)`, `[${t.shape}]`);
      }
    }
  }
  if (residual != null) {
    checkFloat(residual, 'residual', NORM_DENSE_OP);
    if (!tf.util.arraysEqual(residual.shape, x.shape)) {
      fail(NORM_DENSE_OP, 'residual', `of x's shape [${x.shape}]`, `[${residual.shape}]`);
    }
  }
  if (!(typeof args.epsilon === 'number' && args.epsilon > 0 && Number.isFinite(args.epsilon))) {
    fail(NORM_DENSE_OP, 'epsilon', 'a finite number > 0', args.epsilon);
  }
  // The dense layer's checks (w, bias, activation), and whether it runs fused.
  const plain = denseCheck(x, w, bias ?? null, args.activation, NORM_DENSE_OP);
  if (!plain || !hasFusedKernel(FusedNormDense, tf.getBackend()) ||
      inner > FUSED_NORM_DENSE_MAX_INNER) {
    return null;
  }
  const attrs: FusedNormDenseAttrs = {
    activation: args.activation,
    hasBias: bias != null,
    rms: args.rms,
    epsilon: args.epsilon,
    hasResidual: residual != null,
    hasBeta: beta != null,
  };
  // Absent inputs are bound to x (never read): no tensor made per call.
  return tf.engine().runKernel(
             FusedNormDense,
             {x, residual: residual ?? x, gamma, beta: beta ?? x, w, bias: bias ?? x},
             attrs as unknown as tf.NamedAttrMap) as [tf.Tensor2D, tf.Tensor2D];
}
