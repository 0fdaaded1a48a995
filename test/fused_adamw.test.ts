/**
 * Fused AdamW / Adam (src/train/fused_adamw.ts): every element of params and
 * moments after several steps against the float64 oracle, on cpu (the
 * reference) and webgpu (fused kernels, and the reference); minimize and
 * model.fit; serialization of config and weights; no leaks; bad input.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';

import {FUSED_ADAMW_IMPL, FusedAdamW, fusedAdam, fusedAdamW} from '../src';

import {webgpuCounters} from '../benchmarks/webgpu_counters';

import {describeBackends} from './harness/backends';
import {expectClose, freshRng, randomArray, Rng} from './harness/problems';
import {AdamWOracleConfig, adamWOracleInit, adamWOracleStep} from './optimizer_oracle';

/** float32 steps vs the float64 oracle, relative to max |reference|. */
const BOUND = 2e-5;

const SHAPES = [[7, 5], [33], [2, 3, 4], [1]];

function implsOf(backend: string): string[] {
  return backend === 'webgpu' ? ['fused', 'reference'] : ['reference'];
}

async function withImpl<T>(impl: string, fn: () => Promise<T>): Promise<T> {
  const saved = tf.env().get(FUSED_ADAMW_IMPL);
  tf.env().set(FUSED_ADAMW_IMPL, impl);
  try {
    return await fn();
  } finally {
    tf.env().set(FUSED_ADAMW_IMPL, saved);
  }
}

let nameCounter = 0;
function uniqueName(what: string): string {
  return `fused_adamw_test_${what}_${nameCounter++}`;
}

interface OracleCase {
  title: string;
  config: AdamWOracleConfig;
  /** A new learning rate from step 3 on (a schedule), or none. */
  laterLearningRate?: number;
}

const CASES: OracleCase[] = [
  {
    title: 'Adam',
    config: {
      learningRate: 0.01,
      beta1: 0.9,
      beta2: 0.999,
      epsilon: 1e-7,
      weightDecay: 0,
      clipNorm: null
    }
  },
  {
    title: 'AdamW, weight decay',
    config: {
      learningRate: 0.02,
      beta1: 0.8,
      beta2: 0.99,
      epsilon: 1e-6,
      weightDecay: 0.1,
      clipNorm: null
    },
    laterLearningRate: 0.005
  },
  {
    title: 'AdamW, clipped',
    config: {
      learningRate: 0.01,
      beta1: 0.9,
      beta2: 0.999,
      epsilon: 1e-7,
      weightDecay: 0.05,
      clipNorm: 1.5
    }
  },
  {
    title: 'Adam, clip norm above the norm',
    config:
        {learningRate: 0.01, beta1: 0.9, beta2: 0.999, epsilon: 1e-7, weightDecay: 0, clipNorm: 1e4}
  },
];

async function checkAgainstOracle(c: OracleCase, rng: Rng, steps: number): Promise<void> {
  const what = `${c.title} (seed ${rng.seed})`;
  const initial = SHAPES.map(s => randomArray(tf.util.sizeFromShape(s), rng));
  const variables = SHAPES.map(
      (s, i) => tf.variable(tf.tensor(Float32Array.from(initial[i]), s), true, uniqueName('p')));
  const oracle = adamWOracleInit(initial);
  const config = {...c.config};
  const optimizer = c.config.weightDecay === 0 ? fusedAdam({...config}) : fusedAdamW({...config});
  for (let step = 0; step < steps; step++) {
    if (step === 2 && c.laterLearningRate != null) {
      optimizer.learningRate = c.laterLearningRate;
      config.learningRate = c.laterLearningRate;
    }
    const grads = SHAPES.map(s => randomArray(tf.util.sizeFromShape(s), rng, 2));
    const named: tf.NamedTensorMap = {};
    variables.forEach((v, i) => {
      named[v.name] = tf.tensor(Float32Array.from(grads[i]), SHAPES[i]);
    });
    optimizer.applyGradients(named);
    tf.dispose(Object.values(named));
    adamWOracleStep(oracle, grads, config);
  }
  expect(optimizer.iterations).toBe(steps);
  const weights = await optimizer.getWeights();
  expect(weights.length).toBe(1 + 2 * SHAPES.length);
  for (let i = 0; i < SHAPES.length; i++) {
    expectClose(await variables[i].data(), oracle.params[i], BOUND, `${what}: param ${i}`);
    const m = weights.find(w => w.name === `${variables[i].name}/m`)!;
    const v = weights.find(w => w.name === `${variables[i].name}/v`)!;
    expectClose(await m.tensor.data(), oracle.m[i], BOUND, `${what}: m ${i}`);
    expectClose(await v.tensor.data(), oracle.v[i], BOUND, `${what}: v ${i}`);
  }
  if (tf.getBackend() === 'webgpu' && tf.env().get(FUSED_ADAMW_IMPL) === 'fused' &&
      c.config.clipNorm != null) {
    const norm = await optimizer.lastGradNorm();
    expect(Math.abs(norm! - oracle.gradNorm) / oracle.gradNorm).toBeLessThan(1e-5);
  }
  tf.dispose(weights.slice(0, 1).map(w => w.tensor));
  optimizer.dispose();
  tf.dispose(variables);
}

