/**
 * Registers the fused WebGPU kernels with tfjs (for the backend named
 * 'webgpu'). Needs no runtime import of @tensorflow/tfjs-backend-webgpu:
 * the kernels reach the device through the backend they are given.
 */
import {registerFusedKernel} from '../../src/dispatch';

import {flashDecodeOutWebGPUConfig, flashDecodeWebGPUConfig, supportsFlashDecodeWebGPU} from './flash_decode';
import {flashDecodeQKVWebGPUConfig} from './flash_decode_qkv';
import {flashAttentionWebGPUConfig, supportsFlashAttentionWebGPU} from './FlashAttention';
import {registerFlashAttentionGradWebGPU} from './FlashAttentionGrad';
import {registerTrainingKernelsWebGPU} from './training_kernels';

registerFusedKernel(
    flashAttentionWebGPUConfig, supportsFlashAttentionWebGPU, {seqlens: true, packed: true});
// The fused backward (FlashAttentionGrad): used by the registered gradient
// of FlashAttention, whichever forward ran.
registerFlashAttentionGradWebGPU();
// Decoding over a KV cache (flashAttentionWithKVCache), inference only.
registerFusedKernel(flashDecodeWebGPUConfig, supportsFlashDecodeWebGPU);
// A decode step's pre-norm, qkv projection, rotary and cache append.
registerFusedKernel(flashDecodeQKVWebGPUConfig);
// A decode step's attention and output projection (merge and matMul in one pass).
registerFusedKernel(flashDecodeOutWebGPUConfig, supportsFlashDecodeWebGPU);
// The training kernels: fused norms, softmax cross-entropy, rotary.
registerTrainingKernelsWebGPU();
