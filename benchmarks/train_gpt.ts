/**
 * Training a 6-layer, 512-wide GPT (8 heads of 64, RoPE, causal) on WebGPU
 * (Dawn, the device created with the adapter's limits). First, in one
 * process, the step time of three models with the same weights on the same
 * batches at sequence length 1024, with the GPU dispatches, queue submits
 * and host uploads of one step:
 *   stock tfjs     tf.layers.layerNormalization, composed attention,
 *                  tf.train.adam, composed cross-entropy
 *   FlashMHA only  the same with FlashMHA (norms: --flash-norm=gpt, the
 *                  demo's hand-written LayerNorm, or tfjs)
 *   all fused      fused LayerNorm with the residual adds, FlashMHA, fused
 *                  cross-entropy, fusedAdam
 * Then the longest sequence length (powers of 2, batch 1) at which one
 * training step with FlashMHA and with composed attention still runs
 * (--max=0 skips it).
 *
 * Run (on a GPU machine, bundled by scripts/device-bundle.sh):
 *   node train_gpt.mjs [--batch=4] [--seq=1024] [--steps=5] [--warmup=2]
 *       [--models=stock,flash,fused] [--step-seconds=100] [--deadline=200]
 *   node train_gpt.mjs --child=curve [--curve-steps=50] [--layers=2 --width=64 --seq=64]
 *       (the loss curves of the fused model, fused vs composed reference)
 *   node --expose-gc train_gpt.mjs --leak-steps=1000 [--every=100] [--leak-warmup=20]
 *       [--layers=1 --width=32 --heads=2 --batch=1 --seq=16] [--heap-tolerance-mb=8]
 *       (N fused steps; tf.memory() and the JS heap every --every steps;
 *       exit 1 when anything grew past the warm-up)
 * Each measurement runs in a child process of this script, so that running
 * out of memory (a WebGPU out-of-memory or validation error, a lost device,
 * a crash) ends only that child. Results: a table on stdout and
 * $OUT/train_gpt.json when OUT is set.
 */
import {spawn} from 'child_process';
import * as fs from 'fs';
import * as path from 'path';

import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';

import {FlashAttention, FlashAttentionGrad, FUSED_ADAMW_IMPL, fusedAdam, FusedNorm, hasFusedKernel} from '../src';
import {flashMHA} from '../src/layers';
import {useBestBackend} from '../demo/backend';
import {buildGPT, LossKind, median, NormKind, sampleBatch, seededRandom, trainableVariables, trainStep} from '../demo/gpt';

import {composedMHA} from './composed_mha';
import {webgpuCounters} from './webgpu_counters';
import {gptSize, option, VOCAB} from './gpt_options';

type Impl = 'flash'|'composed';

const {layers: LAYERS, width: WIDTH, heads: HEADS} = gptSize();
const MODEL_ARGS = [`--layers=${LAYERS}`, `--width=${WIDTH}`, `--heads=${HEADS}`];
const MAX_SEQ = Number(option('max', '131072'));

function report(kind: string, value: unknown) {
  console.log(`RESULT ${JSON.stringify({kind, ...value as object})}`);
}

function buildModel(impl: Impl): tfl.LayersModel {
  return buildGPT(
      {vocabSize: VOCAB, numLayers: LAYERS, embedDim: WIDTH, numHeads: HEADS},
      impl === 'flash' ? flashMHA : composedMHA, 'gpt');
}

/** Runs fn with WebGPU error scopes; resolves to the errors seen (none = it ran). */
async function withErrorScopes(
    device: GPUDevice, fn: () => Promise<number>): Promise<{loss: number, error: string | null}> {
  device.pushErrorScope('out-of-memory');
  device.pushErrorScope('validation');
  device.pushErrorScope('internal');
  let loss = NaN;
  let thrown: string|null = null;
  try {
    loss = await fn();
  } catch (e) {
    thrown = `exception: ${(e as Error).message}`.slice(0, 300);
  }
  const scoped: string[] = [];
  for (const kind of ['internal', 'validation', 'out-of-memory']) {
    try {
      const error = await device.popErrorScope();
      if (error != null) {
        scoped.push(`${kind}: ${error.message}`.slice(0, 300));
      }
    } catch (e) {  // A lost device rejects.
      scoped.push(`${kind} scope: ${(e as Error).message}`.slice(0, 300));
    }
  }
  const error = thrown ?? (scoped.length > 0 ? scoped.join(' | ') : null) ??
      (Number.isFinite(loss) ? null : `loss is ${loss}`);
  return {loss, error};
}

