/**
 * Keras's `MultiHeadAttention` for tfjs-layers, computed by flashAttention.
 *
 * Registered for deserialization under the class name `MultiHeadAttention`
 * when this module is imported and no class of that name is registered
 * yet, so Keras models converted to the tfjs layers format load with
 * `tf.loadLayersModel`. Reads Keras's config (snake_case in model.json) and
 * Keras's weight layout and names (`<layer>/query/kernel` `[E, H, keyDim]`,
 * `<layer>/query/bias` `[H, keyDim]`, likewise key and value,
 * `<layer>/attention_output/kernel` `[H, valueDim, E]`,
 * `<layer>/attention_output/bias` `[E]`).
 *
 * Attention runs through flashAttention (fused where the backend has a
 * kernel) when it can express the call: no attention mask, no returned
 * scores, and Keras's causal mask (top-left aligned) when Sq >= Sk. Other
 * calls run a composed path with Keras's exact semantics
 * (keras_attention.ts).
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type {Constraint} from '@tensorflow/tfjs-layers/dist/constraints';
import type {LayerArgs} from '@tensorflow/tfjs-layers/dist/engine/topology';
import type {Initializer} from '@tensorflow/tfjs-layers/dist/initializers';
import type {Shape} from '@tensorflow/tfjs-layers/dist/keras_format/common';
import type {Regularizer} from '@tensorflow/tfjs-layers/dist/regularizers';
import type {Kwargs} from '@tensorflow/tfjs-layers/dist/types';
import {flashAttention, KVCache, MAX_HEAD_DIM, paddingMaskLengths, valuesOnHost} from 'tfjs-flash-attention';

import {kerasCausalMask, kerasMaskedAttention} from './keras_attention';
import {checkDType, checkKnownKeys, describe, intList, kerasName, layerPrefix, positiveInt, resolveObject} from './keras_config';
import {serializeObject} from './serialization';
import {installFunctionalRewrite, KERAS_CALL_KEY, KerasCall, KerasCallRole} from './keras_functional';

type AnyTensor = tf.Tensor|tfl.SymbolicTensor;
type LayerIO = tf.Tensor|tf.Tensor[]|tfl.SymbolicTensor|tfl.SymbolicTensor[];

/** Keras's constructor arguments, in tfjs's camelCase. */
export interface MultiHeadAttentionArgs extends LayerArgs {
  numHeads: number;
  keyDim: number;
  /** Head size of the values; defaults to keyDim. */
  valueDim?: number|null;
  /** Dropout rate of the attention probabilities (training only). */
  dropout?: number;
  useBias?: boolean;
  /** Last dims of the output; defaults to the query's last dim. */
  outputShape?: number|number[]|null;
  /**
   * Axes attention runs over: only the default (every axis between the
   * batch and the features) is supported.
   */
  attentionAxes?: number|number[]|null;
  kernelInitializer?: unknown;
  biasInitializer?: unknown;
  kernelRegularizer?: unknown;
  biasRegularizer?: unknown;
  /** Not supported (tfjs-layers cannot apply activity regularizers). */
  activityRegularizer?: unknown;
  kernelConstraint?: unknown;
  biasConstraint?: unknown;
  /** Keras 2 records the shapes the layer was built with. */
  queryShape?: Shape|null;
  keyShape?: Shape|null;
  valueShape?: Shape|null;
}

/** Keras's call arguments, in tfjs's camelCase (as tfjs-layers' own MHA). */
export interface MultiHeadAttentionCallArgs {
  value: AnyTensor;
  key?: AnyTensor|null;
  /** `[B, T, S]` (or broadcastable from fewer leading dims); 1 = attend. */
  attentionMask?: AnyTensor|null;
  /** Keras's causal mask: query i sees keys j <= i. */
  useCausalMask?: boolean;
  /** Also output the attention probabilities `[B, H, T, S]`. */
  returnAttentionScores?: boolean;
  training?: boolean;
}

const ROLE_ORDER: KerasCallRole[] = ['query', 'value', 'key', 'mask'];

function product(dims: number[]): number {
  return dims.reduce((a, b) => a * b, 1);
}

/**
 * Keras's value on the rows a padding mask leaves without keys (every row
 * of a batch row with no key, and masked query rows): every score at
 * -1e9, a uniform softmax, the mean of V over all keys. Every row of a
 * batch row with a real key sees key 0 (also under the causal mask), so
 * the other rows keep `context`. A blend with the mean as a matmul rather
 * than tf.where against tf.mean: where broadcasts through Tile, whose
 * gradient runs a slice and an add per repeat (2 Sq dispatches), and
 * Mean's gradient uploads ones(v.shape) from the host.
 */
