/**
 * Device run of the fused WebGPU backward (issue 4), in Node on Dawn:
 *   1. correctness at realistic shapes: fused gradients vs the float64
 *      oracle (5e-4, docs/design.md, "Accuracy bounds"), and bit-identical reruns;
 *   2. timing, causal B=1 H=16 D=64: backward alone (each tiling tried),
 *      forward alone and forward+backward at S=4096, and forward+backward
 *      at S=16384 (does it fit in memory?).
 * FLOPs (docs/design.md, "Performance method"): forward 4*B*S*S*H*D, halved for causal;
 * backward 2.5x, forward+backward 3.5x.
 *
 *   3. with --passes: each of the three passes alone (Delta, dK/dV, dQ),
 *      dispatched directly, for a sweep of tilings at D=64 and D=128,
 *      S=4096; the fastest of each pass then joins the tilings of step 2.
 *
 *   node webgpu_backward.mjs [--quick] [--passes]
 *     (--quick: small shapes, for SwiftShader)
 */
import {create, globals} from 'webgpu';

import * as tf from '@tensorflow/tfjs-core';

import {FlashAttention, FlashAttentionGrad, flashAttention, hasFusedKernel} from '../src';
import {normalizeOptions} from '../src/options';
import {chooseGradTiles, GradTiles, registerFlashAttentionGradWebGPU, setGradTilesOverride} from '../kernels/webgpu/FlashAttentionGrad';
import {checkOwnPipelineErrors, runOwnPipeline} from '../kernels/webgpu/own_pipeline';
import {FlashAttentionGradDeltaProgram} from '../kernels/webgpu/flash_attention_grad_delta_webgpu';
import {DkDvTiles, FlashAttentionGradDkDvProgram} from '../kernels/webgpu/flash_attention_grad_dkdv_webgpu';
import {DqTiles, FlashAttentionGradDqProgram} from '../kernels/webgpu/flash_attention_grad_dq_webgpu';
import {gradFeatures, gradUniforms} from '../kernels/webgpu/flash_attention_grad_wgsl';
import type {WebGPUBackend} from '@tensorflow/tfjs-backend-webgpu';
import type {AttentionShapes} from '../src/checks';
import {discrepancy, randomOracleProblem, Rng} from '../test/harness/problems';
import {OracleOptions, oracleBackward} from '../test/oracle';
import {medianMsPerCall} from './webgpu_setup';

const quick = process.argv.includes('--quick');
const passes = process.argv.includes('--passes');

type Shape = AttentionShapes;

function randomTensor(shape: number[], rng: Rng): tf.Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const values = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    values[i] = rng.normal();
  }
  return tf.tensor(values, shape);
}

/** The backward kernel on saved forward outputs. */
function backward(
    dy: tf.Tensor, dLse: tf.Tensor, q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, out: tf.Tensor,
    lse: tf.Tensor, opts: OracleOptions): tf.Tensor[] {
  const attrs = normalizeOptions(opts, q.shape[3]!, 'benchmark');
  return tf.engine().runKernel(
             FlashAttentionGrad,
             {dy, dLse, q, k, v, out, softmaxLse: lse, alibiSlopes: tf.zeros([0])} as unknown as
                 tf.NamedTensorMap,
             attrs as unknown as tf.NamedAttrMap) as tf.Tensor[];
}

