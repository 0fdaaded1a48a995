/**
 * Keras transformer blocks in the tfjs layers format load with
 * `tf.loadLayersModel` and compute what tfjs-layers' own
 * MultiHeadAttention computes for the same weights (within 1e-5), on cpu
 * and webgpu, through `predict` (tfjs-layers' executor) and `apply`
 * (its graph runner), leaving no tensor behind.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';

import {MultiHeadAttention} from '../../src/layers/multi_head_attention';
import {describeBackends} from '../harness/backends';
import {expectClose, freshRng} from '../harness/problems';

import {loadModel, randomInputs, randomWeights, readFixture, referenceOutputs, weightSpecs} from './keras_models';

const BOUND = 1e-5;

function toList(x: tf.Tensor|tf.Tensor[]|tfl.SymbolicTensor|tfl.SymbolicTensor[]): tf.Tensor[] {
  return (Array.isArray(x) ? x : [x]) as tf.Tensor[];
}

async function checkFixture(fixture: string, batch: number): Promise<void> {
  const rng = freshRng();
  const what = `${fixture} (seed ${rng.seed})`;
  const json = readFixture(fixture);
  const start = tf.memory().numTensors;
  const weights = randomWeights(weightSpecs(json), rng);
  const model = await loadModel(json, weights.data);

  // The weights land by name, unchanged, in this package's layers.
  const attention = model.layers.filter(l => l instanceof MultiHeadAttention);
  expect(attention.length).toBeGreaterThan(0);
  for (const layer of model.layers) {
    for (const w of layer.weights) {
      expect(Array.from(await w.read().data()))
          .toEqual(Array.from(weights.byName.get(w.originalName)!));
    }
  }
  expect(model.weights.length).toBe(weightSpecs(json).length);

  const inputs = randomInputs(model, batch, rng);
  const expected = referenceOutputs(json, model, weights.byName, inputs);
  const predicted = toList(model.predict(inputs));
  const applied = toList(model.apply(inputs));
  expect(predicted.length).toBe(expected.length);
  for (let i = 0; i < expected.length; i++) {
    expect(predicted[i].shape).toEqual(expected[i].shape);
    const want = await expected[i].data();
    expectClose(await predicted[i].data(), want, BOUND, `${what} predict output ${i}`);
    expectClose(await applied[i].data(), want, BOUND, `${what} apply output ${i}`);
  }
  tf.dispose([...inputs, ...expected, ...predicted, ...applied]);
  model.dispose();
  expect(tf.memory().numTensors).toBe(start);
}

describeBackends('Keras models with MultiHeadAttention', () => {
  it('encoder block (self-attention, layer norm, FFN) matches tfjs-layers\' MHA', async () => {
    await checkFixture('encoder_block', 2);
  });

  it('decoder block (causal self-attention, cross-attention with a key) matches', async () => {
    await checkFixture('decoder_block', 2);
  });

  it('attention_mask input and return_attention_scores match (both outputs)', async () => {
    await checkFixture('masked_attention', 2);
  });
});

describe('Keras models: the config rewrite', () => {
  it('turns kwargs tensors into node inputs with the call kept as kerasCall', async () => {
    const json = readFixture('decoder_block');
    const model = await loadModel(json, randomWeights(weightSpecs(json), freshRng()).data);
    const cross = model.getLayer('cross_attention');
    const node = cross.inboundNodes[0];
    expect(node.inboundLayers.map(l => l.name)).toEqual([
      'layer_normalization', 'encoder_outputs', 'encoder_keys'
    ]);
    expect(node.callArgs).toEqual({
      kerasCall: {
        inputs: ['query', 'value', 'key'],
        useCausalMask: false,
        returnAttentionScores: false,
        training: null,
        constantMask: null,
      }
    });
    expect(model.getLayer('self_attention').inboundNodes[0].callArgs).toEqual({
      kerasCall: expect.objectContaining({useCausalMask: true})
    });
    // The fixture itself is left as it was.
    expect(JSON.stringify(json)).toEqual(JSON.stringify(readFixture('decoder_block')));
    model.dispose();
  });

  it('a model saved by tfjs (with this layer) loads again and computes the same', async () => {
    const rng = freshRng();
    const json = readFixture('decoder_block');
    const model = await loadModel(json, randomWeights(weightSpecs(json), rng).data);
    let saved: tf.io.ModelArtifacts|undefined;
    await model.save(tf.io.withSaveHandler(async artifacts => {
      saved = artifacts;
      return {modelArtifactsInfo: {dateSaved: new Date(), modelTopologyType: 'JSON'}};
    }));
    const again = await tfl.loadLayersModel(tf.io.fromMemory(saved!));
    const inputs = randomInputs(model, 1, rng);
    const a = model.predict(inputs) as tf.Tensor;
    const b = again.predict(inputs) as tf.Tensor;
    expectClose(await b.data(), await a.data(), 0, `resaved (seed ${rng.seed})`);
    tf.dispose([a, b, ...inputs]);
    model.dispose();
    again.dispose();
  });
});