function kerasRowsWithoutKeys(
    context: tf.Tensor4D, v: tf.Tensor4D, keyMask: tf.Tensor|null,
    queryMask: tf.Tensor|null): tf.Tensor4D {
  const [b, sq, h, dv] = context.shape;
  const sk = v.shape[1];
  const rowMasks = [
    ...(keyMask == null ? [] : [tf.reshape(tf.any(tf.cast(keyMask, 'bool'), 1), [b, 1, 1, 1])]),
    ...(queryMask == null ? [] : [tf.reshape(tf.cast(queryMask, 'bool'), [b, sq, 1, 1])]),
  ];
  if (rowMasks.length === 0) {
    return context;
  }
  const keep = rowMasks.length === 1 ? rowMasks[0] : tf.logicalAnd(rowMasks[0], rowMasks[1]);
  const meanV = tf.reshape(
      tf.matMul(tf.fill([b, 1, sk], 1 / sk), tf.reshape(v, [b, sk, h * dv])), [b, 1, h, dv]);
  return tf.add(
             tf.mul(context, tf.cast(keep, 'float32')),
             tf.mul(meanV, tf.cast(tf.logicalNot(keep), 'float32'))) as tf.Tensor4D;
}

function isTensorLike(x: unknown): x is AnyTensor {
  return x instanceof tf.Tensor || x instanceof tfl.SymbolicTensor;
}

function sameCall(a: KerasCall, b: KerasCall): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

export class MultiHeadAttention extends tfl.layers.Layer {
  static className = 'MultiHeadAttention';

  readonly numHeads: number;
  readonly keyDim: number;
  readonly valueDim: number;
  readonly dropout: number;
  readonly useBias: boolean;
  /** The output's last dims, or null for the query's last dim. */
  readonly outputDims: number[]|null;
  /** As configured (validated against the input rank when built). */
  readonly attentionAxes: number[]|null;
  readonly kernelInitializer: Initializer;
  readonly biasInitializer: Initializer;
  readonly kernelRegularizer: Regularizer|null;
  readonly biasRegularizer: Regularizer|null;
  readonly kernelConstraint: Constraint|null;
  readonly biasConstraint: Constraint|null;

  private queryShape: Shape|null;
  private keyShape: Shape|null;
  private valueShape: Shape|null;
  /** The call of this layer's node in a model (see apply). */
  private nodeCall: KerasCall|null = null;
  /** The call being applied (read by build and computeOutputShape). */
  private pendingCall: KerasCall|null = null;
  /** The current call's Keras masks, split (set by implicitMask). */
  private maskParts: {query: tf.Tensor|null, key: tf.Tensor|null}|null = null;
  private kernels: Record<string, tfl.LayerVariable> = {};
  private biases: Record<string, tfl.LayerVariable> = {};

  constructor(args: MultiHeadAttentionArgs) {
    const prefixName = args.name;
    checkDType(args.dtype, prefixName);
    super({...args, dtype: args.dtype == null ? undefined : 'float32'});
    this.supportsMasking = true;
    this.numHeads = positiveInt(args.numHeads, 'numHeads', this.name);
    this.keyDim = positiveInt(args.keyDim, 'keyDim', this.name);
    this.valueDim =
        args.valueDim == null ? this.keyDim : positiveInt(args.valueDim, 'valueDim', this.name);
    const dropout = args.dropout ?? 0;
    if (typeof dropout !== 'number' || !(dropout >= 0 && dropout < 1)) {
      throw new Error(`${layerPrefix(this.name)}dropout must be a number in [0, 1), got ${
          describe(args.dropout)}`);
    }
    this.dropout = dropout;
    const useBias = args.useBias ?? true;
    if (typeof useBias !== 'boolean') {
      throw new Error(
          `${layerPrefix(this.name)}use_bias must be a boolean, got ${describe(args.useBias)}`);
    }
    this.useBias = useBias;
    this.outputDims = intList(args.outputShape, 'outputShape', this.name, 1);
    this.attentionAxes = intList(args.attentionAxes, 'attentionAxes', this.name, 0);
    this.kernelInitializer = resolveObject<Initializer>(
        args.kernelInitializer ?? 'glorotUniform', 'kernelInitializer', this.name)!;
    this.biasInitializer =
        resolveObject<Initializer>(args.biasInitializer ?? 'zeros', 'biasInitializer', this.name)!;
    this.kernelRegularizer =
        resolveObject<Regularizer>(args.kernelRegularizer, 'kernelRegularizer', this.name);
    this.biasRegularizer =
        resolveObject<Regularizer>(args.biasRegularizer, 'biasRegularizer', this.name);
    if (args.activityRegularizer != null) {
      const given = args.activityRegularizer instanceof tf.serialization.Serializable ?
          serializeObject(args.activityRegularizer) :
          args.activityRegularizer;
      throw new Error(`${layerPrefix(this.name)}activity_regularizer ${
          describe(given)} is not supported (tfjs-layers cannot apply activity regularizers)`);
    }
    this.kernelConstraint =
        resolveObject<Constraint>(args.kernelConstraint, 'kernelConstraint', this.name);
    this.biasConstraint =
        resolveObject<Constraint>(args.biasConstraint, 'biasConstraint', this.name);
    this.queryShape = args.queryShape ?? null;
    this.keyShape = args.keyShape ?? null;
    this.valueShape = args.valueShape ?? null;
    if (this.queryShape != null) {
      // Keras 2 configs know the input rank: check the axes at load.
      this.checkAttentionAxes(this.queryShape.length);
    }
  }