type Flavor = 'stock'|'flash'|'fused';
const FLAVORS: Flavor[] = ['stock', 'flash', 'fused'];
const FLAVOR_LABEL: Record<Flavor, string> = {
  stock: 'stock tfjs',
  flash: 'FlashMHA only',
  fused: 'all fused',
};
/** The FlashMHA-only model's norm: 'gpt' (demo/gpt.ts's LayerNorm, today's model) or 'tfjs'. */
const FLASH_NORM = option('flash-norm', 'gpt') as NormKind;

/**
 * The optimizer of the fused model. One-line switch: fusedAdam (one dispatch
 * per variable, no uploads) or tf.train.adam.
 */
const fusedOptimizer = (lr: number): tf.Optimizer => fusedAdam({learningRate: lr});

/**
 * stock: tf.layers.layerNormalization, composed attention, tf.train.adam,
 * composed loss; flash: the same with FlashMHA (and --flash-norm);
 * fused: fused norms with the residual adds, FlashMHA, fused cross-entropy
 * and the fused optimizer.
 */
function buildFlavor(flavor: Flavor, lr: number) {
  const config = {vocabSize: VOCAB, numLayers: LAYERS, embedDim: WIDTH, numHeads: HEADS};
  const model = flavor === 'stock' ? buildGPT(config, composedMHA, 'gpt', 'tfjs') :
      flavor === 'flash'           ? buildGPT(config, flashMHA, 'gpt', FLASH_NORM) :
                                     buildGPT(config, flashMHA, 'gpt', 'fused');
  const optimizer = flavor === 'fused' ? fusedOptimizer(lr) : tf.train.adam(lr);
  const loss: LossKind = flavor === 'fused' ? 'fused' : 'composed';
  return {model, optimizer, loss};
}

interface StepCounts {
  dispatches: number;
  submits: number;
  uploads: number;
  /** Host uploads by dtype and shape (where they come from). */
  uploadShapes: Record<string, number>;
}

/** Child: median step times of the three models (same weights, same batches, alternating). */
async function stepChild() {
  const batch = Number(option('batch', '4'));
  const seq = Number(option('seq', '1024'));
  const steps = Number(option('steps', '5'));
  const warmup = Number(option('warmup', '2'));
  const flavors = option('models', FLAVORS.join(',')).split(',') as Flavor[];
  const backend = await useBestBackend('webgpu');
  report('backend', {
    description: backend.description,
    gpu: backend.gpu,
    fusedForward: hasFusedKernel(FlashAttention, 'webgpu'),
    fusedBackward: hasFusedKernel(FlashAttentionGrad, 'webgpu'),
    fusedNorm: hasFusedKernel(FusedNorm, 'webgpu'),
    impl: tf.env().get('FLASH_ATTENTION_IMPL')
  });
  const counters = webgpuCounters();
  const random = seededRandom(7);
  const data = Int32Array.from({length: 1 << 16}, () => Math.floor(random() * VOCAB));
  const runs = flavors.map(flavor => ({
                             name: flavor,
                             ...buildFlavor(flavor, 1e-4),
                             vars: [] as tf.Variable[],
                             ms: [] as number[],
                             losses: [] as number[],
                             counts: [] as StepCounts[],
                           }));
  for (const run of runs.slice(1)) {
    run.model.setWeights(runs[0].model.getWeights());
  }
  runs.forEach(run => run.vars = trainableVariables(run.model));
  for (let step = 0; step < warmup + steps; step++) {
    const batchData = sampleBatch(data, batch, seq, random);
    // Each model uploads its own copy of the batch (counted in its step).
    const [xs, ys] = [batchData.x.dataSync(), batchData.y.dataSync()];
    tf.dispose([batchData.x, batchData.y]);
    for (const run of runs) {
      const x = tf.tensor2d(xs, [batch, seq], 'int32');
      const y = tf.tensor2d(ys, [batch, seq], 'int32');
      counters.reset();
      const t0 = performance.now();
      const result = await withErrorScopes(
          backend.device!,
          () => trainStep(run.model, run.optimizer, x, y, VOCAB, run.vars, run.loss));
      const ms = performance.now() - t0;
      if (result.error) {
        report('step-error', {impl: run.name, step, error: result.error});
        process.exit(2);
      }
      run.ms.push(ms);
      run.losses.push(result.loss);
      const c = counters.snapshot();
      run.counts.push({
        dispatches: c.dispatches,
        submits: c.submits,
        uploads: c.hostUploads,
        uploadShapes: Object.fromEntries(c.uploadShapes)
      });
      tf.dispose([x, y]);
    }
    console.log(`step ${step}${step < warmup ? ' (warm-up)' : ''}: ${
        runs.map(r => `${r.name} ${r.ms[step].toFixed(1)} ms loss ${r.losses[step].toFixed(4)}`)
            .join(', ')}`);
  }
  const last = (r: typeof runs[number]) => r.counts[r.counts.length - 1];
  report('steps', {
    batch,
    seq,
    steps,
    models: runs.map(r => ({
                       name: r.name,
                       medianMs: median(r.ms.slice(warmup)),
                       ms: r.ms,
                       losses: r.losses,
                       ...last(r),
                     }))
  });
  process.exit(0);
}

