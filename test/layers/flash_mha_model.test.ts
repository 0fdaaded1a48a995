/**
 * FlashMHA inside tf.layers models: Sequential and functional, model.fit
 * with validationSplit, masks propagated from an Embedding, summary,
 * save/load through an in-memory IO handler, no leaks per training step.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';

import {FlashMHA, flashMHA} from '../../src/layers';
import {useBackend} from '../harness/backends';

const E = 16;
const SEQ = 8;

function sequentialModel(): tfl.Sequential {
  const model = tfl.sequential();
  model.add(flashMHA({
    inputShape: [SEQ, E],
    embedDim: E,
    numHeads: 4,
    causal: true,
    rotaryEmbDim: 4,
    numHeadsKV: 2,
    dropout: 0.1,
    name: 'attention'
  }));
  model.add(tfl.layers.globalAveragePooling1d());
  model.add(tfl.layers.dense({units: 1}));
  return model;
}

/** An in-memory save target. */
function memorySink() {
  const sink: {artifacts?: tf.io.ModelArtifacts} = {};
  const handler = tf.io.withSaveHandler(async artifacts => {
    sink.artifacts = artifacts;
    return {modelArtifactsInfo: {dateSaved: new Date(), modelTopologyType: 'JSON'}};
  });
  return {sink, handler};
}

