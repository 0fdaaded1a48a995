/**
 * Variable-length attention (flash_attn_varlen_func) and the helpers that
 * go between padded and packed tensors (flash_attn's unpad_input and
 * pad_input). See docs/varlen.md.
 *
 * Where the backend's fused kernels take the packed layout (webgpu),
 * flashAttentionVarlen runs them on the packed tensors directly: each
 * sequence's rows start at its cumulative length, and the kernels skip the
 * tiles past its length, so the attention costs the real tokens only and
 * nothing is copied. Elsewhere (the composed reference, kernels without
 * the packed layout) it runs as pad (a gather) -> the padded op with
 * per-batch lengths -> unpad (a gather), each step differentiable. Either
 * way every index comes from cuSeqlens on the device: no read back, as
 * with flash_attn's maxSeqlen arguments.
 */
import * as tf from '@tensorflow/tfjs-core';

import {AttentionShapes, checkAlibi, checkQKV} from './checks';
import {fusedKernelRefusal} from './dispatch';
import {FlashAttention, FlashAttentionAttrs, FlashAttentionGrad} from './kernel_names';
import {normalizeOptions, parseAttentionOptions} from './options';
import type {FlashAttentionOptions, OptionSpec} from './options';
import {runFlashAttention} from './ops';
import {seqlensInput} from './seqlens';

export interface FlashAttentionVarlenOptions extends
    Omit<FlashAttentionOptions, 'seqlensQ'|'seqlensK'|'keyPaddingMask'|'returnSoftmaxLse'> {
  /** Longest query sequence (flash_attn's max_seqlen_q); required. */
  maxSeqlenQ: number;
  /** Longest key sequence (flash_attn's max_seqlen_k); required. */
  maxSeqlenK: number;
  /** Also return the log-sum-exp, `[H, totalQ]`. */
  returnSoftmaxLse?: boolean;
}

/** `out [totalQ, H, Dv]`, or `[out, softmaxLse [H, totalQ]]`. */
export type FlashAttentionVarlenResult = tf.Tensor3D|[tf.Tensor3D, tf.Tensor2D];

function shapeString(shape: readonly number[]): string {
  return `[${shape.join(', ')}]`;
}

function checkPacked(value: unknown, argName: string, opName: string, layout: string): tf.Tensor3D {
  if (!(value instanceof tf.Tensor)) {
    throw new Error(`${opName}: ${argName} must be a tf.Tensor of shape ${layout}, got ${
        value === null ? 'null' : typeof value}`);
  }
  if (value.isDisposed) {
    throw new Error(`${opName}: ${argName} has been disposed`);
  }
  if (value.rank !== 3) {
    throw new Error(`${opName}: ${argName} must have rank 3 (${layout}), got rank ${
        value.rank} with shape ${shapeString(value.shape)}`);
  }
  if (value.dtype !== 'float32') {
    throw new Error(`${opName}: ${argName} must have dtype float32, got ${value.dtype}`);
  }
  return value as tf.Tensor3D;
}

function checkCuSeqlens(value: unknown, argName: string, opName: string): tf.Tensor1D {
  if (!(value instanceof tf.Tensor)) {
    throw new Error(
        `${opName}: ${argName} must be a tf.Tensor of shape [B + 1] and dtype int32, got ${
            value === null ? 'null' : typeof value}`);
  }
  if (value.isDisposed) {
    throw new Error(`${opName}: ${argName} has been disposed`);
  }
  if (value.rank !== 1 || value.shape[0] < 2) {
    throw new Error(`${opName}: ${argName} must have shape [B + 1] with B >= 1, got ${
        shapeString(value.shape)}`);
  }
  if (value.dtype !== 'int32') {
    throw new Error(`${opName}: ${argName} must have dtype int32, got ${value.dtype}`);
  }
  return value as tf.Tensor1D;
}

/** The varlen op's options beyond flashAttention's (src/options.ts). */
const VARLEN_OPTION_SPECS: readonly OptionSpec[] = [
  {
    name: 'maxSeqlenQ',
    expected: 'an integer >= 1',
    valid: v => Number.isInteger(v) && (v as number) >= 1,
    aliases: ['max_seqlen_q', 'maxSeqlen']
  },
  {
    name: 'maxSeqlenK',
    expected: 'an integer >= 1',
    valid: v => Number.isInteger(v) && (v as number) >= 1,
    aliases: ['max_seqlen_k']
  },
];

