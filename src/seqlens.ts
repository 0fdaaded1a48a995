/**
 * Per-batch sequence lengths of the padded op (docs/varlen.md): the
 * `seqlensQ`/`seqlensK` options and the boolean key padding mask, checked
 * and turned into the `[B, 2]` int32 `seqlens` input of the kernels.
 */
import * as tf from '@tensorflow/tfjs-core';

import type {AttentionShapes} from './checks';
import type {OptionSpec} from './options';

/**
 * The padded ops' length options (flashAttention and its packed variants
 * only: the varlen and KV-cache ops take lengths their own way).
 */
export const LENGTH_OPTION_SPECS: readonly OptionSpec[] = [
  {
    name: 'seqlensQ',
    expected: 'a tf.Tensor of shape [B] and dtype int32',
    valid: v => v instanceof tf.Tensor,
    aliases: ['seqlens_q', 'query_lengths', 'seqlen_q'],
  },
  {
    name: 'seqlensK',
    expected: 'a tf.Tensor of shape [B] and dtype int32',
    valid: v => v instanceof tf.Tensor,
    aliases: ['seqlens_k', 'key_lengths', 'seqlen_k'],
  },
  {
    name: 'keyPaddingMask',
    expected: 'a tf.Tensor of shape [B, Sk] and dtype bool',
    valid: v => v instanceof tf.Tensor,
    aliases: ['key_padding_mask', 'padding_mask', 'attention_mask', 'attentionMask', 'mask'],
  },
];

function shapeString(shape: readonly number[]): string {
  return `[${shape.join(', ')}]`;
}

/** A `[B]` int32 lengths option (seqlensQ or seqlensK). */
export function checkLengths(
    value: unknown, argName: string, batch: number, opName: string): tf.Tensor1D {
  if (!(value instanceof tf.Tensor)) {
    throw new Error(`${opName}: ${argName} must be a tf.Tensor of shape [${
        batch}] ([B]) and dtype int32, got ${value === null ? 'null' : typeof value}`);
  }
  if (value.isDisposed) {
    throw new Error(`${opName}: ${argName} has been disposed`);
  }
  if (value.rank !== 1 || value.shape[0] !== batch) {
    throw new Error(
        `${opName}: ${argName} must have shape [${batch}] ([B]), got ${shapeString(value.shape)}`);
  }
  if (value.dtype !== 'int32') {
    throw new Error(`${opName}: ${argName} must have dtype int32, got ${value.dtype}`);
  }
  return value as tf.Tensor1D;
}

/** Backends whose tensors live in host memory. */
const HOST_BACKENDS = new Set(['cpu', 'wasm']);

/**
 * Whether `t`'s values can be read without waiting on a GPU: on a host
 * backend, or where the GPU backend still holds them in host memory
 * (tfjs-backend-webgpu keeps the values of a tensor made from an array,
 * and of small ops it ran on the CPU, until they are uploaded).
 */
export function valuesOnHost(t: tf.Tensor): boolean {
  if (HOST_BACKENDS.has(tf.getBackend())) {
    return true;
  }
  const backend = tf.backend() as unknown as
      {tensorMap?: {get ? (dataId: object) : {values?: unknown} | undefined}};
  return backend.tensorMap?.get?.(t.dataId)?.values != null;
}

/**
 * The lengths of a key padding mask `[B, Sk]` (true/nonzero = a real key);
 * null when some row is not real keys followed by padding (then it is not
 * a padding mask). Only where the values are in host memory
 * (valuesOnHost); a mask that lives on the GPU is not read back (that
 * would stall on the GPU): 'unchecked', and it is taken as a padding mask
 * whose lengths are each row's leading trues, computed on the device
 * (docs/varlen.md). A read is remembered per tensor, so the layers of one
 * model share it.
 */
const maskLengthsCache = new WeakMap<tf.Tensor, Int32Array|null>();
export function paddingMaskLengths(mask: tf.Tensor): Int32Array|null|'unchecked' {
  const cached = maskLengthsCache.get(mask);
  if (cached !== undefined) {
    return cached;
  }
  if (!valuesOnHost(mask)) {
    return 'unchecked';
  }
  const [batch, seq] = [mask.shape[0], mask.shape[mask.rank - 1]];
  const values = mask.dataSync() as ArrayLike<number>;
  let lengths: Int32Array|null = new Int32Array(batch);
  for (let b = 0; b < batch && lengths != null; b++) {
    let len = 0;
    while (len < seq && values[b * seq + len] !== 0) {
      len++;
    }
    for (let j = len; j < seq; j++) {
      if (values[b * seq + j] !== 0) {
        lengths = null;
        break;
      }
    }
    if (lengths != null) {
      lengths[b] = len;
    }
  }
  maskLengthsCache.set(mask, lengths);
  return lengths;
}

