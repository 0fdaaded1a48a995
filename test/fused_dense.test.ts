/**
 * fusedDenseOrNull (a decode step's dense layer with its bias and
 * activation in one kernel) and fusedNormDenseOrNull (a pre-norm and that
 * dense layer in one kernel) against a float64 oracle on fresh random
 * inputs: on webgpu each runs its kernel in one dispatch; on cpu,
 * under FLASH_ATTENTION_IMPL=reference and past FUSED_DENSE_MAX_ROWS rows
 * it gives null (the caller composes). Bad input is refused by name;
 * nothing leaks.
 */
import * as tf from '@tensorflow/tfjs-core';

import {FLASH_ATTENTION_IMPL, FUSED_DENSE_MAX_ROWS, FusedDense, fusedDenseOrNull, FusedNormDense, fusedNormDenseOrNull} from '../src';
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

/** z = x + residual and the norm of each row of z, in float64. */
function oracleNorm(
    x: Float64Array, residual: Float64Array|null, gamma: Float64Array, beta: Float64Array|null,
    rows: number, inner: number, rms: boolean,
    epsilon: number): {z: Float64Array, n: Float64Array} {
  const z = x.map((v, i) => v + (residual == null ? 0 : residual[i]));
  const n = new Float64Array(z.length);
  for (let m = 0; m < rows; m++) {
    const row = z.subarray(m * inner, (m + 1) * inner);
    const mean = rms ? 0 : row.reduce((a, b) => a + b, 0) / inner;
    const variance = row.reduce((a, b) => a + (b - mean) ** 2, 0) / inner;
    const rstd = 1 / Math.sqrt(variance + epsilon);
    row.forEach((v, c) => {
      n[m * inner + c] = (v - mean) * rstd * gamma[c] + (beta == null ? 0 : beta[c]);
    });
  }
  return {z, n};
}

/** Float32 values of a float64 array, as float64 (what the kernel sees). */
const asF32 = (a: Float64Array) => Float64Array.from(Float32Array.from(a));

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

  const NORM_CASES = [
    {
      rows: 1,
      inner: 48,
      cols: 96,
      rms: false,
      residual: true,
      beta: true,
      bias: true,
      act: 'gelu_new' as const
    },
    {
      rows: 3,
      inner: 40,
      cols: 70,
      rms: true,
      residual: false,
      beta: false,
      bias: false,
      act: 'linear' as const
    },
    {
      rows: 2,
      inner: 130,
      cols: 33,
      rms: false,
      residual: true,
      beta: false,
      bias: true,
      act: 'relu' as const
    },
  ];
  for (const c of NORM_CASES) {
    test(`norm + dense: ${JSON.stringify(c)}`, async () => {
      const rng = freshRng();
      const epsilon = 1e-5;
      const xs = asF32(randomArray(c.rows * c.inner, rng, 2));
      const rs = c.residual ? asF32(randomArray(c.rows * c.inner, rng)) : null;
      const gs = asF32(randomArray(c.inner, rng));
      const betas = c.beta ? asF32(randomArray(c.inner, rng)) : null;
      const ws = asF32(randomArray(c.inner * c.cols, rng, 0.5));
      const bs = c.bias ? asF32(randomArray(c.cols, rng)) : null;
      const t2 = (a: Float64Array, shape: [number, number]) =>
          tf.tensor2d(Float32Array.from(a), shape);
      const t1 = (a: Float64Array|null) => a == null ? null : tf.tensor1d(Float32Array.from(a));
      const x = t2(xs, [c.rows, c.inner]);
      const residual = rs == null ? null : t2(rs, [c.rows, c.inner]);
      const gamma = t1(gs)!;
      const beta = t1(betas);
      const w = t2(ws, [c.inner, c.cols]);
      const bias = t1(bs);
      const before = tf.memory().numTensors;
      const args = {x, residual, rms: c.rms, epsilon, gamma, beta, w, bias, activation: c.act};
      const profile = await tf.profile(() => fusedNormDenseOrNull(args) ?? []);
      if (backend !== 'webgpu') {
        expect(profile.result).toEqual([]);
      } else {
        expect(profile.kernelNames).toEqual([FusedNormDense]);
        const [y, z] = profile.result as tf.Tensor[];
        const {z: wantZ, n} = oracleNorm(xs, rs, gs, betas, c.rows, c.inner, c.rms, epsilon);
        const wantY = oracleDense(n, ws, bs, c.rows, c.inner, c.cols, c.act);
        const what = `seed ${rng.seed}`;
        expect(y.shape).toEqual([c.rows, c.cols]);
        expectClose(await y.data(), wantY, FORWARD_BOUND, `${what}: y`);
        expectClose(await z.data(), wantZ, FORWARD_BOUND, `${what}: z`);
        tf.dispose([y, z]);
        // Once compiled: one dispatch, its uniforms kept per content.
        const counters = webgpuCounters();
        counters.reset();
        tf.dispose(fusedNormDenseOrNull(args)!);
        const {dispatches, writeBuffers, hostUploads} = counters.snapshot();
        expect({dispatches, writeBuffers, hostUploads})
            .toEqual({dispatches: 1, writeBuffers: 0, hostUploads: 0});
      }
      expect(tf.memory().numTensors).toBe(before);
      tf.dispose([x, gamma, w, ...[residual, beta, bias].filter(t => t != null)]);
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
    const gamma = tf.ones([4]) as tf.Tensor1D;
    const norm = {x, rms: false, epsilon: 1e-5, gamma, w, activation: 'linear' as const};
    expect(() => fusedNormDenseOrNull({...norm, gamma: tf.ones([5]) as tf.Tensor1D}))
        .toThrow(/fusedNormDenseOrNull: gamma must be of shape \[K = 4\].*got \[5\]/);
    expect(() => fusedNormDenseOrNull({...norm, residual: tf.ones([1, 4]) as tf.Tensor2D}))
        .toThrow(/fusedNormDenseOrNull: residual must be of x's shape \[2,4\], got \[1,4\]/);
    expect(() => fusedNormDenseOrNull({...norm, epsilon: 0}))
        .toThrow(/fusedNormDenseOrNull: epsilon must be a finite number > 0, got 0/);
    expect(() => fusedNormDenseOrNull({...norm, w: tf.ones([3, 8]) as tf.Tensor2D}))
        .toThrow(/fusedNormDenseOrNull: w must be of shape \[K = 4, N\]/);
    // The wrong-shaped tensors made inline above are the only new ones.
    expect(tf.memory().numTensors).toBe(before + 7);
    gamma.dispose();
    tf.dispose([x, w]);
  });
});
