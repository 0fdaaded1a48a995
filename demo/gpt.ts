/**
 * A small GPT built from tf.layers with FlashMHA (or any layer taking the
 * same arguments, e.g. ComposedMHA): token embedding, pre-norm blocks of
 * causal attention with rotary positions and a GELU MLP, a final norm and
 * the logits. Plus what the demo and the benchmark do with it: character
 * data, a training step, sampling.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';

import {fusedGeluOrNull, softmaxCrossEntropyLoss} from '../src';
import {FlashMHAArgs, flashMHA, FusedLayerNormalization, IncrementalDecoder} from '../src/layers';

export interface GPTConfig {
  vocabSize: number;
  numLayers: number;
  embedDim: number;
  numHeads: number;
  /** Attention dropout (FlashMHA's `dropout`). */
  dropout?: number;
}

export type AttentionFactory = (args: FlashMHAArgs) => tfl.layers.Layer;

/**
 * The norms of a GPT: 'gpt' this file's LayerNorm (composed, hand-written
 * gradient), 'tfjs' tf.layers.layerNormalization (stock tfjs), 'fused'
 * FusedLayerNormalization with each residual add fused into the next norm.
 */
export type NormKind = 'gpt'|'tfjs'|'fused';

/**
 * Layer normalization over the last axis by broadcasting, with its gradient
 * written out. tfjs-layers' layerNormalization tiles its mean, variance,
 * gamma and beta to the input's shape, and tfjs's Tile gradient is one
 * slice + add per repeat: thousands of kernels per norm in a training step
 * (it dominated a 6-layer GPT's step time on an H200). Autodiff of
 * tf.moments is no good either: the gradient of a mean or sum builds
 * ones(x.shape) on the host and uploads it (megabytes per norm per step).
 */
export class LayerNorm extends tfl.layers.Layer {
  static className = 'GPTLayerNorm';
  readonly epsilon: number;
  private gamma: tfl.LayerVariable|null = null;
  private beta: tfl.LayerVariable|null = null;

  constructor(args: {name?: string, epsilon?: number} = {}) {
    super(args);
    this.epsilon = args.epsilon ?? 1e-5;
  }

  override build(inputShape: tfl.Shape|tfl.Shape[]): void {
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tfl.Shape;
    const dim = shape[shape.length - 1]!;
    this.gamma = this.addWeight('gamma', [dim], 'float32', tfl.initializers.ones());
    this.beta = this.addWeight('beta', [dim], 'float32', tfl.initializers.zeros());
    this.built = true;
  }

  override computeOutputShape(inputShape: tfl.Shape|tfl.Shape[]): tfl.Shape|tfl.Shape[] {
    return inputShape;
  }

  override call(inputs: tf.Tensor|tf.Tensor[]): tf.Tensor {
    const x = Array.isArray(inputs) ? inputs[0] : inputs;
    return layerNorm(x, this.gamma!.read(), this.beta!.read(), this.epsilon);
  }

  override getConfig(): tf.serialization.ConfigDict {
    return {...super.getConfig(), epsilon: this.epsilon};
  }
}
tf.serialization.registerClass(LayerNorm);

/**
 * (x - mean) / sqrt(var + epsilon) * gamma + beta over the last axis, with
 * the analytic gradient: for g = dy * gamma and xhat the normalized input,
 * dx = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + epsilon),
 * dgamma = sum(dy * xhat), dbeta = sum(dy) over the leading axes.
 */
export function layerNorm(
    x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, epsilon: number): tf.Tensor {
  const leading = Array.from({length: x.rank - 1}, (_, i) => i);
  const normalize = (input: tf.Tensor) => {
    const {mean, variance} = tf.moments(input, -1, true);
    const inv = tf.rsqrt(tf.add(variance, epsilon));
    return [tf.mul(tf.sub(input, mean), inv), inv];
  };
  const norm = tf.customGrad((...args: Array<tf.Tensor|tf.GradSaveFunc>) => {
    const [input, scale, shift] = args as tf.Tensor[];
    // Only inputs are saved, and the statistics are recomputed in the
    // gradient: tfjs counts any other tensor a custom gradient keeps as a leak.
    (args[3] as tf.GradSaveFunc)([input, scale]);
    return {
      value: tf.tidy(() => tf.add(tf.mul(normalize(input)[0], scale), shift)),
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const [xhat, inv] = normalize(saved[0]);
        const g = tf.mul(dy, saved[1]);
        const centered = tf.sub(
            tf.sub(g, tf.mean(g, -1, true)), tf.mul(xhat, tf.mean(tf.mul(g, xhat), -1, true)));
        return [tf.mul(centered, inv), tf.sum(tf.mul(dy, xhat), leading), tf.sum(dy, leading)];
      },
    };
  });
  return norm(x, gamma, beta);
}

