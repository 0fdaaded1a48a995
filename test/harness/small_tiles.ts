/**
 * Small fused tiles on webgpu for the enclosing describe block: several
 * query and key tiles per short sequence (skipped tiles included), and
 * pipelines SwiftShader compiles in about a second instead of half a
 * minute. Other backends are left alone.
 */
import * as tf from '@tensorflow/tfjs-core';

import {forwardStats, planForward, setForwardOverride} from '../../kernels/webgpu/FlashAttention';
import type {ForwardTiles} from '../../kernels/webgpu/flash_attention_webgpu';
import {fusedGradRunCount, GradTiles, registerFlashAttentionGradWebGPU, setGradTilesOverride} from '../../kernels/webgpu/FlashAttentionGrad';
import {FlashAttentionGradDkDvSlicedProgram} from '../../kernels/webgpu/flash_attention_grad_dkdv_sliced_webgpu';
import {FlashAttentionGradDqSlicedProgram} from '../../kernels/webgpu/flash_attention_grad_dq_sliced_webgpu';
import {gradFeatures} from '../../kernels/webgpu/flash_attention_grad_wgsl';
import {checkOwnPipelineErrors, setPoisonOutputs, webgpuBackendOf} from '../../kernels/webgpu/own_pipeline';
import {normalizeOptions} from '../../src/options';
import {FLASH_ATTENTION_IMPL, flashAttention} from '../../src';

import type {TestBackend} from './backends';
import {useBackend} from './backends';
import {checkForward, OptionCase} from './cases';
import {H100_STAND_IN} from './devices';
import {runGradKernelOnOracle} from './grad_kernel';
import {expectClose, FORWARD_BOUND, freshRng, GRADIENT_BOUND, seqlensInputs, seqlensRowExpected} from './problems';

export function useSmallTiles(backend: TestBackend): void {
  beforeAll(() => {
    if (backend === 'webgpu') {
      setForwardOverride({tiles: {tm: 1, tx: 2, nq: 1, ty: 8}});
      setGradTilesOverride({dkdv: {bc: 4, br: 4, threads: 16}, dq: {br: 4, bc: 4, threads: 16}});
    }
  });
  afterAll(() => {
    setForwardOverride(null);
    setGradTilesOverride(null);
  });
}

/**
 * checkForward under a forced forward plan: one fused forward dispatch
 * (the combine of split-KV is counted apart), nothing leaked, no GPU error.
 */