async function correctness(shape: Shape, opts: OracleOptions, label: string): Promise<string> {
  const rng = new Rng(1234);
  const problem = randomOracleProblem(shape, rng);
  const {batch, seqQ, seqK, heads, headsKV, headDim, headDimV} = shape;
  const q = tf.tensor(Float32Array.from(problem.q), [batch, seqQ, heads, headDim]);
  const k = tf.tensor(Float32Array.from(problem.k), [batch, seqK, headsKV, headDim]);
  const v = tf.tensor(Float32Array.from(problem.v), [batch, seqK, headsKV, headDimV]);
  const [out, lse] = flashAttention(
      q as tf.Tensor4D, k as tf.Tensor4D, v as tf.Tensor4D, {...opts, returnSoftmaxLse: true});
  const dOut =
      new Float64Array(batch * seqQ * heads * headDimV).map(() => Math.fround(rng.normal()));
  const dLse = new Float64Array(batch * heads * seqQ).map(() => Math.fround(rng.normal()));
  const dy = tf.tensor(Float32Array.from(dOut), out.shape);
  const dl = tf.tensor(Float32Array.from(dLse), lse.shape);
  const runs: Float32Array[][] = [];
  for (let n = 0; n < 2; n++) {
    const grads = backward(dy, dl, q, k, v, out, lse, opts);
    runs.push(await Promise.all(grads.map(g => g.data() as Promise<Float32Array>)));
    tf.dispose(grads);
  }
  await checkOwnPipelineErrors();
  const expected = oracleBackward(problem, opts, dOut, dLse);
  const errors = (['dq', 'dk', 'dv'] as const).map((name, i) => {
    const d = discrepancy(runs[0][i], expected[name]);
    return `${name} ${d.relativeError.toExponential(2)}${
        d.firstBadElement ? ' BAD ' + d.firstBadElement : ''}`;
  });
  const identical =
      runs[0].every((a, i) => Buffer.from(a.buffer).equals(Buffer.from(runs[1][i].buffer)));
  tf.dispose([q, k, v, out, lse, dy, dl]);
  return `| ${label} | ${errors.join(', ')} | ${identical ? 'yes' : 'NO'} |`;
}

function flops(s: number, heads: number, d: number, causal: boolean): number {
  return 4 * s * s * heads * d / (causal ? 2 : 1);
}

/** Random causal inputs `[1, S, H, D]`, the fused forward's out and lse, dO, and a zero dLse. */
function causalProblem(seq: number, heads: number, d: number, seed: number) {
  const rng = new Rng(seed);
  const q = randomTensor([1, seq, heads, d], rng) as tf.Tensor4D;
  const k = randomTensor([1, seq, heads, d], rng) as tf.Tensor4D;
  const v = randomTensor([1, seq, heads, d], rng) as tf.Tensor4D;
  const opts = {causal: true};
  const [out, lse] = flashAttention(q, k, v, {...opts, returnSoftmaxLse: true});
  const dy = randomTensor(out.shape, rng);
  const dl = tf.zeros(lse.shape);
  return {q, k, v, opts, out, lse, dy, dl};
}

async function timing(
    seq: number, heads: number, d: number, tilings: Array<GradTiles|null>, withForward: boolean,
    reps: number, batches: number): Promise<string[]> {
  const {q, k, v, opts, out, lse, dy, dl} = causalProblem(seq, heads, d, 7);
  const fwdFlops = flops(seq, heads, d, true);
  const rows: string[] = [];
  const row = (what: string, ms: number, f: number) =>
      `| ${what} | ${seq} | ${ms.toFixed(3)} | ${(f / ms / 1e9).toFixed(2)} |`;
  let bestBwd = Infinity;
  let bestTiles: GradTiles|null = null;
  for (const tiles of tilings) {
    setGradTilesOverride(tiles);
    const ms =
        await medianMsPerCall(() => backward(dy, dl, q, k, v, out, lse, opts), reps, batches);
    await checkOwnPipelineErrors();
    rows.push(
        row(`fused backward, tiles ${tiles == null ? 'auto' : JSON.stringify(tiles)}`, ms,
            2.5 * fwdFlops));
    if (ms < bestBwd) {
      bestBwd = ms;
      bestTiles = tiles;
    }
  }
  setGradTilesOverride(bestTiles);
  if (withForward) {
    const fwdName = hasFusedKernel(FlashAttention, 'webgpu') ? 'fused' : 'reference';
    const fwdMs = await medianMsPerCall(
        () => flashAttention(q, k, v, {...opts, returnSoftmaxLse: true}) as tf.Tensor[], reps,
        batches);
    rows.push(row(`${fwdName} forward`, fwdMs, fwdFlops));
    const bothMs = await medianMsPerCall(() => {
      const [o, l] = flashAttention(q, k, v, {...opts, returnSoftmaxLse: true});
      const grads = backward(dy, dl, q, k, v, o, l, opts);
      tf.dispose([o, l]);
      return grads;
    }, reps, batches);
    rows.push(row(`${fwdName} forward + fused backward (best tiles)`, bothMs, 3.5 * fwdFlops));
  }
  setGradTilesOverride(null);
  tf.dispose([q, k, v, out, lse, dy, dl]);
  return rows;
}