describe('FlashMHA in tf.layers models [cpu]', () => {
  beforeAll(() => useBackend('cpu'));

  it('trains in a Sequential model with model.fit and validationSplit, leak-free per step',
     async () => {
       const model = sequentialModel();
       model.compile({optimizer: tf.train.adam(0.01), loss: 'meanSquaredError'});
       const x = tf.randomNormal([20, SEQ, E]);
       const y = tf.sum(tf.mean(x, 1), 1, true);
       const first =
           await model.fit(x, y, {epochs: 1, batchSize: 4, validationSplit: 0.25, verbose: 0});
       const before = tf.memory().numTensors;
       const history =
           await model.fit(x, y, {epochs: 4, batchSize: 4, validationSplit: 0.25, verbose: 0});
       expect(tf.memory().numTensors).toBe(before);
       expect(history.history.val_loss).toHaveLength(4);
       const losses = history.history.loss as number[];
       expect(losses.every(Number.isFinite)).toBe(true);
       expect(losses[3]).toBeLessThan(first.history.loss[0] as number);
       tf.dispose([x, y]);
       model.dispose();
     });

  it('summary shows its output shape and parameter count', () => {
    const model = sequentialModel();
    const lines: string[] = [];
    model.summary(100, undefined, (...msg: unknown[]) => lines.push(msg.join(' ')));
    const row = lines.find(l => l.includes('attention (FlashMHA)'));
    expect(row).toBeDefined();
    // qkv: 16 x (4 + 2 * 2) * 4 + 32 biases; out: 16 x 16 + 16.
    const params = 16 * 32 + 32 + 16 * 16 + 16;
    expect(row).toMatch(new RegExp(`\\[null,8,16\\]\\s+${params}`));
    expect(model.getLayer('attention').countParams()).toBe(params);
    model.dispose();
  });

  it('save and tf.loadLayersModel (in-memory IO) give identical outputs', async () => {
    const input = tfl.input({shape: [null, E]});
    const context = tfl.input({shape: [null, 12]});
    const attended = flashMHA({
                       embedDim: E,
                       numHeads: 2,
                       useAlibi: true,
                       softcap: 3,
                       windowSize: [4, 0],
                       kernelInitializer: 'heNormal',
                       biasInitializer: {className: 'RandomNormal', config: {stddev: 0.1}},
                       kernelRegularizer: 'l1l2'
                     }).apply(input) as tfl.SymbolicTensor;
    const crossed = flashMHA({
                      embedDim: E,
                      numHeads: 4,
                      numHeadsKV: 1,
                      crossAttention: true,
                      rotaryEmbDim: 4,
                      rotaryEmbInterleaved: true,
                      outProjBias: false
                    }).apply([attended, context]) as tfl.SymbolicTensor;
    const output = tfl.layers.add().apply([input, crossed]) as tfl.SymbolicTensor;
    const model = tfl.model({inputs: [input, context], outputs: output});
    const {sink, handler} = memorySink();
    await model.save(handler);
    const loaded = await tfl.loadLayersModel(tf.io.fromMemory(sink.artifacts!));
    const layers = loaded.layers.filter(l => l instanceof FlashMHA) as FlashMHA[];
    expect(layers.map(l => [l.useAlibi, l.crossAttention, l.numHeadsKV, l.rotaryEmbInterleaved]))
        .toEqual([[true, false, 2, false], [false, true, 1, true]]);
    // heNormal = VarianceScaling(scale 2, fanIn, normal).
    expect(layers[0].kernelInitializer.getConfig()).toMatchObject({scale: 2, mode: 'fanIn'});
    expect(layers[0].kernelRegularizer!.getClassName()).toBe('L1L2');
    const x = tf.randomNormal([3, 7, E]);
    const c = tf.randomNormal([3, 5, 12]);
    const a = model.predict([x, c]) as tf.Tensor;
    const b = loaded.predict([x, c]) as tf.Tensor;
    expect(Array.from(await b.data())).toEqual(Array.from(await a.data()));
    tf.dispose([x, c, a, b]);
    model.dispose();
    loaded.dispose();
  });

  it('cross-attention uses keyPaddingMask or the last of per-input masks, never a lone (query) mask',
     async () => {
       const layer = flashMHA({embedDim: E, numHeads: 2, crossAttention: true});
       const x = tf.randomNormal([1, 4, E]);
       const y = tf.randomNormal([1, 6, E]);
       const queryMask = tf.tensor2d([[1, 1, 0, 0]], [1, 4], 'bool');
       const keyMask = tf.tensor2d([[1, 1, 1, 0, 0, 0]], [1, 6], 'bool');
       const values = async (kwargs?: object) => {
         const out = layer.apply([x, y], kwargs) as tf.Tensor;
         const data = Array.from(await out.data());
         out.dispose();
         return data;
       };
       const plain = await values();
       expect(await values({mask: queryMask})).toEqual(plain);
       const keyed = await values({keyPaddingMask: keyMask});
       expect(keyed).not.toEqual(plain);
       expect(await values({mask: [queryMask, keyMask]})).toEqual(keyed);
       tf.dispose([x, y, queryMask, keyMask]);
     });

  it('constraints survive getConfig/fromConfig', () => {
    // (tfjs re-applies a constraint to weights it loads, so the save/load
    // round trip above, whose outputs must be identical, has none.)
    const layer =
        flashMHA({embedDim: E, numHeads: 2, kernelConstraint: 'maxNorm', biasConstraint: 'nonNeg'});
    const copy =
        FlashMHA.fromConfig(FlashMHA, JSON.parse(JSON.stringify(layer.getConfig()))) as FlashMHA;
    expect(copy.kernelConstraint!.getClassName()).toBe('MaxNorm');
    expect(copy.biasConstraint!.getClassName()).toBe('NonNeg');
    expect(copy.getConfig()).toEqual(layer.getConfig());
  });

  it('takes the key padding mask an Embedding(maskZero) propagates', async () => {
    const tokens = tfl.input({shape: [SEQ], dtype: 'int32'});
    const embedding = tfl.layers.embedding({inputDim: 10, outputDim: E, maskZero: true});
    const attention = flashMHA({embedDim: E, numHeads: 4});
    const output = attention.apply(embedding.apply(tokens)) as tfl.SymbolicTensor;
    const model = tfl.model({inputs: tokens, outputs: output});
    // Row 1 is padded after 5 tokens.
    const ids =
        tf.tensor2d([[1, 2, 3, 4, 5, 6, 7, 8], [3, 1, 4, 1, 5, 0, 0, 0]], [2, SEQ], 'int32');
    const fromModel = model.predict(ids) as tf.Tensor;
    const embedded = embedding.apply(ids) as tf.Tensor;
    const keep = tf.notEqual(ids, 0);
    const explicit = attention.apply(embedded, {keyPaddingMask: keep}) as tf.Tensor;
    const unmasked = attention.apply(embedded) as tf.Tensor;
    expect(Array.from(await fromModel.data())).toEqual(Array.from(await explicit.data()));
    // The padding changes row 1 (so the mask did reach the layer).
    const diff = tf.max(tf.abs(tf.sub(explicit, unmasked)), [1, 2]);
    const [d0, d1] = Array.from(await diff.data());
    expect(d0).toBeLessThan(1e-5);
    expect(d1).toBeGreaterThan(1e-3);
    tf.dispose([ids, fromModel, embedded, keep, explicit, unmasked, diff]);
    model.dispose();
  });
});
