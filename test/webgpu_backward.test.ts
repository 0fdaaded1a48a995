/**
 * The fused WebGPU backward (kernels/webgpu/FlashAttentionGrad.ts) on Dawn
 * (SwiftShader without a GPU), against the float64 oracle's gradients for
 * every option (docs/design.md, "Accuracy bounds": 5e-4), with NaN-poisoned outputs, no leaks,
 * bit-identical reruns, and through tf.grads with the fused path forced.
 */
import * as tf from '@tensorflow/tfjs-core';

import {FLASH_ATTENTION_IMPL, FlashAttention, FlashAttentionGrad, hasFusedKernel} from '../src';
import {chooseGradTiles, fusedGradRunCount, GradTiles, setGradTilesOverride} from '../kernels/webgpu/FlashAttentionGrad';

import {selectedBackends} from './harness/backends';
import {runGradKernelOnOracle} from './harness/grad_kernel';
import {checkGradients, OPTION_CASES, OptionCase} from './harness/cases';
import {expectClose, freshRng, GRADIENT_BOUND, Rng} from './harness/problems';
import {useFusedGradWebGPU} from './harness/small_tiles';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

/** Extra cases for the backward's tiling: several blocks, GQA with dropout. */
const EXTRA_CASES: OptionCase[] = [
  {
    name: 'several key and query blocks, causal, GQA',
    shape: {batch: 1, seqQ: 70, seqK: 70, heads: 4, headsKV: 2, headDim: 32, headDimV: 32},
    opts: {causal: true}
  },
  {
    name: 'several blocks, Sq < Sk, window, dropout, softcap, alibi',
    shape: {
      batch: 1,
      seqQ: 37,
      seqK: 83,
      heads: 2,
      headsKV: 1,
      headDim: 12,
      headDimV: 20,
      alibi: 'batch'
    },
    opts: {windowSize: [20, 7], dropoutRate: 0.3, seed: 77, softcap: 4}
  },
  {
    name: 'odd head dims (5 vs 3)',
    shape: {batch: 2, seqQ: 9, seqK: 11, heads: 2, headsKV: 2, headDim: 5, headDimV: 3},
    opts: {causal: true}
  },
];

/** The kernel alone on the oracle's forward outputs; the fused kernel must run. */
function runKernelCase(c: OptionCase, rng: Rng, repeats = 1) {
  return runGradKernelOnOracle(c.shape, c.opts, rng, {
    inputScale: c.inputScale,
    repeats,
    aroundRun: () => {
      const before = fusedGradRunCount();
      return () => expect(fusedGradRunCount()).toBe(before + 1);
    },
  });
}

