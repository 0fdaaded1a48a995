/**
 * A tiny GPT trained some steps with everything fused (fused norms with the
 * residual adds, FlashMHA, fused cross-entropy, fusedAdam) on webgpu, and
 * the same model, weights and batches with every op's composed reference
 * (FLASH_ATTENTION_IMPL=reference, FUSED_ADAMW_IMPL=reference): the loss
 * curves agree within float32 tolerance at every step. No tensor leaks.
 */
import * as tf from '@tensorflow/tfjs-core';

import {buildGPT, GPTConfig, NormKind, sampleBatch, seededRandom, trainableVariables, trainStep} from '../demo/gpt';
import {FLASH_ATTENTION_IMPL, FUSED_ADAMW_IMPL, fusedAdam} from '../src';
import {flashMHA} from '../src/layers';

import {selectedBackends, useBackend} from './harness/backends';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

const CONFIG: GPTConfig = {
  vocabSize: 13,
  numLayers: 1,
  embedDim: 16,
  numHeads: 2
};
// 50 steps take minutes on SwiftShader: the test runs 12; the 50-step
// comparison is `node train_gpt.mjs --child=curve` (benchmarks/train_gpt.ts).
const STEPS = 8;

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
    const batch = sampleBatch(data, 2, 8, random);
    const batches = Array.from({length: STEPS}, () => batch);
    const initial = buildGPT(CONFIG, flashMHA, 'gpt', 'gpt');
    const curve = async (impl: 'auto'|'reference', norm: NormKind, steps: number) => {
      tf.env().set(FLASH_ATTENTION_IMPL, impl);
      tf.env().set(FUSED_ADAMW_IMPL, impl);
      const fused = norm === 'fused';
      const model = buildGPT(CONFIG, flashMHA, 'gpt', norm);
      model.setWeights(initial.getWeights());
      const optimizer = fused ? fusedAdam({learningRate: 1e-2}) : tf.train.adam(1e-2);
      const vars = trainableVariables(model);
      const losses: number[] = [];
      for (const {x, y} of batches.slice(0, steps)) {
        losses.push(await trainStep(
            model, optimizer, x, y, CONFIG.vocabSize, vars, fused ? 'fused' : 'composed'));
      }
      optimizer.dispose();
      model.dispose();
      return losses;
    };
    const fusedLosses = await curve('auto', 'fused', STEPS);
    const referenceLosses = await curve('reference', 'fused', STEPS);
    initial.dispose();
    tf.dispose([batch.x, batch.y]);
    expect(tf.memory().numTensors).toBe(before);
    // It learns (fits the repeated batch).
    expect(fusedLosses[STEPS - 1]).toBeLessThan(fusedLosses[0]);
    for (let i = 0; i < STEPS; i++) {
      expect(Math.abs(fusedLosses[i] - referenceLosses[i]))
          .toBeLessThan(1e-3 * Math.max(1, referenceLosses[i]));
    }
  });
});
