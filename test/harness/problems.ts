/**
 * Random problems for the numerical tests, and the comparison that checks
 * every element against the float64 oracle (docs/design.md, "Accuracy bounds").
 */
import * as tf from '@tensorflow/tfjs-core';

import {OracleProblem, oracleForward} from '../oracle';

/** mulberry32: a small seeded generator, so a failing run can be replayed. */
export class Rng {
  private state: number;
  constructor(readonly seed: number) {
    this.state = seed >>> 0;
  }
  uniform(): number {
    this.state = (this.state + 0x6D2B79F5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  normal(): number {
    const u = Math.max(this.uniform(), 1e-12);
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * this.uniform());
  }
  int(lo: number, hi: number): number {  // inclusive
    return lo + Math.floor(this.uniform() * (hi - lo + 1));
  }
  pick<T>(items: readonly T[]): T {
    return items[Math.floor(this.uniform() * items.length)];
  }
}

/**
 * A fresh generator per test run; FLASH_ATTENTION_TEST_SEED replays one.
 * The seed is part of every failure message.
 */
export function freshRng(): Rng {
  const fromEnv = process.env.FLASH_ATTENTION_TEST_SEED;
  return new Rng(fromEnv ? Number(fromEnv) : Math.floor(Math.random() * 2 ** 32));
}

export interface ProblemShape {
  batch: number;
  seqQ: number;
  seqK: number;
  heads: number;
  headsKV: number;
  headDim: number;
  headDimV: number;
  /** 'head' = [H] slopes, 'batch' = [B, H], undefined = no ALiBi. */
  alibi?: 'head'|'batch';
}

/** Float32-representable normals (the tensors are float32). */
export function randomArray(n: number, rng: Rng, scale = 1): Float64Array {
  const values = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    values[i] = Math.fround(rng.normal() * scale);
  }
  return values;
}

export interface TestProblem {
  shape: ProblemShape;
  oracle: OracleProblem;
  q: tf.Tensor4D;
  k: tf.Tensor4D;
  v: tf.Tensor4D;
  alibiSlopes?: tf.Tensor;
  dispose(): void;
}

/** Random q, k, v (and slopes) in float64, without tfjs. */
export function randomOracleProblem(shape: ProblemShape, rng: Rng, inputScale = 1): OracleProblem {
  const {batch, seqQ, seqK, heads, headsKV, headDim, headDimV} = shape;
  let slopes: Float64Array|null = null;
  if (shape.alibi != null) {
    slopes = new Float64Array(shape.alibi === 'head' ? heads : batch * heads);
    for (let i = 0; i < slopes.length; i++) {
      slopes[i] = Math.fround(0.05 + 0.5 * rng.uniform());
    }
  }
  return {
    batch,
    seqQ,
    seqK,
    heads,
    headsKV,
    headDim,
    headDimV,
    q: randomArray(batch * seqQ * heads * headDim, rng, inputScale),
    k: randomArray(batch * seqK * headsKV * headDim, rng, inputScale),
    v: randomArray(batch * seqK * headsKV * headDimV, rng),
    alibiSlopes: slopes,
  };
}

/** cuSeqlens of packed varlen calls: [0, l0, l0 + l1, ...] for `lengths` [l0, l1, ...]. */
export function cumulativeLengths(lengths: number[]): number[] {
  const cu = [0];
  for (const l of lengths) {
    cu.push(cu[cu.length - 1] + l);
  }
  return cu;
}

/**
 * One sequence as an oracle problem: batch 1, D = Dv = dim, no ALiBi (the
 * varlen and seqlens tests' per-sequence references).
 */
export function sequenceProblem(p: {
  seqQ: number,
  seqK: number,
  heads: number,
  headsKV: number,
  dim: number,
  q: Float64Array,
  k: Float64Array,
  v: Float64Array
}): OracleProblem {
  return {
    batch: 1,
    seqQ: p.seqQ,
    seqK: p.seqK,
    heads: p.heads,
    headsKV: p.headsKV,
    headDim: p.dim,
    headDimV: p.dim,
    q: p.q,
    k: p.k,
    v: p.v,
    alibiSlopes: null,
  };
}

/**
 * Random [B, seq, heads, dim] q, k, v (float64 values and float32 tensors)
 * and a seqlensK tensor of `lengths`, for seqlensRowExpected.
 */
export function seqlensInputs(
    rng: Rng, dims: {batch: number, seq: number, heads: number, dim: number}, lengths: number[]) {
  const {batch, seq, heads, dim} = dims;
  const values = () => randomArray(batch * seq * heads * dim, rng);
  const [qv, kv, vv] = [values(), values(), values()];
  const shape: [number, number, number, number] = [batch, seq, heads, dim];
  const [q, k, v] = [qv, kv, vv].map(x => tf.tensor4d(Float32Array.from(x), shape));
  const seqlensK = tf.tensor1d(lengths, 'int32');
  return {qv, kv, vv, q, k, v, seqlensK};
}

