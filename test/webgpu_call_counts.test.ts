/**
 * What one steady-state call of the fused WebGPU kernels costs the WebGPU
 * API (benchmarks/webgpu_counters.ts): queue submits, error scopes, host
 * uploads, buffers created, dispatches, uniform writes and buffer copies,
 * pinned exactly so the per-call overhead cannot creep back; each counted
 * call's results are also checked against the float64 oracle.
 */
import * as tf from '@tensorflow/tfjs-core';

import {webgpuCounters, WebGPUCounts} from '../benchmarks/webgpu_counters';
import {setForwardOverride} from '../kernels/webgpu/FlashAttention';
import {checkOwnPipelineErrors} from '../kernels/webgpu/own_pipeline';
import {FLASH_ATTENTION_IMPL, flashAttention, flashAttentionWithKVCache} from '../src';
import {buildGPT, generateIdsWithCache, withDeferredSubmits} from '../demo/gpt';
import {flashMHA, FlashMHAArgs, IncrementalDecoder} from '../src/layers';

import {selectedBackends, useBackend} from './harness/backends';
import {expectClose, FORWARD_BOUND, freshRng, GRADIENT_BOUND, makeProblem, randomArray} from './harness/problems';
import {oracleBackward, oracleForward, oracleKVCache, oracleRotary} from './oracle';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

/** The counts that must not grow, without the timings and shapes. */
function countsOf(c: WebGPUCounts) {
  return {
    submits: c.submits,
    errorScopes: c.errorScopes,
    hostUploads: c.hostUploads,
    buffersCreated: c.buffersCreated,
    dispatches: c.dispatches,
    writeBuffers: c.writeBuffers,
    bufferCopies: c.bufferCopies,
    readBacks: c.readBacks,
  };
}

/**
 * The id the next tensor gets: tensor ids count up from one counter, so
 * the difference of two readings is the tensors made in between, plus one.
 */
function tensorIdNow(): number {
  const probe = tf.scalar(0);
  probe.dispose();
  return probe.id;
}

/**
 * `run()`, one call not yet read back, and what it did: countsOf, the bind
 * groups it made and the tensors it made.
 */
function countedCall<T>(run: () => T) {
  const counters = webgpuCounters();
  const firstId = tensorIdNow();
  const result = run();
  const snapshot = counters.snapshot();
  const counts = {
    ...countsOf(snapshot),
    bindGroups: snapshot.bindGroups,
    tensorsMade: tensorIdNow() - firstId - 1,
  };
  return {result, counts};
}

