/**
 * The dS scratch of the fused WebGPU backward (GradTiles.dsScratch;
 * docs/webgpu_tuning.md, "dS scratch"): the dK/dV pass stores dS, the dQ
 * pass reads it back instead of recomputing it. Forced on Dawn (SwiftShader
 * without a GPU) for the whole-row tiles and for scaled-down streamed
 * tiles, against the float64 oracle's gradients (docs/design.md, "Accuracy
 * bounds": 5e-4, an lse gradient included) with the option families,
 * NaN-poisoned outputs and scratch (a dS the dQ pass reads but the dK/dV
 * pass did not write would show), bit-identical reruns and no leaks; then
 * a lowered budget: several chunks, and the fallback to the recomputing dQ
 * pass; and the full-size WGSL of the planned D=128 tiles.
 */
import * as tf from '@tensorflow/tfjs-core';

import {dsChunkUnits, dsScratchChunkRuns, dsScratchPlan, fusedGradRunCount, GradTiles, setGradTilesOverride} from '../kernels/webgpu/FlashAttentionGrad';
import {FlashAttentionGradDkDvProgram} from '../kernels/webgpu/flash_attention_grad_dkdv_webgpu';
import {FlashAttentionGradDkDvSlicedProgram} from '../kernels/webgpu/flash_attention_grad_dkdv_sliced_webgpu';
import {dqStorageBytes, dqTilesValid, FlashAttentionGradDqProgram} from '../kernels/webgpu/flash_attention_grad_dq_webgpu';
import {FlashAttentionGradDqSlicedProgram} from '../kernels/webgpu/flash_attention_grad_dq_sliced_webgpu';
import {gradFeatures} from '../kernels/webgpu/flash_attention_grad_wgsl';
import {DS_SCRATCH_PLANS, setDsScratchBudget, setForwardOverride, STREAMED_GRAD_CANDIDATES} from '../kernels/webgpu/tuning';
import {FLASH_ATTENTION_IMPL, flashAttention} from '../src';
import {webgpuBackendOf} from '../kernels/webgpu/own_pipeline';
import {normalizeOptions} from '../src/options';
import {gradVariantForDim, parseGradVariant} from '../benchmarks/plan_variants';

import {selectedBackends} from './harness/backends';
import {OptionCase} from './harness/cases';
import {checkGradUnderTiles, expectValidWGSL, useFusedGradWebGPU} from './harness/small_tiles';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

/** A whole-row dS-reading dQ pass at D=128: 64 rows x 32 keys, 256 invocations. */
const DSQ128 = {
  br: 64,
  bc: 32,
  threads: 256
};

/** Whole-row tiles: several key and query blocks per head at these lengths. */
const PLAIN: GradTiles = {
  dkdv: {bc: 16, br: 8, threads: 32},
  dq: {br: 8, bc: 16, threads: 32},
  dsScratch: true,
};
/** S2's streamed passes scaled down to head dims of 32 (2 slices each). */
const STREAMED: GradTiles = {
  dkdv: {bc: 16, br: 8, threads: 64, dimChunks: 2, streamed: true},
  dq: {br: 16, bc: 16, threads: 64, dimChunks: 2, streamed: true},
  dsScratch: true,
};

/** The streamed dK/dV pass with a whole-row dS-reading dQ pass (GradTiles.dsDq). */
const MIXED: GradTiles = {
  ...STREAMED,
  dsDq: {br: 8, bc: 16, threads: 32}
};

function gpuBytes(): number {
  return (tf.memory() as tf.MemoryInfo & {numBytesInGPU?: number}).numBytesInGPU ?? 0;
}

