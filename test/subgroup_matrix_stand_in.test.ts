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
import {matrixLoadWGSL, matrixStoreWGSL, standInElementWGSL, standInHelpersWGSL, subgroupIdsWGSL, workgroupAlignmentProblems, zeroResultWGSL} from '../kernels/webgpu/subgroup_matrix_wgsl';
import {matrixForwardWGSL, matrixTileSizes} from '../kernels/webgpu/flash_attention_subgroup_matrix_webgpu';
import {TwoPassForwardConfig, twoPassForwardWGSL, twoPassTileSizes} from '../kernels/webgpu/flash_attention_subgroup_matrix_two_pass_webgpu';
import {storageForwardWGSL} from '../kernels/webgpu/flash_attention_subgroup_matrix_storage_webgpu';
import {storageOperandPlaces} from '../kernels/webgpu/flash_attention_subgroup_matrix';
import {FlashAttentionGradMatrixProgram, matrixGradValid} from '../kernels/webgpu/flash_attention_grad_subgroup_matrix_webgpu';
import {FlashAttentionGradDkdvMatrixProgram, matrixDkdvValid} from '../kernels/webgpu/flash_attention_grad_subgroup_matrix_dkdv_webgpu';
import {gradFeatures} from '../kernels/webgpu/flash_attention_grad_wgsl';
import {scoreOptionsFromAttrs} from '../kernels/webgpu/wgsl_snippets';

import {selectedBackends, useBackend} from './harness/backends';
import {SHAPE_A, SHAPE_B, SHAPE_REAL} from './harness/matrix_shapes';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;


describe('subgroup-matrix WGSL of the real built-ins', () => {
  const view = {arr: 'a', off: 'o', stride: 's', colMajor: true, len: 64};

  it('puts the layout in the template (the bool-argument forms are deprecated)', () => {
    expect(matrixLoadWGSL(SHAPE_REAL, 'T', view))
        .toBe('subgroupMatrixLoad<T, col_major>(&a, o, s)');
    expect(matrixStoreWGSL(SHAPE_REAL, 'b', 'o', 'm', 's'))
        .toBe('subgroupMatrixStore<row_major>(&b, o, m, s);');
    const legacy = {...SHAPE_REAL, diagnose: {legacyBuiltins: true}};
    expect(matrixLoadWGSL(legacy, 'T', view)).toBe('subgroupMatrixLoad<T>(&a, o, true, s)');
    expect(matrixStoreWGSL(legacy, 'b', 'o', 'm', 's'))
        .toBe('subgroupMatrixStore(&b, o, m, false, s);');
  });

  it('fills accumulators with a runtime zero, not the OpConstantNull constructor', () => {
    expect(zeroResultWGSL(SHAPE_REAL, 'z')).toBe('subgroup_matrix_result<f32, 16, 16>(z)');
    expect(zeroResultWGSL({...SHAPE_REAL, diagnose: {nullAccumulator: true}}, 'z'))
        .toBe('subgroup_matrix_result<f32, 16, 16>()');
  });

  it('takes the subgroup and lane from the subgroup built-ins', () => {
    expect(subgroupIdsWGSL(SHAPE_REAL, 4)).toContain('let g = sgId;');
    expect(subgroupIdsWGSL(SHAPE_REAL, 4)).toContain('let ln = sgLane;');
    const byIndex = subgroupIdsWGSL({...SHAPE_REAL, diagnose: {indexSubgroups: true}}, 4);
    expect(byIndex).toContain('let g = lid / 32u;');
    expect(byIndex).toContain('let ln = lid % 32u;');
  });
});

