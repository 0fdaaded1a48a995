/**
 * The built package (dist/, made by `npm run build`, which `npm test` runs
 * first): the CommonJS, ES-module and UMD builds load and compute the same
 * result as the sources.
 */
import {execFileSync} from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import * as vm from 'vm';

import * as tf from '@tensorflow/tfjs-core';

import * as src from '../src';

import {useBackend} from './harness/backends';
import {loadScript, umdPageContext} from './harness/umd_page';

const root = path.join(__dirname, '..');
const dist = (file: string) => path.join(root, 'dist', file);

/** A fixed small problem, so the builds can be compared in other processes. */
const SHAPE = [1, 5, 2, 4];
const VALUES = Array.from({length: 40}, (_, i) => Math.sin(i * 1.7));

describe('built package', () => {
  let expected: number[];
  beforeAll(async () => {
    for (const file
             of ['index.cjs', 'index.mjs', 'tfjs-flash-attention.umd.js',
                 'tfjs-flash-attention.umd.min.js', 'types/src/index.d.ts']) {
      if (!fs.existsSync(dist(file))) {
        throw new Error(`dist/${file} is missing: run \`npm run build\` (npm test does)`);
      }
    }
    await useBackend('cpu');
    const x = tf.tensor4d(VALUES, SHAPE as [number, number, number, number]);
    const out = src.flashAttention(x, x, x, {causal: true});
    expected = Array.from(await out.data());
    tf.dispose([x, out]);
  });

  it('CommonJS build exports the ops and shares the caller\'s tfjs-core', async () => {
    const cjs = require(dist('index.cjs'));
    expect(cjs.version).toBe(require('../package.json').version);
    const x = tf.tensor4d(VALUES, SHAPE as [number, number, number, number]);
    const out = cjs.flashAttention(x, x, x, {causal: true}) as tf.Tensor;
    expect(Array.from(await out.data())).toEqual(expected);
    tf.dispose([x, out]);
  });

  it('ES-module build runs under Node\'s own ESM loader', () => {
    const script = `
      import * as tf from '@tensorflow/tfjs-core';
      import '@tensorflow/tfjs-backend-cpu';
      import {flashAttention} from ${JSON.stringify(dist('index.mjs'))};
      await tf.setBackend('cpu');
      const x = tf.tensor4d(${JSON.stringify(VALUES)}, ${JSON.stringify(SHAPE)});
      const out = flashAttention(x, x, x, {causal: true});
      console.log(JSON.stringify(Array.from(await out.data())));`;
    const output = execFileSync(
        process.execPath, ['--input-type=module', '-e', script], {cwd: root, encoding: 'utf8'});
    const values = JSON.parse(output.trim().split('\n').pop()!);
    expect(values).toEqual(expected);
  });

  it('UMD build adds tf.flashAttention to the global tf of a page', () => {
    // A page-like global scope: tfjs's own UMD bundles, then ours.
    const context = umdPageContext();
    for (const file
             of [require.resolve('@tensorflow/tfjs-core/dist/tf-core.js'),
                 require.resolve('@tensorflow/tfjs-backend-cpu/dist/tf-backend-cpu.js'),
                 dist('tfjs-flash-attention.umd.min.js'),
    ]) {
      loadScript(context, file);
    }
    const values = vm.runInContext(
        `
      tf.setBackend('cpu');
      const x = tf.tensor4d(${JSON.stringify(VALUES)}, ${JSON.stringify(SHAPE)});
      const packed = tf.stack([x, x, x], 2);
      const out = tf.flashAttention(x, x, x, {causal: true});
      const outPacked = tf.flashAttentionQKVPacked(packed, {causal: true});
      [Array.from(out.dataSync()), Array.from(outPacked.dataSync()),
       typeof tfFlashAttention.flashAttentionKVPacked];`,
        context);
    expect(values[0]).toEqual(expected);
    expect(values[1]).toEqual(expected);
    expect(values[2]).toBe('function');
  });
});
