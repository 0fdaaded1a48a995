/**
 * The composed reference (the path of every backend without fused
 * kernels) against the float64 oracle, forward and gradients, for every
 * option, on cpu and webgpu. Each case runs twice: in one block, and split
 * into many query blocks (the memory-lean path).
 */
import * as tf from '@tensorflow/tfjs-core';

import {composedAttention} from '../benchmarks/baselines';
import {FLASH_ATTENTION_IMPL, FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS} from '../src';

import {describeBackends} from './harness/backends';
import {checkForward, checkGradients, OPTION_CASES} from './harness/cases';
import {expectClose, FORWARD_BOUND, freshRng, makeProblem} from './harness/problems';
import {oracleForward} from './oracle';

const BLOCKINGS = [
  {name: 'one block', elements: 1 << 20},
  {name: 'small blocks', elements: 160},
];

describeBackends('composed reference', () => {
  beforeAll(() => tf.env().set(FLASH_ATTENTION_IMPL, 'reference'));
  afterAll(() => {
    tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
    tf.env().set(FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS, 1 << 20);
  });
  for (const blocking of BLOCKINGS) {
    describe(blocking.name, () => {
      beforeAll(() => tf.env().set(FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS, blocking.elements));
      for (const c of OPTION_CASES) {
        it(`forward: ${c.name}`, () => checkForward(c, freshRng()));
        it(`gradients: ${c.name}`, () => checkGradients(c, freshRng()));
      }
    });
  }
});

describeBackends('composed baseline of the benchmarks', () => {
  it('matches the oracle (causal and not)', async () => {
    for (const causal of [false, true]) {
      const rng = freshRng();
      const p = makeProblem(
          {batch: 2, seqQ: 9, seqK: 12, heads: 2, headsKV: 2, headDim: 8, headDimV: 8}, rng);
      const out = composedAttention(p.q, p.k, p.v, {causal});
      expectClose(
          await out.data(), oracleForward(p.oracle, {causal}).out, FORWARD_BOUND,
          `composed causal=${causal} (seed ${rng.seed})`);
      out.dispose();
      p.dispose();
    }
  });
});
