/**
 * Drop-in from tfjs-layers' (and Keras's) MultiHeadAttention: its
 * query/key/value EinsumDense kernels `[E, H, keyDim]` with biases
 * `[H, keyDim]`, and attention_output's kernel `[H, valueDim, E]` with bias
 * `[E]`, loaded into a FlashMHA (packed `[E, 3 H D]` for self-attention,
 * `q` and `kv` for crossAttention; `[H D, E]` out).
 */
import * as tf from '@tensorflow/tfjs-core';
import type {LayerVariable} from '@tensorflow/tfjs-layers';
import {FlashAttentionError, suggestOption} from 'tfjs-flash-attention';

import type {FlashMHA} from './flash_mha';

/** Keras's weight names, in the order of Keras's `get_weights()`. */
export const MULTI_HEAD_ATTENTION_WEIGHT_NAMES = [
  'query/kernel',
  'query/bias',
  'key/kernel',
  'key/bias',
  'value/kernel',
  'value/bias',
  'attention_output/kernel',
  'attention_output/bias',
] as const;

export type MultiHeadAttentionWeightName = typeof MULTI_HEAD_ATTENTION_WEIGHT_NAMES[number];

/** What the sublayers of tfjs-layers' MultiHeadAttention look like. */
interface EinsumDenseLike {
  kernel: LayerVariable;
  bias?: LayerVariable|null;
}
interface MultiHeadAttentionLike {
  queryDense?: EinsumDenseLike;
  keyDense?: EinsumDenseLike;
  valueDense?: EinsumDenseLike;
  outputDense?: EinsumDenseLike;
}

/**
 * A source of MultiHeadAttention weights: a built tfjs-layers
 * MultiHeadAttention layer, tensors by Keras weight name, or Keras's
 * `get_weights()` order (8 tensors, or 4 without biases).
 */
export type MultiHeadAttentionWeightsSource =
    MultiHeadAttentionLike|Partial<Record<MultiHeadAttentionWeightName, tf.Tensor>>|tf.Tensor[];

function byName(source: MultiHeadAttentionWeightsSource):
    Partial<Record<MultiHeadAttentionWeightName, tf.Tensor>> {
  if (Array.isArray(source)) {
    if (source.length === 8) {
      return Object.fromEntries(MULTI_HEAD_ATTENTION_WEIGHT_NAMES.map((n, i) => [n, source[i]]));
    }
    if (source.length === 4) {
      const kernels = MULTI_HEAD_ATTENTION_WEIGHT_NAMES.filter(n => n.endsWith('kernel'));
      return Object.fromEntries(kernels.map((n, i) => [n, source[i]]));
    }
    throw new FlashAttentionError(
        LOADER, 'source',
        `8 tensors (4 without biases) in Keras's order ${
            MULTI_HEAD_ATTENTION_WEIGHT_NAMES.join(', ')}`,
        `${source.length} tensors`);
  }
  const layer = source as MultiHeadAttentionLike;
  if (layer.queryDense !== undefined || layer.outputDense !== undefined) {
    const result: Partial<Record<MultiHeadAttentionWeightName, tf.Tensor>> = {};
    const sublayers = {
      query: layer.queryDense,
      key: layer.keyDense,
      value: layer.valueDense,
      attention_output: layer.outputDense
    };
    for (const [prefix, dense] of Object.entries(sublayers)) {
      if (dense == null || dense.kernel == null) {
        throw new FlashAttentionError(
            LOADER, 'source', 'a built MultiHeadAttention layer', `no ${prefix} kernel`,
            `${LOADER}: the MultiHeadAttention layer is not built (no ${
                prefix} kernel): call it once first`);
      }
      result[`${prefix}/kernel` as MultiHeadAttentionWeightName] = dense.kernel.read();
      if (dense.bias != null) {
        result[`${prefix}/bias` as MultiHeadAttentionWeightName] = dense.bias.read();
      }
    }
    return result;
  }
  if (source == null || typeof source !== 'object') {
    throw new FlashAttentionError(
        LOADER, 'source', 'a MultiHeadAttention layer, tensors by Keras weight name or a list',
        String(source));
  }
  // Tensors by name: a misspelt key would leave its weight as it was.
  const known = MULTI_HEAD_ATTENTION_WEIGHT_NAMES as readonly string[];
  const specs = known.map(name => ({name, expected: 'a tf.Tensor', valid: () => true}));
  for (const key of Object.keys(source)) {
    if (!known.includes(key)) {
      const meant = suggestOption(key, specs);
      throw new FlashAttentionError(
          LOADER, key, `one of ${known.join(', ')}`, key,
          `${LOADER}: unknown weight '${key}'${
              meant != null ? `; did you mean '${meant}'?` : ''} ` +
              `Known: ${known.join(', ')}`);
    }
  }
  return source as Partial<Record<MultiHeadAttentionWeightName, tf.Tensor>>;
}

const LOADER = 'loadMultiHeadAttentionWeights';

