/**
 * Padded batches on the fused path (issue 18), in Node on Dawn. Rows, in
 * order of importance (a run cut by --deadline-s loses the last ones):
 *   1. attention alone, fwd+bwd: 16 sequences with lengths uniform in
 *      [64, 1024] (seeded), H=16, D=64: flashAttentionVarlen (packed) vs
 *      the padded op at S=1024 (no lengths: every padded token computed)
 *      vs the composed masked path (FlashMHA's key padding mask before
 *      this issue: src/layers/masked_attention.ts); then the padded op
 *      with seqlensQ/seqlensK and with keyPaddingMask, and the real
 *      tokens' share of the padded work (the "proportional" target).
 *   2. encoder blocks (attention + residual + layer norm + MLP, E = H * D)
 *      with a key padding mask, fwd+bwd, non-causal then causal: FlashMHA
 *      with the mask fused vs the composed masked path (before); and the
 *      Keras MultiHeadAttention layer (the loader's) with attention_mask
 *      [B, 1, Sk] (a padding mask: fused) vs the same mask as [B, Sq, Sk]
 *      (rows it cannot check without a read: composed).
 * Each row prints its line (stdout) as soon as it is measured, with its
 * per call device-independent counts (dispatches, submits, host uploads,
 * buffers created) and the synchronous reads seen in its timed loop (must
 * be 0); progress with the elapsed time goes to stderr; the tables come
 * last, rows cut by the deadline marked as skipped.
 *
 * Timing (docs/design.md, "Performance method"): one call compiles, one
 * counted call estimates a call's time; a warm-up runs until two calls
 * agree within 5% (at most --warmup-ms and a quarter of the row's
 * budget); then the median of batches of repetitions, read back once per
 * batch. Reps and batches shrink for slow rows so a row stays within its
 * budget: --row-s, or the time left before --deadline-s shared by the
 * rows left.
 *
 *   node varlen.mjs [--smoke] [--reps N] [--batches N] [--warmup-ms MS]
 *     [--row-s S] [--deadline-s S]
 *     (--smoke: tiny shapes, for SwiftShader)
 */

import * as tf from '@tensorflow/tfjs-core';
import type {LayerVariable} from '@tensorflow/tfjs-layers';

import {Rng} from '../test/harness/problems';

import {webgpuCounters} from './webgpu_counters';
import {adapterName, openWebGPUDevice, useWebGPUBackend} from './webgpu_setup';

const smoke = process.argv.includes('--smoke');
function numArg(name: string, fallback: number): number {
  const i = process.argv.indexOf(name);
  if (i < 0) {
    return fallback;
  }
  const value = Number(process.argv[i + 1]);
  if (!Number.isFinite(value) || value < 0) {
    throw new Error(`${name} must be a number >= 0, got ${process.argv[i + 1]}`);
  }
  return value;
}
const maxReps = Math.max(1, numArg('--reps', smoke ? 1 : 5));
const maxBatches = Math.max(1, numArg('--batches', smoke ? 1 : 5));
const warmupMs = numArg('--warmup-ms', smoke ? 0 : 1500);
const rowBudgetMs = 1000 * numArg('--row-s', smoke ? 600 : 8);
const deadlineMs = 1000 * numArg('--deadline-s', smoke ? 600 : 80);
/** Lists each row's counted call: programs and kernels by name, uploads by shape. */
const profile = process.argv.includes('--profile');
/** Fewest timed batches of a row (its median needs a few). */
const minBatches = Math.min(3, maxBatches);

const start = performance.now();
const elapsedMs = () => performance.now() - start;
const timeLeftMs = () => deadlineMs - elapsedMs();
function progress(message: string): void {
  console.error(`[${(elapsedMs() / 1000).toFixed(1)} s] ${message}`);
}

/**
 * Synchronous reads of GPU data (backend.readSync of a tensor whose values
 * are not in host memory: a wait on the GPU) since the counter was
 * installed. Host reads (tfjs's CPU forwarding of small ops) are free and
 * not counted.
 */
let syncReads = 0;
function countSyncReads(): void {
  const backend = tf.backend() as unknown as {
    readSync: (dataId: object) => unknown,
    tensorMap: {get(dataId: object): {values?: unknown} | undefined},
  };
  const readSync = backend.readSync;
  backend.readSync = function(this: unknown, dataId: object) {
    if (backend.tensorMap.get(dataId)?.values == null) {
      syncReads++;
    }
    return readSync.call(this, dataId);
  };
}

