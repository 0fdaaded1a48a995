/**
 * Keras's MultiHeadAttention configuration as tfjs-layers hands it to a
 * layer: the model.json's snake_case keys camelCased by tfjs-layers'
 * `convertPythonicToTs` (string values too: 'fan_avg' -> 'fanAvg'), and
 * initializers, regularizers and constraints as `{className, config}`.
 * Everything is checked here, so an unsupported model fails at load with
 * an error that names the Keras setting.
 */
import * as tf from '@tensorflow/tfjs-core';

import {lookupSerializable} from './serialization';

/** The Keras spelling of a config key, for error messages. */
export function kerasName(key: string): string {
  return key.replace(/[A-Z]/g, c => `_${c.toLowerCase()}`);
}

/** `MultiHeadAttention 'name': ` */
export function layerPrefix(layerName: string|undefined): string {
  return `MultiHeadAttention${layerName ? ` '${layerName}'` : ''}: `;
}

export function describe(value: unknown): string {
  if (value === undefined) {
    return 'undefined';
  }
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

/** Keys of the Keras 2 and Keras 3 configs, and tfjs's own layer args. */
const KNOWN_KEYS = new Set([
  // Keras MultiHeadAttention.
  'numHeads',
  'keyDim',
  'valueDim',
  'dropout',
  'useBias',
  'outputShape',
  'attentionAxes',
  'kernelInitializer',
  'biasInitializer',
  'kernelRegularizer',
  'biasRegularizer',
  'activityRegularizer',
  'kernelConstraint',
  'biasConstraint',
  'queryShape',
  'keyShape',
  'valueShape',
  // Keras 3: the dropout seed, and a backend choice that does not change
  // the numbers.
  'seed',
  'flashAttention',
  // Keras and tfjs base layer.
  'name',
  'trainable',
  'dtype',
  'inputShape',
  'batchInputShape',
  'batchSize',
  'inputDType',
  'weights',
  // Added by tfjs-layers' deserialization.
  'customObjects',
]);

/** Throws for configuration keys this layer does not know. */
export function checkKnownKeys(config: Record<string, unknown>, layerName: string|undefined): void {
  const unknown = Object.keys(config).filter(k => !KNOWN_KEYS.has(k));
  if (unknown.length > 0) {
    throw new Error(`${layerPrefix(layerName)}unsupported configuration ${
        unknown.map(k => `'${kerasName(k)}'`).join(', ')} (known: ${
            [...KNOWN_KEYS].map(kerasName).join(', ')})`);
  }
}

/**
 * Keras's `dtype`: 'float32', or Keras 3's policy
 * `{className: 'DTypePolicy', config: {name: 'float32'}}`; only float32
 * runs (tfjs has no float16).
 */
export function checkDType(dtype: unknown, layerName: string|undefined): void {
  if (dtype == null) {
    return;
  }
  let name: unknown = dtype;
  if (typeof dtype === 'object') {
    const policy = dtype as {config?: {name?: unknown}};
    name = policy.config?.name;
  }
  if (name !== 'float32') {
    throw new Error(
        `${layerPrefix(layerName)}dtype ${describe(dtype)} is not supported: only float32`);
  }
}

export function positiveInt(value: unknown, key: string, layerName: string|undefined): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) {
    throw new Error(`${layerPrefix(layerName)}${kerasName(key)} must be a positive integer, got ${
        describe(value)}`);
  }
  return value;
}

/** An int or a list of ints (Keras accepts both), as a list or null. */
export function intList(
    value: unknown, key: string, layerName: string|undefined, min: number): number[]|null {
  if (value == null) {
    return null;
  }
  const list = Array.isArray(value) ? value : [value];
  if (list.length === 0 ||
      !list.every(v => typeof v === 'number' && Number.isInteger(v) && v >= min)) {
    throw new Error(`${layerPrefix(layerName)}${kerasName(key)} must be an integer >= ${
        min} or a non-empty list of them, got ${describe(value)}`);
  }
  return list as number[];
}

/**
 * An initializer, regularizer or constraint from an instance, a name
 * ('glorotUniform') or `{className, config}`, built by the class that
 * tfjs-layers registered under that name (its own resolvers are not
 * public). All three kinds are used through their `apply`.
 */
export function resolveObject<T>(value: unknown, key: string, layerName: string|undefined): T|null {
  if (value == null) {
    return null;
  }
  if (value instanceof tf.serialization.Serializable) {
    return value as unknown as T;
  }
  let className: unknown;
  let config: tf.serialization.ConfigDict = {};
  if (typeof value === 'string') {
    className = value;
  } else if (typeof value === 'object') {
    const serialized = value as {className?: unknown, config?: tf.serialization.ConfigDict};
    className = serialized.className;
    config = serialized.config ?? {};
  }
  if (typeof className !== 'string') {
    throw new Error(`${layerPrefix(layerName)}${
        kerasName(key)} must be a name or {class_name, config}, got ${describe(value)}`);
  }
  const entry = lookupSerializable(className);
  if (entry == null) {
    throw new Error(`${layerPrefix(layerName)}${kerasName(key)} '${
        className}' is not a class tfjs-layers knows`);
  }
  const instance = entry[1](entry[0], {...config}) as unknown as Record<string, unknown>;
  if (typeof instance.apply !== 'function') {
    throw new Error(
        `${layerPrefix(layerName)}${kerasName(key)} '${className}' is not of the expected kind`);
  }
  return instance as unknown as T;
}
