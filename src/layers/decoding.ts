/**
 * Incremental decoding of a functional tf.layers model built with
 * attention layers that can decode (FlashMHA, and any layer with the same
 * `createCache`/`decode` pair): each step feeds only the new tokens, and
 * every attention layer reads the earlier tokens' keys and values from its
 * own KVCache instead of recomputing them.
 *
 * The model is run layer by layer in its graph order with concrete
 * tensors; the layers other than attention must work token by token
 * (embeddings, norms, dense layers, residual adds: a GPT's), because they
 * only see the new tokens.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type {SymbolicTensor} from '@tensorflow/tfjs-layers/dist/engine/topology';
import type {FusedDenseActivation, KVCache} from 'tfjs-flash-attention';
import {fusedDenseOrNull, fusedNormDenseOrNull} from 'tfjs-flash-attention';

/** A layer that keeps its own keys and values between calls. */
export interface DecodingLayer {
  createCache(batch: number, maxSeqLen: number): KVCache;
  decode(x: tf.Tensor, cache: KVCache): tf.Tensor;
}

export function isDecodingLayer(layer: unknown): layer is DecodingLayer {
  const l = layer as Partial<DecodingLayer>;
  return typeof l.createCache === 'function' && typeof l.decode === 'function';
}

/**
 * An elementwise activation layer that a Dense before it may fold into its
 * own kernel while decoding (fusedDenseOrNull: the matMul, bias and
 * activation in one pass), e.g. demo/gpt.ts's GeluNew. Only where the
 * Dense is linear and this layer is its output's only consumer.
 */
export interface FoldableActivation {
  readonly decodeActivation: FusedDenseActivation;
}

function foldableActivation(layer: unknown): FusedDenseActivation|null {
  return (layer as Partial<FoldableActivation>).decodeActivation ?? null;
}

/** A Dense whose output feeds only an activation layer: where the pair's output goes. */
interface Fold {
  activation: FusedDenseActivation;
  /** The Dense's output (the activation's input) and the activation's output. */
  inputId: number;
  outputId: number;
}

/**
 * A fused norm (FusedLayerNormalization, RMSNormalization) whose output
 * only a Dense reads: the pair (and the Dense's folded activation) runs as
 * one kernel (fusedNormDenseOrNull).
 */
interface NormFold {
  dense: tfl.layers.Layer;
  /** The norm's normalized output, and where the pair's result goes. */
  normedId: number;
  outputId: number;
  /** The Dense's activation, or that of the layer folded into it. */
  activation: FusedDenseActivation;
}

/** The parts of the fused norm layers (norm_layers.ts) that a decoding step reads. */
interface NormParts {
  epsilon: number;
  gamma: tfl.LayerVariable|null;
  beta: tfl.LayerVariable|null;
}

const NORM_CLASSES = new Set(['FusedLayerNormalization', 'RMSNormalization']);

/** The parts of tf.layers' Dense that a decoding step reads. */
interface DenseParts {
  kernel: tfl.LayerVariable|null;
  bias: tfl.LayerVariable|null;
  activation: {getClassName(): string}|null;
}

/** Activations tf.fused.matMul applies in its kernel (as tf.layers' Dense fuses them). */
const FUSED_ACTIVATIONS = new Set(['linear', 'relu', 'elu']);

/**
 * A Dense layer on `[B, S, in]` as one kernel (bias and activation in it),
 * or null for any other layer: tf.fused.matMul, or with `fold` (a linear
 * Dense and the activation after it) fusedDenseOrNull, which also takes
 * tf.layers' 'gelu_new' (null where it has no kernel for the call).
 * tf.layers' Dense multiplies a rank-3 input through a transpose of its
 * kernel: one extra kernel per layer and token.
 */
