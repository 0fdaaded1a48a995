/**
 * The backends every numerical test runs on: tfjs's cpu backend and the
 * webgpu backend on Dawn (SwiftShader without a GPU). The webgpu run is not
 * optional: if no adapter can be had, its tests fail. Set
 * FLASH_ATTENTION_TEST_BACKENDS=cpu to leave it out knowingly (its tests are
 * then reported as skipped, never as passed).
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
// tfjs-core's CommonJS bundle registers no gradients of its own ops (add,
// mul, sum... used by the tests' losses); tfjs-layers' bundle does.
import '@tensorflow/tfjs-layers';

import {installWebGPUGlobals} from './webgpu';

export type TestBackend = 'cpu'|'webgpu';

export const ALL_BACKENDS: TestBackend[] = ['cpu', 'webgpu'];

export function selectedBackends(): TestBackend[] {
  const wanted = process.env.FLASH_ATTENTION_TEST_BACKENDS;
  if (!wanted) {
    return ALL_BACKENDS;
  }
  return ALL_BACKENDS.filter(b => wanted.split(',').includes(b));
}

// Silences tfjs's advice to install tfjs-node in every test file.
tf.env().set('IS_TEST', true);

let webgpuRegistered = false;

/** Makes `name` the active backend, registering webgpu on first use. */
export async function useBackend(name: TestBackend): Promise<void> {
  if (name === 'webgpu' && !webgpuRegistered) {
    installWebGPUGlobals();
    // tfjs-backend-webgpu registers itself at import when navigator.gpu
    // exists, so it must be required after the globals are in place.
    require('@tensorflow/tfjs-backend-webgpu');
    webgpuRegistered = true;
  }
  const ok = await tf.setBackend(name);
  if (!ok || tf.getBackend() !== name) {
    throw new Error(`could not initialise the ${
        name} backend (is chromium's SwiftShader installed? see README)`);
  }
}

/**
 * `describe` once per selected backend, each block switching to its
 * backend first; unselected backends are reported as skipped.
 */
export function describeBackends(title: string, body: (backend: TestBackend) => void): void {
  const selected = selectedBackends();
  for (const backend of ALL_BACKENDS) {
    const describeFn = selected.includes(backend) ? describe : describe.skip;
    describeFn(`${title} [${backend}]`, () => {
      beforeAll(async () => {
        await useBackend(backend);
      });
      body(backend);
    });
  }
}