  /**
   * Keras's convention (as tfjs-layers' own MultiHeadAttention):
   * `apply(query, {value, key?, attentionMask?, useCausalMask?,
   * returnAttentionScores?, training?})`, or `apply([query, value, key?])`.
   * The tensors become the node's inputs; the options are kept as the
   * node's `kerasCall`.
   */
  override apply(inputs: LayerIO, kwargs?: Kwargs): LayerIO {
    const [list, call] = this.normalizeCall(inputs, kwargs ?? {});
    const symbolic = list.some(t => t instanceof tfl.SymbolicTensor);
    if (symbolic && this.nodeCall != null && !sameCall(this.nodeCall, call)) {
      throw new Error(`${
          layerPrefix(this.name)}the layer is called twice with different call arguments (${
          describe(this.nodeCall)} and ${describe(call)}); a shared layer must be called alike`);
    }
    this.pendingCall = call;
    try {
      const rest: Kwargs = {[KERAS_CALL_KEY]: call};
      for (const runtime of ['mask', 'training']) {
        if (kwargs?.[runtime] != null) {
          rest[runtime] = kwargs[runtime];
        }
      }
      const result = super.apply(list as LayerIO, rest);
      if (symbolic) {
        this.nodeCall = call;
      }
      return result;
    } finally {
      this.pendingCall = null;
    }
  }

  /** The inputs in ROLE_ORDER order and the call, from either convention. */
  private normalizeCall(inputs: LayerIO, kwargs: Kwargs): [AnyTensor[], KerasCall] {
    if (kwargs[KERAS_CALL_KEY] != null) {
      const call = this.checkStoredCall(kwargs[KERAS_CALL_KEY]);
      const list = Array.isArray(inputs) ? inputs : [inputs];
      if (list.length !== call.inputs.length) {
        throw new Error(`${layerPrefix(this.name)}expected ${call.inputs.length} inputs (${
            call.inputs.join(', ')}), got ${list.length}`);
      }
      return [list, call];
    }
    if (Array.isArray(inputs) && kwargs.value == null && this.nodeCall != null &&
        inputs.length === this.nodeCall.inputs.length &&
        inputs.every(t => t instanceof tf.Tensor)) {
      // tfjs-layers' executor (predict, fit) runs a model's layers with the
      // node's input values and no node kwargs: the node's call applies.
      return [inputs, this.nodeCall];
    }
    const byRole: Partial<Record<KerasCallRole, AnyTensor>> = {};
    if (Array.isArray(inputs)) {
      if (inputs.length < 1 || inputs.length > 3) {
        throw new Error(
            `${layerPrefix(this.name)}inputs must be query or [query, value, key?], got ${
                inputs.length} tensors`);
      }
      [byRole.query, byRole.value, byRole.key] = inputs;
    } else {
      byRole.query = inputs;
    }
    for (const [role, arg] of [['value', 'value'], ['key', 'key'], ['mask', 'attentionMask']] as
         const) {
      const given = kwargs[arg];
      if (given == null) {
        continue;
      }
      if (!isTensorLike(given)) {
        throw new Error(
            `${layerPrefix(this.name)}${kerasName(arg)} must be a tensor, got ${describe(given)}`);
      }
      if (byRole[role] != null) {
        throw new Error(`${layerPrefix(this.name)}${kerasName(arg)} is given twice`);
      }
      byRole[role] = given;
    }
    if (byRole.value == null) {
      throw new Error(
          `${layerPrefix(this.name)}the call needs a value tensor: apply(query, {value})`);
    }
    const flag = (name: string): boolean => {
      const value = kwargs[name] ?? false;
      if (typeof value !== 'boolean') {
        throw new Error(`${layerPrefix(this.name)}${kerasName(name)} must be a boolean, got ${
            describe(value)}`);
      }
      return value;
    };
    const roles = ROLE_ORDER.filter(r => byRole[r] != null);
    const call: KerasCall = {
      inputs: roles,
      useCausalMask: flag('useCausalMask'),
      returnAttentionScores: flag('returnAttentionScores'),
      // A training flag given to apply is the runtime mode, not a node's.
      training: null,
      constantMask: null,
    };
    return [roles.map(r => byRole[r]!), call];
  }

