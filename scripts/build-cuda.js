#!/usr/bin/env node
/**
 * npm "install" script: builds the CUDA custom-op library for tfjs-node-gpu
 * into build/tensorflow/ when @tensorflow/tfjs-node-gpu (its libtensorflow)
 * and nvcc are present. Anywhere else it prints why it skipped and exits 0,
 * so `npm install` / `npm ci` never need TensorFlow or CUDA.
 *
 *   node scripts/build-cuda.js [--dry-run]
 *
 * Environment:
 *   FA_SKIP_CUDA_BUILD=1      skip
 *   FA_TFJS_NODE_GPU_DIR      the tfjs-node-gpu package folder (default: resolved)
 *   NVCC                      nvcc to use (default: PATH, then /usr/local/cuda/bin)
 *   FA_CUDA_ARCHS             compute capabilities, default "80 86 89 90"
 *   FA_NODE_INCLUDE           Node's headers (default: <node prefix>/include/node)
 *   FA_CUDA_BUILD_STRICT=1    a failed build fails the install (default: warn)
 *   TFJS_FLASH_ATTENTION_BUILD_DIR  output folder (default build/tensorflow)
 */
'use strict';
const {spawnSync} = require('child_process');
const fs = require('fs');
const path = require('path');

const root = path.join(__dirname, '..');
const PREFIX = 'tfjs-flash-attention:';

function findTfjsNodeGpu(env) {
  if (env.FA_TFJS_NODE_GPU_DIR) {
    return env.FA_TFJS_NODE_GPU_DIR;
  }
  const paths = [env.INIT_CWD, process.cwd(), root].filter(Boolean);
  try {
    return path.dirname(require.resolve('@tensorflow/tfjs-node-gpu/package.json', {paths}));
  } catch {
    return null;
  }
}

function findLibtensorflow(dir) {
  const lib = path.join(dir, 'deps', 'lib');
  for (const name of ['libtensorflow.so.2', 'libtensorflow.so']) {
    if (fs.existsSync(path.join(lib, name))) {
      return {libDir: lib, libName: name};
    }
  }
  return null;
}

function findNvcc(env) {
  if (env.NVCC) {
    return fs.existsSync(env.NVCC) ? env.NVCC : null;
  }
  const dirs = (env.PATH || '').split(path.delimiter).concat(['/usr/local/cuda/bin']);
  for (const dir of dirs) {
    const candidate = path.join(dir, 'nvcc');
    if (dir && fs.existsSync(candidate)) {
      return candidate;
    }
  }
  return null;
}

/**
 * What to do: {skip: reason} or {commands: [[program, ...args]], outDir}.
 */
function plan(env = process.env) {
  if (env.FA_SKIP_CUDA_BUILD === '1') {
    return {skip: 'FA_SKIP_CUDA_BUILD=1'};
  }
  const tfjsDir = findTfjsNodeGpu(env);
  if (tfjsDir == null) {
    return {skip: '@tensorflow/tfjs-node-gpu is not installed'};
  }
  const tf = findLibtensorflow(tfjsDir);
  if (tf == null) {
    return {
      skip: `no libtensorflow in ${path.join(tfjsDir, 'deps', 'lib')} (install ` +
          '@tensorflow/tfjs-node-gpu first; its install downloads it)'
    };
  }
  const nvcc = findNvcc(env);
  if (nvcc == null) {
    return {skip: 'nvcc (the CUDA toolkit) was not found (set NVCC or add it to PATH)'};
  }
  const nodeInclude = env.FA_NODE_INCLUDE ||
      path.join(path.dirname(path.dirname(process.execPath)), 'include', 'node');
  if (!fs.existsSync(path.join(nodeInclude, 'node_api.h'))) {
    return {skip: `Node's headers (node_api.h) are not in ${nodeInclude} (set FA_NODE_INCLUDE)`};
  }
  const outDir = env.TFJS_FLASH_ATTENTION_BUILD_DIR || path.join(root, 'build', 'tensorflow');
  const archs = (env.FA_CUDA_ARCHS || '80 86 89 90').trim().split(/[\s,;]+/);
  const gencode = archs.map(cc => `-gencode=arch=compute_${cc},code=sm_${cc}`);
  const src = p => path.join(root, p);
  const out = p => path.join(outDir, p);
  // libtensorflow by file name, found at run time where tfjs-node-gpu keeps it
  // (the same file tfjs-node-gpu has loaded, so one TensorFlow in the process).
  const linkTf = [`-L${tf.libDir}`, `-l:${tf.libName}`, '-Xlinker', `-rpath=${tf.libDir}`];
  const commands = [
    [
      nvcc, '-O3', '-std=c++17', ...gencode, '-Xcompiler', '-fPIC', '-c',
      src('kernels/cuda/flash_attention.cu'), '-o', out('flash_attention.o')
    ],
    [
      nvcc, '-O2', '-std=c++17', '-shared', '-Xcompiler', '-fPIC', ...gencode,
      src('kernels/tensorflow/flash_attention_op.cc'), out('flash_attention.o'), '-o',
      out('libtfjs_flash_attention_ops.so'), ...linkTf
    ],
    [
      nvcc, '-O2', '-std=c++17', '-shared', '-Xcompiler', '-fPIC', `-I${nodeInclude}`,
      '-DNODE_GYP_MODULE_NAME=tfjs_flash_attention_loader', src('kernels/tensorflow/loader.cc'),
      '-o', out('tfjs_flash_attention_loader.node'), ...linkTf
    ],
  ];
  return {commands, outDir};
}

function main() {
  const dryRun = process.argv.includes('--dry-run');
  const p = plan();
  if (p.skip) {
    console.log(
        `${PREFIX} CUDA kernels not built: ${p.skip}. ` +
        'The tensorflow backend will use the composed reference (see docs/cuda.md).');
    return 0;
  }
  if (dryRun) {
    console.log(JSON.stringify(p));
    return 0;
  }
  fs.mkdirSync(p.outDir, {recursive: true});
  console.log(`${PREFIX} building the CUDA op library into ${p.outDir} (a few minutes)`);
  for (const [program, ...args] of p.commands) {
    const r = spawnSync(program, args, {stdio: 'inherit'});
    if (r.status !== 0) {
      const message =
          `${PREFIX} building the CUDA op library failed (${path.basename(program)} ` +
          `exited with ${
              r.status ?? r.error}); the tensorflow backend will use the composed reference`;
      if (process.env.FA_CUDA_BUILD_STRICT === '1') {
        console.error(message);
        return 1;
      }
      console.warn(message);
      return 0;
    }
  }
  console.log(`${PREFIX} built ${path.join(p.outDir, 'libtfjs_flash_attention_ops.so')}`);
  return 0;
}

module.exports = {plan};

if (require.main === module) {
  process.exitCode = main();
}
