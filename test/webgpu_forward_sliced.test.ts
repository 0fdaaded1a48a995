/**
 * The head-dim-sliced outer-product forward (ForwardTiles.dimChunks,
 * docs/webgpu_tuning.md, "Head dims above 64"): K^T and V go through
 * workgroup memory in slices of the head dim beside a whole Q^T tile.
 * Forced on Dawn/SwiftShader against the float64 oracle (out and lse, every
 * element, outputs poisoned with NaN) at D=128, 96, 80 and head dims that
 * are not multiples of 4, with the option families, the GPU code path
 * (prefetch, constant loops), no subgroups, split-KV and per-batch key
 * lengths; plus what the planner sees of the H100 candidates, which its
 * default choice must not take.
 */
import {planForward, setForwardOverride} from '../kernels/webgpu/FlashAttention';
import {ForwardTiles, forwardWGSL, prefetchFloats, tileSizes, workgroupBytes} from '../kernels/webgpu/flash_attention_webgpu';
import {webgpuBackendOf} from '../kernels/webgpu/own_pipeline';
import {FORWARD_TILINGS, SLICED_FORWARD_CANDIDATES} from '../kernels/webgpu/tuning';
import {scoreOptionsFromAttrs} from '../kernels/webgpu/wgsl_snippets';

import {selectedBackends} from './harness/backends';
import {OptionCase, optionCaseAtHeadDim as atHeadDim} from './harness/cases';
import {H100_STAND_IN} from './harness/devices';
import {checkForwardUnderPlan, checkSeqlensForwardUnderPlan, expectForcibleAtD128, expectValidWGSL, useFusedWebGPU} from './harness/small_tiles';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

/** 16 x 16 tiles, 16 threads, two head-dim slices: small enough for SwiftShader. */
const SMALL: ForwardTiles = {
  tm: 4,
  tx: 4,
  nq: 1,
  ty: 4,
  outer: true,
  dimChunks: 2
};

/** The H100 candidate that also fits SwiftShader's 32 KiB (32 x 32, 28 KiB). */
const FITS_SWIFTSHADER = SLICED_FORWARD_CANDIDATES.find(
    t => workgroupBytes({headDim: 128, headDimV: 128, tiles: t}, false) <= 32768)!;

type Override = Parameters<typeof setForwardOverride>[0];

describe('head-dim-sliced tilings: sizes and plans (no GPU)', () => {
  const sizes = (tiles: ForwardTiles, d = 128, dv = d) =>
      ({c: {headDim: d, headDimV: dv, tiles}, s: tileSizes({headDim: d, headDimV: dv, tiles})});

  it('the H100 candidates fit 48 KiB with subgroups and are forcible there', () => {
    expect(SLICED_FORWARD_CANDIDATES.length).toBeGreaterThanOrEqual(2);
    expect(FITS_SWIFTSHADER).toMatchObject({tm: 4, tx: 8, ty: 8, dimChunks: 2});
    for (const tiles of SLICED_FORWARD_CANDIDATES) {
      const {c} = sizes(tiles);
      expect(workgroupBytes(c, true)).toBeLessThanOrEqual(49152);
      expectForcibleAtD128(tiles);
    }
  });

  it('64 x 32 with two slices: Q^T 32 KiB, one 8 KiB slice, P^T 8 KiB', () => {
    const tiles = {tm: 4, tx: 8, nq: 1, ty: 16, outer: true, dimChunks: 2};
    const {c, s} = sizes(tiles);
    expect([s.br, s.bc, s.threads, s.nj, s.dc4, s.vcw]).toEqual([64, 32, 128, 4, 16, 16]);
    expect(workgroupBytes(c, true)).toBe(32768 + 8192 + 8192);
    // Without slices the same tiles need 56 KiB.
    expect(workgroupBytes({...c, tiles: {...tiles, dimChunks: 1}}, true)).toBe(57344);
    // One slice of K^T or V ahead in registers: 4 vec4s.
    expect(prefetchFloats(c)).toBe(16);
  });

  it('rounds each thread\'s output quads up to whole slices (Dv=80, 96; odd D)', () => {
    // Dv=80: 20 quads over TX=4 -> 5 per thread -> 6 in 2 slices of 12 columns.
    expect(sizes(SMALL, 96, 80).s).toMatchObject({nj: 6, vcw: 12, dc4: 12, dq4: 24, dv4: 20});
    // D=100: 25 quads -> slices of 13, the last padded.
    expect(sizes(SMALL, 100, 70).s).toMatchObject({dq4: 25, dc4: 13, dv4: 18, nj: 6, vcw: 12});
  });

  it('the planner keeps the first candidate next after the streamed tiles at D=128', () => {
    // On an H100 the streamed tiles E come first (test/webgpu_forward_streamed.test.ts);
    // the sliced candidate is the next choice for head dims 97..128.
    const forD128 = FORWARD_TILINGS.filter(
        (t) => (t.minHeadDim ?? 0) < 128 && 128 <= (t.maxHeadDim ?? Infinity));
    const {minHeadDim, maxHeadDim, ...first} = forD128[1];
    expect([minHeadDim, maxHeadDim]).toEqual([96, 128]);
    expect(first).toEqual(SLICED_FORWARD_CANDIDATES[0]);
    expect(forD128[0].streamQuery).toBe(true);
    for (const d of [80, 96]) {
      expect(planForward(H100_STAND_IN, d, d, 16 * 4096)!.tiles.dimChunks).toBeUndefined();
    }
  });

  it('refuses slices without the outer-product mode, or not a positive integer', () => {
    const config = {
      headDim: 128,
      headDimV: 128,
      tiles: {tm: 2, tx: 8, nq: 1, ty: 16, dimChunks: 2},
      score: scoreOptionsFromAttrs({softcap: 0, windowLeft: -1, windowRight: 0}, false),
      alibiMode: 0 as const,
      dropout: false,
      subgroups: true,
      reverseRows: false,
      runtimeLoops: false,
    };
    expect(() => forwardWGSL(config)).toThrow(/dimChunks = 2.*outer-product/);
    for (const dimChunks of [0, 1.5]) {
      expect(() => forwardWGSL({...config, tiles: {...SMALL, dimChunks}}))
          .toThrow(`dimChunks must be a positive integer, got ${dimChunks}`);
    }
  });
});

