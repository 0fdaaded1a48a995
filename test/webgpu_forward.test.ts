/**
 * The fused WebGPU forward kernel (kernels/webgpu) on Dawn/SwiftShader,
 * under FLASH_ATTENTION_IMPL=fused, against the float64 oracle: every
 * option case, several tilings (with and without subgroups), outputs
 * poisoned with NaN before the kernel runs, no leaks, and GPU errors
 * surfacing as thrown errors.
 */
import * as tf from '@tensorflow/tfjs-core';

import {flashAttentionWebGPUConfig, forwardStats, planForward, setForwardOverride, supportsFlashAttentionWebGPU} from '../kernels/webgpu/FlashAttention';
import {checkOwnPipelineErrors, setPoisonOutputs} from '../kernels/webgpu/own_pipeline';
import {FLASH_ATTENTION_IMPL, FlashAttention, flashAttention, FlashAttentionGrad, registerFusedKernel} from '../src';
import {dropoutThreshold} from '../src/dropout';

import {selectedBackends, useBackend} from './harness/backends';
import {H100_STAND_IN} from './harness/devices';
import {checkForward, OPTION_CASES, OptionCase} from './harness/cases';
import {freshRng} from './harness/problems';
import {useFusedWebGPU} from './harness/small_tiles';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

/** checkForward, asserting that the fused kernel ran exactly once. */
async function checkFused(c: OptionCase): Promise<void> {
  const before = forwardStats.dispatches;
  await checkForward(c, freshRng());
  expect(forwardStats.dispatches).toBe(before + 1);
  await checkOwnPipelineErrors();
}