  private checkStoredCall(value: unknown): KerasCall {
    const call = value as KerasCall;
    const ok = call != null && Array.isArray(call.inputs) && call.inputs[0] === 'query' &&
        call.inputs[1] === 'value' && call.inputs.every(r => ROLE_ORDER.includes(r)) &&
        typeof call.useCausalMask === 'boolean' && typeof call.returnAttentionScores === 'boolean';
    if (!ok) {
      throw new Error(`${layerPrefix(this.name)}malformed ${KERAS_CALL_KEY} ${describe(value)}`);
    }
    return {
      inputs: call.inputs,
      useCausalMask: call.useCausalMask,
      returnAttentionScores: call.returnAttentionScores,
      training: call.training ?? null,
      constantMask: call.constantMask ?? null,
    };
  }

  /** The call for build/computeOutputShape/call: applied, stored or default. */
  private currentCall(kwargs?: Kwargs): KerasCall {
    const stored = kwargs?.[KERAS_CALL_KEY];
    if (stored != null) {
      return this.checkStoredCall(stored);
    }
    const call = this.pendingCall ?? this.nodeCall;
    if (call != null) {
      return call;
    }
    return {
      inputs: ['query', 'value'],
      useCausalMask: false,
      returnAttentionScores: false,
      training: null,
      constantMask: null
    };
  }

  private shapesByRole(inputShape: Shape|Shape[], call: KerasCall):
      Record<'query'|'value'|'key', Shape>&{mask?: Shape} {
    const shapes = (Array.isArray(inputShape[0]) ? inputShape : [inputShape]) as Shape[];
    if (shapes.length !== call.inputs.length) {
      throw new Error(`${layerPrefix(this.name)}expected ${call.inputs.length} inputs (${
          call.inputs.join(', ')}), got ${shapes.length}`);
    }
    const get = (role: KerasCallRole) => shapes[call.inputs.indexOf(role)];
    const value = get('value');
    return {
      query: get('query'),
      value,
      key: call.inputs.includes('key') ? get('key') : value,
      mask: call.inputs.includes('mask') ? get('mask') : undefined,
    };
  }

  /** Only the default axes: every axis between batch and features. */
  private checkAttentionAxes(rank: number): void {
    if (rank < 3) {
      throw new Error(
          `${layerPrefix(this.name)}inputs must have rank >= 3 ([batch, ..., features]), got rank ${
              rank}`);
    }
    if (this.attentionAxes == null) {
      return;
    }
    const expected = Array.from({length: rank - 2}, (_, i) => i + 1);
    const given = [...this.attentionAxes].sort((a, b) => a - b);
    if (given.length !== expected.length || given.some((a, i) => a !== expected[i])) {
      throw new Error(`${layerPrefix(this.name)}attention_axes ${
          describe(
              this.attentionAxes)} is not supported: only attention over all the axes between batch and features (${
          describe(expected)} for inputs of rank ${rank}, the default)`);
    }
  }

  override build(inputShape: Shape|Shape[]): void {
    const call = this.currentCall();
    const shapes = this.shapesByRole(inputShape, call);
    const rank = shapes.query.length;
    this.checkAttentionAxes(rank);
    for (const role of ['value', 'key'] as const) {
      if (shapes[role].length !== rank) {
        throw new Error(`${layerPrefix(this.name)}${role} must have the rank of query (${
            rank}), got shape ${describe(shapes[role])}`);
      }
    }
    const lastDim = (role: 'query'|'value'|'key') => {
      const d = shapes[role][shapes[role].length - 1];
      if (d == null) {
        throw new Error(`${layerPrefix(this.name)}the last dim of ${
            role} must be known, got shape ${describe(shapes[role])}`);
      }
      return d;
    };
    const [eq, ev, ek] = [lastDim('query'), lastDim('value'), lastDim('key')];
    const h = this.numHeads;
    const outDims = this.outputDims ?? [eq];
    // Keras's order and names, so weights load by name and getWeights()
    // lists them as Keras does.
    const specs: Array<[string, number[], number[]]> = [
      ['query', [eq, h, this.keyDim], [h, this.keyDim]],
      ['key', [ek, h, this.keyDim], [h, this.keyDim]],
      ['value', [ev, h, this.valueDim], [h, this.valueDim]],
      ['attention_output', [h, this.valueDim, ...outDims], outDims],
    ];
    for (const [name, kernelShape, biasShape] of specs) {
      this.kernels[name] = this.addWeight(
          `${name}/kernel`, kernelShape, 'float32', this.kernelInitializer,
          this.kernelRegularizer ?? undefined, true, this.kernelConstraint ?? undefined);
      if (this.useBias) {
        this.biases[name] = this.addWeight(
            `${name}/bias`, biasShape, 'float32', this.biasInitializer,
            this.biasRegularizer ?? undefined, true, this.biasConstraint ?? undefined);
      }
    }
    this.queryShape = shapes.query;
    this.valueShape = shapes.value;
    this.keyShape = shapes.key;
    this.built = true;
  }

