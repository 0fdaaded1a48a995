/**
 * Input checks of the flashAttention ops (docs/design.md, "API contract", on bad input). They
 * run before any kernel: a bad call throws an error naming the argument,
 * the expected and the actual value, and allocates nothing.
 */
import {Tensor} from '@tensorflow/tfjs-core';

import {FlashAttentionError} from './errors';

/** Largest head dim (D and Dv) any kernel of this package accepts. */
export const MAX_HEAD_DIM = 256;

export interface AttentionShapes {
  batch: number;
  seqQ: number;
  seqK: number;
  heads: number;
  headsKV: number;
  headDim: number;
  headDimV: number;
}

/** Throws a FlashAttentionError with a message already composed. */
function fail(
    opName: string, argument: string, expected: string, actual: string, message: string): never {
  throw new FlashAttentionError(opName, argument, expected, actual, `${opName}: ${message}`);
}

function shapeString(shape: readonly number[]): string {
  return `[${shape.join(', ')}]`;
}

export function checkTensor(
    value: unknown, argName: string, opName: string, expectedRank: number, layout: string): Tensor {
  if (!(value instanceof Tensor)) {
    const actual = value === null ? 'null' : typeof value;
    fail(
        opName, argName, `a tf.Tensor of shape ${layout}`, actual,
        `${argName} must be a tf.Tensor of shape ${layout}, got ${actual}`);
  }
  if (value.isDisposed) {
    fail(opName, argName, 'a live tensor', 'a disposed tensor', `${argName} has been disposed`);
  }
  if (value.rank !== expectedRank) {
    fail(
        opName, argName, `rank ${expectedRank} (${layout})`, shapeString(value.shape),
        `${argName} must have rank ${expectedRank} (${layout}), got rank ${value.rank} with shape ${
            shapeString(value.shape)}`);
  }
  if (value.dtype !== 'float32') {
    fail(
        opName, argName, 'dtype float32', value.dtype,
        `${argName} must have dtype float32, got ${value.dtype}`);
  }
  return value;
}

/**
 * Checks the shapes of q [B,Sq,H,D], k [B,Sk,Hk,D], v [B,Sk,Hk,Dv] against
 * each other. Takes shapes, so packed inputs are checked before unpacking.
 */
export function checkQKV(
    qShape: readonly number[], kShape: readonly number[], vShape: readonly number[], opName: string,
    names = {
      q: 'q',
      k: 'k',
      v: 'v'
    }): AttentionShapes {
  const [batch, seqQ, heads, headDim] = qShape;
  const [batchK, seqK, headsKV, headDimK] = kShape;
  const [batchV, seqV, headsV, headDimV] = vShape;
  // Shape mismatches between q, k and v: the first tensor named is blamed.
  // (The shapes are spelled out only on failure: this runs on every call.)
  const mismatch = (argument: string, what: string): never => fail(
      opName, argument, 'shapes that match',
      `${names.q} ${shapeString(qShape)}, ${names.k} ${shapeString(kShape)}, ${names.v} ${
          shapeString(vShape)}`,
      what);
  if (batchK !== batch || batchV !== batch) {
    mismatch(
        names.k,
        `batch sizes must match: ${names.q} has ${batch}, ${names.k} has ${batchK}, ${
            names.v} has ${batchV}`);
  }
  if (seqV !== seqK) {
    mismatch(
        names.v,
        `${names.k} and ${names.v} must have the same sequence length, got ${seqK} (${
            names.k}) and ${seqV} (${names.v})`);
  }
  if (headsV !== headsKV) {
    mismatch(
        names.v,
        `${names.k} and ${names.v} must have the same number of heads, got ${headsKV} (${
            names.k}) and ${headsV} (${names.v})`);
  }
  if (headDimK !== headDim) {
    mismatch(
        names.k,
        `${names.q} and ${names.k} must have the same head dim, got ${headDim} (${names.q}) and ${
            headDimK} (${names.k})`);
  }
  if (headsKV < 1 || heads % headsKV !== 0) {
    mismatch(
        names.k,
        `the number of query heads must be a multiple of the number of key/value heads (H % Hk == 0), got H=${
            heads} (${names.q}) and Hk=${headsKV} (${names.k})`);
  }
  for (const [name, dim] of [[names.q, headDim], [names.v, headDimV]] as Array<[string, number]>) {
    if (dim < 1 || dim > MAX_HEAD_DIM) {
      mismatch(name, `head dim of ${name} must be in [1, ${MAX_HEAD_DIM}], got ${dim}`);
    }
  }
  for (const [name, shape] of [[names.q, qShape], [names.k, kShape]] as Array<[string, number[]]>) {
    if (shape.some(d => d === 0)) {
      mismatch(name, `${name} must not be empty, got shape ${shapeString(shape)}`);
    }
  }
  return {batch, seqQ, seqK, heads, headsKV, headDim, headDimV};
}

/** alibiSlopes must be float32 `[H]` or `[B, H]`. */
export function checkAlibi(alibiSlopes: unknown, shapes: AttentionShapes, opName: string): Tensor|
    undefined {
  if (alibiSlopes == null) {
    return undefined;
  }
  if (!(alibiSlopes instanceof Tensor)) {
    fail(
        opName, 'alibiSlopes', 'a tf.Tensor of shape [H] or [B, H]', typeof alibiSlopes,
        `alibiSlopes must be a tf.Tensor of shape [H] or [B, H], got ${typeof alibiSlopes}`);
  }
  if (alibiSlopes.isDisposed) {
    fail(
        opName, 'alibiSlopes', 'a live tensor', 'a disposed tensor',
        'alibiSlopes has been disposed');
  }
  const {batch, heads} = shapes;
  const shape = alibiSlopes.shape;
  const ok = (shape.length === 1 && shape[0] === heads) ||
      (shape.length === 2 && shape[0] === batch && shape[1] === heads);
  if (!ok) {
    fail(
        opName, 'alibiSlopes', `shape [${heads}] or [${batch}, ${heads}]`, shapeString(shape),
        `alibiSlopes must have shape [${heads}] or [${batch}, ${heads}] ([H] or [B, H]), got ${
            shapeString(shape)}`);
  }
  if (alibiSlopes.dtype !== 'float32') {
    fail(
        opName, 'alibiSlopes', 'dtype float32', alibiSlopes.dtype,
        `alibiSlopes must have dtype float32, got ${alibiSlopes.dtype}`);
  }
  return alibiSlopes;
}

/** qkv [B, S, 3, H, D]. */
export function checkQKVPacked(qkv: unknown, opName: string): Tensor {
  return checkPacked(qkv, 'qkv', '[B, S, 3, H, D]', 3, opName);
}

/** kv [B, Sk, 2, Hk, D]. */
export function checkKVPacked(kv: unknown, opName: string): Tensor {
  return checkPacked(kv, 'kv', '[B, Sk, 2, Hk, D]', 2, opName);
}

/** A packed input `name`: rank 5 (axes as `layout` names them), `parts` at axis 2. */
function checkPacked(
    x: unknown, name: string, layout: string, parts: number, opName: string): Tensor {
  const t = checkTensor(x, name, opName, 5, layout);
  if (t.shape[2] !== parts) {
    fail(
        opName, name, `shape ${layout}`, shapeString(t.shape),
        `${name} must have shape ${layout} with ${parts} at axis 2, got ${shapeString(t.shape)}`);
  }
  return t;
}
