/**
 * Decode benchmark on tfjs-webgpu (Node + Dawn): one new token against a
 * KV cache, B=1, H=32, Hk=8, D=128 by default.
 *
 * 1. Attention per step at each context length:
 *    - fused: flashAttentionWithKVCache on preallocated cache variables
 *      (the new key/value written in place, split-KV kernel);
 *    - concat: what tfjs users do today: concatenate the new key/value to
 *      the cache tensors (a copy of the cache), repeat the kv heads for GQA
 *      and run composed matMul + softmax attention (benchmarks/baselines.ts).
 *    K/V bytes read per step (2 * context * Hk * D * 4) over the step time,
 *    against the GPU's memory bandwidth.
 *    Beside the wall-clock per step (the headline: what a caller gets), the
 *    GPU time of the fused step from timestamp queries (when the device has
 *    'timestamp-query'): K steps recorded into one command buffer, so the
 *    GPU runs them back to back; K/V bandwidth is reported for both.
 * 2. Generation with the demo's FlashMHA GPT (demo/gpt.ts, fused norms and
 *    GELU as `npm run demo` builds it): ms per token with the caches
 *    (generateIdsWithCache, greedy: ids picked and fed on the GPU;
 *    pipelined, reading the ids every 8 tokens one chunk behind, and
 *    waiting for every token's id) and without (the whole window through
 *    the model per token, its id read back), at each of --gen-contexts;
 *    with the dispatches of one cached token and the CPU time to record
 *    one (nothing awaited: what the JavaScript and Dawn calls cost).
 *
 *   node decode.mjs [--contexts 512,...,32768] [--heads 32] [--heads-kv 8]
 *       [--dim 128] [--gen-contexts 256,1024,4096] [--gen-tokens 32]
 *       [--bandwidth-gbs N] [--torch torch_decode.json] [--smoke]
 *       [--budget-ms 300] [--rotary] [--targets 264,528,1056] [--no-gen]
 *
 * --rotary: the fused step also rotates q and the new key (rotary tables).
 * Each row names the split-KV plan that ran (kernels/webgpu/flash_decode.ts
 * planDecode: splits x keys per split, workgroups of the split pass);
 * --targets also times the fused step with the splits aimed at each of
 * these workgroup counts (a table of plans; each checked against the
 * default plan). --no-gen: attention only (no generation rows).
 * Each row also lists the WebGPU API calls of one step (dispatches,
 * submits, error scopes, host uploads: benchmarks/webgpu_counters.ts).
 * --smoke: tiny sizes for a software adapter (SwiftShader); DECODE_PROFILE=1
 * lists the kernels of one cached generation step. Time: median of
 * repetitions, each running K steps back to back and waiting for the GPU
 * queue once. Progress on stderr; the table on stdout, the goal table last.
 */
import * as fs from 'fs';

import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';

import {buildGPT, generateIdsWithCache, median, withDeferredSubmits} from '../demo/gpt';
import {useBestBackend} from '../demo/backend';
import {DecodePlan, planDecode, setDecodeTargetWorkgroups} from '../kernels/webgpu/flash_decode';
import {checkOwnPipelineErrors} from '../kernels/webgpu/own_pipeline';
import {flashAttentionWithKVCache} from '../src';
import {flashMHA, IncrementalDecoder} from '../src/layers';

import {composedAttention} from './baselines';
import {drainQueue, gpuStepMs, TimedBackend} from './gpu_timer';
import {webgpuCounters} from './webgpu_counters';

interface Args {
  contexts: number[];
  heads: number;
  headsKV: number;
  dim: number;
  genContexts: number[];
  genTokens: number;
  gpt: {numLayers: number, embedDim: number, numHeads: number, vocabSize: number};
  bandwidthGBs: number|null;
  torch: string|null;
  budgetMs: number;
  /** Rotary tables on the fused attention step (q and the new key rotated). */
  rotary: boolean;
  /** Workgroup targets of extra split plans to time (none: the default only). */
  targets: number[];
  gen: boolean;
}