function denseStep(
    layer: tfl.layers.Layer, inputs: tf.Tensor[],
    fold: FusedDenseActivation|null = null): tf.Tensor|null {
  const x = inputs[0];
  if (layer.getClassName() !== 'Dense' || inputs.length !== 1 || x.rank !== 3) {
    return null;
  }
  const {kernel, bias, activation} = layer as unknown as DenseParts;
  const name = activation?.getClassName() ?? 'linear';
  if (kernel == null || (fold != null && name !== 'linear')) {
    return null;
  }
  const w = kernel.read() as tf.Tensor2D;
  const [batch, seq, inDim] = x.shape as [number, number, number];
  const x2d = tf.reshape(x, [batch * seq, inDim]) as tf.Tensor2D;
  const b = (bias?.read() ?? null) as tf.Tensor1D | null;
  let y: tf.Tensor|null;
  if (fold != null || name === 'gelu_new') {
    y = fusedDenseOrNull(x2d, w, b, fold ?? 'gelu_new');
  } else if (FUSED_ACTIVATIONS.has(name)) {
    y = tf.fused.matMul({
      a: x2d,
      b: w,
      bias: b ?? undefined,
      activation: name as tf.fused.Activation,
    });
  } else {
    y = null;
  }
  return y == null ? null : tf.reshape(y, [batch, seq, w.shape[1]]);
}

export interface IncrementalDecoderArgs {
  batch: number;
  /** Most tokens a sequence may reach (prompt + generated). */
  maxSeqLen: number;
}

export class IncrementalDecoder {
  private readonly caches = new Map<tfl.layers.Layer, KVCache>();
  /** Dense layers whose activation layer is folded into their kernel. */
  private readonly folds = new Map<tfl.layers.Layer, Fold>();
  /** Norm layers whose Dense (and its activation) run in the norm's kernel. */
  private readonly normFolds = new Map<tfl.layers.Layer, NormFold>();
  private disposed = false;

  constructor(readonly model: tfl.LayersModel, readonly args: IncrementalDecoderArgs) {
    if (model.inputs.length !== 1 || model.outputs.length !== 1) {
      throw new Error(`IncrementalDecoder: the model must have one input and one output, got ${
          model.inputs.length} and ${model.outputs.length}`);
    }
    for (const layer of model.layers) {
      if (isDecodingLayer(layer)) {
        this.caches.set(layer, layer.createCache(args.batch, args.maxSeqLen));
      }
    }
    if (this.caches.size === 0) {
      throw new Error(
          `IncrementalDecoder: model ${model.name} has no layer that can decode (e.g. FlashMHA)`);
    }
    this.findFolds();
  }

  /** Each linear Dense whose output only an activation layer reads (FoldableActivation). */
  private findFolds(): void {
    const consumers = new Map<number, number>();
    for (const layer of this.model.layers) {
      for (const node of layer.inboundNodes) {
        node.inputTensors.forEach(t => consumers.set(t.id, (consumers.get(t.id) ?? 0) + 1));
      }
    }
    for (const layer of this.model.layers) {
      const activation = foldableActivation(layer);
      if (activation == null) {
        continue;
      }
      for (const node of layer.inboundNodes) {
        const input = node.inputTensors[0];
        const dense = input?.sourceLayer;
        if (node.inputTensors.length === 1 && node.outputTensors.length === 1 &&
            dense?.getClassName() === 'Dense' && consumers.get(input.id) === 1 &&
            this.model.layers.includes(dense)) {
          this.folds.set(
              dense, {activation, inputId: input.id, outputId: node.outputTensors[0].id});
        }
      }
    }
    for (const dense of this.model.layers) {
      if (dense.getClassName() !== 'Dense' || dense.inboundNodes.length !== 1) {
        continue;
      }
      const node = dense.inboundNodes[0];
      const normed = node.inputTensors[0];
      const norm = normed?.sourceLayer;
      const parts = dense as unknown as DenseParts;
      const own = parts.activation?.getClassName() ?? 'linear';
      const fold = this.folds.get(dense);
      const activation = fold?.activation ?? own;
      if (node.inputTensors.length === 1 && norm != null && NORM_CLASSES.has(norm.getClassName()) &&
          this.model.layers.includes(norm) && normed.nodeIndex === 0 && normed.tensorIndex === 0 &&
          consumers.get(normed.id) === 1 && (fold == null || own === 'linear') &&
          ['linear', 'relu', 'gelu_new'].includes(activation)) {
        this.normFolds.set(norm, {
          dense,
          normedId: normed.id,
          outputId: fold?.outputId ?? node.outputTensors[0].id,
          activation: activation as FusedDenseActivation,
        });
      }
    }
  }