function checkMaxSeqlen(value: unknown, argName: string, opName: string): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) {
    throw new Error(`${opName}: ${argName} must be an integer >= 1, got ${String(value)}`);
  }
  return value;
}

type TwoInputGrad = (a: tf.Tensor, b: tf.Tensor, save: tf.GradSaveFunc) => {
  value: tf.Tensor, gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => tf.Tensor[]
};

/** tf.customGrad of a function of two tensors (its typing wants varargs). */
function customGrad2(f: TwoInputGrad): (a: tf.Tensor, b: tf.Tensor) => tf.Tensor {
  return tf.customGrad(f as unknown as Parameters<typeof tf.customGrad>[0]) as
      unknown as (a: tf.Tensor, b: tf.Tensor) => tf.Tensor;
}

/**
 * How packed rows `[T, ...]` map to the padded layout `[B, S, ...]`, both
 * ways, as gather indices into a source whose row 0 is a zero row (so a
 * padded position without a token, or a token cut by S or past cu[B],
 * reads zeros). Built once per call on the device from cuSeqlens and kept
 * for the backward, so each pad or unpad, forward or backward, is one
 * concat and one gather.
 */
interface PackedLayout {
  /** `[B * S]` int32: 1 + the packed row of padded position (b, s), or 0. */
  padIndex: tf.Tensor1D;
  /** `[T]` int32: 1 + the padded position b * S + s of packed row t, or 0. */
  packIndex: tf.Tensor1D;
  /** `[B]` int32: `cu[b + 1] - cu[b]`. */
  lengths: tf.Tensor1D;
  batch: number;
  seqlen: number;
}

function packedLayout(cu: tf.Tensor1D, seqlen: number, total: number): PackedLayout {
  const batch = cu.shape[0] - 1;
  const [padIndex, packIndex, lengths] = tf.tidy(() => {
    const start = tf.reshape(tf.slice(cu, 0, batch), [batch, 1]);
    const length = tf.sub(tf.reshape(tf.slice(cu, 1, batch), [batch, 1]), start);
    // s + 1 for s in [0, S): padded position (b, s) holds a token when
    // s + 1 <= length, the token cu[b] + s, at index cu[b] + s + 1.
    const sPlusOne = tf.reshape(tf.range(1, seqlen + 1, 1, 'int32'), [1, seqlen]);
    const valid = tf.cast(tf.lessEqual(sPlusOne, length), 'int32');
    const pad = tf.reshape(tf.mul(tf.add(start, sPlusOne), valid), [batch * seqlen]);
    // The inverse map: position p + 1 scattered to slot pad[p]. Slot 0
    // collects (sums) the padding positions and is dropped; a slot no
    // position fills stays 0, the zero row.
    const positions = tf.range(1, batch * seqlen + 1, 1, 'int32');
    const slots = tf.scatterND(tf.reshape(pad, [batch * seqlen, 1]), positions, [total + 1]);
    return [
      pad as tf.Tensor1D, tf.slice(slots, 1, total) as tf.Tensor1D,
      tf.reshape(length, [batch]) as tf.Tensor1D
    ];
  });
  return {padIndex, packIndex, lengths, batch, seqlen};
}

/** Rows `index` of `[zeroRow; x]` (first axis): index 0 reads zeros, i > 0 `x[i - 1]`. */
function gatherAfterZeroRow(x: tf.Tensor, zeroRow: tf.Tensor, index: tf.Tensor1D): tf.Tensor {
  return tf.tidy(() => tf.gather(tf.concat([zeroRow, x], 0), index));
}

/** `[1, ...rest]` zero rows, one per trailing shape within a call. */
function zeroRowCache(): (rest: number[]) => tf.Tensor {
  const rows = new Map<string, tf.Tensor>();
  return (rest: number[]) => {
    const key = rest.join(',');
    let row = rows.get(key);
    if (row == null) {
      row = tf.zeros([1, ...rest]);
      rows.set(key, row);
    }
    return row;
  };
}

