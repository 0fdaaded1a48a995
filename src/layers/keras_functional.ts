/**
 * Keras functional configs call MultiHeadAttention with tensors in the
 * node's kwargs: `[["query_layer", 0, 0, {"value": ["value_layer", 0, 0],
 * "use_causal_mask": true}]]`. tfjs-layers 4.22 hands such kwargs to
 * `layer.apply` as they are (arrays of names, whose layer names its
 * `convertPythonicToTs` has even camelCased: "input_2" -> "input2"), and
 * its executor calls layers without the node's kwargs at all.
 *
 * So before tfjs-layers builds a functional model, the nodes of this
 * package's MultiHeadAttention are rewritten: every tensor argument
 * becomes one more input of the node (which tfjs-layers resolves, and
 * orders, like any input), and the kwargs keep the roles of the inputs and
 * the call options as `kerasCall`, a plain JSON value. The layer reads it
 * when the node is created (see multi_head_attention.ts).
 */
import * as tf from '@tensorflow/tfjs-core';

import {describe, layerPrefix} from './keras_config';

/** Inputs of a call, in the node's order. */
export type KerasCallRole = 'query'|'value'|'key'|'mask';

/** A MultiHeadAttention call, as stored in the node's kwargs. */
export interface KerasCall {
  inputs: KerasCallRole[];
  useCausalMask: boolean;
  returnAttentionScores: boolean;
  /** An explicit `training` of the call (Keras lets it fix the mode). */
  training: boolean|null;
  /** An attention mask that Keras serialized as a constant. */
  constantMask: unknown[]|null;
}

export const KERAS_CALL_KEY = 'kerasCall';

/** tfjs-layers' toCamelCase, which its config conversion applies. */
function toCamelCase(identifier: string): string {
  if (identifier.length <= 1 || identifier.indexOf('_') === -1) {
    return identifier;
  }
  return identifier.replace(/[_]+(\w|$)/g, (_m, c: string) => c.toUpperCase());
}

type NodeEntry = [string, number, number, Record<string, unknown>?];

function isTensorRef(value: unknown): value is[string, number, number] {
  return Array.isArray(value) && value.length === 3 && typeof value[0] === 'string' &&
      Number.isInteger(value[1]) && Number.isInteger(value[2]);
}

/** The call kwargs of Keras's MultiHeadAttention (camelCased). */
const CALL_KEYS = new Set([
  'value',
  'key',
  'attentionMask',
  'useCausalMask',
  'returnAttentionScores',
  'training',
  'queryMask',
  'valueMask',
  'keyMask',
]);

/**
 * Turns one Keras node of a MultiHeadAttention layer into the node this
 * package's layer reads. `resolveName` maps a (camelCased) layer name of a
 * kwargs tensor back to the config's name.
 */
function rewriteNode(
    nodeData: unknown, layerName: string, resolveName: (name: string) => string): unknown {
  if (!Array.isArray(nodeData)) {
    throw new Error(
        `${layerPrefix(layerName)}inbound node ${
            describe(nodeData)} is not in the tfjs layers format (a Keras 3 ` +
        `functional config? tfjs-layers 4.22 reads the Keras 2 format, as ` +
        `tensorflowjs_converter writes it from tf.keras / tf_keras models)`);
  }
  const entries = nodeData as NodeEntry[];
  if (entries.some(e => Array.isArray(e) && e[3]?.[KERAS_CALL_KEY] != null)) {
    return nodeData;  // Already this package's form (a tfjs-saved model).
  }
  if (entries.length !== 1 || !Array.isArray(entries[0])) {
    throw new Error(
        `${layerPrefix(layerName)}a call takes one query tensor, got ${describe(nodeData)}`);
  }
  const [queryLayer, queryNode, queryTensor, kwargs = {}] = entries[0];
  for (const key of Object.keys(kwargs)) {
    if (!CALL_KEYS.has(key)) {
      throw new Error(`${layerPrefix(layerName)}call argument '${
          key.replace(/[A-Z]/g, c => `_${c.toLowerCase()}`)}' is not supported`);
    }
  }
  for (const key of ['queryMask', 'valueMask', 'keyMask']) {
    if (kwargs[key] != null) {
      throw new Error(`${layerPrefix(layerName)}call argument '${
          key.replace(/[A-Z]/g, c => `_${c.toLowerCase()}`)}' is not supported`);
    }
  }
  const refs: Array<[string, number, number]> = [[queryLayer, queryNode, queryTensor]];
  const roles: KerasCallRole[] = ['query'];
  const addRef = (value: unknown, role: KerasCallRole, argName: string) => {
    if (!isTensorRef(value)) {
      throw new Error(`${layerPrefix(layerName)}call argument '${argName}' must be a tensor, got ${
          describe(value)}`);
    }
    refs.push([resolveName(value[0]), value[1], value[2]]);
    roles.push(role);
  };
  if (kwargs.value == null) {
    throw new Error(
        `${layerPrefix(layerName)}the call has no 'value' tensor (kwargs ${describe(kwargs)})`);
  }
  addRef(kwargs.value, 'value', 'value');
  if (kwargs.key != null) {
    addRef(kwargs.key, 'key', 'key');
  }
  let constantMask: unknown[]|null = null;
  if (kwargs.attentionMask != null) {
    if (isTensorRef(kwargs.attentionMask)) {
      addRef(kwargs.attentionMask, 'mask', 'attention_mask');
    } else if (Array.isArray(kwargs.attentionMask)) {
      constantMask = kwargs.attentionMask;  // A numpy constant.
    } else {
      throw new Error(
          `${layerPrefix(layerName)}call argument 'attention_mask' must be a tensor, got ${
              describe(kwargs.attentionMask)}`);
    }
  }
  const flag = (key: string): boolean => {
    const value = kwargs[key] ?? false;
    if (typeof value !== 'boolean') {
      throw new Error(`${layerPrefix(layerName)}call argument '${
          key.replace(
              /[A-Z]/g, c => `_${c.toLowerCase()}`)}' must be a boolean, got ${describe(value)}`);
    }
    return value;
  };
  const training = kwargs.training ?? null;
  if (training !== null && typeof training !== 'boolean') {
    throw new Error(
        `${layerPrefix(layerName)}call argument 'training' must be a boolean or null, got ${
            describe(training)}`);
  }
  const call: KerasCall = {
    inputs: roles,
    useCausalMask: flag('useCausalMask'),
    returnAttentionScores: flag('returnAttentionScores'),
    training: training as boolean | null,
    constantMask,
  };
  const newKwargs = {[KERAS_CALL_KEY]: call};
  return refs.map(ref => [...ref, newKwargs]);
}