describe('dS scratch chunks', () => {
  it('take as many (batch, kv head) pairs as the budget and the binding size allow', () => {
    // 4 pairs of 1000 bytes, 100 bytes of stats.
    expect(dsChunkUnits(4, 1000, 100, 1e9, 1e9)).toBe(4);
    expect(dsChunkUnits(4, 1000, 100, 2999, 1e9)).toBe(2);
    expect(dsChunkUnits(4, 1000, 100, 1e9, 2100)).toBe(2);
    expect(dsChunkUnits(4, 1000, 100, 999, 1e9)).toBe(0);
    expect(dsChunkUnits(4, 1000, 100, 1e9, 1099)).toBe(0);
    // Room for 3 of 4: two chunks of 2 (not 3 + 1); for 4 of 9: three of 3.
    expect(dsChunkUnits(4, 1000, 100, 3000, 1e9)).toBe(2);
    expect(dsChunkUnits(9, 1000, 100, 4000, 1e9)).toBe(3);
  });

  it('whole-row dS-reading dQ tiles fit 48 KiB at D=128 where the recomputing ones do not', () => {
    expect(dqStorageBytes(DSQ128, 128, 128, true)).toBe(26624);
    expect(dqStorageBytes(DSQ128, 128, 128)).toBeGreaterThan(49152);
    expect(dqTilesValid(DSQ128)).toBe(true);
  });


  it('are planned where a DS_SCRATCH_PLANS entry says, on hardware, without lengths', () => {
    const S2 = STREAMED_GRAD_CANDIDATES[1];
    const shapes =
        {batch: 1, seqQ: 2048, seqK: 2048, heads: 16, headsKV: 16, headDim: 128, headDimV: 128};
    const open = normalizeOptions({}, 128, 'test');
    const causal = normalizeOptions({causal: true}, 128, 'test');
    const plan = (t: GradTiles, a = open, hardware = true, seqlens = false, storage = 49152) =>
        dsScratchPlan(t, shapes, a, hardware, seqlens, storage);
    // Planned on hardware at every head dim up to 128, masked or not; never on
    // software devices or with per-batch lengths.
    expect(plan(S2)).toEqual({...S2, dsScratch: true});
    expect(plan(S2, causal)).toEqual({...S2, dsScratch: true});
    expect(plan(S2, open, false)).toBeNull();
    expect(plan(S2, open, true, true)).toBeNull();
    expect(dsScratchPlan(S2, {...shapes, headDim: 160}, open, true, false, 49152)).toBeNull();
    // An entry may name the dS-reading dQ tiles and the budget.
    const planned = DS_SCRATCH_PLANS.splice(0);
    DS_SCRATCH_PLANS.push({
      minHeadDim: 96,
      maxHeadDim: 128,
      minKeys: 1024,
      masked: false,
      dsDq: DSQ128,
      budgetBytes: 2 ** 30
    });
    try {
      expect(plan(S2)).toEqual({...S2, dsScratch: true, dsDq: DSQ128, dsScratchBudget: 2 ** 30});
      expect(plan(S2, causal)).toBeNull();
      expect(plan(S2, open, false)).toBeNull();
      expect(plan(S2, open, true, true)).toBeNull();
      // Its dQ tiles need 26624 bytes.
      expect(plan(S2, open, true, false, 26623)).toBeNull();
      // Forced either way by the tiles (but never with lengths).
      expect(plan({...S2, dsScratch: false})).toBeNull();
      expect(plan({...PLAIN, dsScratch: true}, causal, false)).toEqual({...PLAIN, dsScratch: true});
      expect(plan({...PLAIN, dsScratch: true}, causal, false, true)).toBeNull();
    } finally {
      DS_SCRATCH_PLANS.splice(0, DS_SCRATCH_PLANS.length, ...planned);
    }
  });

  it('are forced by `ds` in the benchmarks\' spelling, for one head dim with `D:`', () => {
    const S2 = '64,32,64,64,ck2,cq4,tk256,tq256,stk,stq';
    expect(parseGradVariant(`128:${S2},ds`, true))
        .toEqual({...STREAMED_GRAD_CANDIDATES[1], dsScratch: true});
    expect(parseGradVariant('32,32,64,16,ds0', false)).toEqual({
      dkdv: {bc: 32, br: 32, threads: 128},
      dq: {br: 64, bc: 16, threads: 128},
      dsScratch: false
    });
    expect(parseGradVariant('32,32,64,16', false).dsScratch).toBeUndefined();
    expect(parseGradVariant('32,32,64,16,ds512', false))
        .toEqual({...parseGradVariant('32,32,64,16,ds', false), dsScratchBudget: 512 * 2 ** 20});
    expect(() => parseGradVariant('32,32,64,16,dsx', false)).toThrow(/--grad-variants/);
    expect(() => parseGradVariant('32,32,64,16,ds-1', false)).toThrow(/--grad-variants/);
    expect([64, 128].map(d => gradVariantForDim(`128:${S2},ds`, d))).toEqual([false, true]);
    expect(gradVariantForDim('32,32,64,16,ds', 128)).toBe(true);
    expect(parseGradVariant(`${S2},ds,dsq64x32t256`, true))
        .toEqual({...STREAMED_GRAD_CANDIDATES[1], dsScratch: true, dsDq: DSQ128});
    expect(parseGradVariant(`${S2},ds,dsq64x32`, true).dsDq).toEqual({...DSQ128, threads: 128});
  });
});