type OneInputGrad = (x: tf.Tensor, save: tf.GradSaveFunc) => {
  value: tf.Tensor, gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => tf.Tensor
};

/**
 * tf.customGrad of a function of one tensor. The index tensors a pad or
 * unpad needs in its backward are saved, not inputs: the tape keeps them
 * until the backward and then frees them, and no zero gradient is built
 * for them.
 */
function customGrad1(f: OneInputGrad): (x: tf.Tensor) => tf.Tensor {
  return tf.customGrad(f as unknown as Parameters<typeof tf.customGrad>[0]) as
      unknown as (x: tf.Tensor) => tf.Tensor;
}

/** The layout and zero row a pad or unpad saved for its backward. */
function savedLayout(layout: PackedLayout, saved: tf.Tensor[]): [PackedLayout, tf.Tensor] {
  return [
    {...layout, padIndex: saved[0] as tf.Tensor1D, packIndex: saved[1] as tf.Tensor1D},
    saved[2],
  ];
}

/** What a pad or unpad saves: the index maps and the zero row. */
function layoutTensors(layout: PackedLayout, zeroRow: tf.Tensor): tf.Tensor[] {
  return [layout.padIndex, layout.packIndex, zeroRow];
}

/**
 * Packed `[T, ...]` -> padded `[B, S, ...]` (zeros past each length); its
 * gradient packs the incoming gradient.
 */
function paddedFromPacked(packed: tf.Tensor, layout: PackedLayout, zeroRow: tf.Tensor): tf.Tensor {
  const {batch, seqlen} = layout;
  const rest = packed.shape.slice(1);
  const f = customGrad1((x: tf.Tensor, save: tf.GradSaveFunc) => {
    save(layoutTensors(layout, zeroRow));
    const value = tf.tidy(
        () =>
            tf.reshape(gatherAfterZeroRow(x, zeroRow, layout.padIndex), [batch, seqlen, ...rest]));
    return {
      value,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) =>
          packedFromPadded(dy, ...savedLayout(layout, saved)),
    };
  });
  return f(packed);
}

/**
 * Padded `[B, S, ...]` -> packed `[T, ...]`; its gradient pads the
 * incoming gradient (zeros at padding).
 */
function packedFromPadded(padded: tf.Tensor, layout: PackedLayout, zeroRow: tf.Tensor): tf.Tensor {
  const [batch, seqlen, ...rest] = padded.shape;
  const f = customGrad1((x: tf.Tensor, save: tf.GradSaveFunc) => {
    save(layoutTensors(layout, zeroRow));
    const value = tf.tidy(
        () => gatherAfterZeroRow(
            tf.reshape(x, [batch * seqlen, ...rest]), zeroRow, layout.packIndex));
    return {
      value,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) =>
          paddedFromPacked(dy, ...savedLayout(layout, saved)),
    };
  });
  return f(padded);
}

/**
 * Attention over a batch of sequences of different lengths, packed
 * without padding (flash_attn_varlen_func).
 *
 * @param q `[totalQ, H, D]` float32: the query tokens of every sequence,
 *     one after the other
 * @param k `[totalK, Hk, D]` float32
 * @param v `[totalK, Hk, Dv]` float32
 * @param cuSeqlensQ `[B + 1]` int32: sequence b's queries are rows
 *     `cuSeqlensQ[b] .. cuSeqlensQ[b + 1] - 1` (non-decreasing, from 0)
 * @param cuSeqlensK `[B + 1]` int32, the same for keys and values
 * @param opts every option of flashAttention, per sequence (causal is
 *     bottom-right aligned in each sequence; dropout uses the keys
 *     (seed, b, h, row, col) of the padded op, row/col counted inside the
 *     sequence), plus the required maxSeqlenQ/maxSeqlenK (tokens past them
 *     are cut: output 0, no gradient)
 * @returns `[totalQ, H, Dv]`, or `[out, softmaxLse [H, totalQ]]`
 */
