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
 *
 * Raw WebGPU, no tfjs; B=1, H=16, non-causal. Every kernel is first
 * checked against a float64 reference on a small problem (S=256, H=2,
 * `--check-seq`);
 * then timed. TFLOP/s: `attn` counts 4 S^2 D H per call as the attention
 * benchmarks do (R0 does half of that work), `mma` the matrix products the
 * rung really issues (x1.5 for two-pass, x3 for split).
 *
 *   node attention_skeleton.mjs [--quick] [--seqs 4096,16384] [--dims 64,128]
 *       [--rungs 0,1,2o,2t,3o,3t] [--tilings "rb,sg,bc,s|w[,p];..."] [--all-seqs]
 *       [--all-shapes] [--budget-s 100] [--check-seq 256] [--no-robustness]
 *       [--print-wgsl] [--stand-in]
 *
 * A tiling is row blocks of M rows per subgroup, subgroups per workgroup,
 * keys per tile, K/V matrices from storage (s) or staged in workgroup
 * memory (w), and `p` for scratch and P rows padded by 16 bytes. By default every tiling is timed
 * at the first length and each rung's best at the others (`--all-seqs`: all of them). Without the
 * subgroup-matrix feature it says so and exits 0. `--stand-in` runs the
 * kernels' plain-loop stand-in (8x8x8 matrices, 16 lanes) on any device,
 * e.g. SwiftShader with `--seqs 128 --dims 32 --tilings "1,2,16,s"`: a
 * dry run of the plumbing, whose times mean nothing.
 */
/// <reference types="@webgpu/types" />
import {TENSOR_CORE_DAWN_FLAGS, TENSOR_CORE_FEATURES} from '../demo/tensor_cores';
import {MatrixShape, pickSubgroupMatrixShape, subgroupMatrixConfigs} from '../kernels/webgpu/subgroup_matrix';

import {benchmarkGrid, RUNGS, skeletonInputs, SkeletonTiling, skeletonUniforms} from './attention_skeleton_grid';
import {Rung, SkeletonConfig, skeletonError, skeletonMatrixFlops, skeletonName, skeletonProblem, skeletonReference, skeletonRows, skeletonWGSL, skeletonWorkgroupBytes} from './attention_skeleton_wgsl';
import {argText, pipelineOf, readBack, storage, submitDispatches, timeDispatch} from './raw_webgpu';
import {adapterName, openWebGPUDevice} from './webgpu_setup';

const HEADS = 16;
const CHECK_HEADS = 2;
/** Largest error / max |reference| accepted per rung (f16 S or P: 2e-3; split: 1e-4). */
const BOUNDS: Record<Rung, number> = {
  0: 1e-6,
  1: 2e-3,
  2: 2e-3,
  3: 1e-4
};

const list = (text: string) => text.split(',').filter(x => x !== '');

function parseRungs(text: string): typeof RUNGS {
  return list(text).map(r => {
    const found = RUNGS.find(([rung, softmax]) => r === `${rung}` || r === `${rung}${softmax[0]}`);
    if (found == null) {
      throw new Error(`--rungs: unknown rung ${r} (expected 0, 1, 2o, 2t, 3o or 3t)`);
    }
    return found;
  });
}

