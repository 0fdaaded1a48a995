/**
 * Chooses between a backend's fused kernel and the composed reference.
 *
 * Fused kernels register through `registerFusedKernel`, which records, next
 * to the tfjs kernel, a predicate saying which calls the kernel can take
 * (head dims, device limits...). A call it cannot take falls back to the
 * reference under `auto`, and is an error under `fused`.
 */
import * as tf from '@tensorflow/tfjs-core';

import type {AttentionShapes} from './checks';
import {getImpl} from './flags';
import type {FlashAttentionAttrs} from './kernel_names';

/** Why a fused kernel cannot take a call, or null when it can. */
export type FusedSupportCheck =
    (shapes: AttentionShapes, attrs: FlashAttentionAttrs, backend: tf.KernelBackend) => string|null;

const supportChecks = new Map<string, FusedSupportCheck>();

/** Inputs a fused kernel understands beyond q, k, v and alibiSlopes. */
export interface FusedKernelFeatures {
  /**
   * Per-batch sequence lengths (the `seqlens` input). A kernel without it
   * never gets a call that has lengths: those take the reference.
   */
  seqlens?: boolean;
  /**
   * The packed varlen layout (FlashAttentionAttrs.packedBatch). Packed
   * calls have no reference: callers ask fusedKernelRefusal first.
   */
  packed?: boolean;
}
const kernelFeatures = new Map<string, FusedKernelFeatures>();

function key(kernelName: string, backendName: string): string {
  return `${kernelName}@${backendName}`;
}

/** Registers a fused kernel with tfjs and records which calls it takes. */
export function registerFusedKernel(
    config: tf.KernelConfig, supports: FusedSupportCheck = () => null,
    features: FusedKernelFeatures = {}): void {
  if (tf.getKernel(config.kernelName, config.backendName) != null) {
    tf.unregisterKernel(config.kernelName, config.backendName);
  }
  tf.registerKernel(config);
  supportChecks.set(key(config.kernelName, config.backendName), supports);
  kernelFeatures.set(key(config.kernelName, config.backendName), features);
}

/** Is a fused kernel registered for this backend (whatever the call)? */
export function hasFusedKernel(kernelName: string, backendName: string): boolean {
  return supportChecks.has(key(kernelName, backendName)) &&
      tf.getKernel(kernelName, backendName) != null;
}

/**
 * Why the active backend's fused kernel cannot take a call (null when it
 * can), whatever FLASH_ATTENTION_IMPL says beyond 'reference'.
 */
export function fusedKernelRefusal(
    kernelName: string, shapes: AttentionShapes, attrs: FlashAttentionAttrs): string|null {
  if (getImpl() === 'reference') {
    return 'FLASH_ATTENTION_IMPL is \'reference\'';
  }
  const backendName = tf.getBackend();
  const features = kernelFeatures.get(key(kernelName, backendName));
  if (!hasFusedKernel(kernelName, backendName)) {
    return `backend '${backendName}' has no fused ${kernelName} kernel`;
  }
  if (attrs.hasSeqlens && !features?.seqlens) {
    return `the fused ${kernelName} kernel of backend '${
        backendName}' does not take per-batch sequence lengths`;
  }
  if (attrs.packedBatch! > 0 && !features?.packed) {
    return `the fused ${kernelName} kernel of backend '${
        backendName}' does not take the packed varlen layout`;
  }
  const supports = supportChecks.get(key(kernelName, backendName))!;
  return supports(shapes, attrs, tf.engine().findBackend(backendName));
}

/**
 * True to run the backend's fused kernel, false for the reference. Throws
 * under FLASH_ATTENTION_IMPL=fused when the fused kernel cannot run, and
 * for a packed call it cannot run (there is no packed reference).
 */
export function useFusedKernel(
    kernelName: string, shapes: AttentionShapes, attrs: FlashAttentionAttrs): boolean {
  const impl = getImpl();
  if (impl === 'reference' && !(attrs.packedBatch! > 0)) {
    return false;
  }
  const reason = fusedKernelRefusal(kernelName, shapes, attrs);
  if (reason == null) {
    return true;
  }
  if (attrs.packedBatch! > 0) {
    throw new Error(`${kernelName}: a packed varlen call needs a fused kernel, but ${reason}`);
  }
  if (impl === 'fused') {
    throw new Error(`FLASH_ATTENTION_IMPL is 'fused' but ${
        reason}; use 'auto' to fall back to the composed reference`);
  }
  return false;
}