function flashAttentionVarlen_(
    q: tf.Tensor3D, k: tf.Tensor3D, v: tf.Tensor3D, cuSeqlensQ: tf.Tensor1D,
    cuSeqlensK: tf.Tensor1D, opts: FlashAttentionVarlenOptions): FlashAttentionVarlenResult {
  const opName = 'flashAttentionVarlen';
  checkPacked(q, 'q', opName, '[totalQ, H, D]');
  checkPacked(k, 'k', opName, '[totalK, Hk, D]');
  checkPacked(v, 'v', opName, '[totalK, Hk, Dv]');
  checkCuSeqlens(cuSeqlensQ, 'cuSeqlensQ', opName);
  checkCuSeqlens(cuSeqlensK, 'cuSeqlensK', opName);
  if (cuSeqlensK.shape[0] !== cuSeqlensQ.shape[0]) {
    throw new Error(`${opName}: cuSeqlensQ and cuSeqlensK must both have shape [B + 1], got ${
        shapeString(cuSeqlensQ.shape)} and ${shapeString(cuSeqlensK.shape)}`);
  }
  if (opts == null || typeof opts !== 'object') {
    throw new Error(
        `${opName}: opts with maxSeqlenQ and maxSeqlenK is required, got ${String(opts)}`);
  }
  parseAttentionOptions(opts, opName, VARLEN_OPTION_SPECS);
  const maxQ = checkMaxSeqlen(opts.maxSeqlenQ, 'maxSeqlenQ', opName);
  const maxK = checkMaxSeqlen(opts.maxSeqlenK, 'maxSeqlenK', opName);
  const batch = cuSeqlensQ.shape[0] - 1;
  const [totalQ, heads, headDim] = q.shape;
  const [, headsKV] = k.shape;
  const headDimV = v.shape[2];
  if (k.shape[0] !== v.shape[0]) {
    throw new Error(`${opName}: k and v must have the same number of tokens, got ${
        k.shape[0]} (k) and ${v.shape[0]} (v)`);
  }
  const shapes = checkQKV(
      [batch, maxQ, heads, headDim], [batch, maxK, headsKV, headDim],
      [batch, maxK, v.shape[1], headDimV], opName);
  const alibiSlopes = checkAlibi(opts.alibiSlopes, shapes, opName);
  const {maxSeqlenQ: _q, maxSeqlenK: _k, ...attentionOpts} = opts;
  const attrs = normalizeOptions(attentionOpts, headDim, opName, maxK);
  const packed = packedAttention(q, k, v, cuSeqlensQ, cuSeqlensK, alibiSlopes, shapes, attrs);
  if (packed != null) {
    return opts.returnSoftmaxLse ? packed : packed[0];
  }

  const layoutQ = packedLayout(cuSeqlensQ, maxQ, totalQ);
  const layoutK = cuSeqlensK === cuSeqlensQ && maxK === maxQ && k.shape[0] === totalQ ?
      layoutQ :
      packedLayout(cuSeqlensK, maxK, k.shape[0]);
  const zeroRow = zeroRowCache();
  const qPad = paddedFromPacked(q, layoutQ, zeroRow(q.shape.slice(1))) as tf.Tensor4D;
  const kPad = paddedFromPacked(k, layoutK, zeroRow(k.shape.slice(1))) as tf.Tensor4D;
  const vPad = paddedFromPacked(v, layoutK, zeroRow(v.shape.slice(1))) as tf.Tensor4D;
  const seqlens = seqlensInput(shapes, layoutQ.lengths, layoutK.lengths);
  const [outPad, lsePad] = runFlashAttention(
      qPad, kPad, vPad, alibiSlopes, shapes, {...attrs, hasSeqlens: true}, seqlens);
  const out = packedFromPadded(outPad, layoutQ, zeroRow(outPad.shape.slice(2))) as tf.Tensor3D;
  if (!opts.returnSoftmaxLse) {
    return out;
  }
  // [B, H, S] -> [B, S, H] -> [T, H] -> [H, T].
  const lseTokens =
      packedFromPadded(tf.transpose(lsePad, [0, 2, 1]), layoutQ, zeroRow([lsePad.shape[1]]));
  return [out, tf.transpose(lseTokens) as tf.Tensor2D];
}

