/**
 * Padded batches on the fused path (issue 18), in Node on Dawn:
 *   1. attention alone, fwd+bwd: 16 sequences with lengths uniform in
 *      [64, 1024] (seeded), H=16, D=64: flashAttentionVarlen (packed) vs
 *      the padded op at S=1024 (no lengths: every padded token computed)
 *      vs the composed masked path (FlashMHA's key padding mask before
 *      this issue: src/layers/masked_attention.ts); plus the padded op
 *      with seqlensQ/seqlensK, and the real tokens' share of the padded
 *      work (the "proportional" target).
 *   2. encoder blocks (attention + residual + layer norm + MLP) with a key
 *      padding mask, fwd+bwd, non-causal and causal: FlashMHA with the
 *      mask fused vs the composed masked path (before); and the Keras
 *      MultiHeadAttention layer (the loader's) with attention_mask
 *      [B, 1, Sk] (a padding mask: fused) vs the same mask as
 *      [B, Sq, Sk] (rows it cannot check without a read: composed).
 * Prints a table last, with per call device-independent counts
 * (dispatches, submits, host uploads) and the synchronous reads seen in
 * each timed loop, which must be 0. Timing: warm-up until two batches
 * agree within 5% (at most --warmup-ms), then the median of batches of
 * repetitions, read back once per batch (docs/design.md, "Performance
 * method").
 *
 *   node varlen.mjs [--smoke] [--reps N] [--batches N] [--warmup-ms MS]
 *     (--smoke: tiny shapes, for SwiftShader)
 */

import * as tf from '@tensorflow/tfjs-core';
import type {LayerVariable} from '@tensorflow/tfjs-layers';

import {webgpuCounters} from './webgpu_counters';
import {adapterName, openWebGPUDevice, useWebGPUBackend} from './webgpu_setup';

const smoke = process.argv.includes('--smoke');
function intArg(name: string, fallback: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}
const reps = intArg('--reps', smoke ? 1 : 5);
const batches = intArg('--batches', smoke ? 1 : 5);
const warmupMs = intArg('--warmup-ms', smoke ? 0 : 3000);

/** mulberry32, so every run draws the same lengths. */
function rng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6D2B79F5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
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

interface Timing {
  ms: number;
  /** Synchronous GPU reads during the timed batches (all of them). */
  syncReads: number;
  /** Per call, from one extra call: dispatches, submits, host uploads. */
  counts: string;
}

/**
 * Median ms per call of `f`, read back once per batch of `reps`, after a
 * warm-up that runs until two batches agree within 5% (at most warmupMs).
 */
async function timeIt(f: () => tf.Tensor[]): Promise<Timing> {
  const sync = async (ts: tf.Tensor[]) => {
    // One element of the last output: reading it waits for all queued work.
    const probe = tf.tidy(() => tf.slice(tf.reshape(ts[ts.length - 1], [-1]), 0, 1));
    await probe.data();
    probe.dispose();
  };
  const batch = async () => {
    const t0 = performance.now();
    for (let r = 0; r < reps; r++) {
      const out = f();
      if (r === reps - 1) {
        await sync(out);
      }
      tf.dispose(out);
    }
    return (performance.now() - t0) / reps;
  };
  const first = f();  // compiles the pipelines
  await sync(first);
  tf.dispose(first);
  const counters = webgpuCounters();
  tf.dispose(f());
  const c = counters.snapshot();
  const counts = `${c.dispatches} / ${c.submits} / ${c.hostUploads}`;
  const w0 = performance.now();
  let previous = Infinity;
  while (performance.now() - w0 < warmupMs) {
    const ms = await batch();
    if (Math.abs(ms - previous) <= 0.05 * previous) {
      break;
    }
    previous = ms;
  }
  const readsBefore = syncReads;
  const times: number[] = [];
  for (let b = 0; b < batches; b++) {
    times.push(await batch());
  }
  times.sort((a, b) => a - b);
  return {ms: times[Math.floor(times.length / 2)], syncReads: syncReads - readsBefore, counts};
}

async function setup(): Promise<string> {
  const device = await openWebGPUDevice({features: ['subgroups']});
  await import('@tensorflow/tfjs-layers');  // the core ops' gradients
  await useWebGPUBackend(device);
  return adapterName(device.adapter);
}

