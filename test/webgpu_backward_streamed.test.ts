/**
 * The backward passes with both operands streamed in head-dim slices
 * (DkDvTiles.streamed, DqTiles.streamed; docs/webgpu_tuning.md, "Streamed
 * backward"), forced on Dawn (SwiftShader without a GPU), against the
 * float64 oracle's gradients (docs/design.md, "Accuracy bounds": 5e-4) with
 * the option families, NaN-poisoned outputs, no leaks and bit-identical
 * reruns. Each candidate of STREAMED_GRAD_CANDIDATES runs where it fits
 * SwiftShader's 32 KiB: S4 at D=128, S5 at D=96, S2 and S6 at D=80, S3 at
 * head dims that are not multiples of 4 (the others need up to 36 KiB at
 * D=128); all of their WGSL is validated at D=128, and 4-slice tiles at
 * D=256; one case without the slices' register prefetch. (S1: its dK/dV
 * pass is S2's; its dQ pass with `seqlens` and packed varlen calls in
 * test/webgpu_backward_sliced.test.ts.)
 */
import {chooseGradTiles, GradTiles} from '../kernels/webgpu/FlashAttentionGrad';
import {dkdvStorageBytes, dkdvTilesValid} from '../kernels/webgpu/flash_attention_grad_dkdv_webgpu';
import {dqStorageBytes, dqTilesValid} from '../kernels/webgpu/flash_attention_grad_dq_webgpu';
import {STREAMED_GRAD_CANDIDATES} from '../kernels/webgpu/tuning';

import {selectedBackends} from './harness/backends';
import {D80_CAUSAL_GQA_ALIBI, OptionCase} from './harness/cases';
import {H100_STAND_IN} from './harness/devices';
import {checkGradUnderTiles, expectValidSlicedGradWGSL, useFusedGradWebGPU} from './harness/small_tiles';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

const H100_BYTES = 49152;
const SWIFTSHADER_BYTES = 32768;

/** Streamed tiles: [keys, rows, threads] (dK/dV), [rows, keys, threads] (dQ). */
function streamed(
    dkdv: [number, number, number], dq: [number, number, number], chunks: number): GradTiles {
  return {
    dkdv: {bc: dkdv[0], br: dkdv[1], threads: dkdv[2], dimChunks: chunks, streamed: true},
    dq: {br: dq[0], bc: dq[1], threads: dq[2], dimChunks: chunks, streamed: true},
  };
}

// D=256 in 4 slices: S1's bytes at D=128 (33024 / 33280).
const D256 = streamed([64, 32, 256], [64, 32, 256], 4);

describe('streamed backward candidates', () => {
  it('are consistent and fit the H100 at D=128', () => {
    expect(STREAMED_GRAD_CANDIDATES.length).toBeGreaterThanOrEqual(2);
    for (const tiles of STREAMED_GRAD_CANDIDATES) {
      expect(tiles.dkdv.streamed && tiles.dq.streamed).toBe(true);
      expect(dkdvTilesValid(tiles.dkdv) && dqTilesValid(tiles.dq)).toBe(true);
      expect(dkdvStorageBytes(tiles.dkdv, 128, 128)).toBeLessThanOrEqual(H100_BYTES);
      expect(dqStorageBytes(tiles.dq, 128, 128)).toBeLessThanOrEqual(H100_BYTES);
    }
    // What the candidates' comments and docs/webgpu_tuning.md count.
    const [S1, S2, S3, S4, S5, S6] = STREAMED_GRAD_CANDIDATES;
    const bytes =
        (t: GradTiles) => [dkdvStorageBytes(t.dkdv, 128, 128), dqStorageBytes(t.dq, 128, 128)];
    expect([S1, S2, S3, S4, S5, S6].map(bytes)).toEqual([
      [33024, 33280], [33024, 33280], [20736, 20736], [20736, 20992], [37120, 33280], [28928, 33280]
    ]);
    expect(Math.max(...bytes(S4))).toBeLessThanOrEqual(SWIFTSHADER_BYTES);
    expect(dkdvStorageBytes(D256.dkdv, 256, 256)).toBeLessThanOrEqual(H100_BYTES);
    expect(dqStorageBytes(D256.dq, 256, 256)).toBeLessThanOrEqual(H100_BYTES);
    // Streaming needs slices.
    expect(dkdvTilesValid({bc: 32, br: 8, threads: 128, streamed: true})).toBe(false);
    expect(dqTilesValid({br: 32, bc: 8, threads: 128, streamed: true})).toBe(false);
  });
});