const GELU_K = Math.sqrt(2 / Math.PI);
const GELU_A = 0.044715;

/**
 * gelu_new (the tanh approximation), 0.5 x (1 + tanh(k (x + a x^3))), with
 * its gradient written out and every constant made on the device (tf.fill
 * is a kernel): tfjs-layers' 'gelu_new' activation uploads each of its
 * numbers as a scalar on every call, and tfjs's Tanh gradient uploads
 * scalar(1): host uploads in every training step. The gradient saves only
 * x (tfjs counts other tensors a custom gradient keeps as leaks) and
 * recomputes tanh:
 * d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 a x^2).
 */
export function geluNew(x: tf.Tensor): tf.Tensor {
  // Each constant is one Fill kernel: made once per forward and backward.
  const constants = () => {
    const [half, one, k, a] = [0.5, 1, GELU_K, GELU_A].map(v => tf.fill([], v));
    const tanhOf = (input: tf.Tensor) =>
        tf.tanh(tf.mul(k, tf.mul(input, tf.add(one, tf.mul(a, tf.square(input))))));
    return {half, one, k, a, tanhOf};
  };
  const gelu = tf.customGrad((...args: Array<tf.Tensor|tf.GradSaveFunc>) => {
    const input = args[0] as tf.Tensor;
    (args[1] as tf.GradSaveFunc)([input]);
    return {
      // One FusedGelu kernel where the backend has it; else, as 0.5 (1 +
      // tanh(z)) = sigmoid(2 z), x sigmoid(x (2k + 2ka x^2)): eight kernels
      // (two of them constants) where the tanh form takes thirteen.
      value: fusedGeluOrNull(input) ?? tf.tidy(() => {
        const [twoK, twoKA] = [2 * GELU_K, 2 * GELU_K * GELU_A].map(v => tf.fill([], v));
        const z = tf.mul(input, tf.add(twoK, tf.mul(twoKA, tf.square(input))));
        return tf.mul(input, tf.sigmoid(z));
      }),
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => tf.tidy(() => {
        const [s] = saved;
        const {half, one, k, tanhOf} = constants();
        const t = tanhOf(s);
        const inner = tf.add(one, tf.mul(tf.fill([], 3 * GELU_A), tf.square(s)));
        const slope = tf.mul(tf.mul(s, tf.sub(one, tf.square(t))), tf.mul(k, inner));
        return tf.mul(dy, tf.mul(half, tf.add(tf.add(one, t), slope)));
      }),
    };
  });
  return gelu(x);
}

/** The layer of geluNew (no weights). */
export class GeluNew extends tfl.layers.Layer {
  static className = 'GPTGeluNew';
  override call(inputs: tf.Tensor|tf.Tensor[]): tf.Tensor {
    return geluNew(Array.isArray(inputs) ? inputs[0] : inputs);
  }
}
tf.serialization.registerClass(GeluNew);

/**
 * Token ids `[B, S]` (any S) -> logits `[B, S, vocabSize]`. Every norm kind
 * creates its weights in the same order, so models of different kinds take
 * each other's weights (setWeights).
 */