async function main(): Promise<void> {
  const deviceName = await setup();
  countSyncReads();
  const fa = await import('../src/index');
  const layers = await import('../src/layers');
  const {MultiHeadAttention} = await import('../src/layers/multi_head_attention');
  const tfl = await import('@tensorflow/tfjs-layers');
  const {checkOwnPipelineErrors} = await import('../kernels/webgpu/own_pipeline');

  const batch = smoke ? 4 : 16;
  const [minLen, maxLen] = smoke ? [8, 32] : [64, 1024];
  const heads = smoke ? 2 : 16;
  const dim = smoke ? 16 : 64;
  const random = rng(18);
  const lengths =
      Array.from({length: batch}, () => minLen + Math.floor(random() * (maxLen - minLen + 1)));
  const total = lengths.reduce((a, b) => a + b, 0);
  const cu = [0];
  lengths.forEach(l => cu.push(cu[cu.length - 1] + l));
  const rows: string[] = [];
  const row = (what: string, t: Timing, base?: Timing) =>
      rows.push(`| ${what} | ${t.ms.toFixed(3)} | ${
          base == null ? '' : `${(base.ms / t.ms).toFixed(2)}x`} | ${t.counts} | ${t.syncReads} |`);
  const header = (what: string, speedUp: string) => rows.push(
      `| ${what} | ms | ${speedUp} | dispatches / submits / uploads per call | sync reads |`,
      '| --- | --- | --- | --- | --- |');
  console.log(
      `device: ${deviceName}; ${batch} sequences, lengths in [${minLen}, ${maxLen}] ` +
      `(total ${total} of ${batch * maxLen} padded: ${
          (100 * total / (batch * maxLen)).toFixed(1)}%), ` +
      `H=${heads} D=${dim}`);

  // 1. Attention alone, fwd+bwd (loss = sum(out * dy)).
  const q = tf.randomNormal([total, heads, dim]) as tf.Tensor3D;
  const k = tf.randomNormal([total, heads, dim]) as tf.Tensor3D;
  const v = tf.randomNormal([total, heads, dim]) as tf.Tensor3D;
  const cuSeqlens = tf.tensor1d(cu, 'int32');
  const seqlens = tf.tensor1d(lengths, 'int32');
  const dyPacked = tf.randomNormal([total, heads, dim]);
  const qp = tf.randomNormal([batch, maxLen, heads, dim]) as tf.Tensor4D;
  const kp = tf.randomNormal([batch, maxLen, heads, dim]) as tf.Tensor4D;
  const vp = tf.randomNormal([batch, maxLen, heads, dim]) as tf.Tensor4D;
  const dyPadded = tf.randomNormal([batch, maxLen, heads, dim]);
  // Computed on the GPU (no CPU forwarding of small ops), as a model's
  // mask is: no path may read it back.
  const cpuForward = tf.env().getBool('WEBGPU_CPU_FORWARD');
  tf.env().set('WEBGPU_CPU_FORWARD', false);
  const keyMask = tf.tidy(
      () => tf.less(
          tf.reshape(tf.range(0, maxLen, 1, 'int32'), [1, maxLen]),
          tf.reshape(seqlens, [batch, 1])));
  tf.env().set('WEBGPU_CPU_FORWARD', cpuForward);
  const gradsOf =
      (f: (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => tf.Tensor, dy: tf.Tensor,
       x: tf.Tensor[]) => () =>
          tf.grads((a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => tf.sum(tf.mul(f(a, b, c), dy)))(x);
  const opts = {maxSeqlenQ: maxLen, maxSeqlenK: maxLen};
  const varlen = await timeIt(gradsOf(
      (a, b, c) => fa.flashAttentionVarlen(
          a as tf.Tensor3D, b as tf.Tensor3D, c as tf.Tensor3D, cuSeqlens, cuSeqlens, opts),
      dyPacked, [q, k, v]));
  const withLengths = await timeIt(gradsOf(
      (a, b, c) => fa.flashAttention(
          a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D,
          {seqlensQ: seqlens, seqlensK: seqlens}),
      dyPadded, [qp, kp, vp]));
  const withMask = await timeIt(gradsOf(
      (a, b, c) => fa.flashAttention(
          a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D, {keyPaddingMask: keyMask}),
      dyPadded, [qp, kp, vp]));
  const padded = await timeIt(gradsOf(
      (a, b, c) => fa.flashAttention(a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D),
      dyPadded, [qp, kp, vp]));
  const composed = await timeIt(gradsOf(
      (a, b, c) =>
          layers.maskedAttention(a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D, {keyMask}),
      dyPadded, [qp, kp, vp]));
  await checkOwnPipelineErrors();
  const realShare = lengths.reduce((a, l) => a + l * l, 0) / (batch * maxLen * maxLen);
  header('attention fwd+bwd', 'varlen speed-up');
  row('flashAttentionVarlen (packed)', varlen);
  row('padded op + seqlensQ/seqlensK', withLengths, varlen);
  row('padded op + keyPaddingMask', withMask, varlen);
  row(`padded op, S=${maxLen}, no lengths`, padded, varlen);
  row('composed masked path (before)', composed, varlen);
  rows.push(
      `| real tokens' share of the padded work (sum l^2 / B S^2) | ${realShare.toFixed(3)} | ` +
      `ideal ${(1 / realShare).toFixed(2)}x | | |`);
  tf.dispose([q, k, v, dyPacked, qp, kp, vp, dyPadded]);

  // 2. Encoder blocks with a key padding mask, fwd+bwd.
  const embed = smoke ? 32 : heads * dim;
  const x = tf.randomNormal([batch, maxLen, embed]);
  const dy = tf.randomNormal([batch, maxLen, embed]);
  const norm1 = tfl.layers.layerNormalization({axis: -1});
  const norm2 = tfl.layers.layerNormalization({axis: -1});
  const up = tfl.layers.dense({units: 4 * embed, activation: 'relu'});
  const down = tfl.layers.dense({units: embed});
  const block = (attention: (input: tf.Tensor) => tf.Tensor, input: tf.Tensor) => {
    const h = norm1.apply(tf.add(input, attention(input))) as tf.Tensor;
    return norm2.apply(tf.add(h, down.apply(up.apply(h) as tf.Tensor) as tf.Tensor)) as tf.Tensor;
  };
  const encoderOf = (attention: (input: tf.Tensor) => tf.Tensor, weights: LayerVariable[]) =>
      () => {
        const vars = [...weights, ...up.trainableWeights].map(w => w.read() as tf.Variable);
        const {value, grads} =
            tf.variableGrads(() => tf.sum(tf.mul(block(attention, x), dy)) as tf.Scalar, vars);
        return [value, ...Object.values(grads)];
      };
  const composedMHA = (await import('./composed_mha')).composedMHA;
  for (const causal of [false, true]) {
    const mha = layers.flashMHA({embedDim: embed, numHeads: heads, causal});
    const composedLayer = composedMHA({embedDim: embed, numHeads: heads, causal});
    const flashAttend = (input: tf.Tensor) =>
        mha.apply(input, {keyPaddingMask: keyMask}) as tf.Tensor;
    const composedAttend = (input: tf.Tensor) =>
        composedLayer.apply(input, {keyPaddingMask: keyMask}) as tf.Tensor;
    tf.dispose(block(flashAttend, x));
    tf.dispose(block(composedAttend, x));
    composedLayer.setWeights(mha.getWeights());
    const fused = await timeIt(encoderOf(flashAttend, mha.trainableWeights));
    const before = await timeIt(encoderOf(composedAttend, composedLayer.trainableWeights));
    await checkOwnPipelineErrors();
    rows.push('');
    header(
        `FlashMHA encoder block (E=${embed}, causal=${causal}, padding mask) fwd+bwd`, 'speed-up');
    row('padding mask fused (after)', fused, before);
    row('composed masked path (before)', before);
    mha.dispose();
    composedLayer.dispose();
  }
  for (const causal of [false, true]) {
    // The Keras layer (the loader's): attention_mask [B, 1, Sk] is a key
    // padding mask (fused); the same mask as [B, Sq, Sk] cannot be checked
    // without a read, so it takes the composed path Keras models ran before.
    const keras = new MultiHeadAttention({numHeads: heads, keyDim: dim});
    const maskOneRow = tf.expandDims(keyMask, 1);
    tf.env().set('WEBGPU_CPU_FORWARD', false);
    const maskRows = tf.tidy(() => tf.tile(maskOneRow, [1, maxLen, 1]));
    tf.env().set('WEBGPU_CPU_FORWARD', cpuForward);
    const kerasAttend = (mask: tf.Tensor) => (input: tf.Tensor) =>
        keras.apply(input, {value: input, attentionMask: mask, useCausalMask: causal}) as tf.Tensor;
    tf.dispose(block(kerasAttend(maskOneRow), x));
    const fused = await timeIt(encoderOf(kerasAttend(maskOneRow), keras.trainableWeights));
    const before = await timeIt(encoderOf(kerasAttend(maskRows), keras.trainableWeights));
    await checkOwnPipelineErrors();
    rows.push('');
    header(
        `Keras MultiHeadAttention encoder block (causal=${causal}, padding mask) fwd+bwd`,
        'speed-up');
    row('attention_mask [B, 1, Sk]: fused (after)', fused, before);
    row('attention_mask [B, Sq, Sk]: composed (before)', before);
    tf.dispose([maskOneRow, maskRows]);
    keras.dispose();
  }
  tf.dispose([x, dy, keyMask, cuSeqlens, seqlens]);
  console.log(rows.join('\n'));
}

main().catch(e => {
  console.error(e);
  process.exit(1);
});
