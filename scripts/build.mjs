#!/usr/bin/env node
/**
 * Builds the package into dist/:
 *   index.mjs / index.cjs        ESM and CommonJS, tfjs packages external
 *   types/                       TypeScript declarations
 *   tfjs-flash-attention.umd.js  (and .min.js) for script tags, AMD, CommonJS
 * Each further entry of ENTRIES (e.g. the layers) gets the same three.
 */
import {execFileSync} from 'node:child_process';
import {existsSync, mkdirSync, readFileSync, rmSync, writeFileSync} from 'node:fs';
import {dirname, join} from 'node:path';
import {fileURLToPath} from 'node:url';

import * as esbuild from 'esbuild';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const dist = join(root, 'dist');

/**
 * name: output base name; source: entry; umdGlobal: the global the UMD
 * build defines; patchTf: exports also set on the global `tf` by the UMD
 * build in a page.
 */
const ENTRIES = [
  {
    name: 'index',
    source: 'src/index.ts',
    umdName: 'tfjs-flash-attention',
    umdGlobal: 'tfFlashAttention'
  },
  // Node only (tfjs-node-gpu): no UMD; imports the core package by name
  // (external) so it registers into the same kernel registry.
  {
    name: 'tensorflow',
    source: 'kernels/tensorflow/index.ts',
    nodeOnly: true,
    external: ['tfjs-flash-attention']
  },
  // The layers import the core by package name and keep it external, so
  // that a process holds one core (one fused-kernel registry); in a page the
  // core is the main UMD bundle's global.
  {
    name: 'layers',
    source: 'src/layers/index.ts',
    umdName: 'tfjs-flash-attention-layers',
    umdGlobal: 'tfFlashAttentionLayers',
    external: ['tfjs-flash-attention'],
    umdGlobals: {'tfjs-flash-attention': 'tfFlashAttention'}
  },
].filter(e => existsSync(join(root, e.source)));

/** tfjs packages are peers: never bundled, and `tf` in a page. */
const EXTERNALS = [
  '@tensorflow/tfjs-core', '@tensorflow/tfjs-layers', '@tensorflow/tfjs-backend-webgpu',
  '@tensorflow/tfjs-node-gpu', '@tensorflow/tfjs-node', '@tensorflow/tfjs'
];

const common = {
  bundle: true,
  external: EXTERNALS,
  target: 'es2019',
  sourcemap: true,
  logLevel: 'warning',
  platform: 'neutral',
  mainFields: ['module', 'main']
};

/**
 * UMD: the CommonJS bundle wrapped so that `require` of a tfjs package
 * resolves to the loader's (CommonJS, AMD) or to the global `tf` (a script
 * tag after tfjs), where the ops are also added to `tf` itself.
 */
function umdWrap(cjsCode, globalName, entryExternals = [], umdGlobals = {}) {
  const deps = EXTERNALS.concat(entryExternals).filter(d => cjsCode.includes(`require("${d}")`));
  return `(function (global, factory) {
  if (typeof exports === 'object' && typeof module !== 'undefined') {
    factory(module, function (name) { return require(name); });
  } else if (typeof define === 'function' && define.amd) {
    define(['module', 'require'].concat(${JSON.stringify(deps)}), function (module, require) {
      factory(module, require);
      return module.exports;
    });
  } else {
    global = typeof globalThis !== 'undefined' ? globalThis : global || self;
    if (global.tf == null) {
      throw new Error('${globalName}: load TensorFlow.js (the global tf) before this script');
    }
    var globals = ${JSON.stringify(umdGlobals)};
    var target = {exports: {}};
    factory(target, function (name) {
      if (globals[name] == null) {
        return global.tf;
      }
      if (global[globals[name]] == null) {
        throw new Error('${
      globalName}: load ' + name + ' (the global ' + globals[name] + ') before this script');
      }
      return global[globals[name]];
    });
    global.${globalName} = target.exports;
    // tf.flashAttention etc. on the global tf (ops and layers only).
    Object.keys(target.exports).forEach(function (key) {
      if (/^(flashAttention|flashMHA|FlashMHA)/.test(key) && !(key in global.tf)) {
        global.tf[key] = target.exports[key];
      }
    });
    // tf.layers.flashMHA(...) beside tfjs's own layer factories (its
    // tf.layers is a plain object in the tfjs and tfjs-layers bundles).
    var layers = global.tf.layers;
    if (typeof target.exports.flashMHA === 'function' && layers != null &&
        Object.isExtensible(layers) && !('flashMHA' in layers)) {
      layers.flashMHA = target.exports.flashMHA;
    }
  }
})(this, function (module, require) {
  var exports = module.exports;
${cjsCode}
});
`;
}

async function build() {
  rmSync(dist, {recursive: true, force: true});
  mkdirSync(dist, {recursive: true});
  for (const entry of ENTRIES) {
    const entryPoints = [join(root, entry.source)];
    const entryCommon = {...common, external: EXTERNALS.concat(entry.external ?? [])};
    if (entry.nodeOnly) {
      const node = {...entryCommon, platform: 'node'};
      await esbuild.build(
          {...node, entryPoints, format: 'esm', outfile: join(dist, `${entry.name}.mjs`)});
      await esbuild.build(
          {...node, entryPoints, format: 'cjs', outfile: join(dist, `${entry.name}.cjs`)});
      continue;
    }
    await esbuild.build(
        {...entryCommon, entryPoints, format: 'esm', outfile: join(dist, `${entry.name}.mjs`)});
    await esbuild.build({
      ...entryCommon,
      entryPoints,
      format: 'cjs',
      platform: 'node',
      outfile: join(dist, `${entry.name}.cjs`)
    });
    for (const minify of [false, true]) {
      const result = await esbuild.build({
        ...entryCommon,
        entryPoints,
        format: 'cjs',
        minify,
        sourcemap: false,
        write: false,
        define: {'process.env.NODE_ENV': '"production"'}
      });
      const file = join(dist, `${entry.umdName}.umd${minify ? '.min' : ''}.js`);
      writeFileSync(
          file,
          umdWrap(result.outputFiles[0].text, entry.umdGlobal, entry.external, entry.umdGlobals));
    }
  }
  execFileSync(
      process.execPath,
      [join(root, 'node_modules/typescript/bin/tsc'), '-p', join(root, 'tsconfig.build.json')],
      {stdio: 'inherit'});
  const version = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).version;
  console.log(
      `built tfjs-flash-attention ${version}: ${ENTRIES.map(e => e.name).join(', ')} -> dist/`);
}

build().catch(error => {
  console.error(error);
  process.exit(1);
});
