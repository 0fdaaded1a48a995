/**
 * Memory: no leaked tensors (or GPU bytes on webgpu) after forward and
 * gradient loops, and the reference's query blocks keep a long causal
 * forward far below one full `[B, H, S, S]` score tensor.
 */
import * as tf from '@tensorflow/tfjs-core';

import {flashAttention, flashAttentionKVPacked, flashAttentionQKVPacked} from '../src';

import {describeBackends, useBackend} from './harness/backends';

/**
 * GPU bytes in use on webgpu (tfjs's own accounting), else 0. The webgpu
 * backend releases the buffers of disposed tensors when it next submits
 * work, so a kernel is run and read back first.
 */
async function gpuBytesInUse(): Promise<number> {
  // Large enough that the webgpu backend runs it on the GPU, not the CPU.
  const probe = tf.tidy(() => tf.add(tf.fill([4096], 1), 1));
  await probe.data();
  probe.dispose();
  const info = tf.memory() as tf.MemoryInfo & {numBytesInGPU?: number};
  return info.numBytesInGPU ?? 0;
}

describeBackends('no leaks', () => {
  it('leaves numTensors and GPU bytes where they started after forward+grad loops', async () => {
    const q = tf.randomNormal([2, 9, 4, 8]) as tf.Tensor4D;
    const k = tf.randomNormal([2, 11, 2, 8]) as tf.Tensor4D;
    const v = tf.randomNormal([2, 11, 2, 8]) as tf.Tensor4D;
    const qkv = tf.randomNormal([2, 9, 3, 4, 8]) as tf.Tensor5D;
    const kv = tf.randomNormal([2, 11, 2, 2, 8]) as tf.Tensor5D;
    const slopes = tf.tensor1d([0.1, 0.2, 0.3, 0.4]);
    const calls: Array<() => tf.Tensor[]> = [
      () => [flashAttention(q, k, v, {causal: true})],
      () => flashAttention(q, k, v, {alibiSlopes: slopes, returnSoftmaxLse: true}),
      () => [flashAttention(q, k, v, {dropoutRate: 0.2, seed: 3, windowSize: [2, 1]})],
      () => [flashAttentionQKVPacked(qkv, {softcap: 3})],
      () => [flashAttentionKVPacked(q, kv)],
    ];
    const grad = tf.grads(
        (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => tf.sum(flashAttention(
            a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D,
            {causal: true, dropoutRate: 0.1, seed: 9, alibiSlopes: slopes})));
    const gradPacked = tf.grad((x: tf.Tensor) => tf.sum(flashAttentionQKVPacked(x as tf.Tensor5D)));
    // Warm up: let backends allocate their caches (pipelines, buffer pools).
    tf.dispose(calls.map(c => c()));
    tf.dispose([...grad([q, k, v]), gradPacked(qkv)]);
    const gpuBefore = await gpuBytesInUse();
    const tensorsBefore = tf.memory().numTensors;
    for (let step = 0; step < 3; step++) {
      for (const call of calls) {
        const outputs = call();
        await outputs[0].data();
        tf.dispose(outputs);
      }
      const grads = [...grad([q, k, v]), gradPacked(qkv)];
      await grads[0].data();
      tf.dispose(grads);
    }
    expect(tf.memory().numTensors).toBe(tensorsBefore);
    expect(await gpuBytesInUse()).toBe(gpuBefore);
    tf.dispose([q, k, v, qkv, kv, slopes]);
  });
});

describe('memory-lean reference', () => {
  beforeAll(() => useBackend('cpu'));

  it('keeps the peak of a causal forward at S=2048, H=2, D=32 under half a score tensor',
     async () => {
       const [batch, seq, heads, dim] = [1, 2048, 2, 32];
       const q = tf.randomNormal([batch, seq, heads, dim]) as tf.Tensor4D;
       const k = tf.randomNormal([batch, seq, heads, dim]) as tf.Tensor4D;
       const v = tf.randomNormal([batch, seq, heads, dim]) as tf.Tensor4D;
       const bytesBefore = tf.memory().numBytes;
       const profile = await tf.profile(() => flashAttention(q, k, v, {causal: true}));
       const out = profile.result as tf.Tensor;
       const fullScoreBytes = batch * heads * seq * seq * 4;
       const peakAboveInputs = profile.peakBytes - bytesBefore;
       expect(out.shape).toEqual([batch, seq, heads, dim]);
       // The output itself must be in there: the run did real work.
       expect(peakAboveInputs).toBeGreaterThanOrEqual(out.size * 4);
       expect(peakAboveInputs).toBeLessThan(fullScoreBytes / 2);
       tf.dispose([q, k, v, out]);
     });
});