  override computeOutputShape(inputShape: Shape|Shape[]): Shape|Shape[] {
    const call = this.currentCall();
    const shapes = this.shapesByRole(inputShape, call);
    const q = shapes.query;
    const outDims = this.outputDims ?? [q[q.length - 1]];
    const output: Shape = [...q.slice(0, -1), ...outDims];
    if (!call.returnAttentionScores) {
      return output;
    }
    const scores: Shape = [q[0], this.numHeads, ...q.slice(1, -1), ...shapes.value.slice(1, -1)];
    return [output, scores];
  }

  override computeMask(inputs: AnyTensor|AnyTensor[], mask?: tf.Tensor|tf.Tensor[]): tf.Tensor
      |tf.Tensor[] {
    // Keras: the output carries the query's mask.
    const queryMask = (Array.isArray(mask) ? mask[0] : mask) ?? null;
    if (this.currentCall().returnAttentionScores) {
      return [queryMask, null] as unknown as tf.Tensor[];
    }
    return queryMask as tf.Tensor;
  }

  override call(inputs: tf.Tensor|tf.Tensor[], kwargs: Kwargs): tf.Tensor|tf.Tensor[] {
    return tf.tidy(() => {
      let list = Array.isArray(inputs) ? inputs : [inputs];
      let call: KerasCall;
      if (kwargs[KERAS_CALL_KEY] == null && kwargs.value != null) {
        // tfjs-layers' MultiHeadAttention convention: call(query, {value}).
        [list, call] = this.normalizeCall(inputs, kwargs) as [tf.Tensor[], KerasCall];
      } else {
        call = this.currentCall(kwargs);
      }
      if (list.length !== call.inputs.length) {
        throw new Error(`${layerPrefix(this.name)}expected ${call.inputs.length} inputs (${
            call.inputs.join(', ')}), got ${list.length}`);
      }
      const get = (role: KerasCallRole) => {
        const i = call.inputs.indexOf(role);
        return i < 0 ? null : list[i];
      };
      const training = call.training ?? (kwargs.training === true);
      let mask = get('mask');
      if (mask == null && call.constantMask != null) {
        mask = tf.tensor(call.constantMask as number[]);
      }
      const autoMask = this.implicitMask(kwargs.mask, list, call);
      const [out, scores] = this.attend(
          get('query')!, get('value')!, get('key'), mask, autoMask, call.useCausalMask,
          call.returnAttentionScores, training);
      return call.returnAttentionScores ? [out, scores!] : out;
    });
  }

  /**
   * Keras folds the masks its inputs carry (Embedding(mask_zero=True),
   * Masking) into the attention mask: `query_mask[:, :, None] &
   * value_mask[:, None, :]` (& the key's). tfjs-layers passes them as
   * `kwargs.mask`: one per input from its graph runner (which computes a
   * nested model's masks), but only the first input's from its executor
   * (`predict`, `fit`, `apply`, `call`), which therefore serves when value
   * (and key) are the query itself (self-attention); otherwise the call is
   * refused.
   */
  private implicitMask(given: unknown, inputs: tf.Tensor[], call: KerasCall): tf.Tensor|null {
    this.maskParts = null;
    if (given == null) {
      return null;
    }
    let byInput: Array<tf.Tensor|null|undefined>;
    if (Array.isArray(given)) {
      byInput = inputs.map((_, i) => given[i] ?? null);
    } else {
      // The executor's mask is the first input's; an input that is the
      // query itself has it too; the others' are unknown.
      byInput = inputs.map((t, i) => (i === 0 || t === inputs[0]) ? given as tf.Tensor : undefined);
    }
    const maskOf = (role: KerasCallRole) => {
      const i = call.inputs.indexOf(role);
      return i < 0 ? null : byInput[i];
    };
    const roles: KerasCallRole[] =
        call.inputs.includes('key') ? ['query', 'value', 'key'] : ['query', 'value'];
    const masks = roles.map(maskOf);
    if (masks.every(m => m == null)) {
      return null;
    }
    if (masks.some(m => m === undefined)) {
      throw new Error(`${
          layerPrefix(
              this.name)}inputs with a Keras mask (e.g. from Embedding(mask_zero=True)) are supported only for self-attention in predict/fit/apply (tfjs-layers' executor passes a layer only its first input's mask): pass the padding as attention_mask`);
    }
    const query = inputs[0];
    const [queryMask, ...keyMasks] = masks as Array<tf.Tensor|null>;
    const expectMask = (m: tf.Tensor, t: tf.Tensor, role: string) => {
      if (query.rank !== 3 || m.rank !== 2 || m.shape[0] !== t.shape[0] ||
          m.shape[1] !== t.shape[1]) {
        throw new Error(`${layerPrefix(this.name)}the Keras mask of ${role} must have shape ${
            describe(t.shape.slice(0, 2))} (inputs of rank 3), got ${describe(m.shape)}`);
      }
      return tf.cast(m, 'bool');
    };
    const queryBool = queryMask == null ? null : expectMask(queryMask, query, 'query');
    let auto: tf.Tensor|null = queryBool == null ? null : tf.expandDims(queryBool, 2);
    let keyBool: tf.Tensor|null = null;
    keyMasks.forEach((m, i) => {
      if (m != null) {
        const t = inputs[call.inputs.indexOf(roles[i + 1])];
        const mb = expectMask(m, t, roles[i + 1]);
        keyBool = keyBool == null ? mb : tf.logicalAnd(keyBool, mb);
        const keys = tf.expandDims(mb, 1);
        auto = auto == null ? keys : tf.logicalAnd(auto, keys);
      }
    });
    this.maskParts = {query: queryBool, key: keyBool};
    return auto;
  }

