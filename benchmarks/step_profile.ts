/**
 * Where a GPT training step's time goes on WebGPU (issues 5 and 16): for
 * FlashMHA and composed attention, each optimizer, per batch size, the
 * step's wall time split into the time JavaScript takes to enqueue it
 * (optimizer.minimize returning) and the wait for the GPU (the loss
 * read-back), the GPU's busy time from timestamp queries (tf.time's
 * kernelMs; the package's own pipelines are not counted there), and per
 * step: tfjs kernels, GPU dispatches, queue submits (and their time), host
 * uploads, queue.writeBuffer calls, buffers created and read-backs
 * (benchmarks/webgpu_counters.ts); then the most frequent kernels and a CPU
 * profile of the enqueue (self time per function).
 *
 *   node step_profile.mjs [--batches=1,4,16] [--seq=1024] [--steps=4] [--impls=flash,composed]
 *       [--optimizers=adam,fused-adamw] [--submit-batches=15,200] [--trace-dawn]
 *       [--no-cpu-profile] [--submit-cost] [--tfjs-flags=NAME:value,...] [--leak-steps=N] [--tiny]
 *       [--norm=gpt|tfjs|fused]
 *
 * --norm: the model's norms (demo/gpt.ts's NormKind); `fused` is the fused
 * model of train_gpt.ts (fused norms with the residual adds, fused GELU
 * gradient, fused cross-entropy); default `gpt`.
 * --optimizers: `adam` (tf.train.adam), `fused-adamw` (fusedAdamW, weight
 * decay 0, so the same math as adam), `reference-adamw` (fusedAdamW's
 * composed-ops path on webgpu).
 * --submit-cost: what one queue.submit costs as a function of the work in
 * its command buffer (0 to 1000 dispatches, each with its own bind group).
 * --tfjs-flags: tfjs flags to set first, e.g.
 * WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE:1000 (kernels recorded per queue submit).
 * --leak-steps=N: after the profile of each model and optimizer, N more
 * steps, and tf.memory()'s tensors and GPU bytes and the JS heap before and
 * after them (run node with --expose-gc for a heap measured after a collection).
 * --tiny: a 1 x 32 GPT (2 heads), seq 32, batch 1, 2 steps: to try the
 * script on SwiftShader.
 *
 * --submit-batches: step times with these values of tfjs's
 * WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE (kernels recorded per queue submit).
 * --trace-dawn: time spent in (and calls of) each WebGPU method during two
 * steps, JavaScript wrappers included.
 *
 * Model as benchmarks/train_gpt.ts (6 x 512, 8 heads, RoPE, causal).
 */
import * as inspector from 'inspector';

import * as tf from '@tensorflow/tfjs-core';

import {FUSED_ADAMW_IMPL, fusedAdamW} from '../src';
import {flashMHA} from '../src/layers';
import {useBestBackend} from '../demo/backend';
import {buildGPT, lossOf, median, NormKind, sampleBatch, seededRandom, trainableVariables} from '../demo/gpt';

import {composedMHA} from './composed_mha';
import {gptSize, option, VOCAB} from './gpt_options';
import {WebGPUCounts, webgpuCounters} from './webgpu_counters';

const TINY = process.argv.includes('--tiny');
const NORM = option('norm', 'gpt') as NormKind;
if (!['gpt', 'tfjs', 'fused'].includes(NORM)) {
  throw new Error(`--norm: expected gpt, tfjs or fused, got '${NORM}'`);
}
const {layers: LAYERS, width: WIDTH, heads: HEADS} = TINY ? {
  layers: Number(option('layers', '1')),
  width: Number(option('width', '32')),
  heads: Number(option('heads', '2'))
} :
                                                            gptSize();

interface CpuProfileNode {
  id: number;
  callFrame: {functionName: string, url: string, lineNumber: number};
  hitCount?: number;
  children?: number[];
}

/** Runs fn under the V8 CPU profiler; self time (ms) per function, top n. */
async function cpuProfile(fn: () => Promise<void>, top: number): Promise<Array<[string, number]>> {
  const session = new inspector.Session();
  session.connect();
  const post = (method: string, params?: object) => new Promise<unknown>(
      (resolve, reject) =>
          session.post(method, params ?? {}, (err, result) => err ? reject(err) : resolve(result)));
  await post('Profiler.enable');
  await post('Profiler.setSamplingInterval', {interval: 100});
  await post('Profiler.start');
  await fn();
  const {profile} = await post('Profiler.stop') as
      {profile: {nodes: CpuProfileNode[], startTime: number, endTime: number, samples: number[]}};
  session.disconnect();
  const msPerSample =
      (profile.endTime - profile.startTime) / 1000 / Math.max(1, profile.samples.length);
  const byName = new Map<string, number>();
  for (const node of profile.nodes) {
    const f = node.callFrame;
    const name = `${f.functionName || '(anonymous)'}:${f.lineNumber}`;
    byName.set(name, (byName.get(name) ?? 0) + (node.hitCount ?? 0) * msPerSample);
  }
  return [...byName.entries()].sort((a, b) => b[1] - a[1]).slice(0, top);
}