function expectShape(t: tf.Tensor|undefined, name: string, shape: number[]): tf.Tensor {
  const expected = `a float32 tf.Tensor of shape [${shape.join(', ')}]`;
  if (t == null) {
    throw new FlashAttentionError(
        LOADER, name, expected, 'nothing', `${LOADER}: ${name} is missing`);
  }
  if (!(t instanceof tf.Tensor) || t.isDisposed) {
    throw new FlashAttentionError(
        LOADER, name, expected, t instanceof tf.Tensor ? 'a disposed tensor' : typeof t);
  }
  if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
    throw new FlashAttentionError(
        LOADER, name, expected, `[${t.shape.join(', ')}]`,
        `${LOADER}: ${name} must have shape [${shape.join(', ')}] for this FlashMHA, got [${
            t.shape.join(', ')}]`);
  }
  if (t.dtype !== 'float32') {
    throw new FlashAttentionError(LOADER, name, expected, `dtype ${t.dtype}`);
  }
  return t;
}

/**
 * Copies a MultiHeadAttention's weights into `target` (built here if it is
 * not). The two then compute the same function: FlashMHA(x) equals
 * MultiHeadAttention(x, x) (with `useCausalMask` when `causal`), and with
 * crossAttention FlashMHA([x, y]) equals MultiHeadAttention(x, y).
 * Requirements: numHeadsKV == numHeads (MultiHeadAttention has no GQA),
 * keyDim == valueDim == headDim, the output width == embedDim, no
 * rotary/ALiBi/softcap/window/softmaxScale (MultiHeadAttention has none;
 * they are the caller's choice to keep). A missing bias loads as zeros; a
 * bias the target has no place for is an error.
 */
export function loadMultiHeadAttentionWeights(
    target: FlashMHA, source: MultiHeadAttentionWeightsSource): void {
  const w = byName(source);
  const {embedDim: e, numHeads: h, headDim: d} = target;
  if (target.numHeadsKV !== h) {
    throw new FlashAttentionError(
        LOADER, 'target', `a FlashMHA with numHeadsKV == numHeads (${h})`,
        `numHeadsKV = ${target.numHeadsKV}`);
  }
  const kvDim = w['key/kernel']?.shape[0] ?? e;
  const query = expectShape(w['query/kernel'], 'query/kernel', [e, h, d]);
  const key = expectShape(w['key/kernel'], 'key/kernel', [kvDim, h, d]);
  const value = expectShape(w['value/kernel'], 'value/kernel', [kvDim, h, d]);
  const out = expectShape(w['attention_output/kernel'], 'attention_output/kernel', [h, d, e]);
  if (!target.crossAttention && kvDim !== e) {
    throw new FlashAttentionError(
        LOADER, 'key/kernel', `input width embedDim = ${e} (else use crossAttention)`,
        String(kvDim),
        `${LOADER}: key/kernel's input width ${kvDim} differs from embedDim ${
            e}: use a FlashMHA with crossAttention`);
  }
  const hasQKVBias = ['query/bias', 'key/bias', 'value/bias'].some(
      n => w[n as MultiHeadAttentionWeightName] != null);
  if (hasQKVBias && !target.qkvProjBias) {
    throw new FlashAttentionError(
        LOADER, 'target', 'a FlashMHA with qkvProjBias: true', 'qkvProjBias: false',
        `${LOADER}: the source has q/k/v biases but the FlashMHA has qkvProjBias: false`);
  }
  if (w['attention_output/bias'] != null && !target.outProjBias) {
    throw new FlashAttentionError(
        LOADER, 'target', 'a FlashMHA with outProjBias: true', 'outProjBias: false',
        `${LOADER}: the source has an output bias but the FlashMHA has outProjBias: false`);
  }
  // Every bias is checked before anything is built or written: all or
  // nothing.
  for (const name of ['query/bias', 'key/bias', 'value/bias'] as const) {
    if (w[name] != null) {
      expectShape(w[name], name, [h, d]);
    }
  }
  if (w['attention_output/bias'] != null) {
    expectShape(w['attention_output/bias'], 'attention_output/bias', [e]);
  }
  if (!target.built) {
    // Built through apply (on a 1-token input), as tfjs expects of a layer
    // it later disposes.
    tf.tidy(() => {
      const x = tf.zeros([1, 1, e]);
      target.apply(target.crossAttention ? [x, tf.zeros([1, 1, kvDim])] : x);
    });
  }
  const values = tf.tidy(() => {
    const bias = (name: MultiHeadAttentionWeightName) => w[name] == null ?
        tf.zeros([h * d]) :
        tf.reshape(expectShape(w[name], name, [h, d]), [h * d]);
    const flat = (t: tf.Tensor, rows: number) => tf.reshape(t, [rows, h * d]);
    const result: Record<string, tf.Tensor> = {};
    if (target.crossAttention) {
      result['q/kernel'] = flat(query, e);
      result['q/bias'] = bias('query/bias');
      result['kv/kernel'] = tf.concat([flat(key, kvDim), flat(value, kvDim)], 1);
      result['kv/bias'] = tf.concat([bias('key/bias'), bias('value/bias')]);
    } else {
      result['qkv/kernel'] = tf.concat([flat(query, e), flat(key, e), flat(value, e)], 1);
      result['qkv/bias'] = tf.concat([bias('query/bias'), bias('key/bias'), bias('value/bias')]);
    }
    result['out/kernel'] = tf.reshape(out, [h * d, e]);
    result['out/bias'] = w['attention_output/bias'] == null ?
        tf.zeros([e]) :
        tf.clone(expectShape(w['attention_output/bias'], 'attention_output/bias', [e]));
    return result;
  });
  try {
    for (const variable of target.weights) {
      const name = variable.originalName.split('/').slice(-2).join('/');
      if (values[name] != null) {
        variable.write(values[name]);
      }
    }
  } finally {
    tf.dispose(Object.values(values));
  }
}
