/**
 * The attention-dataflow ladder of benchmarks/attention_skeleton.ts: its
 * rungs run with the stand-in for the matrix built-ins on SwiftShader,
 * against a float64 reference, and its WGSL with the real built-ins is
 * generated for every configuration of the benchmark's grid.
 */
import * as tf from '@tensorflow/tfjs-core';

import {checkOwnPipelineErrors, runOwnPipeline, webgpuBackendOf} from '../kernels/webgpu/own_pipeline';
import {benchmarkGrid, skeletonInputs, skeletonUniforms} from '../benchmarks/attention_skeleton_grid';
import {Rung, skeletonBarriersPerTile, SkeletonConfig, skeletonError, skeletonName, skeletonProblem, skeletonReference, skeletonRows, skeletonWGSL} from '../benchmarks/attention_skeleton_wgsl';

import {selectedBackends, useBackend} from './harness/backends';
import {SHAPE_A, SHAPE_B, SHAPE_REAL} from './harness/matrix_shapes';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;


describe('attention skeleton WGSL with the real built-ins', () => {
  it('generates every configuration of the full and quick grids', () => {
    let generated = 0;
    for (const c of [...benchmarkGrid(SHAPE_REAL, false), ...benchmarkGrid(SHAPE_REAL, true)]) {
      const code = skeletonWGSL(c);
      expect(code).toContain('enable chromium_experimental_subgroup_matrix;');
      expect(code).toContain('subgroupMatrixMultiplyAccumulate(');
      expect(code).toContain('subgroupMatrixStore<row_major>(&o,');
      expect(code).not.toContain('sm_mma_');
      if (c.rung >= 1 && !c.halfScores) {
        expect(code).toContain('subgroupMatrixStore<row_major>(&scr,');
        expect(code).toContain(`const SS = ${c.keyTile + (c.pad ? 4 : 0)}u;`);
      }
      if (c.halfScores) {
        // S in f16 accumulators, stored straight into P: no f32 scratch.
        expect(code).toContain('var s0_0 = subgroup_matrix_result<f16, 16, 16>(f16(zero));');
        expect(code).toContain('subgroupMatrixStore<row_major>(&p,');
        expect(code).not.toContain('scr');
      }
      expect(code.includes('let q0_0 =')).toBe(!c.reloadQ);
      // Every barrier of the real path is in a key-tile loop.
      expect(code.match(/workgroupBarrier\(\)/g)?.length ?? 0).toBe(skeletonBarriersPerTile(c));
      // R1h has no element-wise pass.
      const elementwise = c.rung > 1 || (c.rung === 1 && !c.halfScores);
      expect(code.includes('lc * CPL + j')).toBe(elementwise && c.naiveLanes === true);
      if (c.rung >= 2 && c.softmax === 'online') {
        expect(code).toContain('subgroupMatrixScalarMultiply(');
        expect(code).toContain('subgroupMax(');
      }
      if (c.kvFrom === 'storage') {
        expect(code).toContain('subgroup_matrix_right<f16, 16, 16>, col_major>(&kIn,');
      }
      generated++;
    }
    expect(generated).toBeGreaterThan(150);
  });

  it('refuses tilings the matrices cannot cover, naming them', () => {
    const c: SkeletonConfig = {
      shape: SHAPE_REAL,
      rung: 2,
      softmax: 'online',
      headDim: 40,
      rowBlocks: 1,
      subgroups: 4,
      keyTile: 32,
      kvFrom: 'storage'
    };
    expect(skeletonProblem(c)).toContain('D=40');
    expect(() => skeletonWGSL(c)).toThrow(/D=40, BC=32/);
    expect(skeletonProblem({...c, headDim: 64})).toBeNull();
    expect(skeletonProblem({...c, headDim: 16, rung: 0})).toContain('R0');
  });
});