describeBackends('fused AdamW', backend => {
  for (const impl of implsOf(backend)) {
    describe(`${impl} implementation`, () => {
      for (const c of CASES) {
        it(`matches the float64 oracle over 5 steps: ${c.title}`, async () => {
          await withImpl(impl, () => checkAgainstOracle(c, freshRng(), 5));
        });
      }
      if (impl === 'fused') {
        // All steps in one of tfjs's command encoders (no submit between
        // them), with a learning-rate change that must not overtake them.
        it('matches the oracle with WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE=100000', async () => {
          const saved = tf.env().get('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE');
          tf.env().set('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE', 100000);
          try {
            await withImpl(impl, () => checkAgainstOracle(CASES[1], freshRng(), 5));
            await withImpl(impl, () => checkAgainstOracle(CASES[2], freshRng(), 5));
          } finally {
            tf.env().set('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE', saved);
          }
        });
      }
    });
  }

  it('minimize: fused and reference give the same parameters and losses', async () => {
    const rng = freshRng();
    const x = tf.tensor2d(Float32Array.from(randomArray(16 * 6, rng)), [16, 6]);
    const y = tf.tensor2d(Float32Array.from(randomArray(16 * 3, rng)), [16, 3]);
    const w0 = Float32Array.from(randomArray(6 * 3, rng));
    const run = (impl: string) => withImpl(impl, async () => {
      const w = tf.variable(tf.tensor2d(w0, [6, 3]), true, uniqueName('w'));
      const b = tf.variable(tf.zeros([3]), true, uniqueName('b'));
      const optimizer = fusedAdamW({learningRate: 0.05, weightDecay: 0.01, clipNorm: 5});
      const losses: number[] = [];
      for (let step = 0; step < 8; step++) {
        const loss = optimizer.minimize(
            () => tf.losses.meanSquaredError(y, tf.add(tf.matMul(x, w), b)) as tf.Scalar, true)!;
        losses.push((await loss.data())[0]);
        loss.dispose();
      }
      const params = [await w.data(), await b.data()];
      optimizer.dispose();
      tf.dispose([w, b]);
      return {losses, params};
    });
    const reference = await run('reference');
    expect(reference.losses[7]).toBeLessThan(reference.losses[0]);
    if (backend === 'webgpu') {
      const fused = await run('fused');
      expectClose(fused.losses, reference.losses, 1e-5, `losses (seed ${rng.seed})`);
      expectClose(fused.params[0], reference.params[0], 1e-5, `w (seed ${rng.seed})`);
      expectClose(fused.params[1], reference.params[1], 1e-5, `b (seed ${rng.seed})`);
    }
    tf.dispose([x, y]);
  });

  it('model.fit trains a tfjs-layers model like the reference', async () => {
    const rng = freshRng();
    const x = tf.tensor2d(Float32Array.from(randomArray(32 * 4, rng)), [32, 4]);
    const y = tf.tensor2d(Float32Array.from(randomArray(32 * 8, rng)), [32, 8]);
    const kernel0 = Float32Array.from(randomArray(8 * 4, rng, 0.5));
    const fit = (impl: string) => withImpl(impl, async () => {
      const model = tfl.sequential({layers: [tfl.layers.dense({units: 8, inputShape: [4]})]});
      model.layers[0].setWeights([tf.tensor2d(kernel0, [4, 8]), tf.zeros([8])]);
      model.compile({optimizer: fusedAdamW({learningRate: 0.01}), loss: 'meanSquaredError'});
      const history = await model.fit(x, y, {epochs: 2, batchSize: 16, shuffle: false, verbose: 0});
      const weights = await Promise.all(model.getWeights().map(t => t.data()));
      const losses = history.history.loss as number[];
      model.optimizer.dispose();
      model.dispose();
      return {losses, weights};
    });
    const reference = await fit('reference');
    expect(reference.losses[1]).toBeLessThan(reference.losses[0]);
    if (backend === 'webgpu') {
      const fused = await fit('fused');
      expectClose(fused.losses, reference.losses, 1e-5, `fit losses (seed ${rng.seed})`);
      fused.weights.forEach(
          (w, i) =>
              expectClose(w, reference.weights[i], 1e-5, `fit weight ${i} (seed ${rng.seed})`));
    }
    tf.dispose([x, y]);
  });

  it('saves and restores config and weights; training resumes identically', async () => {
    const rng = freshRng();
    const shape = [5, 3];
    const init = Float32Array.from(randomArray(15, rng));
    const grads = Array.from({length: 5}, () => Float32Array.from(randomArray(15, rng)));
    const p = tf.variable(tf.tensor(init, shape), true, uniqueName('p'));
    const stepWith = (o: tf.Optimizer, g: Float32Array) => {
      const t = tf.tensor(g, shape);
      o.applyGradients({[p.name]: t});
      t.dispose();
    };
    const original = fusedAdamW({learningRate: 0.03, weightDecay: 0.02, clipNorm: 2, beta2: 0.95});
    for (let s = 0; s < 3; s++) {
      stepWith(original, grads[s]);
    }
    // Through JSON, as a saved model's optimizer config would go.
    const config = JSON.parse(JSON.stringify(original.getConfig()));
    const cls = tf.serialization.SerializationMap.getMap().classNameMap['FusedAdamW'];
    expect(cls).toBeDefined();
    const restored = cls[1](cls[0], config) as FusedAdamW;
    expect(restored).toBeInstanceOf(FusedAdamW);
    expect(restored.getConfig()).toEqual(original.getConfig());
    const saved = await original.getWeights();
    // Copies, as weights loaded from a file would be.
    const copies = await Promise.all(saved.map(
        async w => ({name: w.name, tensor: tf.tensor(await w.tensor.data(), w.tensor.shape)})));
    const savedFirstMoment = await saved[1].tensor.data();
    await restored.setWeights(copies);
    expect(restored.iterations).toBe(3);
    const atSave = await p.data();
    for (let s = 3; s < 5; s++) {
      stepWith(original, grads[s]);
    }
    const continued = await p.data();
    p.assign(tf.tensor(atSave, shape));
    for (let s = 3; s < 5; s++) {
      stepWith(restored, grads[s]);
    }
    expectClose(await p.data(), continued, 1e-6, `resumed training (seed ${rng.seed})`);
    // The loaded tensors are the caller's: stepping must not have changed them.
    expectClose(
        await copies[1].tensor.data(), savedFirstMoment, 0, 'setWeights input left untouched');
    tf.dispose(copies.map(c => c.tensor));
    saved[0].tensor.dispose();
    original.dispose();
    restored.dispose();
    p.dispose();
  });

  it('model.save with includeOptimizer and loadLayersModel restore it', async () => {
    const rng = freshRng();
    const x = tf.tensor2d(Float32Array.from(randomArray(8 * 4, rng)), [8, 4]);
    const y = tf.tensor2d(Float32Array.from(randomArray(8 * 3, rng)), [8, 3]);
    const model = tfl.sequential({layers: [tfl.layers.dense({units: 3, inputShape: [4]})]});
    model.compile(
        {optimizer: fusedAdamW({learningRate: 0.02, weightDecay: 0.05}), loss: 'meanSquaredError'});
    await model.fit(x, y, {epochs: 2, batchSize: 4, shuffle: false, verbose: 0});
    let artifacts: tf.io.ModelArtifacts|null = null;
    await model.save(
        tf.io.withSaveHandler(async a => {
          artifacts = a;
          return {modelArtifactsInfo: {dateSaved: new Date(), modelTopologyType: 'JSON'}};
        }),
        {includeOptimizer: true});
    const loaded = await tfl.loadLayersModel(tf.io.fromMemory(artifacts!));
    expect(loaded.optimizer).toBeInstanceOf(FusedAdamW);
    expect(loaded.optimizer.getConfig()).toEqual(model.optimizer.getConfig());
    expect(loaded.optimizer.iterations).toBe(4);
    // One more epoch on each: the same weights if the moments came back.
    await model.fit(x, y, {epochs: 1, batchSize: 4, shuffle: false, verbose: 0});
    await loaded.fit(x, y, {epochs: 1, batchSize: 4, shuffle: false, verbose: 0});
    const expected = await Promise.all(model.getWeights().map(w => w.data()));
    const actual = await Promise.all(loaded.getWeights().map(w => w.data()));
    actual.forEach(
        (a, i) => expectClose(a, expected[i], 1e-6, `reloaded weight ${i} (seed ${rng.seed})`));
    model.optimizer.dispose();
    loaded.optimizer.dispose();
    model.dispose();
    loaded.dispose();
    tf.dispose([x, y]);
  });

  it('updates a variable that shares its data without changing the other tensor', async () => {
    const source = tf.tensor1d([1, 2, 3, 4]);
    const p = tf.variable(source, true, uniqueName('shared'));
    const optimizer = fusedAdam({learningRate: 0.1});
    const g = tf.tensor1d([1, -1, 1, -1]);
    optimizer.applyGradients({[p.name]: g});
    expect(Array.from(await source.data())).toEqual([1, 2, 3, 4]);
    expectClose(await p.data(), [0.9, 2.1, 2.9, 4.1], 1e-6, 'shared variable step');
    optimizer.dispose();
    tf.dispose([source, p, g]);
  });

  it('leaks no tensors (nor GPU bytes) over many steps', async () => {
    const w = tf.variable(tf.randomNormal([64, 16]), true, uniqueName('leak'));
    const x = tf.randomNormal([8, 64]);
    const optimizer = fusedAdamW({clipNorm: 1});
    const stepOnce = async () => {
      const loss =
          optimizer.minimize(() => tf.mean(tf.square(tf.matMul(x, w))) as tf.Scalar, true, [w])!;
      await loss.data();
      loss.dispose();
    };
    await stepOnce();
    await stepOnce();
    const before = tf.memory() as tf.MemoryInfo & {numBytesInGPU?: number};
    for (let s = 0; s < 12; s++) {
      await stepOnce();
    }
    const after = tf.memory() as tf.MemoryInfo & {numBytesInGPU?: number};
    expect(after.numTensors).toBe(before.numTensors);
    expect(after.numBytesInGPU ?? 0).toBe(before.numBytesInGPU ?? 0);
    const withOptimizer = tf.memory().numTensors;
    optimizer.dispose();
    expect(tf.memory().numTensors).toBe(withOptimizer - 2);
    tf.dispose([w, x]);
  });

  // Counts only the webgpu backend has (other backends register no such test).
  if (backend === 'webgpu') {
    it('webgpu: a step uploads nothing, submits nothing of its own, dispatches 2 per variable + 1',
       async () => {
         const shapes = [[40, 8], [8], [3, 5, 7]];
         const vars = shapes.map(s => tf.variable(tf.randomNormal(s), true, uniqueName('count')));
         const seeds = shapes.map(s => tf.randomNormal(s));
         const optimizer = fusedAdamW({clipNorm: 1});
         // Gradients made by GPU kernels from tensors already on the GPU.
         const stepOnce = () => {
           const grads: tf.NamedTensorMap = {};
           vars.forEach((v, i) => {
             grads[v.name] = tf.mul(seeds[i], v);
           });
           optimizer.applyGradients(grads);
           tf.dispose(Object.values(grads));
         };
         // The first step writes moments, plan and hyperparameters; the second
         // uploads the seeds (the first Multiply ran on the CPU: small inputs).
         stepOnce();
         stepOnce();
         await vars[0].data();
         const counters = webgpuCounters();
         const steps = 4;
         for (let s = 0; s < steps; s++) {
           stepOnce();
         }
         const counts = counters.snapshot();
         expect(counts.hostUploads).toBe(0);
         expect(counts.writeBuffers).toBe(steps * shapes.length);  // tfjs's Multiply uniforms
         expect(counts.submits).toBe(0);
         // tfjs's Multiply, then per variable a norm and an update, and one step dispatch.
         expect(counts.dispatches).toBe(steps * (shapes.length + 2 * shapes.length + 1));
         expect(optimizer.iterations).toBe(2 + steps);
         optimizer.dispose();
         tf.dispose([...vars, ...seeds]);
       });
  }

  it('rejects bad hyperparameters and gradients, naming them', () => {
    expect(() => fusedAdamW({learningRate: -1}))
        .toThrow('fusedAdamW: learningRate must be a finite number >= 0, got -1');
    expect(() => fusedAdamW({beta2: 1})).toThrow('fusedAdamW: beta2 must be in [0, 1), got 1');
    expect(() => fusedAdamW({clipNorm: NaN})).toThrow('fusedAdamW: clipNorm must be');
    const p = tf.variable(tf.zeros([3]), true, uniqueName('bad'));
    const g = tf.zeros([4]);
    const optimizer = fusedAdam();
    expect(() => optimizer.applyGradients({[p.name]: g}))
        .toThrow(`fusedAdamW: the gradient of '${p.name}' must have shape [3], got [4]`);
    optimizer.dispose();
    tf.dispose([p, g]);
  });
});
