/**
 * scripts/build-cuda.js, the package's npm "install" script: it skips (exit
 * 0, one line why) without tfjs-node-gpu, libtensorflow, nvcc or Node's
 * headers, and otherwise runs the three compiler commands that make the op
 * library and the loader addon. The last test runs those commands for real
 * with g++ standing in for nvcc (test/cuda/fake_nvcc.js) against a stand-in
 * libtensorflow.so.2 (test/cuda/fake_tf.cc), then loads the built N-API
 * addon into this process and has it TF_LoadLibrary the built op library.
 */
import {execFileSync, spawnSync} from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import * as tf from '@tensorflow/tfjs-core';
import {MathBackendCPU} from '@tensorflow/tfjs-backend-cpu';

import {FlashAttention, FlashAttentionGrad, hasFusedKernel} from '../src';
import {BUILD_DIR_ENV, registerTensorflowKernels, resetTensorflowKernelsForTests} from '../kernels/tensorflow/register';

const root = path.join(__dirname, '..');
const script = path.join(root, 'scripts', 'build-cuda.js');
// eslint-disable-next-line @typescript-eslint/no-var-requires
const {plan} = require(script) as {plan(env: NodeJS.ProcessEnv): any};

const nodeInclude = path.join(path.dirname(path.dirname(process.execPath)), 'include', 'node');
const haveToolchain = (() => {
  try {
    execFileSync('g++', ['--version'], {stdio: 'ignore'});
    return fs.existsSync(path.join(nodeInclude, 'node_api.h'));
  } catch {
    return false;
  }
})();

function tmpdir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'fa-build-cuda-'));
}

/** A tfjs-node-gpu folder with (optionally) deps/lib/libtensorflow.so.2. */
function fakeTfjs(withLib: boolean): string {
  const dir = tmpdir();
  fs.mkdirSync(path.join(dir, 'deps', 'lib'), {recursive: true});
  if (withLib) {
    fs.writeFileSync(path.join(dir, 'deps', 'lib', 'libtensorflow.so.2'), '');
  }
  return dir;
}

const baseEnv = (extra: NodeJS.ProcessEnv): NodeJS.ProcessEnv => ({
  PATH: process.env.PATH,
  HOME: process.env.HOME,
  ...extra,
});