type DawnStats = Map<string, {calls: number, ms: number}>;

/** Wraps every method of the prototypes of these WebGPU objects with a timer. */
function traceWebGPU(objects: Array<[string, object]>, stats: DawnStats): void {
  for (const [label, obj] of objects) {
    const proto = Object.getPrototypeOf(obj) as Record<string, unknown>;
    for (const name of Object.getOwnPropertyNames(proto)) {
      const descriptor = Object.getOwnPropertyDescriptor(proto, name);
      if (name === 'constructor' || descriptor == null || typeof descriptor.value !== 'function') {
        continue;
      }
      const original = descriptor.value as (...a: unknown[]) => unknown;
      const key = `${label}.${name}`;
      proto[name] = function(this: unknown, ...args: unknown[]) {
        const t0 = performance.now();
        try {
          return original.apply(this, args);
        } finally {
          const entry = stats.get(key) ?? {calls: 0, ms: 0};
          entry.calls++;
          entry.ms += performance.now() - t0;
          stats.set(key, entry);
        }
      };
    }
  }
}

function makeOptimizer(name: string): tf.Optimizer {
  switch (name) {
    case 'adam':
      return tf.train.adam(1e-4);
    case 'fused-adamw':
    case 'reference-adamw':
      return fusedAdamW({learningRate: 1e-4, weightDecay: 0});
    default:
      throw new Error(
          `--optimizers: unknown optimizer '${name}' (adam, fused-adamw, reference-adamw)`);
  }
}

/** Runs fn with fusedAdamW's implementation flag set for `optimizer`. */
async function withOptimizerImpl<T>(optimizer: string, fn: () => Promise<T>): Promise<T> {
  const saved = tf.env().get(FUSED_ADAMW_IMPL);
  tf.env().set(FUSED_ADAMW_IMPL, optimizer === 'reference-adamw' ? 'reference' : 'auto');
  try {
    return await fn();
  } finally {
    tf.env().set(FUSED_ADAMW_IMPL, saved);
  }
}

type NumericCounts = Omit<WebGPUCounts, 'uploadShapes'>;

function medianCounts(all: WebGPUCounts[]): NumericCounts {
  const keys = Object.keys(all[0]).filter(k => k !== 'uploadShapes') as Array<keyof NumericCounts>;
  return Object.fromEntries(keys.map(k => [k, median(all.map(c => c[k]))])) as unknown as
      NumericCounts;
}

/** `--tfjs-flags=NAME:value,NAME:value`: tfjs flags set before anything runs. */
function setTfjsFlags(): string[] {
  const set: string[] = [];
  for (const pair of option('tfjs-flags', '').split(',').filter(Boolean)) {
    const [name, value] = pair.split(':');
    const parsed = value === 'true' ? true :
        value === 'false'           ? false :
        Number.isNaN(Number(value)) ? value :
                                      Number(value);
    tf.env().set(name, parsed);
    set.push(`${name}=${parsed}`);
  }
  return set;
}

/**
 * queue.submit's time against the work in its command buffer: n dispatches
 * of a one-thread kernel, each with its own bind group (as tfjs records
 * them), then the same n without submitting in between (the whole batch
 * once), median of `reps` submits.
 */
