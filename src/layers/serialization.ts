/**
 * Initializers, regularizers and constraints given the way tfjs's Dense takes
 * them (an instance, an identifier such as 'glorotUniform', or a serialized
 * `{className, config}`), resolved through tfjs's serialization registry
 * (tfjs-layers' resolvers are not part of its public API).
 */
import * as tf from '@tensorflow/tfjs-core';

type Entry = [
  tf.serialization.SerializableConstructor<tf.serialization.Serializable>,
  tf.serialization.FromConfigMethod<tf.serialization.Serializable>
];

export type SerializedObject = {
  className: string,
  config: tf.serialization.ConfigDict,
};

/** A registered class by name, or by name in any case ('glorotUniform'). */
export function lookupSerializable(className: string): Entry|undefined {
  const map = tf.serialization.SerializationMap.getMap().classNameMap;
  if (map[className] != null) {
    return map[className] as Entry;
  }
  // Identifiers are class names in lower camel case ('glorotUniform', 'l1l2').
  const wanted = className.toLowerCase();
  const name = Object.keys(map).find(n => n.toLowerCase() === wanted);
  return name == null ? undefined : map[name] as Entry;
}

/**
 * An instance from an identifier, a serialized object or an instance.
 * `argName` and `layerName` make the error of an unknown name useful.
 */
export function resolveSerializable<T>(value: unknown, argName: string, layerName: string): T|null {
  if (value == null) {
    return null;
  }
  if (value instanceof tf.serialization.Serializable) {
    return value as unknown as T;
  }
  let className: string;
  let config: tf.serialization.ConfigDict = {};
  if (typeof value === 'string') {
    className = value;
  } else if (
      typeof value === 'object' && typeof (value as SerializedObject).className === 'string') {
    className = (value as SerializedObject).className;
    config = (value as SerializedObject).config ?? {};
  } else {
    throw new Error(`${layerName}: ${
        argName} must be a name, a {className, config} object or an instance, got ${typeof value}`);
  }
  const entry = lookupSerializable(className);
  if (entry == null) {
    throw new Error(`${layerName}: ${argName} '${
        className}' is not a known class (is @tensorflow/tfjs-layers loaded?)`);
  }
  return entry[1](entry[0], {...config}) as unknown as T;
}

/** `{className, config}` of an instance, or null. */
export function serializeObject(value: tf.serialization.Serializable|null|
                                undefined): SerializedObject|null {
  return value == null ? null : {className: value.getClassName(), config: value.getConfig()};
}
