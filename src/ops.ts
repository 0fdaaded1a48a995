/**
 * The public ops: flashAttention and its packed variants (flash_attn 2.x's
 * flash_attn_func, flash_attn_qkvpacked_func, flash_attn_kvpacked_func).
 */
import * as tf from '@tensorflow/tfjs-core';

import {NamedGradientMap, opGradient} from '../gradients/flash_attention_grad';

import {AttentionShapes, checkAlibi, checkKVPacked, checkQKV, checkQKVPacked, checkTensor} from './checks';
import {useFusedKernel} from './dispatch';
import {getReferenceBlockElements} from './flags';
import {FlashAttention, FlashAttentionAttrs} from './kernel_names';
import {FlashAttentionOptions, normalizeOptions, parseAttentionOptions} from './options';
import {referenceForward} from './reference/forward';
import {checkLengths, keyPaddingMaskLengths, LENGTH_OPTION_SPECS, seqlensInput} from './seqlens';

/** `out`, or `[out, softmaxLse]` with `returnSoftmaxLse: true`. */
export type FlashAttentionResult = tf.Tensor4D|[tf.Tensor4D, tf.Tensor3D];

/** The private engine methods that run a forward with its own backward. */
interface KernelFuncRunner {
  runKernelFunc(params: {
    forwardFunc: (backend: tf.KernelBackend, save: (t: tf.Tensor[]) => void) => tf.Tensor[],
    backwardsFunc: (dys: tf.Tensor|tf.Tensor[], saved: tf.Tensor[]) => NamedGradientMap,
    inputs: tf.NamedTensorMap,
    attrs: tf.NamedAttrMap,
  }): tf.Tensor[];
  /** Is a gradient being recorded (and this not inside another kernel)? */
  isTapeOn(): boolean;
}

/**
 * Runs FlashAttention (fused or reference) and returns `[out, lse]`.
 * `lseReturned` false: the caller disposes lse unused, so its gradient is
 * tfjs's zeros (opGradient marks them so that kernels need not read them).
 */
export function runFlashAttention(
    q: tf.Tensor4D, k: tf.Tensor4D, v: tf.Tensor4D, alibiSlopes: tf.Tensor|undefined,
    shapes: AttentionShapes, attrs: FlashAttentionAttrs, seqlensArg?: tf.Tensor,
    cuSeqlensKArg?: tf.Tensor, lseReturned = true): [tf.Tensor4D, tf.Tensor3D] {
  // Kernels always receive alibiSlopes, seqlens and cuSeqlensK; shape [0]
  // means "no ALiBi" / "whole sequences" / "not packed" (one empty tensor
  // serves each absent one: kernels read only its size).
  const empty = alibiSlopes == null || seqlensArg == null || cuSeqlensKArg == null ? tf.zeros([0]) :
                                                                                     undefined;
  const slopes = alibiSlopes ?? empty!;
  const seqlens: tf.Tensor = seqlensArg ?? empty!;
  const cuSeqlensK: tf.Tensor = cuSeqlensKArg ?? empty!;
  const inputs = {q, k, v, alibiSlopes: slopes, seqlens, cuSeqlensK};
  const kernelAttrs = attrs as unknown as tf.NamedAttrMap;
  const fused = useFusedKernel(FlashAttention, shapes, attrs);
  const engine = tf.engine() as unknown as KernelFuncRunner;
  const forward = (): [tf.Tensor4D, tf.Tensor3D] => fused ?
      tf.engine().runKernel(
          FlashAttention, inputs as unknown as tf.NamedTensorMap,
          kernelAttrs) as [tf.Tensor4D, tf.Tensor3D] :
      referenceForward(
          q, k, v, alibiSlopes ?? null, {...shapes, seqlens: seqlens.size === 0 ? null : seqlens},
          attrs, getReferenceBlockElements());
  if (fused && !engine.isTapeOn()) {
    return forward();  // no gradient recorded: the kernel alone
  }
  // The op's own gradient (the registered one saves every input, and the
  // tape copies each saved tensor on every call): opGradient saves only
  // what the backward reads.
  const gradient = opGradient(inputs, lseReturned, kernelAttrs);
  return engine.runKernelFunc({
    forwardFunc: (_backend, save) => {
      const [out, lse] = forward();
      save(gradient.toSave(out, lse));
      return [out, lse];
    },
    backwardsFunc: gradient.backward,
    inputs,
    attrs: kernelAttrs,
  }) as [tf.Tensor4D, tf.Tensor3D];
}