async function submitCost(device: GPUDevice, reps: number): Promise<string[]> {
  const module = device.createShaderModule({
    code: `
@group(0) @binding(0) var<storage, read_write> data: array<f32>;
@compute @workgroup_size(1) fn main() { data[0] = data[0] + 1.0; }`
  });
  const pipeline =
      device.createComputePipeline({layout: 'auto', compute: {module, entryPoint: 'main'}});
  const buffers = Array.from(
      {length: 8},
      () => device.createBuffer(
          {size: 256, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC}));
  const lines: string[] = [];
  for (const n of [0, 1, 15, 100, 400, 1000]) {
    const submitMs: number[] = [];
    const encodeMs: number[] = [];
    for (let r = 0; r < reps; r++) {
      const t0 = performance.now();
      const encoder = device.createCommandEncoder();
      if (n > 0) {
        const pass = encoder.beginComputePass();
        pass.setPipeline(pipeline);
        for (let i = 0; i < n; i++) {
          pass.setBindGroup(0, device.createBindGroup({
            layout: pipeline.getBindGroupLayout(0),
            entries: [{binding: 0, resource: {buffer: buffers[i % 8]}}]
          }));
          pass.dispatchWorkgroups(1);
        }
        pass.end();
      }
      const commands = encoder.finish();
      const t1 = performance.now();
      device.queue.submit([commands]);
      const t2 = performance.now();
      encodeMs.push(t1 - t0);
      submitMs.push(t2 - t1);
    }
    await device.queue.onSubmittedWorkDone();
    lines.push(`submit cost, ${n} dispatches per command buffer: submit ${
        median(submitMs).toFixed(3)} ms (${
        (n > 0 ? median(submitMs) / n * 1000 : 0).toFixed(1)} us per dispatch), encode ${
        median(encodeMs).toFixed(3)} ms`);
  }
  // Dispatches on buffers created just before (tfjs's new outputs): WebGPU
  // zero-fills a buffer before its first use, work Dawn adds at submit.
  for (const n of [15, 100]) {
    const submitMs: number[] = [];
    for (let r = 0; r < reps; r++) {
      const fresh = Array.from(
          {length: n},
          () => device.createBuffer(
              {size: 1 << 16, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC}));
      const encoder = device.createCommandEncoder();
      const pass = encoder.beginComputePass();
      pass.setPipeline(pipeline);
      for (const buffer of fresh) {
        pass.setBindGroup(0, device.createBindGroup({
          layout: pipeline.getBindGroupLayout(0),
          entries: [{binding: 0, resource: {buffer}}]
        }));
        pass.dispatchWorkgroups(1);
      }
      pass.end();
      const commands = encoder.finish();
      const t0 = performance.now();
      device.queue.submit([commands]);
      submitMs.push(performance.now() - t0);
      fresh.forEach(b => b.destroy());
    }
    lines.push(`submit cost, ${n} dispatches on new 64 KiB buffers: submit ${
        median(submitMs).toFixed(3)} ms`);
  }
  // Many empty submits back to back: the fixed cost alone.
  const t0 = performance.now();
  for (let r = 0; r < 50; r++) {
    device.queue.submit([device.createCommandEncoder().finish()]);
  }
  lines.push(`submit cost, empty command buffer: ${
      ((performance.now() - t0) / 50).toFixed(3)} ms per submit`);
  await device.queue.onSubmittedWorkDone();
  buffers.forEach(b => b.destroy());
  return lines;
}

const COUNT_COLUMNS: Array<[keyof NumericCounts, string]> = [
  ['dispatches', 'GPU dispatches'],
  ['submits', 'submits'],
  ['submitMs', 'submit ms'],
  ['hostUploads', 'host uploads'],
  ['writeBuffers', 'writeBuffer'],
  ['buffersCreated', 'buffers created'],
  ['createBufferMs', 'createBuffer ms'],
  ['readBacks', 'read-backs'],
];