  /**
   * The `[B, Sk]` bool key padding mask (and the queries' mask) when the
   * call's masks are padding masks the fused path can take, else null
   * (docs/varlen.md). Nothing is read back on GPU backends.
   */
  private paddingOf(
      attentionMask: tf.Tensor|null, autoMask: tf.Tensor|null, b: number, sq: number,
      sk: number): {keyMask: tf.Tensor|null, query: tf.Tensor|null}|null {
    if (attentionMask != null) {
      if (autoMask != null || attentionMask.rank !== 3 || attentionMask.shape[0] !== b ||
          attentionMask.shape[2] !== sk ||
          (attentionMask.shape[1] !== 1 && attentionMask.shape[1] !== sq)) {
        return null;
      }
      // With several query rows, each must carry the same key padding mask:
      // checked only where the mask's values are in host memory (reading
      // one that lives on the GPU would stall on it): else the composed path.
      const rows = attentionMask.shape[1];
      if (rows > 1) {
        if (!valuesOnHost(attentionMask)) {
          return null;
        }
        const values = attentionMask.dataSync() as ArrayLike<number>;
        for (let bi = 0; bi < b; bi++) {
          for (let i = 1; i < rows; i++) {
            for (let j = 0; j < sk; j++) {
              if (values[(bi * rows + i) * sk + j] !== values[bi * rows * sk + j]) {
                return null;
              }
            }
          }
        }
      }
      const first =
          tf.reshape(tf.slice(tf.cast(attentionMask, 'bool'), [0, 0, 0], [b, 1, sk]), [b, sk]);
      return paddingMaskLengths(first) == null ? null : {keyMask: first, query: null};
    }
    const parts = this.maskParts;
    if (autoMask == null || parts == null) {
      return null;
    }
    if (parts.key != null && paddingMaskLengths(parts.key) == null) {
      return null;
    }
    return {keyMask: parts.key, query: parts.query};
  }

  /**
   * A KV cache for `decode` (`numHeads` kv heads of `keyDim` and
   * `valueDim`). The caller owns it: dispose() it when generation ends.
   */
  createCache(batch: number, maxSeqLen: number): KVCache {
    return new KVCache(
        {batch, maxSeqLen, headsKV: this.numHeads, headDim: this.keyDim, headDimV: this.valueDim});
  }

  /**
   * Incremental decoding of causal self-attention (query = value = key,
   * `use_causal_mask=True`): `x [B, Snew, features]` are the next tokens;
   * their keys and values are appended to `cache` and the result equals
   * the last Snew rows of the call on the whole sequence. Inference only
   * (no dropout, no masks); inputs of rank 3.
   */
  decode(x: tf.Tensor, cache: KVCache): tf.Tensor {
    if (!this.built) {
      throw new Error(`${layerPrefix(this.name)}decode: the layer is not built (apply it first)`);
    }
    if (!(cache instanceof KVCache) || cache.headsKV !== this.numHeads ||
        cache.headDim !== this.keyDim || cache.headDimV !== this.valueDim) {
      throw new Error(`${layerPrefix(this.name)}decode: cache must be a KVCache from createCache`);
    }
    if (x.rank !== 3 || x.shape[0] !== cache.batch) {
      throw new Error(`${layerPrefix(this.name)}decode: x must have shape [batch = ${
          cache.batch}, Snew, features], got ${describe(x.shape)}`);
    }
    return tf.tidy(() => {
      const [b, seqNew, features] = x.shape;
      const h = this.numHeads;
      const q =
          tf.reshape(this.project(x, 'query', [h, this.keyDim]), [b, seqNew, h, this.keyDim]) as
          tf.Tensor4D;
      const k = tf.reshape(this.project(x, 'key', [h, this.keyDim]), [b, seqNew, h, this.keyDim]) as
          tf.Tensor4D;
      const v =
          tf.reshape(this.project(x, 'value', [h, this.valueDim]), [b, seqNew, h, this.valueDim]) as
          tf.Tensor4D;
      // Keras's causal mask is top-left aligned on the whole sequence,
      // which is the cache's bottom-right alignment.
      const context =
          cache.attend(q, k, v, {softmaxScale: 1 / Math.sqrt(this.keyDim), causal: true});
      return this.project(
          tf.reshape(context, [b, seqNew, h * this.valueDim]), 'attention_output',
          this.outputDims ?? [features]);
    });
  }

