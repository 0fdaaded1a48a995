/**
 * Drop-in: tfjs-layers' own MultiHeadAttention (loaded by
 * test/harness/keras_mha.ts) and a FlashMHA given its weights by
 * loadMultiHeadAttentionWeights compute the same output, causal and not,
 * self- and cross-attention, from the layer or from Keras-ordered tensors.
 */
import * as tf from '@tensorflow/tfjs-core';

import {FlashMHA, flashMHA, loadMultiHeadAttentionWeights, MULTI_HEAD_ATTENTION_WEIGHT_NAMES} from '../../src/layers';
import {describeBackends} from '../harness/backends';
import {disposeKerasMHA, kerasMHAVariables, kerasMultiHeadAttention} from '../harness/keras_mha';
import {expectClose, FORWARD_BOUND, freshRng, randomArray, Rng} from '../harness/problems';

function randomTensor(shape: number[], rng: Rng, scale = 1): tf.Tensor {
  return tf.tensor(
      Float32Array.from(randomArray(shape.reduce((a, b) => a * b, 1), rng, scale)), shape);
}

describeBackends('FlashMHA drop-in for tfjs-layers MultiHeadAttention', () => {
  let rng: Rng;
  beforeEach(() => {
    rng = freshRng();
  });

  for (const causal of [false, true]) {
    it(`self-attention, causal ${causal}: same output from the layer's weights`, async () => {
      const [batch, seq, e, heads, keyDim] = [2, 9, 24, 3, 8];
      const mha = kerasMultiHeadAttention({numHeads: heads, keyDim});
      const x = randomTensor([batch, seq, e], rng);
      tf.dispose(mha.call(x, {value: x}) as tf.Tensor);  // builds it
      // Random biases too (Keras initialises them to zeros).
      for (const [name, variable] of kerasMHAVariables(mha)) {
        if (name.endsWith('bias')) {
          variable.write(randomTensor(variable.shape as number[], rng, 0.5));
        }
      }
      const flash = flashMHA({embedDim: e, numHeads: heads, headDim: keyDim, causal});
      loadMultiHeadAttentionWeights(flash, mha as never);
      const expected = mha.call(x, {value: x, useCausalMask: causal}) as tf.Tensor;
      const before = tf.memory().numTensors;
      const actual = flash.apply(x) as tf.Tensor;
      expect(tf.memory().numTensors).toBe(before + 1);
      expectClose(
          await actual.data(), await expected.data(), FORWARD_BOUND,
          `drop-in causal=${causal} (seed ${rng.seed})`);
      tf.dispose([x, expected, actual]);
      disposeKerasMHA(mha);
      flash.dispose();
    });
  }

  it('cross-attention from Keras-ordered tensors (get_weights order), causal', async () => {
    const [batch, seqQ, seqK, e, eKV, heads, keyDim] = [2, 5, 7, 16, 12, 2, 8];
    const weights = [
      randomTensor([e, heads, keyDim], rng, 0.3),
      randomTensor([heads, keyDim], rng, 0.3),
      randomTensor([eKV, heads, keyDim], rng, 0.3),
      randomTensor([heads, keyDim], rng, 0.3),
      randomTensor([eKV, heads, keyDim], rng, 0.3),
      randomTensor([heads, keyDim], rng, 0.3),
      randomTensor([heads, keyDim, e], rng, 0.3),
      randomTensor([e], rng, 0.3),
    ];
    const mha = kerasMultiHeadAttention({numHeads: heads, keyDim});
    const x = randomTensor([batch, seqQ, e], rng);
    const y = randomTensor([batch, seqK, eKV], rng);
    tf.dispose(mha.call(x, {value: y}) as tf.Tensor);
    const variables = kerasMHAVariables(mha);
    MULTI_HEAD_ATTENTION_WEIGHT_NAMES.forEach((name, i) => variables.get(name)!.write(weights[i]));
    const flash = flashMHA(
        {embedDim: e, numHeads: heads, headDim: keyDim, crossAttention: true, causal: true});
    loadMultiHeadAttentionWeights(flash, weights);
    // tfjs's causal mask is top-left aligned (a lower triangle of [Sq, Sk]);
    // flashAttention's is bottom-right: compare on Sq == Sk for causal ...
    const expectedFull = mha.call(x, {value: y}) as tf.Tensor;
    const flashFull =
        flashMHA({embedDim: e, numHeads: heads, headDim: keyDim, crossAttention: true});
    loadMultiHeadAttentionWeights(flashFull, weights);
    const actualFull = flashFull.apply([x, y]) as tf.Tensor;
    expectClose(
        await actualFull.data(), await expectedFull.data(), FORWARD_BOUND,
        `cross (seed ${rng.seed})`);
    // ... and for Sq != Sk check that bottom-right alignment is what differs:
    // keys 0..(i + Sk - Sq) for query i equal a key mask on tfjs's side.
    const rows = Array.from(
        {length: seqQ}, (_, i) => Array.from({length: seqK}, (_, j) => j <= i + seqK - seqQ));
    const attentionMask = tf.tensor3d(Array(batch).fill(rows), [batch, seqQ, seqK], 'bool');
    const expectedCausal = mha.call(x, {value: y, attentionMask}) as tf.Tensor;
    const actualCausal = flash.apply([x, y]) as tf.Tensor;
    expectClose(
        await actualCausal.data(), await expectedCausal.data(), FORWARD_BOUND,
        `cross causal (seed ${rng.seed})`);
    tf.dispose(
        [...weights, x, y, expectedFull, actualFull, attentionMask, expectedCausal, actualCausal]);
    disposeKerasMHA(mha);
  });

  it('refuses weights that do not fit, naming them', () => {
    const e = 16;
    const weights = [
      tf.zeros([e, 2, 8]),
      tf.zeros([2, 8]),
      tf.zeros([e, 2, 8]),
      tf.zeros([2, 8]),
      tf.zeros([e, 2, 8]),
      tf.zeros([2, 8]),
      tf.zeros([2, 8, e]),
      tf.zeros([e]),
    ];
    expect(() => loadMultiHeadAttentionWeights(flashMHA({embedDim: e, numHeads: 4}), weights))
        .toThrow(/query\/kernel must have shape \[16, 4, 4\] for this FlashMHA, got \[16, 2, 8\]/);
    expect(
        () => loadMultiHeadAttentionWeights(
            flashMHA({embedDim: e, numHeads: 2, numHeadsKV: 1}), weights))
        .toThrow(/numHeadsKV == numHeads \(2\), got numHeadsKV = 1/);
    expect(
        () => loadMultiHeadAttentionWeights(
            flashMHA({embedDim: e, numHeads: 2, qkvProjBias: false}), weights))
        .toThrow(/qkvProjBias: false/);
    expect(
        () => loadMultiHeadAttentionWeights(
            flashMHA({embedDim: e, numHeads: 2}), weights.slice(0, 3)))
        .toThrow(/8 tensors \(4 without biases\).*got 3/);
    // Without biases (4 kernels): loads, biases zero.
    const noBias = flashMHA({embedDim: e, numHeads: 2}) as FlashMHA;
    loadMultiHeadAttentionWeights(noBias, [weights[0], weights[2], weights[4], weights[6]]);
    expect(noBias.weights.map(w => w.shape)).toEqual([[e, 48], [48], [16, e], [e]]);
    tf.dispose(weights);
  });
});
