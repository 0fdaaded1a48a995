/**
 * tfjs-layers 4.22's own `MultiHeadAttention` (and its `EinsumDense`), for
 * tests that compare against it. The class ships only as an ESM file,
 * `@tensorflow/tfjs-layers/dist/layers/nlp/multihead_attention.js`, outside
 * the package's bundles, so it is bundled here with esbuild into CommonJS
 * and evaluated against the SAME tfjs-core and tfjs-layers instances that
 * the test loaded:
 *
 * - `@tensorflow/tfjs-core` is the test's own module;
 * - `Layer`, `Softmax`, `Dropout` are the test's tfjs-layers classes, so the
 *   layers take part in its models, variables and `instanceof` checks;
 * - `getInitializer`/`getRegularizer`/`getConstraint`/`getActivation` and
 *   their `serialize*` counterparts are the test's tfjs-layers functions,
 *   reached through a `Dense` layer's constructor and `getConfig`;
 * - only private helpers without state or registration (errors, `cast`,
 *   `expandDims`, einsum_dense's string analysis) are bundled copies.
 *
 * The two files call three chained ops (`t.add`, `t.expandDims`,
 * `t.logicalAnd`), which only the `@tensorflow/tfjs` union package installs
 * on `Tensor.prototype`; the harness installs them for the duration of the
 * reference layers' calls only, so the code under test never sees them.
 *
 * The file's own `serialization.registerClass` calls are held back, so
 * loading the reference does not replace a `MultiHeadAttention` registered
 * by this package; `registerKerasMultiHeadAttention()` registers it on
 * demand (and gives back an undo).
 *
 * esbuild runs in a child process: its JS API refuses jest's realm
 * (its `Uint8Array` invariant check fails under jest).
 */
import {execFileSync} from 'child_process';
import * as path from 'path';

import * as tfc from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type {EinsumDense as EinsumDenseType} from '@tensorflow/tfjs-layers/dist/layers/nlp/einsum_dense';
import type {MultiHeadAttention as MultiHeadAttentionType, MultiHeadAttentionArgs} from '@tensorflow/tfjs-layers/dist/layers/nlp/multihead_attention';

export type{MultiHeadAttentionArgs};
export type KerasMultiHeadAttention = MultiHeadAttentionType;
export type KerasEinsumDense = EinsumDenseType;

export interface KerasMHAClasses {
  MultiHeadAttention: typeof MultiHeadAttentionType;
  EinsumDense: typeof EinsumDenseType;
}

/** Names of the modules the bundle takes from the test at evaluation. */
const HOST_CORE = 'keras-mha-host:tfjs-core';
const HOST_LAYERS = 'keras-mha-host:layers';

/**
 * Relative modules of tfjs-layers' dist that hold classes, registries or
 * state, answered by the test's instance (by path below dist/), with the
 * names each exports to the bundled files.
 */
const HOST_MODULES: Record<string, string[]> = {
  'engine/topology.js': ['Layer'],
  'layers/advanced_activations.js': ['Softmax'],
  'layers/core.js': ['Dropout'],
  'initializers.js': ['getInitializer', 'serializeInitializer'],
  'regularizers.js': ['getRegularizer', 'serializeRegularizer'],
  'constraints.js': ['getConstraint', 'serializeConstraint'],
  'activations.js': ['getActivation', 'serializeActivation'],
};