  /**
   * The norm layer's node and the Dense after it as one kernel: sets the
   * pair's output (and the norm's sum z, if the node outputs it); false
   * where it cannot run fused (the layers then run one by one).
   */
  private normDenseStep(
      layer: tfl.layers.Layer, fold: NormFold, node: {outputTensors: SymbolicTensor[]},
      inputs: tf.Tensor[], values: Map<number, tf.Tensor>): boolean {
    const [x, residual] = inputs;
    const {epsilon, gamma, beta} = layer as unknown as NormParts;
    const {kernel, bias} = fold.dense as unknown as DenseParts;
    if (x.rank !== 3 || gamma == null || kernel == null) {
      return false;
    }
    const [batch, seq, dim] = x.shape as [number, number, number];
    const flat = (t: tf.Tensor) => tf.reshape(t, [batch * seq, dim]) as tf.Tensor2D;
    const result = fusedNormDenseOrNull({
      x: flat(x),
      residual: residual == null ? null : flat(residual),
      rms: layer.getClassName() === 'RMSNormalization',
      epsilon,
      gamma: gamma.read() as tf.Tensor1D,
      beta: (beta?.read() ?? null) as tf.Tensor1D | null,
      w: kernel.read() as tf.Tensor2D,
      bias: (bias?.read() ?? null) as tf.Tensor1D | null,
      activation: fold.activation,
    });
    if (result == null) {
      return false;
    }
    const [y, z] = result;
    values.set(fold.outputId, tf.reshape(y, [batch, seq, y.shape[1]]));
    if (node.outputTensors.length === 2) {
      values.set(node.outputTensors[1].id, tf.reshape(z, x.shape));
    }
    return true;
  }

  /** Tokens cached so far (per sequence). */
  get length(): number {
    return this.caches.values().next().value!.length;
  }

  /**
   * Runs the model on the next tokens `[B, Snew]` of every sequence and
   * returns the model's output for them (e.g. logits `[B, Snew, V]`).
   */
  step(tokens: tf.Tensor): tf.Tensor {
    if (this.disposed) {
      throw new Error('IncrementalDecoder: disposed');
    }
    const seqNew = tokens.shape[1] ?? 0;
    if (this.length + seqNew > this.args.maxSeqLen) {
      throw new Error(`IncrementalDecoder: ${this.length} + ${seqNew} tokens exceed maxSeqLen = ${
          this.args.maxSeqLen}`);
    }
    return tf.tidy(() => {
      const values = new Map<number, tf.Tensor>();
      values.set(this.model.inputs[0].id, tokens);
      for (const layer of this.model.layers) {
        if (layer.getClassName() === 'InputLayer') {
          continue;
        }
        const node = layer.inboundNodes.find(
            n => n.inputTensors.length > 0 && n.inputTensors.every(t => values.has(t.id)));
        if (node == null) {
          continue;  // A node of another model sharing this layer.
        }
        const inputs = node.inputTensors.map((t: SymbolicTensor) => values.get(t.id)!);
        const normFold = this.normFolds.get(layer);
        if (normFold != null && node.outputTensors[0].id === normFold.normedId &&
            this.normDenseStep(layer, normFold, node, inputs, values)) {
          continue;  // The Dense (and its activation) find their input missing.
        }
        const fold = this.folds.get(layer);
        if (fold != null && node.outputTensors[0].id === fold.inputId) {
          // The activation's output directly; the activation layer then
          // finds its input missing and is skipped.
          const folded = denseStep(layer, inputs, fold.activation);
          if (folded != null) {
            values.set(fold.outputId, folded);
            continue;
          }
        }
        const cache = this.caches.get(layer);
        const output = cache != null ?
            (layer as unknown as DecodingLayer).decode(inputs[0], cache) :
            denseStep(layer, inputs) ??
                layer.apply(inputs.length === 1 ? inputs[0] : inputs, node.callArgs);
        const outputs = Array.isArray(output) ? output : [output];
        node.outputTensors.forEach((t, i) => values.set(t.id, outputs[i] as tf.Tensor));
      }
      const result = values.get(this.model.outputs[0].id);
      if (result == null) {
        throw new Error(
            `IncrementalDecoder: could not reach the output of model ${this.model.name}`);
      }
      return result;
    });
  }

  /** Forgets every sequence (the caches stay allocated). */
  reset(): void {
    this.caches.forEach(c => c.reset());
  }

  /** Frees every cache. The model is not touched. */
  dispose(): void {
    this.caches.forEach(c => c.dispose());
    this.caches.clear();
    this.disposed = true;
  }
}
