/**
 * Padded batches on the fused path (issue 18), in Node on Dawn:
 *   1. attention alone, fwd+bwd: 16 sequences with lengths uniform in
 *      [64, 1024] (seeded), H=16, D=64: flashAttentionVarlen (packed) vs
 *      the padded op at S=1024 (no lengths: every padded token computed)
 *      vs the composed masked path (FlashMHA's key padding mask before
 *      this issue: src/layers/masked_attention.ts); plus the padded op
 *      with seqlensQ/seqlensK, and the real tokens' share of the padded
 *      work (the "proportional" target).
 *   2. a Keras-style encoder block (FlashMHA + residual + layer norm + MLP)
 *      with a key padding mask, fwd+bwd: the mask through the fused path
 *      (per-batch lengths) vs the composed masked path (before).
 * Prints a table last. Timing: warm-up, then the median of batches of
 * repetitions, read back once per batch (docs/design.md, "Performance
 * method").
 *
 *   node varlen.mjs [--smoke] [--reps N] [--batches N]
 *     (--smoke: tiny shapes, for SwiftShader)
 */

import * as tf from '@tensorflow/tfjs-core';
import type {layers as tflLayers} from '@tensorflow/tfjs-layers';

import {adapterName, medianMsPerCall, openWebGPUDevice, useWebGPUBackend} from './webgpu_setup';

const smoke = process.argv.includes('--smoke');
function intArg(name: string, fallback: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}
const reps = intArg('--reps', smoke ? 1 : 5);
const batches = intArg('--batches', smoke ? 1 : 5);

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

async function setup(): Promise<string> {
  const device = await openWebGPUDevice({features: ['subgroups']});
  await import('@tensorflow/tfjs-layers');  // the core ops' gradients
  await useWebGPUBackend(device);
  return adapterName(device.adapter);
}

/** Median ms per call of `f`, read back once per batch of `reps`. */
function timeIt(f: () => tf.Tensor[]): Promise<number> {
  return medianMsPerCall(f, reps, batches);
}

async function main(): Promise<void> {
  const deviceName = await setup();
  const fa = await import('../src/index');
  const layers = await import('../src/layers');
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
  const row = (what: string, ms: number, base?: number) => rows.push(
      `| ${what} | ${ms.toFixed(3)} | ${base == null ? '' : `${(base / ms).toFixed(2)}x`} |`);
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
  const keyMask = tf.tidy(
      () => tf.less(
          tf.reshape(tf.range(0, maxLen, 1, 'int32'), [1, maxLen]),
          tf.reshape(seqlens, [batch, 1])));
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
  const padded = await timeIt(gradsOf(
      (a, b, c) => fa.flashAttention(a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D),
      dyPadded, [qp, kp, vp]));
  const composed = await timeIt(gradsOf(
      (a, b, c) =>
          layers.maskedAttention(a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D, {keyMask}),
      dyPadded, [qp, kp, vp]));
  await checkOwnPipelineErrors();
  const realShare = lengths.reduce((a, l) => a + l * l, 0) / (batch * maxLen * maxLen);
  rows.push('| attention fwd+bwd | ms | varlen speed-up |', '| --- | --- | --- |');
  row('flashAttentionVarlen (packed)', varlen);
  row('padded op + seqlensQ/seqlensK', withLengths, varlen);
  row(`padded op, S=${maxLen}, no lengths`, padded, varlen);
  row('composed masked path (before)', composed, varlen);
  rows.push(
      `| real tokens' share of the padded work (sum l^2 / B S^2) | ${realShare.toFixed(3)} | ` +
      `ideal ${(1 / realShare).toFixed(2)}x |`);
  tf.dispose([q, k, v, dyPacked, qp, kp, vp, dyPadded]);

  // 2. Keras-style encoder block with a key padding mask, fwd+bwd.
  const embed = smoke ? 32 : heads * dim;
  const x = tf.randomNormal([batch, maxLen, embed]);
  const dy = tf.randomNormal([batch, maxLen, embed]);
  const mha = layers.flashMHA({embedDim: embed, numHeads: heads});
  const composedLayer =
      (await import('./composed_mha')).composedMHA({embedDim: embed, numHeads: heads});
  const norm1 = tfl.layers.layerNormalization({axis: -1});
  const norm2 = tfl.layers.layerNormalization({axis: -1});
  const up = tfl.layers.dense({units: 4 * embed, activation: 'relu'});
  const down = tfl.layers.dense({units: embed});
  const block = (attention: tflLayers.Layer, input: tf.Tensor) => {
    const a = attention.apply(input, {keyPaddingMask: keyMask}) as tf.Tensor;
    const h = norm1.apply(tf.add(input, a)) as tf.Tensor;
    return norm2.apply(tf.add(h, down.apply(up.apply(h) as tf.Tensor) as tf.Tensor)) as tf.Tensor;
  };
  tf.dispose(block(mha, x));
  tf.dispose(block(composedLayer, x));
  composedLayer.setWeights(mha.getWeights());
  const encoderOf = (attention: tflLayers.Layer) => () => {
    const vars =
        [...attention.trainableWeights, ...up.trainableWeights].map(w => w.read() as tf.Variable);
    const {value, grads} =
        tf.variableGrads(() => tf.sum(tf.mul(block(attention, x), dy)) as tf.Scalar, vars);
    return [value, ...Object.values(grads)];
  };
  const encoderFused = await timeIt(encoderOf(mha));
  const encoderComposed = await timeIt(encoderOf(composedLayer));
  await checkOwnPipelineErrors();
  rows.push(
      '', `| encoder block (E=${embed}, key padding mask) fwd+bwd | ms | speed-up |`,
      '| --- | --- | --- |');
  row('FlashMHA, padding mask fused (after)', encoderFused, encoderComposed);
  row('composed masked path (before)', encoderComposed);
  tf.dispose([x, dy, keyMask, cuSeqlens, seqlens]);
  console.log(rows.join('\n'));
}

main().catch(e => {
  console.error(e);
  process.exit(1);
});