/**
 * --child=curve: the fused model trained --curve-steps steps (default 50)
 * with the fused kernels, then from the same weights on the same batches
 * with every op's composed reference (FLASH_ATTENTION_IMPL and
 * FUSED_ADAMW_IMPL = reference); prints both loss curves and the largest
 * relative difference. Use a small model (--layers, --width, --seq).
 */
async function curveChild() {
  const batch = Number(option('batch', '2'));
  const seq = Number(option('seq', '64'));
  const steps = Number(option('curve-steps', '50'));
  const backend = await useBestBackend('webgpu');
  const random = seededRandom(13);
  const data = Int32Array.from({length: 1 << 14}, () => Math.floor(random() * VOCAB));
  const batches = Array.from({length: steps}, () => sampleBatch(data, batch, seq, random));
  const initial = buildFlavor('fused', 1e-3).model;
  const curves: Record<string, number[]> = {};
  for (const impl of ['auto', 'reference']) {
    tf.env().set('FLASH_ATTENTION_IMPL', impl);
    tf.env().set(FUSED_ADAMW_IMPL, impl);
    const {model, optimizer, loss} = buildFlavor('fused', 1e-3);
    model.setWeights(initial.getWeights());
    const vars = trainableVariables(model);
    curves[impl] = [];
    for (const {x, y} of batches) {
      curves[impl].push(await trainStep(model, optimizer, x, y, VOCAB, vars, loss));
    }
    optimizer.dispose();
    model.dispose();
  }
  const diffs =
      curves.auto.map((l, i) => Math.abs(l - curves.reference[i]) / Math.abs(curves.reference[i]));
  const maxRelativeDifference = Math.max(...diffs);
  report('curve', {
    backend: backend.description,
    steps,
    batch,
    seq,
    fused: curves.auto,
    reference: curves.reference,
    maxRelativeDifference
  });
  console.log(`loss curves over ${
      steps} steps, fused vs composed reference: largest relative difference ${
      maxRelativeDifference.toExponential(2)} (first ${curves.auto[0].toFixed(4)}, last fused ${
      curves.auto[steps - 1].toFixed(4)} / reference ${curves.reference[steps - 1].toFixed(4)})`);
  process.exit(maxRelativeDifference < 1e-3 ? 0 : 3);
}

interface MemorySample {
  step: number;
  numTensors: number;
  numBytes: number;
  /** Bytes of the GPU buffers tfjs's tensors use, and that its pool holds. */
  gpuBytes: number;
  gpuBytesAllocated: number;
  heapMB: number;
}

function memorySample(step: number): MemorySample {
  // With `node --expose-gc` the heap is measured after a full collection.
  (globalThis as {gc?: () => void}).gc?.();
  const m =
      tf.memory() as tf.MemoryInfo & {numBytesInGPU?: number, numBytesAllocatedInGPU?: number};
  return {
    step,
    numTensors: m.numTensors,
    numBytes: m.numBytes,
    gpuBytes: m.numBytesInGPU ?? 0,
    gpuBytesAllocated: m.numBytesAllocatedInGPU ?? 0,
    heapMB: process.memoryUsage().heapUsed / 2 ** 20,
  };
}

/**
 * --leak-steps=N: N steps of the fused model (new batch each step, loss
 * read back each step), a memory sample every --every steps. After
 * --leak-warmup steps (the optimizer's state, tfjs's buffer pool and
 * program cache filled), the tensor count and bytes and the GPU bytes in
 * use must stay exactly where they are, the pool must not grow, and the
 * JS heap (the lowest of the last three samples) must stay within
 * --heap-tolerance-mb. Exit 1 otherwise; then everything is disposed and
 * the tensor count must be back where it started.
 */
