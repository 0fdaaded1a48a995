/**
 * The shared WebGPU pieces (kernels/webgpu/wgsl_snippets.ts and
 * own_pipeline.ts) on Dawn: Philox bits identical to src/dropout.ts, a
 * pipeline with two outputs over tfjs tensors, ordering with tfjs's own
 * queue, and shader/validation errors surfacing as thrown errors.
 */
import * as tf from '@tensorflow/tfjs-core';

import {checkOwnPipelineErrors, OwnPipelineSpec, runOwnPipeline, UniformWriter, webgpuBackendOf} from '../kernels/webgpu/own_pipeline';
import {dropoutWGSL, philoxWGSL, scoreWGSL} from '../kernels/webgpu/wgsl_snippets';
import {dropoutThreshold, philox4x32} from '../src/dropout';

import {selectedBackends, useBackend} from './harness/backends';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

describeWebGPU('shared WebGPU pieces [webgpu]', () => {
  beforeAll(() => useBackend('webgpu'));

  it('Philox4x32-10 and dropout multipliers in WGSL give src/dropout.ts bits', async () => {
    const backend = webgpuBackendOf();
    const n = 256;
    const seedLo = 0x9abcdef1;
    const seedHi = 0x13572468;
    const rate = 0.3;
    const spec: OwnPipelineSpec = {
      key: 'test-philox',
      numInputs: 1,
      numOutputs: 2,
      hasUniforms: true,
      code: () => `${philoxWGSL()}${dropoutWGSL()}
struct U { seedLo: u32, seedHi: u32, threshold: u32, keepScale: f32 }
@group(0) @binding(0) var<storage, read> ctr: array<u32>;
@group(0) @binding(1) var<storage, read_write> words: array<u32>;
@group(0) @binding(2) var<storage, read_write> keep: array<f32>;
@group(0) @binding(3) var<uniform> u: U;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  let t = g.x;
  let c = vec4<u32>(ctr[4u * t], ctr[4u * t + 1u], ctr[4u * t + 2u], ctr[4u * t + 3u]);
  let w = fa_philox(c, vec2<u32>(u.seedLo, u.seedHi));
  words[4u * t] = w.x; words[4u * t + 1u] = w.y; words[4u * t + 2u] = w.z; words[4u * t + 3u] = w.w;
  let k = fa_dropout4(c.w, c.z, c.y, c.x, vec2<u32>(u.seedLo, u.seedHi), u.threshold, u.keepScale);
  keep[4u * t] = k.x; keep[4u * t + 1u] = k.y; keep[4u * t + 2u] = k.z; keep[4u * t + 3u] = k.w;
}`,
    };
    const counters = new Int32Array(4 * n);
    for (let t = 0; t < n; t++) {
      // Counters with high bits set too (an int32 view of uint32 words).
      counters.set([t * 2654435761, t, (t * 7) ^ 0x80000000, t % 5], 4 * t);
    }
    const ctr = tf.tensor1d(counters, 'int32');
    const uniforms = new UniformWriter()
                         .u32(seedLo)
                         .u32(seedHi)
                         .u32(dropoutThreshold(rate))
                         .f32(1 / (1 - rate))
                         .finish();
    const [words, keep] = runOwnPipeline(backend, spec, {
      inputs: [ctr],
      outputs: [{shape: [4 * n], dtype: 'int32'}, {shape: [4 * n], dtype: 'float32'}],
      uniforms,
      dispatch: [n / 64, 1, 1],
    });
    const gotWords = new Uint32Array((await backend.read(words.dataId) as Int32Array).buffer);
    const gotKeep = await backend.read(keep.dataId) as Float32Array;
    await checkOwnPipelineErrors();
    const expected = new Uint32Array(4);
    for (let t = 0; t < n; t++) {
      const c = Array.from(counters.subarray(4 * t, 4 * t + 4), x => x >>> 0);
      philox4x32(c[0], c[1], c[2], c[3], seedLo, seedHi, expected);
      expect(Array.from(gotWords.subarray(4 * t, 4 * t + 4))).toEqual(Array.from(expected));
      // fa_dropout4(b=c3, h=c2, i=c1, quad=c0): the counter is (quad, i, h, b).
      for (let e = 0; e < 4; e++) {
        const want = expected[e] >= dropoutThreshold(rate) ? Math.fround(1 / (1 - rate)) : 0;
        expect(gotKeep[4 * t + e]).toBe(want);
      }
    }
    backend.disposeData(words.dataId);
    backend.disposeData(keep.dataId);
    ctr.dispose();
  });

  it('runs after the tfjs work that made its inputs, before the work that reads its outputs',
     async () => {
       const backend = webgpuBackendOf();
       const spec: OwnPipelineSpec = {
         key: 'test-order',
         numInputs: 1,
         numOutputs: 2,
         hasUniforms: false,
         code: () => `
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> b: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  if (g.x < arrayLength(&x)) { a[g.x] = x[g.x] * 2.0; b[g.x] = x[g.x] + 1.0; }
}`,
       };
       const before = tf.memory().numTensors;
       const n = 3000;  // above tfjs's CPU-forwarding threshold
       const base = tf.range(0, n, 1, 'float32');
       const x = tf.mul(base, 3);  // a tfjs kernel still in tfjs's encoder
       const [a, b] = runOwnPipeline(backend, spec, {
                        inputs: [x],
                        outputs: [{shape: [n], dtype: 'float32'}, {shape: [n], dtype: 'float32'}],
                        dispatch: [Math.ceil(n / 64), 1, 1],
                      }).map(t => tf.engine().makeTensorFromTensorInfo(t));
       x.dispose();               // released while our dispatch may still be queued
       const sum = tf.add(a, b);  // a tfjs kernel after ours
       const got = await sum.data();
       for (let i = 0; i < n; i++) {
         expect(got[i]).toBe(i * 3 * 2 + i * 3 + 1);
       }
       await checkOwnPipelineErrors();
       tf.dispose([base, a, b, sum]);
       expect(tf.memory().numTensors).toBe(before);
     });

  it('surfaces a WGSL error as a thrown error, then refuses the pipeline synchronously',
     async () => {
       const backend = webgpuBackendOf();
       const spec: OwnPipelineSpec = {
         key: 'test-broken',
         numInputs: 1,
         numOutputs: 1,
         hasUniforms: false,
         code: () => `
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  y[g.x] = x[g.x] * undefinedThing;
}`,
       };
       const x = tf.ones([64]);
       const before = tf.memory().numTensors;
       const [y] = runOwnPipeline(backend, spec, {
         inputs: [x],
         outputs: [{shape: [64], dtype: 'float32'}],
         dispatch: [1, 1, 1],
       });
       backend.disposeData(y.dataId);
       await expect(checkOwnPipelineErrors())
           .rejects.toThrow(/test-broken.*(undefinedThing|unresolved)/s);
       expect(() => runOwnPipeline(backend, spec, {
                inputs: [x],
                outputs: [{shape: [64], dtype: 'float32'}],
                dispatch: [1, 1, 1],
              }))
           .toThrow(/test-broken/);
       expect(tf.memory().numTensors).toBe(before);
       x.dispose();
     });

  it('surfaces a validation error (workgroup storage over the device limit)', async () => {
    const backend = webgpuBackendOf();
    const limit = backend.device.limits.maxComputeWorkgroupStorageSize;
    const spec: OwnPipelineSpec = {
      key: 'test-too-much-shared',
      numInputs: 1,
      numOutputs: 1,
      hasUniforms: false,
      code: () => `
var<workgroup> tile: array<f32, ${limit / 4 + 1024}>;
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(local_invocation_index) l: u32) {
  tile[l] = x[l];
  workgroupBarrier();
  y[l] = tile[63u - l];
}`,
    };
    const x = tf.ones([64]);
    const [y] = runOwnPipeline(backend, spec, {
      inputs: [x],
      outputs: [{shape: [64], dtype: 'float32'}],
      dispatch: [1, 1, 1],
    });
    backend.disposeData(y.dataId);
    await expect(checkOwnPipelineErrors()).rejects.toThrow(/test-too-much-shared/);
    x.dispose();
  });

  it('scoreWGSL compiles with every option on', async () => {
    const backend = webgpuBackendOf();
    const spec: OwnPipelineSpec = {
      key: 'test-score-all',
      numInputs: 1,
      numOutputs: 1,
      hasUniforms: false,
      code: () => `${scoreWGSL({
        softcap: true,
        alibi: true,
        windowLeft: true,
        windowRight: true
      })}
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(8) fn main(@builtin(local_invocation_index) l: u32) {
  let p = FaScore(0.5, 2.0, 0.25, 3, 2, 0, 8, 5);
  let i = i32(l);
  y[l] = select(-1e30, fa_score(x[l], i, 5, p), fa_visible(i, 5, p));
}`,
    };
    const xs = [0.3, -1, 2, 40, -3, 0.5, 1, 7];
    const x = tf.tensor1d(xs);
    const [y] = runOwnPipeline(backend, spec, {
      inputs: [x],
      outputs: [{shape: [8], dtype: 'float32'}],
      dispatch: [1, 1, 1],
    });
    const got = await backend.read(y.dataId) as Float32Array;
    await checkOwnPipelineErrors();
    xs.forEach((qk, i) => {
      // diag 3: query i sees keys [i + 1, i + 3]; key 5 needs i in [2, 4].
      const visible = i + 3 - 2 <= 5 && 5 <= i + 3;
      const want = visible ? 2 * Math.tanh(qk * 0.5 / 2) - 0.25 * Math.abs(i + 3 - 5) : -1e30;
      expect(Math.abs(got[i] - want)).toBeLessThan(1e-5 * Math.max(1, Math.abs(want)));
    });
    backend.disposeData(y.dataId);
    x.dispose();
  });
});