describeWebGPU('fused WebGPU forward [webgpu]', () => {
  useFusedWebGPU();

  describe('option cases (default tiling)', () => {
    for (const c of OPTION_CASES) {
      it(c.name, () => checkFused(c));
    }
  });

  describe('multi-tile problems on several tilings', () => {
    // Shapes spanning several query and key tiles, with partial edge tiles,
    // GQA, Dv != D and a head dim that is not a multiple of 4.
    const cases: OptionCase[] = [
      {
        name: 'causal, Sq < Sk, GQA, Dv != D',
        shape: {batch: 1, seqQ: 37, seqK: 70, heads: 4, headsKV: 2, headDim: 32, headDimV: 20},
        opts: {causal: true}
      },
      {
        name: 'window [9, 4], alibi, softcap, Sq > Sk',
        shape: {
          batch: 2,
          seqQ: 61,
          seqK: 45,
          heads: 2,
          headsKV: 1,
          headDim: 12,
          headDimV: 12,
          alibi: 'head'
        },
        opts: {windowSize: [9, 4], softcap: 3}
      },
      {
        name: 'dropout, not causal, D = 6',
        shape: {batch: 1, seqQ: 33, seqK: 50, heads: 2, headsKV: 2, headDim: 6, headDimV: 8},
        opts: {dropoutRate: 0.3, seed: 77}
      },
    ];
    const tilings: Array<[string, Parameters<typeof setForwardOverride>[0]]> = [
      ['default tiling', null],
      ['TM=4, TX=4 (shared-memory reductions)', {tiles: {tm: 4, tx: 4, nq: 1, ty: 8}}],
      ['TM=1, TX=2, NQ=2', {tiles: {tm: 1, tx: 2, nq: 2, ty: 16}}],
      // What GPUs run: constant loop bounds, K/V prefetched through registers.
      [
        'GPU code path (prefetch, constant loops)',
        {tiles: {tm: 2, tx: 4, nq: 1, ty: 8}, constantLoops: true, prefetch: true}
      ],
      // The outer-product mode (Q^T, K^T/V, P^T in workgroup memory).
      ['outer product TM=4, TX=4, NQ=2', {tiles: {tm: 4, tx: 4, nq: 2, ty: 4, outer: true}}],
      // Constant loops only on small per-thread tiles: SwiftShader unrolls
      // them fully, and TM=8 or TX=8 bodies take minutes to compile there.
      [
        'outer product TM=8, TX=2, prefetch',
        {tiles: {tm: 8, tx: 2, nq: 1, ty: 2, outer: true}, prefetch: true}
      ],
      [
        'outer product TM=4, TX=4, GPU code path, P V unrolled x16',
        {tiles: {tm: 4, tx: 4, nq: 1, ty: 4, outer: true}, constantLoops: true, prefetch: true}
      ],
      [
        'outer product TM=4, TX=8, no prefetch',
        {tiles: {tm: 4, tx: 8, nq: 1, ty: 2, outer: true}, prefetch: false}
      ],
    ];
    for (const [tilingName, o] of tilings) {
      for (const c of cases) {
        it(`${tilingName}: ${c.name}`, async () => {
          setForwardOverride(o);
          try {
            await checkFused(c);
          } finally {
            setForwardOverride(null);
          }
        });
      }
    }
  });

  it('plans the outer-product tilings on a hardware GPU: D=64-class heads on large grids, D=128 streamed',
     () => {
       const gpu = H100_STAND_IN;
       const large = 16 * 4096;
       expect(planForward(gpu, 64, 64, large)!.tiles)
           .toMatchObject({tm: 8, tx: 16, nq: 1, ty: 8, outer: true});
       expect(planForward(gpu, 64, 64, 16 * 2048)!.tiles.outer).toBe(true);
       expect(planForward(gpu, 64, 64, 16 * 1024)!.tiles).toEqual({tm: 4, tx: 16, nq: 1, ty: 8});
       expect(planForward(gpu, 32, 32, large)!.tiles.outer).toBeUndefined();
       expect(planForward(gpu, 128, 128, large)!.tiles)
           .toEqual({tm: 4, tx: 16, nq: 1, ty: 16, outer: true, dimChunks: 2, streamQuery: true});
       // Too little workgroup memory for them: the classic tilings.
       const small = {...gpu, limits: {...gpu.limits, maxComputeWorkgroupStorageSize: 32768}} as
           unknown as GPUDevice;
       expect(planForward(small, 64, 64, large)!.tiles.outer).toBeUndefined();
       expect(planForward(small, 128, 128, large)!.tiles.outer).toBeUndefined();
       // A software device never gets it (slow compiles).
       const sw = {
         ...gpu,
         adapterInfo:
             {...(gpu as unknown as {adapterInfo: object}).adapterInfo, description: 'SwiftShader'}
       } as unknown as GPUDevice;
       expect(planForward(sw, 64, 64, large)!.tiles.outer).toBeUndefined();
     });

  it('gives the reference path\'s result with the same dropout seed (same bits)', async () => {
    const rng = freshRng();
    const [q, k, v] = [[1, 21, 2, 16], [1, 30, 1, 16], [1, 30, 1, 16]].map(
        (shape: number[]) =>
            tf.tensor(
                Float32Array.from({length: shape.reduce((a, b) => a * b)}, () => rng.normal()),
                shape as [number, number, number, number]) as tf.Tensor4D);
    const opts = {dropoutRate: 0.5, seed: 2 ** 45 + 12345, causal: true};
    try {
      const fused = flashAttention(q, k, v, opts);
      tf.env().set(FLASH_ATTENTION_IMPL, 'reference');
      const reference = flashAttention(q, k, v, opts);
      tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
      const [a, b] = [await fused.data(), await reference.data()];
      let maxRef = 0;
      let maxErr = 0;
      let zeros = 0;
      for (let i = 0; i < a.length; i++) {
        maxRef = Math.max(maxRef, Math.abs(b[i]));
        maxErr = Math.max(maxErr, Math.abs(a[i] - b[i]));
        zeros += b[i] === 0 ? 1 : 0;
      }
      expect(maxErr / maxRef).toBeLessThan(1e-4);
      expect(zeros).toBeLessThan(a.length);  // not a degenerate all-dropped case
      tf.dispose([fused, reference]);
    } finally {
      tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
      tf.dispose([q, k, v]);
    }
    void dropoutThreshold;
  });

  it('leaks no tensors and no GPU memory', async () => {
    const q = tf.randomNormal([2, 19, 4, 16]) as tf.Tensor4D;
    const k = tf.randomNormal([2, 23, 2, 16]) as tf.Tensor4D;
    const v = tf.randomNormal([2, 23, 2, 8]) as tf.Tensor4D;
    const slopes = tf.tensor1d([0.1, 0.2, 0.3, 0.4]);
    const run = () =>
        [flashAttention(q, k, v, {causal: true}),
         ...flashAttention(
             q, k, v, {alibiSlopes: slopes, windowSize: [3, 2], returnSoftmaxLse: true}),
         flashAttention(q, k, v, {dropoutRate: 0.2, seed: 5}),
    ];
    const gpuBytes = async () => {
      const probe = tf.tidy(() => tf.add(tf.fill([4096], 1), 1));
      await probe.data();
      probe.dispose();
      return (tf.memory() as tf.MemoryInfo & {numBytesInGPU: number}).numBytesInGPU;
    };
    tf.dispose(run());  // warm-up: pipelines, buffer pools
    const tensorsBefore = tf.memory().numTensors;
    const bytesBefore = await gpuBytes();
    const dispatchesBefore = forwardStats.dispatches;
    for (let step = 0; step < 3; step++) {
      const outs = run();
      await outs[0].data();
      tf.dispose(outs);
    }
    expect(forwardStats.dispatches).toBe(dispatchesBefore + 9);
    expect(tf.memory().numTensors).toBe(tensorsBefore);
    expect(await gpuBytes()).toBe(bytesBefore);
    tf.dispose([q, k, v, slopes]);
  });

  it('surfaces a GPU validation error as a thrown error (not silent zeros)', async () => {
    const q = tf.randomNormal([1, 8, 1, 16]) as tf.Tensor4D;
    const limit = (tf.backend() as unknown as {
                    device: GPUDevice
                  }).device.limits.maxComputeInvocationsPerWorkgroup;
    // More invocations than the device allows: only the GPU notices.
    setForwardOverride({tiles: {tm: 1, tx: 4, nq: 1, ty: limit / 2}, ignoreLimits: true});
    try {
      await checkOwnPipelineErrors();
      const tensorsBefore = tf.memory().numTensors;
      tf.dispose(flashAttention(q, q, q));
      await expect(checkOwnPipelineErrors()).rejects.toThrow(/FlashAttention forward.*failed/s);
      // Once known, the broken pipeline throws at once, before any GPU work.
      expect(() => flashAttention(q, q, q)).toThrow(/FlashAttention forward/);
      expect(tf.memory().numTensors).toBe(tensorsBefore);
    } finally {
      setForwardOverride(null);
      q.dispose();
    }
  });
});

