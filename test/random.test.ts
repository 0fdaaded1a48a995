/**
 * Randomized: many small shapes and option mixes, forward and gradients
 * against the oracle, on every backend. Each run draws new problems; the
 * seed is in the failure message (replay with FLASH_ATTENTION_TEST_SEED).
 */
import * as tf from '@tensorflow/tfjs-core';

import {FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS} from '../src';

import {describeBackends} from './harness/backends';
import {checkForward, checkGradients, OptionCase} from './harness/cases';
import {freshRng, ProblemShape, Rng} from './harness/problems';
import {OracleOptions} from './oracle';

function randomCase(rng: Rng): OptionCase {
  const heads = rng.int(1, 4);
  const divisors = [1, 2, 3, 4].filter(d => heads % d === 0);
  const headDim = rng.int(1, 40);
  const shape: ProblemShape = {
    batch: rng.int(1, 2),
    seqQ: rng.int(1, 24),
    seqK: rng.int(1, 24),
    heads,
    headsKV: rng.pick(divisors),
    headDim,
    headDimV: rng.uniform() < 0.5 ? headDim : rng.int(1, 40),
    alibi: rng.pick([undefined, undefined, 'head', 'batch'] as const),
  };
  const opts: OracleOptions = {};
  if (rng.uniform() < 0.5) {
    opts.causal = true;
  }
  if (rng.uniform() < 0.4) {
    opts.windowSize = [rng.int(-1, 8), rng.int(-1, 8)];
  }
  if (rng.uniform() < 0.3) {
    opts.softcap = 0.5 + 3 * rng.uniform();
  }
  if (rng.uniform() < 0.3) {
    opts.softmaxScale = 0.05 + rng.uniform();
  }
  if (rng.uniform() < 0.3) {
    opts.dropoutRate = 0.6 * rng.uniform();
    opts.seed = rng.int(0, 2 ** 31);
  }
  return {name: `random ${JSON.stringify({shape, opts})}`, shape, opts};
}

// Fewer on webgpu: every random head dim compiles new pipelines, which
// takes seconds on SwiftShader.
const CASES_PER_BACKEND = {cpu: 12, webgpu: 6};

describeBackends('randomized shapes and options', backend => {
  afterAll(() => tf.env().set(FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS, 1 << 20));
  const count = CASES_PER_BACKEND[backend];
  for (let n = 0; n < count; n++) {
    it(`case ${n + 1} of ${count}: forward and gradients`, async () => {
      const rng = freshRng();
      const c = randomCase(rng);
      // Also vary how the reference splits the queries into blocks.
      tf.env().set(FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS, rng.pick([1 << 20, 300, 40]));
      await checkForward(c, rng);
      await checkGradients(c, rng);
    });
  }
});
