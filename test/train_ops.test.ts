/**
 * The fused training ops against the float64 oracle (test/train_oracle.ts),
 * forward and gradients, on cpu (composed reference) and webgpu (fused
 * kernels), on fresh random inputs; plus input checks and leaks.
 */
import * as tf from '@tensorflow/tfjs-core';

import {FLASH_ATTENTION_IMPL, FlashAttentionError, FusedNorm, FusedNormGrad, FusedRotary, layerNorm, rmsNorm, softmaxCrossEntropy, softmaxCrossEntropyLoss, SoftmaxCrossEntropy, SoftmaxCrossEntropyGrad} from '../src';
import type {NormOptions} from '../src';

import {applyRotary} from '../src/layers';
import {RotaryTables} from '../src/layers/rotary';

import {describeBackends} from './harness/backends';
import {expectClose, FORWARD_BOUND, freshRng, GRADIENT_BOUND, randomArray, Rng} from './harness/problems';
import {CrossEntropyProblem, NormProblem, oracleCrossEntropy, oracleCrossEntropyBackward, oracleNormBackward, oracleNormForward, oracleRotary} from './train_oracle';

interface NormCase {
  name: string;
  rms: boolean;
  shape: number[];
  residual: boolean;
  dropoutRate: number;
}

const NORM_CASES: NormCase[] = [
  {name: 'layerNorm', rms: false, shape: [6, 40], residual: false, dropoutRate: 0},
  {
    name: 'layerNorm + residual + dropout, rank 3',
    rms: false,
    shape: [2, 5, 37],
    residual: true,
    dropoutRate: 0.25
  },
  {
    name: 'layerNorm + residual, wide rows',
    rms: false,
    shape: [3, 300],
    residual: true,
    dropoutRate: 0
  },
  {name: 'rmsNorm', rms: true, shape: [7, 33], residual: false, dropoutRate: 0},
  {
    name: 'rmsNorm + residual + dropout',
    rms: true,
    shape: [4, 130],
    residual: true,
    dropoutRate: 0.1
  },
];

function normProblem(c: NormCase, rng: Rng): NormProblem {
  const cols = c.shape[c.shape.length - 1];
  const rows = c.shape.reduce((a, b) => a * b, 1) / cols;
  return {
    rows,
    cols,
    rms: c.rms,
    epsilon: 1e-5,
    dropoutRate: c.dropoutRate,
    seed: rng.int(0, 2 ** 40),
    x: randomArray(rows * cols, rng, 2),
    residual: c.residual ? randomArray(rows * cols, rng) : null,
    gamma: randomArray(cols, rng),
    beta: c.rms ? null : randomArray(cols, rng),
  };
}

const f32 = (a: Float64Array) => Float32Array.from(a);

