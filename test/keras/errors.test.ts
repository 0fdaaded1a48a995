/**
 * Unsupported Keras configurations and calls fail with an error that names
 * the setting (at load for configs), leaving no tensor behind; and what
 * happens when another class is registered as MultiHeadAttention.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';

import {MultiHeadAttention} from '../../src/layers/multi_head_attention';
import {useBackend} from '../harness/backends';
import {freshRng} from '../harness/problems';

import {KerasJson, loadModel, randomWeights, readFixture, weightSpecs} from './keras_models';

/** The encoder fixture with its attention layer's JSON edited. */
function editedEncoder(edit: (layer: KerasJson) => void): KerasJson {
  const json = readFixture('encoder_block');
  const layer = json.modelTopology.model_config.config.layers.find(
      (l: KerasJson) => l.class_name === 'MultiHeadAttention');
  edit(layer);
  return json;
}

async function expectLoadError(json: KerasJson, message: RegExp): Promise<void> {
  const start = tf.memory().numTensors;
  const data = randomWeights(weightSpecs(json), freshRng()).data;
  await expect(loadModel(json, data)).rejects.toThrow(message);
  expect(tf.memory().numTensors).toBe(start);
}

describe('MultiHeadAttention: unsupported Keras configs fail at load', () => {
  beforeAll(() => useBackend('cpu'));

  const cases: Array<[string, (layer: KerasJson) => void, RegExp]> = [
    [
      'attention_axes other than the sequence axis',
      l => {
        l.config.attention_axes = [2];
      },
      /MultiHeadAttention 'multi_head_attention': attention_axes \[2\] is not supported: only attention over all the axes between batch and features \(\[1\] for inputs of rank 3/
    ],
    [
      'attention_axes without a recorded query_shape (checked at build)',
      l => {
        l.config.attention_axes = [0, 1];
        delete l.config.query_shape;
      },
      /attention_axes \[0,1\] is not supported/
    ],
    [
      'activity_regularizer',
      l => {
        l.config.activity_regularizer = {class_name: 'L1L2', config: {l1: 0.01, l2: 0}};
      },
      /'multi_head_attention': activity_regularizer .* is not supported/
    ],
    [
      'an unknown config key',
      l => {
        l.config.softmax_dtype = 'float16';
      },
      /'multi_head_attention': unsupported configuration 'softmax_dtype'/
    ],
    [
      'dtype float16',
      l => {
        l.config.dtype = 'float16';
      },
      /'multi_head_attention': dtype "float16" is not supported: only float32/
    ],
    [
      'a Keras 3 dtype policy other than float32',
      l => {
        l.config
            .dtype = {module: 'keras', class_name: 'DTypePolicy', config: {name: 'mixed_float16'}};
      },
      /dtype .*mixed_float16.* is not supported/
    ],
    [
      'an unknown kernel initializer',
      l => {
        l.config.kernel_initializer = {class_name: 'NoSuchInitializer', config: {}};
      },
      /'multi_head_attention': kernel_initializer 'NoSuchInitializer' is not a class tfjs-layers knows/
    ],
    [
      'num_heads 0',
      l => {
        l.config.num_heads = 0;
      },
      /'multi_head_attention': num_heads must be a positive integer, got 0/
    ],
    [
      'dropout 1',
      l => {
        l.config.dropout = 1;
      },
      /'multi_head_attention': dropout must be a number in \[0, 1\), got 1/
    ],
    [
      'an unknown call argument',
      l => {
        l.inbound_nodes[0][0][3].scale = 2;
      },
      /'multi_head_attention': call argument 'scale' is not supported/
    ],
    [
      'query_mask in the call',
      l => {
        l.inbound_nodes[0][0][3].query_mask = ['input_1', 0, 0];
      },
      /call argument 'query_mask' is not supported/
    ],
    [
      'a call without value',
      l => {
        l.inbound_nodes[0][0][3] = {};
      },
      /'multi_head_attention': the call has no 'value' tensor/
    ],
    [
      'use_causal_mask that is not a boolean',
      l => {
        l.inbound_nodes[0][0][3].use_causal_mask = 1;
      },
      /call argument 'use_causal_mask' must be a boolean, got 1/
    ],
    [
      'a kwargs tensor of an unknown layer',
      l => {
        l.inbound_nodes[0][0][3].value = ['no_such_layer', 0, 0];
      },
      /refers to layer 'noSuchLayer', which the model does not have/
    ],
    [
      'a Keras 3 functional node',
      l => {
        const tensor = (name: string) => ({
          class_name: '__keras_tensor__',
          config: {shape: [null, 12, 16], dtype: 'float32', keras_history: [name, 0, 0]}
        });
        l.inbound_nodes = [{args: [tensor('input_1')], kwargs: {value: tensor('input_1')}}];
      },
      /'multi_head_attention': inbound node .* is not in the tfjs layers format \(a Keras 3 functional config\?/
    ],
  ];
  for (const [title, edit, message] of cases) {
    it(title, async () => {
      await expectLoadError(editedEncoder(edit), message);
    });
  }

  it('the fixture itself loads (the edits above are what fails)', async () => {
    const json = readFixture('encoder_block');
    const model = await loadModel(json, randomWeights(weightSpecs(json), freshRng()).data);
    model.dispose();
  });
});

describe('MultiHeadAttention: unsupported calls', () => {
  beforeAll(() => useBackend('cpu'));

  it('Keras masks on a cross-attention value in predict (tfjs passes only the first input\'s)', () => {
    const tokens = tfl.input({shape: [5], dtype: 'int32'});
    const context = tfl.input({shape: [6, 8]});
    const embedded =
        tfl.layers.embedding({inputDim: 10, outputDim: 8, maskZero: true}).apply(tokens) as
        tfl.SymbolicTensor;
    const attended =
        new MultiHeadAttention({numHeads: 2, keyDim: 4, name: 'cross'}).apply(embedded, {
          value: context
        }) as tfl.SymbolicTensor;
    const model = tfl.model({inputs: [tokens, context], outputs: attended});
    const x = tf.tensor2d([[1, 2, 0, 0, 0]], [1, 5], 'int32');
    const c = tf.zeros([1, 6, 8]);
    const start = tf.memory().numTensors;
    expect(() => model.apply([x, c])).toThrow(/'cross': inputs with a Keras mask/);
    expect(() => model.predict([x, c]))
        .toThrow(
            /'cross': inputs with a Keras mask \(e.g. from Embedding\(mask_zero=True\)\) are supported only for self-attention in predict\/fit/);
    expect(tf.memory().numTensors).toBe(start);
    tf.dispose([x, c]);
    model.dispose();
  });

  it('a shared layer called with different arguments', () => {
    const x = tfl.input({shape: [4, 8]});
    const layer = new MultiHeadAttention({numHeads: 2, keyDim: 4, name: 'shared'});
    layer.apply(x, {value: x});
    expect(() => layer.apply(x, {value: x, useCausalMask: true}))
        .toThrow(/'shared': the layer is called twice with different call arguments/);
    layer.dispose();
  });

  it('attention_mask of a wrong shape, and value of another rank', () => {
    const layer = new MultiHeadAttention({numHeads: 2, keyDim: 4, name: 'mha'});
    const q = tf.zeros([2, 4, 8]);
    const v = tf.zeros([2, 5, 8]);
    const badMask = tf.ones([2, 4, 4]);
    const v4 = tf.zeros([2, 5, 1, 8]);
    tf.dispose(layer.apply(q, {value: v}) as tf.Tensor);
    const start = tf.memory().numTensors;
    expect(() => layer.apply(q, {value: v, attentionMask: badMask}))
        .toThrow(
            /'mha': attention_mask must have shape \[2,4,5\] \(or broadcast to it\), got \[2,4,4\]/);
    expect(() => layer.apply(q, {
      value: v4
    })).toThrow(/'mha': query, value and key must have the same rank/);
    expect(() => layer.apply(q, {})).toThrow(/'mha': the call needs a value tensor/);
    expect(tf.memory().numTensors).toBe(start);
    tf.dispose([q, v, badMask, v4]);
    layer.dispose();
  });

  it('attention_axes not covering every middle axis (rank-4 inputs)', () => {
    const layer = new MultiHeadAttention({numHeads: 2, keyDim: 4, attentionAxes: [2], name: 'mha'});
    const x = tfl.input({shape: [3, 4, 8]});
    expect(() => layer.apply(x, {value: x}))
        .toThrow(
            /'mha': attention_axes \[2\] is not supported: only attention over all the axes between batch and features \(\[1,2\] for inputs of rank 4/);
  });
});

describe('MultiHeadAttention: another class registered under the name', () => {
  /** A fresh tfjs-core/tfjs-layers/this package, with `before` run first. */
  function isolated(before: (tfc: typeof tf, layers: typeof tfl) => void) {
    let modules: {
      tfc: typeof tf,
      layers: typeof tfl,
      mha: typeof import('../../src/layers/multi_head_attention')
    }|undefined;
    jest.isolateModules(() => {
      const tfc = require('@tensorflow/tfjs-core') as typeof tf;
      const layers = require('@tensorflow/tfjs-layers') as typeof tfl;
      before(tfc, layers);
      const mha = require('../../src/layers/multi_head_attention');
      modules = {tfc, layers, mha};
    });
    return modules!;
  }

  it('is left in place: models load with it; registerMultiHeadAttention({replace}) takes over',
     async () => {
       class OtherMHA extends tfl.layers.Layer {
         static className = 'MultiHeadAttention';
         static fromConfig(): never {
           throw new Error('OtherMHA.fromConfig was used');
         }
       }
       const {tfc, layers, mha} = isolated(tfc => tfc.serialization.registerClass(OtherMHA));
       const map = tfc.serialization.SerializationMap.getMap().classNameMap;
       expect(map['MultiHeadAttention'][0]).toBe(OtherMHA);
       expect(mha.registerMultiHeadAttention()).toBe(false);
       const json = readFixture('encoder_block');
       const load = () => layers.loadLayersModel(tfc.io.fromMemory({
         modelTopology: json.modelTopology,
         weightSpecs: weightSpecs(json),
         weightData: randomWeights(weightSpecs(json), freshRng()).data.buffer,
       }));
       await expect(load()).rejects.toThrow('OtherMHA.fromConfig was used');
       expect(mha.registerMultiHeadAttention({replace: true})).toBe(true);
       expect(map['MultiHeadAttention'][0]).toBe(mha.MultiHeadAttention);
       const model = await load();
       expect(model.getLayer('multi_head_attention')).toBeInstanceOf(mha.MultiHeadAttention);
       model.dispose();
     });

  it('registers itself where no class has the name', () => {
    const {tfc, mha} = isolated(() => undefined);
    const map = tfc.serialization.SerializationMap.getMap().classNameMap;
    expect(map['MultiHeadAttention'][0]).toBe(mha.MultiHeadAttention);
    expect(mha.registerMultiHeadAttention()).toBe(true);
  });
});
