/**
 * Where a GPT training step's time goes on WebGPU (issue 5): for FlashMHA and
 * composed attention, per batch size, the step's wall time split into the
 * time JavaScript takes to enqueue it (optimizer.minimize returning) and
 * the wait for the GPU (the loss read-back), the GPU's busy time from
 * timestamp queries (tf.time's kernelMs; the package's own pipelines are
 * not counted there), the number of kernels per step and the most frequent
 * ones, and a CPU profile of the enqueue (self time per function).
 *
 *   node step_profile.mjs [--batches=1,4,16] [--seq=1024] [--steps=4] [--impls=flash,composed]
 *       [--submit-batches=15,200] [--trace-dawn]
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

import {flashMHA} from '../src/layers';
import {useBestBackend} from '../demo/backend';
import {buildGPT, lossOf, median, sampleBatch, seededRandom, trainableVariables} from '../demo/gpt';

import {composedMHA} from './composed_mha';
import {gptSize, option, VOCAB} from './gpt_options';

const {layers: LAYERS, width: WIDTH, heads: HEADS} = gptSize();

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
  const post = (method: string, params?: object) => new Promise<unknown>((resolve, reject) =>
    session.post(method, params ?? {}, (err, result) => err ? reject(err) : resolve(result)));
  await post('Profiler.enable');
  await post('Profiler.setSamplingInterval', {interval: 100});
  await post('Profiler.start');
  await fn();
  const {profile} = await post('Profiler.stop') as {profile: {nodes: CpuProfileNode[], startTime: number,
                                                               endTime: number, samples: number[]}};
  session.disconnect();
  const msPerSample = (profile.endTime - profile.startTime) / 1000 / Math.max(1, profile.samples.length);
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

async function main() {
  const backend = await useBestBackend('webgpu');
  console.log(`backend: ${backend.description}`);
  const seq = Number(option('seq', '1024'));
  const steps = Number(option('steps', '4'));
  const batches = option('batches', '1,4,16').split(',').map(Number);
  const impls = option('impls', 'flash,composed').split(',');
  const random = seededRandom(5);
  const data = Int32Array.from({length: 1 << 18}, () => Math.floor(random() * VOCAB));
  const rows: string[] = [];
  const submitBatches = option('submit-batches', '').split(',').filter(Boolean).map(Number);
  const stats: DawnStats = new Map();
  if (process.argv.includes('--trace-dawn')) {
    const device = backend.device!;
    const encoder = device.createCommandEncoder();
    const pass = encoder.beginComputePass();
    const buffer = device.createBuffer({size: 16, usage: GPUBufferUsage.STORAGE});
    traceWebGPU([['device', device], ['queue', device.queue], ['encoder', encoder], ['pass', pass],
                 ['buffer', buffer]], stats);
    pass.end();
    encoder.finish();
    buffer.destroy();
  }
  for (const impl of impls) {
    const model = buildGPT({vocabSize: VOCAB, numLayers: LAYERS, embedDim: WIDTH, numHeads: HEADS},
                           impl === 'flash' ? flashMHA : composedMHA, 'gpt');
    const optimizer = tf.train.adam(1e-4);
    const vars = trainableVariables(model);
    const enqueueStep = (x: tf.Tensor2D, y: tf.Tensor2D) =>
      optimizer.minimize(() => lossOf(model.apply(x, {training: true}) as tf.Tensor, y, VOCAB), true, vars)!;
    for (const batch of batches) {
      const wall: number[] = [];
      const enqueue: number[] = [];
      const gpu: number[] = [];
      for (let s = 0; s < 2 + steps; s++) {
        const {x, y} = sampleBatch(data, batch, seq, random);
        const t0 = performance.now();
        const loss = enqueueStep(x, y);
        const t1 = performance.now();
        await loss.data();
        const t2 = performance.now();
        loss.dispose();
        if (s >= 2) {
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
          gpu.push(info.kernelMs as number);
        }
        tf.dispose([x, y]);
      }
      const line = `${impl} batch ${batch} x ${seq}: step ${median(wall).toFixed(1)} ms (enqueue ${
          median(enqueue).toFixed(1)} ms, then waiting ${median(wall.map((w, i) => w - enqueue[i])).toFixed(1)} ms), GPU busy (tfjs programs) ${
          gpu.length ? median(gpu).toFixed(1) : '-'} ms; steps ${wall.map(w => w.toFixed(0)).join(' ')}`;
      console.log(line);
      rows.push(line);
    }
    for (const size of submitBatches) {
      const saved = tf.env().getNumber('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE');
      tf.env().set('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE', size);
      const wall: number[] = [];
      for (let s = 0; s < 1 + steps; s++) {
        const {x, y} = sampleBatch(data, batches[0], seq, random);
        const t0 = performance.now();
        const loss = enqueueStep(x, y);
        await loss.data();
        if (s >= 1) {
          wall.push(performance.now() - t0);
        }
        tf.dispose([x, y, loss]);
      }
      tf.env().set('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE', saved);
      const line = `${impl} batch ${batches[0]} x ${seq}, WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE=${size}: step ${
          median(wall).toFixed(1)} ms`;
      console.log(line);
      rows.push(line);
    }
    // Kernels of one step, and a CPU profile of two steps, at the first batch size.
    {
      const {x, y} = sampleBatch(data, batches[0], seq, random);
      const info = await tf.profile(() => enqueueStep(x, y));
      const counts = new Map<string, number>();
      for (const k of info.kernels) {
        counts.set(k.name, (counts.get(k.name) ?? 0) + 1);
      }
      const top = [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, 25);
      const line = `${impl}: ${info.kernels.length} kernels per step; ${top.map(([n, c]) => `${n} ${c}`).join(', ')}`;
      console.log(line);
      rows.push(line);
      stats.clear();
      const profileTop = await cpuProfile(async () => {
        for (let s = 0; s < 2; s++) {
          const loss = enqueueStep(x, y);
          await loss.data();
          loss.dispose();
        }
      }, 40);
      const pline = `${impl} CPU self time over 2 steps (ms): ${profileTop.map(([n, ms]) => `${n} ${ms.toFixed(1)}`).join('; ')}`;
      console.log(pline);
      rows.push(pline);
      if (stats.size > 0) {
        const top = [...stats.entries()].sort((a, b) => b[1].ms - a[1].ms).slice(0, 20);
        const dline = `${impl} WebGPU calls over 2 steps (ms, calls): ${top.map(([n, e]) => `${n} ${e.ms.toFixed(1)} (${
            e.calls})`).join('; ')}`;
        console.log(dline);
        rows.push(dline);
      }
      tf.dispose([x, y]);
    }
    optimizer.dispose();
    model.layers.forEach(l => l.dispose());
  }
  console.log('\n== summary ==\n' + rows.join('\n'));
}

main().then(() => process.exit(0), e => {
  console.error(e);
  process.exit(1);
});