/** tfjs programs run and engine kernels called, by name (for --profile). */
const programCounts = new Map<string, number>();
const kernelCounts = new Map<string, number>();
function countByName(): void {
  const add = (m: Map<string, number>, name: string) => m.set(name, (m.get(name) ?? 0) + 1);
  const backend = tf.backend() as unknown as {runWebGPUProgram: (...args: unknown[]) => unknown};
  const run = backend.runWebGPUProgram;
  backend.runWebGPUProgram = function(this: unknown, ...args: unknown[]) {
    add(programCounts, (args[0] as object).constructor.name);
    return run.apply(this, args);
  };
  const engine = tf.engine() as unknown as {runKernel: (...args: unknown[]) => unknown};
  const runKernel = engine.runKernel;
  engine.runKernel = function(this: unknown, ...args: unknown[]) {
    add(kernelCounts, args[0] as string);
    return runKernel.apply(this, args);
  };
}

interface Timing {
  /** Median ms per call; null when the deadline came before a timed batch. */
  ms: number|null;
  /** Synchronous GPU reads during the timed batches (all of them). */
  syncReads: number;
  /** Per call, from one counted call: dispatches, submits, uploads, buffers. */
  counts: string;
  /** Calls timed: `reps x batches`. */
  calls: string;
}

/** Waits for every queued GPU command: reads one element of the last output. */
async function sync(ts: tf.Tensor[]): Promise<void> {
  const probe = tf.tidy(() => tf.slice(tf.reshape(ts[ts.length - 1], [-1]), 0, 1));
  await probe.data();
  probe.dispose();
}

/**
 * Median ms per call of `f` within about `budgetMs` (compilation aside);
 * its counts only when the deadline passes before a batch is timed.
 */
async function timeIt(f: () => tf.Tensor[], budgetMs: number): Promise<Timing> {
  const t0 = performance.now();
  const first = f();
  await sync(first);
  tf.dispose(first);
  progress(`  first call (compiles): ${(performance.now() - t0).toFixed(0)} ms`);
  const counters = webgpuCounters();
  programCounts.clear();
  kernelCounts.clear();
  const t1 = performance.now();
  const counted = f();
  const c = counters.snapshot();
  await sync(counted);
  tf.dispose(counted);
  const callMs = performance.now() - t1;
  const counts = `${c.dispatches} / ${c.submits} / ${c.hostUploads} / ${c.buffersCreated}`;
  if (profile) {
    const top = (m: Map<string, number>) => [...m]
                                                .sort((a, b) => b[1] - a[1])
                                                .map(([name, n]) => `${name} x${n}`)
                                                .join(', ');
    progress(`  programs: ${top(programCounts)}`);
    progress(`  kernels: ${top(kernelCounts)}`);
    progress(`  uploads by shape: ${top(c.uploadShapes)}`);
  }
  const batch = async (reps: number) => {
    const b0 = performance.now();
    for (let r = 0; r < reps; r++) {
      const out = f();
      if (r === reps - 1) {
        await sync(out);
      }
      tf.dispose(out);
    }
    return (performance.now() - b0) / reps;
  };
  // Warm-up, one call at a time, bounded by time whatever the agreement.
  const w0 = performance.now();
  const warmupLimit = Math.min(warmupMs, budgetMs / 4, timeLeftMs());
  let previous = callMs;
  let estimate = callMs;
  while (performance.now() - w0 < warmupLimit) {
    estimate = await batch(1);
    if (Math.abs(estimate - previous) <= 0.05 * previous) {
      break;
    }
    previous = estimate;
  }
  const measureMs = Math.min(budgetMs - (performance.now() - w0), timeLeftMs());
  const fit = Math.floor(measureMs / Math.max(estimate, 1e-3));
  const batches = Math.max(minBatches, Math.min(maxBatches, fit));
  const reps = Math.max(1, Math.min(maxReps, Math.floor(fit / batches)));
  const readsBefore = syncReads;
  const times: number[] = [];
  for (let b = 0; b < batches; b++) {
    if (timeLeftMs() <= 0 && times.length > 0) {
      break;
    }
    if (timeLeftMs() <= 0) {
      return {ms: null, syncReads: 0, counts, calls: '0'};
    }
    times.push(await batch(reps));
  }
  times.sort((a, b) => a - b);
  return {
    ms: times[Math.floor(times.length / 2)],
    syncReads: syncReads - readsBefore,
    counts,
    calls: `${reps} x ${times.length}`,
  };
}

async function setup(): Promise<string> {
  const device = await openWebGPUDevice({features: ['subgroups']});
  await import('@tensorflow/tfjs-layers');  // the core ops' gradients
  await useWebGPUBackend(device);
  return adapterName(device.adapter);
}

