/**
 * FlashAttention and FlashAttentionGrad for the `tensorflow` backend
 * (tfjs-node-gpu): each runs the CUDA custom op of the library loaded by
 * register.ts, by name, through the backend's `executeMultipleOutputs`
 * (TensorFlow eager), so no `[Sq, Sk]` tensor is ever built.
 */
import * as tf from '@tensorflow/tfjs-core';
import {FlashAttention, FlashAttentionAttrs, FlashAttentionGrad} from 'tfjs-flash-attention';

/** The op names in the custom-op library (flash_attention_op.cc). */
export const TF_FORWARD_OP = 'TfjsFlashAttention';
export const TF_BACKWARD_OP = 'TfjsFlashAttentionGrad';

/** One attribute of a TensorFlow eager op, as tfjs-node's binding takes it. */
export interface TFEOpAttr {
  name: string;
  type: number;
  value: number|boolean|string|number[];
}

/** What the kernels use of tfjs-node's NodeJSKernelBackend. */
export interface TensorflowBackendLike {
  binding: {TF_ATTR_INT: number, TF_ATTR_FLOAT: number};
  executeMultipleOutputs(
      name: string, opAttrs: TFEOpAttr[], inputs: tf.TensorInfo[], numOutputs: number): tf.Tensor[];
  /** True in @tensorflow/tfjs-node-gpu, false in the CPU package. */
  isGPUPackage?: boolean;
}

/** The normalized attributes as the custom ops' attrs (same for both). */
export function tensorflowOpAttrs(
    backend: TensorflowBackendLike, attrs: FlashAttentionAttrs): TFEOpAttr[] {
  const {TF_ATTR_FLOAT: float, TF_ATTR_INT: int} = backend.binding;
  return [
    {name: 'softmax_scale', type: float, value: attrs.softmaxScale},
    {name: 'window_left', type: int, value: attrs.windowLeft},
    {name: 'window_right', type: int, value: attrs.windowRight},
    {name: 'softcap', type: float, value: attrs.softcap},
    {name: 'dropout_rate', type: float, value: attrs.dropoutRate},
    {name: 'seed_lo', type: int, value: attrs.seedLo},
    {name: 'seed_hi', type: int, value: attrs.seedHi},
  ];
}

function input(inputs: tf.NamedTensorInfoMap, name: string, kernel: string): tf.TensorInfo {
  const t = inputs[name];
  tf.util.assert(
      t != null, () => `${kernel} on the tensorflow backend: input '${name}' is missing`);
  return t!;
}

export const flashAttentionTensorflowConfig: tf.KernelConfig = {
  kernelName: FlashAttention,
  backendName: 'tensorflow',
  kernelFunc: ({inputs, attrs, backend}) => {
    const b = backend as unknown as TensorflowBackendLike;
    const names = ['q', 'k', 'v', 'alibiSlopes'];
    return b.executeMultipleOutputs(
        TF_FORWARD_OP, tensorflowOpAttrs(b, attrs as unknown as FlashAttentionAttrs),
        names.map(n => input(inputs, n, FlashAttention)), 2);
  },
};

export const flashAttentionGradTensorflowConfig: tf.KernelConfig = {
  kernelName: FlashAttentionGrad,
  backendName: 'tensorflow',
  kernelFunc: ({inputs, attrs, backend}) => {
    const b = backend as unknown as TensorflowBackendLike;
    const names = ['dy', 'dLse', 'q', 'k', 'v', 'out', 'softmaxLse', 'alibiSlopes'];
    return b.executeMultipleOutputs(
        TF_BACKWARD_OP, tensorflowOpAttrs(b, attrs as unknown as FlashAttentionAttrs),
        names.map(n => input(inputs, n, FlashAttentionGrad)), 3);
  },
};
