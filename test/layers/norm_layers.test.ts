/**
 * FusedLayerNormalization and RMSNormalization as layers: a drop-in for
 * tf.layers.layerNormalization (same output and gradients with the same
 * weights), the residual form, serialization, errors. cpu backend.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';

import {FusedLayerNormalization, RMSNormalization} from '../../src/layers';
import {useBackend} from '../harness/backends';
import {expectClose, FORWARD_BOUND, freshRng, GRADIENT_BOUND, randomArray} from '../harness/problems';

describe('fused norm layers [cpu]', () => {
  beforeAll(() => useBackend('cpu'));

  it('FusedLayerNormalization computes what tf.layers.layerNormalization does, with its gradients',
     async () => {
       const rng = freshRng();
       const what = `FLASH_ATTENTION_TEST_SEED=${rng.seed}`;
       const x = tf.tensor3d(Float32Array.from(randomArray(2 * 5 * 12, rng, 3)), [2, 5, 12]);
       const stock = tfl.layers.layerNormalization({epsilon: 1e-4});
       const fused = new FusedLayerNormalization({epsilon: 1e-4});
       stock.apply(x);
       fused.apply(x);
       const weights =
           [Float32Array.from(randomArray(12, rng)), Float32Array.from(randomArray(12, rng))];
       stock.setWeights(weights.map(w => tf.tensor1d(w)));
       fused.setWeights(weights.map(w => tf.tensor1d(w)));
       const dy = tf.tensor3d(Float32Array.from(randomArray(2 * 5 * 12, rng)), [2, 5, 12]);
       const [a, b] = [stock, fused].map(l => l.apply(x) as tf.Tensor);
       expectClose(await b.data(), await a.data(), FORWARD_BOUND, `${what}: y`);
       const grads = [stock, fused].map(
           l => tf.variableGrads(
               () => tf.sum(tf.mul(l.apply(x) as tf.Tensor, dy)) as tf.Scalar,
               l.trainableWeights.map(w => w.read() as tf.Variable)));
       const [gs, gf] = grads.map(g => Object.values(g.grads));
       for (let i = 0; i < 2; i++) {
         expectClose(
             await gf[i].data(), await gs[i].data(), GRADIENT_BOUND, `${what}: weight ${i}`);
       }
       tf.dispose([x, dy, a, b, ...grads.flatMap(g => [g.value, ...Object.values(g.grads)])]);
       stock.dispose();
       fused.dispose();
     });

  it('[x, residual] with returnResidual outputs [norm(x + residual), x + residual]', async () => {
    const rng = freshRng();
    const x = tf.tensor2d(Float32Array.from(randomArray(24, rng)), [3, 8]);
    const residual = tf.tensor2d(Float32Array.from(randomArray(24, rng)), [3, 8]);
    const layer = new RMSNormalization({returnResidual: true});
    const [y, z] = layer.apply([x, residual]) as tf.Tensor[];
    const sum = tf.add(x, residual);
    const expected = tf.div(sum, tf.sqrt(tf.add(tf.mean(tf.square(sum), -1, true), 1e-6)));
    expectClose(await z.data(), await sum.data(), FORWARD_BOUND, `seed ${rng.seed}: z`);
    expectClose(await y.data(), await expected.data(), FORWARD_BOUND, `seed ${rng.seed}: y`);
    expect(layer.computeOutputShape([[3, 8], [3, 8]])).toEqual([[3, 8], [3, 8]]);
    tf.dispose([x, residual, y, z, sum, expected]);
    layer.dispose();
  });

  it('serializes in a model and loads back', async () => {
    const input = tfl.input({shape: [4, 6]});
    const normed =
        new FusedLayerNormalization({epsilon: 1e-5, dropout: 0.1, name: 'ln'}).apply(input);
    const out = new RMSNormalization({name: 'rms'}).apply(normed) as tfl.SymbolicTensor;
    const model = tfl.model({inputs: input, outputs: out});
    const json = JSON.parse(JSON.stringify(model.toJSON(null, false)));
    const copy = await tfl.models.modelFromJSON({modelTopology: json});
    const ln = copy.getLayer('ln') as FusedLayerNormalization;
    expect(ln).toBeInstanceOf(FusedLayerNormalization);
    expect([ln.epsilon, ln.dropout, ln.center, ln.scale]).toEqual([1e-5, 0.1, true, true]);
    expect(copy.getLayer('rms')).toBeInstanceOf(RMSNormalization);
    const x = tf.ones([1, 4, 6]);
    const [p, q] = [model, copy].map(m => m.predict(x) as tf.Tensor);
    expect(p.shape).toEqual([1, 4, 6]);
    tf.dispose([x, p, q]);
    model.dispose();
    copy.dispose();
  });

  it('refuses other axes and bad dropout, naming them', () => {
    expect(() => new FusedLayerNormalization({axis: 1}))
        .toThrow(/FusedLayerNormalization: axis must be -1/);
    expect(() => new RMSNormalization({dropout: 1}))
        .toThrow(/RMSNormalization: dropout must be in \[0, 1\), got 1/);
  });
});
