/**
 * The tensor-core kernels' stand-in for the subgroup-matrix built-ins
 * (kernels/webgpu/subgroup_matrix_wgsl.ts) is stricter than the obvious
 * model, so that code relying on more than the built-ins promise fails on
 * SwiftShader: f16 conversion overflows to infinity, a matrix that would
 * run past its array is placed at offset 0 with the minimal stride and the
 * stride is raised to the minor extent (Tint's robustness transform), a
 * result's elements are spread over the lanes in a scrambled order, and
 * subgroups and lanes are not numbered from local_invocation_index. Also
 * checks the WGSL of the real built-ins the generators emit.
 */
import * as tf from '@tensorflow/tfjs-core';

import {checkOwnPipelineErrors, OwnPipelineSpec, runOwnPipeline, webgpuBackendOf} from '../kernels/webgpu/own_pipeline';
import type {MatrixShape} from '../kernels/webgpu/subgroup_matrix';
import {matrixLoadWGSL, matrixStoreWGSL, standInElementWGSL, standInHelpersWGSL, subgroupIdsWGSL, zeroResultWGSL} from '../kernels/webgpu/subgroup_matrix_wgsl';

import {selectedBackends, useBackend} from './harness/backends';
import {SHAPE_A, SHAPE_B} from './harness/matrix_shapes';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

const REAL: MatrixShape = {
  M: 16,
  N: 16,
  K: 16,
  lanes: 32,
  standIn: false
};

describe('subgroup-matrix WGSL of the real built-ins', () => {
  const view = {arr: 'a', off: 'o', stride: 's', colMajor: true, len: 64};

  it('puts the layout in the template (the bool-argument forms are deprecated)', () => {
    expect(matrixLoadWGSL(REAL, 'T', view)).toBe('subgroupMatrixLoad<T, col_major>(&a, o, s)');
    expect(matrixStoreWGSL(REAL, 'b', 'o', 'm', 's'))
        .toBe('subgroupMatrixStore<row_major>(&b, o, m, s);');
    const legacy = {...REAL, diagnose: {legacyBuiltins: true}};
    expect(matrixLoadWGSL(legacy, 'T', view)).toBe('subgroupMatrixLoad<T>(&a, o, true, s)');
    expect(matrixStoreWGSL(legacy, 'b', 'o', 'm', 's'))
        .toBe('subgroupMatrixStore(&b, o, m, false, s);');
  });

  it('fills accumulators with a runtime zero, not the OpConstantNull constructor', () => {
    expect(zeroResultWGSL(REAL, 'z')).toBe('subgroup_matrix_result<f32, 16, 16>(z)');
    expect(zeroResultWGSL({...REAL, diagnose: {nullAccumulator: true}}, 'z'))
        .toBe('subgroup_matrix_result<f32, 16, 16>()');
  });

  it('takes the subgroup and lane from the subgroup built-ins', () => {
    expect(subgroupIdsWGSL(REAL, 4)).toContain('let g = sgId;');
    expect(subgroupIdsWGSL(REAL, 4)).toContain('let ln = sgLane;');
    const byIndex = subgroupIdsWGSL({...REAL, diagnose: {indexSubgroups: true}}, 4);
    expect(byIndex).toContain('let g = lid / 32u;');
    expect(byIndex).toContain('let ln = lid % 32u;');
  });
});

