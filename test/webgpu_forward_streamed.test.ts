/**
 * The forward candidates of tuning.ts's STREAMED_FORWARD_CANDIDATES
 * (docs/webgpu_tuning.md, "What bounds the D=128 forward"): Q^T streamed
 * beside K^T instead of resident (ForwardTiles.streamQuery) and slices in
 * two buffers with one barrier each (ForwardTiles.doubleBuffer). Forced on
 * Dawn/SwiftShader against the float64 oracle (out and lse, every element,
 * outputs poisoned with NaN): small tiles of each mode at D=128 and at odd
 * head dims with the option families, split-KV, no subgroups, the GPU code
 * path (prefetch, constant loops), per-batch key lengths and a packed
 * varlen call; the one H100 candidate that fits SwiftShader's 32 KiB at its
 * own size (D=64); the WGSL of every candidate at D=128 through Dawn's
 * validation; and that the planner does not take them.
 */
import * as tf from '@tensorflow/tfjs-core';

import {forwardStats, planForward, setForwardOverride} from '../kernels/webgpu/FlashAttention';
import {ForwardTiles, forwardWGSL, prefetchFloats, tileSizes, workgroupBytes} from '../kernels/webgpu/flash_attention_webgpu';
import {checkOwnPipelineErrors, webgpuBackendOf} from '../kernels/webgpu/own_pipeline';
import {forwardVariantName, STREAMED_FORWARD_CANDIDATES} from '../kernels/webgpu/tuning';
import {scoreOptionsFromAttrs} from '../kernels/webgpu/wgsl_snippets';
import {flashAttentionVarlen} from '../src';

import {selectedBackends} from './harness/backends';
import {OptionCase, optionCaseAtHeadDim as atHeadDim} from './harness/cases';
import {H100_STAND_IN} from './harness/devices';
import {cumulativeLengths, expectClose, FORWARD_BOUND, freshRng, randomArray, sequenceProblem} from './harness/problems';
import {checkForwardUnderPlan, checkSeqlensForwardUnderPlan, expectForcibleAtD128, expectValidWGSL, useFusedWebGPU} from './harness/small_tiles';
import {oracleForward} from './oracle';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

/** 16 x 16 tiles, 16 threads, Q^T streamed in two slices. */
const SMALL_STREAMED: ForwardTiles = {
  tm: 4,
  tx: 4,
  nq: 1,
  ty: 4,
  outer: true,
  dimChunks: 2,
  streamQuery: true
};
/** 16 x 16 tiles, 16 threads, two slices in two buffers. */
const SMALL_DOUBLE: ForwardTiles = {
  tm: 4,
  tx: 4,
  nq: 1,
  ty: 4,
  outer: true,
  dimChunks: 2,
  doubleBuffer: true
};
/** Candidate F's 8 x 4 micro-tiles (two row quads) at 16 x 16, 8 threads. */
const SMALL_EIGHT_ROWS: ForwardTiles = {
  tm: 8,
  tx: 4,
  nq: 1,
  ty: 2,
  outer: true,
  dimChunks: 2,
  streamQuery: true
};
/** Candidate H's 4 x 8 micro-tiles (two key quads) at 16 x 32, 16 threads. */
const SMALL_EIGHT_KEYS: ForwardTiles = {
  tm: 4,
  tx: 4,
  nq: 2,
  ty: 4,
  outer: true,
  dimChunks: 2,
  streamQuery: true
};

type Override = Parameters<typeof setForwardOverride>[0];