/**
 * `[B]` int32 on the device: each row's count of leading true values (the
 * length, for a padding mask), with no read back.
 */
export function leadingTrueCount(mask: tf.Tensor): tf.Tensor1D {
  return tf.tidy(() => {
    const seq = mask.shape[mask.rank - 1];
    const flat = tf.reshape(mask, [mask.shape[0], seq]);
    const index = tf.reshape(tf.range(0, seq, 1, 'int32'), [1, seq]);
    const firstFalse = tf.where(
        tf.cast(flat, 'bool'), tf.fill(flat.shape, seq, 'int32'),
        tf.broadcastTo(index, flat.shape));
    return tf.min(firstFalse, 1) as tf.Tensor1D;
  });
}

/** keyPaddingMask: `[B, Sk]` bool, each row real keys then padding. */
export function keyPaddingMaskLengths(
    mask: unknown, shapes: AttentionShapes, opName: string): tf.Tensor1D {
  const {batch, seqK} = shapes;
  if (!(mask instanceof tf.Tensor)) {
    throw new Error(`${opName}: keyPaddingMask must be a tf.Tensor of shape [${batch}, ${
        seqK}] ([B, Sk]) and dtype bool, got ${mask === null ? 'null' : typeof mask}`);
  }
  if (mask.rank !== 2 || mask.shape[0] !== batch || mask.shape[1] !== seqK) {
    throw new Error(`${opName}: keyPaddingMask must have shape [${batch}, ${seqK}] ([B, Sk]), got ${
        shapeString(mask.shape)}`);
  }
  if (mask.dtype !== 'bool') {
    throw new Error(`${opName}: keyPaddingMask must have dtype bool, got ${mask.dtype}`);
  }
  const lengths = paddingMaskLengths(mask);
  if (lengths === 'unchecked') {
    return leadingTrueCount(mask);
  }
  if (lengths == null) {
    throw new Error(`${
        opName}: keyPaddingMask must be a padding mask (each row: true for the real keys, then false to the end), got a row with true after false; use a general mask through the composed path instead`);
  }
  return tf.tensor1d(lengths, 'int32');
}

/**
 * The kernels' `[B, 2]` int32 (seqlenQ_b, seqlenK_b), each clamped to
 * [0, Sq] and [0, Sk]; absent lengths are the full Sq or Sk.
 */
export function seqlensInput(
    shapes: AttentionShapes, seqlensQ: tf.Tensor1D|undefined,
    seqlensK: tf.Tensor1D|undefined): tf.Tensor2D {
  return tf.tidy(() => {
    const clamp = (x: tf.Tensor1D|undefined, max: number) => x == null ?
        tf.fill([shapes.batch], max, 'int32') :
        tf.minimum(tf.maximum(x, tf.scalar(0, 'int32')), tf.scalar(max, 'int32'));
    return tf.stack([clamp(seqlensQ, shapes.seqQ), clamp(seqlensK, shapes.seqK)], 1) as tf.Tensor2D;
  });
}

/**
 * The per-sequence shapes of a call: for a packed varlen call
 * (FlashAttentionAttrs.packedBatch, tensors `[1, total, H, D]`) B
 * sequences of at most maxSeqlenQ / maxSeqlenK rows, which size the
 * kernels' grids; otherwise `shapes` itself.
 */
export function sequenceShapes(
    shapes: AttentionShapes,
    attrs: {packedBatch?: number, maxSeqlenQ?: number, maxSeqlenK?: number}): AttentionShapes {
  if (!(attrs.packedBatch! > 0)) {
    return shapes;
  }
  return {
    ...shapes,
    batch: attrs.packedBatch!,
    seqQ: attrs.maxSeqlenQ ?? shapes.seqQ,
    seqK: attrs.maxSeqlenK ?? shapes.seqK,
  };
}
