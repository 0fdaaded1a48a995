/**
 * Fused or composed, for the training ops: the backend's fused kernel when
 * it registered one (and FLASH_ATTENTION_IMPL allows it), else the
 * composed reference. Under `fused` a missing kernel is an error.
 */
import * as tf from '@tensorflow/tfjs-core';

import {hasFusedKernel} from '../dispatch';
import {getImpl} from '../flags';

export function useFusedTrainingKernel(kernelName: string): boolean {
  const impl = getImpl();
  if (impl === 'reference') {
    return false;
  }
  const backendName = tf.getBackend();
  if (hasFusedKernel(kernelName, backendName)) {
    return true;
  }
  if (impl === 'fused') {
    throw new Error(`FLASH_ATTENTION_IMPL is 'fused' but backend '${backendName}' has no fused ${
        kernelName} kernel; use 'auto' to fall back to the composed reference`);
  }
  return false;
}