describe('streamed and double-buffered forward candidates: sizes and plans (no GPU)', () => {
  const config = (tiles: ForwardTiles, d = 128, dv = d) => ({headDim: d, headDimV: dv, tiles});

  it('each fits 48 KiB at D=128 with subgroups, is forcible there and has a variant name', () => {
    expect(STREAMED_FORWARD_CANDIDATES.length).toBe(4);
    const names = STREAMED_FORWARD_CANDIDATES.map(forwardVariantName);
    expect(names).toEqual(
        ['4,16,1,16,o,c2,qs', '8,16,1,8,o,c2,qs', '4,8,1,16,o,c4,db', '4,8,2,16,o,c2,qs']);
    for (const tiles of STREAMED_FORWARD_CANDIDATES) {
      expect(workgroupBytes(config(tiles), true)).toBe(49152);
      expectForcibleAtD128(tiles);
    }
  });

  it('E: Q^T and K^T slices 16 KiB each, P^T 16 KiB; 32 output floats per thread', () => {
    const c = config(STREAMED_FORWARD_CANDIDATES[0]);
    const s = tileSizes(c);
    expect([s.br, s.bc, s.threads, s.nj, s.dc4, s.vcw, s.valueChunks, s.buffers]).toEqual([
      64, 64, 256, 2, 16, 16, 2, 1
    ]);
    // A Q^T slice (4 vec4s) and a K^T slice (4) ahead per thread.
    expect(prefetchFloats(c)).toBe(32);
    // Without subgroups the row reductions' 4 KiB do not fit.
    expect(workgroupBytes(c, false)).toBe(49152 + 4096);
  });

  it('E with 4 slices fits 48 KiB at D=256: 64 output floats per thread', () => {
    const c = config({...STREAMED_FORWARD_CANDIDATES[0], dimChunks: 4}, 256);
    const s = tileSizes(c);
    expect([s.dc4, s.valueChunks, s.nj, s.vcw]).toEqual([16, 4, 4, 16]);
    expect(workgroupBytes(c, true)).toBe(49152);
  });

  it('H: 64 x 64 tiles of 128 threads, 4 x 8 S and 4 x 16 O per thread', () => {
    const c = config(STREAMED_FORWARD_CANDIDATES[3]);
    const s = tileSizes(c);
    expect([s.br, s.bc, s.threads, s.nj, s.dc4, s.vcw]).toEqual([64, 64, 128, 4, 16, 16]);
    // Q^T and K^T slices: 8 + 8 vec4s ahead per thread.
    expect(prefetchFloats(c)).toBe(64);
  });

  it('G: two 4 KiB slice buffers beside the resident Q^T, 8 prefetch floats', () => {
    const c = config(STREAMED_FORWARD_CANDIDATES[2]);
    const s = tileSizes(c);
    expect([s.br, s.bc, s.threads, s.dc4, s.vcw, s.buffers]).toEqual([64, 32, 128, 8, 8, 2]);
    expect(workgroupBytes(c, true)).toBe(32768 + 2 * 4096 + 8192);
    expect(prefetchFloats(c)).toBe(8);
  });

  it('takes fewer V slices where a thread has fewer output quads than slices', () => {
    // Dv=16 over TX=4: one quad per thread, so one V slice for two K^T slices.
    const s = tileSizes(config(SMALL_DOUBLE, 128, 16));
    expect([s.chunks, s.valueChunks, s.nj, s.vcw]).toEqual([2, 1, 1, 4]);
    // The sliced candidates keep a V slice per K^T slice.
    const a = tileSizes(config({tm: 4, tx: 8, nq: 1, ty: 16, outer: true, dimChunks: 2}));
    expect([a.valueChunks, a.nj, a.vcw]).toEqual([2, 4, 16]);
  });

  it('the planner takes E at head dims 97..128 and none of them elsewhere', () => {
    for (const d of [80, 96, 100, 128]) {
      for (const rows of [16 * 512, 16 * 1024, 16 * 16384]) {
        const tiles = planForward(H100_STAND_IN, d, d, rows)!.tiles;
        expect(tiles.doubleBuffer).toBeUndefined();
        if (d > 96) {
          expect(tiles).toEqual(STREAMED_FORWARD_CANDIDATES[0]);
        } else {
          expect(tiles.streamQuery).toBeUndefined();
        }
      }
    }
  });

  it('refuses streamQuery, doubleBuffer and unroll without the outer-product mode', () => {
    const base = {
      headDim: 128,
      headDimV: 128,
      score: scoreOptionsFromAttrs({softcap: 0, windowLeft: -1, windowRight: 0}, false),
      alibiMode: 0 as const,
      dropout: false,
      subgroups: true,
      reverseRows: false,
      runtimeLoops: false,
    };
    const classic = {tm: 2, tx: 8, nq: 1, ty: 16};
    expect(() => forwardWGSL({...base, tiles: {...classic, streamQuery: true}}))
        .toThrow('streamQuery needs the outer-product tiling');
    expect(() => forwardWGSL({...base, tiles: {...classic, doubleBuffer: true}}))
        .toThrow('doubleBuffer needs the outer-product tiling');
    expect(() => forwardWGSL({...base, tiles: {...classic, unroll: 4}}))
        .toThrow('unroll needs the outer-product tiling');
    expect(() => forwardWGSL({...base, tiles: {...SMALL_STREAMED, unroll: 6}}))
        .toThrow('unroll must be 4, 8 or 16, got 6');
  });
});