/** The esbuild script run by the child process (ESM, reads argv). */
const BUNDLE_SCRIPT = `
import * as esbuild from 'esbuild';
import * as path from 'path';
const [distDir, hostModulesJson, hostCore, hostLayers] = process.argv.slice(1);
const hostModules = JSON.parse(hostModulesJson);
const plugin = {
  name: 'keras-mha-host',
  setup(build) {
    build.onResolve({filter: /^@tensorflow\\/tfjs-core$/}, () =>
        ({path: hostCore, external: true}));
    build.onResolve({filter: /^@tensorflow\\//}, args => {
      throw new Error('keras_mha harness: unexpected import ' + args.path);
    });
    build.onResolve({filter: /^\\./}, args => {
      const file = path.resolve(args.resolveDir, args.path.endsWith('.js') ?
          args.path : args.path + '.js');
      const rel = path.relative(distDir, file).split(path.sep).join('/');
      if (hostModules[rel]) {
        return {path: rel, namespace: 'host'};
      }
      return {path: file};
    });
    build.onLoad({filter: /.*/, namespace: 'host'}, args => ({
      contents: 'import {host} from ' + JSON.stringify(hostLayers) + ';\\n' +
          hostModules[args.path].map(n =>
              'export const ' + n + ' = host[' + JSON.stringify(n) + '];')
              .join('\\n'),
      loader: 'js',
    }));
    build.onResolve({filter: /^keras-mha-host:/}, args =>
        ({path: args.path, external: true}));
  },
};
const entry = 'export {MultiHeadAttention} from ' +
    JSON.stringify(path.join(distDir, 'layers/nlp/multihead_attention.js')) +
    ';\\nexport {EinsumDense} from ' +
    JSON.stringify(path.join(distDir, 'layers/nlp/einsum_dense.js')) + ';\\n';
const result = await esbuild.build({
  stdin: {contents: entry, resolveDir: distDir, loader: 'js'},
  bundle: true, format: 'cjs', platform: 'node', target: 'es2020',
  write: false, logLevel: 'silent', plugins: [plugin],
});
process.stdout.write(result.outputFiles[0].text);
`;

/** A registered class of the test's tfjs-layers, checked to be a Layer. */
function registeredLayerClass(className: string): unknown {
  const entry = tfc.serialization.SerializationMap.getMap().classNameMap[className];
  const cls = entry?.[0] as unknown as {prototype: unknown} | undefined;
  if (cls == null || !(cls.prototype instanceof tfl.layers.Layer)) {
    throw new Error(`keras_mha harness: tfjs-layers has no registered layer ${className}`);
  }
  return cls;
}

type Resolver = (identifier: unknown) => unknown;

/**
 * tfjs-layers' private `get*`/`serialize*` functions, as its `Dense`
 * layer applies them to its arguments (the named layer takes no uid).
 */
function hostFunctions(): Record<string, unknown> {
  const Dense = registeredLayerClass('Dense') as new (args: Record<string, unknown>) =>
                    tfl.layers.Layer;
  const probe = (field: string, arg: string): Resolver => identifier => {
    const layer = new Dense({
                    units: 1,
                    name: 'keras_mha_harness_probe',
                    [arg]: identifier ?? undefined,
                  }) as unknown as Record<string, unknown>;
    return layer[field] ?? null;
  };
  const serialize = (arg: string, getter: Resolver): Resolver => instance => {
    if (instance == null) {
      return null;
    }
    const layer = new Dense({
      units: 1,
      name: 'keras_mha_harness_probe',
      [arg]: getter(instance),
    });
    return layer.getConfig()[arg] ?? null;
  };
  const getInitializer = probe('kernelInitializer', 'kernelInitializer');
  const getRegularizer = probe('kernelRegularizer', 'kernelRegularizer');
  const getConstraint = probe('kernelConstraint', 'kernelConstraint');
  const getActivation = probe('activation', 'activation');
  return {
    Layer: tfl.layers.Layer,
    Softmax: registeredLayerClass('Softmax'),
    Dropout: registeredLayerClass('Dropout'),
    getInitializer,
    serializeInitializer: serialize('kernelInitializer', getInitializer),
    getRegularizer,
    serializeRegularizer: serialize('kernelRegularizer', getRegularizer),
    getConstraint,
    serializeConstraint: serialize('kernelConstraint', getConstraint),
    getActivation,
    serializeActivation: serialize('activation', getActivation),
  };
}