describeWebGPU('fused WebGPU backward with the dS scratch [webgpu]', () => {
  useFusedGradWebGPU();
  afterEach(() => setDsScratchBudget(null));

  const CASES: Array<{tiles: GradTiles, c: OptionCase}> = [
    {
      tiles: PLAIN,
      c: {
        name: 'D=32, Sq < Sk, not causal',
        shape: {batch: 2, seqQ: 37, seqK: 70, heads: 2, headsKV: 2, headDim: 32, headDimV: 32},
        opts: {}
      }
    },
    {
      tiles: PLAIN,
      c: {
        name: 'D=32, causal, GQA, dropout',
        shape: {batch: 1, seqQ: 50, seqK: 50, heads: 4, headsKV: 2, headDim: 32, headDimV: 32},
        opts: {causal: true, dropoutRate: 0.2, seed: 7}
      }
    },
    {
      tiles: {...PLAIN, dkdv: {...PLAIN.dkdv, split: true}},
      c: {
        name: 'D=30, Dv=34, Sq > Sk, window, softcap, alibi per head, split S/dP',
        shape: {
          batch: 1,
          seqQ: 60,
          seqK: 41,
          heads: 2,
          headsKV: 1,
          headDim: 30,
          headDimV: 34,
          alibi: 'head'
        },
        opts: {windowSize: [12, 5], softcap: 2}
      }
    },
    {
      tiles: STREAMED,
      c: {
        name: 'D=32, causal, GQA, softcap, alibi per batch',
        shape: {
          batch: 2,
          seqQ: 45,
          seqK: 45,
          heads: 4,
          headsKV: 2,
          headDim: 32,
          headDimV: 32,
          alibi: 'batch'
        },
        opts: {causal: true, softcap: 3}
      }
    },
    {
      tiles: STREAMED,
      c: {
        name: 'D=32, Sq < Sk, window, dropout',
        shape: {batch: 1, seqQ: 29, seqK: 66, heads: 2, headsKV: 2, headDim: 32, headDimV: 32},
        opts: {windowSize: [20, 9], dropoutRate: 0.25, seed: 3}
      }
    },
  ];
  CASES.push({
    tiles: MIXED,
    c: {
      name: 'D=32, causal, GQA, dropout, alibi per head (its own dQ tiles)',
      shape: {
        batch: 1,
        seqQ: 50,
        seqK: 43,
        heads: 4,
        headsKV: 2,
        headDim: 32,
        headDimV: 32,
        alibi: 'head'
      },
      opts: {causal: true, dropoutRate: 0.2, seed: 11}
    }
  });
  const tilesName = (t: GradTiles) =>
      `${t.dkdv.streamed ? 'streamed' : 'whole-row'}${t.dsDq != null ? ' + dsDq' : ''}`;
  for (const {tiles, c} of CASES) {
    it(`kernel vs oracle, ${tilesName(tiles)} tiles: ${c.name}`, async () => {
      const chunks = dsScratchChunkRuns();
      const bytes = gpuBytes();
      await checkGradUnderTiles(tiles, c);
      // One chunk per run, both runs.
      expect(dsScratchChunkRuns()).toBe(chunks + 2);
      expect(gpuBytes()).toBe(bytes);
    });
  }

  // B = 5, Hk = 1: five (batch, kv head) pairs of 2 query heads.
  const GQA: OptionCase = {
    name: 'D=32, GQA, causal',
    shape: {batch: 5, seqQ: 40, seqK: 44, heads: 2, headsKV: 1, headDim: 32, headDimV: 32},
    opts: {causal: true}
  };
  const pairBytes = 2 * 40 * Math.ceil(44 / 4) * 16;
  // (lse, Delta) of every row, before the scratch.
  const statsBytes = 5 * 2 * 40 * 8;
  for (const tiles of [PLAIN, STREAMED, MIXED]) {
    const what = tilesName(tiles);
    it(`in chunks under a lowered budget (${what}): 2 + 2 + 1 pairs, then 1 each`, async () => {
      // Room for 2 pairs: chunks of 2, 2 and 1.
      setDsScratchBudget(2 * pairBytes + 5);
      const chunks = dsScratchChunkRuns();
      const bytes = gpuBytes();
      // The buffers the call takes from tfjs's pool: the stats rows come
      // with the scratch of one chunk of 2 pairs, within the budget.
      const manager = webgpuBackendOf().bufferManager;
      const acquire = manager.acquireBuffer.bind(manager);
      const acquired: number[] = [];
      const spy = jest.spyOn(manager, 'acquireBuffer')
                      .mockImplementation((...args: Parameters<typeof acquire>) => {
                        acquired.push(args[0]);
                        return acquire(...args);
                      });
      try {
        await checkGradUnderTiles(tiles, GQA);
      } finally {
        spy.mockRestore();
      }
      expect(acquired).toContain(statsBytes + 2 * pairBytes);
      for (const pairs of [1, 3, 4, 5]) {
        expect(acquired).not.toContain(statsBytes + pairs * pairBytes);
      }
      expect(dsScratchChunkRuns()).toBe(chunks + 2 * 3);
      // One pair per chunk.
      setDsScratchBudget(pairBytes);
      await checkGradUnderTiles(tiles, GQA);
      expect(dsScratchChunkRuns()).toBe(chunks + 2 * 3 + 2 * 5);
      // Everything freed after the calls.
      expect(gpuBytes()).toBe(bytes);
    });

    it(`falls back to recomputing dS when one pair does not fit (${what})`, async () => {
      setDsScratchBudget(pairBytes - 1);
      const chunks = dsScratchChunkRuns();
      await checkGradUnderTiles(tiles, GQA);
      expect(dsScratchChunkRuns()).toBe(chunks);
    });
  }

  it('the planned D=128 tiles (S2) and D=64 tiles with the scratch pass Dawn\'s validation',
     async () => {
       const features = [
         gradFeatures(normalizeOptions({}, 128, 'test'), false),
         gradFeatures(
             normalizeOptions({dropoutRate: 0.1, softcap: 2, windowSize: [9, 3]}, 128, 'test'),
             true),
       ];
       const S2 = STREAMED_GRAD_CANDIDATES[1];
       const D64 = {dkdv: {bc: 32, br: 32, threads: 128}, dq: {br: 64, bc: 16, threads: 128}};
       for (const f of features) {
         for (const program
                  of [new FlashAttentionGradDkDvSlicedProgram(128, 128, S2.dkdv, f, true),
                      new FlashAttentionGradDqSlicedProgram(128, 128, S2.dq, f, true),
                      new FlashAttentionGradDqSlicedProgram(
                          128, 128, {...S2.dq, prefetch: false}, f, true),
                      new FlashAttentionGradDkDvProgram(64, 64, D64.dkdv, f, true),
                      new FlashAttentionGradDqProgram(64, 64, D64.dq, f, true),
                      new FlashAttentionGradDqProgram(128, 128, DSQ128, f, true),
                      new FlashAttentionGradDqProgram(128, 128, {...DSQ128, threads: 128}, f, true),
         ]) {
           await expectValidWGSL(program.key, program.code());
         }
       }
     });

  it('is not taken by calls with per-batch lengths (the recomputing dQ pass runs)', async () => {
    const [batch, seq, heads, dim] = [2, 24, 2, 32];
    const [q, k, v, dOut] = [0, 1, 2, 3].map(() => tf.randomNormal([batch, seq, heads, dim]));
    const seqlensQ = tf.tensor1d([24, 13], 'int32');
    const seqlensK = tf.tensor1d([17, 24], 'int32');
    tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
    // Small forward tiles: SwiftShader compiles the planned ones slowly.
    setForwardOverride({tiles: {tm: 1, tx: 2, nq: 1, ty: 8}});
    const grads = async (tiles: GradTiles) => {
      setGradTilesOverride(tiles);
      const g = tf.grads(
          (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => tf.sum(tf.mul(
              flashAttention(
                  a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D,
                  {seqlensQ, seqlensK, causal: true}),
              dOut)))([q, k, v]);
      const data = await Promise.all(g.map(x => x.data() as Promise<Float32Array>));
      tf.dispose(g);
      return data;
    };
    try {
      const chunks = dsScratchChunkRuns();
      const runs = fusedGradRunCount();
      const withScratch = await grads(PLAIN);
      const without = await grads({...PLAIN, dsScratch: false});
      expect(fusedGradRunCount()).toBe(runs + 2);
      expect(dsScratchChunkRuns()).toBe(chunks);
      withScratch.forEach(
          (x, n) => expect(Buffer.from(x.buffer)).toEqual(Buffer.from(without[n].buffer)));
    } finally {
      setGradTilesOverride(null);
      setForwardOverride(null);
      tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
      tf.dispose([q, k, v, dOut, seqlensQ, seqlensK]);
    }
  });
});