/** Median ms of the fused forward + fused backward, causal, with `tiles`. */
async function fwdBwd(
    seq: number, heads: number, d: number, tiles: GradTiles|null, reps: number,
    batches: number): Promise<[number]> {
  const rng = new Rng(5);
  const q = randomTensor([1, seq, heads, d], rng) as tf.Tensor4D;
  const k = randomTensor([1, seq, heads, d], rng) as tf.Tensor4D;
  const v = randomTensor([1, seq, heads, d], rng) as tf.Tensor4D;
  const dy = randomTensor([1, seq, heads, d], rng);
  const dl = tf.zeros([1, heads, seq]);
  const opts = {causal: true};
  setGradTilesOverride(tiles);
  try {
    const ms = await medianMsPerCall(() => {
      const [o, l] = flashAttention(q, k, v, {...opts, returnSoftmaxLse: true});
      const grads = backward(dy, dl, q, k, v, o, l, opts);
      tf.dispose([o, l]);
      return grads;
    }, reps, batches);
    await checkOwnPipelineErrors();
    return [ms];
  } finally {
    setGradTilesOverride(null);
    tf.dispose([q, k, v, dy, dl]);
  }
}

/**
 * Each pass alone, dispatched directly (no tfjs kernel around it): median
 * wall-clock ms per dispatch over `batches` batches of `reps`, the queue
 * drained after each batch. Returns the table rows and the fastest tiles.
 */
