/**
 * The gradient of FlashAttention: the backend's fused FlashAttentionGrad
 * kernel when it has one, else the composed reference backward. Either
 * way it is the FlashAttention backward from saved q, k, v, out and lse,
 * so a fused forward and the reference backward work together.
 */
import * as tf from '@tensorflow/tfjs-core';

import {checkQKV} from '../src/checks';
import {useFusedKernel} from '../src/dispatch';
import {getReferenceBlockElements} from '../src/flags';
import {FlashAttention, FlashAttentionAttrs, FlashAttentionGrad} from '../src/kernel_names';
import {referenceBackward, ReferenceBackwardInputs} from '../src/reference/backward';
import {markZeroLseGradient} from '../src/zero_gradients';

/** Lazy gradient of each input, as tfjs's tape expects. */
export type NamedGradientMap = Record<string, () => tf.Tensor>;

/** The reference backward's inputs, and the kernel-only ones. */
export interface FlashAttentionGradTensors extends Omit<ReferenceBackwardInputs, 'alibiSlopes'> {
  /** Shape `[0]` when ALiBi is off (kernels always get this input). */
  alibiSlopes: tf.Tensor;
  /** `[B, 2]` int32 per-batch lengths, or shape `[0]` (kernel_names.ts). */
  seqlens: tf.Tensor;
  /** Packed varlen calls' `[B + 1]` cuSeqlensK, or shape `[0]`. */
  cuSeqlensK: tf.Tensor;
}

/** `[dq, dk, dv]` by the fused kernel or the reference. */
export function flashAttentionBackward(
    inputs: FlashAttentionGradTensors,
    attrs: FlashAttentionAttrs): [tf.Tensor4D, tf.Tensor4D, tf.Tensor4D] {
  const shapes =
      checkQKV(inputs.q.shape, inputs.k.shape, inputs.v.shape, 'flashAttention gradient');
  if (useFusedKernel(FlashAttentionGrad, shapes, attrs)) {
    return tf.engine().runKernel(
               FlashAttentionGrad, inputs as unknown as tf.NamedTensorMap,
               attrs as unknown as tf.NamedAttrMap) as [tf.Tensor4D, tf.Tensor4D, tf.Tensor4D];
  }
  const alibiSlopes = inputs.alibiSlopes.size === 0 ? null : inputs.alibiSlopes;
  const seqlens = inputs.seqlens.size === 0 ? null : inputs.seqlens;
  return referenceBackward(
      {...inputs, alibiSlopes}, {...shapes, seqlens}, attrs, getReferenceBlockElements());
}

/**
 * The gradient map of the op's inputs from the upstream gradients of out
 * and lse and the forward's tensors: dq, dk, dv from the backward, zeros
 * for the rest (never on a path to a float input the caller gave).
 */
function gradientMap(
    [dy, dLse]: tf.Tensor[], [q, k, v, out, softmaxLse]: tf.Tensor[],
    [alibiSlopes, seqlens, cuSeqlensK]: tf.Tensor[], attrs: tf.NamedAttrMap): NamedGradientMap {
  const [dq, dk, dv] = flashAttentionBackward(
      {
        dy: dy as tf.Tensor4D,
        dLse: dLse as tf.Tensor3D,
        q: q as tf.Tensor4D,
        k: k as tf.Tensor4D,
        v: v as tf.Tensor4D,
        out: out as tf.Tensor4D,
        softmaxLse: softmaxLse as tf.Tensor3D,
        alibiSlopes,
        seqlens,
        cuSeqlensK,
      },
      attrs as unknown as FlashAttentionAttrs);
  return {
    q: () => dq,
    k: () => dk,
    v: () => dv,
    // ALiBi slopes are not differentiated (as in flash_attn).
    alibiSlopes: () => tf.zerosLike(alibiSlopes),
    // Lengths are integers: no gradient.
    seqlens: () => tf.zeros(seqlens.shape),
    cuSeqlensK: () => tf.zeros(cuSeqlensK.shape),
  };
}

/**
 * The registered gradient (a direct runKernel of FlashAttention). Tensors
 * saved by the forward pass, in this order: q, k, v, alibiSlopes, seqlens,
 * cuSeqlensK, out, softmaxLse. An unused softmaxLse gets the tape's zeros,
 * made in host memory: the webgpu backward recognizes them and never
 * uploads them.
 */
export function flashAttentionGradFunc(
    dys: tf.Tensor|tf.Tensor[], saved: tf.Tensor[], attrs: tf.NamedAttrMap): NamedGradientMap {
  const [q, k, v, alibiSlopes, seqlens, cuSeqlensK, out, softmaxLse] = saved;
  return gradientMap(
      dys as tf.Tensor[], [q, k, v, out, softmaxLse], [alibiSlopes, seqlens, cuSeqlensK], attrs);
}

/** The op's inputs (ops.ts runFlashAttention). */
export interface FlashAttentionOpInputs {
  q: tf.Tensor4D;
  k: tf.Tensor4D;
  v: tf.Tensor4D;
  alibiSlopes: tf.Tensor;
  seqlens: tf.Tensor;
  cuSeqlensK: tf.Tensor;
}

/**
 * The op's own gradient (ops.ts runs the forward with it): `toSave` lists
 * the tensors to save, q, k, v, out, lse and only the ALiBi slopes and
 * lengths that are not empty (tfjs's tape copies each saved tensor on
 * every call); `backward` makes the empty ones again. With `lseReturned`
 * false the op disposed its lse output unused, so the tape's dLse is its
 * zeros: marked as such (markZeroLseGradient), kernels need not read it.
 */
export function opGradient(
    inputs: FlashAttentionOpInputs, lseReturned: boolean, attrs: tf.NamedAttrMap): {
  toSave: (out: tf.Tensor, lse: tf.Tensor) => tf.Tensor[],
  backward: (dys: tf.Tensor|tf.Tensor[], saved: tf.Tensor[]) => NamedGradientMap
} {
  const hasAlibi = inputs.alibiSlopes.size > 0;
  const hasSeqlens = inputs.seqlens.size > 0;
  const hasCuSeqlensK = inputs.cuSeqlensK.size > 0;
  return {
    toSave: (out, lse) => {
      const saved = [inputs.q, inputs.k, inputs.v, out, lse];
      if (hasAlibi) {
        saved.push(inputs.alibiSlopes);
      }
      if (hasSeqlens) {
        saved.push(inputs.seqlens);
      }
      if (hasCuSeqlensK) {
        saved.push(inputs.cuSeqlensK);
      }
      return saved;
    },
    backward: (dys, saved) => {
      const [dy, dLse] = dys as tf.Tensor[];
      if (!lseReturned) {
        markZeroLseGradient(dLse);
      }
      const [q, k, v, out, lse, ...rest] = saved;
      // One empty tensor for each absent input, as the op gives them.
      const empty = hasAlibi && hasSeqlens && hasCuSeqlensK ? undefined : tf.zeros([0]);
      const alibiSlopes = hasAlibi ? rest.shift()! : empty!;
      const seqlens = hasSeqlens ? rest.shift()! : empty!;
      const cuSeqlensK = hasCuSeqlensK ? rest.shift()! : empty!;
      return gradientMap(
          [dy, dLse], [q, k, v, out, lse], [alibiSlopes, seqlens, cuSeqlensK], attrs);
    },
  };
}

export const flashAttentionGradConfig: tf.GradConfig = {
  kernelName: FlashAttention,
  inputsToSave: ['q', 'k', 'v', 'alibiSlopes', 'seqlens', 'cuSeqlensK'],
  outputsToSave: [true, true],
  gradFunc: flashAttentionGradFunc,
};