interface Row {
  table: string;
  label: string;
  /** The row this one's speed-up is measured against (this ms / its ms). */
  versus?: string;
  timing?: Timing|null;
}

/** The rows in the order they run; a table's header names its speed-up. */
const rows: Row[] = [];
const tableSpeedUp = new Map<string, string>();

function formatRow(row: Row): string {
  const t = row.timing;
  if (t == null) {
    return `| ${row.label} | skipped (deadline) | | | | |`;
  }
  if (t.ms == null) {
    return `| ${row.label} | not timed (deadline) | | ${t.counts} | 0 | |`;
  }
  const base = rows.find(r => r.table === row.table && r.label === row.versus)?.timing?.ms;
  const ratio = base == null ? '' : `${(t.ms / base).toFixed(2)}x`;
  return `| ${row.label} | ${t.ms.toFixed(3)} | ${ratio} | ${t.counts} | ${t.calls} | ${
      t.syncReads} |`;
}

/** Rows left to measure, for sharing the time left. */
let rowsLeft = 0;

/** Measures `f` as `row` unless the deadline has passed; prints its line. */
async function measure(row: Row, f: () => tf.Tensor[]): Promise<void> {
  rows.push(row);
  const budget = Math.min(rowBudgetMs, timeLeftMs() / Math.max(1, rowsLeft));
  rowsLeft--;
  if (timeLeftMs() <= 0) {
    progress(`skipped (deadline): ${row.table}: ${row.label}`);
    return;
  }
  progress(`start: ${row.table}: ${row.label} (budget ${(budget / 1000).toFixed(1)} s)`);
  row.timing = await timeIt(f, budget);
  progress(`done: ${row.table}: ${row.label}`);
  console.log(`${row.table}: ${formatRow(row)}`);
}

/** Records rows that will not run (their section's setup is past the deadline). */
function skip(table: string, labels: string[]): void {
  for (const label of labels) {
    rows.push({table, label, timing: null});
    rowsLeft--;
    progress(`skipped (deadline): ${table}: ${label}`);
  }
}

function printTables(notes: Map<string, string>): void {
  const lines: string[] = [];
  for (const table of new Set(rows.map(r => r.table))) {
    lines.push(
        '',
        `| ${table} | ms | ${tableSpeedUp.get(table)} | ` +
            'dispatches / submits / uploads / buffers created per call | calls timed | ' +
            'sync reads |',
        '| --- | --- | --- | --- | --- | --- |');
    lines.push(...rows.filter(r => r.table === table).map(formatRow));
    const note = notes.get(table);
    if (note != null) {
      lines.push(note);
    }
  }
  console.log(lines.join('\n'));
}