describeWebGPU('fused WebGPU forward, head-dim slices [webgpu]', () => {
  useFusedWebGPU();

  // Each case compiles its own pipeline (seconds on SwiftShader), so each
  // covers several things: option families, head dims (D=96/80 with padded
  // V slices; D=100/70 with scalar loads and a padded K slice), reductions
  // with and without subgroups, four slices with split-KV, the GPU code
  // path (prefetch, constant loops: D=32, as SwiftShader unrolls those
  // fully); the per-batch lengths below run an H100 candidate at its own
  // size (the others need 40-48 KiB, over SwiftShader's 32).
  const cases: Array<[OptionCase, Override]> = [
    [atHeadDim('causal, Sq > Sk (rows without keys)', 96, 80), {tiles: SMALL}],
    [atHeadDim('alibi [B, H], causal, softcap', 100, 70), {tiles: SMALL, subgroups: false}],
    [atHeadDim('dropout with GQA, window and seed >= 2^32', 128), {tiles: SMALL}],
    [atHeadDim('window [4, -1], Sq < Sk', 128), {tiles: {...SMALL, dimChunks: 4}, splits: 3}],
    [atHeadDim('softcap', 32), {tiles: SMALL, constantLoops: true, prefetch: true}],
  ];
  for (const [c, o] of cases) {
    it(`${c.name} [${JSON.stringify(o)}]`, () => checkForwardUnderPlan(c, o));
  }

  it('the H100 candidates\' WGSL at D=128 (constant loops, prefetch) passes Dawn\'s validation',
     async () => {
       // Their 40-48 KiB pipelines cannot be created here (32 KiB), but the
       // shader module is validated without the limit; every option on.
       const device = webgpuBackendOf().device;
       const subgroups = device.features.has('subgroups' as GPUFeatureName);
       for (const tiles of SLICED_FORWARD_CANDIDATES) {
         for (const splitKeys of [false, true]) {
           const code = forwardWGSL({
             headDim: 128,
             headDimV: 128,
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
           expect(code).toContain(`const DC4 = ${32 / tiles.dimChunks!}u;`);
           await expectValidWGSL(JSON.stringify(tiles), code);
         }
       }
     });

  it('per-batch key lengths (seqlensK), the 32 x 32 candidate at D=128: each row alone',
     () => checkSeqlensForwardUnderPlan(
         {tiles: FITS_SWIFTSHADER}, {batch: 3, seq: 45, heads: 2, dim: 128}, [45, 0, 19]));
});
