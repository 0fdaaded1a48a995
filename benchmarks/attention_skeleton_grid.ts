/**
 * The attention skeleton's grid of configurations, inputs and uniforms,
 * shared by the benchmark (benchmarks/attention_skeleton.ts) and its test.
 */
import type {MatrixShape} from '../kernels/webgpu/subgroup_matrix';

import {halfInputs} from './raw_webgpu';
import {Rung, SkeletonConfig, SkeletonSoftmax} from './attention_skeleton_wgsl';

/**
 * A tiling: row blocks per subgroup, subgroups, keys per tile, K/V source,
 * and flags: `p` padded scratch and P rows, `q` Q reloaded at each
 * product, `n` the naive lane mapping, `b` no barriers on a subgroup's
 * own rows (SkeletonConfig).
 */
export type SkeletonTiling = [number, number, number, SkeletonConfig['kvFrom'], string?];

/** A rung of the ladder as the command line names it (`--rungs 0,1h,2o`). */
export interface RungSpec {
  id: string;
  rung: Rung;
  softmax: SkeletonSoftmax;
  halfScores: boolean;
}

const spec = (id: string, rung: Rung, softmax: SkeletonSoftmax, halfScores = false) =>
    ({id, rung, softmax, halfScores});

export const RUNGS: RungSpec[] = [
  spec('0', 0, 'online'), spec('1', 1, 'online'), spec('1h', 1, 'online', true),
  spec('2o', 2, 'online'), spec('2oh', 2, 'online', true), spec('2t', 2, 'two-pass'),
  spec('2th', 2, 'two-pass', true), spec('3o', 3, 'online'), spec('3t', 3, 'two-pass')
];

/** The rungs named by `ids`. */
export function rungsOf(ids: string[]): RungSpec[] {
  return ids.map(id => {
    const found = RUNGS.find(r => r.id === id);
    if (found == null) {
      throw new Error(`unknown rung ${id} (expected one of ${RUNGS.map(r => r.id).join(', ')})`);
    }
    return found;
  });
}

/** A block of the grid: every rung x D x tiling. */
interface GridBlock {
  rungs: string[];
  dims: number[];
  tilings: SkeletonTiling[];
}

/**
 * `--quick`: every rung at one tiling, then what explains it: the naive
 * lane mapping, padded rows, no barriers, D=128 at 16 rows per subgroup and
 * with Q reloaded.
 */
export const QUICK_GRID: GridBlock[] = [
  {rungs: RUNGS.map(r => r.id), dims: [64, 128], tilings: [[2, 4, 32, 'storage']]},
  {rungs: ['1', '2o'], dims: [64, 128], tilings: [[2, 4, 32, 'storage', 'n']]},
  {rungs: ['1', '1h', '2oh'], dims: [64, 128], tilings: [[2, 4, 32, 'storage', 'p']]},
  {rungs: ['1', '1h'], dims: [64], tilings: [[2, 4, 32, 'storage', 'b']]},
  {rungs: ['0', '1h', '2oh', '3o'], dims: [128], tilings: [[1, 4, 32, 'storage']]},
  {rungs: ['0', '2oh'], dims: [128], tilings: [[2, 4, 32, 'storage', 'q']]},
];

/** The full grid's tilings (every rung and D at each). */
export const FULL_TILINGS: SkeletonTiling[] = [
  [2, 4, 32, 'storage'], [1, 4, 32, 'storage'], [2, 4, 32, 'storage', 'n'],
  [2, 4, 32, 'storage', 'p'], [2, 4, 32, 'storage', 'q'], [2, 4, 64, 'storage'],
  [2, 4, 32, 'workgroup'], [4, 4, 32, 'storage'], [2, 8, 32, 'storage'], [1, 4, 16, 'storage'],
  [1, 8, 32, 'workgroup'], [2, 2, 32, 'storage'], [4, 2, 32, 'storage'], [1, 4, 64, 'workgroup']
];

/**
 * The configurations for `shape`: `--quick`'s blocks, or every rung x D x
 * tiling of the full grid, with `dims`, `tilings` or `rungs` replacing the
 * grid's where given. Tiling-major (a run cut short by its time budget
 * still has every rung of the first tilings), then D, then rung.
 */
export function benchmarkGrid(
    shape: MatrixShape, quick: boolean, dims?: number[], tilings?: SkeletonTiling[],
    rungs?: string[]): SkeletonConfig[] {
  const blocks: GridBlock[] =
      quick && dims == null && tilings == null && rungs == null ? QUICK_GRID : [{
        rungs: rungs ?? RUNGS.map(r => r.id),
        dims: dims ?? [64, 128],
        tilings: tilings ?? (quick ? [QUICK_GRID[0].tilings[0]] : FULL_TILINGS)
      }];
  return blocks.flatMap(
      block => block.tilings.flatMap(
          ([rowBlocks, subgroups, keyTile, kvFrom, flags = '']) => block.dims.flatMap(
              headDim => rungsOf(block.rungs).map(r => ({
                                                    shape,
                                                    rung: r.rung,
                                                    softmax: r.softmax,
                                                    halfScores: r.halfScores,
                                                    headDim,
                                                    rowBlocks,
                                                    subgroups,
                                                    keyTile,
                                                    kvFrom,
                                                    pad: flags.includes('p'),
                                                    reloadQ: flags.includes('q'),
                                                    naiveLanes: flags.includes('n'),
                                                    noBarriers: flags.includes('b'),
                                                  })))));
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