async function passTiming(
    seq: number, heads: number, d: number, dkdvs: DkDvTiles[], dqs: DqTiles[], reps: number,
    batches: number): Promise<{rows: string[], dkdv: DkDvTiles, dq: DqTiles}> {
  const webgpu = tf.backend() as unknown as WebGPUBackend;
  const {q, k, v, opts, out, lse, dy, dl} = causalProblem(seq, heads, d, 11);
  const attrs = normalizeOptions(opts, d, 'benchmark');
  const shapes = {batch: 1, seqQ: seq, seqK: seq, heads, headsKV: heads, headDim: d, headDimV: d};
  const uniforms = gradUniforms(shapes, attrs, []);
  const features = gradFeatures(attrs, false);
  const delta = new FlashAttentionGradDeltaProgram(shapes);
  const [stats] = runOwnPipeline(webgpu, delta, {
    inputs: [dy, out, dl, lse],
    outputs: [{shape: [1, heads, seq, 2], dtype: 'float32'}],
    uniforms,
    dispatch: delta.workgroups
  });
  const time = async (run: () => tf.TensorInfo[]) => {
    const drain = () => webgpu.device.queue.onSubmittedWorkDone();
    run().forEach(o => webgpu.disposeData(o.dataId));
    await drain();
    await checkOwnPipelineErrors();
    const times: number[] = [];
    for (let n = 0; n < batches; n++) {
      const t0 = performance.now();
      for (let r = 0; r < reps; r++) {
        run().forEach(o => webgpu.disposeData(o.dataId));
      }
      await drain();
      times.push((performance.now() - t0) / reps);
    }
    times.sort((a, b) => a - b);
    return times[Math.floor(times.length / 2)];
  };
  // Products' FLOPs (causal): dK/dV 4 (S, dP, dV, dK), dQ 3 (S, dP, dQ).
  const product = 2 * seq * seq / 2 * heads * d;
  const rows: string[] = [];
  const row = (pass: string, tiles: string, ms: number, f: number) => `| ${d} | ${pass} | ${
      tiles} | ${ms.toFixed(3)} | ${f > 0 ? (f / ms / 1e9).toFixed(2) : '-'} |`;
  rows.push(
      row('Delta', '-', await time(() => runOwnPipeline(webgpu, delta, {
                                     inputs: [dy, out, dl, lse],
                                     outputs: [{shape: [1, heads, seq, 2], dtype: 'float32'}],
                                     uniforms,
                                     dispatch: delta.workgroups
                                   })),
          0));
  console.log(rows[rows.length - 1]);
  let best = {dkdv: dkdvs[0], dq: dqs[0], dkdvMs: Infinity, dqMs: Infinity};
  for (const t of dkdvs) {
    const prog = new FlashAttentionGradDkDvProgram(d, d, t, features);
    const ms = await time(
        () => runOwnPipeline(webgpu, prog, {
          inputs: [q, k, v, dy, stats],
          outputs: [{shape: k.shape, dtype: 'float32'}, {shape: v.shape, dtype: 'float32'}],
          uniforms,
          dispatch: [Math.ceil(seq / t.bc), heads, 1]
        }));
    rows.push(row('dK/dV', JSON.stringify(t), ms, 4 * product));
    console.log(rows[rows.length - 1]);
    if (ms < best.dkdvMs) {
      best = {...best, dkdv: t, dkdvMs: ms};
    }
  }
  for (const t of dqs) {
    const prog = new FlashAttentionGradDqProgram(d, d, t, features);
    const ms = await time(() => runOwnPipeline(webgpu, prog, {
                            inputs: [q, k, v, dy, stats],
                            outputs: [{shape: q.shape, dtype: 'float32'}],
                            uniforms,
                            dispatch: [Math.ceil(seq / t.br), heads, 1]
                          }));
    rows.push(row('dQ', JSON.stringify(t), ms, 3 * product));
    console.log(rows[rows.length - 1]);
    if (ms < best.dqMs) {
      best = {...best, dq: t, dqMs: ms};
    }
  }
  webgpu.disposeData(stats.dataId);
  tf.dispose([q, k, v, out, lse, dy, dl]);
  return {rows, dkdv: best.dkdv, dq: best.dq};
}