describeWebGPU('fused WebGPU backward [webgpu]', () => {
  useFusedGradWebGPU();

  it('is registered and picks tiles from the device limits', () => {
    expect(hasFusedKernel(FlashAttentionGrad, 'webgpu')).toBe(true);
    const swiftShader = {
      maxComputeWorkgroupStorageSize: 32768,
      maxComputeInvocationsPerWorkgroup: 256,
      maxComputeWorkgroupSizeX: 256
    };
    const h100 = {
      ...swiftShader,
      maxComputeWorkgroupStorageSize: 49152,
      maxComputeInvocationsPerWorkgroup: 1024,
      maxComputeWorkgroupSizeX: 1024
    };
    expect(chooseGradTiles(64, 64, h100))
        .toEqual({dkdv: {bc: 32, br: 32, threads: 128}, dq: {br: 64, bc: 16, threads: 128}});
    // D=128: the streamed tiles on a GPU (test/webgpu_backward_streamed.test.ts),
    // the size lists on a software device.
    expect(chooseGradTiles(128, 128, h100)!.dkdv.streamed).toBe(true);
    expect(chooseGradTiles(128, 128, h100, false))
        .toEqual({dkdv: {bc: 32, br: 8, threads: 128}, dq: {br: 32, bc: 8, threads: 128}});
    expect(chooseGradTiles(64, 64, swiftShader)!.dkdv.bc).toBe(32);
    expect(chooseGradTiles(256, 256, swiftShader)).not.toBeNull();
    expect(chooseGradTiles(256, 256, {...swiftShader, maxComputeWorkgroupStorageSize: 4096}))
        .toBeNull();
  });

  // Large logits (|s| ~ 1e4) carry their case's looser bound (see
  // test/harness/cases.ts): rounding the oracle's lse to float32 alone moves
  // P by ~5e-4. They are also run through tf.grads below.
  const direct = [...OPTION_CASES, ...EXTRA_CASES];
  const large = OPTION_CASES.filter(c => c.inputScale != null);
  for (const c of direct) {
    it(`kernel vs oracle: ${c.name}`, async () => {
      const rng = freshRng();
      const tensorsBefore = tf.memory().numTensors;
      const {runs: [got], expected} = await runKernelCase(c, rng);
      expect(tf.memory().numTensors).toBe(tensorsBefore);
      const what = `${c.name} (seed ${rng.seed})`;
      const bound = c.bounds?.gradient ?? GRADIENT_BOUND;
      expectClose(got.dq, expected.dq, bound, `${what}: dq`);
      expectClose(got.dk, expected.dk, bound, `${what}: dk`);
      expectClose(got.dv, expected.dv, bound, `${what}: dv`);
    });
  }

  // The H100's tilings (and a 128-thread variant the benchmark tries), at a
  // head dim small enough for SwiftShader's 32 KiB of workgroup storage.
  const TILINGS: GradTiles[] = [
    {dkdv: {bc: 64, br: 16, threads: 256}, dq: {br: 64, bc: 16, threads: 256}},
    {dkdv: {bc: 64, br: 16, threads: 128}, dq: {br: 64, bc: 16, threads: 128}},
    {dkdv: {bc: 16, br: 8, threads: 64}, dq: {br: 16, bc: 8, threads: 64}},
    // Fewer threads than rows, so each thread prefetches several vec4s of a
    // tile.
    {dkdv: {bc: 16, br: 32, threads: 16}, dq: {br: 32, bc: 8, threads: 16}},
  ];
  for (const tiles of TILINGS) {
    it(`kernel vs oracle with tiles ${JSON.stringify(tiles)}`, async () => {
      setGradTilesOverride(tiles);
      try {
        const c: OptionCase = {
          name: 'tiling',
          opts: {causal: true, dropoutRate: 0.2, seed: 5, softcap: 3},
          shape: {
            batch: 1,
            seqQ: 150,
            seqK: 133,
            heads: 3,
            headsKV: 1,
            headDim: 16,
            headDimV: 12,
            alibi: 'head'
          }
        };
        const rng = freshRng();
        const {runs: [got], expected} = await runKernelCase(c, rng);
        const what = `tiles ${JSON.stringify(tiles)} (seed ${rng.seed})`;
        expectClose(got.dq, expected.dq, GRADIENT_BOUND, `${what}: dq`);
        expectClose(got.dk, expected.dk, GRADIENT_BOUND, `${what}: dk`);
        expectClose(got.dv, expected.dv, GRADIENT_BOUND, `${what}: dv`);
      } finally {
        setGradTilesOverride(null);
      }
    });
  }

  it('is deterministic: bit-identical gradients run after run', async () => {
    const c = EXTRA_CASES[1];
    const {runs} = await runKernelCase(c, freshRng(), 3);
    for (const run of runs.slice(1)) {
      for (const key of ['dq', 'dk', 'dv'] as const) {
        expect(Buffer.from(run[key].buffer).equals(Buffer.from(runs[0][key].buffer))).toBe(true);
      }
    }
  });

  describe('through tf.grads', () => {
    // Fused forward and backward when the forward kernel is registered;
    // else the reference forward with the fused backward behind it.
    beforeAll(
        () => tf.env().set(
            FLASH_ATTENTION_IMPL, hasFusedKernel(FlashAttention, 'webgpu') ? 'fused' : 'auto'));
    for (const c of [OPTION_CASES[3], OPTION_CASES[12], OPTION_CASES[19], ...large]) {
      it(`${c.name}`, async () => {
        const before = fusedGradRunCount();
        await checkGradients(c, freshRng());
        expect(fusedGradRunCount()).toBe(before + 1);
      });
    }
  });
});