/**
 * The fused kernels on the packed tensors (the packed layout of
 * FlashAttentionAttrs.packedBatch): `[out [totalQ, H, Dv], lse [H,
 * totalQ]]`, or null where the backend's fused forward or backward does
 * not take the call (then the caller pads). The kernels see the tensors as
 * one batch row of totalQ / totalK rows, and the cumulative lengths as
 * they are: the call adds no kernel to the attention's.
 */
function packedAttention(
    q: tf.Tensor3D, k: tf.Tensor3D, v: tf.Tensor3D, cuSeqlensQ: tf.Tensor1D,
    cuSeqlensK: tf.Tensor1D, alibiSlopes: tf.Tensor|undefined, shapes: AttentionShapes,
    attrs: FlashAttentionAttrs): [tf.Tensor3D, tf.Tensor2D]|null {
  const [totalQ, totalK] = [q.shape[0], k.shape[0]];
  if (totalQ === 0 || totalK === 0) {
    return null;  // (no zero-sized bindings; the padded path handles it)
  }
  const packedAttrs: FlashAttentionAttrs = {
    ...attrs,
    hasSeqlens: true,
    packedBatch: shapes.batch,
    maxSeqlenQ: shapes.seqQ,
    maxSeqlenK: shapes.seqK,
  };
  const rowShapes: AttentionShapes = {...shapes, batch: 1, seqQ: totalQ, seqK: totalK};
  if (fusedKernelRefusal(FlashAttention, rowShapes, packedAttrs) != null ||
      fusedKernelRefusal(FlashAttentionGrad, rowShapes, packedAttrs) != null) {
    return null;
  }
  const rows = (x: tf.Tensor3D) => tf.reshape(x, [1, ...x.shape]) as tf.Tensor4D;
  const [out, lse] = runFlashAttention(
      rows(q), rows(k), rows(v), alibiSlopes, rowShapes, packedAttrs, cuSeqlensQ, cuSeqlensK);
  return [
    tf.reshape(out, [totalQ, shapes.heads, shapes.headDimV]),
    tf.reshape(lse, [shapes.heads, totalQ]),
  ];
}

export interface FlashAttentionVarlenOp {
  (q: tf.Tensor3D, k: tf.Tensor3D, v: tf.Tensor3D, cuSeqlensQ: tf.Tensor1D, cuSeqlensK: tf.Tensor1D,
   opts: FlashAttentionVarlenOptions&{returnSoftmaxLse: true}): [tf.Tensor3D, tf.Tensor2D];
  (q: tf.Tensor3D, k: tf.Tensor3D, v: tf.Tensor3D, cuSeqlensQ: tf.Tensor1D, cuSeqlensK: tf.Tensor1D,
   opts: FlashAttentionVarlenOptions&{returnSoftmaxLse?: false}): tf.Tensor3D;
  (q: tf.Tensor3D, k: tf.Tensor3D, v: tf.Tensor3D, cuSeqlensQ: tf.Tensor1D, cuSeqlensK: tf.Tensor1D,
   opts: FlashAttentionVarlenOptions): FlashAttentionVarlenResult;
}

export const flashAttentionVarlen = tf.op({flashAttentionVarlen_}) as FlashAttentionVarlenOp;

/** What unpadInput returns (flash_attn's unpad_input). */
export interface UnpaddedInput {
  /** `[totalTokens, ...]`: the kept rows, batch-major. */
  x: tf.Tensor;
  /** `[totalTokens]` int32: each kept row's flat index `b * S + s`. */
  indices: tf.Tensor1D;
  /** `[B + 1]` int32 cumulative lengths. */
  cuSeqlens: tf.Tensor1D;
  /** The longest sequence (a number: the mask is read back once). */
  maxSeqlen: number;
  /** `[B]` int32 lengths. */
  seqlens: tf.Tensor1D;
}

/** Rows `indices` of `[N, ...]`; the gradient scatters back to N rows. */
function gatherRows(x: tf.Tensor, indices: tf.Tensor1D): tf.Tensor {
  const rows = x.shape[0];
  const f = customGrad2((xs: tf.Tensor, idx: tf.Tensor, save: tf.GradSaveFunc) => {
    save([idx]);
    return {
      value: tf.gather(xs, idx),
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) =>
          [scatterRows(dy, saved[0] as tf.Tensor1D, rows), tf.zeros(saved[0].shape)],
    };
  });
  return f(x, indices);
}

