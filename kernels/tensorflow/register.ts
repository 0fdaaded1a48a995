/**
 * Loads the CUDA custom-op library into tfjs-node-gpu's libtensorflow and,
 * only if that worked, registers the fused `tensorflow` kernels. When it
 * cannot (no tfjs-node-gpu backend, the CPU package, library not built at
 * install, TensorFlow refused it), it logs one line saying why and the
 * backend keeps using the composed reference.
 */
import * as fs from 'fs';
import {createRequire} from 'module';
import * as path from 'path';

import * as tf from '@tensorflow/tfjs-core';
import {registerFusedKernel} from 'tfjs-flash-attention';

import {flashAttentionGradTensorflowConfig, flashAttentionTensorflowConfig, TensorflowBackendLike} from './flash_attention_tensorflow';

/** Where `npm install` (scripts/build-cuda.js) puts the built files. */
export const OP_LIBRARY = 'libtfjs_flash_attention_ops.so';
export const LOADER_ADDON = 'tfjs_flash_attention_loader.node';
/** Overrides the folder holding both (default `<package>/build/tensorflow`). */
export const BUILD_DIR_ENV = 'TFJS_FLASH_ATTENTION_BUILD_DIR';

export interface RegisterOptions {
  /**
   * Loads the op library into TensorFlow; returns null on success or the
   * error. Default: the N-API loader addon (TF_LoadLibrary).
   */
  loadLibrary?: (libraryPath: string) => string | null;
  /** Where the one-line reason goes when the kernels are not registered. */
  log?: (message: string) => void;
}

export interface RegisterResult {
  registered: boolean;
  /** Why not, when not registered. */
  reason?: string;
  libraryPath?: string;
}

/** The package root: the first folder up from here named like the package. */
function packageRoot(): string|null {
  const starts: string[] = [];
  if (typeof __dirname === 'string') {
    starts.push(__dirname);
  }
  starts.push(process.cwd());
  for (const start of starts) {
    for (let dir = start;; dir = path.dirname(dir)) {
      const pkg = path.join(dir, 'package.json');
      if (fs.existsSync(pkg) &&
          JSON.parse(fs.readFileSync(pkg, 'utf8')).name === 'tfjs-flash-attention') {
        return dir;
      }
      const installed = path.join(dir, 'node_modules', 'tfjs-flash-attention');
      if (fs.existsSync(path.join(installed, 'package.json'))) {
        return installed;
      }
      if (path.dirname(dir) === dir) {
        break;
      }
    }
  }
  return null;
}

export function buildDir(): string|null {
  const fromEnv = typeof process !== 'undefined' ? process.env[BUILD_DIR_ENV] : undefined;
  if (fromEnv) {
    return fromEnv;
  }
  const root = packageRoot();
  return root == null ? null : path.join(root, 'build', 'tensorflow');
}

function addonLoader(dir: string): (libraryPath: string) => string | null {
  const addon = createRequire(path.join(dir, 'index.js'))(path.join(dir, LOADER_ADDON)) as
      {load(libraryPath: string): string | null};
  return libraryPath => addon.load(libraryPath);
}

let state: RegisterResult|null = null;

/**
 * Registers the fused kernels of the `tensorflow` backend if the CUDA op
 * library can be loaded; idempotent (the first result is kept).
 */
export function registerTensorflowKernels(options: RegisterOptions = {}): RegisterResult {
  if (state != null && state.registered) {
    return state;
  }
  const log = options.log ?? ((m: string) => console.warn(m));
  const result = tryRegister(options);
  if (!result.registered) {
    log(`tfjs-flash-attention: fused CUDA kernels not registered for the tensorflow backend (${
        result.reason}); it uses the composed reference`);
  }
  state = result;
  return result;
}

function tryRegister(options: RegisterOptions): RegisterResult {
  let backend: TensorflowBackendLike|null = null;
  try {
    backend = tf.findBackend('tensorflow') as unknown as TensorflowBackendLike | null;
  } catch (e) {
    return {registered: false, reason: `the tensorflow backend failed to start: ${e}`};
  }
  if (backend == null) {
    return {
      registered: false,
      reason: 'no tensorflow backend: import @tensorflow/tfjs-node-gpu before ' +
          'tfjs-flash-attention/tensorflow',
    };
  }
  if (backend.isGPUPackage === false) {
    return {
      registered: false,
      reason: 'the tensorflow backend is @tensorflow/tfjs-node (CPU); the CUDA kernels need ' +
          '@tensorflow/tfjs-node-gpu',
    };
  }
  const dir = buildDir();
  const libraryPath = dir == null ? null : path.join(dir, OP_LIBRARY);
  if (libraryPath == null || !fs.existsSync(libraryPath)) {
    return {
      registered: false,
      reason: `${libraryPath ?? OP_LIBRARY} was not built at install (needs ` +
          '@tensorflow/tfjs-node-gpu and nvcc; see docs/cuda.md, then ' +
          '`npm rebuild tfjs-flash-attention`)',
    };
  }
  let error: string|null;
  try {
    const load = options.loadLibrary ?? addonLoader(dir!);
    error = load(libraryPath);
  } catch (e) {
    error = String(e instanceof Error ? e.message : e);
  }
  if (error != null) {
    return {
      registered: false,
      reason: `TensorFlow did not load ${libraryPath}: ${error}`,
      libraryPath
    };
  }
  registerFusedKernel(flashAttentionTensorflowConfig);
  registerFusedKernel(flashAttentionGradTensorflowConfig);
  return {registered: true, libraryPath};
}

/** For tests: forget the first result. */
export function resetTensorflowKernelsForTests(): void {
  state = null;
}