export function buildGPT(
    config: GPTConfig, attention: AttentionFactory = flashMHA, name = 'gpt',
    norm: NormKind = 'gpt'): tfl.LayersModel {
  const {vocabSize, numLayers, embedDim, numHeads} = config;
  const headDim = embedDim / numHeads;
  const makeNorm = (layerName: string, returnResidual = false): tfl.layers.Layer =>
      norm === 'fused' ?
      new FusedLayerNormalization({name: layerName, epsilon: 1e-5, returnResidual}) :
      norm === 'tfjs' ? tfl.layers.layerNormalization({name: layerName, epsilon: 1e-5}) :
                        new LayerNorm({name: layerName});
  const tokens = tfl.input({shape: [null], dtype: 'int32', name: `${name}_tokens`});
  let x = tfl.layers
              .embedding({
                inputDim: vocabSize,
                outputDim: embedDim,
                name: `${name}_embed`,
                embeddingsInitializer: tfl.initializers.randomNormal({stddev: 0.02})
              })
              .apply(tokens) as tfl.SymbolicTensor;
  // Fused: a branch's output waits here to be added to x inside the next norm.
  let pending: tfl.SymbolicTensor|null = null;
  // The last norm's sum is not used: it is not asked for (the gradient of
  // an unused output is zeros that tfjs makes on the host, an upload).
  const normOf = (layerName: string, last = false): tfl.SymbolicTensor => {
    if (norm !== 'fused' || pending == null) {
      return makeNorm(layerName).apply(x) as tfl.SymbolicTensor;
    }
    const inputs = [pending, x];
    pending = null;
    if (last) {
      return makeNorm(layerName).apply(inputs) as tfl.SymbolicTensor;
    }
    const [normed, sum] = makeNorm(layerName, true).apply(inputs) as tfl.SymbolicTensor[];
    x = sum;
    return normed;
  };
  const addResidual = (branch: tfl.SymbolicTensor, layerName: string) => {
    if (norm === 'fused') {
      pending = branch;
    } else {
      x = tfl.layers.add({name: layerName}).apply([x, branch]) as tfl.SymbolicTensor;
    }
  };
  for (let i = 0; i < numLayers; i++) {
    const p = `${name}_block${i}`;
    const norm1 = normOf(`${p}_norm1`);
    const attended = attention({
                       embedDim,
                       numHeads,
                       causal: true,
                       rotaryEmbDim: headDim,
                       dropout: config.dropout,
                       name: `${p}_attention`
                     }).apply(norm1) as tfl.SymbolicTensor;
    addResidual(attended, `${p}_residual1`);
    const norm2 = normOf(`${p}_norm2`);
    const fused = norm === 'fused';
    const projected = tfl.layers
                          .dense({
                            units: 4 * embedDim,
                            activation: fused ? 'linear' : 'gelu_new',
                            name: `${p}_mlp_in`
                          })
                          .apply(norm2);
    const hidden = fused ? new GeluNew({name: `${p}_gelu`}).apply(projected) : projected;
    const mlp = tfl.layers.dense({units: embedDim, name: `${p}_mlp_out`}).apply(hidden) as
        tfl.SymbolicTensor;
    addResidual(mlp, `${p}_residual2`);
  }
  const normed = normOf(`${name}_norm`, true);
  const logits = tfl.layers.dense({units: vocabSize, name: `${name}_logits`}).apply(normed) as
      tfl.SymbolicTensor;
  return tfl.model({inputs: tokens, outputs: logits, name});
}

/** Character-level tokenizer of a text. */
export class CharTokenizer {
  readonly chars: string[];
  private readonly index = new Map<string, number>();
  constructor(text: string) {
    this.chars = Array.from(new Set(text)).sort();
    this.chars.forEach((c, i) => this.index.set(c, i));
  }
  get vocabSize(): number {
    return this.chars.length;
  }
  encode(text: string): Int32Array {
    return Int32Array.from(Array.from(text, c => {
      const id = this.index.get(c);
      if (id == null) {
        throw new Error(`CharTokenizer: ${JSON.stringify(c)} is not in the vocabulary`);
      }
      return id;
    }));
  }
  decode(ids: ArrayLike<number>): string {
    return Array.from(ids, id => this.chars[id]).join('');
  }
}

/** A seeded generator (mulberry32), so runs can be repeated. */
export function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6D2B79F5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Random windows of the corpus: inputs `[B, S]` and next-token targets `[B, S]`. */
export function sampleBatch(data: Int32Array, batch: number, seq: number, random: () => number):
    {x: tf.Tensor2D, y: tf.Tensor2D} {
  if (data.length < seq + 2) {
    throw new Error(
        `sampleBatch: the corpus (${data.length} tokens) is shorter than seq + 2 = ${seq + 2}`);
  }
  const xs = new Int32Array(batch * seq);
  const ys = new Int32Array(batch * seq);
  for (let b = 0; b < batch; b++) {
    const start = Math.floor(random() * (data.length - seq - 1));
    xs.set(data.subarray(start, start + seq), b * seq);
    ys.set(data.subarray(start + 1, start + seq + 1), b * seq);
  }
  return {x: tf.tensor2d(xs, [batch, seq], 'int32'), y: tf.tensor2d(ys, [batch, seq], 'int32')};
}

/** 'composed' tf ops, or 'fused' (softmaxCrossEntropyLoss: one kernel each way). */
export type LossKind = 'composed'|'fused';

/** Mean next-token cross-entropy of logits `[B, S, V]` against ids `[B, S]`. */
export function lossOf(
    logits: tf.Tensor, targets: tf.Tensor2D, vocabSize: number,
    kind: LossKind = 'composed'): tf.Scalar {
  if (kind === 'fused') {
    return softmaxCrossEntropyLoss(targets, logits);
  }
  return tf.tidy(() => {
    const flatLogits = tf.reshape(logits, [-1, vocabSize]);
    const labels = tf.oneHot(tf.reshape(targets, [-1]), vocabSize);
    // log-sum-exp minus the target's logit (tf.losses.softmaxCrossEntropy's
    // custom gradient trips tfjs's kernel leak check in test mode).
    return tf.mean(tf.sub(tf.logSumExp(flatLogits, -1), tf.sum(tf.mul(labels, flatLogits), -1))) as
        tf.Scalar;
  });
}

/** The model's trainable variables, for optimizer.minimize's varList. */
export function trainableVariables(model: tfl.LayersModel): tf.Variable[] {
  return model.trainableWeights.map(w => w.read() as tf.Variable);
}