describe('scripts/build-cuda.js', () => {
  it('skips cleanly without tfjs-node-gpu and says so (as in npm ci here)', () => {
    const cwd = tmpdir();
    const r = spawnSync(
        process.execPath, [script], {cwd, env: baseEnv({INIT_CWD: cwd}), encoding: 'utf8'});
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(
        /^tfjs-flash-attention: CUDA kernels not built: @tensorflow\/tfjs-node-gpu is not installed\. The tensorflow backend will use the composed reference/);
  });

  it('skips without libtensorflow, without nvcc, without Node headers, or when asked', () => {
    expect(plan(baseEnv({FA_SKIP_CUDA_BUILD: '1'})).skip).toBe('FA_SKIP_CUDA_BUILD=1');
    expect(plan(baseEnv({FA_TFJS_NODE_GPU_DIR: fakeTfjs(false)})).skip)
        .toMatch(/^no libtensorflow in .*deps\/lib/);
    const tfjs = fakeTfjs(true);
    expect(plan(baseEnv({FA_TFJS_NODE_GPU_DIR: tfjs, NVCC: '/nonexistent/nvcc'})).skip)
        .toMatch(/^nvcc \(the CUDA toolkit\) was not found/);
    const nvcc = path.join(root, 'test/cuda/fake_nvcc.js');
    expect(plan(baseEnv({FA_TFJS_NODE_GPU_DIR: tfjs, NVCC: nvcc, FA_NODE_INCLUDE: tmpdir()})).skip)
        .toMatch(/^Node's headers \(node_api\.h\) are not in/);
  });

  it('plans the kernels, op library and loader for the chosen GPUs, linked to tfjs-node-gpu\'s libtensorflow',
     () => {
       const tfjs = fakeTfjs(true);
       const out = tmpdir();
       const nvcc = path.join(root, 'test/cuda/fake_nvcc.js');
       const include = tmpdir();
       fs.writeFileSync(path.join(include, 'node_api.h'), '');
       const p = plan(baseEnv({
         FA_TFJS_NODE_GPU_DIR: tfjs,
         NVCC: nvcc,
         FA_NODE_INCLUDE: include,
         FA_CUDA_ARCHS: '80 90',
         TFJS_FLASH_ATTENTION_BUILD_DIR: out
       }));
       expect(p.skip).toBeUndefined();
       expect(p.outDir).toBe(out);
       const [kernels, ops, loader] = p.commands as string[][];
       const lib = path.join(tfjs, 'deps', 'lib');
       expect(kernels).toEqual([
         nvcc, '-O3', '-std=c++17', '-gencode=arch=compute_80,code=sm_80',
         '-gencode=arch=compute_90,code=sm_90', '-Xcompiler', '-fPIC', '-c',
         path.join(root, 'kernels/cuda/flash_attention.cu'), '-o',
         path.join(out, 'flash_attention.o')
       ]);
       expect(ops).toContain(path.join(root, 'kernels/tensorflow/flash_attention_op.cc'));
       expect(ops).toContain(path.join(out, 'flash_attention.o'));
       expect(ops.slice(-6)).toEqual([
         '-o', path.join(out, 'libtfjs_flash_attention_ops.so'), `-L${lib}`,
         '-l:libtensorflow.so.2', '-Xlinker', `-rpath=${lib}`
       ]);
       expect(loader).toContain(`-I${include}`);
       expect(loader).toContain(path.join(out, 'tfjs_flash_attention_loader.node'));
     });

  (haveToolchain ? it : it.skip)(
      'builds for real (g++ for nvcc, a stand-in libtensorflow); the addon loads the op library',
      () => {
        const tfjs = fakeTfjs(false);
        const lib = path.join(tfjs, 'deps', 'lib', 'libtensorflow.so.2');
        execFileSync('g++', [
          '-std=c++17', '-O1', '-fPIC', '-shared', '-DFAKE_TF_LIBRARY',
          '-Wl,-soname,libtensorflow.so.2', path.join(root, 'test/cuda/fake_tf.cc'), '-ldl', '-o',
          lib
        ]);
        const out = tmpdir();
        const log = path.join(out, 'nvcc.log');
        // A launcher, so that the stand-in runs whatever mode git gave
        // test/cuda/fake_nvcc.js in the checkout.
        const nvcc = path.join(tmpdir(), 'nvcc');
        fs.writeFileSync(
            nvcc,
            `#!/bin/sh\nexec '${process.execPath}' '${
                path.join(root, 'test/cuda/fake_nvcc.js')}' "$@"\n`,
            {mode: 0o755});
        const env = baseEnv({
          FA_TFJS_NODE_GPU_DIR: tfjs,
          FAKE_NVCC_LOG: log,
          NVCC: nvcc,
          TFJS_FLASH_ATTENTION_BUILD_DIR: out,
          FA_CUDA_ARCHS: '90'
        });
        const r = spawnSync(process.execPath, [script], {env, encoding: 'utf8'});
        expect(r.stderr).toBe('');
        expect(r.status).toBe(0);
        expect(r.stdout).toContain('tfjs-flash-attention: built');
        expect(fs.readFileSync(log, 'utf8').trim().split('\n').length).toBe(3);
        for (const f of ['libtfjs_flash_attention_ops.so', 'tfjs_flash_attention_loader.node']) {
          expect(fs.existsSync(path.join(out, f))).toBe(true);
        }
        // The real N-API addon, in this process, calling TF_LoadLibrary.
        const addon = require(path.join(out, 'tfjs_flash_attention_loader.node')) as
            {load(p: string): string | null};
        expect(addon.load(path.join(out, 'libtfjs_flash_attention_ops.so'))).toBeNull();
        expect(addon.load(path.join(out, 'missing.so'))).toMatch(/missing\.so/);
        // And through registerTensorflowKernels (default loader = that addon).
        tf.registerBackend(
            'tensorflow', () => Object.assign(new MathBackendCPU(), {isGPUPackage: true}), 0);
        process.env[BUILD_DIR_ENV] = out;
        resetTensorflowKernelsForTests();
        try {
          const logged: string[] = [];
          expect(registerTensorflowKernels({log: m => logged.push(m)}).registered).toBe(true);
          expect(logged).toEqual([]);
          expect(hasFusedKernel(FlashAttention, 'tensorflow')).toBe(true);
          expect(hasFusedKernel(FlashAttentionGrad, 'tensorflow')).toBe(true);
        } finally {
          delete process.env[BUILD_DIR_ENV];
          resetTensorflowKernelsForTests();
          tf.removeBackend('tensorflow');
          tf.unregisterKernel(FlashAttention, 'tensorflow');
          tf.unregisterKernel(FlashAttentionGrad, 'tensorflow');
        }
        // A failing compiler: the install still succeeds, with a warning...
        const failing = spawnSync(
            process.execPath, [script], {env: {...env, FAKE_NVCC_FAIL: '1'}, encoding: 'utf8'});
        expect(failing.status).toBe(0);
        expect(failing.stderr).toMatch(/building the CUDA op library failed/);
        // ...unless asked to be strict.
        const strict = spawnSync(
            process.execPath, [script],
            {env: {...env, FAKE_NVCC_FAIL: '1', FA_CUDA_BUILD_STRICT: '1'}, encoding: 'utf8'});
        expect(strict.status).toBe(1);
      },
      120000);
});

describe('dist/tensorflow (the opt-in entry, built by npm run build)', () => {
  for (
      const [format, code] of [
          [
            'CommonJS',
            `const m = require('./dist/tensorflow.cjs'); console.log(JSON.stringify(m.tensorflowKernels));`
          ],
          [
            'ES module',
            `import('tfjs-flash-attention/tensorflow').then(m => console.log(JSON.stringify(m.tensorflowKernels)));`
          ],
  ]) {
    it(`${format}: without tfjs-node-gpu it registers nothing and logs one line why`, () => {
      if (!fs.existsSync(path.join(root, 'dist', 'tensorflow.cjs'))) {
        throw new Error('dist/tensorflow.cjs is missing: run `npm run build` (npm test does)');
      }
      const r = spawnSync(process.execPath, ['-e', code], {cwd: root, encoding: 'utf8'});
      expect(r.status).toBe(0);
      expect(r.stderr.trim().split('\n')).toEqual([
        'tfjs-flash-attention: fused CUDA kernels not registered for the tensorflow backend (no ' +
        'tensorflow backend: import @tensorflow/tfjs-node-gpu before ' +
        'tfjs-flash-attention/tensorflow); it uses the composed reference'
      ]);
      expect(JSON.parse(r.stdout).registered).toBe(false);
    });
  }
});