function parseTilings(text: string): SkeletonTiling[] {
  return text.split(';').filter(x => x !== '').map(t => {
    const [rb, sg, bc, kv, pad] = t.split(',');
    if ((kv !== 's' && kv !== 'w') || (pad != null && pad !== 'p')) {
      throw new Error(`--tilings: "${t}" should be rb,sg,bc,s|w[,p]`);
    }
    return [Number(rb), Number(sg), Number(bc), kv === 's' ? 'storage' : 'workgroup', pad === 'p'];
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

async function main(): Promise<void> {
  const quick = process.argv.includes('--quick');
  const seqs = list(argText('seqs', quick ? '4096' : '4096,16384')).map(Number);
  const dims = list(argText('dims', '64,128')).map(Number);
  const rungs = parseRungs(argText('rungs', '0,1,2o,2t,3o,3t'));
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
  const robust = !process.argv.includes('--no-robustness');
  const {adapter, device} = await openWebGPUDevice({
    dawnFlags: robust ? TENSOR_CORE_DAWN_FLAGS :
                        TENSOR_CORE_DAWN_FLAGS.map(f => `${f},disable_robustness`),
    features: TENSOR_CORE_FEATURES,
    onError: m => console.log(m),
  });
  console.log(`adapter: ${adapterName(adapter)}${robust ? '' : ' (robustness off)'}`);
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
  for (const shape of shapes) {
    for (const c of benchmarkGrid(shape, quick, dims, tilings, rungs)) {
      const row: Row = {c, note: '', ms: new Map()};
      rows.push(row);
      if (performance.now() - started > budgetMs) {
        row.note = 'out of time';
        outOfTime = true;
        continue;
      }
      const problem = skeletonProblem(c);
      if (problem != null) {
        row.note = problem;
        continue;
      }
      if (skeletonWorkgroupBytes(c) > wgLimit) {
        row.note = `needs ${skeletonWorkgroupBytes(c)} B of workgroup memory`;
        continue;
      }
      const pipeline = await pipelineOf(device, skeletonName(c), skeletonWGSL(c), layout);
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
      submitDispatches(
          device, pipeline, bindOf(bufs), [checkSeq / skeletonRows(c), CHECK_HEADS], 1);
      row.err = skeletonError(c.rung, await readBack(device, bufs[3], n * 4), want, d, c.keyTile);
      if (!(row.err < BOUNDS[c.rung])) {
        row.note = `wrong result (bound ${BOUNDS[c.rung]})`;
        continue;
      }
      await timeAt(row, seqs[0]);
    }
    operands.release();
  }
  // The other lengths: each rung's best tiling at the first (or all).
  const allSeqs = process.argv.includes('--all-seqs');
  for (const seq of seqs.slice(1)) {
    const groups = new Map<string, Row[]>();
    for (const row of rows) {
      const key =
          `${row.c.shape.M}x${row.c.shape.N} ${row.c.rung}${row.c.softmax} ${row.c.headDim}`;
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
  const rungIndex = (c: SkeletonConfig) =>
      rungs.findIndex(([rung, softmax]) => rung === c.rung && softmax === c.softmax);
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
  console.log(`| matrices | config | check error | ${
      seqs.map(s => `S=${s}: ms, attn (mma) TFLOP/s`).join(' | ')} |`);
  console.log(`| --- | --- | --- | ${seqs.map(() => '---').join(' | ')} |`);
  for (const row of rows) {
    const err = row.err == null ? '-' : row.err.toExponential(1);
    const cells = row.note !== '' ? seqs.map((_, i) => i === 0 ? row.note : '-') :
                                    seqs.map(s => tflops(row, s));
    console.log(
        `| ${shapeName(row.c.shape)} | ${skeletonName(row.c)} | ${err} | ${cells.join(' | ')} |`);
  }
  console.log(`\nBest per rung (attn TFLOP/s, tiling):\n`);
  console.log(`| matrices | rung | D | ${seqs.map(s => `S=${s}`).join(' | ')} |`);
  console.log(`| --- | --- | --- | ${seqs.map(() => '---').join(' | ')} |`);
  for (const shape of shapes) {
    for (const [rung, softmax] of rungs) {
      for (const d of dims) {
        const mine = rows.filter(
            r => r.c.shape === shape && r.c.rung === rung && r.c.softmax === softmax &&
                r.c.headDim === d);
        const cells = seqs.map(seq => {
          let best: Row|null = null;
          for (const r of mine) {
            if (r.ms.has(seq) && (best == null || r.ms.get(seq)! < best.ms.get(seq)!)) {
              best = r;
            }
          }
          if (best == null) {
            return '-';
          }
          const {rowBlocks, subgroups, keyTile, kvFrom, pad} = best.c;
          const attn = 4 * seq * seq * d * HEADS / best.ms.get(seq)! / 1e9;
          return `${attn.toFixed(1)} (${rowBlocks},${subgroups},${keyTile},${kvFrom[0]}${
              pad ? ',p' : ''})`;
        });
        const name = rung < 2 ? `R${rung}` : `R${rung} ${softmax}`;
        console.log(`| ${shapeName(shape)} | ${name} | ${d} | ${cells.join(' | ')} |`);
      }
    }
  }
  console.log(`\n${((performance.now() - started) / 1000).toFixed(1)} s${
      outOfTime ? ' (budget reached: rows marked "out of time" or without times were skipped)' :
                  ''}`);
}

main().catch(e => {
  console.error(e);
  process.exit(1);
});