/** Checks the shapes and options, then unpacks (if packed) and runs. */
function attention(
    opName: string, shapes: AttentionShapes, opts: FlashAttentionOptions|null|undefined,
    unpack: () => [tf.Tensor4D, tf.Tensor4D, tf.Tensor4D]): FlashAttentionResult {
  // Options first: an unknown key or a non-object opts is named before its
  // values are used.
  const {seqlensQ: q0, seqlensK: k0, keyPaddingMask: m0, ...attentionOpts} =
      parseAttentionOptions<FlashAttentionOptions>(opts, opName, LENGTH_OPTION_SPECS);
  const attrs = normalizeOptions(attentionOpts, shapes.headDim, opName, shapes.seqK, shapes.seqQ);
  const alibiSlopes = checkAlibi(opts?.alibiSlopes, shapes, opName);
  const {seqlensQ, seqlensK} =
      lengthOptions({seqlensQ: q0, seqlensK: k0, keyPaddingMask: m0}, shapes, opName);
  const hasSeqlens = seqlensQ != null || seqlensK != null;
  // A key padding mask hides keys without moving the diagonal.
  const diagonal = m0 != null ? {paddedDiagonal: true} : {};
  const [q, k, v] = unpack();
  const returnLse = opts?.returnSoftmaxLse === true;
  const [out, lse] = runFlashAttention(
      q, k, v, alibiSlopes, shapes, {...attrs, hasSeqlens, ...diagonal},
      hasSeqlens ? seqlensInput(shapes, seqlensQ, seqlensK) : undefined, undefined, returnLse);
  if (returnLse) {
    return [out, lse];
  }
  lse.dispose();
  return out;
}

/** seqlensQ, seqlensK and keyPaddingMask, checked (docs/varlen.md). */
function lengthOptions(opts: FlashAttentionOptions, shapes: AttentionShapes, opName: string):
    {seqlensQ?: tf.Tensor1D, seqlensK?: tf.Tensor1D} {
  const seqlensQ = opts.seqlensQ == null ?
      undefined :
      checkLengths(opts.seqlensQ, 'seqlensQ', shapes.batch, opName);
  let seqlensK = opts.seqlensK == null ?
      undefined :
      checkLengths(opts.seqlensK, 'seqlensK', shapes.batch, opName);
  if (opts.keyPaddingMask != null) {
    if (seqlensK != null) {
      throw new Error(`${opName}: give seqlensK or keyPaddingMask, not both`);
    }
    seqlensK = keyPaddingMaskLengths(opts.keyPaddingMask, shapes, opName);
  }
  return {seqlensQ, seqlensK};
}

/**
 * Scaled dot-product attention, computed without materialising the
 * attention matrix where a fused kernel exists (flash_attn_func).
 *
 * @param q `[B, Sq, H, D]` float32
 * @param k `[B, Sk, Hk, D]` float32, `H % Hk == 0` (MQA/GQA)
 * @param v `[B, Sk, Hk, Dv]` float32
 * @returns `[B, Sq, H, Dv]`, or `[out, softmaxLse [B, H, Sq]]` with
 *     `returnSoftmaxLse`.
 */
function flashAttention_(
    q: tf.Tensor4D, k: tf.Tensor4D, v: tf.Tensor4D,
    opts: FlashAttentionOptions = {}): FlashAttentionResult {
  const opName = 'flashAttention';
  checkTensor(q, 'q', opName, 4, '[B, Sq, H, D]');
  checkTensor(k, 'k', opName, 4, '[B, Sk, Hk, D]');
  checkTensor(v, 'v', opName, 4, '[B, Sk, Hk, Dv]');
  const shapes = checkQKV(q.shape, k.shape, v.shape, opName);
  return attention(opName, shapes, opts, () => [q, k, v]);
}