/** The chained ops the bundled files call on tensors. */
const CHAINED_OPS = {
  add: (x: tfc.Tensor, b: tfc.Tensor) => tfc.add(x, b),
  expandDims: (x: tfc.Tensor, axis?: number) => tfc.expandDims(x, axis),
  logicalAnd: (x: tfc.Tensor, b: tfc.Tensor) => tfc.logicalAnd(x, b),
};

/** Runs `fn` with CHAINED_OPS on Tensor.prototype (those it lacks). */
function withChainedOps<T>(fn: () => T): T {
  const proto = tfc.Tensor.prototype as unknown as Record<string, unknown>;
  const added = Object.keys(CHAINED_OPS).filter(name => !(name in proto));
  for (const name of added) {
    const op = CHAINED_OPS[name as keyof typeof CHAINED_OPS] as (
                   x: tfc.Tensor, ...args: unknown[]) => tfc.Tensor;
    proto[name] = function(this: tfc.Tensor, ...args: unknown[]) {
      return op(this, ...args);
    };
  }
  try {
    return fn();
  } finally {
    for (const name of added) {
      delete proto[name];
    }
  }
}

/** Wraps the named methods of `cls.prototype` in withChainedOps. */
function wrapMethods(cls: {prototype: unknown}, names: string[]): void {
  const proto = cls.prototype as Record<string, (...args: unknown[]) => unknown>;
  for (const name of names) {
    const original = proto[name];
    proto[name] = function(this: unknown, ...args: unknown[]) {
      return withChainedOps(() => original.apply(this, args));
    };
  }
}

let bundleSource: string|undefined;

/** The CommonJS bundle's source (built once per module registry). */
export function kerasMHABundleSource(): string {
  if (bundleSource == null) {
    const distDir =
        path.join(path.dirname(require.resolve('@tensorflow/tfjs-layers/package.json')), 'dist');
    bundleSource = execFileSync(
        process.execPath,
        [
          '--input-type=module',
          '-e',
          BUNDLE_SCRIPT,
          distDir,
          JSON.stringify(HOST_MODULES),
          HOST_CORE,
          HOST_LAYERS,
        ],
        {encoding: 'utf8', maxBuffer: 64 << 20, cwd: path.dirname(distDir)});
  }
  return bundleSource;
}

let classes: KerasMHAClasses|undefined;
let heldBack: Array<{cls: unknown}> = [];

/**
 * tfjs-layers' own MultiHeadAttention and EinsumDense classes, bound to
 * this test's tfjs-core and tfjs-layers. Not registered for
 * deserialization (see `registerKerasMultiHeadAttention`).
 */
export function kerasMHAClasses(): KerasMHAClasses {
  if (classes == null) {
    const source = kerasMHABundleSource();
    const held: Array<{cls: unknown}> = [];
    // The bundle's `serialization.registerClass` is recorded, not run.
    const serialization = Object.assign({}, tfc.serialization, {
      registerClass: (cls: unknown) => {
        held.push({cls});
        return cls;
      },
    });
    const core = Object.assign({}, tfc, {serialization});
    const host = hostFunctions();
    const hostRequire = (name: string): unknown => {
      if (name === HOST_CORE) {
        return core;
      }
      if (name === HOST_LAYERS) {
        return {host};
      }
      throw new Error(`keras_mha harness: the bundle requires ${name}`);
    };
    const module = {exports: {} as Record<string, unknown>};
    const evaluate = new Function('require', 'module', 'exports', source);
    evaluate(hostRequire, module, module.exports);
    classes = {
      MultiHeadAttention: module.exports.MultiHeadAttention as typeof MultiHeadAttentionType,
      EinsumDense: module.exports.EinsumDense as typeof EinsumDenseType,
    };
    wrapMethods(classes.EinsumDense, ['call']);
    wrapMethods(classes.MultiHeadAttention, ['call', 'callAndReturnAttentionScores']);
    heldBack = held;
  }
  return classes;
}

/** A tfjs-layers MultiHeadAttention layer (its constructor's args). */
export function kerasMultiHeadAttention(args: MultiHeadAttentionArgs): KerasMultiHeadAttention {
  return new (kerasMHAClasses().MultiHeadAttention)(args);
}