async function leakRun(steps: number) {
  const batch = Number(option('batch', '1'));
  const seq = Number(option('seq', '16'));
  const every = Number(option('every', '100'));
  const warmup = Number(option('leak-warmup', '20'));
  const heapTolerance = Number(option('heap-tolerance-mb', '8'));
  const backend = await useBestBackend('webgpu');
  console.log(`leak run: ${backend.description}; fused GPT ${LAYERS} x ${WIDTH}, ${
      HEADS} heads, batch ${batch} x seq ${seq}, ${steps} steps (warm-up ${warmup})`);
  const start = memorySample(0);
  const {model, optimizer, loss} = buildFlavor('fused', 1e-3);
  const vars = trainableVariables(model);
  const random = seededRandom(17);
  const data = Int32Array.from({length: 1 << 14}, () => Math.floor(random() * VOCAB));
  const samples: MemorySample[] = [];
  const t0 = performance.now();
  let last = NaN;
  for (let step = 1; step <= steps; step++) {
    const {x, y} = sampleBatch(data, batch, seq, random);
    last = await trainStep(model, optimizer, x, y, VOCAB, vars, loss);
    tf.dispose([x, y]);
    if (!Number.isFinite(last)) {
      console.log(`step ${step}: loss ${last}`);
      process.exit(1);
    }
    if (step === warmup || step % every === 0 || step === steps) {
      const sample = memorySample(step);
      samples.push(sample);
      console.log(`step ${step}: loss ${last.toFixed(4)}, tensors ${sample.numTensors}, bytes ${
          sample.numBytes}, GPU bytes ${sample.gpuBytes} (pool ${
          sample.gpuBytesAllocated}), JS heap ${sample.heapMB.toFixed(1)} MB, ${
          ((performance.now() - t0) / step).toFixed(0)} ms/step so far`);
    }
  }
  const base = samples.find(s => s.step === warmup) ?? samples[0];
  const after = samples.filter(s => s.step > base.step);
  const problems: string[] = [];
  for (const key of ['numTensors', 'numBytes', 'gpuBytes'] as const) {
    const changed = after.find(s => s[key] !== base[key]);
    if (changed != null) {
      problems.push(
          `${key} ${base[key]} at step ${base.step} -> ${changed[key]} at step ${changed.step}`);
    }
  }
  const poolGrew = after.find(s => s.gpuBytesAllocated > base.gpuBytesAllocated);
  if (poolGrew != null) {
    problems.push(`GPU pool ${base.gpuBytesAllocated} -> ${poolGrew.gpuBytesAllocated} at step ${
        poolGrew.step}`);
  }
  const heapLate = Math.min(...after.slice(-3).map(s => s.heapMB));
  if (after.length > 0 && heapLate > base.heapMB + heapTolerance) {
    problems.push(`JS heap ${base.heapMB.toFixed(1)} MB -> ${heapLate.toFixed(1)} MB (tolerance ${
        heapTolerance} MB)`);
  }
  optimizer.dispose();
  model.dispose();
  const end = memorySample(steps);
  if (end.numTensors !== start.numTensors) {
    problems.push(`after dispose: ${end.numTensors} tensors, ${start.numTensors} before the run`);
  }
  console.log(`after dispose: tensors ${end.numTensors} (before the run ${
      start.numTensors}), GPU bytes ${end.gpuBytes}`);
  if (!(globalThis as {gc?: () => void}).gc) {
    console.log('(no --expose-gc: heap samples include garbage not yet collected)');
  }
  console.log(
      problems.length === 0 ? `no growth over ${steps} steps after the ${warmup}-step warm-up` :
                              `GROWTH: ${problems.join('; ')}`);
  process.exit(problems.length === 0 ? 0 : 1);
}

