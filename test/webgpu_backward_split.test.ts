/**
 * The backward passes with S and dP computed by separate halves of the
 * workgroup (`split` in DkDvTiles / DqTiles, SPhase.split in
 * kernels/webgpu/flash_attention_grad_wgsl.ts), forced on Dawn
 * (SwiftShader without a GPU), against the float64 oracle's gradients
 * (docs/design.md, "Accuracy bounds": 5e-4) with every option the passes
 * take, NaN-poisoned outputs, no leaks and bit-identical reruns.
 */
import {GradTiles} from '../kernels/webgpu/FlashAttentionGrad';
import {dkdvTilesValid} from '../kernels/webgpu/flash_attention_grad_dkdv_webgpu';
import {dqTilesValid} from '../kernels/webgpu/flash_attention_grad_dq_webgpu';
import {sPhase} from '../kernels/webgpu/flash_attention_grad_wgsl';

import {selectedBackends} from './harness/backends';
import {OptionCase} from './harness/cases';
import {checkGradUnderTiles, useFusedGradWebGPU} from './harness/small_tiles';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

describe('split S/dP layout', () => {
  it('gives each half the rows the whole workgroup had', () => {
    // D=128's planned tiles: 64 of 128 invocations compute S and dP
    // unsplit; split, 64 compute S and 64 dP.
    expect(sPhase(32, 8, 128)).toMatchObject({sc: 8, sr: 8, mr: 1, lanes: 128, split: false});
    expect(sPhase(32, 8, 128, true)).toMatchObject({sc: 8, sr: 8, mr: 1, lanes: 64, split: true});
    expect(sPhase(32, 32, 128, true)).toMatchObject({sr: 8, mr: 4, lanes: 64});
    expect(dkdvTilesValid({bc: 32, br: 8, threads: 128, split: true})).toBe(true);
    expect(dqTilesValid({br: 32, bc: 8, threads: 128, split: true})).toBe(true);
    // Odd invocation counts cannot be halved.
    expect(dkdvTilesValid({bc: 4, br: 4, threads: 3, split: true})).toBe(false);
  });
});

describeWebGPU('fused WebGPU backward, S and dP split [webgpu]', () => {
  useFusedGradWebGPU();

  // Tiles with the D=128 plan's shape (few rows and keys for 128
  // invocations) at head dims that fit SwiftShader's 32 KiB, more rows per
  // step (several rows per thread), and few invocations. (D=128 itself
  // passes too, but SwiftShader takes ~10 s to compile its unrolled loops.)
  const CASES: Array<{tiles: GradTiles, c: OptionCase}> = [
    {
      tiles: {
        dkdv: {bc: 32, br: 8, threads: 128, split: true},
        dq: {br: 32, bc: 8, threads: 128, split: true}
      },
      c: {
        name: 'D=32, causal, GQA, dropout, softcap, alibi',
        shape: {
          batch: 2,
          seqQ: 70,
          seqK: 70,
          heads: 4,
          headsKV: 2,
          headDim: 32,
          headDimV: 32,
          alibi: 'head'
        },
        opts: {causal: true, dropoutRate: 0.2, seed: 9, softcap: 3}
      }
    },
    {
      tiles: {
        dkdv: {bc: 32, br: 16, threads: 128, split: true},
        dq: {br: 32, bc: 16, threads: 128, split: true}
      },
      c: {
        name: 'D=24, Dv=16, Sq < Sk, window, MQA',
        shape: {batch: 1, seqQ: 45, seqK: 96, heads: 3, headsKV: 1, headDim: 24, headDimV: 16},
        opts: {windowSize: [20, 7]}
      }
    },
    {
      tiles: {
        dkdv: {bc: 16, br: 8, threads: 16, split: true},
        dq: {br: 8, bc: 8, threads: 16, split: true}
      },
      c: {
        name: 'odd dims 12/20, Sq > Sk, causal, dropout, alibi per batch',
        shape: {
          batch: 2,
          seqQ: 41,
          seqK: 29,
          heads: 2,
          headsKV: 2,
          headDim: 12,
          headDimV: 20,
          alibi: 'batch'
        },
        opts: {causal: true, dropoutRate: 0.3, seed: 77}
      }
    },
  ];
  for (const {tiles, c} of CASES) {
    it(`kernel vs oracle with ${JSON.stringify(tiles)}: ${c.name}`,
       () => checkGradUnderTiles(tiles, c));
  }
});
