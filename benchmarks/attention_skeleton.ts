/**
 * The ceiling of the attention dataflow through WGSL subgroup matrices
 * (issue 15): a ladder of forward kernels over the same problem, each rung
 * adding one piece of the real dataflow, so that the table shows where
 * the throughput goes between subgroupMatrixMultiplyAccumulate's own
 * ceiling (benchmarks/subgroup_matrix_peak.ts) and the attention kernels.
 * The rungs (benchmarks/attention_skeleton_wgsl.ts):
 *
 * - R0: S = Q K^T only (Q in registers, K per key tile).
 * - R1: R0 + O += P V, P = f16(S) through the workgroup scratch.
 * - R2: R1 + the softmax: `online` (one running max per subgroup, O
 *   rescaled by subgroupMatrixScalarMultiply) or `two-pass` (row maxima
 *   first, then P = exp(S - m) with no rescale).
 * - R3: R2 with Q, K, V and P split into hi + lo f16 (3 products each).
 * - R1h, R2h: R1, R2 with S in f16 result matrices stored straight into
 *   P (needs an f16 -> f16 configuration of the same shape).
 *
 * Raw WebGPU, no tfjs; B=1, H=16, non-causal. Every kernel is first
 * checked against a float64 reference on a small problem (S=256, H=2,
 * `--check-seq`), then timed. TFLOP/s: `attn` counts 4 S^2 D H per call
 * as the attention benchmarks do (R0 does half of that work), `mma` the
 * matrix products the rung really issues (x1.5 two-pass, x3 split).
 *
 *   node attention_skeleton.mjs [--quick] [--seqs 4096,16384] [--dims 64,128]
 *       [--rungs 0,1,1h,2o,2oh,2t,2th,3o,3t] [--tilings "rb,sg,bc,s|w[,pqnb];..."]
 *       [--all-seqs] [--all-shapes] [--budget-s 100] [--check-seq 256]
 *       [--no-robustness] [--print-wgsl] [--stand-in]
 *
 * A tiling is row blocks of M rows per subgroup, subgroups per workgroup,
 * keys per tile, K/V matrices from storage (s) or staged in workgroup
 * memory (w), and flags: `p` scratch and P rows padded by 16 bytes, `q`
 * Q's matrices reloaded from storage at each product, `n` the naive lane
 * mapping of the element-wise pass (each lane's columns contiguous), `b`
 * no barriers between the steps on a subgroup's own rows (a data race,
 * to measure what they cost; the check says if the order held).
 * `--quick` runs every rung at one tiling and a few tilings that explain
 * it (S=4096 only); `--rungs`, `--dims`, `--tilings` replace its grid by
 * their product. Every tiling is timed at the first length, each rung's
 * best at the others (`--all-seqs`: all). Without the subgroup-matrix
 * feature it says so and exits 0. `--stand-in` runs the kernels'
 * plain-loop stand-in (8x8x8 matrices, 16 lanes) on any device, e.g.
 * SwiftShader with `--seqs 128 --dims 32 --tilings "1,2,16,s"`: a dry run
 * of the plumbing, whose times mean nothing.
 */
/// <reference types="@webgpu/types" />
import {MatrixShape, pickSubgroupMatrixShape, subgroupMatrixConfigs} from '../kernels/webgpu/subgroup_matrix';

import {benchmarkGrid, RUNGS, skeletonInputs, SkeletonTiling, skeletonUniforms} from './attention_skeleton_grid';
import {Rung, skeletonBarriersPerTile, SkeletonConfig, skeletonError, skeletonMatrixFlops, skeletonName, skeletonProblem, skeletonReference, skeletonRows, skeletonWGSL, skeletonWorkgroupBytes} from './attention_skeleton_wgsl';
import {argText, compileAsync, readBack, storage, submitDispatches, timeDispatch} from './raw_webgpu';
import {openTensorCoreDevice} from './webgpu_setup';

const HEADS = 16;
const CHECK_HEADS = 2;
/** Pipelines started ahead of the one measured (Dawn may compile them in parallel). */
const COMPILE_AHEAD = 6;
/**
 * Largest error / max |reference| accepted per rung (f16 S or P: 2e-3;
 * split: 1e-4; S accumulated in f16: 1e-2).
 */