/** Child: one training step per length, doubling from --from, until one fails. */
async function oomChild() {
  const impl = option('impl', 'flash') as Impl;
  let seq = Number(option('from', '1024'));
  const backend = await useBestBackend('webgpu');
  const model = buildModel(impl);
  const optimizer = tf.train.adam(1e-4);
  const vars = trainableVariables(model);
  const random = seededRandom(11);
  const seconds = Number(option('seconds', '100'));
  const start = performance.now();
  let lastMs = 0;
  for (; seq <= MAX_SEQ; seq *= 2) {
    // Step time grows 2-4x per doubling: skip a step that cannot end in time.
    const elapsed = (performance.now() - start) / 1000;
    if (lastMs > 0 && elapsed + 2.5 * lastMs / 1000 > seconds) {
      report('stop', {
        impl,
        seq,
        reason: `time: the step at ${seq} would need about ${(2.5 * lastMs / 1000).toFixed(0)} s, ${
            (seconds - elapsed).toFixed(0)} s left`
      });
      break;
    }
    const data = Int32Array.from({length: seq + 2}, () => Math.floor(random() * VOCAB));
    const {x, y} = sampleBatch(data, 1, seq, random);
    const t0 = performance.now();
    const result = await withErrorScopes(
        backend.device!, () => trainStep(model, optimizer, x, y, VOCAB, vars));
    const ms = performance.now() - t0;
    lastMs = ms;
    tf.dispose([x, y]);
    // Bytes of GPU buffers tfjs holds (in use or pooled): about the peak.
    const memory = tf.memory() as {numBytesAllocatedInGPU?: number};
    report('probe', {
      impl,
      seq,
      ok: result.error == null,
      ms,
      loss: result.loss,
      error: result.error,
      gpuBytesAllocated: memory.numBytesAllocatedInGPU ?? null
    });
    if (result.error != null) {
      break;
    }
  }
  process.exit(0);
}

interface ChildOutcome {
  results: Array<Record<string, unknown>>;
  code: number|null;
  signal: string|null;
  timedOut: boolean;
  stderrTail: string;
}

/** Runs this script as a child; kills it after `seconds`. */
function child(args: string[], seconds: number, log: (s: string) => void): Promise<ChildOutcome> {
  return new Promise(resolve => {
    const proc =
        spawn(process.execPath, [process.argv[1], ...args], {stdio: ['ignore', 'pipe', 'pipe']});
    const results: Array<Record<string, unknown>> = [];
    let stderr = '';
    let timedOut = false;
    let buffered = '';
    proc.stdout.on('data', chunk => {
      buffered += chunk;
      let nl: number;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        log(`  [${args.join(' ')}] ${line}`);
        if (line.startsWith('RESULT ')) {
          results.push(JSON.parse(line.slice(7)));
        }
      }
    });
    proc.stderr.on('data', chunk => {
      stderr = (stderr + chunk).slice(-2000);
    });
    const timer = setTimeout(() => {
      timedOut = true;
      proc.kill('SIGKILL');
    }, seconds * 1000);
    proc.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve(
          {results, code, signal, timedOut, stderrTail: stderr.split('\n').slice(-6).join('\n')});
    });
  });
}

