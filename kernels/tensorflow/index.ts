/**
 * tfjs-flash-attention/tensorflow: fused CUDA kernels for tfjs-node-gpu.
 *
 *   import '@tensorflow/tfjs-node-gpu';
 *   import {flashAttention} from 'tfjs-flash-attention';
 *   import 'tfjs-flash-attention/tensorflow';
 *
 * Importing this module loads the custom-op library built at install and
 * registers the `tensorflow` backend's FlashAttention kernels; if it cannot,
 * it logs why once and that backend keeps the composed reference.
 */
import {registerTensorflowKernels} from './register';

export {TF_BACKWARD_OP, TF_FORWARD_OP, tensorflowOpAttrs} from './flash_attention_tensorflow';
export type{TensorflowBackendLike, TFEOpAttr} from './flash_attention_tensorflow';
export {BUILD_DIR_ENV, buildDir, LOADER_ADDON, OP_LIBRARY, registerTensorflowKernels} from './register';
export type{RegisterOptions, RegisterResult} from './register';

export const tensorflowKernels = registerTensorflowKernels();