interface LayerData {
  className?: unknown;
  name?: unknown;
  config?: {name?: unknown};
  inboundNodes?: unknown;
}

/**
 * A copy of a functional model config whose nodes of `isOurs` layers are
 * rewritten (see the file comment); the config itself is left untouched.
 */
export function rewriteFunctionalConfig(
    config: tf.serialization.ConfigDict,
    isOurs: (layerData: LayerData) => boolean): tf.serialization.ConfigDict {
  const layers = config['layers'] as unknown as LayerData[] | undefined;
  if (!Array.isArray(layers) || !layers.some(isOurs)) {
    return config;
  }
  const names = layers.map(l => String(l.name ?? l.config?.name));
  const resolveName = (name: string): string => {
    if (names.includes(name)) {
      return name;
    }
    const matches = names.filter(n => toCamelCase(n) === name);
    if (matches.length !== 1) {
      throw new Error(`MultiHeadAttention: a call argument refers to layer '${name}', which ${
          matches.length === 0 ? 'the model does not have' :
                                 `is ambiguous (${matches.join(', ')})`}`);
    }
    return matches[0];
  };
  const rewritten = layers.map(layerData => {
    if (!isOurs(layerData) || !Array.isArray(layerData.inboundNodes)) {
      return layerData;
    }
    const layerName = String(layerData.name ?? layerData.config?.name);
    return {
      ...layerData,
      inboundNodes: layerData.inboundNodes.map(node => rewriteNode(node, layerName, resolveName)),
    };
  });
  return {...config, layers: rewritten as unknown as tf.serialization.ConfigDictValue};
}

const WRAPPED = Symbol.for('tfjs-flash-attention.kerasFunctionalConfig');

/**
 * Wraps the `fromConfig` of tfjs-layers' functional model classes
 * ('Functional', 'Model') in the serialization registry so that configs
 * are rewritten first. Idempotent; the classes are unchanged.
 */
export function installFunctionalRewrite(isOurs: (layerData: LayerData) => boolean): void {
  const map = tf.serialization.SerializationMap.getMap().classNameMap;
  for (const className of ['Functional', 'Model']) {
    const entry = map[className];
    if (entry == null) {
      continue;
    }
    const [cls, fromConfig] = entry;
    if ((fromConfig as unknown as Record<symbol, boolean>)[WRAPPED]) {
      continue;
    }
    const wrapped = ((c: typeof cls, config: tf.serialization.ConfigDict, ...rest: unknown[]) =>
                         (fromConfig as (...args: unknown[]) => tf.serialization.Serializable)(
                             c, rewriteFunctionalConfig(config, isOurs), ...rest)) as unknown as
        typeof fromConfig;
    (wrapped as unknown as Record<symbol, boolean>)[WRAPPED] = true;
    map[className] = [cls, wrapped];
  }
}