const HALF_SCORE_BOUND = 1e-2;
const BOUNDS: Record<Rung, number> = {
  0: 1e-6,
  1: 2e-3,
  2: 2e-3,
  3: 1e-4
};

const list = (text: string) => text.split(',').filter(x => x !== '');

function parseTilings(text: string): SkeletonTiling[] {
  return text.split(';').filter(x => x !== '').map(t => {
    const [rb, sg, bc, kv, flags = ''] = t.split(',');
    if ((kv !== 's' && kv !== 'w') || !/^[pqnb]*$/.test(flags)) {
      throw new Error(`--tilings: "${t}" should be rb,sg,bc,s|w[,flags of p, q, n, b]`);
    }
    return [Number(rb), Number(sg), Number(bc), kv === 's' ? 'storage' : 'workgroup', flags];
  });
}

/**
 * `pattern` (its first half hi parts, its second lo parts) repeated to n
 * hi parts, then n lo parts.
 */
function repeatParts(pattern: Uint16Array|Float32Array, n: number): Uint16Array|Float32Array {
  const half = pattern.length / 2;
  const out = pattern instanceof Uint16Array ? new Uint16Array(2 * n) : new Float32Array(2 * n);
  for (const part of [0, 1]) {
    for (let i = 0; i < n; i += half) {
      out.set(pattern.subarray(part * half, part * half + Math.min(half, n - i)), part * n + i);
    }
  }
  return out;
}

/**
 * Operand buffers for H heads of S x D, kept per (heads, S, D): the
 * check's with their values, the timed ones a repeated pattern (only their
 * bytes matter, and values for 16 x 16384 x 128 elements would not fit).
 */
class Operands {
  private cache = new Map<string, {bufs: GPUBuffer[], values: Float64Array[][]}>();
  /** `standIn`: f32 operands, as the stand-in kernels read them. */
  constructor(private readonly device: GPUDevice, private readonly standIn: boolean) {}

  get(heads: number, seq: number, d: number, withValues: boolean) {
    const key = `${heads},${seq},${d}`;
    let entry = this.cache.get(key);
    if (entry == null) {
      const n = heads * seq * d;
      let data: Array<Uint16Array|Float32Array>;
      let values: Float64Array[][] = [];
      if (withValues) {
        const inputs = skeletonInputs(n, false);
        values = [inputs.values, skeletonInputs(n, true).values];
        data = this.standIn ? inputs.buffers : inputs.bits;
      } else {
        const pattern = skeletonInputs(1 << 16, false);
        data = (this.standIn ? pattern.buffers : pattern.bits).map(x => repeatParts(x, n));
      }
      const bufs = [
        ...data.map(b => storage(this.device, b)), storage(this.device, n * 4),
        this.device.createBuffer(
            {size: 16, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST})
      ];
      this.device.queue.writeBuffer(bufs[4], 0, skeletonUniforms(seq, d, n));
      entry = {bufs, values};
      this.cache.set(key, entry);
    }
    return entry;
  }

  release(): void {
    this.cache.forEach(e => e.bufs.forEach(b => b.destroy()));
    this.cache.clear();
  }
}

/** The id of `c`'s rung (RungSpec.id). */
function rungId(c: SkeletonConfig): string {
  return c.rung < 2 ? `${c.rung}${c.halfScores ? 'h' : ''}` :
                      `${c.rung}${c.softmax[0]}${c.halfScores ? 'h' : ''}`;
}

/** `c`'s tiling as `--tilings` writes it. */
function tilingLabel(c: SkeletonConfig): string {
  const flags = `${c.pad ? 'p' : ''}${c.reloadQ ? 'q' : ''}${c.naiveLanes ? 'n' : ''}${
      c.noBarriers ? 'b' : ''}`;
  return `${c.rowBlocks},${c.subgroups},${c.keyTile},${c.kvFrom[0]}${flags ? `,${flags}` : ''}`;
}