function parseArgs(argv: string[]): Args {
  const get = (name: string, dflt: string) => {
    const i = argv.indexOf(`--${name}`);
    return i >= 0 && i + 1 < argv.length ? argv[i + 1] : dflt;
  };
  const nums = (s: string) => s.split(',').filter(x => x).map(Number);
  const smoke = argv.includes('--smoke');
  return {
    contexts: nums(get('contexts', smoke ? '64,200' : '512,1024,2048,4096,8192,16384,32768')),
    heads: Number(get('heads', smoke ? '4' : '32')),
    headsKV: Number(get('heads-kv', smoke ? '2' : '8')),
    dim: Number(get('dim', smoke ? '16' : '128')),
    genContexts: nums(get('gen-contexts', smoke ? '16,48' : '256,1024,4096')),
    genTokens: Number(get('gen-tokens', smoke ? '3' : '32')),
    gpt: smoke ? {numLayers: 2, embedDim: 32, numHeads: 2, vocabSize: 64} :
                 {numLayers: 4, embedDim: 256, numHeads: 4, vocabSize: 64},
    bandwidthGBs: argv.includes('--bandwidth-gbs') ? Number(get('bandwidth-gbs', '0')) : null,
    torch: get('torch', '') || null,
    budgetMs: Number(get('budget-ms', smoke ? '100' : '300')),
    rotary: argv.includes('--rotary'),
    targets: nums(get('targets', '')),
    gen: !argv.includes('--no-gen'),
  };
}

function log(text: string): void {
  process.stderr.write(`${text}\n`);
}

/** Peak memory bandwidth (GB/s) of known GPUs, from the adapter's name. */
function knownBandwidth(name: string): number|null {
  if (/H200/i.test(name)) {
    return 4800;
  }
  if (/H100.*PCIe/i.test(name)) {
    return 2000;
  }
  if (/H100/i.test(name)) {
    return 3350;  // H100 SXM5, HBM3.
  }
  return null;
}

async function sync(): Promise<void> {
  const b = tf.backend() as unknown as TimedBackend;
  if (typeof b.submitQueue === 'function') {
    await drainQueue(b);
  }
}

/** Median ms of `step` (run K times per repetition, one wait each). */
async function timeSteps(step: () => void, budgetMs: number): Promise<number> {
  step();
  await sync();
  let t0 = performance.now();
  step();
  await sync();
  const est = Math.max(performance.now() - t0, 0.005);
  const k = Math.max(1, Math.min(100, Math.ceil(10 / est)));
  const reps = Math.max(3, Math.min(15, Math.floor(budgetMs / (k * est))));
  const times: number[] = [];
  for (let r = 0; r < reps; r++) {
    t0 = performance.now();
    for (let i = 0; i < k; i++) {
      step();
    }
    await sync();
    times.push((performance.now() - t0) / k);
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)];
}

/** The WebGPU API calls `run` makes (it must not wait for the GPU). */
function apiCalls(run: () => void): string {
  if (tf.getBackend() !== 'webgpu') {
    return '-';
  }
  const counters = webgpuCounters();
  run();
  const c = counters.snapshot();
  return `${c.dispatches} dispatches, ${c.submits} submits, ${c.errorScopes} error scopes, ${
      c.hostUploads} uploads${
      process.env.DECODE_PROFILE ? ` ${JSON.stringify([...c.uploadShapes])}` : ""}`;
}

function ownedVariable(shape: [number, number, number, number]): tf.Variable<tf.Rank.R4> {
  const init = tf.randomNormal(shape);
  const v = tf.variable(init, false) as tf.Variable<tf.Rank.R4>;
  init.dispose();
  return v;
}

interface AttentionRow {
  context: number;
  fusedMs: number;
  /** GPU time of one fused step (timestamp queries), or null. */
  gpuMs: number|null;
  concatMs: number|null;
  gbs: number;
  check: number;
  /** WebGPU API calls of one fused step. */
  api: string;
  plan: DecodePlan;
  /** Extra plans (--targets): ms and max relative difference to the default. */
  sweep: Array<{target: number, plan: DecodePlan, ms: number, diff: number}>;
}

function planText(p: DecodePlan): string {
  return `${p.numSplits} x ${p.splitKeys} keys, ${p.workgroups} wg of ${p.threadsPerWorkgroup}`;
}