/** `[rows, ...]` zeros with row `indices[t]` = `x[t]`; gradient gathers. */
function scatterRows(x: tf.Tensor, indices: tf.Tensor1D, rows: number): tf.Tensor {
  const f = customGrad2((xs: tf.Tensor, idx: tf.Tensor, save: tf.GradSaveFunc) => {
    save([idx]);
    const value = tf.tidy(
        () => tf.scatterND(tf.reshape(idx, [idx.shape[0], 1]), xs, [rows, ...xs.shape.slice(1)]));
    return {
      value,
      gradFunc:
          (dy: tf.Tensor,
           saved:
               tf.Tensor[]) => [gatherRows(dy, saved[0] as tf.Tensor1D), tf.zeros(saved[0].shape)],
    };
  });
  return f(x, indices);
}

/** Sizes of unpadInput's result that would otherwise be read back. */
export interface UnpadInputOptions {
  /**
   * The number of nonzero mask entries (flash_attn's total_nnz). Given, the
   * mask is not read back: every index is computed on the device. It must
   * be the mask's count: rows past the count are zero with index -1, kept
   * rows past it are dropped.
   */
  totalTokens?: number;
  /**
   * The longest sequence, returned as is; without it (and with
   * totalTokens) maxSeqlen is S, a valid bound for flashAttentionVarlen.
   */
  maxSeqlen?: number;
}

/**
 * Padded `[B, S, ...]` plus a `[B, S]` mask (bool or numeric, nonzero =
 * keep) -> the kept rows packed (flash_attn's unpad_input). Any mask
 * works, not only padding masks. Without `opts.totalTokens` it reads the
 * mask back once (the number of kept rows decides the output's shape);
 * with it, nothing is read back. Differentiable with respect to `x`.
 */
export function unpadInput(
    x: tf.Tensor, attentionMask: tf.Tensor, opts: UnpadInputOptions = {}): UnpaddedInput {
  const opName = 'unpadInput';
  if (!(x instanceof tf.Tensor) || x.rank < 2) {
    throw new Error(`${opName}: x must be a tf.Tensor of shape [B, S, ...], got ${
        x instanceof tf.Tensor ? shapeString(x.shape) : typeof x}`);
  }
  const [batch, seqlen, ...rest] = x.shape;
  if (!(attentionMask instanceof tf.Tensor) || attentionMask.rank !== 2 ||
      attentionMask.shape[0] !== batch || attentionMask.shape[1] !== seqlen) {
    throw new Error(`${opName}: attentionMask must be a tf.Tensor of shape [${batch}, ${
        seqlen}] ([B, S]), got ${
        attentionMask instanceof tf.Tensor ? shapeString(attentionMask.shape) :
                                             typeof attentionMask}`);
  }
  const {totalTokens, maxSeqlen} = opts ?? {};
  for (const [name, n, max] of [
           ['totalTokens', totalTokens, batch * seqlen], ['maxSeqlen', maxSeqlen, seqlen]] as
       Array<[string, number | undefined, number]>) {
    if (n !== undefined && (!Number.isInteger(n) || n < 0 || n > max)) {
      throw new Error(
          `${opName}: opts.${name} must be an integer in [0, ${max}], got ${String(n)}`);
    }
  }
  if (totalTokens !== undefined) {
    return unpadOnDevice(x, attentionMask, totalTokens, maxSeqlen ?? seqlen);
  }
  const values = attentionMask.dataSync();
  const kept: number[] = [];
  const lengths = new Int32Array(batch);
  const cu = new Int32Array(batch + 1);
  for (let b = 0; b < batch; b++) {
    for (let s = 0; s < seqlen; s++) {
      if (values[b * seqlen + s] !== 0) {
        kept.push(b * seqlen + s);
        lengths[b]++;
      }
    }
    cu[b + 1] = cu[b] + lengths[b];
  }
  const indices = tf.tensor1d(kept, 'int32');
  const packed = tf.tidy(() => gatherRows(tf.reshape(x, [batch * seqlen, ...rest]), indices));
  return {
    x: packed,
    indices,
    cuSeqlens: tf.tensor1d(cu, 'int32'),
    maxSeqlen: maxSeqlen ?? Math.max(0, ...lengths),
    seqlens: tf.tensor1d(lengths, 'int32'),
  };
}