describeWebGPU('subgroup-matrix stand-in [webgpu]', () => {
  beforeAll(() => useBackend('webgpu'));

  /** Runs `body` (one invocation per lid < threads) with float input x and int output o. */
  async function runStandIn(
      shape: MatrixShape, subgroups: number, x: Float32Array, outLength: number,
      body: string): Promise<{f: Float32Array, i: Int32Array}> {
    const backend = webgpuBackendOf();
    const threads = shape.lanes * subgroups;
    const spec: OwnPipelineSpec = {
      key: `test-stand-in-${shape.M}x${shape.N}-${subgroups}-${body.length}`,
      numInputs: 1,
      numOutputs: 2,
      hasUniforms: false,
      code: () => `
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> f: array<f32>;
@group(0) @binding(2) var<storage, read_write> o: array<i32>;
${standInHelpersWGSL(shape)}
@compute @workgroup_size(${threads})
fn main(@builtin(local_invocation_index) lid: u32) {
  ${subgroupIdsWGSL(shape, subgroups)}
  ${body}
}`,
    };
    const before = tf.memory().numTensors;
    const input = tf.tensor1d(x.length > 0 ? x : new Float32Array(1));
    const [fOut, iOut] = runOwnPipeline(backend, spec, {
      inputs: [input],
      outputs: [{shape: [outLength], dtype: 'float32'}, {shape: [outLength], dtype: 'int32'}],
      dispatch: [1, 1, 1],
    });
    const f = await backend.read(fOut.dataId) as Float32Array;
    const i = await backend.read(iOut.dataId) as Int32Array;
    await checkOwnPipelineErrors();
    backend.disposeData(fOut.dataId);
    backend.disposeData(iOut.dataId);
    input.dispose();
    expect(tf.memory().numTensors).toBe(before);
    return {f, i};
  }

  it('rounds to f16 and overflows to infinity as hardware conversion does', async () => {
    const xs = Float32Array.of(1, -2.5, 1 / 3, 65504, 65519, 65520, 1e5, -1e5, -70000);
    const {f} = await runStandIn(
        SHAPE_A, 1, xs, xs.length, `if (lid < ${xs.length}u) { f[lid] = sm_h(x[lid]); }`);
    expect(Array.from(f)).toEqual([
      1, -2.5, Math.fround(0.333251953125), 65504, 65504, Infinity, Infinity, -Infinity, -Infinity
    ]);
  });

  it('places an out-of-bounds matrix at offset 0 with the minimal stride', async () => {
    // (offset, stride, minor, major, length): in bounds; stride below the
    // minor extent; one element past the end; far past.
    const cases = [
      [8, 24, 16, 16, 8 + 24 * 15 + 16], [0, 4, 16, 2, 32], [9, 24, 16, 16, 384],
      [1000, 16, 16, 16, 256]
    ];
    const {i} = await runStandIn(SHAPE_A, 1, new Float32Array(0), 2 * cases.length, `
  if (lid == 0u) {
    ${cases.map((c, n) => `{ let p = sm_place(${c.map(v => `${v}u`).join(', ')});
      o[${2 * n}u] = i32(p.x); o[${2 * n + 1}u] = i32(p.y); }`).join('\n    ')}
  }`);
    expect(Array.from(i)).toEqual([8, 24, 0, 16, 0, 16, 0, 16]);
  });

  for (const [label, shape, subgroups] of [
           ['8x8, 16 lanes', SHAPE_A, 2], ['16x8, 32 lanes', SHAPE_B, 2]] as const) {
    it(`spreads results over lanes in a scrambled order, each element once (${label})`,
       async () => {
         const {M, N, lanes} = shape;
         const perLane = M * N / lanes;
         const threads = lanes * subgroups;
         const {i} =
             await runStandIn(shape, subgroups, new Float32Array(0), threads * (perLane + 2), `
  for (var e = 0u; e < ${perLane}u; e++) {
    o[(g * ${lanes}u + ln) * ${perLane}u + e] = i32(${standInElementWGSL(shape, 'e', 'ln')});
  }
  o[${threads * perLane}u + lid] = i32(g);
  o[${threads * perLane + threads}u + lid] = i32(ln);`);
         let scrambled = 0;
         for (let g = 0; g < subgroups; g++) {
           const seen = new Set<number>();
           for (let ln = 0; ln < lanes; ln++) {
             for (let e = 0; e < perLane; e++) {
               const idx = i[(g * lanes + ln) * perLane + e];
               expect(idx).toBeGreaterThanOrEqual(0);
               expect(idx).toBeLessThan(M * N);
               seen.add(idx);
               scrambled += idx === e * lanes + ln ? 0 : 1;
             }
           }
           expect(seen.size).toBe(M * N);
         }
         // Code that assumes element e of lane l at e * lanes + l reads
         // almost every element wrong.
         expect(scrambled).toBeGreaterThan(0.9 * subgroups * M * N);
         // Every (subgroup, lane) once, and not the obvious lid / lanes.
         const ids = new Set<number>();
         let obvious = 0;
         for (let lid = 0; lid < threads; lid++) {
           const g = i[threads * perLane + lid];
           const ln = i[threads * perLane + threads + lid];
           ids.add(g * lanes + ln);
           obvious += g * lanes + ln === lid ? 1 : 0;
         }
         expect(ids.size).toBe(threads);
         expect(obvious).toBe(0);
       });
  }
});
