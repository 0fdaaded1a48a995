/**
 * A tiny GPT trained some steps with everything fused (fused norms with the
 * residual adds, FlashMHA, fused cross-entropy, fusedAdam) on webgpu, and
 * the same model, weights and batches with every op's composed reference
 * (FLASH_ATTENTION_IMPL=reference, FUSED_ADAMW_IMPL=reference), and the
 * model of stock-tfjs parts (the demo's composed LayerNorm, tfjs-layers'
 * gelu_new, tf.train.adam, composed cross-entropy): the loss curves agree
 * within float32 tolerance at every step. A fused step uploads only its
 * batch (inputs and targets) from the host. No tensor leaks. And geluNew's
 * hand-written gradient against the float64 derivative.
 */
import * as tf from '@tensorflow/tfjs-core';

import {buildGPT, GPTConfig, NormKind, sampleBatch, seededRandom, trainableVariables, trainStep} from '../demo/gpt';
import {FLASH_ATTENTION_IMPL, FUSED_ADAMW_IMPL, fusedAdam, fusedGeluOrNull} from '../src';
import {flashMHA} from '../src/layers';

import {webgpuCounters} from '../benchmarks/webgpu_counters';
import {geluNew} from '../demo/gpt';

import {selectedBackends, useBackend} from './harness/backends';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

const CONFIG: GPTConfig = {
  vocabSize: 13,
  numLayers: 1,
  embedDim: 16,
  numHeads: 2
};
// 50 steps take minutes on SwiftShader: the test runs 6 (three models); the 50-step
// comparison is `node train_gpt.mjs --child=curve` (benchmarks/train_gpt.ts).
const STEPS = 6;

describeWebGPU('a tiny GPT, all fused vs the composed reference [webgpu]', () => {
  beforeAll(() => useBackend('webgpu'));
  afterEach(() => {
    tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
    tf.env().set(FUSED_ADAMW_IMPL, 'auto');
  });

  it(`${STEPS} steps: the same loss curve`, async () => {
    const before = tf.memory().numTensors;
    const random = seededRandom(3);
    const data = Int32Array.from({length: 400}, () => Math.floor(random() * CONFIG.vocabSize));
    // One batch, repeated: fitting it must lower the loss at every run
    // (fresh random batches make the first-vs-last comparison a coin toss).
    const sampled = sampleBatch(data, 2, 8, random);
    const batch = {
      xs: sampled.x.dataSync(),
      ys: sampled.y.dataSync(),
      shape: sampled.x.shape as [number, number]
    };
    tf.dispose([sampled.x, sampled.y]);
    const initial = buildGPT(CONFIG, flashMHA, 'gpt', 'gpt');
    const uploads: Array<Record<string, number>> = [];
    const curve = async (impl: 'auto'|'reference', norm: NormKind, steps: number) => {
      tf.env().set(FLASH_ATTENTION_IMPL, impl);
      tf.env().set(FUSED_ADAMW_IMPL, impl);
      const fused = norm === 'fused';
      const model = buildGPT(CONFIG, flashMHA, 'gpt', norm);
      model.setWeights(initial.getWeights());
      const optimizer = fused ? fusedAdam({learningRate: 1e-2}) : tf.train.adam(1e-2);
      const vars = trainableVariables(model);
      const losses: number[] = [];
      const counters = webgpuCounters();
      for (let step = 0; step < steps; step++) {
        // The batch made from host values at each step, like new data.
        const x = tf.tensor2d(batch.xs, batch.shape, 'int32');
        const y = tf.tensor2d(batch.ys, batch.shape, 'int32');
        counters.reset();
        losses.push(await trainStep(
            model, optimizer, x, y, CONFIG.vocabSize, vars, fused ? 'fused' : 'composed'));
        if (impl === 'auto' && fused) {
          uploads.push(Object.fromEntries(counters.snapshot().uploadShapes));
        }
        tf.dispose([x, y]);
      }
      optimizer.dispose();
      model.dispose();
      return losses;
    };
    const fusedLosses = await curve('auto', 'fused', STEPS);
    const referenceLosses = await curve('reference', 'fused', STEPS);
    const stockLosses = await curve('reference', 'gpt', STEPS);
    initial.dispose();
    expect(tf.memory().numTensors).toBe(before);
    // It learns (fits the repeated batch).
    expect(fusedLosses[STEPS - 1]).toBeLessThan(fusedLosses[0]);
    for (let i = 0; i < STEPS; i++) {
      expect(Math.abs(fusedLosses[i] - referenceLosses[i]))
          .toBeLessThan(1e-3 * Math.max(1, referenceLosses[i]));
      expect(Math.abs(fusedLosses[i] - stockLosses[i]))
          .toBeLessThan(1e-3 * Math.max(1, stockLosses[i]));
    }
    // Every fused step after the first (which builds the optimizer's state)
    // uploads exactly its batch: inputs and targets, int32 [2, 8].
    expect(uploads.slice(1)).toEqual(Array(STEPS - 1).fill({'int32[2,8]': 2}));
  });
});

const GELU_BACKENDS = selectedBackends().includes('webgpu') ? ['cpu', 'webgpu'] : ['cpu'];

describe.each(GELU_BACKENDS)('geluNew [%s]', backend => {
  beforeAll(() => useBackend(backend as 'cpu' | 'webgpu'));

  it('value and gradient match the float64 tanh GELU', async () => {
    const before = tf.memory().numTensors;
    const random = seededRandom(21);
    // Large |x| too: the fused kernel's exp must not overflow into NaN.
    const values = [...Array.from({length: 64}, () => (random() - 0.5) * 8), -60, 60];
    const dyValues = values.map(() => random() - 0.5);
    const x = tf.tensor1d(values);
    const dy = tf.tensor1d(dyValues);
    // On webgpu the forward is the FusedGelu kernel (one pass), not composed.
    const fused = fusedGeluOrNull(x);
    expect(fused == null).toBe(backend !== 'webgpu');
    fused?.dispose();
    const [y, dx] = tf.tidy(() => {
      const {value, grad} = tf.valueAndGrad(geluNew)(x, dy);
      return [value, grad];
    });
    const k = Math.sqrt(2 / Math.PI);
    const a = 0.044715;
    const expectedY = values.map(v => 0.5 * v * (1 + Math.tanh(k * (v + a * v ** 3))));
    const expectedDx = values.map((v, i) => {
      const t = Math.tanh(k * (v + a * v ** 3));
      return dyValues[i] * (0.5 * (1 + t) + 0.5 * v * (1 - t * t) * k * (1 + 3 * a * v * v));
    });
    // Bounds relative to the largest value of the 64 ordinary inputs.
    const check =
        (actual: Float32Array|Int32Array|Uint8Array, expected: number[], bound: number) => {
          const scale = Math.max(...expected.slice(0, 64).map(Math.abs));
          expected.forEach(
              (e, i) => expect(Math.abs(actual[i] - e)).toBeLessThanOrEqual(bound * scale));
        };
    check(await y.data(), expectedY, 1e-4);
    check(await dx.data(), expectedDx, 5e-4);
    tf.dispose([x, dy, y, dx]);
    expect(tf.memory().numTensors).toBe(before);
  });
});