export async function checkForwardUnderPlan(
    c: OptionCase, plan: Parameters<typeof setForwardOverride>[0]): Promise<void> {
  setForwardOverride(plan);
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

/** Forced, `tiles` is the forward plan of the H100 stand-in at D=128 (with subgroups). */
export function expectForcibleAtD128(tiles: ForwardTiles): void {
  setForwardOverride({tiles});
  try {
    expect(planForward(H100_STAND_IN, 128, 128, 16 * 4096)).toEqual({tiles, subgroups: true});
  } finally {
    setForwardOverride(null);
  }
}

/**
 * A causal forward with per-batch key lengths (seqlensK, `lengths`) under a
 * forced plan: one fused dispatch, nothing leaked, no GPU error, and each
 * batch row's out and lse against the oracle on that row alone.
 */
export async function checkSeqlensForwardUnderPlan(
    plan: Parameters<typeof setForwardOverride>[0],
    dims: {batch: number, seq: number, heads: number, dim: number},
    lengths: number[]): Promise<void> {
  setForwardOverride(plan);
  const rng = freshRng();
  const {batch, seq, heads, dim} = dims;
  const {qv, kv, vv, q, k, v, seqlensK} = seqlensInputs(rng, dims, lengths);
  const tensors = tf.memory().numTensors;
  try {
    const before = forwardStats.dispatches;
    const [out, lse] = flashAttention(q, k, v, {seqlensK, causal: true, returnSoftmaxLse: true});
    const [got, gotLse] = [await out.data(), await lse.data()];
    tf.dispose([out, lse]);
    expect(forwardStats.dispatches).toBe(before + 1);
    expect(tf.memory().numTensors).toBe(tensors);
    const rowSize = seq * heads * dim;
    for (let b = 0; b < batch; b++) {
      const len = lengths[b];
      const {out: expected, lse: expectedLse} =
          seqlensRowExpected({q: qv, k: kv, v: vv}, b, len, {seq, heads, dim});
      const what = `batch row ${b} (length ${len}, seed ${rng.seed})`;
      expectClose(
          got.slice(b * rowSize, (b + 1) * rowSize), expected, FORWARD_BOUND, `${what}: out`);
      expectClose(
          gotLse.slice(b * heads * seq, (b + 1) * heads * seq), expectedLse, FORWARD_BOUND,
          `${what}: lse`);
    }
    await checkOwnPipelineErrors();
  } finally {
    setForwardOverride(null);
    tf.dispose([q, k, v, seqlensK]);
  }
}

/**
 * For the enclosing describe block of a backward test: the webgpu backend
 * with the fused backward registered and outputs poisoned with NaN before
 * each dispatch; afterwards the poisoning off, and the backward's tiles and
 * FLASH_ATTENTION_IMPL automatic again.
 */
export function useFusedGradWebGPU(): void {
  beforeAll(async () => {
    await useBackend('webgpu');
    registerFlashAttentionGradWebGPU();
    setPoisonOutputs(true);
  });
  afterAll(() => {
    setPoisonOutputs(false);
    setGradTilesOverride(null);
    tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
  });
}

/**
 * The FlashAttentionGrad kernel under forced tiles against the float64
 * oracle (runGradKernelOnOracle), run twice on one fresh problem: each run
 * one fused backward, every gradient of the first within GRADIENT_BOUND,
 * the second bit-identical (deterministic), nothing leaked.
 */
export async function checkGradUnderTiles(tiles: GradTiles, c: OptionCase): Promise<void> {
  // A missing candidate would otherwise test the planner's tiles.
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
      expect(Buffer.from(runs[1][key].buffer).equals(Buffer.from(runs[0][key].buffer))).toBe(true);
    }
  } finally {
    setGradTilesOverride(null);
  }
}

/**
 * For the enclosing describe block: the webgpu backend, the fused kernels
 * forced (FLASH_ATTENTION_IMPL=fused) and their outputs poisoned with NaN
 * before each dispatch; afterwards those undone and `resetPlan` called
 * (the forced plan's override, by default the forward's).
 */
export function useFusedWebGPU(resetPlan: () => void = () => setForwardOverride(null)): void {
  beforeAll(async () => {
    await useBackend('webgpu');
    tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
    setPoisonOutputs(true);
  });
  afterAll(() => {
    tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
    setPoisonOutputs(false);
    resetPlan();
  });
}

/**
 * Dawn's validation of a program's WGSL (a shader module only: no pipeline,
 * which SwiftShader would take seconds to compile), on the webgpu backend's
 * device: no error messages and no validation error, `label` naming it.
 */
export async function expectValidWGSL(label: string, code: string): Promise<void> {
  const device = webgpuBackendOf().device;
  device.pushErrorScope('validation');
  const module = device.createShaderModule({code});
  const info = await module.getCompilationInfo();
  const error = await device.popErrorScope();
  const errors = info.messages.filter(m => m.type === 'error').map(m => m.message);
  expect([label, ...errors]).toEqual([label]);
  expect(error).toBeNull();
}

/**
 * expectValidWGSL for both sliced passes of each plan (head dim d = dv and
 * tiles), once with causal masking and once with dropout, softcap, a
 * window, ALiBi and per-batch lengths compiled in.
 */
export async function expectValidSlicedGradWGSL(
    plans: ReadonlyArray<{d: number, tiles: GradTiles}>): Promise<void> {
  const features = [
    gradFeatures(normalizeOptions({causal: true}, 128, 'test'), false),
    gradFeatures(
        normalizeOptions({dropoutRate: 0.1, softcap: 2, windowSize: [9, 3]}, 128, 'test'), true,
        true),
  ];
  for (const {d, tiles} of plans) {
    for (const f of features) {
      for (const program
               of [new FlashAttentionGradDkDvSlicedProgram(d, d, tiles.dkdv, f),
                   new FlashAttentionGradDqSlicedProgram(d, d, tiles.dq, f)]) {
        await expectValidWGSL(program.key, program.code());
      }
    }
  }
}
