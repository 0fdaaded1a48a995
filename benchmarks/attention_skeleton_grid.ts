/**
 * The attention skeleton's grid of configurations, inputs and uniforms,
 * shared by the benchmark (benchmarks/attention_skeleton.ts) and its test.
 */
import type {MatrixShape} from '../kernels/webgpu/subgroup_matrix';

import {halfInputs} from './raw_webgpu';
import {Rung, SkeletonConfig, SkeletonSoftmax} from './attention_skeleton_wgsl';

/**
 * A tiling: row blocks per subgroup, subgroups, keys per tile, K/V source,
 * and whether the scratch and P rows are padded.
 */
export type SkeletonTiling = [number, number, number, SkeletonConfig['kvFrom'], boolean?];

/** `--quick`'s tilings. */
export const QUICK_TILINGS: SkeletonTiling[] = [
  [1, 4, 32, 'storage'], [2, 4, 32, 'storage'], [2, 4, 32, 'storage', true], [2, 4, 64, 'storage'],
  [2, 4, 32, 'workgroup']
];

/** The full grid's further tilings. */
export const MORE_TILINGS: SkeletonTiling[] = [
  [4, 4, 32, 'storage'], [2, 8, 32, 'storage'], [1, 4, 16, 'storage'], [1, 8, 32, 'workgroup'],
  [2, 2, 32, 'storage'], [4, 2, 32, 'storage'], [1, 4, 64, 'workgroup'],
  [2, 4, 64, 'storage', true], [2, 4, 32, 'workgroup', true]
];

export const RUNGS: Array<[Rung, SkeletonSoftmax]> =
    [[0, 'online'], [1, 'online'], [2, 'online'], [2, 'two-pass'], [3, 'online'], [3, 'two-pass']];

/**
 * Every configuration of the grid for `shape`, tiling-major (a run cut
 * short by its time budget still has every rung of the first tilings),
 * then D, then rung.
 */
export function benchmarkGrid(
    shape: MatrixShape, quick: boolean, dims = [64, 128], tilings?: SkeletonTiling[],
    rungs = RUNGS): SkeletonConfig[] {
  const list = tilings ?? (quick ? QUICK_TILINGS : [...QUICK_TILINGS, ...MORE_TILINGS]);
  return list.flatMap(([rowBlocks, subgroups, keyTile, kvFrom,
                        pad]) => dims.flatMap(headDim => rungs.map(([rung, softmax]) => ({
                                                                     shape,
                                                                     rung,
                                                                     softmax,
                                                                     headDim,
                                                                     rowBlocks,
                                                                     subgroups,
                                                                     keyTile,
                                                                     kvFrom,
                                                                     pad: pad ?? false
                                                                   }))));
}

/**
 * Q, K, V of `n` elements each: hi parts (multiples of 1/16 in [-2, 2])
 * then lo parts (multiples of 2^-14 up to 2^-10), as f32 buffers (the
 * stand-in's), half bits (the real kernels') and the values each rung
 * computes with (hi + lo for the split rung, hi only otherwise).
 */
export function skeletonInputs(n: number, split: boolean):
    {buffers: Float32Array[], bits: Uint16Array[], values: Float64Array[]} {
  const buffers: Float32Array[] = [];
  const bits: Uint16Array[] = [];
  const values: Float64Array[] = [];
  for (const seed of [1, 2, 3]) {
    const hi = halfInputs(n, seed);
    const lo = halfInputs(n, seed + 10, 2 ** -14, 16);
    const buffer = new Float32Array(2 * n);
    buffer.set(hi.values);
    buffer.set(lo.values, n);
    const b = new Uint16Array(2 * n);
    b.set(hi.bits);
    b.set(lo.bits, n);
    buffers.push(buffer);
    bits.push(b);
    values.push(split ? hi.values.map((x, i) => x + lo.values[i]) : hi.values);
  }
  return {buffers, bits, values};
}

/** The kernels' uniforms: {one, seq, scaleLog2, loOff}, softmax scale 1 / sqrt(D). */
export function skeletonUniforms(seq: number, headDim: number, loOff: number): ArrayBuffer {
  const bytes = new ArrayBuffer(16);
  new Float32Array(bytes, 0, 1)[0] = 1;
  new Uint32Array(bytes, 4, 1)[0] = seq;
  new Float32Array(bytes, 8, 1)[0] = Math.LOG2E / Math.sqrt(headDim);
  new Uint32Array(bytes, 12, 1)[0] = loOff;
  return bytes;
}