async function attentionRows(args: Args): Promise<AttentionRow[]> {
  const {heads: H, headsKV: Hk, dim: D} = args;
  const rows: AttentionRow[] = [];
  for (const context of args.contexts) {
    const kCache = ownedVariable([1, context, Hk, D]);
    const vCache = ownedVariable([1, context, Hk, D]);
    const q = tf.randomNormal([1, 1, H, D]) as tf.Tensor4D;
    const k = tf.randomNormal([1, 1, Hk, D]) as tf.Tensor4D;
    const v = tf.randomNormal([1, 1, Hk, D]) as tf.Tensor4D;
    const tables: {rotaryCos?: tf.Tensor2D, rotarySin?: tf.Tensor2D} = args.rotary ? {
      rotaryCos: tf.randomUniform([context, D / 2]) as tf.Tensor2D,
      rotarySin: tf.randomUniform([context, D / 2]) as tf.Tensor2D
    } :
                                                                                     {};
    // The step of a sequence at `context` tokens: the last slot is (re)written.
    const fused = () =>
        flashAttentionWithKVCache(
            q, kCache, vCache, {k, v, cacheSeqlens: [context - 1], causal: true, ...tables}) as
        tf.Tensor4D;
    const fusedMs = await timeSteps(() => fused().dispose(), args.budgetMs);
    const gpuMs =
        await gpuStepMs(tf, tf.backend() as unknown as TimedBackend, () => fused().dispose(), 50);
    const api = apiCalls(() => fused().dispose());
    await checkOwnPipelineErrors();
    const plan = planDecode(1, 1, H, Hk, context);
    const sweep: AttentionRow['sweep'] = [];
    for (const target of args.targets) {
      setDecodeTargetWorkgroups(target);
      try {
        const ms = await timeSteps(() => fused().dispose(), args.budgetMs);
        const a = fused();
        setDecodeTargetWorkgroups(null);
        const b = fused();
        const err = tf.tidy(() => tf.div(tf.max(tf.abs(tf.sub(a, b))), tf.max(tf.abs(b))));
        const diff = (await err.data())[0];
        tf.dispose([a, b, err]);
        setDecodeTargetWorkgroups(target);
        sweep.push({target, plan: planDecode(1, 1, H, Hk, context), ms, diff});
        log(`context ${context}, target ${target} workgroups: ${ms.toFixed(3)} ms (${
            planText(
                sweep[sweep.length - 1].plan)}), max rel diff to default ${diff.toExponential(2)}`);
      } finally {
        setDecodeTargetWorkgroups(null);
      }
    }
    await checkOwnPipelineErrors();
    // Concat baseline on the same prefix.
    const kPrev = tf.slice(kCache, [0, 0, 0, 0], [1, context - 1, Hk, D]);
    const vPrev = tf.slice(vCache, [0, 0, 0, 0], [1, context - 1, Hk, D]);
    // GQA: each kv head repeated H / Hk times (rank 3: tfjs-webgpu tiles
    // rank-5 tensors on the CPU).
    const repeat = (x: tf.Tensor4D) =>
        tf.reshape(
            tf.tile(tf.reshape(x, [context * Hk, 1, D]), [1, H / Hk, 1]), [1, context, H, D]) as
        tf.Tensor4D;
    const concat = () => tf.tidy(() => {
      const kAll = tf.concat([kPrev, k], 1) as tf.Tensor4D;
      const vAll = tf.concat([vPrev, v], 1) as tf.Tensor4D;
      // The last token sees every key: no mask needed.
      return composedAttention(q, repeat(kAll), repeat(vAll));
    });
    let concatMs: number|null = null;
    let check = NaN;
    try {
      concatMs = await timeSteps(() => concat().dispose(), args.budgetMs);
      // (The concat baseline has no rotary: compare without it.)
      const a = args.rotary ?
          flashAttentionWithKVCache(
              q, kCache, vCache, {k, v, cacheSeqlens: [context - 1], causal: true}) as tf.Tensor4D :
          fused();
      const b = concat();
      const err = tf.tidy(() => tf.div(tf.max(tf.abs(tf.sub(a, b))), tf.max(tf.abs(b))));
      check = (await err.data())[0];
      tf.dispose([a, b, err]);
    } catch (e) {
      log(`context ${context}: concat baseline failed: ${(e as Error).stack?.slice(0, 1500)}`);
    }
    const bytes = 2 * context * Hk * D * 4;
    const row =
        {context, fusedMs, gpuMs, concatMs, gbs: bytes / fusedMs / 1e6, check, api, plan, sweep};
    log(`context ${context}: fused ${fusedMs.toFixed(3)} ms (GPU ${gpuMs?.toFixed(3) ?? '-'} ms; ${
        planText(plan)}), concat ${concatMs?.toFixed(3) ?? '-'} ms, ${
        row.gbs.toFixed(0)} GB/s of K/V, max|fused - concat| / max|concat| = ${
        check.toExponential(2)}; one fused step: ${api}`);
    rows.push(row);
    tf.dispose([kCache, vCache, q, k, v, kPrev, vPrev]);
    tf.dispose(Object.values(tables));
  }
  return rows;
}

