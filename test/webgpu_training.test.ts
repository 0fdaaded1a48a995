/**
 * Training end to end on webgpu: a tiny attention block (q/k/v/output
 * projections around flashAttention, GQA, causal, dropout) trained with
 * Adam for some steps with the fused kernels and with the composed
 * reference, from the same initial weights and data: the loss curves agree
 * within 1e-3 at every step.
 */
import * as tf from '@tensorflow/tfjs-core';

import {FLASH_ATTENTION_IMPL, FlashAttention, flashAttention, hasFusedKernel} from '../src';
import {fusedGradRunCount, registerFlashAttentionGradWebGPU} from '../kernels/webgpu/FlashAttentionGrad';

import {selectedBackends, useBackend} from './harness/backends';
import {freshRng, randomArray, Rng} from './harness/problems';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

const BATCH = 2;
const SEQ = 24;
const EMBED = 32;
const HEADS = 4;
const HEADS_KV = 2;
const HEAD_DIM = 8;
const STEPS = 8;

interface Weights {
  wq: Float32Array;
  wk: Float32Array;
  wv: Float32Array;
  wo: Float32Array;
}

function initialWeights(rng: Rng): Weights {
  const init = (rows: number, cols: number) =>
      Float32Array.from(randomArray(rows * cols, rng, 1 / Math.sqrt(rows)));
  return {
    wq: init(EMBED, HEADS * HEAD_DIM),
    wk: init(EMBED, HEADS_KV * HEAD_DIM),
    wv: init(EMBED, HEADS_KV * HEAD_DIM),
    wo: init(HEADS * HEAD_DIM, EMBED),
  };
}

/** Loss after each of STEPS Adam steps under one FLASH_ATTENTION_IMPL. */
async function train(
    impl: string, weights: Weights, x: tf.Tensor3D, target: tf.Tensor3D): Promise<number[]> {
  tf.env().set(FLASH_ATTENTION_IMPL, impl);
  const wq = tf.tidy(() => tf.variable(tf.tensor2d(weights.wq, [EMBED, HEADS * HEAD_DIM])));
  const wk = tf.tidy(() => tf.variable(tf.tensor2d(weights.wk, [EMBED, HEADS_KV * HEAD_DIM])));
  const wv = tf.tidy(() => tf.variable(tf.tensor2d(weights.wv, [EMBED, HEADS_KV * HEAD_DIM])));
  const wo = tf.tidy(() => tf.variable(tf.tensor2d(weights.wo, [HEADS * HEAD_DIM, EMBED])));
  const optimizer = tf.train.adam(0.01);
  const losses: number[] = [];
  const project = (w: tf.Tensor2D, heads: number) =>
      tf.reshape(
          tf.matMul(tf.reshape(x, [BATCH * SEQ, EMBED]), w), [BATCH, SEQ, heads, HEAD_DIM]) as
      tf.Tensor4D;
  for (let step = 0; step < STEPS; step++) {
    const loss = optimizer.minimize(() => {
      const attended = flashAttention(
          project(wq, HEADS), project(wk, HEADS_KV), project(wv, HEADS_KV),
          {causal: true, dropoutRate: 0.1, seed: 1000 + step});
      const y = tf.matMul(tf.reshape(attended, [BATCH * SEQ, HEADS * HEAD_DIM]), wo);
      return tf.mean(tf.square(tf.sub(tf.reshape(y, [BATCH, SEQ, EMBED]), target)));
    }, true) as tf.Scalar;
    losses.push((await loss.data())[0]);
    loss.dispose();
  }
  optimizer.dispose();
  tf.dispose([wq, wk, wv, wo]);
  return losses;
}

describeWebGPU('training with the fused WebGPU kernels [webgpu]', () => {
  beforeAll(async () => {
    await useBackend('webgpu');
    registerFlashAttentionGradWebGPU();
  });
  afterAll(() => tf.env().set(FLASH_ATTENTION_IMPL, 'auto'));

  it('follows the reference loss curve within 1e-3 at every step', async () => {
    const rng = freshRng();
    const weights = initialWeights(rng);
    const x =
        tf.tensor3d(Float32Array.from(randomArray(BATCH * SEQ * EMBED, rng)), [BATCH, SEQ, EMBED]);
    const target =
        tf.tensor3d(Float32Array.from(randomArray(BATCH * SEQ * EMBED, rng)), [BATCH, SEQ, EMBED]);
    const tensorsBefore = tf.memory().numTensors;
    const reference = await train('reference', weights, x, target);
    const afterReference = tf.memory().numTensors;
    const gradRunsBefore = fusedGradRunCount();
    // The fused forward too once it is registered; else the reference
    // forward with the fused backward behind it.
    const fusedImpl = hasFusedKernel(FlashAttention, 'webgpu') ? 'fused' : 'auto';
    const fused = await train(fusedImpl, weights, x, target);
    expect(fusedGradRunCount() - gradRunsBefore).toBe(STEPS);
    expect([afterReference, tf.memory().numTensors]).toEqual([tensorsBefore, tensorsBefore]);
    tf.dispose([x, target]);
    for (let step = 0; step < STEPS; step++) {
      const diff = Math.abs(fused[step] - reference[step]);
      if (!(diff <= 1e-3 * Math.max(1, Math.abs(reference[step])))) {
        throw new Error(`step ${step} (seed ${rng.seed}): fused loss ${fused[step]}, reference ${
            reference[step]}; curves ${JSON.stringify(fused)} vs ${JSON.stringify(reference)}`);
      }
    }
    // The model learns: the loss goes down.
    expect(reference[STEPS - 1]).toBeLessThan(reference[0]);
  });
});
