/**
 * The two kernels of a decoded attention layer against float64 oracles on
 * fresh random inputs, every element: flashDecodeQKVOrNull (the packed
 * qkv projection, rotary and cache append in one pass: q and both caches,
 * whose rows not written must keep their values; one dispatch and one
 * uniform write) and flashDecodeOutOrNull (split-KV attention over the
 * caches, then the merge of the splits and the output projection in one
 * pass: two dispatches). On cpu and under FLASH_ATTENTION_IMPL=reference
 * both give null and touch nothing. Bad input is refused by name; nothing
 * leaks.
 */
import * as tf from '@tensorflow/tfjs-core';

import {FLASH_ATTENTION_IMPL, FlashAttentionError, FlashDecodeOut, flashDecodeOutOrNull, FlashDecodeQKV, flashDecodeQKVOrNull} from '../src';

import {describeBackends} from './harness/backends';
import {expectClose, FORWARD_BOUND, freshRng, randomArray, Rng} from './harness/problems';
import {oracleKVCache} from './oracle';
import {webgpuCounters} from '../benchmarks/webgpu_counters';
import {checkOwnPipelineErrors} from '../kernels/webgpu/own_pipeline';

interface Case {
  batch: number;
  seqNew: number;
  inner: number;
  heads: number;
  headsKV: number;
  headDim: number;
  seqMax: number;
  starts: number[];
  /** 0: no rotary. */
  rotaryDim: number;
  interleaved: boolean;
  bias: boolean;
}

const CASES: Case[] = [
  {
    batch: 1,
    seqNew: 1,
    inner: 48,
    heads: 4,
    headsKV: 2,
    headDim: 16,
    seqMax: 12,
    starts: [5],
    rotaryDim: 16,
    interleaved: false,
    bias: true,
  },
  {
    batch: 2,
    seqNew: 2,
    inner: 37,
    heads: 2,
    headsKV: 1,
    headDim: 8,
    seqMax: 9,
    starts: [0, 3],
    rotaryDim: 4,
    interleaved: true,
    bias: false,
  },
  {
    batch: 3,
    seqNew: 1,
    inner: 32,
    heads: 4,
    headsKV: 4,
    headDim: 8,
    seqMax: 8,
    starts: [1, 7, 2],
    rotaryDim: 0,
    interleaved: false,
    bias: true,
  },
  {
    batch: 5,
    seqNew: 1,
    inner: 20,
    heads: 2,
    headsKV: 2,
    headDim: 16,
    seqMax: 6,
    starts: [0, 5, 2, 3, 4],
    rotaryDim: 8,
    interleaved: false,
    bias: true,
  },
];

const f32 = (a: Float64Array) => Float64Array.from(Float32Array.from(a));

interface Inputs {
  x: Float64Array;
  w: Float64Array;
  bias: Float64Array|null;
  cos: Float64Array;
  sin: Float64Array;
  kCache: Float64Array;
  vCache: Float64Array;
}

function randomInputs(c: Case, rng: Rng): Inputs {
  const rows = c.batch * c.seqNew;
  const cols = (c.heads + 2 * c.headsKV) * c.headDim;
  const tableRows = c.seqMax;
  const half = c.rotaryDim / 2;
  const angles = Array.from(
      {length: tableRows * half}, (_, i) => Math.floor(i / half) / 10 ** ((i % half) / half));
  const cacheSize = c.batch * c.seqMax * c.headsKV * c.headDim;
  return {
    x: f32(randomArray(rows * c.inner, rng, 2)),
    w: f32(randomArray(c.inner * cols, rng, 0.5)),
    bias: c.bias ? f32(randomArray(cols, rng)) : null,
    cos: f32(Float64Array.from(angles, Math.cos)),
    sin: f32(Float64Array.from(angles, Math.sin)),
    kCache: f32(randomArray(cacheSize, rng)),
    vCache: f32(randomArray(cacheSize, rng)),
  };
}