async function main(): Promise<void> {
  const quick = process.argv.includes('--quick');
  const seqs = list(argText('seqs', quick ? '4096' : '4096,16384')).map(Number);
  const dimText = argText('dims', '');
  const dims = dimText === '' ? undefined : list(dimText).map(Number);
  const rungText = argText('rungs', '');
  const rungs = rungText === '' ? undefined : list(rungText);
  const tilingText = argText('tilings', '');
  const tilings = tilingText === '' ? undefined : parseTilings(tilingText);
  const budgetMs = Number(argText('budget-s', '100')) * 1000;
  const checkSeq = Number(argText('check-seq', '256'));
  if (process.argv.includes('--print-wgsl')) {
    const real: MatrixShape = {M: 16, N: 16, K: 16, lanes: 32, standIn: false};
    for (const c of benchmarkGrid(real, quick, dims, tilings, rungs)) {
      console.log(`// ${skeletonName(c)}\n${skeletonWGSL(c)}\n`);
    }
    return;
  }
  const {device} = await openTensorCoreDevice();
  // --stand-in: the plain-loop stand-in kernels on any device, small
  // shapes only: a dry run of this benchmark's plumbing (times mean nothing).
  const standIn = process.argv.includes('--stand-in');
  const picked: MatrixShape|null =
      standIn ? {M: 8, N: 8, K: 8, lanes: 16, standIn} : pickSubgroupMatrixShape(device);
  if (picked == null) {
    console.log('no f16 x f16 -> f32 subgroup-matrix configuration on this device: nothing to run');
    return;
  }
  const configs = subgroupMatrixConfigs(device);
  console.log(`matrix configurations: ${
      configs.map(c => `${c.M}x${c.N}x${c.K} ${c.componentType}->${c.resultType}`).join(', ')}`);
  const shapes = [picked];
  if (process.argv.includes('--all-shapes')) {
    for (const c of configs) {
      if (c.componentType === 'f16' && c.resultType === 'f32' && picked.lanes % c.M === 0 &&
          !shapes.some(s => s.M === c.M && s.N === c.N && s.K === c.K)) {
        shapes.push({M: c.M, N: c.N, K: c.K, lanes: picked.lanes, standIn: false});
      }
    }
  }
  const wgLimit = device.limits.maxComputeWorkgroupStorageSize;
  console.log(`workgroup memory limit ${wgLimit} B; B=1 H=${HEADS}, non-causal; seqs ${seqs}`);
  const f16Scores = configs.some(
      c => c.componentType === 'f16' && c.resultType === 'f16' && c.M === picked.M &&
          c.N === picked.N && c.K === picked.K);

  const groupLayout = device.createBindGroupLayout({
    entries: [
      ...[0, 1, 2].map(binding => ({
                         binding,
                         visibility: GPUShaderStage.COMPUTE,
                         buffer: {type: 'read-only-storage' as const}
                       })),
      {binding: 3, visibility: GPUShaderStage.COMPUTE, buffer: {type: 'storage'}},
      {binding: 4, visibility: GPUShaderStage.COMPUTE, buffer: {type: 'uniform'}},
    ]
  });
  const layout = device.createPipelineLayout({bindGroupLayouts: [groupLayout]});
  const bindOf = (bufs: GPUBuffer[]) => device.createBindGroup({
    layout: groupLayout,
    entries: bufs.map((buffer, binding) => ({binding, resource: {buffer}}))
  });

  const started = performance.now();
  const operands = new Operands(device, standIn);
  const references = new Map<string, Float64Array>();
  interface Row {
    c: SkeletonConfig;
    note: string;
    err?: number;
    wrong?: boolean;
    ms: Map<number, number>;
  }
  const rows: Row[] = [];
  const pipelines = new Map<SkeletonConfig, GPUComputePipeline>();

  const timeAt = async (row: Row, seq: number) => {
    const pipeline = pipelines.get(row.c);
    if (pipeline == null || row.note !== '' || seq % skeletonRows(row.c) !== 0) {
      return;
    }
    const {bufs} = operands.get(HEADS, seq, row.c.headDim, false);
    const bind = bindOf(bufs);
    const groups: [number, number] = [seq / skeletonRows(row.c), HEADS];
    // One dispatch to size the batches (about 30 ms each).
    const t0 = performance.now();
    submitDispatches(device, pipeline, bind, groups, 1);
    await device.queue.onSubmittedWorkDone();
    const once = performance.now() - t0;
    const reps = Math.max(1, Math.min(20, Math.round(30 / once)));
    row.ms.set(seq, await timeDispatch(device, pipeline, bind, groups, reps, 3));
  };

  let outOfTime = false;
  // Where the run's time goes (waiting for pipelines, checks, timing).
  const phaseMs = {compile: 0, check: 0, time: 0};
  const grid = shapes.flatMap(shape => benchmarkGrid(shape, quick, dims, tilings, rungs));
  const whyNot = (c: SkeletonConfig) => skeletonProblem(c) ??
      (skeletonWorkgroupBytes(c) > wgLimit ?
           `needs ${skeletonWorkgroupBytes(c)} B of workgroup memory` :
           c.halfScores && !f16Scores && !standIn ? 'no f16 -> f16 configuration' :
                                                    null);
  // Pipelines compile a few configurations ahead of the one measured.
  const compiling = new Map<SkeletonConfig, Promise<GPUComputePipeline|null>>();
  const compileAhead = (from: number) => {
    for (const c of grid.slice(from, from + COMPILE_AHEAD)) {
      if (!compiling.has(c) && whyNot(c) == null) {
        compiling.set(c, compileAsync(device, skeletonName(c), skeletonWGSL(c), layout));
      }
    }
  };
  for (const [index, c] of grid.entries()) {
    const row: Row = {c, note: '', ms: new Map()};
    rows.push(row);
    if (performance.now() - started > budgetMs) {
      row.note = 'out of time';
      outOfTime = true;
      continue;
    }
    const why = whyNot(c);
    if (why != null) {
      row.note = why;
      continue;
    }
    compileAhead(index);
    let t0 = performance.now();
    const pipeline = await compiling.get(c)!;
    phaseMs.compile += performance.now() - t0;
    t0 = performance.now();
    if (pipeline == null) {
      row.note = 'compile error';
      continue;
    }
    pipelines.set(c, pipeline);
    // The check: S=256, H=2 against float64.
    const d = c.headDim;
    const {bufs, values} = operands.get(CHECK_HEADS, checkSeq, d, true);
    const [q, k, v] = values[c.rung === 3 ? 1 : 0];
    const refKey = `${c.rung},${d},${c.rung === 0 ? c.keyTile : 0}`;
    let want = references.get(refKey);
    if (want == null) {
      want = skeletonReference(c.rung, q, k, v, CHECK_HEADS, checkSeq, d, c.keyTile);
      references.set(refKey, want);
    }
    const n = CHECK_HEADS * checkSeq * d;
    const enc = device.createCommandEncoder();
    enc.clearBuffer(bufs[3]);
    device.queue.submit([enc.finish()]);
    submitDispatches(device, pipeline, bindOf(bufs), [checkSeq / skeletonRows(c), CHECK_HEADS], 1);
    row.err = skeletonError(c.rung, await readBack(device, bufs[3], n * 4), want, d, c.keyTile);
    const bound = c.halfScores ? HALF_SCORE_BOUND : BOUNDS[c.rung];
    row.wrong = !(row.err < bound);
    // Without barriers the order may break: timed anyway (what they cost).
    if (row.wrong && !c.noBarriers) {
      row.note = `wrong result (bound ${bound})`;
      continue;
    }
    phaseMs.check += performance.now() - t0;
    t0 = performance.now();
    await timeAt(row, seqs[0]);
    phaseMs.time += performance.now() - t0;
  }
  operands.release();
  // The other lengths: each rung's best tiling at the first (or all).
  const allSeqs = process.argv.includes('--all-seqs');
  for (const seq of seqs.slice(1)) {
    const groups = new Map<string, Row[]>();
    for (const row of rows) {
      const key = `${row.c.shape.M}x${row.c.shape.N} ${rungId(row.c)} ${row.c.headDim}`;
      groups.set(key, [...(groups.get(key) ?? []), row]);
    }
    for (const group of groups.values()) {
      const timed = group.filter(r => r.ms.has(seqs[0]));
      timed.sort((a, b) => a.ms.get(seqs[0])! - b.ms.get(seqs[0])!);
      for (const row of allSeqs ? timed : timed.slice(0, 1)) {
        if (performance.now() - started > budgetMs) {
          outOfTime = true;
          break;
        }
        await timeAt(row, seq);
      }
      operands.release();
    }
  }

  // Printed rung-major, then by D, then in the grid's order of tilings.
  const order = new Map(rows.map((r, i) => [r, i]));
  const rungIndex = (c: SkeletonConfig) => RUNGS.findIndex(r => r.id === rungId(c));
  rows.sort(
      (a, b) => shapes.indexOf(a.c.shape) - shapes.indexOf(b.c.shape) ||
          rungIndex(a.c) - rungIndex(b.c) || a.c.headDim - b.c.headDim ||
          order.get(a)! - order.get(b)!);
  const tflops = (row: Row, seq: number) => {
    const ms = row.ms.get(seq);
    if (ms == null) {
      return '-';
    }
    const attn = 4 * seq * seq * row.c.headDim * HEADS / ms / 1e9;
    const mma = skeletonMatrixFlops(row.c, HEADS, seq) / ms / 1e9;
    return `${ms.toFixed(3)} ms, ${attn.toFixed(1)} (${mma.toFixed(1)})`;
  };
  const shapeName = (s: MatrixShape) => `${s.M}x${s.N}x${s.K}`;
  console.log(`\nattn TFLOP/s = 4 S^2 D H / time (mma: the rung's own matrix products)\n`);
  console.log(`| matrices | config | barriers / key tile | workgroup KiB | check error | ${
      seqs.map(s => `S=${s}: ms, attn (mma) TFLOP/s`).join(' | ')} |`);
  console.log(`| --- | --- | --- | --- | --- | ${seqs.map(() => '---').join(' | ')} |`);
  for (const row of rows) {
    const err = row.err == null ? '-' : `${row.err.toExponential(1)}${row.wrong ? ' WRONG' : ''}`;
    const cells = row.note !== '' ? seqs.map((_, i) => i === 0 ? row.note : '-') :
                                    seqs.map(s => tflops(row, s));
    console.log(`| ${shapeName(row.c.shape)} | ${skeletonName(row.c)} | ${
        skeletonBarriersPerTile(row.c)} | ${(skeletonWorkgroupBytes(row.c) / 1024).toFixed(1)} | ${
        err} | ${cells.join(' | ')} |`);
  }
  console.log(`\nBest per rung (attn TFLOP/s, tiling):\n`);
  console.log(`| matrices | rung | D | ${seqs.map(s => `S=${s}`).join(' | ')} |`);
  console.log(`| --- | --- | --- | ${seqs.map(() => '---').join(' | ')} |`);
  for (const shape of shapes) {
    for (const r of RUNGS) {
      for (const d of [...new Set(grid.map(c => c.headDim))]) {
        const mine = rows.filter(
            row => row.c.shape === shape && rungId(row.c) === r.id && row.c.headDim === d);
        if (mine.length === 0) {
          continue;
        }
        const cells = seqs.map(seq => {
          let best: Row|null = null;
          for (const row of mine) {
            if (row.ms.has(seq) && (best == null || row.ms.get(seq)! < best.ms.get(seq)!)) {
              best = row;
            }
          }
          if (best == null) {
            return '-';
          }
          const attn = 4 * seq * seq * d * HEADS / best.ms.get(seq)! / 1e9;
          return `${attn.toFixed(1)} (${tilingLabel(best.c)})`;
        });
        console.log(`| ${shapeName(shape)} | R${r.id} | ${d} | ${cells.join(' | ')} |`);
      }
    }
  }
  console.log(`\nwaiting for pipelines ${(phaseMs.compile / 1000).toFixed(1)} s, checks ${
      (phaseMs.check / 1000).toFixed(1)} s, timing at S=${seqs[0]} ${
      (phaseMs.time / 1000).toFixed(1)} s`);
  console.log(`${((performance.now() - started) / 1000).toFixed(1)} s${
      outOfTime ? ' (budget reached: rows marked "out of time" or without times were skipped)' :
                  ''}`);
}

// Exits at once: pipelines compiled ahead of a run cut by its budget
// would otherwise keep the process alive.
main().then(() => process.exit(0), e => {
  console.error(e);
  process.exit(1);
});