async function main(): Promise<void> {
  Object.assign(globalThis, globals);
  (globalThis as unknown as {navigator: unknown}).navigator = {gpu: create([])};
  // tfjs-backend-webgpu registers itself at import only if navigator.gpu exists.
  require('@tensorflow/tfjs-backend-webgpu');
  registerFlashAttentionGradWebGPU();  // (also done by importing ../src)
  await tf.setBackend('webgpu');
  const device = (tf.backend() as unknown as {device: GPUDevice}).device;
  const limits = device.limits;
  console.log(`adapter limits: storage ${limits.maxComputeWorkgroupStorageSize}, invocations ${
      limits.maxComputeInvocationsPerWorkgroup}; auto tiles D=64: ${
      JSON.stringify(chooseGradTiles(
          64, 64, limits))}; fused forward: ${hasFusedKernel(FlashAttention, 'webgpu')}`);

  const lines: string[] = [
    '| case | max error / max ref vs float64 oracle | rerun bit-identical |', '| --- | --- | --- |'
  ];
  const cases: Array<[Shape, OracleOptions, string]> = quick ?
      [[
        {batch: 1, seqQ: 64, seqK: 64, heads: 2, headsKV: 1, headDim: 64, headDimV: 64},
        {causal: true}, 'causal S=64 H=2 Hk=1 D=64'
      ]] :
      [
        [
          {batch: 1, seqQ: 1024, seqK: 1024, heads: 2, headsKV: 2, headDim: 64, headDimV: 64},
          {causal: true}, 'causal S=1024 H=2 D=64'
        ],
        [
          {batch: 2, seqQ: 384, seqK: 512, heads: 4, headsKV: 1, headDim: 128, headDimV: 64},
          {windowSize: [100, 20], softcap: 20, dropoutRate: 0.1, seed: 3},
          'B=2 Sq=384 Sk=512 H=4 Hk=1 D=128 Dv=64 window softcap dropout'
        ]
      ];
  for (const [shape, opts, label] of cases) {
    lines.push(await correctness(shape, opts, label));
    console.log(lines[lines.length - 1]);
  }
  const h100Tilings: Array<GradTiles|null> = [null];
  if (passes) {
    lines.push(
        '',
        '| D | pass (causal, B=1, H=16, S=4096) | tiles | ms (median) | TFLOP/s of its products |',
        '| --- | --- | --- | --- | --- |');
    const seqP = quick ? 128 : 4096;
    const headsP = quick ? 2 : 16;
    // Tilings as "bc,br,threads" (dK/dV) and "br,bc,threads" (dQ).
    const dk = (spec: string): DkDvTiles => {
      const [bc, br, threads] = spec.split(',').map(Number);
      return {bc, br, threads};
    };
    const dq = (spec: string): DqTiles => {
      const [br, bc, threads] = spec.split(',').map(Number);
      return {br, bc, threads};
    };
    const p64 = await passTiming(
        seqP, headsP, quick ? 16 : 64, ['32,32,128', '64,16,128', '32,16,128'].map(dk),
        ['64,16,128', '64,8,128', '32,32,128'].map(dq), quick ? 2 : 10, quick ? 3 : 5);
    lines.push(...p64.rows);
    if (!quick) {
      h100Tilings.push({dkdv: p64.dkdv, dq: p64.dq});
    }
    const best: Array<[number, GradTiles]> = [[quick ? 16 : 64, {dkdv: p64.dkdv, dq: p64.dq}]];
    if (!quick) {
      const p128 = await passTiming(
          seqP, headsP, 128, ['32,8,128', '32,8,256'].map(dk), ['32,8,128', '32,8,256'].map(dq), 5,
          5);
      lines.push(...p128.rows);
      best.push([128, {dkdv: p128.dkdv, dq: p128.dq}]);
    }
    // Forward + backward, causal, over S: the automatic tiles against the
    // fastest of each pass above.
    lines.push(
        '',
        '| D | S | fwd+bwd ms, auto tiles | TFLOP/s | fwd+bwd ms, fastest passes | TFLOP/s | fastest tiles |',
        '| --- | --- | --- | --- | --- | --- | --- |');
    for (const [d, tiles] of best) {
      for (const seq of quick ? [128] : [1024, 2048, 4096, 8192, 16384]) {
        const reps = quick ? 2 : seq <= 4096 ? 10 : seq === 8192 ? 4 : 2;
        const [auto] = await fwdBwd(seq, quick ? 2 : 16, d, null, reps, quick ? 2 : 5);
        const [fast] = await fwdBwd(seq, quick ? 2 : 16, d, tiles, reps, quick ? 2 : 5);
        const f = 3.5 * flops(seq, quick ? 2 : 16, d, true);
        lines.push(`| ${d} | ${seq} | ${auto.toFixed(3)} | ${(f / auto / 1e9).toFixed(2)} | ${
            fast.toFixed(3)} | ${(f / fast / 1e9).toFixed(2)} | ${JSON.stringify(tiles)} |`);
        console.log(lines[lines.length - 1]);
      }
    }
  }
  lines.push(
      '', '| what (causal, B=1, H=16, D=64) | S | ms (median) | TFLOP/s |',
      '| --- | --- | --- | --- |');
  const timingRuns: Array<[number, Array<GradTiles|null>, number, number]> =
      quick ? [[128, [null], 2, 3]] : [[4096, h100Tilings, 10, 5]];
  for (const [seq, tilings, reps, batches] of timingRuns) {
    const rows = await timing(seq, quick ? 2 : 16, 64, tilings, true, reps, batches);
    rows.forEach(r => console.log(r));
    lines.push(...rows);
  }
  console.log('\n' + lines.join('\n'));
}

main().catch(e => {
  console.error(e);
  process.exit(1);
});
