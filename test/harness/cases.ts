/**
 * The option cases every implementation is checked on (docs/design.md, "Semantics"), with
 * shapes small enough for SwiftShader.
 */
import * as tf from '@tensorflow/tfjs-core';

import {flashAttention, FlashAttentionOptions} from '../../src';
import {OracleOptions, oracleBackward, oracleForward} from '../oracle';

import {FORWARD_BOUND, GRADIENT_BOUND, expectClose, makeProblem, ProblemShape, randomArray, Rng, TestProblem} from './problems';

export interface OptionCase {
  name: string;
  shape: ProblemShape;
  opts: OracleOptions;
  /** Multiplies q and k (large logits). */
  inputScale?: number;
  /**
   * Looser bounds for an ill-conditioned case. With |s| ~ 1e4 a float32
   * score is itself only known to its ulp (~1e-3), so between two near-tied
   * keys about that much weight can move whatever the implementation does;
   * such a case checks that rows stay finite and close, not the 1e-4 bound.
   */
  bounds?: {forward: number, gradient: number};
}

const base: ProblemShape = {
  batch: 2,
  seqQ: 13,
  seqK: 13,
  heads: 2,
  headsKV: 2,
  headDim: 16,
  headDimV: 16
};

export const OPTION_CASES: OptionCase[] = [
  {name: 'plain', shape: base, opts: {}},
  {name: 'causal', shape: base, opts: {causal: true}},
  {name: 'causal, Sq < Sk', shape: {...base, seqQ: 7, seqK: 19}, opts: {causal: true}},
  {
    name: 'causal, Sq > Sk (rows without keys)',
    shape: {...base, seqQ: 19, seqK: 7},
    opts: {causal: true}
  },
  {name: 'Sq != Sk, not causal', shape: {...base, seqQ: 5, seqK: 21}, opts: {}},
  {name: 'window [3, 2]', shape: base, opts: {windowSize: [3, 2]}},
  {
    name: 'window [4, -1], Sq < Sk',
    shape: {...base, seqQ: 9, seqK: 16},
    opts: {windowSize: [4, -1]}
  },
  {name: 'window [-1, 0] (= causal)', shape: base, opts: {windowSize: [-1, 0]}},
  {name: 'window [2, 5] with causal', shape: base, opts: {windowSize: [2, 5], causal: true}},
  {name: 'softcap', shape: base, opts: {softcap: 1.5}},
  {name: 'custom softmaxScale', shape: base, opts: {softmaxScale: 0.9}},
  {name: 'alibi [H]', shape: {...base, alibi: 'head'}, opts: {}},
  {
    name: 'alibi [B, H], causal, softcap',
    shape: {...base, alibi: 'batch'},
    opts: {causal: true, softcap: 2}
  },
  {name: 'GQA (H=4, Hk=2)', shape: {...base, heads: 4, headsKV: 2}, opts: {causal: true}},
  {name: 'MQA (H=3, Hk=1)', shape: {...base, heads: 3, headsKV: 1}, opts: {}},
  {name: 'Dv != D (8 vs 24)', shape: {...base, headDim: 8, headDimV: 24}, opts: {}},
  {
    name: 'head dim 256',
    shape: {...base, batch: 1, heads: 1, headsKV: 1, seqQ: 6, seqK: 9, headDim: 256, headDimV: 256},
    opts: {causal: true}
  },
  {
    name: 'large logits (|s| ~ 1e4)',
    shape: base,
    opts: {},
    inputScale: 40,
    bounds: {forward: 1e-3, gradient: 2e-3}
  },
  {name: 'dropout 0.25', shape: base, opts: {dropoutRate: 0.25, seed: 2024}},
  {
    name: 'dropout with GQA, window and seed >= 2^32',
    shape: {...base, heads: 4, headsKV: 1},
    opts: {dropoutRate: 0.4, seed: 2 ** 40 + 7, windowSize: [5, 1]}
  },
];

/**
 * OPTION_CASES' case `name` at head dims d / dv, both sequences `extraRows`
 * longer: 2-3 query and key tiles of the small forced tilings.
 */