describeWebGPU('fused WebGPU forward, streamed Q and double buffers [webgpu]', () => {
  useFusedWebGPU();

  // Each case compiles its own pipeline (seconds on SwiftShader), so each
  // covers several things: both modes and their combination, option
  // families, D=128 and 256, odd head dims (D=100/70: scalar loads and a padded
  // slice; D=80), an odd number of slices per key tile (Dv=16: two K^T
  // slices and one V slice, so the double buffers' parity alternates
  // between tiles), no subgroups, split-KV, the GPU code path (D=16).
  const both = {...SMALL_STREAMED, doubleBuffer: true};
  const cases: Array<[OptionCase, Override]> = [
    [atHeadDim('causal, Sq > Sk (rows without keys)', 128), {tiles: SMALL_STREAMED}],
    [atHeadDim('plain', 256, 256, 8), {tiles: {...both, dimChunks: 4}}],
    [atHeadDim('alibi [B, H], causal, softcap', 100, 70), {tiles: both, subgroups: false}],
    [atHeadDim('dropout with GQA, window and seed >= 2^32', 128), {tiles: SMALL_DOUBLE}],
    [atHeadDim('window [4, -1], Sq < Sk', 80), {tiles: SMALL_DOUBLE, splits: 3}],
    [atHeadDim('Sq != Sk, not causal', 128, 16), {tiles: both}],
    [atHeadDim('GQA (H=4, Hk=2)', 96), {tiles: SMALL_EIGHT_ROWS}],
    [atHeadDim('MQA (H=3, Hk=1)', 80), {tiles: SMALL_EIGHT_KEYS}],
    [atHeadDim('softcap', 16), {tiles: {...both, unroll: 4}, constantLoops: true, prefetch: true}],
    [atHeadDim('alibi [H]', 16), {tiles: SMALL_DOUBLE, constantLoops: true, prefetch: true}],
  ];
  for (const [c, o] of cases) {
    it(`${c.name} [${JSON.stringify(o)}]`, () => checkForwardUnderPlan(c, o));
  }

  // G's own tiles fit SwiftShader's 32 KiB at D=48 (Q^T 12, slices 2 x 4,
  // P^T 8 KiB, and 2 KiB for the row reductions where subgroups are
  // narrower than its 8 threads per row).
  it('candidate G at its own tile size, D=48, causal (one query tile, two key tiles)',
     () => checkForwardUnderPlan(atHeadDim('causal', 48), {tiles: STREAMED_FORWARD_CANDIDATES[2]}));

  it('the candidates\' WGSL at D=128 (also with unroll 4), and E at D=256, passes Dawn\'s validation',
     async () => {
       // Their 48 KiB pipelines cannot be created here (32 KiB), but the
       // shader module is validated without the limit; every option on,
       // constant loops and the prefetch (the GPU code path).
       const device = webgpuBackendOf().device;
       const subgroups = device.features.has('subgroups' as GPUFeatureName);
       const configs: Array<[ForwardTiles, number]> = [
         ...STREAMED_FORWARD_CANDIDATES.map((t): [ForwardTiles, number] => [t, 128]),
         [{...STREAMED_FORWARD_CANDIDATES[0], dimChunks: 4}, 256],
         // The planned tiling and E with 4-step loop bodies.
         [{tm: 4, tx: 8, nq: 1, ty: 16, outer: true, dimChunks: 2, unroll: 4}, 128],
         [{...STREAMED_FORWARD_CANDIDATES[0], unroll: 4}, 128],
       ];
       for (const [tiles, dim] of configs) {
         for (const splitKeys of [false, true]) {
           const code = forwardWGSL({
             headDim: dim,
             headDimV: dim,
             tiles,
             score: scoreOptionsFromAttrs(
                 {softcap: 30, windowLeft: 64, windowRight: 0, paddedDiagonal: true}, true, true),
             alibiMode: 2,
             dropout: true,
             subgroups,
             reverseRows: true,
             runtimeLoops: false,
             splitKeys,
           });
           if (tiles.unroll === 4) {
             // 4 head-dim steps and 4 keys per loop body (default 8 and 16).
             expect(code).toContain('d += 4u)');
             expect(code).toContain('key += 4u)');
             expect(code).not.toContain('d += 8u)');
           }
           await expectValidWGSL(JSON.stringify(tiles), code);
         }
       }
     });

  it('per-batch key lengths (seqlensK), causal, D=128: each row alone',
     () => checkSeqlensForwardUnderPlan(
         {tiles: both}, {batch: 3, seq: 37, heads: 2, dim: 128}, [37, 0, 19]));

  it('a packed varlen call (3 sequences, GQA, causal), D=100: each sequence alone', async () => {
    setForwardOverride({tiles: both});
    const rng = freshRng();
    const [heads, headsKV, dim] = [4, 2, 100];
    const lensQ = [21, 5, 34];
    const lensK = [30, 5, 17];
    const total = (l: number[]) => l.reduce((a, b) => a + b, 0);
    const [cuQ, cuK] = [cumulativeLengths(lensQ), cumulativeLengths(lensK)];
    const qv = randomArray(total(lensQ) * heads * dim, rng);
    const kv = randomArray(total(lensK) * headsKV * dim, rng);
    const vv = randomArray(total(lensK) * headsKV * dim, rng);
    const q = tf.tensor3d(Float32Array.from(qv), [total(lensQ), heads, dim]);
    const k = tf.tensor3d(Float32Array.from(kv), [total(lensK), headsKV, dim]);
    const v = tf.tensor3d(Float32Array.from(vv), [total(lensK), headsKV, dim]);
    const cuQT = tf.tensor1d(cuQ, 'int32');
    const cuKT = tf.tensor1d(cuK, 'int32');
    const tensors = tf.memory().numTensors;
    try {
      const before = forwardStats.dispatches;
      const [out, lse] = flashAttentionVarlen(
          q, k, v, cuQT, cuKT,
          {causal: true, maxSeqlenQ: 36, maxSeqlenK: 31, returnSoftmaxLse: true});
      const [got, gotLse] = [await out.data(), await lse.data()];
      tf.dispose([out, lse]);
      expect(forwardStats.dispatches).toBe(before + 1);
      expect(tf.memory().numTensors).toBe(tensors);
      const totalQ = total(lensQ);
      lensQ.forEach((lq, b) => {
        const lk = lensK[b];
        const f = oracleForward(
            sequenceProblem({
              seqQ: lq,
              seqK: lk,
              heads,
              headsKV,
              dim,
              q: qv.slice(cuQ[b] * heads * dim, cuQ[b + 1] * heads * dim),
              k: kv.slice(cuK[b] * headsKV * dim, cuK[b + 1] * headsKV * dim),
              v: vv.slice(cuK[b] * headsKV * dim, cuK[b + 1] * headsKV * dim)
            }),
            {causal: true});
        const what = `sequence ${b} (${lq} x ${lk}, seed ${rng.seed})`;
        expectClose(
            got.slice(cuQ[b] * heads * dim, cuQ[b + 1] * heads * dim), f.out, FORWARD_BOUND,
            `${what}: out`);
        // lse is [H, totalQ]: this sequence's rows of each head.
        const gotRows = new Float32Array(heads * lq);
        for (let h = 0; h < heads; h++) {
          gotRows.set(gotLse.slice(h * totalQ + cuQ[b], h * totalQ + cuQ[b + 1]), h * lq);
        }
        expectClose(gotRows, f.lse, FORWARD_BOUND, `${what}: lse`);
      });
      await checkOwnPipelineErrors();
    } finally {
      setForwardOverride(null);
      tf.dispose([q, k, v, cuQT, cuKT]);
    }
  });
});