async function main() {
  const backend = await useBestBackend('webgpu');
  console.log(`backend: ${backend.description}`);
  const flags = setTfjsFlags();
  if (flags.length > 0) {
    console.log(`tfjs flags: ${flags.join(', ')}`);
  }
  const seq = Number(option('seq', TINY ? '32' : '1024'));
  const steps = Number(option('steps', TINY ? '2' : '4'));
  const batches = option('batches', TINY ? '1' : '1,4,16').split(',').map(Number);
  const impls = option('impls', 'flash,composed').split(',');
  const optimizers = option('optimizers', 'adam,fused-adamw').split(',');
  const cpuProfileOn = !process.argv.includes('--no-cpu-profile');
  const random = seededRandom(5);
  const data = Int32Array.from({length: 1 << 18}, () => Math.floor(random() * VOCAB));
  const rows: string[] = [];
  const table: string[] = [
    `| model | optimizer | batch x seq | step ms | enqueue (JS) ms | waiting ms | GPU busy (tfjs) ms | tfjs kernels | ${
        COUNT_COLUMNS.map(c => c[1]).join(' | ')} |`,
    `|${' --- |'.repeat(8 + COUNT_COLUMNS.length)}`,
  ];
  console.log(`GPT ${LAYERS} x ${WIDTH}, ${HEADS} heads, seq ${seq}`);
  if (process.argv.includes('--submit-cost')) {
    for (const line of await submitCost(backend.device!, TINY ? 5 : 20)) {
      console.log(line);
      rows.push(line);
    }
  }
  const submitBatches = option('submit-batches', '').split(',').filter(Boolean).map(Number);
  const stats: DawnStats = new Map();
  if (process.argv.includes('--trace-dawn')) {
    const device = backend.device!;
    const encoder = device.createCommandEncoder();
    const pass = encoder.beginComputePass();
    const buffer = device.createBuffer({size: 16, usage: GPUBufferUsage.STORAGE});
    traceWebGPU(
        [
          ['device', device], ['queue', device.queue], ['encoder', encoder], ['pass', pass],
          ['buffer', buffer]
        ],
        stats);
    pass.end();
    encoder.finish();
    buffer.destroy();
  }
  const counters = webgpuCounters();
  for (const impl of impls) {
    for (const optimizerName of optimizers) {
      await withOptimizerImpl(optimizerName, async () => {
        const label = `${impl} ${optimizerName}`;
        const model = buildGPT(
            {vocabSize: VOCAB, numLayers: LAYERS, embedDim: WIDTH, numHeads: HEADS},
            impl === 'flash' ? flashMHA : composedMHA, 'gpt', NORM);
        const optimizer = makeOptimizer(optimizerName);
        const vars = trainableVariables(model);
        const enqueueStep = (x: tf.Tensor2D, y: tf.Tensor2D) => optimizer.minimize(
            () => lossOf(
                model.apply(x, {training: true}) as tf.Tensor, y, VOCAB,
                NORM === 'fused' ? 'fused' : 'composed'),
            true, vars)!;
        for (const batch of batches) {
          const wall: number[] = [];
          const enqueue: number[] = [];
          const gpu: number[] = [];
          const counts: WebGPUCounts[] = [];
          const losses: number[] = [];
          for (let s = 0; s < 2 + steps; s++) {
            const {x, y} = sampleBatch(data, batch, seq, random);
            counters.reset();
            const t0 = performance.now();
            const loss = enqueueStep(x, y);
            const t1 = performance.now();
            losses.push((await loss.data())[0]);
            const t2 = performance.now();
            loss.dispose();
            if (s >= 2) {
              counts.push(counters.snapshot());
              wall.push(t2 - t0);
              enqueue.push(t1 - t0);
            }
            // GPU busy time of one more step (timestamp queries around each tfjs program).
            if (s >= 2 && s < 4) {
              let timedLoss: tf.Scalar|null = null;
              const info = await tf.time(() => {
                timedLoss = enqueueStep(x, y);
              });
              await (timedLoss as unknown as tf.Scalar).data();
              (timedLoss as unknown as tf.Scalar).dispose();
              if (typeof info.kernelMs === 'number') {
                gpu.push(info.kernelMs);
              }
            }
            tf.dispose([x, y]);
          }
          const {x, y} = sampleBatch(data, batch, seq, random);
          const profile = await tf.profile(() => enqueueStep(x, y));
          (profile.result as tf.Tensor).dispose();
          tf.dispose([x, y]);
          const c = medianCounts(counts);
          const gpuMs = gpu.length ? median(gpu).toFixed(1) : '-';
          const line = `${label} batch ${batch} x ${seq}: step ${
              median(wall).toFixed(1)} ms (enqueue ${median(enqueue).toFixed(1)} ms, then waiting ${
              median(wall.map((w, i) => w - enqueue[i]))
                  .toFixed(1)} ms), GPU busy (tfjs programs) ${gpuMs} ms; per step: ${
              profile.kernels.length} tfjs kernels, ${
              COUNT_COLUMNS
                  .map(([k, n]) => `${n} ${Number.isInteger(c[k]) ? c[k] : c[k].toFixed(1)}`)
                  .join(', ')}; steps ${wall.map(w => w.toFixed(0)).join(' ')}; losses ${
              losses.map(l => l.toFixed(4)).join(' ')}`;
          console.log(line);
          rows.push(line);
          const shapes =
              [...counts[counts.length - 1].uploadShapes.entries()].sort((a, b) => b[1] - a[1]);
          const uline = `${label} batch ${batch}: host uploads of the last step by shape: ${
              shapes.map(([k, n]) => `${k} ${n}`).join(', ') || 'none'}`;
          console.log(uline);
          rows.push(uline);
          table.push(`| ${impl} | ${optimizerName} | ${batch} x ${seq} | ${
              median(wall).toFixed(1)} | ${median(enqueue).toFixed(1)} | ${
              median(wall.map((w, i) => w - enqueue[i])).toFixed(1)} | ${gpuMs} | ${
              profile.kernels.length} | ${
              COUNT_COLUMNS.map(([k]) => Number.isInteger(c[k]) ? c[k] : c[k].toFixed(1))
                  .join(' | ')} |`);
        }
        for (const size of submitBatches) {
          const saved = tf.env().getNumber('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE');
          tf.env().set('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE', size);
          const wall: number[] = [];
          const counts: WebGPUCounts[] = [];
          for (let s = 0; s < 1 + steps; s++) {
            const {x, y} = sampleBatch(data, batches[0], seq, random);
            counters.reset();
            const t0 = performance.now();
            const loss = enqueueStep(x, y);
            await loss.data();
            if (s >= 1) {
              wall.push(performance.now() - t0);
              counts.push(counters.snapshot());
            }
            tf.dispose([x, y, loss]);
          }
          tf.env().set('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE', saved);
          const c = medianCounts(counts);
          const line = `${label} batch ${batches[0]} x ${seq}, WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE=${
              size}: step ${median(wall).toFixed(1)} ms, ${c.submits} submits (${
              c.submitMs.toFixed(1)} ms)`;
          console.log(line);
          rows.push(line);
        }
        // The most frequent kernels of one step, and a CPU profile of two steps, at the first batch
        // size.
        {
          const {x, y} = sampleBatch(data, batches[0], seq, random);
          const info = await tf.profile(() => enqueueStep(x, y));
          (info.result as tf.Tensor).dispose();
          const kernelCounts = new Map<string, number>();
          for (const k of info.kernels) {
            kernelCounts.set(k.name, (kernelCounts.get(k.name) ?? 0) + 1);
          }
          const top = [...kernelCounts.entries()].sort((a, b) => b[1] - a[1]).slice(0, 25);
          const line = `${label}: ${info.kernels.length} kernels per step; ${
              top.map(([n, k]) => `${n} ${k}`).join(', ')}`;
          console.log(line);
          rows.push(line);
          stats.clear();
          if (cpuProfileOn) {
            const profileTop = await cpuProfile(async () => {
              for (let s = 0; s < 2; s++) {
                const loss = enqueueStep(x, y);
                await loss.data();
                loss.dispose();
              }
            }, 40);
            const pline = `${label} CPU self time over 2 steps (ms): ${
                profileTop.map(([n, ms]) => `${n} ${ms.toFixed(1)}`).join('; ')}`;
            console.log(pline);
            rows.push(pline);
          }
          if (stats.size > 0) {
            const topCalls = [...stats.entries()].sort((a, b) => b[1].ms - a[1].ms).slice(0, 20);
            const dline = `${label} WebGPU calls over 2 steps (ms, calls): ${
                topCalls.map(([n, e]) => `${n} ${e.ms.toFixed(1)} (${e.calls})`).join('; ')}`;
            console.log(dline);
            rows.push(dline);
          }
          tf.dispose([x, y]);
        }
        const leakSteps = Number(option('leak-steps', '0'));
        if (leakSteps > 0) {
          const memory = () => {
            // With `node --expose-gc`, the heap is measured after a collection.
            (globalThis as {gc?: () => void}).gc?.();
            const m = tf.memory() as tf.MemoryInfo & {numBytesInGPU?: number};
            return {
              tensors: m.numTensors,
              gpuBytes: m.numBytesInGPU ?? 0,
              heapMB: process.memoryUsage().heapUsed / 2 ** 20
            };
          };
          const {x, y} = sampleBatch(data, batches[0], seq, random);
          const before = memory();
          const t0 = performance.now();
          for (let s = 0; s < leakSteps; s++) {
            const loss = enqueueStep(x, y);
            if (s % 10 === 9 || s === leakSteps - 1) {
              await loss.data();
            }
            loss.dispose();
          }
          const after = memory();
          const line = `${label} over ${leakSteps} more steps (${
              ((performance.now() - t0) / leakSteps).toFixed(1)} ms each): tensors ${
              before.tensors} -> ${after.tensors}, GPU bytes ${before.gpuBytes} -> ${
              after.gpuBytes}, JS heap ${before.heapMB.toFixed(1)} -> ${
              after.heapMB.toFixed(1)} MB`;
          console.log(line);
          rows.push(line);
          tf.dispose([x, y]);
        }
        optimizer.dispose();
        model.layers.forEach(l => l.dispose());
      });
    }
  }
  console.log('\n== summary ==\n' + rows.join('\n'));
  console.log('\n' + table.join('\n'));
}

main().then(() => process.exit(0), e => {
  console.error(e);
  process.exit(1);
});