describe('backward planner', () => {
  const limits = H100_STAND_IN.limits;
  const S2 = STREAMED_GRAD_CANDIDATES[1];
  it('takes S2 for head dims 97..128 on a GPU that gives its bytes and invocations', () => {
    expect(S2).toEqual({
      dkdv: {bc: 64, br: 32, threads: 256, dimChunks: 2, streamed: true},
      dq: {br: 64, bc: 64, threads: 256, dimChunks: 4, streamed: true}
    });
    for (const [d, dv] of [[128, 128], [97, 97], [100, 128], [128, 112]]) {
      expect(chooseGradTiles(d, dv, limits)).toEqual(S2);
    }
    // 33280 bytes (S2's dQ pass at D=128) are enough, one fewer is not.
    expect(chooseGradTiles(128, 128, {...limits, maxComputeWorkgroupStorageSize: 33280}))
        .toEqual(S2);
  });

  it('keeps the size lists on software devices, small limits and other head dims', () => {
    const unsliced = {dkdv: {bc: 32, br: 8, threads: 128}, dq: {br: 32, bc: 8, threads: 128}};
    expect(chooseGradTiles(128, 128, limits, false)).toEqual(unsliced);
    // One byte short of S2's, or too few invocations: the size lists.
    const small = [
      {maxComputeWorkgroupStorageSize: 33279}, {maxComputeInvocationsPerWorkgroup: 255},
      {maxComputeWorkgroupSizeX: 128}
    ];
    for (const limit of small) {
      const tiles = chooseGradTiles(128, 128, {...limits, ...limit});
      expect(tiles?.dkdv.streamed).toBeUndefined();
      expect(tiles).toEqual(chooseGradTiles(128, 128, {...limits, ...limit}, false));
    }
    for (const [d, dv] of [[96, 96], [64, 64], [96, 128], [128, 96], [160, 160], [256, 256]]) {
      const tiles = chooseGradTiles(d, dv, limits);
      expect(tiles?.dkdv.streamed).toBeUndefined();
      expect(tiles).toEqual(chooseGradTiles(d, dv, limits, false));
    }
  });
});

describeWebGPU('fused WebGPU backward, both operands streamed [webgpu]', () => {
  useFusedGradWebGPU();

  it('every candidate\'s WGSL at D=128 (with and without prefetch), and D=256 tiles, pass Dawn\'s validation',
     async () => {
       // Each also without prefetch (`p0`).
       const noPrefetch = ({dkdv, dq}: GradTiles): GradTiles =>
           ({dkdv: {...dkdv, prefetch: false}, dq: {...dq, prefetch: false}});
       const plans = [
         ...STREAMED_GRAD_CANDIDATES.flatMap(t => [t, noPrefetch(t)])
             .map(t => ({d: 128, tiles: t})),
         {d: 256, tiles: D256},
       ];
       await expectValidSlicedGradWGSL(plans);
     });

  const [, S2, S3, S4, S5, S6] = STREAMED_GRAD_CANDIDATES;
  // Several key and query blocks per head where the tiles allow; every
  // pipeline takes SwiftShader seconds to compile at these head dims, so
  // the option families are spread over few cases.
  const CASES: Array<{tiles: GradTiles, c: OptionCase}> = [
    {
      tiles: S4,
      c: {
        name: 'D=128, causal, GQA, dropout',
        shape: {batch: 1, seqQ: 70, seqK: 70, heads: 2, headsKV: 1, headDim: 128, headDimV: 128},
        opts: {causal: true, dropoutRate: 0.2, seed: 9}
      }
    },
    {
      tiles: S5,
      c: {
        name: 'D=96, Sq > Sk, MQA, dropout (a slice narrower than the lanes per key quad)',
        shape: {batch: 2, seqQ: 75, seqK: 29, heads: 3, headsKV: 1, headDim: 96, headDimV: 96},
        opts: {dropoutRate: 0.3, seed: 2 ** 33 + 5}
      }
    },
    {tiles: S2, c: D80_CAUSAL_GQA_ALIBI},
    {
      tiles: S6,
      c: {
        name: 'D=80, causal, Sq < Sk, softcap (16-key dK/dV blocks)',
        shape: {batch: 1, seqQ: 45, seqK: 70, heads: 2, headsKV: 2, headDim: 80, headDimV: 80},
        opts: {causal: true, softcap: 2}
      }
    },
    {
      // Without prefetch (`p0`): streamed dK/dV in 2 slices, resident dQ.
      tiles: {
        dkdv: {bc: 32, br: 16, threads: 128, dimChunks: 2, streamed: true, prefetch: false},
        dq: {br: 32, bc: 32, threads: 128, dimChunks: 2, prefetch: false}
      },
      c: {
        name: 'D=80, no prefetch, GQA, dropout, Sq > Sk',
        shape: {batch: 1, seqQ: 45, seqK: 40, heads: 2, headsKV: 1, headDim: 80, headDimV: 80},
        opts: {dropoutRate: 0.2, seed: 4}
      }
    },
    {
      tiles: S3,
      c: {
        name: 'D=98, Dv=100 (not multiples of 4 or of the slices), Sq < Sk, window, softcap, ' +
            'alibi per batch',
        shape: {
          batch: 2,
          seqQ: 37,
          seqK: 70,
          heads: 2,
          headsKV: 2,
          headDim: 98,
          headDimV: 100,
          alibi: 'batch'
        },
        opts: {windowSize: [20, 7], softcap: 3}
      }
    },
  ];
  for (const {tiles, c} of CASES) {
    it(`kernel vs oracle with ${JSON.stringify(tiles)}: ${c.name}`,
       () => checkGradUnderTiles(tiles, c));
  }
});
