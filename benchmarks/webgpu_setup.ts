/**
 * The WebGPU setup the Node benchmarks share: a Dawn device (the `webgpu`
 * package) with the adapter's largest limits, tfjs's webgpu backend on it,
 * and the median time per call of a batch of calls.
 */
import {create, globals} from 'webgpu';

import * as tf from '@tensorflow/tfjs-core';

import {useAdapterInfo} from '../kernels/webgpu/subgroup_matrix';

export interface WebGPUSetup {
  gpu: GPU;
  adapter: GPUAdapter;
  device: GPUDevice;
  /** The wanted features the adapter has (all of them are enabled). */
  features: GPUFeatureName[];
}

/**
 * The raw-WebGPU matrix benchmarks' device: the tensor-core Dawn flags and
 * features; `--no-robustness` adds Dawn's disable_robustness toggle (an
 * unsafe API, as the matrices are) to show what its bounds checks cost.
 * Prints the adapter's name and GPU errors to stdout.
 */
export async function openTensorCoreDevice(): Promise<WebGPUSetup> {
  const {TENSOR_CORE_DAWN_FLAGS, TENSOR_CORE_FEATURES} = await import('../demo/tensor_cores');
  const robust = !process.argv.includes('--no-robustness');
  const setup = await openWebGPUDevice({
    dawnFlags: robust ? TENSOR_CORE_DAWN_FLAGS :
                        TENSOR_CORE_DAWN_FLAGS.map(f => `${f},disable_robustness`),
    features: TENSOR_CORE_FEATURES,
    onError: m => console.log(m),
  });
  console.log(`adapter: ${adapterName(setup.adapter)}${robust ? '' : ' (robustness off)'}`);
  return setup;
}

/**
 * Opens a device with those of `features` the adapter has and its largest
 * compute and storage limits, and sets `navigator.gpu` (tfjs-backend-webgpu
 * looks for it). GPU errors go to `onError` when given.
 */
export async function openWebGPUDevice(
    opts: {dawnFlags?: string[], features?: string[], onError?: (message: string) => void} = {}):
    Promise<WebGPUSetup> {
  Object.assign(globalThis, globals);
  const gpu = create(opts.dawnFlags ?? []);
  const adapter = await gpu.requestAdapter({powerPreference: 'high-performance'});
  if (adapter == null) {
    throw new Error('no WebGPU adapter');
  }
  const l = adapter.limits;
  const features = (opts.features ?? []).filter(f => adapter.features.has(f)) as GPUFeatureName[];
  const device = await adapter.requestDevice({
    requiredFeatures: features,
    requiredLimits: {
      maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
      maxBufferSize: l.maxBufferSize,
      maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
      maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup,
      maxComputeWorkgroupSizeX: l.maxComputeWorkgroupSizeX,
      maxComputeWorkgroupsPerDimension: l.maxComputeWorkgroupsPerDimension,
      maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
    },
  });
  // Dawn in Node lists the matrix configurations on the adapter only.
  useAdapterInfo(device, adapter.info);
  const onError = opts.onError;
  if (onError != null) {
    device.addEventListener('uncapturederror', (e: Event) => {
      onError(`GPU error: ${(e as GPUUncapturedErrorEvent).error.message}`);
    });
  }
  Object.defineProperty(
      globalThis, 'navigator', {value: {gpu}, configurable: true, writable: true});
  return {gpu, adapter, device, features};
}

/** Makes `setup.device` tfjs's 'webgpu' backend (replacing any) and selects it. */
export async function useWebGPUBackend(setup: WebGPUSetup): Promise<void> {
  const {WebGPUBackend} = await import('@tensorflow/tfjs-backend-webgpu');
  if (tf.findBackendFactory('webgpu') != null) {
    tf.removeBackend('webgpu');
  }
  tf.registerBackend('webgpu', () => new WebGPUBackend(setup.device, setup.adapter.info));
  await tf.setBackend('webgpu');
}

/** The adapter's name as one line. */
export function adapterName(adapter: GPUAdapter): string {
  const info = adapter.info;
  return `${info.vendor} ${info.architecture} ${info.description}`.trim();
}

/**
 * Median milliseconds per call of `f` over `batches` batches of `reps`
 * calls, after one warm-up call (which compiles the pipelines). Each batch
 * ends by reading one element of its last call's last output, which waits
 * for all queued work.
 */
export async function medianMsPerCall(
    f: () => tf.Tensor[], reps: number, batches: number): Promise<number> {
  const sync = async (ts: tf.Tensor[]) => {
    const probe = tf.tidy(() => tf.slice(tf.reshape(ts[ts.length - 1], [-1]), 0, 1));
    await probe.data();
    probe.dispose();
  };
  let last = f();
  await sync(last);
  tf.dispose(last);
  const times: number[] = [];
  for (let b = 0; b < batches; b++) {
    const t0 = performance.now();
    for (let r = 0; r < reps; r++) {
      last = f();
      if (r < reps - 1) {
        tf.dispose(last);
      }
    }
    await sync(last);
    tf.dispose(last);
    times.push((performance.now() - t0) / reps);
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)];
}