// Session 7's H100 run: the forward's log-sum-exps were off exactly as
// if every K/V row were read 4 f16 elements early, what an 8-byte
// workgroup array placed before the 16-byte aligned matrix arrays does
// (docs/tensor_cores.md). No CPU device shows misalignment: the rule is
// checked on the generated WGSL of every tiling.
describe('subgroup-matrix kernels: workgroup variables keep the matrix arrays aligned', () => {
  const shapes: MatrixShape[] = [SHAPE_REAL, {...SHAPE_REAL, N: 8}, SHAPE_A, SHAPE_B];
  const plain = scoreOptionsFromAttrs({softcap: 0, windowLeft: -1, windowRight: -1}, false);
  const masked = scoreOptionsFromAttrs({softcap: 5, windowLeft: 9, windowRight: 3}, true);

  /**
   * Forward configurations over the shapes, head dims, `tilings`
   * ([subgroups, row blocks]), key tiles and both precisions (split with
   * the plain score, else every option compiled in) that `suits` accepts.
   */
  function* forwardConfigs(tilings: number[][], suits: (c: TwoPassForwardConfig) => boolean) {
    for (const shape of shapes) {
      for (const [d, dv] of [[32, 32], [64, 64], [128, 128], [32, 64]]) {
        for (const [subgroups, rowBlocks] of tilings) {
          for (const bc of [16, 32, 64]) {
            for (const split of [true, false]) {
              const c = {
                headDim: d,
                headDimV: dv,
                shape,
                subgroups,
                rowBlocks,
                bc,
                split,
                score: split ? plain : masked,
                alibiMode: split ? 0 : 1,
                dropout: !split,
                reverseRows: false
              } as const;
              if (suits(c)) {
                yield c;
              }
            }
          }
        }
      }
    }
  }
  /** The two-pass forwards' tilings that suit their shape. */
  const twoPassConfigs = () =>
      forwardConfigs([[1, 1], [2, 2], [4, 1], [4, 2], [8, 1]], c => twoPassTileSizes(c) != null);

  it('finds arrays of a size that shifts the others', () => {
    const code = `const BR = 16;
var<workgroup> a: array<f16, 64>;
var<workgroup> b: array<atomic<u32>, 2>;
var<workgroup> c: array<f32, BR>;
var<workgroup> d: f32;
var<workgroup> e: array<mat2x2<f32>, 4>;`;
    expect(workgroupAlignmentProblems(code)).toEqual([
      'b: array<atomic<u32>, 2> spans 8 bytes, not a multiple of 32',
      'd: f32 spans 4 bytes, not a multiple of 32',
      'e: cannot read the size of array<mat2x2<f32>, 4>',
    ]);
  });

  it('holds for every forward tiling, and the sessions-6/7 layout breaks it', () => {
    let checked = 0;
    // The one-pass kernel has no row blocks (rowBlocks 1 is ignored).
    for (const c of forwardConfigs([[1, 1], [2, 1], [4, 1]], c => matrixTileSizes(c) != null)) {
      expect(workgroupAlignmentProblems(matrixForwardWGSL(c))).toEqual([]);
      checked++;
      if (!c.shape.standIn) {
        const old = {...c, shape: {...c.shape, diagnose: {unalignedWorkgroup: true}}};
        expect(workgroupAlignmentProblems(matrixForwardWGSL(old))).toEqual([
          'wmax: array<atomic<u32>, 2> spans 8 bytes, not a multiple of 32'
        ]);
      }
    }
    expect(checked).toBeGreaterThan(50);
  });

  it('holds for every two-pass forward tiling', () => {
    let checked = 0;
    for (const c of twoPassConfigs()) {
      expect(workgroupAlignmentProblems(twoPassForwardWGSL({...c, rowMaxOnly: c.split})))
          .toEqual([]);
      checked++;
    }
    expect(checked).toBeGreaterThan(100);
  });

  it('holds for every storage-loaded forward tiling, whose operands stay in storage', () => {
    let checked = 0;
    for (const c of twoPassConfigs()) {
      // Q reloaded from storage at each use, or held in registers;
      // pass 1 with exponentials or finding row maxima only.
      const code = storageForwardWGSL({...c, reloadQ: !c.split, rowMaxOnly: c.split});
      expect(workgroupAlignmentProblems(code)).toEqual([]);
      // Workgroup memory: the S scratch and P only.
      const arrays = [...code.matchAll(/var<workgroup>\s+(\w+)/g)].map(m => m[1]);
      expect(arrays.sort()).toEqual([
        'ph', ...(c.split ? ['pl'] : []), ...(c.shape.standIn ? ['red'] : []), 'scr'
      ].sort());
      if (!c.shape.standIn) {
        // K's and V's matrices come from the storage buffer.
        expect(code).toMatch(
            /subgroupMatrixLoad<subgroup_matrix_right<f16, \d+, \d+>, col_major>\(&ops, u\.khOff/);
        expect(code).toMatch(
            /subgroupMatrixLoad<subgroup_matrix_right<f16, \d+, \d+>, row_major>\(&ops, u\.vhOff/);
      }
      checked++;
    }
    expect(checked).toBeGreaterThan(100);
  });

  it('places every split operand part at a 16-byte boundary, for any shape', () => {
    // The storage loads need 16-byte aligned matrix starts, as the
    // workgroup ones do: every part and row starts at a multiple of 8 f16.
    for (const [b, sq, sk, h, hk, d, dv] of [
             [1, 37, 70, 4, 2, 32, 16], [3, 5, 9, 3, 1, 8, 24], [2, 129, 1, 1, 1, 64, 128]]) {
      for (const split of [true, false]) {
        const c =
            {headDim: d, headDimV: dv, shape: SHAPE_A, subgroups: 2, rowBlocks: 1, bc: 16, split};
        const {places, elements} =
            storageOperandPlaces([b, sq, h, d], [b, sk, hk, d], [b, sk, hk, dv], c);
        for (const p of places) {
          expect([p.hiOff % 8, p.loOff % 8, (4 * p.d4) % 8, p.seqPad % p.rows]).toEqual([
            0, 0, 0, 0
          ]);
        }
        const [qp, kp, vp] = places;
        expect([qp.seqPad % 16, kp.seqPad % 16, vp.seqPad]).toEqual([0, 0, kp.seqPad]);
        expect(elements).toBe(
            (split ? 2 : 1) * b * (h * qp.seqPad * d + hk * kp.seqPad * (d + dv)));
      }
    }
  });

  it('holds for every backward tiling, both passes', () => {
    let checked = 0;
    for (const shape of shapes) {
      for (const [d, dv] of [[32, 32], [64, 64], [128, 128], [32, 64]]) {
        for (const [subgroups, br, bc] of [[4, 32, 32], [4, 16, 32], [2, 16, 16], [1, 8, 8]]) {
          for (const split of [true, false]) {
            const c = {subgroups, br, bc, headDim: d, headDimV: dv, shape, split};
            if (!matrixGradValid(c)) {
              continue;
            }
            for (const pass of ['dkdv', 'dq'] as const) {
              const attrs = {softcap: 0, windowLeft: -1, windowRight: 0, dropoutRate: 0.1};
              const f = gradFeatures(attrs as Parameters<typeof gradFeatures>[0], true);
              const program = new FlashAttentionGradMatrixProgram(c, pass, f);
              expect(workgroupAlignmentProblems(program.code())).toEqual([]);
              checked++;
            }
          }
        }
      }
    }
    expect(checked).toBeGreaterThan(20);
  });

  it('holds for every tiling of the accumulated dK/dV pass', () => {
    let checked = 0;
    for (const shape of shapes) {
      for (const [d, dv] of [[32, 32], [64, 64], [128, 128], [32, 64]]) {
        for (const [subgroups, keyBlocks, br] of [[4, 1, 32], [2, 1, 32], [3, 1, 16], [1, 2, 16]]) {
          for (const split of [true, false]) {
            const c = {subgroups, keyBlocks, br, headDim: d, headDimV: dv, shape, split};
            if (!matrixDkdvValid(c)) {
              continue;
            }
            const attrs = {softcap: 0, windowLeft: -1, windowRight: 0, dropoutRate: 0.1};
            const f = gradFeatures(attrs as Parameters<typeof gradFeatures>[0], true);
            const program = new FlashAttentionGradDkdvMatrixProgram(c, f);
            expect(workgroupAlignmentProblems(program.code())).toEqual([]);
            checked++;
          }
        }
      }
    }
    expect(checked).toBeGreaterThan(20);
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

  it('poisons a matrix whose offset or stride breaks the 16-byte alignment rule', async () => {
    // (offset, stride, minor extent, element bytes): f16 at 0 and 16 bytes;
    // at 8 bytes; a 24-byte stride; f32 at 8 and 16 bytes; rows of 8 bytes
    // (aligned to 8).
    const cases = [
      [0, 16, 16, 2], [8, 24, 16, 2], [4, 16, 16, 2], [0, 12, 16, 2], [2, 8, 8, 4], [4, 8, 8, 4],
      [4, 20, 4, 2]
    ];
    const {f} = await runStandIn(
        SHAPE_A, 1, new Float32Array(0), cases.length,
        `
  if (lid == 0u) {
    ${
            cases.map((c, n) => `f[${n}u] = sm_aligned(${c.map(v => `${v}u`).join(', ')});`)
                .join('\n    ')}
  }`);
    expect(Array.from(f)).toEqual([1, 1, NaN, NaN, NaN, 1, 1]);
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
