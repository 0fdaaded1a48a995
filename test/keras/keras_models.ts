/**
 * Keras models in the tfjs layers format for the tests: the fixtures
 * (model.json as tensorflowjs_converter writes it for tf.keras models),
 * random weights for their manifests, loading through an in-memory IO
 * handler, and the same models computed with tfjs-layers' own
 * MultiHeadAttention (test/harness/keras_mha.ts).
 *
 * The reference reads the fixture's Keras JSON itself (layer order,
 * inbound nodes, call kwargs, MultiHeadAttention configs) and takes each
 * attention layer's weights straight from the weight data by Keras name,
 * so nothing of this package's layer or its config rewrite is in it; the
 * other layers (Dense, LayerNormalization, Add...) are the loaded model's
 * own tfjs-layers layers, applied eagerly.
 */
import * as fs from 'fs';
import * as path from 'path';

import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';

import {disposeKerasMHA, KERAS_MHA_WEIGHT_NAMES, kerasMultiHeadAttention, setKerasMHAWeights} from '../harness/keras_mha';
import {Rng} from '../harness/problems';

/* eslint-disable @typescript-eslint/no-explicit-any */
export type KerasJson = any;
export type TensorRef = [string, number, number];

export interface WeightSpec {
  name: string;
  shape: number[];
  dtype: 'float32';
}

export function readFixture(name: string): KerasJson {
  return JSON.parse(fs.readFileSync(path.join(__dirname, 'fixtures', `${name}.json`), 'utf8'));
}

export function weightSpecs(json: KerasJson): WeightSpec[] {
  return json.weightsManifest.flatMap((group: {weights: WeightSpec[]}) => group.weights);
}

function size(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/**
 * Random weights for a manifest, scaled like trained ones (kernels by
 * 1/sqrt(fan-in), layer-norm gammas near 1), as one buffer and by name.
 */
export function randomWeights(
    specs: WeightSpec[], rng: Rng): {data: Float32Array, byName: Map<string, Float32Array>} {
  const data = new Float32Array(specs.reduce((n, s) => n + size(s.shape), 0));
  const byName = new Map<string, Float32Array>();
  let offset = 0;
  for (const spec of specs) {
    const n = size(spec.shape);
    const values = data.subarray(offset, offset + n);
    const kind = spec.name.split('/').pop();
    const fanIn = spec.name.endsWith('attention_output/kernel') ? spec.shape[0] * spec.shape[1] :
                                                                  spec.shape[0];
    for (let i = 0; i < n; i++) {
      const normal = rng.normal();
      values[i] = kind === 'kernel' ? normal / Math.sqrt(fanIn) :
          kind === 'gamma'          ? 1 + 0.2 * normal :
                                      0.3 * normal;
    }
    byName.set(spec.name, values);
    offset += n;
  }
  return {data, byName};
}

/** `tf.loadLayersModel` on an in-memory copy of the model.json and weights. */
export function loadModel(json: KerasJson, data: Float32Array): Promise<tfl.LayersModel> {
  return tfl.loadLayersModel(tf.io.fromMemory({
    modelTopology: json.modelTopology,
    weightSpecs: weightSpecs(json),
    weightData: data.slice().buffer,
  }));
}

/**
 * Random inputs for the model's input shapes with batch `batch`: normals,
 * or for inputs named *mask*, 0/1 with 70% ones and the first query row of
 * the first example fully masked (Keras then averages all keys).
 */
export function randomInputs(model: tfl.LayersModel, batch: number, rng: Rng): tf.Tensor[] {
  return model.inputs.map((input, i) => {
    const shape = [batch, ...input.shape.slice(1) as number[]];
    if (!model.inputNames[i].includes('mask')) {
      return tf.tensor(Float32Array.from({length: size(shape)}, () => rng.normal()), shape);
    }
    const values = Float32Array.from({length: size(shape)}, () => (rng.uniform() < 0.7 ? 1 : 0));
    values.fill(0, 0, shape[shape.length - 1]);
    return tf.tensor(values, shape);
  });
}

/**
 * The model of `json` computed eagerly with tfjs-layers' own
 * MultiHeadAttention for every MultiHeadAttention layer (see file comment).
 * `extraInputs` feeds inputs by layer name.
 */
export function referenceOutputs(
    json: KerasJson, model: tfl.LayersModel, weights: Map<string, Float32Array>,
    inputs: tf.Tensor[]): tf.Tensor[] {
  const config = json.modelTopology.model_config.config;
  const specs = new Map(weightSpecs(json).map(s => [s.name, s.shape]));
  return tf.tidy(() => {
    const values = new Map<string, tf.Tensor[]>();
    config.input_layers.forEach(([name]: TensorRef, i: number) => values.set(name, [inputs[i]]));
    const get = (ref: TensorRef) => {
      const outputs = values.get(ref[0]);
      if (outputs == null || ref[1] !== 0) {
        throw new Error(`reference: cannot resolve ${JSON.stringify(ref)}`);
      }
      return outputs[ref[2]];
    };
    for (const layer of config.layers) {
      if (layer.class_name === 'InputLayer') {
        continue;
      }
      if (layer.inbound_nodes.length !== 1) {
        throw new Error('reference: one node per layer');
      }
      const node: Array<[string, number, number, Record<string, any>]> = layer.inbound_nodes[0];
      const args = node.map(entry => get([entry[0], entry[1], entry[2]]));
      if (layer.class_name !== 'MultiHeadAttention') {
        const out = model.getLayer(layer.name).apply(args.length === 1 ? args[0] : args);
        values.set(layer.name, [out as tf.Tensor]);
        continue;
      }
      const kwargs = node[0][3] ?? {};
      const c = layer.config;
      const ref = kerasMultiHeadAttention({
        numHeads: c.num_heads,
        keyDim: c.key_dim,
        valueDim: c.value_dim ?? undefined,
        useBias: c.use_bias,
        outputShape: c.output_shape ?? undefined,
        dropout: c.dropout,
      });
      const value = get(kwargs.value);
      const key = kwargs.key != null ? get(kwargs.key) : undefined;
      const attentionMask = kwargs.attention_mask != null ? get(kwargs.attention_mask) : undefined;
      const layerWeights: Record<string, tf.Tensor> = {};
      for (const name of KERAS_MHA_WEIGHT_NAMES) {
        const full = `${layer.name}/${name}`;
        if (weights.has(full)) {
          layerWeights[name] = tf.tensor(weights.get(full)!, specs.get(full));
        }
      }
      setKerasMHAWeights(
          ref, layerWeights, {query: args[0].shape, value: value.shape, key: key?.shape});
      const [out, scores] = ref.callAndReturnAttentionScores(args[0], {
        value,
        key,
        attentionMask,
        useCausalMask: kwargs.use_causal_mask ?? false,
      });
      disposeKerasMHA(ref);
      values.set(layer.name, kwargs.return_attention_scores ? [out, scores] : [out]);
    }
    return config.output_layers.map((ref: TensorRef) => get(ref));
  });
}