describeWebGPU('fused WebGPU forward with subgroups [webgpu, device with subgroups]', () => {
  const name = 'webgpu-subgroups';
  beforeAll(async () => {
    await useBackend('webgpu');
    const gpu = (globalThis as unknown as {navigator: {gpu: GPU}}).navigator.gpu;
    const adapter = (await gpu.requestAdapter())!;
    expect(adapter.features.has('subgroups' as GPUFeatureName)).toBe(true);
    const device = await adapter.requestDevice({
      requiredFeatures: ['subgroups' as GPUFeatureName],
      requiredLimits: {
        maxComputeWorkgroupStorageSize: adapter.limits.maxComputeWorkgroupStorageSize,
        maxComputeInvocationsPerWorkgroup: adapter.limits.maxComputeInvocationsPerWorkgroup,
      },
    });
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    const {WebGPUBackend} = require('@tensorflow/tfjs-backend-webgpu');
    tf.registerBackend(name, () => new WebGPUBackend(device, adapter.info));
    for (const config of tf.getKernelsForBackend('webgpu')) {
      if (config.kernelName !== FlashAttention && config.kernelName !== FlashAttentionGrad) {
        tf.registerKernel({...config, backendName: name});
      }
    }
    registerFusedKernel(
        {...flashAttentionWebGPUConfig, backendName: name}, supportsFlashAttentionWebGPU);
    await tf.setBackend(name);
    tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
    setPoisonOutputs(true);
  });
  afterAll(async () => {
    tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
    setPoisonOutputs(false);
    setForwardOverride(null);
    await useBackend('webgpu');
    tf.removeBackend(name);
  });

  const cases = OPTION_CASES.filter(
      c => ['causal, Sq > Sk (rows without keys)', 'alibi [B, H], causal, softcap',
            'dropout with GQA, window and seed >= 2^32']
               .includes(c.name));
  for (const c of cases) {
    it(`subgroup row reductions, outer product (TM=4, TX=4, NQ=2): ${c.name}`, async () => {
      setForwardOverride({tiles: {tm: 4, tx: 4, nq: 2, ty: 4, outer: true}});
      try {
        await checkFused(c);
      } finally {
        setForwardOverride(null);
      }
    });
    it(`subgroup row reductions (TX=4): ${c.name}`, async () => {
      setForwardOverride({tiles: {tm: 2, tx: 4, nq: 1, ty: 8}});
      try {
        await checkFused(c);
      } finally {
        setForwardOverride(null);
      }
    });
  }
});
