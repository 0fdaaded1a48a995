/**
 * The built `tfjs-flash-attention/layers` entry (dist/layers.*, made by
 * `npm run build`, which `npm test` runs first): it loads from CommonJS,
 * ES modules and script tags, computes what the sources compute, and uses
 * the core package's module (one fused-kernel registry per process) rather
 * than a copy of its own.
 */
import {execFileSync} from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import * as vm from 'vm';

import * as tf from '@tensorflow/tfjs-core';

import {flashMHA} from '../../src/layers';
import {useBackend} from '../harness/backends';
import {loadScript, TFJS_UMD_SCRIPTS, umdPageContext} from '../harness/umd_page';

const root = path.join(__dirname, '..', '..');
const dist = (file: string) => path.join(root, 'dist', file);

/** A fixed layer and input, so that other processes can rebuild them. */
const ARGS = {
  embedDim: 8,
  numHeads: 2,
  numHeadsKV: 1,
  causal: true,
  rotaryEmbDim: 4
};
const X_SHAPE = [2, 5, 8];
const X = Array.from({length: 80}, (_, i) => Math.sin(i * 0.37));
/** The weights as flat arrays, in the layer's order (qkv kernel/bias, out kernel/bias). */
const WEIGHT_SHAPES = [[8, 16], [16], [8, 8], [8]];
const WEIGHTS = WEIGHT_SHAPES.map(
    (shape, w) => Array.from(
        {length: shape.reduce((a, b) => a * b, 1)}, (_, i) => Math.cos(i * 0.91 + w) * 0.3));

/**
 * Source run in another process (as CommonJS or ESM): checks that the
 * layers entry resolves the same core module as the caller, by
 * registering a stand-in fused kernel through the core and seeing the
 * layer use it, then prints the layer's real output.
 */
function nodeScript(load: string): string {
  return `${load}
    await tf.setBackend('cpu');
    const layer = layers.flashMHA(${JSON.stringify(ARGS)});
    const x = tf.tensor(${JSON.stringify(X)}, ${JSON.stringify(X_SHAPE)});
    layer.apply(x).dispose();
    layer.setWeights(${JSON.stringify(WEIGHTS)}.map((w, i) => tf.tensor(w, ${
      JSON.stringify(WEIGHT_SHAPES)}[i])));
    const real = Array.from(await layer.apply(x).data());
    // A stand-in fused kernel registered through the core entry.
    let calls = 0;
    core.registerFusedKernel({kernelName: core.FlashAttention, backendName: 'cpu', kernelFunc: ({inputs, backend}) => {
      calls++;
      const [b, s, h, d] = inputs.q.shape;
      return [backend.makeTensorInfo([b, s, h, d], 'float32', new Float32Array(b * s * h * d)),
              backend.makeTensorInfo([b, h, s], 'float32', new Float32Array(b * h * s))];
    }});
    const standIn = Array.from(await layer.apply(x).data());
    console.log(JSON.stringify({real, calls, standInIsBias: standIn.every((v, i) => v === ${
      JSON.stringify(
          WEIGHTS[3])}[i % 8] || Math.abs(v - ${JSON.stringify(WEIGHTS[3])}[i % 8]) < 1e-6)}));`;
}

function runNode(args: string[]): {real: number[], calls: number, standInIsBias: boolean} {
  const output = execFileSync(process.execPath, args, {cwd: root, encoding: 'utf8'});
  return JSON.parse(output.trim().split('\n').pop()!);
}

