/**
 * The harness's reference (tfjs-layers' own MultiHeadAttention, bundled
 * from its ESM file) is bound to this test's tfjs instances, registers
 * nothing by itself, and computes Keras's formulas (float64 oracle).
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';

import {describeBackends} from '../harness/backends';
import {disposeKerasMHA, KERAS_MHA_WEIGHT_NAMES, kerasMHAClasses, kerasMHAVariables, kerasMultiHeadAttention, registerKerasMultiHeadAttention, setKerasMHAWeights} from '../harness/keras_mha';
import {expectClose, freshRng, randomArray, Rng} from '../harness/problems';

import {kerasMHAOracle, KerasMHAOracleWeights} from './keras_oracle';

describe('keras_mha harness: binding', () => {
  it('gives layers of the test\'s tfjs-layers, registered only on demand', () => {
    const {MultiHeadAttention, EinsumDense} = kerasMHAClasses();
    const layer = kerasMultiHeadAttention({numHeads: 2, keyDim: 3, name: 'ref'});
    expect(layer).toBeInstanceOf(tfl.layers.Layer);
    expect(layer).toBeInstanceOf(MultiHeadAttention);
    const map = tf.serialization.SerializationMap.getMap().classNameMap;
    const before = {mha: map['MultiHeadAttention'], einsum: map['EinsumDense']};
    const undo = registerKerasMultiHeadAttention();
    expect(map['MultiHeadAttention'][0]).toBe(MultiHeadAttention);
    expect(map['EinsumDense'][0]).toBe(EinsumDense);
    undo();
    expect(map['MultiHeadAttention']).toBe(before.mha);
    expect(map['EinsumDense']).toBe(before.einsum);
    // The chained ops it needs are installed during its calls only.
    expect((tf.Tensor.prototype as unknown as Record<string, unknown>)['add']).toBeUndefined();
  });
});

const f32 = (a: ArrayLike<number>) => Float32Array.from(a);

function randomWeights(rng: Rng, dims: {
  q: number,
  k: number,
  v: number,
  heads: number,
  keyDim: number,
  valueDim: number,
  out: number
}): KerasMHAOracleWeights {
  const {heads: H, keyDim: Dk, valueDim: Dv} = dims;
  const dense = (inDim: number, outDim: number) => ({
    kernel: randomArray(inDim * outDim, rng, 1 / Math.sqrt(inDim)),
    bias: randomArray(outDim, rng, 0.5),
  });
  return {
    query: dense(dims.q, H * Dk),
    key: dense(dims.k, H * Dk),
    value: dense(dims.v, H * Dv),
    output: dense(H * Dv, dims.out),
  };
}

describeBackends('keras_mha harness: reference vs float64 Keras formulas', () => {
  it('cross-attention with a key, a mask and the causal mask', async () => {
    const rng = freshRng();
    const [B, T, S, E, H, Dk, Dv] = [2, 6, 5, 8, 2, 4, 3];
    const weights =
        randomWeights(rng, {q: E, k: 7, v: E, heads: H, keyDim: Dk, valueDim: Dv, out: E});
    const query = randomArray(B * T * E, rng);
    const value = randomArray(B * S * E, rng);
    const key = randomArray(B * S * 7, rng);
    const mask = Float64Array.from({length: B * T * S}, () => (rng.uniform() < 0.7 ? 1 : 0));
    mask.fill(0, 0, S);  // query 0 of batch 0 sees no key: a uniform row.
    const start = tf.memory().numTensors;
    const layer = kerasMultiHeadAttention({numHeads: H, keyDim: Dk, valueDim: Dv});
    const values: Record<string, tf.Tensor> = {
      'query/kernel': tf.tensor(f32(weights.query.kernel), [E, H, Dk], 'float32'),
      'query/bias': tf.tensor(f32(weights.query.bias!), [H, Dk], 'float32'),
      'key/kernel': tf.tensor(f32(weights.key.kernel), [7, H, Dk], 'float32'),
      'key/bias': tf.tensor(f32(weights.key.bias!), [H, Dk], 'float32'),
      'value/kernel': tf.tensor(f32(weights.value.kernel), [E, H, Dv], 'float32'),
      'value/bias': tf.tensor(f32(weights.value.bias!), [H, Dv], 'float32'),
      'attention_output/kernel': tf.tensor(f32(weights.output.kernel), [H, Dv, E], 'float32'),
      'attention_output/bias': tf.tensor(f32(weights.output.bias!), [E], 'float32'),
    };
    setKerasMHAWeights(layer, values, {query: [B, T, E], value: [B, S, E], key: [B, S, 7]});
    expect([...kerasMHAVariables(layer).keys()]).toEqual([...KERAS_MHA_WEIGHT_NAMES]);
    for (const causal of [false, true]) {
      const expected = kerasMHAOracle({
        batch: B,
        seqQ: T,
        seqK: S,
        queryDim: E,
        valueDim: E,
        keyInputDim: 7,
        heads: H,
        keyDim: Dk,
        headDimV: Dv,
        outDim: E,
        query,
        value,
        key,
        weights,
        attentionMask: mask,
        causal,
      });
      const [out, scores] = tf.tidy(
          () => layer.callAndReturnAttentionScores(tf.tensor(f32(query), [B, T, E], 'float32'), {
            value: tf.tensor(f32(value), [B, S, E], 'float32'),
            key: tf.tensor(f32(key), [B, S, 7], 'float32'),
            attentionMask: tf.tensor(f32(mask), [B, T, S], 'float32'),
            useCausalMask: causal,
          }));
      expectClose(await out.data(), expected.out, 1e-5, `out causal=${causal} seed ${rng.seed}`);
      expectClose(await scores.data(), expected.scores, 1e-5, `scores seed ${rng.seed}`);
      tf.dispose([out, scores]);
    }
    tf.dispose(Object.values(values));
    disposeKerasMHA(layer);
    expect(tf.memory().numTensors).toBe(start);
  });
});
