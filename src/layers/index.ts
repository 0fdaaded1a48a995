/**
 * tfjs-flash-attention/layers: Keras-style layers over the flashAttention
 * op. Needs @tensorflow/tfjs-layers (an optional peer dependency). Imports
 * the core by package name, so that it shares the one fused-kernel registry
 * of `tfjs-flash-attention`.
 */
export type{FlashMHAArgs, FlashMHACallKwargs} from './flash_mha';
export {FlashMHA, flashMHA} from './flash_mha';
export {alibiSlopes} from './alibi';
export type{MaskedAttentionOptions} from './masked_attention';
export {maskedAttention, repeatKVHeads} from './masked_attention';
export {applyRotary} from './rotary';
export type{MultiHeadAttentionWeightName, MultiHeadAttentionWeightsSource} from './mha_weights';
export {loadMultiHeadAttentionWeights, MULTI_HEAD_ATTENTION_WEIGHT_NAMES} from './mha_weights';
// Keras's MultiHeadAttention, registered for deserialization at import
// (where no class of that name is registered yet).
export type{MultiHeadAttentionArgs, MultiHeadAttentionCallArgs} from './multi_head_attention';
export {MultiHeadAttention, registerMultiHeadAttention} from './multi_head_attention';
export type{FusedNormArgs} from './norm_layers';
export {FusedLayerNormalization, fusedLayerNormalization, RMSNormalization, rmsNormalization} from './norm_layers';
// Incremental decoding (generation) of models built with FlashMHA.
export type{DecodingLayer, FoldableActivation, IncrementalDecoderArgs} from './decoding';
export {IncrementalDecoder, isDecodingLayer} from './decoding';