/**
 * Registers tfjs-layers' MultiHeadAttention and EinsumDense under their
 * class names in tfjs-core's serialization map (replacing what is there)
 * and returns a function that restores the previous entries.
 */
export function registerKerasMultiHeadAttention(): () => void {
  kerasMHAClasses();
  const map = tfc.serialization.SerializationMap.getMap().classNameMap;
  const saved: Array<[string, typeof map[string] | undefined]> = [];
  for (const {cls} of heldBack) {
    const name = (cls as {className: string}).className;
    saved.push([name, map[name]]);
    tfc.serialization.SerializationMap.register(
        cls as tfc.serialization.SerializableConstructor<tfc.serialization.Serializable>);
  }
  return () => {
    for (const [name, entry] of saved.reverse()) {
      if (entry == null) {
        delete map[name];
      } else {
        map[name] = entry;
      }
    }
  };
}

/** Keras's weight names of a MultiHeadAttention layer, in Keras's order. */
export const KERAS_MHA_WEIGHT_NAMES = [
  'query/kernel',
  'query/bias',
  'key/kernel',
  'key/bias',
  'value/kernel',
  'value/bias',
  'attention_output/kernel',
  'attention_output/bias',
] as const;

/**
 * The variables of a built tfjs-layers MultiHeadAttention by Keras weight
 * name (biases absent with `useBias: false`). Its sublayers' variables are
 * not in `layer.weights`: tfjs-layers does not track sublayers.
 */
export function kerasMHAVariables(layer: KerasMultiHeadAttention): Map<string, tfl.LayerVariable> {
  const sublayers = {
    query: layer._queryDense,
    key: layer._keyDense,
    value: layer._valueDense,
    attention_output: layer._outputDense,
  };
  const variables = new Map<string, tfl.LayerVariable>();
  for (const [prefix, dense] of Object.entries(sublayers)) {
    if (dense == null || !dense.built) {
      throw new Error(`keras_mha harness: the layer is not built (${prefix})`);
    }
    variables.set(`${prefix}/kernel`, dense.kernel);
    if (dense.bias != null) {
      variables.set(`${prefix}/bias`, dense.bias);
    }
  }
  return variables;
}

/**
 * Builds `layer` for the given shapes (if it is not built) and writes the
 * values, keyed by Keras weight name, into its variables; every variable
 * must get a value of its shape.
 */
export function setKerasMHAWeights(
    layer: KerasMultiHeadAttention, values: Record<string, tfc.Tensor>,
    shapes?: {query: number[], value: number[], key?: number[]}): void {
  if (!layer._queryDense?.built) {
    if (shapes == null) {
      throw new Error('keras_mha harness: an unbuilt layer needs shapes');
    }
    // Builds the sublayers' variables with one call on zeros.
    tfc.tidy(() => {
      const key = shapes.key ? tfc.zeros(shapes.key) : undefined;
      layer.call(tfc.zeros(shapes.query), {value: tfc.zeros(shapes.value), key});
    });
  }
  const variables = kerasMHAVariables(layer);
  for (const [name, variable] of variables) {
    const value = values[name];
    if (value == null) {
      throw new Error(`keras_mha harness: no value for ${name}`);
    }
    variable.write(value);
  }
  for (const name of Object.keys(values)) {
    if (!variables.has(name)) {
      throw new Error(`keras_mha harness: the layer has no weight ${name}`);
    }
  }
}

/**
 * Frees the variables of a tfjs-layers MultiHeadAttention (its own
 * `dispose` leaves the sublayers' variables, and refuses a layer that was
 * only `call`ed).
 */
export function disposeKerasMHA(layer: KerasMultiHeadAttention): void {
  for (const dense of [layer._queryDense, layer._keyDense, layer._valueDense, layer._outputDense]) {
    if (dense != null && dense.built) {
      dense.dispose();
    }
  }
}
