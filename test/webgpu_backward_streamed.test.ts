/**
 * The backward passes with both operands streamed in head-dim slices
 * (DkDvTiles.streamed, DqTiles.streamed; docs/webgpu_tuning.md, "Streamed
 * backward"), forced on Dawn (SwiftShader without a GPU), against the
 * float64 oracle's gradients (docs/design.md, "Accuracy bounds": 5e-4) with
 * the option families, NaN-poisoned outputs, no leaks and bit-identical
 * reruns. The candidates of STREAMED_GRAD_CANDIDATES run where they fit
 * SwiftShader's 32 KiB (D=80, 96), scaled-down instances of the same mode
 * (4 slices, 128 invocations) at D=128 and at head dims that are not
 * multiples of 4; the full-size candidates' WGSL is validated at D=128.
 */
import {GradTiles} from '../kernels/webgpu/FlashAttentionGrad';

import {selectedBackends} from './harness/backends';
import {OptionCase} from './harness/cases';
import {checkGradUnderTiles, useFusedGradWebGPU} from './harness/small_tiles';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

describeWebGPU('fused WebGPU backward, both operands streamed [webgpu]', () => {
  useFusedGradWebGPU();
  const CASES: Array<{tiles: GradTiles, c: OptionCase}> = [
    {
      tiles: {
        dkdv: {bc: 32, br: 16, threads: 128, dimChunks: 2, streamed: true},
        dq: {br: 32, bc: 16, threads: 128, dimChunks: 2, streamed: true}
      },
      c: {
        name: 'D=128, causal, GQA, dropout',
        shape: {batch: 1, seqQ: 40, seqK: 40, heads: 2, headsKV: 1, headDim: 128, headDimV: 128},
        opts: {causal: true, dropoutRate: 0.2, seed: 9}
      }
    },
  ];
  for (const {tiles, c} of CASES) {
    it(`kernel vs oracle with ${JSON.stringify(tiles)}: ${c.name}`,
       () => checkGradUnderTiles(tiles, c));
  }
});
