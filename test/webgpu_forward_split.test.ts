/**
 * Split-KV in the fused WebGPU forward (kernels/webgpu/flash_attention.ts,
 * planSplits): the key tiles of each query tile divided among workgroups,
 * their partial outputs merged by the combine pass. Forced on Dawn/
 * SwiftShader against the float64 oracle (out and lse) for every option
 * case family, on multi-tile problems with several split counts and tilings;
 * plus the planner's split choice.
 */

import {planSplits, setForwardOverride, SPLIT_TARGET_GROUPS} from '../kernels/webgpu/FlashAttention';

import {selectedBackends} from './harness/backends';
import {OPTION_CASES, OptionCase} from './harness/cases';
import {checkForwardUnderPlan, useFusedWebGPU} from './harness/small_tiles';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

describe('planSplits', () => {
  it('never splits by default (measured slower on the H100)', () => {
    expect(SPLIT_TARGET_GROUPS).toBe(0);
    expect(planSplits(16, 512, 64)).toBe(1);
    expect(planSplits(1, 1 << 20, 64)).toBe(1);
  });
  it('splits only grids below a target, keeping whole tiles per split', () => {
    expect(planSplits(1024, 4096, 64, 1024)).toBe(1);
    expect(planSplits(256, 512, 64, 1024)).toBe(4);
    // 8 key tiles: at most 4 splits of 2 tiles.
    expect(planSplits(16, 512, 64, 1024)).toBe(4);
    expect(planSplits(16, 64, 64, 1024)).toBe(1);
    expect(planSplits(1, 1 << 20, 64, 1024)).toBe(16);
  });
});

describeWebGPU('fused WebGPU forward, split-KV [webgpu]', () => {
  useFusedWebGPU();

  // Cases sharing a few pipelines (SwiftShader compiles each in ~20 s):
  // masks, rows without keys, GQA, alibi, softcap, dropout and windows.
  const optionCases = OPTION_CASES.filter(
      c => ['causal', 'causal, Sq < Sk', 'causal, Sq > Sk (rows without keys)', 'GQA (H=4, Hk=2)',
            'window [-1, 0] (= causal)', 'alibi [B, H], causal, softcap',
            'dropout with GQA, window and seed >= 2^32']
               .includes(c.name));
  describe('option cases, 3 splits (some see no key tile)', () => {
    it('covers the cases it names', () => expect(optionCases.length).toBe(7));
    for (const c of optionCases) {
      it(c.name, () => checkForwardUnderPlan(c, {splits: 3}));
    }
  });

  describe('multi-tile problems', () => {
    const cases: OptionCase[] = [
      {
        name: 'causal, Sq < Sk, GQA, Dv != D',
        shape: {batch: 1, seqQ: 37, seqK: 70, heads: 4, headsKV: 2, headDim: 32, headDimV: 20},
        opts: {causal: true}
      },
    ];
    const plans: Array<[string, Parameters<typeof setForwardOverride>[0]]> = [
      ['5 splits, default tiling', {splits: 5}],
      [
        '4 splits, GPU code path (prefetch, constant loops)',
        {tiles: {tm: 2, tx: 4, nq: 1, ty: 8}, constantLoops: true, prefetch: true, splits: 4}
      ],
    ];
    for (const [planName, o] of plans) {
      for (const c of cases) {
        it(`${planName}: ${c.name}`, () => checkForwardUnderPlan(c, o));
      }
    }
  });
});
