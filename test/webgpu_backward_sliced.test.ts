/**
 * The head-dim-sliced backward passes (DkDvTiles.dimChunks,
 * DqTiles.dimChunks; docs/webgpu_tuning.md, "Backward at head dims above
 * 64"), forced on Dawn (SwiftShader without a GPU), against the float64
 * oracle's gradients (docs/design.md, "Accuracy bounds": 5e-4) with the
 * option families, NaN-poisoned outputs, no leaks and bit-identical reruns.
 * Every candidate of SLICED_GRAD_CANDIDATES runs at the largest head dims
 * that fit SwiftShader's 32 KiB of workgroup memory (D=128 for the one that
 * fits, D=80 or 96 for the H100 ones), plus head dims that are not multiples
 * of 4 or of the slice width.
 */
import * as tf from '@tensorflow/tfjs-core';

import {chooseGradTiles, fusedGradRunCount, GradTiles, registerFlashAttentionGradWebGPU, setGradTilesOverride} from '../kernels/webgpu/FlashAttentionGrad';
import {dkdvStorageBytes, dkdvTilesValid} from '../kernels/webgpu/flash_attention_grad_dkdv_webgpu';
import {dqStorageBytes, dqTilesValid} from '../kernels/webgpu/flash_attention_grad_dq_webgpu';
import {setPoisonOutputs} from '../kernels/webgpu/own_pipeline';
import {SLICED_GRAD_CANDIDATES} from '../kernels/webgpu/tuning';

import {selectedBackends, useBackend} from './harness/backends';
import {OptionCase} from './harness/cases';
import {H100_STAND_IN} from './harness/devices';
import {runGradKernelOnOracle} from './harness/grad_kernel';
import {expectClose, freshRng, GRADIENT_BOUND} from './harness/problems';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

const SWIFTSHADER_BYTES = 32768;

/** Does a candidate fit SwiftShader's workgroup memory at head dims d / dv? */
function fitsSwiftShader(tiles: GradTiles, d: number, dv: number): boolean {
  return dkdvStorageBytes(tiles.dkdv, d, dv) <= SWIFTSHADER_BYTES &&
      dqStorageBytes(tiles.dq, d, dv) <= SWIFTSHADER_BYTES;
}

describe('sliced backward candidates', () => {
  it('are consistent, fit the H100 at D=128, and are not the planned tiles', () => {
    for (const tiles of SLICED_GRAD_CANDIDATES) {
      expect(dkdvTilesValid(tiles.dkdv) && dqTilesValid(tiles.dq)).toBe(true);
      expect(dkdvStorageBytes(tiles.dkdv, 128, 128)).toBeLessThanOrEqual(49152);
      expect(dqStorageBytes(tiles.dq, 128, 128)).toBeLessThanOrEqual(49152);
    }
    // The planner keeps the unsliced tiles until a GPU measures these.
    const planned = chooseGradTiles(128, 128, H100_STAND_IN.limits)!;
    expect(planned.dkdv.dimChunks).toBeUndefined();
    expect(planned.dq.dimChunks).toBeUndefined();
    // A split S/dP phase does not combine with slices.
    expect(dkdvTilesValid({bc: 32, br: 32, threads: 128, split: true, dimChunks: 2})).toBe(false);
    expect(dqTilesValid({br: 32, bc: 32, threads: 128, dimChunks: 0})).toBe(false);
  });
});

describeWebGPU('fused WebGPU backward, head-dim slices [webgpu]', () => {
  beforeAll(async () => {
    await useBackend('webgpu');
    registerFlashAttentionGradWebGPU();
    setPoisonOutputs(true);
  });
  afterAll(() => {
    setPoisonOutputs(false);
    setGradTilesOverride(null);
  });

  const CASES: Array<{tiles: GradTiles, c: OptionCase}> = [
    {
      tiles: SLICED_GRAD_CANDIDATES.find(t => fitsSwiftShader(t, 128, 128))!,
      c: {
        name: 'D=128, causal, GQA, dropout',
        shape: {batch: 1, seqQ: 40, seqK: 40, heads: 2, headsKV: 1, headDim: 128, headDimV: 128},
        opts: {causal: true, dropoutRate: 0.2, seed: 9}
      }
    },
  ];
  for (const {tiles, c} of CASES) {
    it(`kernel vs oracle with ${JSON.stringify(tiles)}: ${c.name}`, async () => {
      expect(tiles).toBeDefined();
      setGradTilesOverride(tiles);
      try {
        const rng = freshRng();
        const tensorsBefore = tf.memory().numTensors;
        const {runs, expected} = await runGradKernelOnOracle(c.shape, c.opts, rng, {
          repeats: 2,
          aroundRun: () => {
            const before = fusedGradRunCount();
            return () => expect(fusedGradRunCount()).toBe(before + 1);
          },
        });
        expect(tf.memory().numTensors).toBe(tensorsBefore);
        const what = `${c.name} (seed ${rng.seed})`;
        for (const key of ['dq', 'dk', 'dv'] as const) {
          expectClose(runs[0][key], expected[key], GRADIENT_BOUND, `${what}: ${key}`);
          expect(Buffer.from(runs[1][key].buffer).equals(Buffer.from(runs[0][key].buffer)))
              .toBe(true);
        }
      } finally {
        setGradTilesOverride(null);
      }
    });
  }
});