async function parent() {
  const start = performance.now();
  const deadline = Number(option('deadline', '200'));
  const left = () => deadline - (performance.now() - start) / 1000;
  const lines: string[] = [];
  const log = (s: string) => {
    console.log(s);
    lines.push(s);
  };
  const summary: Record<string, unknown> =
      {date: new Date().toISOString(), layers: LAYERS, width: WIDTH, heads: HEADS, vocab: VOCAB};
  const stepArgs = [
    '--child=step', ...MODEL_ARGS, `--batch=${option('batch', '4')}`,
    `--seq=${option('seq', '1024')}`, `--steps=${option('steps', '5')}`,
    `--warmup=${option('warmup', '2')}`, `--models=${option('models', FLAVORS.join(','))}`,
    `--flash-norm=${FLASH_NORM}`
  ];
  const steps = await child(stepArgs, Math.min(Number(option('step-seconds', '100')), left()), log);
  summary.step = {
    results: steps.results,
    code: steps.code,
    timedOut: steps.timedOut,
    stderr: steps.code === 0 ? undefined : steps.stderrTail
  };
  const probes: Record<Impl, Array<Record<string, unknown>>> = {flash: [], composed: []};
  const stops: Record<Impl, string> = {flash: '', composed: ''};
  for (const impl of ['composed', 'flash'] as Impl[]) {
    let from = Number(option('from', '1024'));
    // A crashed or killed child ends its series: note how, and continue from the next length.
    while (left() > 15 && from <= MAX_SEQ) {
      const seconds = Math.min(impl === 'composed' ? 45 : 110, left() - 5);
      const outcome = await child(
          [
            `--child=oom`, ...MODEL_ARGS, `--max=${MAX_SEQ}`, `--impl=${impl}`, `--from=${from}`,
            `--seconds=${Math.floor(seconds - 8)}`
          ],
          seconds, log);
      const got = outcome.results.filter(r => r.kind === 'probe');
      probes[impl].push(...got);
      const stop = outcome.results.find(r => r.kind === 'stop');
      if (stop != null) {
        stops[impl] = String(stop.reason);
        break;
      }
      const last = got[got.length - 1];
      if (last != null && last.ok === false) {
        stops[impl] = `error at ${last.seq}`;
        break;
      }
      const next = last == null ? from : (last.seq as number) * 2;
      if (outcome.timedOut) {
        stops[impl] = `time limit during the step at ${next}`;
        probes[impl].push(
            {impl, seq: next, ok: false, error: 'time limit (not memory)', timeLimit: true});
        break;
      }
      if (outcome.code !== 0) {
        stops[impl] = `process ended (code ${outcome.code}, signal ${outcome.signal}) at ${next}`;
        probes[impl].push(
            {impl, seq: next, ok: false, error: `crash: ${outcome.stderrTail.slice(-300)}`});
        break;
      }
      from = next;
      if (got.length === 0) {
        break;
      }
    }
  }
  summary.probes = probes;
  const longest = (impl: Impl) =>
      Math.max(0, ...probes[impl].filter(p => p.ok).map(p => p.seq as number));
  summary.longest = {flash: longest('flash'), composed: longest('composed'), stops};

  log('');
  const backend = steps.results.find(r => r.kind === 'backend');
  const timing = steps.results.find(r => r.kind === 'steps');
  log(`device: ${backend?.description}; fused attention forward/backward registered: ${
      backend?.fusedForward}/${backend?.fusedBackward}, fused norm: ${backend?.fusedNorm}`);
  if (timing) {
    type ModelResult = {
      name: Flavor,
      medianMs: number,
      dispatches: number,
      submits: number,
      uploads: number,
      losses: number[]
    };
    const models = timing.models as ModelResult[];
    const stock = models.find(m => m.name === 'stock');
    const flash = models.find(m => m.name === 'flash');
    log(`| GPT ${LAYERS}x${WIDTH}, ${HEADS} heads, batch ${timing.batch} x seq ${
        timing.seq} (median of ${
        timing
            .steps}) | step | vs stock | vs FlashMHA only | dispatches | submits | uploads | last loss |`);
    log('| --- | --- | --- | --- | --- | --- | --- | --- |');
    for (const m of models) {
      log(`| ${FLAVOR_LABEL[m.name]} | ${m.medianMs.toFixed(1)} ms | ${
          stock ? (stock.medianMs / m.medianMs).toFixed(2) + 'x' : '-'} | ${
          flash ? (flash.medianMs / m.medianMs).toFixed(2) + 'x' : '-'} | ${m.dispatches} | ${
          m.submits} | ${m.uploads} | ${m.losses[m.losses.length - 1].toFixed(4)} |`);
    }
    for (const m of models) {
      log(`${FLAVOR_LABEL[m.name]}: uploads by shape ${
          JSON.stringify((m as {uploadShapes?: object}).uploadShapes)}`);
    }
  } else {
    log(`step comparison failed: ${
        JSON.stringify(steps.results.filter(r => r.kind === 'step-error'))} ${steps.stderrTail}`);
  }
  log(`| GPT ${LAYERS}x${WIDTH} | FlashMHA | composed | ratio |`);
  log('| --- | --- | --- | --- |');
  const fl = longest('flash');
  const co = longest('composed');
  log(`| longest seq, batch 1, one step runs | ${fl} (${stops.flash || 'not reached'}) | ${co} (${
      stops.composed || 'not reached'}) | ${co > 0 ? (fl / co).toFixed(0) : '-'}x longer |`);
  for (const impl of ['flash', 'composed'] as Impl[]) {
    log(`${impl} probes: ${
        probes[impl]
            .map(
                p => `${p.seq}:${
                    p.ok ? `${(p.ms as number).toFixed(0)}ms` : String(p.error).slice(0, 120)}`)
            .join('  ')}`);
  }
  if (process.env.OUT) {
    fs.writeFileSync(
        path.join(process.env.OUT, 'train_gpt.json'), JSON.stringify(summary, null, 1));
    fs.writeFileSync(path.join(process.env.OUT, 'train_gpt.log'), lines.join('\n') + '\n');
  }
  process.exit(0);
}

const role = option('child', '');
const leakSteps = Number(option('leak-steps', '0'));
(leakSteps > 0        ? leakRun(leakSteps) :
     role === 'step'  ? stepChild() :
     role === 'oom'   ? oomChild() :
     role === 'curve' ? curveChild() :
                        parent())
    .catch(error => {
      console.error(error);
      process.exit(1);
    });