describe('built layers entry', () => {
  let expected: number[];
  beforeAll(async () => {
    for (const file
             of ['layers.cjs', 'layers.mjs', 'tfjs-flash-attention-layers.umd.js',
                 'tfjs-flash-attention-layers.umd.min.js', 'types/src/layers/index.d.ts']) {
      if (!fs.existsSync(dist(file))) {
        throw new Error(`dist/${file} is missing: run \`npm run build\` (npm test does)`);
      }
    }
    await useBackend('cpu');
    const layer = flashMHA(ARGS);
    const x = tf.tensor(X, X_SHAPE);
    tf.dispose(layer.apply(x) as tf.Tensor);
    layer.setWeights(WEIGHTS.map((w, i) => tf.tensor(w, WEIGHT_SHAPES[i])));
    const out = layer.apply(x) as tf.Tensor;
    expected = Array.from(await out.data());
    tf.dispose([x, out]);
    layer.dispose();
  });

  it('does not bundle the core: it imports tfjs-flash-attention', () => {
    const cjs = fs.readFileSync(dist('layers.cjs'), 'utf8');
    const esm = fs.readFileSync(dist('layers.mjs'), 'utf8');
    expect(cjs).toContain('require("tfjs-flash-attention")');
    expect(esm).toMatch(/from "tfjs-flash-attention"/);
    // The core's registry and Philox code live only in the core bundle.
    for (const code of [cjs, esm]) {
      expect(code).not.toMatch(/function registerFusedKernel|function philox4x32/);
    }
  });

  it('CommonJS: require(\'tfjs-flash-attention/layers\') shares the core\'s registry', () => {
    const result = runNode([
      '-e',
      `(async () => {${
          nodeScript(`
      const tf = require('@tensorflow/tfjs-core');
      require('@tensorflow/tfjs-backend-cpu');
      require('@tensorflow/tfjs-layers');
      const core = require('tfjs-flash-attention');
      const layers = require('tfjs-flash-attention/layers');
      if (require.resolve('tfjs-flash-attention/layers') !== ${
              JSON.stringify(dist('layers.cjs'))}) throw new Error('not dist');`)}})()`
    ]);
    expect(result.real).toEqual(expected);
    expect(result.calls).toBeGreaterThan(0);
    expect(result.standInIsBias).toBe(true);
  });

  it('ES modules: import from \'tfjs-flash-attention/layers\' shares the core\'s registry', () => {
    const result = runNode([
      '--input-type=module', '-e',
      nodeScript(`
      import * as tf from '@tensorflow/tfjs-core';
      import '@tensorflow/tfjs-backend-cpu';
      import '@tensorflow/tfjs-layers';
      import * as core from 'tfjs-flash-attention';
      import * as layers from 'tfjs-flash-attention/layers';
      if (import.meta.resolve('tfjs-flash-attention/layers') !== ${
          JSON.stringify('file://' + dist('layers.mjs'))}) throw new Error('not dist');`)
    ]);
    expect(result.real).toEqual(expected);
    expect(result.calls).toBeGreaterThan(0);
    expect(result.standInIsBias).toBe(true);
  });

  /**
   * On a page with tfjs's bundles, the core bundle and the layers bundle:
   * a layer from `factory` (the JavaScript naming it) applied to X
   * with WEIGHTS, then `[its output, ...the values of the expressions
   * `checks`]`.
   */
  function umdLayerRun(factory: string, checks: string): unknown[] {
    const context = umdPageContext();
    for (const file
             of [...TFJS_UMD_SCRIPTS, dist('tfjs-flash-attention.umd.min.js'),
                 dist('tfjs-flash-attention-layers.umd.min.js')]) {
      loadScript(context, file);
    }
    return vm.runInContext(
        `
      tf.setBackend('cpu');
      const layer = ${factory}(${JSON.stringify(ARGS)});
      const x = tf.tensor(${JSON.stringify(X)}, ${JSON.stringify(X_SHAPE)});
      layer.apply(x);
      layer.setWeights(${JSON.stringify(WEIGHTS)}.map((w, i) => tf.tensor(w, ${
            JSON.stringify(WEIGHT_SHAPES)}[i])));
      [Array.from(layer.apply(x).dataSync()), ${checks}];`,
        context);
  }

  it('UMD: after the core bundle, adds tf.flashMHA and uses the core bundle\'s global', () => {
    const result = umdLayerRun(
        'tf.flashMHA', 'layer instanceof tf.layers.Layer, typeof tfFlashAttentionLayers.FlashMHA');
    expect(result[0]).toEqual(expected);
    expect(result[1]).toBe(true);
    expect(result[2]).toBe('function');
  });

  it('UMD: puts the flashMHA factory on tf.layers too, as tfjs does its layers', () => {
    const result = umdLayerRun(
        'tf.layers.flashMHA',
        'layer instanceof tfFlashAttentionLayers.FlashMHA, tf.layers.flashMHA === tf.flashMHA, ' +
            'typeof tf.layers.dense');
    expect(result[0]).toEqual(expected);
    expect(result[1]).toBe(true);
    expect(result[2]).toBe(true);
    expect(result[3]).toBe('function');
  });

  it('UMD: without the core bundle, says to load it first', () => {
    const context = umdPageContext();
    TFJS_UMD_SCRIPTS.forEach(file => loadScript(context, file));
    expect(() => loadScript(context, dist('tfjs-flash-attention-layers.umd.js')))
        .toThrow(/load tfjs-flash-attention \(the global tfFlashAttention\) before this script/);
  });
});