describeWebGPU('attention skeleton on the stand-in [webgpu]', () => {
  beforeAll(() => useBackend('webgpu'));

  const heads = 2;
  const seq = 64;

  async function run(c: SkeletonConfig): Promise<{got: Float32Array, want: Float64Array}> {
    const d = c.headDim;
    const n = heads * seq * d;
    const inputs = skeletonInputs(n, c.rung === 3);
    const backend = webgpuBackendOf();
    const before = tf.memory().numTensors;
    const [q, k, v] = inputs.buffers.map(b => tf.tensor1d(b));
    const [o] = runOwnPipeline(
        backend, {
          key: `test-attention-skeleton-${skeletonName(c)}-${c.shape.M}x${c.shape.N}`,
          numInputs: 3,
          numOutputs: 1,
          hasUniforms: true,
          code: () => skeletonWGSL(c),
        },
        {
          inputs: [q, k, v],
          outputs: [{shape: [n], dtype: 'float32'}],
          uniforms: skeletonUniforms(seq, d, n),
          dispatch: [seq / skeletonRows(c), heads, 1],
        });
    const got = await backend.read(o.dataId) as Float32Array;
    await checkOwnPipelineErrors();
    backend.disposeData(o.dataId);
    tf.dispose([q, k, v]);
    expect(tf.memory().numTensors).toBe(before);
    const [qv, kv, vv] = inputs.values;
    return {got, want: skeletonReference(c.rung, qv, kv, vv, heads, seq, d, c.keyTile)};
  }

  const bounds: Record<Rung, number> = {0: 1e-6, 1: 2e-3, 2: 2e-3, 3: 1e-4};
  // The stand-in rounds f16 scores once, when they are stored.
  const boundOf = (c: SkeletonConfig) => c.halfScores ? 1e-2 : bounds[c.rung];
  const cases: Array<[string, SkeletonConfig]> = [
    [
      'R0, K from storage', {
        shape: SHAPE_A,
        rung: 0,
        softmax: 'online',
        headDim: 32,
        rowBlocks: 2,
        subgroups: 2,
        keyTile: 16,
        kvFrom: 'storage'
      }
    ],
    [
      'R1, K/V staged, rows padded', {
        shape: SHAPE_A,
        rung: 1,
        softmax: 'online',
        headDim: 32,
        rowBlocks: 1,
        subgroups: 2,
        keyTile: 16,
        kvFrom: 'workgroup',
        pad: true
      }
    ],
    [
      'R2 online, 2 row blocks', {
        shape: SHAPE_A,
        rung: 2,
        softmax: 'online',
        headDim: 32,
        rowBlocks: 2,
        subgroups: 2,
        keyTile: 16,
        kvFrom: 'storage'
      }
    ],
    [
      'R2 two-pass, K/V staged, 16x8x16', {
        shape: SHAPE_B,
        rung: 2,
        softmax: 'two-pass',
        headDim: 32,
        rowBlocks: 1,
        subgroups: 2,
        keyTile: 16,
        kvFrom: 'workgroup'
      }
    ],
    [
      'R1, K/V from storage', {
        shape: SHAPE_A,
        rung: 1,
        softmax: 'online',
        headDim: 32,
        rowBlocks: 2,
        subgroups: 2,
        keyTile: 16,
        kvFrom: 'storage'
      }
    ],
    [
      'R1h (f16 scores straight into P), naive lanes', {
        shape: SHAPE_A,
        rung: 1,
        softmax: 'online',
        halfScores: true,
        headDim: 32,
        rowBlocks: 2,
        subgroups: 2,
        keyTile: 16,
        kvFrom: 'storage',
        naiveLanes: true
      }
    ],
    [
      'R2h online (softmax in place in P), K/V staged', {
        shape: SHAPE_A,
        rung: 2,
        softmax: 'online',
        halfScores: true,
        headDim: 32,
        rowBlocks: 1,
        subgroups: 2,
        keyTile: 16,
        kvFrom: 'workgroup'
      }
    ],
    [
      'R2h two-pass, 16x8x16', {
        shape: SHAPE_B,
        rung: 2,
        softmax: 'two-pass',
        halfScores: true,
        headDim: 32,
        rowBlocks: 1,
        subgroups: 2,
        keyTile: 16,
        kvFrom: 'storage'
      }
    ],
    [
      'R3 online, K/V staged, rows padded', {
        shape: SHAPE_A,
        rung: 3,
        softmax: 'online',
        headDim: 32,
        rowBlocks: 1,
        subgroups: 2,
        keyTile: 16,
        kvFrom: 'workgroup',
        pad: true
      }
    ],
    [
      'R3 two-pass, 2 row blocks', {
        shape: SHAPE_A,
        rung: 3,
        softmax: 'two-pass',
        headDim: 32,
        rowBlocks: 2,
        subgroups: 2,
        keyTile: 16,
        kvFrom: 'storage'
      }
    ],
  ];
  for (const [label, c] of cases) {
    it(`${label} matches the float64 reference`, async () => {
      const {got, want} = await run(c);
      expect(skeletonError(c.rung, got, want, c.headDim, c.keyTile)).toBeLessThan(boundOf(c));
    });
  }

  it('R3 needs its lo parts: R2 on the same inputs misses the float32 bound', async () => {
    const c = cases.find(([label]) => label.startsWith('R3 two-pass'))![1];
    const [q, k, v] = skeletonInputs(heads * seq * c.headDim, true).values;
    const want = skeletonReference(3, q, k, v, heads, seq, c.headDim, c.keyTile);
    const {got} = await run({...c, rung: 2});
    expect(skeletonError(3, got, want, c.headDim, c.keyTile)).toBeGreaterThan(bounds[3]);
  });
});
