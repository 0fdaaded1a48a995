/**
 * fusedDenseOrNull (a decode step's dense layer with its bias and
 * activation in one kernel) against a float64 oracle on fresh random
 * inputs: on webgpu it runs the FusedDense kernel in one dispatch; on cpu,
 * under FLASH_ATTENTION_IMPL=reference and past FUSED_DENSE_MAX_ROWS rows
 * it gives null (the caller composes). Bad input is refused by name;
 * nothing leaks.
 */
import * as tf from '@tensorflow/tfjs-core';

import {FLASH_ATTENTION_IMPL, FUSED_DENSE_MAX_ROWS, FusedDense, fusedDenseOrNull} from '../src';
import type {FusedDenseActivation} from '../src';

import {describeBackends} from './harness/backends';
import {expectClose, FORWARD_BOUND, freshRng, randomArray} from './harness/problems';
import {webgpuCounters} from '../benchmarks/webgpu_counters';

/** act(x w + bias) in float64, x [M, K], w [K, N]. */
function oracleDense(
    x: Float64Array, w: Float64Array, bias: Float64Array|null, rows: number, inner: number,
    cols: number, activation: FusedDenseActivation): Float64Array {
  const y = new Float64Array(rows * cols);
  for (let m = 0; m < rows; m++) {
    for (let n = 0; n < cols; n++) {
      let v = bias == null ? 0 : bias[n];
      for (let k = 0; k < inner; k++) {
        v += x[m * inner + k] * w[k * cols + n];
      }
      y[m * cols + n] = activation === 'relu' ?
          Math.max(v, 0) :
          activation === 'gelu_new' ?
          0.5 * v * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (v + 0.044715 * v * v * v))) :
          v;
    }
  }
  return y;
}

const CASES:
    Array<{rows: number, inner: number, cols: number, act: FusedDenseActivation, bias: boolean}> = [
      {rows: 1, inner: 32, cols: 128, act: 'gelu_new', bias: true},
      {rows: 3, inner: 37, cols: 70, act: 'gelu_new', bias: false},
      {rows: FUSED_DENSE_MAX_ROWS, inner: 16, cols: 65, act: 'relu', bias: true},
      {rows: 2, inner: 64, cols: 8, act: 'linear', bias: true},
    ];

describeBackends('fusedDenseOrNull vs the float64 oracle', backend => {
  afterEach(() => tf.env().set(FLASH_ATTENTION_IMPL, 'auto'));

  for (const c of CASES) {
    test(
        `[${c.rows}, ${c.inner}] x [${c.inner}, ${c.cols}], ${c.act}${c.bias ? ' + bias' : ''}`,
        async () => {
          const rng = freshRng();
          const xs = randomArray(c.rows * c.inner, rng, 2);
          const ws = randomArray(c.inner * c.cols, rng, 0.5);
          const bs = c.bias ? randomArray(c.cols, rng) : null;
          const x = tf.tensor2d(Float32Array.from(xs), [c.rows, c.inner]);
          const w = tf.tensor2d(Float32Array.from(ws), [c.inner, c.cols]);
          const bias = bs == null ? null : tf.tensor1d(Float32Array.from(bs));
          const before = tf.memory().numTensors;
          const profile = await tf.profile(() => fusedDenseOrNull(x, w, bias, c.act) ?? []);
          const y = profile.result instanceof tf.Tensor ? profile.result : null;
          if (backend !== 'webgpu') {
            expect(y).toBeNull();
          } else {
            expect(profile.kernelNames).toEqual([FusedDense]);
            expect(y!.shape).toEqual([c.rows, c.cols]);
            const want = oracleDense(
                Float64Array.from(Float32Array.from(xs)), Float64Array.from(Float32Array.from(ws)),
                bs == null ? null : Float64Array.from(Float32Array.from(bs)), c.rows, c.inner,
                c.cols, c.act);
            expectClose(await y!.data(), want, FORWARD_BOUND, `seed ${rng.seed}`);
            y!.dispose();
            // Once compiled: one dispatch, its uniforms kept per content.
            const counters = webgpuCounters();
            counters.reset();
            fusedDenseOrNull(x, w, bias, c.act)!.dispose();
            const {dispatches, writeBuffers, hostUploads} = counters.snapshot();
            expect({dispatches, writeBuffers, hostUploads})
                .toEqual({dispatches: 1, writeBuffers: 0, hostUploads: 0});
          }
          expect(tf.memory().numTensors).toBe(before);
          tf.dispose([x, w, bias ?? []]);
        });
  }

  test('null under FLASH_ATTENTION_IMPL=reference and past the row limit', () => {
    const w = tf.ones([4, 8]) as tf.Tensor2D;
    const before = tf.memory().numTensors;
    const many = tf.ones([FUSED_DENSE_MAX_ROWS + 1, 4]) as tf.Tensor2D;
    expect(fusedDenseOrNull(many, w, null, 'gelu_new')).toBeNull();
    const one = tf.ones([1, 4]) as tf.Tensor2D;
    tf.env().set(FLASH_ATTENTION_IMPL, 'reference');
    expect(fusedDenseOrNull(one, w, null, 'gelu_new')).toBeNull();
    tf.dispose([many, one, w]);
    expect(tf.memory().numTensors).toBe(before - 1);
  });

  test('bad input is refused, naming the argument', () => {
    const x = tf.ones([2, 4]) as tf.Tensor2D;
    const w = tf.ones([4, 8]) as tf.Tensor2D;
    const before = tf.memory().numTensors;
    expect(() => fusedDenseOrNull(x, tf.ones([5, 8]) as tf.Tensor2D, null, 'relu'))
        .toThrow(/fusedDenseOrNull: w must be of shape \[K = 4, N\].*got \[5,8\]/);
    expect(() => fusedDenseOrNull(x, w, tf.ones([7]) as tf.Tensor1D, 'relu'))
        .toThrow(/fusedDenseOrNull: bias must be of shape \[N = 8\].*got \[7\]/);
    expect(() => fusedDenseOrNull(x, w, null, 'tanh' as FusedDenseActivation))
        .toThrow(/fusedDenseOrNull: activation must be 'linear', 'relu' or 'gelu_new'/);
    expect(() => fusedDenseOrNull(tf.ones([2, 4], 'int32') as tf.Tensor2D, w, null, 'relu'))
        .toThrow(/x must be of dtype float32, got int32/);
    // The wrong-shaped tensors made inline above are the only new ones.
    expect(tf.memory().numTensors).toBe(before + 3);
    tf.dispose([x, w]);
  });
});