/**
 * The causal out and lse of batch row b of a seqlensK call ([B, seq, heads,
 * dim] inputs, heads = headsKV): row b alone with its keys cut to `len`;
 * zeros and -Infinity where len is 0.
 */
export function seqlensRowExpected(
    x: {q: Float64Array, k: Float64Array, v: Float64Array}, b: number, len: number,
    dims: {seq: number, heads: number, dim: number}): {out: Float64Array, lse: Float64Array} {
  const {seq, heads, dim} = dims;
  const rowSize = seq * heads * dim;
  const out = new Float64Array(rowSize);
  const lse = new Float64Array(heads * seq).fill(-Infinity);
  if (len > 0) {
    const cut = (a: Float64Array, rows: number) =>
        a.slice(b * rowSize, b * rowSize + rows * heads * dim);
    const f = oracleForward(
        sequenceProblem({
          seqQ: seq,
          seqK: len,
          heads,
          headsKV: heads,
          dim,
          q: cut(x.q, seq),
          k: cut(x.k, len),
          v: cut(x.v, len)
        }),
        {causal: true});
    out.set(f.out);
    lse.set(f.lse);
  }
  return {out, lse};
}

export function makeProblem(shape: ProblemShape, rng: Rng, inputScale = 1): TestProblem {
  const oracle = randomOracleProblem(shape, rng, inputScale);
  const {batch, seqQ, seqK, heads, headsKV, headDim, headDimV} = shape;
  const slopes = oracle.alibiSlopes;
  const tensors = {
    q: tf.tensor4d(Float32Array.from(oracle.q), [batch, seqQ, heads, headDim]),
    k: tf.tensor4d(Float32Array.from(oracle.k), [batch, seqK, headsKV, headDim]),
    v: tf.tensor4d(Float32Array.from(oracle.v), [batch, seqK, headsKV, headDimV]),
    alibiSlopes: slopes == null ?
        undefined :
        tf.tensor(Float32Array.from(slopes), shape.alibi === 'head' ? [heads] : [batch, heads]),
  };
  return {
    shape,
    oracle,
    ...tensors,
    dispose() {
      tf.dispose([tensors.q, tensors.k, tensors.v]);
      tensors.alibiSlopes?.dispose();
    },
  };
}

export interface Discrepancy {
  /** max |actual - expected| / max |expected| over finite elements. */
  relativeError: number;
  /** Description of the first element that breaks the rules, if any. */
  firstBadElement: string|null;
}

/**
 * Compares every element. Infinite expected values must be matched exactly
 * (a fully masked row's lse is -Infinity); NaN is never accepted.
 */
export function discrepancy(actual: ArrayLike<number>, expected: ArrayLike<number>): Discrepancy {
  if (actual.length !== expected.length) {
    return {
      relativeError: Infinity,
      firstBadElement: `length ${actual.length} != ${expected.length}`
    };
  }
  let maxRef = 0;
  let maxErr = 0;
  let firstBadElement: string|null = null;
  for (let i = 0; i < expected.length; i++) {
    const a = actual[i];
    const e = expected[i];
    if (!Number.isFinite(e)) {
      if (a !== e && firstBadElement == null) {
        firstBadElement = `element ${i}: got ${a}, expected ${e}`;
      }
      continue;
    }
    if (!Number.isFinite(a) && firstBadElement == null) {
      firstBadElement = `element ${i}: got ${a}, expected ${e}`;
    }
    maxRef = Math.max(maxRef, Math.abs(e));
    maxErr = Math.max(maxErr, Math.abs(a - e));
  }
  return {relativeError: maxRef === 0 ? maxErr : maxErr / maxRef, firstBadElement};
}

/**
 * Throws a descriptive error unless `actual` matches `expected` within
 * `bound`. Put the generator's seed in `what` so a failure can be replayed
 * with FLASH_ATTENTION_TEST_SEED.
 */
export function expectClose(
    actual: ArrayLike<number>, expected: ArrayLike<number>, bound: number, what: string): void {
  const {relativeError, firstBadElement} = discrepancy(actual, expected);
  if (firstBadElement != null || !(relativeError <= bound)) {
    throw new Error(`${what}: relative error ${relativeError.toExponential(3)} (bound ${bound})${
        firstBadElement ? `; ${firstBadElement}` : ''}`);
  }
}

/** The bounds of docs/design.md, "Accuracy bounds". */
export const FORWARD_BOUND = 1e-4;
export const GRADIENT_BOUND = 5e-4;
