/**
 * The best tfjs backend a Node process can have here: WebGPU through Dawn
 * (the `webgpu` package) on a real GPU, with the device created with the
 * adapter's own (high) limits and registered as tfjs's 'webgpu' backend;
 * otherwise (no GPU, or only SwiftShader, Dawn's CPU emulation, which is
 * slower than tfjs's cpu backend for training) the cpu backend.
 */
import * as fs from 'fs';
import * as path from 'path';

import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
import {WebGPUBackend} from '@tensorflow/tfjs-backend-webgpu';

import {TENSOR_CORE_DAWN_FLAGS, TENSOR_CORE_FEATURES} from './tensor_cores';
import {useAdapterInfo} from '../kernels/webgpu/subgroup_matrix';

export interface BackendChoice {
  name: 'webgpu'|'cpu';
  /** What runs it, in words. */
  description: string;
  /** A hardware GPU (not SwiftShader, not the cpu backend). */
  gpu: boolean;
  device?: GPUDevice;
}

const SWIFTSHADER_ICD = '/usr/lib/chromium/vk_swiftshader_icd.json';
const ICD_DIRS = ['/usr/share/vulkan/icd.d', '/etc/vulkan/icd.d', '/usr/local/share/vulkan/icd.d'];

/** Lets Vulkan see the system's drivers (and SwiftShader last) unless the caller chose. */
function chooseVulkanDrivers(): void {
  process.env.XDG_RUNTIME_DIR = process.env.XDG_RUNTIME_DIR || '/tmp';
  if (process.env.VK_ICD_FILENAMES || process.env.VK_DRIVER_FILES) {
    return;
  }
  const drivers = ICD_DIRS.filter(d => fs.existsSync(d))
                      .flatMap(d => fs.readdirSync(d).map(f => path.join(d, f)))
                      .filter(f => f.endsWith('.json') && !path.basename(f).startsWith('lvp_'));
  if (fs.existsSync(SWIFTSHADER_ICD)) {
    drivers.push(SWIFTSHADER_ICD);
  }
  if (drivers.length > 0) {
    process.env.VK_ICD_FILENAMES = drivers.join(':');
  }
}

interface DawnPackage {
  create(flags: string[]): GPU;
  globals: Record<string, unknown>;
}

/** Dawn's GPU object, or null where the package or a driver is missing. */
async function dawnGPU(flags: string[] = []): Promise<GPU|null> {
  chooseVulkanDrivers();
  let dawn: DawnPackage;
  try {
    // The package is ESM-only; this module is bundled as ESM by `npm run demo`.
    dawn = await import('webgpu') as unknown as DawnPackage;
  } catch {
    return null;
  }
  Object.assign(globalThis, dawn.globals);
  const gpu = dawn.create(flags);
  // tfjs-backend-webgpu checks navigator.gpu (Node's own navigator has none).
  Object.defineProperty(
      globalThis, 'navigator', {value: {gpu}, configurable: true, writable: true});
  return gpu;
}

function isSoftware(info: GPUAdapterInfo): boolean {
  const text =
      `${info.vendor} ${info.architecture} ${info.device} ${info.description}`.toLowerCase();
  return text.includes('swiftshader') || text.includes('llvmpipe') || text.includes('lavapipe') ||
      (info as {isFallbackAdapter?: boolean}).isFallbackAdapter === true;
}

/** A WebGPU device with all the adapter's limits and the features tfjs can use. */
export async function createDevice(adapter: GPUAdapter): Promise<GPUDevice> {
  const requiredLimits: Record<string, number> = {};
  const limits = adapter.limits as unknown as Record<string, number>;
  for (const key in limits) {
    if (typeof limits[key] === 'number') {
      requiredLimits[key] = limits[key];
    }
  }
  const wanted = ['timestamp-query', ...TENSOR_CORE_FEATURES];
  const requiredFeatures = wanted.filter(f => adapter.features.has(f)) as GPUFeatureName[];
  const device = await adapter.requestDevice({requiredLimits, requiredFeatures});
  // Dawn in Node lists the matrix configurations on the adapter only.
  useAdapterInfo(device, adapter.info);
  return device;
}

/**
 * Makes the best backend active. `prefer`: 'auto' (GPU WebGPU, else cpu),
 * 'webgpu' (WebGPU even on SwiftShader; error without an adapter) or 'cpu'.
 */
export async function useBestBackend(
    prefer: 'auto'|'webgpu'|'cpu' = 'auto',
    options: {tensorCores?: boolean} = {}): Promise<BackendChoice> {
  if (prefer !== 'cpu') {
    // Dawn's unsafe features only when the tensor cores are asked for.
    const gpu = await dawnGPU(options.tensorCores ? TENSOR_CORE_DAWN_FLAGS : []);
    const adapter =
        gpu == null ? null : await gpu.requestAdapter({powerPreference: 'high-performance'});
    if (adapter != null && (prefer === 'webgpu' || !isSoftware(adapter.info))) {
      const device = await createDevice(adapter);
      const info = adapter.info;
      if (tf.findBackend('webgpu') != null) {
        tf.removeBackend('webgpu');
      }
      tf.registerBackend('webgpu', () => new WebGPUBackend(device, info));
      if (!await tf.setBackend('webgpu')) {
        throw new Error('could not initialise the webgpu backend');
      }
      const name =
          [info.vendor, info.architecture, info.device, info.description].filter(Boolean).join(' ');
      return {
        name: 'webgpu',
        description: `webgpu (Dawn) on ${name || 'an unnamed adapter'}`,
        gpu: !isSoftware(info),
        device
      };
    }
    if (prefer === 'webgpu') {
      throw new Error(
          'no WebGPU adapter (is the `webgpu` package installed and a Vulkan driver present?)');
    }
  }
  await tf.setBackend('cpu');
  return {name: 'cpu', description: 'tfjs cpu backend (no hardware GPU found)', gpu: false};
}