/** Cached tokens recorded back to back (nothing read) to time their recording. */
const RECORD_TOKENS = 24;

interface GenerationRow {
  context: number;
  /** Pipelined (generateIdsWithCache: ids read in chunks, no per-token wait). */
  cachedMs: number;
  /** The same, reading (and waiting for) every token's id. */
  cachedSyncMs: number;
  uncachedMs: number;
  /** WebGPU API calls of one cached token (model step and argmax, no read). */
  api: string;
  /**
   * CPU time to record one cached token (step and argmax, nothing read or
   * awaited; the median of RECORD_TOKENS in a row): the part of the
   * pipelined time per token that the JavaScript and Dawn calls cost.
   */
  recordMs: number;
}

/** Greedy next ids `[B]` of logits `[B, S, V]` (last position). */
function nextIds(logits: tf.Tensor): tf.Tensor2D {
  return tf.tidy(() => {
    const [b, s, vocab] = logits.shape as [number, number, number];
    const last = s === 1 ? logits : tf.slice(logits, [0, s - 1, 0], [b, 1, vocab]);
    return tf.cast(tf.argMax(last, 2), 'int32') as tf.Tensor2D;
  });
}

async function generationRows(args: Args): Promise<GenerationRow[]> {
  const model = buildGPT(args.gpt, flashMHA, 'gen', 'fused');
  const rows: GenerationRow[] = [];
  const maxContext = Math.max(...args.genContexts);
  const prompt = tf.tensor2d(
      Array.from({length: maxContext}, (_, i) => (i * 7) % args.gpt.vocabSize), [1, maxContext],
      'int32');
  for (const context of args.genContexts) {
    const tokens = args.genTokens;
    // The API calls of one cached token (prefill `context` tokens first).
    const decoder =
        new IncrementalDecoder(model, {batch: 1, maxSeqLen: context + tokens + RECORD_TOKENS + 4});
    const prefill = tf.tidy(() => nextIds(decoder.step(tf.slice(prompt, [0, 0], [1, context]))));
    let id = prefill;
    await id.data();
    const stepOnce = async () => {
      const next = tf.tidy(() => nextIds(decoder.step(id)));
      id.dispose();
      id = next;
      await id.data();
    };
    await stepOnce();
    const api = apiCalls(() => tf.dispose(tf.tidy(() => nextIds(decoder.step(id)))));
    await sync();
    const recordTimes: number[] = [];
    for (let n = 0; n < RECORD_TOKENS; n++) {
      const t0 = performance.now();
      const next = tf.tidy(() => nextIds(decoder.step(id)));
      recordTimes.push(performance.now() - t0);
      id.dispose();
      id = next;
    }
    await id.data();
    const recordMs = median(recordTimes);
    if (process.env.DECODE_PROFILE) {
      const info = await tf.profile(stepOnce);
      log(`one cached step: ${info.kernels.length} kernels, ${info.newTensors} new tensors: ${
          Object
              .entries(info.kernels.reduce(
                  (m: Record<string, number>, k) => {
                    m[k.name] = (m[k.name] ?? 0) + 1;
                    return m;
                  },
                  {}))
              .map(([n, c]) => `${n} x${c}`)
              .join(', ')}`);
      const timed = await Promise.all(info.kernels.map(async k => [k.name, await k.kernelTimeMs]));
      log(`slowest: ${
          timed.sort((x, y) => Number(y[1]) - Number(x[1]))
              .slice(0, 8)
              .map(([n, t]) => `${n} ${JSON.stringify(t)}`)
              .join(', ')}`);
    }
    id.dispose();
    decoder.dispose();
    // Per-token time of generateIdsWithCache: (N tokens - 1 token) / (N - 1),
    // so the caches' allocation and the prefill of `context` cancel out.
    const promptSlice = tf.slice(prompt, [0, 0], [1, context]);
    const promptIds = Array.from(await promptSlice.data());
    promptSlice.dispose();
    const perToken = async (opts: {readEvery: number, lag: boolean}) => {
      const timeOf = async (n: number) => {
        const t = performance.now();
        await generateIdsWithCache(model, promptIds, n, opts);
        return performance.now() - t;
      };
      await timeOf(tokens + 1);  // compiles every shape the timed runs use
      const one = await timeOf(1);
      return (await timeOf(tokens + 1) - one) / tokens;
    };
    const cachedMs = await perToken({readEvery: 8, lag: true});
    const cachedSyncMs = await perToken({readEvery: 1, lag: false});
    // Without: the whole window of `context` tokens through the model.
    const window = tf.slice(prompt, [0, 0], [1, context]);
    const full = async () => {
      const next = tf.tidy(() => nextIds(model.predict(window) as tf.Tensor));
      await next.data();
      next.dispose();
    };
    await full();
    const t0 = performance.now();
    const fullTokens = Math.max(2, Math.ceil(tokens / 4));
    for (let n = 0; n < fullTokens; n++) {
      await full();
    }
    const uncachedMs = (performance.now() - t0) / fullTokens;
    window.dispose();
    log(`generation at context ${context}: recording a token takes ${
        recordMs.toFixed(2)} ms of CPU`);
    log(`generation at context ${context}: ${
        cachedMs.toFixed(2)} ms/token with the cache, pipelined (${
        cachedSyncMs.toFixed(2)} waiting for each id), ${uncachedMs.toFixed(2)} ms/token without (${
        (uncachedMs / cachedMs).toFixed(1)}x); one cached token: ${api}`);
    rows.push({context, cachedMs, cachedSyncMs, uncachedMs, api, recordMs});
  }
  prompt.dispose();
  model.dispose();
  return rows;
}

