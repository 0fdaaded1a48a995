/**
 * The demo's pieces (demo/gpt.ts, demo/plot.ts, demo/run.ts) and the
 * composed-attention twin of FlashMHA (benchmarks/composed_mha.ts), with
 * tiny configs on the cpu backend.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import * as tf from '@tensorflow/tfjs-core';

import {composedMHA} from '../../benchmarks/composed_mha';
import {buildGPT, CharTokenizer, generate, layerNorm, median, sampleBatch, seededRandom, trainStep} from '../../demo/gpt';
import {lineChartSvg} from '../../demo/plot';
import {runDemo} from '../../demo/run';
import {flashMHA} from '../../src/layers';
import {useBackend} from '../harness/backends';
import {expectClose, FORWARD_BOUND} from '../harness/problems';

describe('demo pieces [cpu]', () => {
  beforeAll(() => useBackend('cpu'));

  it('CharTokenizer round-trips and sampleBatch gives next-character targets', async () => {
    const text = 'hello, world: a tiny corpus of characters';
    const tokenizer = new CharTokenizer(text);
    expect(tokenizer.decode(tokenizer.encode(text))).toBe(text);
    expect(() => tokenizer.encode('Z')).toThrow(/"Z" is not in the vocabulary/);
    const data = tokenizer.encode(text);
    const {x, y} = sampleBatch(data, 3, 8, seededRandom(5));
    const [xs, ys] = [await x.array(), await y.array()];
    for (let b = 0; b < 3; b++) {
      const window = tokenizer.decode(xs[b]);
      const next = tokenizer.decode(ys[b]);
      expect(text).toContain(window + next.slice(-1));
      expect(next.slice(0, -1)).toBe(window.slice(1));
    }
    tf.dispose([x, y]);
    expect(median([3, 1, 2, 10])).toBe(2.5);
  });

  it('layerNorm and its written-out gradient match a float64 oracle (central differences)',
     async () => {
       const [rows, dim, eps] = [6, 8, 1e-5];
       const random = seededRandom(Date.now() % 100000);
       const normal = () =>
           Math.sqrt(-2 * Math.log(random() + 1e-12)) * Math.cos(2 * Math.PI * random());
       const fresh = (n: number, scale = 1, offset = 0) =>
           Array.from({length: n}, () => offset + scale * normal());
       const xs = fresh(rows * dim, 2, 0.5);
       const gs = fresh(dim, 0.5, 1);
       const bs = fresh(dim);
       const dys = fresh(rows * dim);
       // Float64 forward, and the loss sum(dy * y) whose gradients are checked.
       const forward = (x: number[], g: number[], b: number[]) => {
         const y: number[] = [];
         for (let r = 0; r < rows; r++) {
           const row = x.slice(r * dim, (r + 1) * dim);
           const mean = row.reduce((a, v) => a + v, 0) / dim;
           const variance = row.reduce((a, v) => a + (v - mean) ** 2, 0) / dim;
           row.forEach((v, i) => y.push((v - mean) / Math.sqrt(variance + eps) * g[i] + b[i]));
         }
         return y;
       };
       const loss = (x: number[], g: number[], b: number[]) =>
           forward(x, g, b).reduce((a, v, i) => a + v * dys[i], 0);
       const numeric = (which: 0|1|2) => {
         const args = [xs, gs, bs];
         return args[which].map((_, i) => {
           const h = 1e-6;
           const plus = args.map(a => a.slice());
           const minus = args.map(a => a.slice());
           plus[which][i] += h;
           minus[which][i] -= h;
           return (loss(plus[0], plus[1], plus[2]) - loss(minus[0], minus[1], minus[2])) / (2 * h);
         });
       };
       const x = tf.tensor3d(xs, [2, rows / 2, dim]);
       const g = tf.tensor1d(gs);
       const b = tf.tensor1d(bs);
       const dy = tf.tensor3d(dys, [2, rows / 2, dim]);
       const before = tf.memory().numTensors;
       const y = layerNorm(x, g, b, eps);
       const grads = tf.grads(
           (a: tf.Tensor, c: tf.Tensor, d: tf.Tensor) =>
               tf.sum(tf.mul(layerNorm(a, c, d, eps), dy)))([x, g, b]);
       expectClose(await y.data(), forward(xs, gs, bs), FORWARD_BOUND, 'layerNorm forward');
       for (const which of [0, 1, 2] as const) {
         expectClose(
             await grads[which].data(), numeric(which), 5e-4,
             `layerNorm gradient ${['x', 'gamma', 'beta'][which]}`);
       }
       tf.dispose([y, ...grads]);
       expect(tf.memory().numTensors).toBe(before);
       tf.dispose([x, g, b, dy]);
     });

  it('ComposedMHA with the same weights computes what FlashMHA does (also with GQA and a mask)',
     async () => {
       for (const args
                of [{embedDim: 16, numHeads: 4, causal: true, rotaryEmbDim: 4},
                    {embedDim: 16, numHeads: 4, numHeadsKV: 1, causal: true}]) {
         const flash = flashMHA(args);
         const composed = composedMHA(args);
         const x = tf.randomNormal([2, 6, 16]);
         const mask = tf.tensor2d([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], [2, 6], 'bool');
         tf.dispose([flash.apply(x) as tf.Tensor, composed.apply(x) as tf.Tensor]);
         composed.setWeights(flash.getWeights());
         for (const kwargs of [{}, {keyPaddingMask: mask}]) {
           const [a, b] = [flash, composed].map(l => l.apply(x, kwargs) as tf.Tensor);
           expectClose(
               await b.data(), await a.data(), FORWARD_BOUND,
               `composed vs flash ${JSON.stringify(args)}`);
           tf.dispose([a, b]);
         }
         tf.dispose([x, mask]);
       }
     });

  it('the GPT trains with either attention, same weights giving the same loss, leak-free per step',
     async () => {
       const config = {vocabSize: 11, numLayers: 2, embedDim: 16, numHeads: 2};
       const flash = buildGPT(config, flashMHA, 'gpt');
       const composed = buildGPT(config, composedMHA, 'gpt');
       composed.setWeights(flash.getWeights());
       const random = seededRandom(3);
       const data =
           Int32Array.from({length: 200}, (_, i) => (i * 7 + Math.floor(random() * 2)) % 11);
       const optimizers = [tf.train.adam(0.01), tf.train.adam(0.01)];
       const losses: number[][] = [[], []];
       let tensorsAfterFirst = 0;
       for (let step = 0; step < 3; step++) {
         const {x, y} = sampleBatch(data, 2, 12, random);
         for (const [i, model] of [flash, composed].entries()) {
           losses[i].push(await trainStep(model, optimizers[i], x, y, config.vocabSize));
         }
         tf.dispose([x, y]);
         if (step === 0) {
           tensorsAfterFirst = tf.memory().numTensors;
         }
       }
       expect(tf.memory().numTensors).toBe(tensorsAfterFirst);
       losses.flat().forEach(l => expect(Number.isFinite(l)).toBe(true));
       losses[0].forEach((l, i) => expect(Math.abs(l - losses[1][i])).toBeLessThan(1e-4));
       const tokenizer = new CharTokenizer('abcdefghijk');
       const sample = await generate(flash, tokenizer, 'abc', 5, 12, random);
       expect(sample).toHaveLength(8);
       expect(sample.startsWith('abc')).toBe(true);
       optimizers.forEach(o => o.dispose());
       flash.dispose();
       composed.dispose();
     });

  it('lineChartSvg draws every series', () => {
    const svg = lineChartSvg('t <1>', 'x', 'y', [
      {name: 'a', points: [[1, 3], [2, 2], [3, 1]], color: 'red'},
      {name: 'b & c', points: [[2, 2.5], [3, NaN], [4, 2]], color: 'blue'},
    ]);
    expect(svg.startsWith('<svg')).toBe(true);
    expect(svg).toContain('t &lt;1&gt;');
    expect(svg).toContain('b &amp; c');
    const paths = [...svg.matchAll(/<path d="([^"]*)"/g)].map(m => m[1].split(' ').length);
    expect(paths).toEqual([3, 2]);
    expect(() => lineChartSvg('t', 'x', 'y', [{name: 'a', points: [], color: 'red'}]))
        .toThrow(/no finite points/);
  });

  it('runDemo runs end to end with a tiny config and writes the plot and the sample', async () => {
    const outDir = fs.mkdtempSync(path.join(os.tmpdir(), 'demo-'));
    const printed: string[] = [];
    const before = tf.memory().numTensors;
    const result = await runDemo({
      backend: 'cpu',
      outDir,
      tty: false,
      write: s => printed.push(s),
      config: {
        numLayers: 1,
        embedDim: 16,
        numHeads: 2,
        seqLen: 16,
        batch: 2,
        steps: 6,
        compareSteps: 2,
        sampleLength: 12
      },
    });
    expect(tf.memory().numTensors).toBe(before);
    expect(result.backend.name).toBe('cpu');
    expect(result.losses).toHaveLength(6);
    expect(Number.isFinite(result.speedup) && result.speedup > 0).toBe(true);
    expect(Math.abs(result.compareLoss.flash - result.compareLoss.composed)).toBeLessThan(1e-3);
    expect(result.sample).toHaveLength('Alice '.length + 12);
    expect(fs.readFileSync(result.files.svg, 'utf8')).toContain('<svg');
    expect(fs.readFileSync(result.files.sample, 'utf8')).toBe(result.sample + '\n');
    const log = printed.join('');
    expect(log).toMatch(/step 6\/6 +loss \d+\.\d+ +\d+ tokens\/s/);
    expect(log).toMatch(/speed-up over stock tfjs \d+\.\d+x on cpu/);
    // Generation with the KV caches ends the demo; same seed, same text.
    expect(log).toMatch(/generation: [\d.]+ tokens\/s with the KV cache, [\d.]+ tokens\/s without/);
    expect(result.generation.text).toHaveLength(16);
    expect(result.generation.sameText).toBe(true);
    fs.rmSync(outDir, {recursive: true, force: true});
  });
});