export function optionCaseAtHeadDim(name: string, d: number, dv = d, extraRows = 24): OptionCase {
  const c = OPTION_CASES.find(x => x.name === name)!;
  expect(c).toBeDefined();
  const longer = (n: number) => n + extraRows;
  return {
    ...c,
    name: `${c.name}, D=${d}${dv !== d ? `, Dv=${dv}` : ''}`,
    shape: {
      ...c.shape,
      seqQ: longer(c.shape.seqQ),
      seqK: longer(c.shape.seqK),
      headDim: d,
      headDimV: dv
    },
  };
}

/**
 * D=80, causal, GQA, softcap and ALiBi per head over 70 rows: several key
 * and query blocks of the sliced and streamed backward candidates' tiles
 * (test/webgpu_backward_sliced.test.ts, test/webgpu_backward_streamed.test.ts).
 */
export const D80_CAUSAL_GQA_ALIBI: OptionCase = {
  name: 'D=80, causal, GQA, softcap, alibi',
  shape: {
    batch: 1,
    seqQ: 70,
    seqK: 70,
    heads: 4,
    headsKV: 2,
    headDim: 80,
    headDimV: 80,
    alibi: 'head'
  },
  opts: {causal: true, softcap: 2}
};

/** The op's options for a case (slopes as a tensor). */
export function opOptions(c: OptionCase, problem: TestProblem): FlashAttentionOptions {
  return {...c.opts, alibiSlopes: problem.alibiSlopes};
}

/** Runs flashAttention with lse and compares both outputs with the oracle. */
export async function checkForward(c: OptionCase, rng: Rng): Promise<void> {
  const problem = makeProblem(c.shape, rng, c.inputScale);
  try {
    const [out, lse] = flashAttention(
        problem.q, problem.k, problem.v, {...opOptions(c, problem), returnSoftmaxLse: true});
    const expected = oracleForward(problem.oracle, c.opts);
    const what = `${c.name} (seed ${rng.seed})`;
    const bound = c.bounds?.forward ?? FORWARD_BOUND;
    expectClose(await out.data(), expected.out, bound, `${what}: out`);
    expectClose(await lse.data(), expected.lse, bound, `${what}: lse`);
    tf.dispose([out, lse]);
  } finally {
    problem.dispose();
  }
}

/**
 * Gradients of `sum(out * dOut) + sum(lse * dLse)` (finite lse only) by
 * tf.grads, compared with the oracle's.
 */
export async function checkGradients(c: OptionCase, rng: Rng): Promise<void> {
  const problem = makeProblem(c.shape, rng, c.inputScale);
  const expectedForward = oracleForward(problem.oracle, c.opts);
  const dOutValues = randomArray(expectedForward.out.length, rng);
  const dLseValues = randomArray(expectedForward.lse.length, rng);
  const dOut = tf.tensor(
      Float32Array.from(dOutValues),
      [c.shape.batch, c.shape.seqQ, c.shape.heads, c.shape.headDimV]);
  const dLse =
      tf.tensor(Float32Array.from(dLseValues), [c.shape.batch, c.shape.heads, c.shape.seqQ]);
  try {
    const opts = opOptions(c, problem);
    const lossOf = (q: tf.Tensor, k: tf.Tensor, v: tf.Tensor) => {
      const [out, lse] = flashAttention(
          q as tf.Tensor4D, k as tf.Tensor4D, v as tf.Tensor4D, {...opts, returnSoftmaxLse: true});
      const finiteLse = tf.where(tf.isFinite(lse), lse, tf.zerosLike(lse));
      return tf.add(tf.sum(tf.mul(out, dOut)), tf.sum(tf.mul(finiteLse, dLse)));
    };
    const grads = tf.grads(lossOf)([problem.q, problem.k, problem.v]);
    const expected = oracleBackward(problem.oracle, c.opts, dOutValues, dLseValues);
    const what = `${c.name} (seed ${rng.seed})`;
    const bound = c.bounds?.gradient ?? GRADIENT_BOUND;
    expectClose(await grads[0].data(), expected.dq, bound, `${what}: dq`);
    expectClose(await grads[1].data(), expected.dk, bound, `${what}: dk`);
    expectClose(await grads[2].data(), expected.dv, bound, `${what}: dv`);
    tf.dispose(grads);
  } finally {
    problem.dispose();
    tf.dispose([dOut, dLse]);
  }
}