/** q and the updated caches, in float64. */
function oracle(c: Case, p: Inputs): {q: Float64Array, kCache: Float64Array, vCache: Float64Array} {
  const {batch, seqNew, inner, heads, headsKV, headDim: d, seqMax, rotaryDim} = c;
  const rows = batch * seqNew;
  const cols = (heads + 2 * headsKV) * d;
  const q = new Float64Array(rows * heads * d);
  const kCache = p.kCache.slice();
  const vCache = p.vCache.slice();
  const half = rotaryDim / 2;
  for (let m = 0; m < rows; m++) {
    const b = Math.floor(m / seqNew);
    const s = m % seqNew;
    const pos = c.starts[b] + s;
    const y = new Float64Array(cols);
    for (let n = 0; n < cols; n++) {
      let v = p.bias == null ? 0 : p.bias[n];
      for (let k = 0; k < inner; k++) {
        v += p.x[m * inner + k] * p.w[k * cols + n];
      }
      y[n] = v;
    }
    for (let head = 0; head < heads + 2 * headsKV; head++) {
      const h = y.subarray(head * d, (head + 1) * d);
      const out = h.slice();
      if (head < heads + headsKV) {
        for (let j = 0; j < half; j++) {
          const [i1, i2] = c.interleaved ? [2 * j, 2 * j + 1] : [j, j + half];
          const cs = p.cos[pos * half + j];
          const sn = p.sin[pos * half + j];
          out[i1] = h[i1] * cs - h[i2] * sn;
          out[i2] = h[i2] * cs + h[i1] * sn;
        }
      }
      if (head < heads) {
        q.set(out, (m * heads + head) * d);
      } else {
        const kv = head < heads + headsKV ? kCache : vCache;
        const kvHead = (head - heads) % headsKV;
        kv.set(out, ((b * seqMax + pos) * headsKV + kvHead) * d);
      }
    }
  }
  return {q, kCache, vCache};
}

/** A variable owning its data alone (as KVCache's), so the kernel may write it. */
function cacheVariable(values: Float64Array, shape: number[]): tf.Variable {
  const t = tf.tensor(Float32Array.from(values), shape);
  const v = tf.variable(t, false);
  t.dispose();
  return v;
}

describeBackends('flashDecodeQKVOrNull vs the float64 oracle', backend => {
  afterEach(() => tf.env().set(FLASH_ATTENTION_IMPL, 'auto'));

  for (const c of CASES) {
    const name = `B=${c.batch} Snew=${c.seqNew} K=${c.inner} H=${c.heads}/${c.headsKV} D=${
        c.headDim}, rotary ${c.rotaryDim}${c.interleaved ? ' interleaved' : ''}${
        c.bias ? ', bias' : ''}`;
    test(name, async () => {
      const rng = freshRng();
      const p = randomInputs(c, rng);
      const rows = c.batch * c.seqNew;
      const cols = (c.heads + 2 * c.headsKV) * c.headDim;
      const cacheShape = [c.batch, c.seqMax, c.headsKV, c.headDim];
      const t = (a: Float64Array|null, shape: number[]) =>
          a == null ? null : tf.tensor(Float32Array.from(a), shape);
      const x = t(p.x, [rows, c.inner]) as tf.Tensor2D;
      const w = t(p.w, [c.inner, cols]) as tf.Tensor2D;
      const bias = t(p.bias, [cols]) as tf.Tensor1D | null;
      const half = c.rotaryDim / 2;
      const cos = t(p.cos, [c.seqMax, half]) as tf.Tensor2D;
      const sin = t(p.sin, [c.seqMax, half]) as tf.Tensor2D;
      const kCache = cacheVariable(p.kCache, cacheShape) as tf.Variable<tf.Rank.R4>;
      const vCache = cacheVariable(p.vCache, cacheShape) as tf.Variable<tf.Rank.R4>;
      const args = {
        x,
        w,
        bias,
        heads: c.heads,
        kCache,
        vCache,
        cacheSeqlens: c.starts,
        rotary: c.rotaryDim === 0 ? null : {cos, sin, interleaved: c.interleaved},
      };
      const before = tf.memory().numTensors;
      const profile = await tf.profile(() => flashDecodeQKVOrNull(args) ?? []);
      const q = profile.result instanceof tf.Tensor ? profile.result : null;
      const want = oracle(c, p);
      if (backend !== 'webgpu') {
        expect(q).toBeNull();
        // Nothing written.
        expectClose(await kCache.data(), p.kCache, 0, 'kCache untouched');
      } else {
        await checkOwnPipelineErrors();
        expect(profile.kernelNames).toEqual([FlashDecodeQKV]);
        expect(q!.shape).toEqual([c.batch, c.seqNew, c.heads, c.headDim]);
        const seed = `seed ${rng.seed}`;
        expectClose(await q!.data(), want.q, FORWARD_BOUND, `q, ${seed}`);
        expectClose(await kCache.data(), want.kCache, FORWARD_BOUND, `kCache, ${seed}`);
        expectClose(await vCache.data(), want.vCache, FORWARD_BOUND, `vCache, ${seed}`);
        q!.dispose();
        // Once compiled: one dispatch and its uniforms (the start rows), no upload.
        const counters = webgpuCounters();
        counters.reset();
        flashDecodeQKVOrNull(args)!.dispose();
        const {dispatches, writeBuffers, hostUploads} = counters.snapshot();
        expect({dispatches, writeBuffers, hostUploads})
            .toEqual({dispatches: 1, writeBuffers: 1, hostUploads: 0});
      }
      expect(tf.memory().numTensors).toBe(before);
      tf.env().set(FLASH_ATTENTION_IMPL, 'reference');
      expect(flashDecodeQKVOrNull(args)).toBeNull();
      tf.dispose([x, w, bias ?? [], cos, sin, kCache, vCache]);
    });
  }

  test('bad arguments are refused by name, before any work', () => {
    const kCache = cacheVariable(new Float64Array(2 * 4 * 1 * 8), [2, 4, 1, 8]);
    const vCache = cacheVariable(new Float64Array(2 * 4 * 1 * 8), [2, 4, 1, 8]);
    const x = tf.zeros([2, 16]) as tf.Tensor2D;
    const w = tf.zeros([16, 24]) as tf.Tensor2D;
    const good = {
      x,
      w,
      heads: 1,
      kCache: kCache as tf.Variable<tf.Rank.R4>,
      vCache: vCache as tf.Variable<tf.Rank.R4>,
      cacheSeqlens: [0, 3],
    };
    const before = tf.memory().numTensors;
    const refused = (patch: Record<string, unknown>, argument: string) => {
      let error: unknown = null;
      try {
        flashDecodeQKVOrNull({...good, ...patch});
      } catch (e) {
        error = e;
      }
      expect(error).toBeInstanceOf(FlashAttentionError);
      expect((error as FlashAttentionError).argument).toBe(argument);
      expect((error as Error).message).toContain(argument);
    };
    const wide = tf.zeros([16, 25]);
    const cacheTensor = tf.zeros([2, 4, 1, 8]);
    const shortTables = tf.zeros([3, 4]);
    const badBias = tf.zeros([3]);
    refused({w: wide}, 'w');
    refused({heads: 0}, 'heads');
    refused({cacheSeqlens: [0, 4]}, 'cacheSeqlens');
    refused({cacheSeqlens: [0]}, 'cacheSeqlens');
    refused({kCache: cacheTensor}, 'kCache');
    refused({bias: badBias}, 'bias');
    refused({rotary: {cos: shortTables, sin: shortTables, interleaved: false}}, 'rotaryCos');
    expect(tf.memory().numTensors).toBe(before + 4);  // the four made above
    tf.dispose([kCache, vCache, x, w, wide, cacheTensor, shortTables, badBias]);
  });
});