/**
 * Self-attention on packed q, k, v (flash_attn_qkvpacked_func).
 *
 * @param qkv `[B, S, 3, H, D]` float32
 */
function flashAttentionQKVPacked_(
    qkv: tf.Tensor5D, opts: FlashAttentionOptions = {}): FlashAttentionResult {
  const opName = 'flashAttentionQKVPacked';
  checkQKVPacked(qkv, opName);
  const [batch, seq, , heads, headDim] = qkv.shape;
  const shape = [batch, seq, heads, headDim];
  const shapes = checkQKV(
      shape, shape, shape, opName, {q: 'qkv[:, :, 0]', k: 'qkv[:, :, 1]', v: 'qkv[:, :, 2]'});
  return attention(
      opName, shapes, opts, () => tf.unstack(qkv, 2) as [tf.Tensor4D, tf.Tensor4D, tf.Tensor4D]);
}

/**
 * Attention with packed keys and values (flash_attn_kvpacked_func).
 *
 * @param q `[B, Sq, H, D]` float32
 * @param kv `[B, Sk, 2, Hk, D]` float32
 */
function flashAttentionKVPacked_(
    q: tf.Tensor4D, kv: tf.Tensor5D, opts: FlashAttentionOptions = {}): FlashAttentionResult {
  const opName = 'flashAttentionKVPacked';
  checkTensor(q, 'q', opName, 4, '[B, Sq, H, D]');
  checkKVPacked(kv, opName);
  const [batch, seqK, , headsKV, headDim] = kv.shape;
  const kvShape = [batch, seqK, headsKV, headDim];
  const shapes =
      checkQKV(q.shape, kvShape, kvShape, opName, {q: 'q', k: 'kv[:, :, 0]', v: 'kv[:, :, 1]'});
  return attention(opName, shapes, opts, () => {
    const [k, v] = tf.unstack(kv, 2) as tf.Tensor4D[];
    return [q, k, v];
  });
}

type WithLse = FlashAttentionOptions&{returnSoftmaxLse: true};
type WithoutLse = FlashAttentionOptions&{returnSoftmaxLse?: false};

export interface FlashAttentionOp {
  (q: tf.Tensor4D, k: tf.Tensor4D, v: tf.Tensor4D, opts: WithLse): [tf.Tensor4D, tf.Tensor3D];
  (q: tf.Tensor4D, k: tf.Tensor4D, v: tf.Tensor4D, opts?: WithoutLse): tf.Tensor4D;
  (q: tf.Tensor4D, k: tf.Tensor4D, v: tf.Tensor4D,
   opts?: FlashAttentionOptions): FlashAttentionResult;
}
export interface FlashAttentionQKVPackedOp {
  (qkv: tf.Tensor5D, opts: WithLse): [tf.Tensor4D, tf.Tensor3D];
  (qkv: tf.Tensor5D, opts?: WithoutLse): tf.Tensor4D;
  (qkv: tf.Tensor5D, opts?: FlashAttentionOptions): FlashAttentionResult;
}
export interface FlashAttentionKVPackedOp {
  (q: tf.Tensor4D, kv: tf.Tensor5D, opts: WithLse): [tf.Tensor4D, tf.Tensor3D];
  (q: tf.Tensor4D, kv: tf.Tensor5D, opts?: WithoutLse): tf.Tensor4D;
  (q: tf.Tensor4D, kv: tf.Tensor5D, opts?: FlashAttentionOptions): FlashAttentionResult;
}

export const flashAttention = tf.op({flashAttention_}) as FlashAttentionOp;
export const flashAttentionQKVPacked =
    tf.op({flashAttentionQKVPacked_}) as FlashAttentionQKVPackedOp;
export const flashAttentionKVPacked = tf.op({flashAttentionKVPacked_}) as FlashAttentionKVPackedOp;
