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
import type {FoldableActivation} from '../src/layers';
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

/**
 * The layer of geluNew (no weights). While decoding (IncrementalDecoder) the
 * Dense before it runs with this activation in its kernel (FoldableActivation).
 */
export class GeluNew extends tfl.layers.Layer implements FoldableActivation {
  static className = 'GPTGeluNew';
  readonly decodeActivation = 'gelu_new';
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

/**
 * Samples `length` characters after `prompt` without a cache: the last
 * `context` characters through the model per character, its logits read
 * back and the next id drawn on the host (`pickId`: the same draw as
 * `generateIdsWithCache` makes on the GPU, so both give the same text for
 * the same seed). `temperature` 0 is greedy.
 */
export async function generate(
    model: tfl.LayersModel, tokenizer: CharTokenizer, prompt: string, length: number,
    context: number, random: () => number, temperature = 0.8): Promise<string> {
  const ids = Array.from(tokenizer.encode(prompt));
  for (let n = 0; n < length; n++) {
    const window = ids.slice(-context);
    const last = tf.tidy(
        () => lastLogits(
            model.apply(tf.tensor2d([window], [1, window.length], 'int32')) as tf.Tensor));
    const logits = await last.data();
    last.dispose();
    const noise = temperature > 0 ? scaledNoise(logits.length, random, temperature) : null;
    ids.push(pickId(logits, noise));
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
 * Gumbel noise `-log(-log(u))` for `size` logits, u from `random`, times
 * `temperature` (float32): argmax(logits + noise) is a draw from
 * softmax(logits / temperature) (the Gumbel-max trick), which a GPU takes
 * with an add and an argmax, no read of the logits.
 */
export function scaledNoise(size: number, random: () => number, temperature: number): Float32Array {
  const noise = new Float32Array(size);
  for (let i = 0; i < size; i++) {
    // u in (0, 1): u = 0 would make a -Infinity that can never win anyway.
    noise[i] = -temperature * Math.log(-Math.log(Math.max(random(), Number.MIN_VALUE)));
  }
  return noise;
}

/**
 * The next id on the host: argmax of `logits` (+ `noise` when sampling)
 * in float32, as on the GPU; the first maximum wins, as with tf.argMax.
 */
function pickId(logits: ArrayLike<number>, noise: Float32Array|null): number {
  let best = 0;
  let bestValue = -Infinity;
  for (let i = 0; i < logits.length; i++) {
    const value = noise == null ? logits[i] : Math.fround(logits[i] + noise[i]);
    if (value > bestValue) {
      best = i;
      bestValue = value;
    }
  }
  return best;
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


export interface CachedGenerationOptions {
  /** 0: greedy (argmax). Above 0: drawn from softmax(logits / temperature). */
  temperature?: number;
  /** Uniform numbers in [0, 1) for sampling (e.g. seededRandom). */
  random?: () => number;
  /** Stop once this id is generated (it ends the output). */
  endId?: number;
  /**
   * Ids read back at once (default 8). Each read starts when its chunk is
   * recorded and is awaited only after the next chunk has been recorded,
   * so the CPU records tokens while the GPU runs the earlier ones; 1 with
   * `lag: false` waits for every token.
   */
  readEvery?: number;
  /** Await each chunk's read after recording the next chunk (default true). */
  lag?: boolean;
}

/**
 * Generates up to `length` ids after `promptIds` with KV caches: the
 * prompt goes through the model once (IncrementalDecoder), then each new
 * id alone, its attention reading the earlier ids' keys and values from
 * the caches. The model must be built from causal FlashMHA layers
 * (buildGPT). The next id is picked on the GPU (tf.argMax of the last
 * logits, plus Gumbel noise from `random` when sampling: one upload of
 * vocabSize floats per id) and fed straight into the next step, so no
 * step waits for the GPU; the ids are read back in chunks (`readEvery`).
 * With `endId`, the output ends at its first occurrence (ids already
 * computed past it are dropped). Returns the generated ids.
 */
export async function generateIdsWithCache(
    model: tfl.LayersModel, promptIds: ArrayLike<number>, length: number,
    opts: CachedGenerationOptions = {}): Promise<number[]> {
  const temperature = opts.temperature ?? 0;
  const readEvery = Math.max(1, Math.floor(opts.readEvery ?? 8));
  const lag = opts.lag ?? true;
  const random = opts.random ?? Math.random;
  const vocab = vocabOf(model);
  const decoder = new IncrementalDecoder(model, {batch: 1, maxSeqLen: promptIds.length + length});
  const ids: number[] = [];
  let ended = false;
  // Ids recorded but not yet read: `[1, 1]` int32 tensors on the device.
  let pending: tf.Tensor[] = [];
  // Chunks being read, oldest first; a chunk's tensor lives until its read ends.
  const reads: Array<{chunk: tf.Tensor, values: Promise<tf.TypedArray>}> = [];
  const collectOldest = async () => {
    const {chunk, values} = reads.shift()!;
    try {
      for (const id of await values) {
        if (!ended) {
          ids.push(id);
          ended = id === opts.endId;
        }
      }
    } finally {
      chunk.dispose();
    }
  };
  let input: tf.Tensor = tf.tensor2d(Array.from(promptIds), [1, promptIds.length], 'int32');
  try {
    await withDeferredSubmits(async () => {
      for (let n = 0; n < length && !ended; n++) {
        const feed = input;
        // Sampling: argmax(logits / T + g) = argmax(logits + T g) for T > 0.
        const noise = temperature > 0 ? scaledNoise(vocab, random, temperature) : null;
        input = tf.tidy(() => {
          const last = lastLogits(decoder.step(feed));
          const scores = noise == null ? last : tf.add(last, tf.tensor1d(noise));
          return tf.reshape(tf.argMax(scores), [1, 1]);
        });
        if (!pending.includes(feed)) {
          feed.dispose();  // the prompt
        }
        pending.push(input);
        if (pending.length === readEvery || n === length - 1) {
          const chunk = pending.length === 1 ? tf.clone(input) : tf.concat(pending, 1);
          // Every id but the last (the next step's input) is done with.
          pending.slice(0, -1).forEach(t => t.dispose());
          pending = [];
          reads.push({chunk, values: chunk.data()});  // submits the recorded steps
          while (reads.length > (lag ? 1 : 0) && !ended) {
            await collectOldest();
          }
        }
      }
      while (reads.length > 0) {
        await collectOldest();
      }
    });
  } finally {
    for (const {chunk, values} of reads.splice(0)) {
      await values.catch(() => undefined);
      chunk.dispose();
    }
    pending.forEach(t => t.dispose());
    input.dispose();
    decoder.dispose();
  }
  return ids;
}

/** The vocabulary size: the last dim of the model's output (logits). */
function vocabOf(model: tfl.LayersModel): number {
  const shape = model.outputs[0].shape;
  return shape[shape.length - 1]!;
}

/**
 * `generate` with KV caches (generateIdsWithCache): same draws, so the same
 * text for the same seed; `prompt.length + length` characters at most are
 * attended. No step waits for the GPU: the ids are read back in chunks.
 */
export async function generateWithCache(
    model: tfl.LayersModel, tokenizer: CharTokenizer, prompt: string, length: number,
    random: () => number, temperature = 0.8): Promise<string> {
  const promptIds = Array.from(tokenizer.encode(prompt));
  const ids = await generateIdsWithCache(model, promptIds, length, {temperature, random});
  return tokenizer.decode([...promptIds, ...ids]);
}

/** The median of some numbers. */
export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}