/**
 * One optimizer step; resolves to the loss once the backend has finished
 * (reading the loss waits for the GPU), so timing it times the step.
 */
export async function trainStep(
    model: tfl.LayersModel, optimizer: tf.Optimizer, x: tf.Tensor2D, y: tf.Tensor2D,
    vocabSize: number, vars = trainableVariables(model),
    loss: LossKind = 'composed'): Promise<number> {
  const lossValue = optimizer.minimize(
      () => lossOf(model.apply(x, {training: true}) as tf.Tensor, y, vocabSize, loss), true, vars)!;
  const value = (await lossValue.data())[0];
  lossValue.dispose();
  return value;
}

/** Samples `length` characters after `prompt` (temperature sampling, window of `context`). */
export async function generate(
    model: tfl.LayersModel, tokenizer: CharTokenizer, prompt: string, length: number,
    context: number, random: () => number, temperature = 0.8): Promise<string> {
  const ids = Array.from(tokenizer.encode(prompt));
  for (let n = 0; n < length; n++) {
    const window = ids.slice(-context);
    const last = tf.tidy(
        () => lastLogits(
            model.apply(tf.tensor2d([window], [1, window.length], 'int32')) as tf.Tensor));
    ids.push(sampleLogits(await last.data(), temperature, random));
    last.dispose();
  }
  return tokenizer.decode(ids);
}

/** The logits of the last position of `[1, S, V]`, as `[V]`. */
function lastLogits(logits: tf.Tensor): tf.Tensor1D {
  const [, steps, vocab] = logits.shape as [number, number, number];
  const last = steps === 1 ? logits : tf.slice(logits, [0, steps - 1, 0], [1, 1, vocab]);
  return tf.reshape(last, [vocab]);
}

/**
 * An index drawn from softmax(logits / temperature), computed on the host:
 * the logits are read anyway, and a temperature on the GPU would be a
 * scalar uploaded per token.
 */
function sampleLogits(
    logits: ArrayLike<number>, temperature: number, random: () => number): number {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) {
    max = Math.max(max, logits[i]);
  }
  const weights = Array.from(logits, l => Math.exp((l - max) / temperature));
  let r = random() * weights.reduce((a, b) => a + b, 0);
  for (let i = 0; i < weights.length; i++) {
    r -= weights[i];
    if (r <= 0) {
      return i;
    }
  }
  return weights.length - 1;
}

/** What this file raises WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE to while generating. */
const STEP_SUBMIT_BATCH = 1 << 30;

/**
 * Runs `run` with tfjs-webgpu recording kernels into its command encoder
 * until a read instead of submitting every 15 kernels
 * (WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE): a generation step is a few hundred
 * small kernels, and each queue submit costs more on Dawn than most of
 * them. The flag is restored when `run` ends, also on error; while it
 * runs, other tfjs-webgpu work in this process submits late too. No effect
 * on other backends.
 */
export async function withDeferredSubmits<T>(run: () => Promise<T>): Promise<T> {
  const flag = 'WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE';
  if (tf.getBackend() !== 'webgpu') {
    return run();
  }
  const saved = tf.env().getNumber(flag);
  tf.env().set(flag, STEP_SUBMIT_BATCH);
  try {
    return await run();
  } finally {
    tf.env().set(flag, saved);
  }
}

/**
 * `generate` with KV caches: the prompt goes through the model once, then
 * each new character alone (IncrementalDecoder), its attention reading the
 * earlier characters' keys and values from the caches. The model must be
 * built from causal FlashMHA layers (buildGPT). Same sampling as
 * `generate`; `prompt.length + length` characters at most are attended.
 * One queue submit and one read per character (withDeferredSubmits); the
 * only upload is the new character's id.
 */
export async function generateWithCache(
    model: tfl.LayersModel, tokenizer: CharTokenizer, prompt: string, length: number,
    random: () => number, temperature = 0.8): Promise<string> {
  const ids = Array.from(tokenizer.encode(prompt));
  const decoder = new IncrementalDecoder(model, {batch: 1, maxSeqLen: ids.length + length});
  try {
    await withDeferredSubmits(async () => {
      let input = tf.tensor2d([ids], [1, ids.length], 'int32');
      for (let n = 0; n < length; n++) {
        const feed = input;
        const last = tf.tidy(() => lastLogits(decoder.step(feed)));
        feed.dispose();
        const next = sampleLogits(await last.data(), temperature, random);
        last.dispose();
        ids.push(next);
        input = tf.tensor2d([[next]], [1, 1], 'int32');
      }
      input.dispose();
    });
  } finally {
    decoder.dispose();
  }
  return tokenizer.decode(ids);
}

/** The median of some numbers. */
export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}