/**
 * unpadInput with the row count given: kept row r (in batch-major order)
 * is the one whose exclusive prefix count of kept rows is r, so its slot
 * comes from a cumulative sum and a scatter, all on the device.
 */
function unpadOnDevice(
    x: tf.Tensor, attentionMask: tf.Tensor, total: number, maxSeqlen: number): UnpaddedInput {
  const [batch, seqlen, ...rest] = x.shape;
  const flatRows = batch * seqlen;
  const {indices, seqlens, cuSeqlens} = tf.tidy(() => {
    const keep = tf.cast(tf.notEqual(tf.reshape(attentionMask, [flatRows]), 0), 'int32');
    // float32 sums are exact below 2^24 rows.
    const slot = tf.cast(tf.cumsum(tf.cast(keep, 'float32'), 0, true), 'int32');
    // Dropped rows (and kept rows past `total`) go to a spare slot `total`.
    const target = tf.where(
        tf.logicalAnd(tf.cast(keep, 'bool'), tf.less(slot, tf.scalar(total, 'int32'))), slot,
        tf.fill([flatRows], total, 'int32'));
    // Slots hold flat index + 1, so an unfilled slot reads -1 after the - 1.
    const flatPlusOne = tf.range(1, flatRows + 1, 1, 'int32');
    const slots = tf.scatterND(tf.reshape(target, [flatRows, 1]), flatPlusOne, [total + 1]);
    const indices = tf.sub(tf.slice(slots, 0, total), tf.scalar(1, 'int32')) as tf.Tensor1D;
    const seqlens = tf.sum(tf.reshape(keep, [batch, seqlen]), 1) as tf.Tensor1D;
    const cuSeqlens = tf.concat([
      tf.zeros([1], 'int32'), tf.cast(tf.cumsum(tf.cast(seqlens, 'float32')), 'int32')
    ]) as tf.Tensor1D;
    return {indices, seqlens, cuSeqlens};
  });
  const packed = tf.tidy(() => {
    // Row 0 of the source is a zero row, read by unfilled slots (index -1).
    const source =
        tf.concat([tf.zeros([1, ...rest], x.dtype), tf.reshape(x, [flatRows, ...rest])], 0);
    const shifted = tf.add(indices, tf.scalar(1, 'int32')) as tf.Tensor1D;
    return gatherRows(source, shifted);
  });
  return {x: packed, indices, cuSeqlens, maxSeqlen, seqlens};
}

/**
 * Packed `[totalTokens, ...]` -> padded `[B, S, ...]` with zeros where no
 * token goes (flash_attn's pad_input). Differentiable with respect to `x`.
 */
export function padInput(
    x: tf.Tensor, indices: tf.Tensor1D, batch: number, seqlen: number): tf.Tensor {
  const opName = 'padInput';
  if (!(x instanceof tf.Tensor) || x.rank < 1) {
    throw new Error(
        `${opName}: x must be a tf.Tensor of shape [totalTokens, ...], got ${typeof x}`);
  }
  if (!(indices instanceof tf.Tensor) || indices.rank !== 1 || indices.shape[0] !== x.shape[0] ||
      indices.dtype !== 'int32') {
    throw new Error(`${opName}: indices must be an int32 tf.Tensor of shape [${
        x.shape[0]}] ([totalTokens]), got ${
        indices instanceof tf.Tensor ? `${shapeString(indices.shape)} ${indices.dtype}` :
                                       typeof indices}`);
  }
  for (const [name, n] of [['batch', batch], ['seqlen', seqlen]] as Array<[string, number]>) {
    if (!Number.isInteger(n) || n < 1) {
      throw new Error(`${opName}: ${name} must be an integer >= 1, got ${String(n)}`);
    }
  }
  return tf.tidy(
      () => tf.reshape(
          scatterRows(x, indices, batch * seqlen), [batch, seqlen, ...x.shape.slice(1)]));
}