  /** Keras's EinsumDense projection `[..., in] x [in, ...out] + [...out]`. */
  private project(x: tf.Tensor, name: string, outDims: number[]): tf.Tensor {
    const kernel = this.kernels[name].read();
    const inDim = x.shape[x.rank - 1];
    const rows = product(x.shape.slice(0, -1));
    const cols = product(outDims);
    let y: tf.Tensor = tf.matMul(tf.reshape(x, [rows, inDim]), tf.reshape(kernel, [inDim, cols]));
    if (this.useBias) {
      y = tf.add(y, tf.reshape(this.biases[name].read(), [cols]));
    }
    return tf.reshape(y, [...x.shape.slice(0, -1), ...outDims]);
  }

  private attend(
      query: tf.Tensor, value: tf.Tensor, key: tf.Tensor|null, attentionMask: tf.Tensor|null,
      autoMask: tf.Tensor|null, useCausalMask: boolean, returnScores: boolean,
      training: boolean): [tf.Tensor, tf.Tensor|null] {
    key = key ?? value;
    const rank = query.rank;
    if (value.rank !== rank || key.rank !== rank) {
      throw new Error(
          `${layerPrefix(this.name)}query, value and key must have the same rank, got shapes ${
              describe(query.shape)}, ${describe(value.shape)}, ${describe(key.shape)}`);
    }
    const b = query.shape[0];
    const queryDims = query.shape.slice(1, -1);
    const keyDims = value.shape.slice(1, -1);
    if (describe(key.shape.slice(0, -1)) !== describe(value.shape.slice(0, -1))) {
      throw new Error(
          `${layerPrefix(this.name)}key and value must agree on all but the last dim, got ${
              describe(key.shape)} and ${describe(value.shape)}`);
    }
    if (useCausalMask && rank !== 3) {
      throw new Error(
          `${layerPrefix(this.name)}use_causal_mask needs inputs of rank 3, got rank ${rank}`);
    }
    // Attention over all the middle axes jointly = over them flattened.
    const sq = product(queryDims);
    const sk = product(keyDims);
    const h = this.numHeads;
    const q = tf.reshape(this.project(query, 'query', [h, this.keyDim]), [b, sq, h, this.keyDim]) as
        tf.Tensor4D;
    const k = tf.reshape(this.project(key, 'key', [h, this.keyDim]), [b, sk, h, this.keyDim]) as
        tf.Tensor4D;
    const v =
        tf.reshape(this.project(value, 'value', [h, this.valueDim]), [b, sk, h, this.valueDim]) as
        tf.Tensor4D;
    const scale = 1 / Math.sqrt(this.keyDim);
    const dropoutRate = training ? this.dropout : 0;
    let context: tf.Tensor4D;
    let scores: tf.Tensor|null = null;
    // flashAttention's causal mask is bottom-right aligned; Keras's is
    // top-left: the same when Sq == Sk, a right window of Sq - Sk when
    // Sq > Sk, not expressible when Sq < Sk.
    // Head dims beyond flashAttention's kernels and empty inputs take the
    // composed path too.
    const fusable = !returnScores && this.keyDim <= MAX_HEAD_DIM && this.valueDim <= MAX_HEAD_DIM &&
        b * sq * sk > 0;
    const fused =
        fusable && attentionMask == null && autoMask == null && (!useCausalMask || sq >= sk);
    // Padding masks (the inputs' Keras masks, or an attention_mask whose
    // rows are one key padding mask) run fused as a key padding mask, with
    // or without the causal mask (its diagonal stays on the padded length).
    const padding = fusable && !fused && (!useCausalMask || sq >= sk) && rank === 3 ?
        this.paddingOf(attentionMask, autoMask, b, sq, sk) :
        null;
    if (padding != null) {
      context = flashAttention(q, k, v, {
                  softmaxScale: scale,
                  causal: useCausalMask && sq === sk,
                  windowSize: useCausalMask && sq > sk ? [-1, sq - sk] : undefined,
                  dropoutRate,
                  ...(padding.keyMask == null ? {} : {keyPaddingMask: padding.keyMask}),
                }) as tf.Tensor4D;
      context = kerasRowsWithoutKeys(context, v, padding.keyMask, padding.query);
    } else if (fused) {
      context = flashAttention(q, k, v, {
                  softmaxScale: scale,
                  causal: useCausalMask && sq === sk,
                  windowSize: useCausalMask && sq > sk ? [-1, sq - sk] : undefined,
                  dropoutRate,
                }) as tf.Tensor4D;
    } else {
      let mask: tf.Tensor|null = null;
      if (attentionMask != null) {
        const m = rank === 3 ? attentionMask :
                               tf.reshape(attentionMask, [attentionMask.shape[0], sq, sk]);
        // Keras adds the heads axis (and a batch axis) at -3: the mask must
        // then broadcast to the scores [B, H, Sq, Sk].
        const expanded = m.rank === 2 ? [1, 1, ...m.shape] :
            m.rank === 3              ? [m.shape[0], 1, m.shape[1], m.shape[2]] :
                                        m.shape;
        const scoresShape = [b, h, sq, sk];
        const ok =
            m.rank >= 2 && m.rank <= 4 && expanded.every((d, i) => d === 1 || d === scoresShape[i]);
        if (!ok) {
          throw new Error(`${layerPrefix(this.name)}attention_mask must have shape ${
              describe([b, sq, sk])} (or broadcast to it), got ${describe(attentionMask.shape)}`);
        }
        mask = m;
      }
      // Keras: the inputs' masks and the causal mask, and with them the
      // given mask as booleans.
      let auto = autoMask;
      if (useCausalMask) {
        const causal = kerasCausalMask(sq, sk);
        auto = auto == null ? causal : tf.logicalAnd(auto, causal);
      }
      if (auto != null) {
        mask = mask == null ? auto : tf.logicalAnd(tf.cast(mask, 'bool'), auto);
      }
      [context, scores] = kerasMaskedAttention(q, k, v, mask, scale, dropoutRate);
      if (rank !== 3) {
        scores = tf.reshape(scores, [b, h, ...queryDims, ...keyDims]);
      }
    }
    const outDims = this.outputDims ?? [query.shape[rank - 1]];
    const merged = tf.reshape(context, [b, ...queryDims, h, this.valueDim]);
    const out = this.project(
        tf.reshape(merged, [b, ...queryDims, h * this.valueDim]), 'attention_output', outDims);
    return [out, scores];
  }

