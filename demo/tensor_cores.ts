/**
 * `--tensor-cores` for the demo and the benchmarks: how a Node process
 * asks Dawn for subgroup matrices, turns the tensor-core path on where the
 * device has them (else says why and keeps the SIMT kernels), and reports
 * whether the path ran (docs/tensor_cores.md).
 */
/// <reference types="@webgpu/types" />
import * as tf from '@tensorflow/tfjs-core';

import {matrixGradStats} from '../kernels/webgpu/flash_attention_grad_subgroup_matrix';
import {matrixForwardStats} from '../kernels/webgpu/flash_attention_subgroup_matrix';
import {pickSubgroupMatrixShape, SUBGROUP_MATRIX_FEATURE, unvalidatedTensorCoresAllowed, useAdapterInfo} from '../kernels/webgpu/subgroup_matrix';
import {FLASH_ATTENTION_TENSOR_CORES} from '../src/flags';

/** Dawn hides f16 and subgroup matrices in Node unless asked (NVIDIA on Vulkan). */
export const TENSOR_CORE_DAWN_FLAGS =
    ['enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia'];

/** Device features the tensor-core kernels need. */
export const TENSOR_CORE_FEATURES = ['shader-f16', 'subgroups', SUBGROUP_MATRIX_FEATURE];

/** The features of TENSOR_CORE_FEATURES the adapter offers. */
export function tensorCoreFeatures(adapter: GPUAdapter): GPUFeatureName[] {
  return TENSOR_CORE_FEATURES.filter(f => adapter.features.has(f)) as GPUFeatureName[];
}

/**
 * Turns the tensor-core path on where `device` supports it; returns a line
 * saying what happened (a clear reason where it cannot, and the path stays
 * off: the SIMT kernels run). `adapterInfo` is the adapter's `info`: Dawn
 * in Node lists the matrix configurations there only.
 */
export function enableTensorCores(
    device: GPUDevice|undefined, adapterInfo?: GPUAdapterInfo): string {
  tf.env().set(FLASH_ATTENTION_TENSOR_CORES, false);
  if (device == null) {
    return 'tensor cores: requested, but the backend is not WebGPU; ' +
        'the float32 kernels run instead';
  }
  if (adapterInfo != null) {
    useAdapterInfo(device, adapterInfo);
  }
  const missing = TENSOR_CORE_FEATURES.filter(f => !device.features.has(f as GPUFeatureName));
  const shape = pickSubgroupMatrixShape(device);
  if (shape == null) {
    const why = missing.length > 0 ?
        `the device lacks ${missing.join(', ')}` :
        'the device has no f16 x f16 -> f32 subgroup-matrix configuration with a fixed ' +
            'subgroup size';
    return `tensor cores: requested, but ${why}; the SIMT float32 kernels run instead`;
  }
  if (!unvalidatedTensorCoresAllowed()) {
    return `tensor cores: the device has subgroup matrices (${shape.M}x${shape.N}x${
               shape.K} f16 -> f32), but this package's subgroup-matrix kernels gave NaN ` +
        'outputs in their first check on such hardware; the SIMT float32 kernels run instead';
  }
  tf.env().set(FLASH_ATTENTION_TENSOR_CORES, true);
  return `tensor cores: on (subgroup matrices ${shape.M}x${shape.N}x${shape.K} f16 -> f32, ${
      shape.lanes} lanes)`;
}

/** Dispatch counts of the tensor-core kernels so far. */
export function tensorCoreDispatches(): {forward: number, backward: number} {
  return {forward: matrixForwardStats.dispatches, backward: matrixGradStats.dispatches};
}

/** A line saying whether the tensor-core path ran, from the dispatch counts. */
export function tensorCoreUsage(): string {
  const {forward, backward} = tensorCoreDispatches();
  return forward + backward > 0 ?
      `tensor-core path ran: ${forward} forward and ${backward} backward dispatches` :
      'tensor-core path did not run (0 dispatches): the SIMT kernels ran';
}