async function main(): Promise<void> {
  const deviceName = await setup();
  countSyncReads();
  if (profile) {
    countByName();
  }
  const fa = await import('../src/index');
  const layers = await import('../src/layers');
  const {MultiHeadAttention} = await import('../src/layers/multi_head_attention');
  const tfl = await import('@tensorflow/tfjs-layers');
  const {checkOwnPipelineErrors} = await import('../kernels/webgpu/own_pipeline');

  const batch = numArg('--batch', smoke ? 4 : 16);
  const minLen = numArg('--min-len', smoke ? 8 : 64);
  const maxLen = numArg('--max-len', smoke ? 32 : 1024);
  const heads = numArg('--heads', smoke ? 2 : 16);
  const dim = numArg('--dim', smoke ? 16 : 64);
  // A fixed seed: every run draws the same lengths.
  const random = new Rng(18);
  const lengths = Array.from({length: batch}, () => random.int(minLen, maxLen));
  const total = lengths.reduce((a, b) => a + b, 0);
  const cu = [0];
  lengths.forEach(l => cu.push(cu[cu.length - 1] + l));
  console.log(
      `device: ${deviceName}; ${batch} sequences, lengths in [${minLen}, ${maxLen}] ` +
      `(total ${total} of ${batch * maxLen} padded: ${
          (100 * total / (batch * maxLen)).toFixed(1)}%), ` +
      `H=${heads} D=${dim}; deadline ${deadlineMs / 1000} s`);
  const notes = new Map<string, string>();
  const attention = 'attention fwd+bwd';
  tableSpeedUp.set(attention, 'varlen speed-up');
  rowsLeft = 5 + 4 * 2;

  // 1. Attention alone, fwd+bwd (loss = sum(out * dy)). The padded inputs
  // are the packed ones padded on the device (fewer host random draws).
  const q = tf.randomNormal([total, heads, dim]) as tf.Tensor3D;
  const k = tf.randomNormal([total, heads, dim]) as tf.Tensor3D;
  const v = tf.randomNormal([total, heads, dim]) as tf.Tensor3D;
  const dyPacked = tf.randomNormal([total, heads, dim]);
  const cuSeqlens = tf.tensor1d(cu, 'int32');
  const seqlens = tf.tensor1d(lengths, 'int32');
  const flatIndex = tf.tensor1d(
      lengths.flatMap((l, b) => Array.from({length: l}, (_, s) => b * maxLen + s)), 'int32');
  const [qp, kp, vp, dyPadded] =
      [q, k, v, dyPacked].map(t => fa.padInput(t, flatIndex, batch, maxLen) as tf.Tensor4D);
  // Computed on the GPU (no CPU forwarding of small ops), as a model's
  // mask is: no path may read it back.
  const cpuForward = tf.env().getBool('WEBGPU_CPU_FORWARD');
  tf.env().set('WEBGPU_CPU_FORWARD', false);
  const keyMask = tf.tidy(
      () => tf.less(
          tf.reshape(tf.range(0, maxLen, 1, 'int32'), [1, maxLen]),
          tf.reshape(seqlens, [batch, 1])));
  tf.env().set('WEBGPU_CPU_FORWARD', cpuForward);
  progress('inputs ready');
  // dy is the upstream gradient (the gradient of sum(out * dy)): a loss
  // `sum(out * dy)` would add Sum's gradient, `ones(out.shape)` made on the
  // host, an upload of the output's size per call.
  const gradsOf =
      (f: (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => tf.Tensor, dy: tf.Tensor, x: tf.Tensor[]) =>
          () => tf.grads(f)(x, dy);
  const opts = {maxSeqlenQ: maxLen, maxSeqlenK: maxLen};
  const varlenLabel = 'flashAttentionVarlen (packed)';
  await measure(
      {table: attention, label: varlenLabel},
      gradsOf(
          (a, b, c) => fa.flashAttentionVarlen(
              a as tf.Tensor3D, b as tf.Tensor3D, c as tf.Tensor3D, cuSeqlens, cuSeqlens, opts),
          dyPacked, [q, k, v]));
  const padded4 = (f: (a: tf.Tensor4D, b: tf.Tensor4D, c: tf.Tensor4D) => tf.Tensor) => gradsOf(
      (a, b, c) => f(a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D), dyPadded, [qp, kp, vp]);
  await measure(
      {table: attention, label: `padded op, S=${maxLen}, no lengths`, versus: varlenLabel},
      padded4((a, b, c) => fa.flashAttention(a, b, c)));
  await measure(
      {table: attention, label: 'composed masked path (before)', versus: varlenLabel},
      padded4((a, b, c) => layers.maskedAttention(a, b, c, {keyMask})));
  await measure(
      {table: attention, label: 'padded op + seqlensQ/seqlensK', versus: varlenLabel},
      padded4((a, b, c) => fa.flashAttention(a, b, c, {seqlensQ: seqlens, seqlensK: seqlens})));
  await measure(
      {table: attention, label: 'padded op + keyPaddingMask', versus: varlenLabel},
      padded4((a, b, c) => fa.flashAttention(a, b, c, {keyPaddingMask: keyMask})));
  await checkOwnPipelineErrors();
  const realShare = lengths.reduce((a, l) => a + l * l, 0) / (batch * maxLen * maxLen);
  notes.set(
      attention,
      `| real tokens' share of the padded work (sum l^2 / B S^2) | ${realShare.toFixed(3)} | ` +
          `ideal ${(1 / realShare).toFixed(2)}x | | | |`);
  tf.dispose([q, k, v, dyPacked, kp, vp, flatIndex]);

  // 2. Encoder blocks with a key padding mask, fwd+bwd; the input and its
  // gradient are the padded q and dy seen as [B, S, E].
  const embed = heads * dim;
  const x = tf.reshape(qp, [batch, maxLen, embed]);
  const dy = tf.reshape(dyPadded, [batch, maxLen, embed]);
  tf.dispose([qp, dyPadded]);
  // The package's fused LayerNorm (residual add included): tfjs-layers'
  // layerNormalization tiles its mean and variance E times (gamma and
  // beta B S times) to the input's shape, and tfjs's Tile gradient runs a
  // slice and an add per repeat (4 E dispatches per norm, 4 B S more with
  // gamma's and beta's gradients); its Mean gradients upload
  // `ones(x.shape)` from the host.
  const norm1 = layers.fusedLayerNormalization();
  const norm2 = layers.fusedLayerNormalization();
  const up = tfl.layers.dense({units: 4 * embed, activation: 'relu'});
  const down = tfl.layers.dense({units: embed});
  const block = (attend: (input: tf.Tensor) => tf.Tensor, input: tf.Tensor) => {
    const h = norm1.apply([attend(input), input]) as tf.Tensor;
    return norm2.apply([down.apply(up.apply(h) as tf.Tensor) as tf.Tensor, h]) as tf.Tensor;
  };
  // Every weight's gradient, dy the upstream gradient (as for attention).
  const encoderOf = (attend: (input: tf.Tensor) => tf.Tensor, weights: LayerVariable[]) => () => {
    const vars = [norm1, norm2, up, down].flatMap(l => l.trainableWeights);
    const {value, grads} =
        tf.engine().gradients(() => block(attend, x), [...weights, ...vars].map(w => w.read()), dy);
    return [value, ...grads];
  };
  const composedMHA = (await import('./composed_mha')).composedMHA;
  /** Setting up a section (layers, their first pass) needs a little time. */
  const sectionMinMs = smoke ? 0 : 3000;
  for (const causal of [false, true]) {
    const flashTable =
        `FlashMHA encoder block (E=${embed}, causal=${causal}, padding mask) fwd+bwd`;
    const fusedLabel = 'padding mask fused (after)';
    const composedLabel = 'composed masked path (before)';
    tableSpeedUp.set(flashTable, 'fused speed-up');
    if (timeLeftMs() < sectionMinMs) {
      skip(flashTable, [fusedLabel, composedLabel]);
    } else {
      const mha = layers.flashMHA({embedDim: embed, numHeads: heads, causal});
      const composedLayer = composedMHA({embedDim: embed, numHeads: heads, causal});
      const flashAttend = (input: tf.Tensor) =>
          mha.apply(input, {keyPaddingMask: keyMask}) as tf.Tensor;
      const composedAttend = (input: tf.Tensor) =>
          composedLayer.apply(input, {keyPaddingMask: keyMask}) as tf.Tensor;
      tf.dispose(block(flashAttend, x));  // builds the layers
      tf.dispose(block(composedAttend, x));
      composedLayer.setWeights(mha.getWeights());
      await measure(
          {table: flashTable, label: fusedLabel}, encoderOf(flashAttend, mha.trainableWeights));
      await measure(
          {table: flashTable, label: composedLabel, versus: fusedLabel},
          encoderOf(composedAttend, composedLayer.trainableWeights));
      await checkOwnPipelineErrors();
      mha.dispose();
      composedLayer.dispose();
    }
    // The Keras layer (the loader's): attention_mask [B, 1, Sk] is a key
    // padding mask (fused); the same mask as [B, Sq, Sk] cannot be checked
    // without a read, so it takes the composed path Keras models ran before.
    const kerasTable =
        `Keras MultiHeadAttention encoder block (causal=${causal}, padding mask) fwd+bwd`;
    const kerasFused = 'attention_mask [B, 1, Sk]: fused (after)';
    const kerasComposed = 'attention_mask [B, Sq, Sk]: composed (before)';
    tableSpeedUp.set(kerasTable, 'fused speed-up');
    if (timeLeftMs() < sectionMinMs) {
      skip(kerasTable, [kerasFused, kerasComposed]);
      continue;
    }
    const keras = new MultiHeadAttention({numHeads: heads, keyDim: dim});
    const maskOneRow = tf.expandDims(keyMask, 1);
    tf.env().set('WEBGPU_CPU_FORWARD', false);
    const maskRows = tf.tidy(() => tf.tile(maskOneRow, [1, maxLen, 1]));
    tf.env().set('WEBGPU_CPU_FORWARD', cpuForward);
    const kerasAttend = (mask: tf.Tensor) => (input: tf.Tensor) =>
        keras.apply(input, {value: input, attentionMask: mask, useCausalMask: causal}) as tf.Tensor;
    tf.dispose(block(kerasAttend(maskOneRow), x));
    await measure(
        {table: kerasTable, label: kerasFused},
        encoderOf(kerasAttend(maskOneRow), keras.trainableWeights));
    await measure(
        {table: kerasTable, label: kerasComposed, versus: kerasFused},
        encoderOf(kerasAttend(maskRows), keras.trainableWeights));
    await checkOwnPipelineErrors();
    tf.dispose([maskOneRow, maskRows]);
    keras.dispose();
  }
  tf.dispose([x, dy, keyMask, cuSeqlens, seqlens]);
  progress('all rows done');
  printTables(notes);
}

main().catch(e => {
  console.error(e);
  process.exit(1);
});