  override getConfig(): tf.serialization.ConfigDict {
    const config: tf.serialization.ConfigDict = {
      numHeads: this.numHeads,
      keyDim: this.keyDim,
      valueDim: this.valueDim,
      dropout: this.dropout,
      useBias: this.useBias,
      outputShape: this.outputDims,
      attentionAxes: this.attentionAxes,
      kernelInitializer: serializeObject(this.kernelInitializer),
      biasInitializer: serializeObject(this.biasInitializer),
      kernelRegularizer: serializeObject(this.kernelRegularizer),
      biasRegularizer: serializeObject(this.biasRegularizer),
      activityRegularizer: null,
      kernelConstraint: serializeObject(this.kernelConstraint),
      biasConstraint: serializeObject(this.biasConstraint),
      queryShape: this.queryShape,
      keyShape: this.keyShape,
      valueShape: this.valueShape,
    };
    return {...super.getConfig(), ...config};
  }

  static override fromConfig<T extends tf.serialization.Serializable>(
      cls: tf.serialization.SerializableConstructor<T>, config: tf.serialization.ConfigDict): T {
    const name = typeof config.name === 'string' ? config.name : undefined;
    checkKnownKeys(config as Record<string, unknown>, name);
    const args = {...config} as unknown as Record<string, unknown>;
    delete args.seed;
    delete args.flashAttention;
    delete args.customObjects;
    return new cls(args as unknown as tf.serialization.ConfigDict);
  }
}

/** Whether a model config's layer is deserialized by this class. */
function deserializesToThis(layerData: {className?: unknown}): boolean {
  if (layerData.className !== MultiHeadAttention.className) {
    return false;
  }
  const entry =
      tf.serialization.SerializationMap.getMap().classNameMap[MultiHeadAttention.className];
  const cls = entry?.[0] as unknown as {prototype: unknown} | undefined;
  return cls != null &&
      (cls === MultiHeadAttention as unknown || cls.prototype instanceof MultiHeadAttention);
}

/**
 * Registers this MultiHeadAttention for deserialization (and the rewrite
 * of Keras functional configs it needs). Done at import when no class of
 * that name is registered; `replace: true` also replaces another one.
 * Returns whether this class is now the registered one.
 */
export function registerMultiHeadAttention(opts: {replace?: boolean} = {}): boolean {
  const map = tf.serialization.SerializationMap.getMap().classNameMap;
  const existing = map[MultiHeadAttention.className];
  if (existing == null || opts.replace) {
    tf.serialization.registerClass(MultiHeadAttention);
  }
  installFunctionalRewrite(deserializesToThis);
  return deserializesToThis({className: MultiHeadAttention.className});
}

registerMultiHeadAttention();