describeWebGPU('per-call WebGPU API counts [webgpu]', () => {
  beforeAll(() => useBackend('webgpu'));
  afterEach(() => setForwardOverride(null));

  it('forward: 1 dispatch, no submit, no error scope, no upload', async () => {
    // The planner's short-grid tiling (16 x 64), forced: SwiftShader is
    // never given it, so it is checked against the oracle here.
    setForwardOverride({tiles: {tm: 2, tx: 16, nq: 1, ty: 8}});
    const before = tf.memory().numTensors;
    const rng = freshRng();
    const shape = {batch: 1, seqQ: 40, seqK: 40, heads: 2, headsKV: 2, headDim: 64, headDimV: 64};
    const p = makeProblem(shape, rng);
    const opts = {causal: true};
    // First uses compile and check the pipeline inside error scopes.
    for (let warm = 0; warm < 2; warm++) {
      const out = flashAttention(p.q, p.k, p.v, opts) as tf.Tensor;
      await out.data();
      out.dispose();
    }
    const {result: out, counts} =
        countedCall(() => flashAttention(p.q, p.k, p.v, opts) as tf.Tensor);
    const got = await out.data();
    await checkOwnPipelineErrors();
    expect(counts).toEqual({
      submits: 0,
      errorScopes: 0,
      hostUploads: 0,
      buffersCreated: 0,
      dispatches: 1,
      writeBuffers: 0,  // its uniforms repeat: a buffer kept since the first call
      bufferCopies: 0,
      readBacks: 0,
      bindGroups: 0,   // the same buffers as the calls before: their bind group kept
      tensorsMade: 3,  // out and lse, and one empty tensor for the absent alibiSlopes and seqlens
    });
    expectClose(
        got, oracleForward(p.oracle, opts).out, FORWARD_BOUND, `forward (seed ${rng.seed})`);
    out.dispose();
    p.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });

  it('forward + backward: 4 dispatches, no submit, no error scope, no upload', async () => {
    const before = tf.memory().numTensors;
    const rng = freshRng();
    const shape = {batch: 1, seqQ: 24, seqK: 24, heads: 2, headsKV: 1, headDim: 16, headDimV: 16};
    const p = makeProblem(shape, rng);
    const opts = {causal: true};
    const dOut = randomArray(p.oracle.q.length, rng);
    const dy = tf.tensor4d(Float32Array.from(dOut), p.q.shape);
    const gradsOf = tf.grads(
        (q: tf.Tensor, k: tf.Tensor, v: tf.Tensor) =>
            flashAttention(q as tf.Tensor4D, k as tf.Tensor4D, v as tf.Tensor4D, opts) as
            tf.Tensor);
    for (let warm = 0; warm < 2; warm++) {
      const grads = gradsOf([p.q, p.k, p.v], dy);
      await Promise.all(grads.map(g => g.data()));
      tf.dispose(grads);
    }
    const {result: grads, counts} = countedCall(() => gradsOf([p.q, p.k, p.v], dy));
    const [dq, dk, dv] = await Promise.all(grads.map(g => g.data()));
    await checkOwnPipelineErrors();
    expect(counts).toEqual({
      submits: 0,
      errorScopes: 0,
      hostUploads: 0,
      buffersCreated: 0,
      dispatches: 4,    // forward, then the backward's delta, dK/dV and dQ passes
      writeBuffers: 0,  // uniform buffers kept per content
      bufferCopies: 0,
      readBacks: 0,
      bindGroups: 0,
      // The forward's 3, the tape's copies of the 5 tensors the gradient
      // saves (q, k, v, out, lse: no empty ALiBi or lengths input), the
      // tape's zero gradient of the unused lse (marked: never read), the
      // backward's empty tensor for the absent inputs, dq, dk and dv.
      tensorsMade: 13,
    });
    const want = oracleBackward(
        p.oracle, opts, dOut, new Float64Array(shape.batch * shape.heads * shape.seqQ));
    expectClose(dq, want.dq, GRADIENT_BOUND, `dq (seed ${rng.seed})`);
    expectClose(dk, want.dk, GRADIENT_BOUND, `dk (seed ${rng.seed})`);
    expectClose(dv, want.dv, GRADIENT_BOUND, `dv (seed ${rng.seed})`);
    tf.dispose(grads);
    dy.dispose();
    p.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });

  it('uniform buffers kept per content: each call still reads its own options', async () => {
    const before = tf.memory().numTensors;
    const rng = freshRng();
    // The previous test's shape and mask: its pipeline, already compiled.
    const shape = {batch: 1, seqQ: 24, seqK: 24, heads: 2, headsKV: 1, headDim: 16, headDimV: 16};
    const p = makeProblem(shape, rng);
    // More distinct uniforms than the cache keeps, all in flight before any
    // read: buffers the cache drops are still bound by pending dispatches.
    const calls =
        Array.from({length: 70}, (_, n) => ({causal: true, softmaxScale: 0.1 + 0.01 * n}));
    const outs = calls.map(o => flashAttention(p.q, p.k, p.v, o) as tf.Tensor);
    const got = await Promise.all(outs.map(o => o.data()));
    await checkOwnPipelineErrors();
    calls.forEach(
        (o, n) => expectClose(
            got[n], oracleForward(p.oracle, o).out, FORWARD_BOUND,
            `call ${n} ${JSON.stringify(o)} (seed ${rng.seed})`));
    tf.dispose(outs);
    p.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });

  it('bind groups kept per buffer: a reused one reads what its buffers hold now', async () => {
    const before = tf.memory().numTensors;
    const rng = freshRng();
    // The earlier tests' shape and mask: its pipeline, already compiled.
    const shape = {batch: 1, seqQ: 24, seqK: 24, heads: 2, headsKV: 1, headDim: 16, headDimV: 16};
    const opts = {causal: true};
    const counters = webgpuCounters();
    const calls = 8;
    for (let n = 0; n < calls; n++) {
      // Fresh inputs each call: tfjs hands the buffers the last call freed
      // to the new tensors (k's and v's are the same size, so they can
      // trade places), and a kept bind group must see the new values.
      const p = makeProblem(shape, rng);
      const out = flashAttention(p.q, p.k, p.v, opts) as tf.Tensor;
      expectClose(
          await out.data(), oracleForward(p.oracle, opts).out, FORWARD_BOUND,
          `call ${n} (seed ${rng.seed})`);
      out.dispose();
      p.dispose();
    }
    await checkOwnPipelineErrors();
    // Buffers came back: some calls bound a combination seen before.
    expect(counters.snapshot().bindGroups).toBeLessThan(calls);
    expect(tf.memory().numTensors).toBe(before);
  });

  it('forward plans kept per shape and options: alternating calls each get their own', async () => {
    const before = tf.memory().numTensors;
    const rng = freshRng();
    // The earlier tests' head dims and mask (their pipeline), two key lengths.
    const base = {batch: 1, seqQ: 24, heads: 2, headsKV: 1, headDim: 16, headDimV: 16};
    const problems = [makeProblem({...base, seqK: 24}, rng), makeProblem({...base, seqK: 17}, rng)];
    const options = [{causal: true}, {causal: true, softmaxScale: 0.3}];
    for (let round = 0; round < 2; round++) {
      for (const [n, p] of problems.entries()) {
        for (const opts of options) {
          const out = flashAttention(p.q, p.k, p.v, opts) as tf.Tensor;
          expectClose(
              await out.data(), oracleForward(p.oracle, opts).out, FORWARD_BOUND,
              `round ${round}, problem ${n}, ${JSON.stringify(opts)} (seed ${rng.seed})`);
          out.dispose();
        }
      }
    }
    await checkOwnPipelineErrors();
    problems.forEach(p => p.dispose());
    expect(tf.memory().numTensors).toBe(before);
  });

  it('backward plans kept per shape and options: alternating calls each get their own',
     async () => {
       const before = tf.memory().numTensors;
       const rng = freshRng();
       // The forward+backward test's head dims, two key lengths, two scales;
       // the lse returned and its gradient given (dLse read) or not.
       const base = {batch: 1, seqQ: 24, heads: 2, headsKV: 1, headDim: 16, headDimV: 16};
       const problems =
           [makeProblem({...base, seqK: 24}, rng), makeProblem({...base, seqK: 17}, rng)];
       const options = [{causal: true}, {causal: true, softmaxScale: 0.3}];
       const dOut = randomArray(base.batch * base.seqQ * base.heads * base.headDimV, rng);
       const dLse = randomArray(base.batch * base.heads * base.seqQ, rng);
       const dy = tf.tensor4d(Float32Array.from(dOut), [1, 24, 2, 16]);
       const dyLse = tf.tensor3d(Float32Array.from(dLse), [1, 2, 24]);
       const noLse = new Float64Array(dLse.length);
       for (let round = 0; round < 2; round++) {
         for (const [n, p] of problems.entries()) {
           for (const opts of options) {
             for (const withLse of [false, true]) {
               const grads = tf.grads((q: tf.Tensor, k: tf.Tensor, v: tf.Tensor) => {
                 const args = [q, k, v] as tf.Tensor4D[];
                 if (!withLse) {
                   return tf.mul(flashAttention(args[0], args[1], args[2], opts), dy);
                 }
                 const [out, lse] =
                     flashAttention(args[0], args[1], args[2], {...opts, returnSoftmaxLse: true});
                 return tf.add(tf.sum(tf.mul(out, dy)), tf.sum(tf.mul(lse, dyLse)));
               })([p.q, p.k, p.v]);
               const got = await Promise.all(grads.map(g => g.data()));
               const want = oracleBackward(p.oracle, opts, dOut, withLse ? dLse : noLse);
               const what = `round ${round}, problem ${n}, ${JSON.stringify(opts)}, lse ${
                   withLse} (seed ${rng.seed})`;
               expectClose(got[0], want.dq, GRADIENT_BOUND, `${what}: dq`);
               expectClose(got[1], want.dk, GRADIENT_BOUND, `${what}: dk`);
               expectClose(got[2], want.dv, GRADIENT_BOUND, `${what}: dv`);
               tf.dispose(grads);
             }
           }
         }
       }
       await checkOwnPipelineErrors();
       problems.forEach(p => p.dispose());
       tf.dispose([dy, dyLse]);
       expect(tf.memory().numTensors).toBe(before);
     });

  it('decode step with rotary: 3 dispatches, 2 uniform writes, no copy, no upload', async () => {
    const rng = freshRng();
    const [batch, seqMax, heads, headsKV, d, half] = [2, 24, 4, 2, 16, 4];
    const before = tf.memory().numTensors;
    const kRef = randomArray(batch * seqMax * headsKV * d, rng);
    const vRef = randomArray(batch * seqMax * headsKV * d, rng);
    const cos = randomArray((seqMax + 1) * half, rng);
    const sin = randomArray((seqMax + 1) * half, rng);
    const cacheShape: [number, number, number, number] = [batch, seqMax, headsKV, d];
    const kInit = tf.tensor4d(Float32Array.from(kRef), cacheShape);
    const vInit = tf.tensor4d(Float32Array.from(vRef), cacheShape);
    const kVar = tf.variable(kInit, false);
    const vVar = tf.variable(vInit, false);
    tf.dispose([kInit, vInit]);
    const cosT = tf.tensor2d(Float32Array.from(cos), [seqMax + 1, half]);
    const sinT = tf.tensor2d(Float32Array.from(sin), [seqMax + 1, half]);
    const opts = {causal: true};
    const dims = {batch, seqQ: 1, seqMax, seqNew: 1, heads, headsKV, headDim: d, headDimV: d};
    let lengths = [3, 7];
    for (let step = 0; step < 5; step++) {
      const q = randomArray(batch * heads * d, rng);
      const k = randomArray(batch * headsKV * d, rng);
      const v = randomArray(batch * headsKV * d, rng);
      const [qT, kT, vT] = [
        tf.tensor4d(Float32Array.from(q), [batch, 1, heads, d]),
        tf.tensor4d(Float32Array.from(k), [batch, 1, headsKV, d]),
        tf.tensor4d(Float32Array.from(v), [batch, 1, headsKV, d]),
      ];
      // Inputs on the GPU already, as a model's projections would be.
      const backend = tf.backend() as unknown as {uploadToGPU(dataId: object): void};
      [qT, kT, vT].forEach(t => backend.uploadToGPU(t.dataId));
      const counters = webgpuCounters();
      const out = flashAttentionWithKVCache(qT, kVar, vVar, {
                    ...opts,
                    k: kT,
                    v: vT,
                    cacheSeqlens: lengths,
                    rotaryCos: cosT,
                    rotarySin: sinT,
                  }) as tf.Tensor;
      const counts = countsOf(counters.snapshot());
      const got = await out.data();
      await checkOwnPipelineErrors();
      if (step >= 2) {  // steps 0 and 1 make the pipelines' first uses
        expect(counts).toEqual({
          submits: 0,
          errorScopes: 0,
          hostUploads: 0,
          buffersCreated: 0,
          // Rotary of q and k (writing k and v into the caches), split-KV
          // pass, combine.
          dispatches: 3,
          // The rotary and split uniforms (cache lengths in them); the
          // combine's follow from shapes only and are kept.
          writeBuffers: 2,
          bufferCopies: 0,
          readBacks: 0,
        });
      }
      const qRot = oracleRotary(q, [batch, 1, heads, d], cos, sin, half, lengths, false);
      const kRot = oracleRotary(k, [batch, 1, headsKV, d], cos, sin, half, lengths, false);
      const want = oracleKVCache(dims, qRot, kRef, vRef, kRot, v, lengths, null, opts);
      expectClose(got, want.out, FORWARD_BOUND, `decode step ${step} (seed ${rng.seed})`);
      const row = headsKV * d;
      lengths.forEach((n, b) => {
        kRef.set(kRot.subarray(b * row, (b + 1) * row), (b * seqMax + n) * row);
        vRef.set(v.subarray(b * row, (b + 1) * row), (b * seqMax + n) * row);
      });
      lengths = lengths.map(n => n + 1);
      tf.dispose([out, qT, kT, vT]);
    }
    expectClose(await kVar.data(), kRef, FORWARD_BOUND, `k cache (seed ${rng.seed})`);
    tf.dispose([kVar, vVar, cosT, sinT]);
    expect(tf.memory().numTensors).toBe(before);
  });

  const LAYERS: Array<{name: string, args: FlashMHAArgs, dispatches: number}> = [
    {
      name: 'GQA, RoPE',
      args: {embedDim: 32, numHeads: 4, numHeadsKV: 2, causal: true, rotaryEmbDim: 8},
      // The qkv projection with its bias, rotating q into its own tensor and
      // k, and writing k and v into the caches, in one pass (FlashDecodeQKV:
      // no split, no copy); split-KV; the merge of the splits with the out
      // projection (FlashDecodeOut).
      dispatches: 3,
    },
    {
      name: 'ALiBi',
      args: {embedDim: 32, numHeads: 4, causal: true, useAlibi: true},
      dispatches: 3,  // the same, the first pass not rotating
    },
  ];
  for (const {name, args, dispatches} of LAYERS) {
    it(`FlashMHA.decode (${name}): ${dispatches} dispatches a token, no submit, no upload`,
       async () => {
         const rng = freshRng();
         const seq = 6;
         const layer = flashMHA(args);
         const x = tf.tensor3d(Float32Array.from(randomArray(seq * 32, rng)), [1, seq, 32]);
         tf.env().set(FLASH_ATTENTION_IMPL, 'reference');
         const full = layer.apply(x) as tf.Tensor3D;
         tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
         const before = tf.memory().numTensors;
         const cache = layer.createCache(1, seq + 2);
         const decoded = new Float32Array(seq * 32);
         for (let t = 0; t < seq; t++) {
           const token = tf.slice(x, [0, t, 0], [1, 1, 32]);
           const counters = webgpuCounters();
           const y = layer.decode(token, cache);
           const counts = countsOf(counters.snapshot());
           if (t >= 2) {  // the first steps compile and check the pipelines
             expect(counts).toEqual({
               submits: 0,
               errorScopes: 0,
               hostUploads: 0,
               buffersCreated: 0,
               dispatches,
               writeBuffers: dispatches - 1,  // the last pass's uniforms are kept
               bufferCopies: 0,
               readBacks: 0,
             });
           }
           decoded.set(await y.data(), t * 32);
           tf.dispose([y, token]);
         }
         await checkOwnPipelineErrors();
         expectClose(
             decoded, await full.data(), FORWARD_BOUND,
             `FlashMHA.decode (${name}) vs the full call (seed ${rng.seed})`);
         cache.dispose();
         expect(tf.memory().numTensors).toBe(before);
         tf.dispose([x, full]);
         layer.dispose();
       });
  }

  it('a generated token of the demo GPT: one submit, one upload (its id), one read', async () => {
    const rng = freshRng();
    const vocab = 16;
    const model = buildGPT(
        {vocabSize: vocab, numLayers: 1, embedDim: 32, numHeads: 2}, flashMHA, 'g', 'fused');
    const seq = 7;
    const prompt = 2;
    const ids = Array.from({length: seq}, () => Math.floor(rng.uniform() * vocab));
    const input = tf.tensor2d(ids, [1, seq], 'int32');
    // The uncached path: the whole sequence through the model at once,
    // composed (attention and GELU).
    tf.env().set(FLASH_ATTENTION_IMPL, 'reference');
    const full = model.predict(input) as tf.Tensor;
    tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
    const want = await full.data();
    tf.dispose([input, full]);
    const before = tf.memory().numTensors;
    // Every op on the GPU, as in benchmarks/decode.ts (tfjs would run the
    // embedding gather of one id on the CPU and upload its row).
    const cpuForward = tf.env().getBool('WEBGPU_CPU_FORWARD');
    tf.env().set('WEBGPU_CPU_FORWARD', false);
    const submitBatch = tf.env().getNumber('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE');
    const decoder = new IncrementalDecoder(model, {batch: 1, maxSeqLen: seq});
    const got = new Float32Array(seq * vocab);
    await withDeferredSubmits(async () => {
      const first = tf.tensor2d(ids.slice(0, prompt), [1, prompt], 'int32');
      const prefill = decoder.step(first);
      got.set(await prefill.data());
      tf.dispose([first, prefill]);
      for (let t = prompt; t < seq; t++) {
        const counters = webgpuCounters();
        // As generateWithCache: the new id from the host, the logits read back.
        const token = tf.tensor2d([[ids[t]]], [1, 1], 'int32');
        const logits = decoder.step(token);
        got.set(await logits.data(), t * vocab);
        const counts = countsOf(counters.snapshot());
        if (t >= prompt + 2) {  // the first steps compile and check the pipelines
          expect(counts).toEqual({
            submits: 1,
            errorScopes: 0,
            hostUploads: 1,
            buffersCreated: 1,  // the id's staging buffer (tfjs maps a new one per upload)
            // Embedding gather, norm, qkv projection + rotary + cache append
            // (FlashDecodeQKV), split-KV, combine + out projection
            // (FlashDecodeOut), residual + norm + MLP in + GELU
            // (FusedNormDense), MLP out, residual + final norm + logits
            // (FusedNormDense).
            dispatches: 8,
            // All but the uniforms kept per content: FlashDecodeOut's and
            // the two FusedNormDense passes'.
            writeBuffers: 5,
            // The id uploaded, the logits read (the qkv pass appends k, v).
            bufferCopies: 2,
            readBacks: 1,
          });
        }
        tf.dispose([token, logits]);
      }
    });
    tf.env().set('WEBGPU_CPU_FORWARD', cpuForward);
    // The submit batch comes back after generating, also after an error.
    expect(tf.env().getNumber('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE')).toBe(submitBatch);
    await expect(withDeferredSubmits(async () => {
      throw new Error('generation failed');
    })).rejects.toThrow('generation failed');
    expect(tf.env().getNumber('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE')).toBe(submitBatch);
    await checkOwnPipelineErrors();
    decoder.dispose();
    expect(tf.memory().numTensors).toBe(before);
    // Every token's logits as the uncached path's, prefill included.
    expectClose(got, want, FORWARD_BOUND, `cached vs uncached logits (seed ${rng.seed})`);
    model.dispose();
  });

  it('pipelined generation: a submit and a read per chunk of ids, no upload per token',
     async () => {
       const vocab = 16;
       const model = buildGPT(
           {vocabSize: vocab, numLayers: 1, embedDim: 32, numHeads: 2}, flashMHA, 'p', 'fused');
       const cpuForward = tf.env().getBool('WEBGPU_CPU_FORWARD');
       tf.env().set('WEBGPU_CPU_FORWARD', false);
       const prompt = [3, 1];
       const [length, readEvery] = [7, 3];
       const warm = await generateIdsWithCache(model, prompt, length, {readEvery});
       const before = tf.memory().numTensors;
       const counters = webgpuCounters();
       const ids = await generateIdsWithCache(model, prompt, length, {readEvery});
       const counts = countsOf(counters.snapshot());
       tf.env().set('WEBGPU_CPU_FORWARD', cpuForward);
       await checkOwnPipelineErrors();
       expect(ids).toEqual(warm);
       const chunks = Math.ceil(length / readEvery);
       // A token: the 8 dispatches of a cached step (test above) and its argmax.
       const token = 8 + 1;
       // Staging buffers of the uploads and reads, fewer once tfjs's pool has them.
       expect(counts.buffersCreated).toBeLessThanOrEqual(3 + 2 * chunks);
       expect({...counts, buffersCreated: 0}).toEqual({
         submits: chunks,  // each chunk's read submits the steps recorded before it
         errorScopes: 0,
         // The prompt's ids and the two caches' zeros: none per token (the
         // next id is fed from the device).
         hostUploads: 3,
         buffersCreated: 0,
         // The prompt step (its last row sliced), the single-id steps, and a
         // concat per chunk of several ids.
         dispatches: (token + 1) + (length - 1) * token + (chunks - 1),
         // All but the uniforms kept per content: FlashDecodeOut's and the
         // two FusedNormDense passes' (three per step).
         writeBuffers: (token + 1) + (length - 1) * token + (chunks - 1) - 3 * length,
         bufferCopies: 3 + chunks,  // the uploads, and each chunk into its staging buffer
         readBacks: chunks,
       });
       expect(tf.memory().numTensors).toBe(before);
       model.dispose();
     });
});