describeBackends('fused norms vs the float64 oracle', backend => {
  afterEach(() => tf.env().set(FLASH_ATTENTION_IMPL, 'auto'));

  for (const c of NORM_CASES) {
    test(`${c.name} ${JSON.stringify(c.shape)}: forward and gradients`, async () => {
      const rng = freshRng();
      const what = `${c.name} (FLASH_ATTENTION_TEST_SEED=${rng.seed})`;
      const p = normProblem(c, rng);
      const dyValues = randomArray(p.rows * p.cols, rng);
      const dzValues = randomArray(p.rows * p.cols, rng);
      const before = tf.memory().numTensors;
      const x = tf.tensor(f32(p.x), c.shape);
      const residual = p.residual ? tf.tensor(f32(p.residual), c.shape) : undefined;
      const gamma = tf.tensor1d(f32(p.gamma));
      const beta = p.beta ? tf.tensor1d(f32(p.beta)) : tf.zeros([p.cols]);
      const dy = tf.tensor(f32(dyValues), c.shape);
      const dz = tf.tensor(f32(dzValues), c.shape);
      const opts = {
        residual,
        dropoutRate: c.dropoutRate,
        seed: p.seed,
        epsilon: p.epsilon,
        returnResidual: true as const
      };
      const norm = (xs: tf.Tensor, rs: tf.Tensor|undefined, g: tf.Tensor, b: tf.Tensor) => c.rms ?
          rmsNorm(xs, g, {...opts, residual: rs}) :
          layerNorm(xs, g, b, {...opts, residual: rs});
      const profile = await tf.profile(() => {
        const [y, z] = norm(x, residual, gamma, beta);
        return [y, z];
      });
      const [y, z] = profile.result as tf.Tensor[];
      const expected = oracleNormForward(p);
      expectClose(await y.data(), expected.y, FORWARD_BOUND, `${what}: y`);
      expectClose(await z.data(), expected.z, FORWARD_BOUND, `${what}: z`);
      tf.dispose([y, z]);
      if (backend === 'webgpu') {
        expect(profile.kernelNames).toContain(FusedNorm);
      }

      // RMSNorm takes no beta: it stays out of the differentiated inputs.
      const inputs = [x, gamma, ...(c.rms ? [] : [beta]), ...(residual ? [residual] : [])];
      const gradProfile = await tf.profile(() => tf.grads((...args: tf.Tensor[]) => {
        const [xs, g] = args;
        const b = c.rms ? beta : args[2];
        const rs = residual ? args[args.length - 1] : undefined;
        const [yy, zz] = norm(xs, rs, g, b);
        return tf.add(tf.sum(tf.mul(yy, dy)), tf.sum(tf.mul(zz, dz)));
      })(inputs));
      const grads = gradProfile.result as tf.Tensor[];
      const og = oracleNormBackward(p, dyValues, dzValues);
      expectClose(await grads[0].data(), og.dx, GRADIENT_BOUND, `${what}: dx`);
      expectClose(await grads[1].data(), og.dgamma, GRADIENT_BOUND, `${what}: dgamma`);
      if (!c.rms) {
        expectClose(await grads[2].data(), og.dbeta, GRADIENT_BOUND, `${what}: dbeta`);
      }
      if (residual) {
        expectClose(
            await grads[grads.length - 1].data(), og.dresidual, GRADIENT_BOUND,
            `${what}: dresidual`);
      }
      if (backend === 'webgpu') {
        expect(gradProfile.kernelNames).toContain(FusedNormGrad);
      }
      tf.dispose([...grads, x, gamma, beta, dy, dz]);
      residual?.dispose();
      expect(tf.memory().numTensors).toBe(before);
    });
  }

  test('y alone, and the same seed gives the same mask as the reference', async () => {
    const rng = freshRng();
    const x = tf.tensor2d(f32(randomArray(8 * 24, rng)), [8, 24]);
    const gamma = tf.tensor1d(f32(randomArray(24, rng)));
    const beta = tf.tensor1d(f32(randomArray(24, rng)));
    const before = tf.memory().numTensors;
    const opts = {dropoutRate: 0.5, seed: 1234};
    const fused = layerNorm(x, gamma, beta, opts);
    tf.env().set(FLASH_ATTENTION_IMPL, 'reference');
    const reference = layerNorm(x, gamma, beta, opts);
    expect(fused.shape).toEqual([8, 24]);
    expectClose(await fused.data(), await reference.data(), FORWARD_BOUND, `seed ${rng.seed}`);
    tf.dispose([fused, reference]);
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([x, gamma, beta]);
  });

  test('bad input is refused, naming the argument, before any work', () => {
    const x = tf.zeros([4, 8]);
    const gamma = tf.ones([8]);
    const before = tf.memory().numTensors;
    expect(() => layerNorm(x, tf.ones([7]), gamma))
        .toThrow(/layerNorm: gamma must be of shape \[8\].*got \[7\]/);
    expect(() => rmsNorm(x, gamma, {residual: tf.zeros([4, 9])}))
        .toThrow(/rmsNorm: residual must be of x's shape \[4,8\], got \[4,9\]/);
    expect(() => rmsNorm(x, gamma, {dropoutRate: 1}))
        .toThrow(/dropoutRate must be a number in \[0, 1\), got 1/);
    expect(() => rmsNorm(x, gamma, {epsilon: 0}))
        .toThrow(/epsilon must be a finite number > 0, got 0/);
    expect(() => rmsNorm(tf.zeros([4, 8], 'int32'), gamma))
        .toThrow(/x must be of dtype float32, got int32/);
    expect(() => rmsNorm(x, gamma, {dropoutRate: 0.1, seed: -1}))
        .toThrow(/seed must be an integer/);
    expect(() => rmsNorm(x, gamma, {dropout_p: 0.1} as unknown as NormOptions))
        .toThrow(/rmsNorm: unknown option 'dropout_p'; did you mean 'dropoutRate'\?/);
    expect(() => layerNorm(x, gamma, gamma, {epsilon: -1})).toThrow(FlashAttentionError);
    // The wrong-shaped tensors made inline above are the only new ones.
    expect(tf.memory().numTensors).toBe(before + 3);
  });
});

interface CrossEntropyCase {
  name: string;
  rows: number;
  vocab: number;
  labelSmoothing: number;
  zLoss: number;
}

const CE_CASES: CrossEntropyCase[] = [
  {name: 'plain', rows: 9, vocab: 70, labelSmoothing: 0, zLoss: 0},
  {
    name: 'label smoothing + z-loss, wide vocabulary',
    rows: 5,
    vocab: 700,
    labelSmoothing: 0.1,
    zLoss: 1e-3
  },
  {name: 'z-loss only', rows: 6, vocab: 33, labelSmoothing: 0, zLoss: 0.01},
];

describeBackends('softmax cross-entropy vs the float64 oracle', backend => {
  for (const c of CE_CASES) {
    test(`${c.name} [${c.rows}, ${c.vocab}]: loss and dLogits`, async () => {
      const rng = freshRng();
      const what = `${c.name} (FLASH_ATTENTION_TEST_SEED=${rng.seed})`;
      const p: CrossEntropyProblem = {
        rows: c.rows,
        vocab: c.vocab,
        labelSmoothing: c.labelSmoothing,
        zLoss: c.zLoss,
        logits: randomArray(c.rows * c.vocab, rng, 4),
        labels: Int32Array.from({length: c.rows}, () => rng.int(0, c.vocab - 1)),
      };
      const dLossValues = randomArray(c.rows, rng);
      const before = tf.memory().numTensors;
      const logits = tf.tensor2d(f32(p.logits), [c.rows, c.vocab]);
      const labels = tf.tensor1d(p.labels, 'int32');
      const dLoss = tf.tensor1d(f32(dLossValues));
      const opts = {labelSmoothing: c.labelSmoothing, zLoss: c.zLoss};
      const profile = await tf.profile(() => softmaxCrossEntropy(logits, labels, opts));
      const loss = profile.result as tf.Tensor;
      expectClose(await loss.data(), oracleCrossEntropy(p), FORWARD_BOUND, `${what}: loss`);
      const gradProfile = await tf.profile(
          () => tf.grad(
              (l: tf.Tensor) => tf.sum(
                  tf.mul(softmaxCrossEntropy(l as tf.Tensor2D, labels, opts), dLoss)))(logits));
      const grad = gradProfile.result as tf.Tensor;
      expectClose(
          await grad.data(), oracleCrossEntropyBackward(p, dLossValues), GRADIENT_BOUND,
          `${what}: dLogits`);
      if (backend === 'webgpu') {
        expect(profile.kernelNames).toContain(SoftmaxCrossEntropy);
        expect(gradProfile.kernelNames).toContain(SoftmaxCrossEntropyGrad);
      }
      tf.dispose([loss, grad, logits, labels, dLoss]);
      expect(tf.memory().numTensors).toBe(before);
    });
  }

  test('the tf.losses-style mean over any leading shape, float labels', async () => {
    const rng = freshRng();
    const p: CrossEntropyProblem = {
      rows: 6,
      vocab: 11,
      labelSmoothing: 0,
      zLoss: 0,
      logits: randomArray(66, rng, 2),
      labels: Int32Array.from({length: 6}, () => rng.int(0, 10)),
    };
    const logits = tf.tensor3d(f32(p.logits), [2, 3, 11]);
    const labels = tf.tensor2d(Float32Array.from(p.labels), [2, 3]);
    const loss = softmaxCrossEntropyLoss(labels, logits);
    const expected = oracleCrossEntropy(p).reduce((a, b) => a + b, 0) / 6;
    expectClose(await loss.data(), [expected], FORWARD_BOUND, `seed ${rng.seed}`);
    tf.dispose([logits, labels, loss]);
  });

  test('bad input is refused, naming the argument', () => {
    const logits = tf.zeros([4, 8]);
    const labels = tf.zeros([4], 'int32');
    expect(() => softmaxCrossEntropy(logits as tf.Tensor2D, tf.zeros([4]) as tf.Tensor1D))
        .toThrow(/softmaxCrossEntropy: labels must be of dtype int32, got float32/);
    expect(() => softmaxCrossEntropy(logits as tf.Tensor2D, tf.zeros([3], 'int32') as tf.Tensor1D))
        .toThrow(/labels must be of shape \[4\].*got \[3\]/);
    expect(
        () =>
            softmaxCrossEntropy(logits as tf.Tensor2D, labels as tf.Tensor1D, {labelSmoothing: 1}))
        .toThrow(/labelSmoothing must be a number in \[0, 1\), got 1/);
    expect(() => softmaxCrossEntropy(logits as tf.Tensor2D, labels as tf.Tensor1D, {zLoss: -1}))
        .toThrow(/zLoss must be a finite number >= 0, got -1/);
    tf.dispose([logits, labels]);
  });
});

describeBackends('rotary embedding vs the float64 oracle', backend => {
  const cases = [
    {shape: [2, 9, 3, 8], rotaryDim: 8, interleaved: false},
    {shape: [1, 12, 2, 16], rotaryDim: 12, interleaved: true},
    {shape: [2, 5, 2, 10], rotaryDim: 6, interleaved: false},
  ];
  for (const c of cases) {
    test(`${JSON.stringify(c)}: forward and gradient`, async () => {
      const rng = freshRng();
      const what = `rotary ${JSON.stringify(c)} (FLASH_ATTENTION_TEST_SEED=${rng.seed})`;
      const n = c.shape.reduce((a, b) => a * b, 1);
      const xValues = randomArray(n, rng);
      const dyValues = randomArray(n, rng);
      const before = tf.memory().numTensors;
      const x = tf.tensor4d(f32(xValues), c.shape as [number, number, number, number]);
      const dy = tf.tensor4d(f32(dyValues), c.shape as [number, number, number, number]);
      const tables = new RotaryTables(c.rotaryDim, 10000);
      const profile =
          await tf.profile(() => applyRotary(x, c.rotaryDim, 10000, c.interleaved, tables));
      const y = profile.result as tf.Tensor;
      expectClose(
          await y.data(), oracleRotary(xValues, c.shape, c.rotaryDim, 10000, c.interleaved),
          FORWARD_BOUND, `${what}: y`);
      const dx = tf.grad(
          (t: tf.Tensor) => tf.sum(tf.mul(
              applyRotary(t as tf.Tensor4D, c.rotaryDim, 10000, c.interleaved, tables), dy)))(x);
      expectClose(
          await dx.data(), oracleRotary(dyValues, c.shape, c.rotaryDim, 10000, c.interleaved, true),
          GRADIENT_BOUND, `${what}: dx`);
      if (backend === 'webgpu') {
        expect(profile.kernelNames).toEqual([FusedRotary]);
      }
      tables.dispose();
      tf.dispose([x, dy, y, dx]);
      expect(tf.memory().numTensors).toBe(before);
    });
  }
});