interface TorchRow {
  context: number;
  ms: number|null;
}

function readTorch(file: string|null): {device: string, rows: TorchRow[]}|null {
  if (file == null || !fs.existsSync(file)) {
    return null;
  }
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const backend = await useBestBackend('webgpu');
  log(`backend: ${backend.description}`);
  // tfjs-webgpu runs ops on small tensors still on the host on the CPU,
  // reading GPU tensors back synchronously (which Node's Dawn cannot do):
  // keep every op on the GPU.
  tf.env().set('WEBGPU_CPU_FORWARD', false);
  const bandwidth = args.bandwidthGBs ?? knownBandwidth(backend.description);
  const torch = readTorch(args.torch);
  const attention = await attentionRows(args);
  // Generation as the demo runs it: one queue submit per token.
  const generation = args.gen ? await withDeferredSubmits(() => generationRows(args)) : [];

  const lines: string[] = [];
  lines.push(`decode attention, B=1 H=${args.heads} Hk=${args.headsKV} D=${
      args.dim}, one new token, fp32; ${backend.description}${
      torch ? `; torch: ${torch.device}` : ''}`);
  lines.push(
      '| context | fused+cache ms | concat ms | concat / fused | K/V GB/s (fused) | % of bandwidth |' +
      ' fused GPU ms (timestamps) | K/V GB/s (GPU) | % of bandwidth (GPU) |' +
      ' torch SDPA ms | fused / torch | split plan |');
  lines.push('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |');
  const percent = (gbs: number) =>
      bandwidth == null ? '-' : (100 * gbs / bandwidth).toFixed(1) + '%';
  for (const r of attention) {
    const t = torch?.rows.find(x => x.context === r.context)?.ms ?? null;
    const gpuGbs =
        r.gpuMs == null ? null : 2 * r.context * args.headsKV * args.dim * 4 / r.gpuMs / 1e6;
    lines.push(`| ${r.context} | ${r.fusedMs.toFixed(3)} | ${r.concatMs?.toFixed(3) ?? '-'} | ${
        r.concatMs == null ? '-' : (r.concatMs / r.fusedMs).toFixed(1) + 'x'} | ${
        r.gbs.toPrecision(3)} | ${percent(r.gbs)} | ${r.gpuMs?.toFixed(3) ?? '-'} | ${
        gpuGbs?.toPrecision(3) ??
        '-'} | ${gpuGbs == null ? '-' : percent(gpuGbs)} | ${t?.toFixed(3) ?? '-'} | ${
        t == null ? '-' : (r.fusedMs / t).toFixed(1) + 'x'} | ${planText(r.plan)} |`);
  }
  if (args.targets.length > 0) {
    lines.push('');
    lines.push('split plans (--targets): fused+cache ms per step');
    lines.push(
        '| context | target wg | split plan | ms | K/V GB/s | % of bandwidth | diff to default |');
    lines.push('| --- | --- | --- | --- | --- | --- | --- |');
    for (const r of attention) {
      const bytes = 2 * r.context * args.headsKV * args.dim * 4;
      for (const x of r.sweep) {
        const gbs = bytes / x.ms / 1e6;
        lines.push(`| ${r.context} | ${x.target} | ${planText(x.plan)} | ${x.ms.toFixed(3)} | ${
            gbs.toPrecision(
                3)} | ${bandwidth == null ? '-' : (100 * gbs / bandwidth).toFixed(1) + '%'} | ${
            x.diff.toExponential(1)} |`);
      }
    }
  }
  lines.push('');
  lines.push(`generation, GPT ${args.gpt.numLayers} layers x FlashMHA width ${args.gpt.embedDim} (${
      args.gpt.numHeads} heads), greedy, one token per step`);
  lines.push(
      'with cache: generateIdsWithCache (demo/gpt.ts), ids fed on the GPU; pipelined = read every ' +
      '8 ids, one chunk behind; waiting = read every id. Without: the window per token, read each.');
  lines.push(
      '| context | with cache ms/token (pipelined) | tokens/s | with cache, waiting per token |' +
      ' without cache ms/token | tokens/s | speed-up (pipelined) | CPU ms to record a token |' +
      ' one cached token |');
  lines.push('| --- | --- | --- | --- | --- | --- | --- | --- | --- |');
  for (const g of generation) {
    lines.push(`| ${g.context} | ${g.cachedMs.toFixed(2)} | ${(1000 / g.cachedMs).toFixed(0)} | ${
        g.cachedSyncMs.toFixed(
            2)} | ${g.uncachedMs.toFixed(2)} | ${(1000 / g.uncachedMs).toFixed(0)} | ${
        (g.uncachedMs / g.cachedMs).toFixed(1)}x | ${g.recordMs.toFixed(3)} | ${g.api} |`);
  }
  // The goal table of the decode issue: context 4096 (or the nearest run),
  // generation at 1024 (or the nearest).
  const nearest = <T extends {context: number}>(list: T[], c: number) =>
      list.reduce((a, b) => Math.abs(b.context - c) < Math.abs(a.context - c) ? b : a);
  const a4096 = nearest(attention, 4096);
  const g1024 = generation.length > 0 ? nearest(generation, 1024) : null;
  const flat = generation.length > 1 ?
      `${generation.map(g => `${g.cachedMs.toFixed(2)} ms @${g.context}`).join(', ')}` :
      '-';
  lines.push('');
  lines.push('| goal | target | measured |');
  lines.push('| --- | --- | --- |');
  lines.push(`| decode attention @${a4096.context}: concat / fused | >= 10x | ${
      a4096.concatMs == null ? '-' : (a4096.concatMs / a4096.fusedMs).toFixed(1) + 'x'} |`);
  const kvShare = (gbs: number) =>
      bandwidth == null ? `${gbs.toPrecision(3)} GB/s` : (100 * gbs / bandwidth).toFixed(1) + '%';
  const gpuGbs4096 = a4096.gpuMs == null ?
      null :
      2 * a4096.context * args.headsKV * args.dim * 4 / a4096.gpuMs / 1e6;
  lines.push(`| K/V bytes read @${a4096.context} vs bandwidth (${
      bandwidth ?? '?'} GB/s) | >= 30% | ${kvShare(a4096.gbs)} wall-clock (${
      gpuGbs4096 == null ? 'no timestamps' : kvShare(gpuGbs4096) + ' of GPU time'}) |`);
  lines.push(`| generation @${g1024?.context ?? '-'}: with / without cache tokens/s | >= 3x | ${
      g1024 == null ? '-' : (g1024.uncachedMs / g1024.cachedMs).toFixed(1) + 'x'} |`);
  lines.push(`| per-token time flat in context (with cache) | flat | ${flat} |`);
  process.stdout.write(lines.join('\n') + '\n');
}

main().then(() => process.exit(0), e => {
  log(`benchmark failed: ${e?.stack ?? e}`);
  process.exit(1);
});