interface OutCase {
  batch: number;
  seqQ: number;
  heads: number;
  headsKV: number;
  headDim: number;
  seqMax: number;
  /** Valid rows per batch row (the step's new ones included). */
  lengths: number[];
  cols: number;
  bias: boolean;
  softcap?: number;
  alibi?: boolean;
}

const OUT_CASES: OutCase[] = [
  {
    batch: 2,
    seqQ: 1,
    heads: 4,
    headsKV: 2,
    headDim: 16,
    seqMax: 20,
    lengths: [13, 0],
    cols: 24,
    bias: true,
  },
  {
    batch: 1,
    seqQ: 2,
    heads: 2,
    headsKV: 1,
    headDim: 8,
    seqMax: 300,
    lengths: [290],
    cols: 8,
    bias: false,
    softcap: 5,
    alibi: true,
  },
];

describeBackends('flashDecodeOutOrNull vs the float64 oracle', backend => {
  afterEach(() => tf.env().set(FLASH_ATTENTION_IMPL, 'auto'));

  for (const c of OUT_CASES) {
    const name = `B=${c.batch} Sq=${c.seqQ} H=${c.heads}/${c.headsKV} D=${c.headDim}, lengths [${
        c.lengths}], N=${c.cols}${c.bias ? ', bias' : ''}${c.softcap ? ', softcap' : ''}${
        c.alibi ? ', ALiBi' : ''}`;
    test(name, async () => {
      const rng = freshRng();
      const {batch, seqQ, heads, headsKV, headDim, seqMax, cols} = c;
      const inner = heads * headDim;
      const cacheSize = batch * seqMax * headsKV * headDim;
      const qs = f32(randomArray(batch * seqQ * inner, rng));
      const ks = f32(randomArray(cacheSize, rng));
      const vs = f32(randomArray(cacheSize, rng));
      const ws = f32(randomArray(inner * cols, rng, 0.5));
      const bs = c.bias ? f32(randomArray(cols, rng)) : null;
      const slopes =
          c.alibi ? f32(Float64Array.from({length: heads}, (_, h) => 0.5 / (h + 1))) : null;
      const cacheShape = [batch, seqMax, headsKV, headDim];
      const q = tf.tensor4d(Float32Array.from(qs), [batch, seqQ, heads, headDim]);
      const kCache = cacheVariable(ks, cacheShape) as tf.Variable<tf.Rank.R4>;
      const vCache = cacheVariable(vs, cacheShape) as tf.Variable<tf.Rank.R4>;
      const w = tf.tensor2d(Float32Array.from(ws), [inner, cols]);
      const bias = bs == null ? null : tf.tensor1d(Float32Array.from(bs));
      const alibiSlopes = slopes == null ? undefined : tf.tensor1d(Float32Array.from(slopes));
      const opts = {causal: true, softcap: c.softcap, alibiSlopes};
      const before = tf.memory().numTensors;
      const profile = await tf.profile(
          () => flashDecodeOutOrNull(q, kCache, vCache, c.lengths, opts, w, bias) ?? []);
      const y = profile.result instanceof tf.Tensor ? profile.result : null;
      if (backend !== 'webgpu') {
        expect(y).toBeNull();
      } else {
        expect(profile.kernelNames).toEqual([FlashDecodeOut]);
        expect(y!.shape).toEqual([batch * seqQ, cols]);
        const dims = {batch, seqQ, seqMax, seqNew: 0, heads, headsKV, headDim, headDimV: headDim};
        const {out} = oracleKVCache(
            dims, qs, ks, vs, null, null, c.lengths, slopes, {causal: true, softcap: c.softcap});
        const want = new Float64Array(batch * seqQ * cols);
        for (let t = 0; t < batch * seqQ; t++) {
          for (let n = 0; n < cols; n++) {
            let v = bs == null ? 0 : bs[n];
            for (let k = 0; k < inner; k++) {
              v += out[t * inner + k] * ws[k * cols + n];
            }
            want[t * cols + n] = v;
          }
        }
        expectClose(await y!.data(), want, FORWARD_BOUND, `y, seed ${rng.seed}`);
        y!.dispose();
        // Once compiled: the split pass (its uniforms: the lengths) and the
        // merge + projection (uniforms kept per content); no upload.
        const counters = webgpuCounters();
        counters.reset();
        flashDecodeOutOrNull(q, kCache, vCache, c.lengths, opts, w, bias)!.dispose();
        const {dispatches, writeBuffers, hostUploads} = counters.snapshot();
        expect({dispatches, writeBuffers, hostUploads})
            .toEqual({dispatches: 2, writeBuffers: 1, hostUploads: 0});
      }
      expect(tf.memory().numTensors).toBe(before);
      tf.env().set(FLASH_ATTENTION_IMPL, 'reference');
      expect(flashDecodeOutOrNull(q, kCache, vCache, c.lengths, opts, w, bias)).toBeNull();
      tf.dispose([q, kCache, vCache, w, bias ?? [], alibiSlopes ?? []]);
    });
  }

  test('bad arguments are refused by name, before any work', () => {
    const q = tf.zeros([1, 1, 2, 8]) as tf.Tensor4D;
    const kCache = cacheVariable(new Float64Array(4 * 8), [1, 4, 1, 8]) as tf.Variable<tf.Rank.R4>;
    const vCache = cacheVariable(new Float64Array(4 * 8), [1, 4, 1, 8]) as tf.Variable<tf.Rank.R4>;
    const w = tf.zeros([16, 4]) as tf.Tensor2D;
    const narrow = tf.zeros([8, 4]) as tf.Tensor2D;
    const badBias = tf.zeros([5]) as tf.Tensor1D;
    const before = tf.memory().numTensors;
    const refused = (run: () => unknown, argument: string) => {
      let error: unknown = null;
      try {
        run();
      } catch (e) {
        error = e;
      }
      expect(error).toBeInstanceOf(FlashAttentionError);
      expect((error as FlashAttentionError).argument).toBe(argument);
    };
    refused(() => flashDecodeOutOrNull(q, kCache, vCache, [3], {}, narrow, null), 'w');
    refused(() => flashDecodeOutOrNull(q, kCache, vCache, [3], {}, w, badBias), 'bias');
    refused(() => flashDecodeOutOrNull(q, kCache, vCache, [5], {}, w, null), 'cacheSeqlens');
    refused(() => flashDecodeOutOrNull(q, kCache, vCache, [3], {k: q} as object, w, null), 'k');
    // A step's options are checked again whenever they differ from the
    // last step's (the checks are kept per options, matched field by field).
    flashDecodeOutOrNull(q, kCache, vCache, [3], {causal: true}, w, null)?.dispose();
    const opts = (o: object) => o as {causal: boolean};
    refused(
        () => flashDecodeOutOrNull(q, kCache, vCache, [3], opts({causal: 1}), w, null), 'causal');
    refused(
        () =>
            flashDecodeOutOrNull(q, kCache, vCache, [3], opts({causal: true, sofcap: 2}), w, null),
        'sofcap');
    refused(() => flashDecodeOutOrNull(q, kCache, vCache, [3], {softcap: -1}, w, null), 'softcap');
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([q, kCache, vCache, w, narrow, badBias]);
  });
});
