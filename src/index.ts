/**
 * tfjs-flash-attention: FlashAttention for TensorFlow.js.
 *
 * Importing this module registers the gradient of the FlashAttention kernel
 * and the fused kernels of the backends this package has kernels for.
 */
import * as tf from '@tensorflow/tfjs-core';

import {flashAttentionGradConfig} from '../gradients/flash_attention_grad';

import {flashAttentionKVCacheGradConfig} from './ops_kv_cache';
import {fusedNormGradConfig, fusedRotaryGradConfig, softmaxCrossEntropyGradConfig} from './train/ops';
// Fused WebGPU kernels (registered for the backend named 'webgpu').
import '../kernels/webgpu/register';

export type{AttentionShapes} from './checks';
export {MAX_HEAD_DIM} from './checks';
export type{FusedSupportCheck} from './dispatch';
export {hasFusedKernel, registerFusedKernel} from './dispatch';
export {dropoutThreshold, philox4x32} from './dropout';
export type{FlashAttentionImpl} from './flags';
export {FLASH_ATTENTION_IMPL, FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS, FLASH_ATTENTION_TENSOR_CORES} from './flags';
export type{FlashAttentionAttrs, FlashAttentionGradInputs, FlashAttentionInputs} from './kernel_names';
export {FlashAttention, FlashAttentionGrad} from './kernel_names';
export type{FlashAttentionOptions} from './options';
export type{OptionSpec} from './options';
export {ATTENTION_OPTION_SPECS, attentionOptionSpec, checkOptions, parseAttentionOptions, suggestOption} from './options';
export {FlashAttentionError} from './errors';
export type{FlashAttentionKVPackedOp, FlashAttentionOp, FlashAttentionQKVPackedOp, FlashAttentionResult} from './ops';
export {flashAttention, flashAttentionKVPacked, flashAttentionQKVPacked} from './ops';
export {version} from './version';
export type{FlashAttentionVarlenOp, FlashAttentionVarlenOptions, FlashAttentionVarlenResult, UnpaddedInput} from './varlen';
export {flashAttentionVarlen, padInput, unpadInput} from './varlen';
export type{UnpadInputOptions} from './varlen';
export type{FusedKernelFeatures} from './dispatch';
export {paddingMaskLengths} from './seqlens';
export {valuesOnHost} from './seqlens';
export type{FusedDenseActivation, FusedDenseAttrs, FusedNormAttrs, FusedNormDenseAttrs, FusedRotaryAttrs, SoftmaxCrossEntropyAttrs} from './train/kernel_names';
export {FusedDense, FusedGelu, FusedNorm, FusedNormDense, FusedNormGrad, FusedRotary, SoftmaxCrossEntropy, SoftmaxCrossEntropyGrad} from './train/kernel_names';
export type{CrossEntropyOptions, NormDenseArgs, NormOp, NormOptions} from './train/ops';
export {FUSED_DENSE_MAX_ROWS, FUSED_NORM_DENSE_MAX_INNER, fusedDenseOrNull, fusedNormDenseOrNull, fusedGeluOrNull, fusedRotaryOrNull, layerNorm, rmsNorm, softmaxCrossEntropy, softmaxCrossEntropyLoss} from './train/ops';

export type{FusedAdamWArgs, FusedAdamWImpl} from './train';
export {FUSED_ADAMW_IMPL, FusedAdamW, fusedAdam, fusedAdamW} from './train';

export type{DecodeQKVArgs, FlashAttentionWithKVCacheOp, FlashAttentionWithKVCacheOptions} from './ops_kv_cache';
export {DECODE_OUT_MAX_INNER, DECODE_QKV_MAX_INNER, DECODE_QKV_MAX_ROWS, flashAttentionWithKVCache, flashDecodeOutOrNull, flashDecodeQKVOrNull, KV_CACHE_OPTION_SPECS} from './ops_kv_cache';
export type{KVCacheArgs, KVCacheAttendOptions} from './kv_cache';
export {KVCache} from './kv_cache';
export {useAdapterInfo} from '../kernels/webgpu/subgroup_matrix';
export type{FlashAttentionKVCacheAttrs, FlashDecodeQKVAttrs} from './kernel_names';
export {FlashAttentionKVCache, FlashDecodeOut, FlashDecodeQKV} from './kernel_names';

tf.registerGradient(flashAttentionGradConfig);
tf.registerGradient(flashAttentionKVCacheGradConfig);
tf.registerGradient(fusedNormGradConfig);
tf.registerGradient(softmaxCrossEntropyGradConfig);
tf.registerGradient(fusedRotaryGradConfig);
