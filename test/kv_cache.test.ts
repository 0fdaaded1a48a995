/**
 * flashAttentionWithKVCache and KVCache against the float64 oracle
 * (test/oracle.ts oracleKVCache): random cache lengths (0 included), GQA,
 * every option, rotary in both layouts, new keys appended in place, no
 * leaks; on cpu and on webgpu (fused split-KV kernel and the reference).
 */
import * as tf from '@tensorflow/tfjs-core';

import {planDecode, setDecodeTargetWorkgroups} from '../kernels/webgpu/flash_decode';
import {COMBINE_THREADS} from '../kernels/webgpu/flash_decode_combine_webgpu';
import {DECODE_TILE} from '../kernels/webgpu/flash_decode_split_webgpu';
import {checkOwnPipelineErrors, setPoisonOutputs} from '../kernels/webgpu/own_pipeline';
import {FLASH_ATTENTION_IMPL, FlashAttentionError, flashAttentionWithKVCache, KVCache} from '../src';
import {flashAttentionWithKVCachePacked} from '../src/ops_kv_cache';

import {describeBackends, TestBackend} from './harness/backends';
import {expectClose, FORWARD_BOUND, freshRng, randomArray, Rng} from './harness/problems';
import {oracleKVCache, OracleOptions, oracleRotary} from './oracle';

interface DecodeCase {
  name: string;
  batch: number;
  seqQ: number;
  seqNew: number;
  seqMax: number;
  heads: number;
  headsKV: number;
  headDim: number;
  opts: OracleOptions;
  alibi?: 'head'|'batch';
  /** Rotary: columns of the tables (rotaryDim / 2) and layout. */
  rotary?: {half: number, interleaved: boolean};
  /** Force cacheSeqlens (else random in [0, Smax - Snew], one of them 0). */
  seqlens?: number[];
  /**
   * q, k, v given packed as one projection `[B, Snew, H + 2 Hk, D]`
   * (flashAttentionWithKVCachePacked; Sq = Snew, no LSE).
   */
  packed?: boolean;
}

const CASES: DecodeCase[] = [
  {
    name: 'plain, GQA, one token',
    batch: 3,
    seqQ: 1,
    seqNew: 1,
    seqMax: 40,
    heads: 4,
    headsKV: 2,
    headDim: 16,
    opts: {}
  },
  {
    name: 'causal, 2 new tokens, softcap, ALiBi [B, H]',
    batch: 2,
    seqQ: 2,
    seqNew: 2,
    seqMax: 33,
    heads: 4,
    headsKV: 1,
    headDim: 16,
    opts: {causal: true, softcap: 3},
    alibi: 'batch'
  },
  {
    name: 'window, rotary (rotate-half, partial), ALiBi [H]',
    batch: 2,
    seqQ: 1,
    seqNew: 1,
    seqMax: 37,
    heads: 2,
    headsKV: 2,
    headDim: 16,
    opts: {windowSize: [7, 0], softmaxScale: 0.3},
    alibi: 'head',
    rotary: {half: 4, interleaved: false}
  },
  {
    name: 'causal rotary (interleaved), Sq 3 > Snew 1',
    batch: 2,
    seqQ: 3,
    seqNew: 1,
    seqMax: 30,
    heads: 4,
    headsKV: 2,
    headDim: 8,
    opts: {causal: true},
    rotary: {half: 4, interleaved: true}
  },
  {
    // Five rows: the fused kernel's per-row rotary starts span two vec4s.
    name: 'non-causal rotary: every q row at the cache length, 5 rows',
    batch: 5,
    seqQ: 2,
    seqNew: 1,
    seqMax: 24,
    heads: 2,
    headsKV: 1,
    headDim: 8,
    opts: {},
    rotary: {half: 3, interleaved: false}
  },
  {
    name: 'no new keys (read-only cache), one row empty',
    batch: 2,
    seqQ: 1,
    seqNew: 0,
    seqMax: 20,
    heads: 2,
    headsKV: 1,
    headDim: 8,
    opts: {causal: true},
    seqlens: [0, 13]
  },
  {
    name: 'packed qkv: causal rotary (rotate-half), GQA, 2 new tokens',
    batch: 2,
    seqQ: 2,
    seqNew: 2,
    seqMax: 26,
    heads: 4,
    headsKV: 2,
    headDim: 16,
    opts: {causal: true},
    rotary: {half: 8, interleaved: false},
    packed: true
  },
  {
    name: 'packed qkv: ALiBi [H], softcap, no rotary, one token',
    batch: 3,
    seqQ: 1,
    seqNew: 1,
    seqMax: 19,
    heads: 2,
    headsKV: 1,
    headDim: 8,
    opts: {causal: true, softcap: 4},
    alibi: 'head',
    packed: true
  },
];

/** q, k, v `[B, S, Hx, D]` side by side on the head axis: `[B, S, H + 2 Hk, D]`. */
function packHeads(
    parts: Float64Array[], rows: number, headsOf: number[], d: number): Float32Array {
  const width = headsOf.reduce((a, h) => a + h, 0) * d;
  const packed = new Float32Array(rows * width);
  for (let r = 0; r < rows; r++) {
    let at = r * width;
    parts.forEach((part, i) => {
      const size = headsOf[i] * d;
      packed.set(part.subarray(r * size, (r + 1) * size), at);
      at += size;
    });
  }
  return packed;
}

function randomSeqlens(c: DecodeCase, rng: Rng): number[] {
  if (c.seqlens != null) {
    return c.seqlens;
  }
  const lens =
      Array.from({length: c.batch}, () => Math.floor(rng.uniform() * (c.seqMax - c.seqNew + 1)));
  lens[Math.floor(rng.uniform() * c.batch)] = 0;
  return lens;
}

function rotaryTables(rows: number, half: number, rng: Rng): [Float64Array, Float64Array] {
  const cos = new Float64Array(rows * half);
  const sin = new Float64Array(rows * half);
  for (let i = 0; i < cos.length; i++) {
    const angle = Math.fround(rng.uniform() * 6.28);
    cos[i] = Math.fround(Math.cos(angle));
    sin[i] = Math.fround(Math.sin(angle));
  }
  return [cos, sin];
}

const f32 = (x: Float64Array) => Float32Array.from(x);

/** A variable that alone owns its data (the initial tensor is freed). */
function ownedVariable(values: Float32Array, shape: number[]): tf.Variable<tf.Rank.R4> {
  const init = tf.tensor4d(values, shape as [number, number, number, number]);
  const variable = tf.variable(init, false);
  init.dispose();
  return variable;
}

async function runCase(c: DecodeCase, backend: string, rng: Rng, seed: string): Promise<void> {
  const {batch, seqQ, seqNew, seqMax, heads, headsKV, headDim: d} = c;
  const seqlens = randomSeqlens(c, rng);
  const q = randomArray(batch * seqQ * heads * d, rng);
  const kCache = randomArray(batch * seqMax * headsKV * d, rng);
  const vCache = randomArray(batch * seqMax * headsKV * d, rng);
  const kNew = seqNew > 0 ? randomArray(batch * seqNew * headsKV * d, rng) : null;
  const vNew = seqNew > 0 ? randomArray(batch * seqNew * headsKV * d, rng) : null;
  const slopes = c.alibi == null ? null :
                                   randomArray(c.alibi === 'head' ? heads : batch * heads, rng)
                                       .map(x => Math.fround(Math.abs(x)));
  const tables = c.rotary == null ? null : rotaryTables(seqMax + seqQ, c.rotary.half, rng);

  // The oracle: rotate q and the new keys at their positions, then attend.
  let qRef = q;
  let kNewRef = kNew;
  if (c.rotary != null && tables != null) {
    const local = c.opts.causal || c.opts.windowSize != null;
    const qPos = seqlens.flatMap(n => Array.from({length: seqQ}, (_, i) => n + (local ? i : 0)));
    const kPos = seqlens.flatMap(n => Array.from({length: seqNew}, (_, i) => n + i));
    qRef = oracleRotary(
        q, [batch, seqQ, heads, d], tables[0], tables[1], c.rotary.half, qPos,
        c.rotary.interleaved);
    if (kNew != null) {
      kNewRef = oracleRotary(
          kNew, [batch, seqNew, headsKV, d], tables[0], tables[1], c.rotary.half, kPos,
          c.rotary.interleaved);
    }
  }
  const dims = {batch, seqQ, seqMax, seqNew, heads, headsKV, headDim: d, headDimV: d};
  const want = oracleKVCache(dims, qRef, kCache, vCache, kNewRef, vNew, seqlens, slopes, c.opts);

  const cacheShape: [number, number, number, number] = [batch, seqMax, headsKV, d];
  const kVar = ownedVariable(f32(kCache), cacheShape);
  const vVar = ownedVariable(f32(vCache), cacheShape);
  const kDataId = kVar.dataId;
  const tensorsBefore = tf.memory().numTensors;
  const inputs = tf.tidy(
      () => ({
        q: tf.keep(tf.tensor4d(f32(q), [batch, seqQ, heads, d])),
        k: kNew == null ? undefined : tf.keep(tf.tensor4d(f32(kNew), [batch, seqNew, headsKV, d])),
        v: vNew == null ? undefined : tf.keep(tf.tensor4d(f32(vNew), [batch, seqNew, headsKV, d])),
        alibiSlopes: slopes == null ?
            undefined :
            tf.keep(tf.tensor(f32(slopes), c.alibi === 'head' ? [heads] : [batch, heads])),
        rotaryCos: tables == null ?
            undefined :
            tf.keep(tf.tensor2d(f32(tables[0]), [seqMax + seqQ, c.rotary!.half])),
        rotarySin: tables == null ?
            undefined :
            tf.keep(tf.tensor2d(f32(tables[1]), [seqMax + seqQ, c.rotary!.half])),
      }));
  const inputCount = tf.memory().numTensors;
  const what = `${c.name} on ${backend}, cacheSeqlens [${seqlens}] (${seed})`;
  if (c.packed && kNew != null && vNew != null) {
    const qkv = tf.tensor4d(
        packHeads([q, kNew, vNew], batch * seqNew, [heads, headsKV, headsKV], d),
        [batch, seqNew, heads + 2 * headsKV, d]);
    const packedOut = flashAttentionWithKVCachePacked(qkv, kVar, vVar, heads, {
      ...c.opts,
      cacheSeqlens: seqlens,
      alibiSlopes: inputs.alibiSlopes,
      rotaryCos: inputs.rotaryCos,
      rotarySin: inputs.rotarySin,
      rotaryInterleaved: c.rotary?.interleaved,
    });
    expect(packedOut.shape).toEqual([batch, seqQ, heads, d]);
    expectClose(await packedOut.data(), want.out, FORWARD_BOUND, `${what}: out`);
    tf.dispose([qkv, packedOut]);
  }
  const [out, lse] = c.packed ? [null, null] : flashAttentionWithKVCache(inputs.q, kVar, vVar, {
    ...c.opts,
    k: inputs.k,
    v: inputs.v,
    cacheSeqlens: seqlens,
    alibiSlopes: inputs.alibiSlopes,
    rotaryCos: inputs.rotaryCos,
    rotarySin: inputs.rotarySin,
    rotaryInterleaved: c.rotary?.interleaved,
    returnSoftmaxLse: true,
  });
  if (out != null && lse != null) {
    expect(out.shape).toEqual([batch, seqQ, heads, d]);
    expect(lse.shape).toEqual([batch, heads, seqQ]);
    expectClose(await out.data(), want.out, FORWARD_BOUND, `${what}: out`);
    expectClose(await lse.data(), want.lse, FORWARD_BOUND, `${what}: lse`);
  }

  // The caches: new rows at cacheSeqlens[b], everything else unchanged.
  const kWant = Float64Array.from(kCache);
  const vWant = Float64Array.from(vCache);
  const rowSize = headsKV * d;
  seqlens.forEach((n, b) => {
    if (kNewRef != null && vNew != null) {
      const from = b * seqNew * rowSize;
      kWant.set(kNewRef.subarray(from, from + seqNew * rowSize), (b * seqMax + n) * rowSize);
      vWant.set(vNew.subarray(from, from + seqNew * rowSize), (b * seqMax + n) * rowSize);
    }
  });
  expectClose(await kVar.data(), kWant, 1e-6, `${what}: kCache after the call`);
  expectClose(await vVar.data(), vWant, 0, `${what}: vCache after the call`);
  if (backend === 'webgpu (fused)' && seqNew > 0) {
    // Written in place: the variable still holds the same data.
    expect(kVar.dataId).toBe(kDataId);
  }
  if (out != null && lse != null) {
    tf.dispose([out, lse]);
  }
  expect(tf.memory().numTensors).toBe(inputCount);
  tf.dispose(Object.values(inputs).filter((t): t is tf.Tensor => t != null));
  expect(tf.memory().numTensors).toBe(tensorsBefore);
  kVar.dispose();
  vVar.dispose();
}

function implementations(backend: TestBackend): Array<[string, string]> {
  return backend === 'webgpu' ? [['webgpu (fused)', 'auto'], ['webgpu (reference)', 'reference']] :
                                [[backend, 'auto']];
}

describeBackends('flashAttentionWithKVCache', backend => {
  beforeAll(() => setPoisonOutputs(true));
  afterAll(() => {
    setPoisonOutputs(false);
    tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
  });

  for (const [label, impl] of implementations(backend)) {
    for (const c of CASES) {
      it(`${c.name} (${label}) equals the oracle over the prefix`, async () => {
        tf.env().set(FLASH_ATTENTION_IMPL, impl);
        const rng = freshRng();
        await runCase(c, label, rng, `seed ${rng.seed}`);
        if (backend === 'webgpu') {
          await checkOwnPipelineErrors();
        }
      });
    }
  }

  if (backend === 'webgpu') {
    // Plans the planner would not pick at these sizes, forced through the
    // workgroup target: many one-tile splits (D = 24: key lanes that do not
    // divide the tile), and one split that walks
    // several key tiles (the running max rises from tile to tile under
    // causal ALiBi) with query rows in two chunks (G * Sq = 16 > 8).
    // [title, workgroup target, fewest splits the plan must have, case]
    const forcedPlans: Array<[string, number, number, DecodeCase]> = [
      [
        'splits a long key range over many workgroups (fused)', 4096, 5, {
          name: 'long cache, many splits',
          batch: 1,
          seqQ: 1,
          seqNew: 1,
          seqMax: 700,
          heads: 4,
          headsKV: 1,
          headDim: 24,
          opts: {causal: true},
          seqlens: [650]
        }
      ],
      [
        'merges more splits than the combine pass has threads (fused)', 4096, COMBINE_THREADS + 1, {
          name: 'very long cache, 131 splits',
          batch: 1,
          seqQ: 1,
          seqNew: 1,
          seqMax: 16800,
          heads: 2,
          headsKV: 1,
          headDim: 8,
          opts: {},
          seqlens: [16700]
        }
      ],
      [
        'walks several key tiles in one split, rows in two chunks (fused)', 1, 1, {
          name: 'one split, several tiles',
          batch: 2,
          seqQ: 2,
          seqNew: 2,
          seqMax: 420,
          heads: 8,
          headsKV: 1,
          headDim: 64,
          opts: {causal: true},
          alibi: 'head',
          seqlens: [400, 131]
        }
      ],
    ];
    for (const [title, target, minSplits, c] of forcedPlans) {
      it(title, async () => {
        tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
        setDecodeTargetWorkgroups(target);
        try {
          // The plan really is the one named.
          const plan =
              planDecode(c.batch, c.seqQ, c.heads, c.headsKV, Math.max(...c.seqlens!) + c.seqNew);
          if (target === 1) {
            expect(plan).toMatchObject({numSplits: 1, rowChunks: 2});
            expect(plan.splitKeys).toBeGreaterThan(2 * DECODE_TILE);
          } else {
            expect(plan.numSplits).toBeGreaterThanOrEqual(minSplits);
          }
          const rng = freshRng();
          await runCase(c, 'webgpu (fused)', rng, `seed ${rng.seed}`);
          await checkOwnPipelineErrors();
        } finally {
          setDecodeTargetWorkgroups(null);
        }
      });
    }
  }

  it('KVCache.attend token by token equals causal attention over the prefix', async () => {
    tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
    const rng = freshRng();
    const [batch, seq, heads, headsKV, d] = [2, 6, 4, 2, 8];
    const q = randomArray(batch * seq * heads * d, rng);
    const k = randomArray(batch * seq * headsKV * d, rng);
    const v = randomArray(batch * seq * headsKV * d, rng);
    const before = tf.memory().numTensors;
    const cache = new KVCache({batch, maxSeqLen: 10, headsKV, headDim: d});
    const qT = tf.tensor4d(f32(q), [batch, seq, heads, d]);
    const kT = tf.tensor4d(f32(k), [batch, seq, headsKV, d]);
    const vT = tf.tensor4d(f32(v), [batch, seq, headsKV, d]);
    const steps: tf.Tensor4D[] = [];
    for (let t = 0; t < seq; t++) {
      steps.push(tf.tidy(
          () => cache.attend(
              tf.slice(qT, [0, t, 0, 0], [batch, 1, heads, d]),
              tf.slice(kT, [0, t, 0, 0], [batch, 1, headsKV, d]),
              tf.slice(vT, [0, t, 0, 0], [batch, 1, headsKV, d]), {causal: true})));
    }
    expect(cache.seqlens).toEqual([seq, seq]);
    const extra = tf.slice(kT, [0, 0, 0, 0], [batch, 5, headsKV, d]);
    expect(() => cache.attend(qT, extra, extra))
        .toThrow(/5 new tokens do not fit: 6 of maxSeqLen = 10/);
    extra.dispose();
    const got = tf.concat(steps, 1);
    const want = oracleKVCache(
        {batch, seqQ: seq, seqMax: seq, seqNew: 0, heads, headsKV, headDim: d, headDimV: d}, q, k,
        v, null, null, [seq, seq], null, {causal: true});
    expectClose(
        await got.data(), want.out, FORWARD_BOUND, `KVCache on ${backend} (seed ${rng.seed})`);
    tf.dispose([got, qT, kT, vT, ...steps]);
    cache.dispose();
    expect(cache.isDisposed).toBe(true);
    expect(tf.memory().numTensors).toBe(before);
  });

  it('refuses gradients, saying it is inference only', () => {
    const cache = new KVCache({batch: 1, maxSeqLen: 4, headsKV: 1, headDim: 4});
    const q = tf.ones([1, 1, 1, 4]) as tf.Tensor4D;
    const k = tf.ones([1, 1, 1, 4]) as tf.Tensor4D;
    expect(
        () => tf.grad(
            (x: tf.Tensor) => tf.sum(
                flashAttentionWithKVCache(
                    x as tf.Tensor4D, cache.kCache, cache.vCache, {k, v: k, cacheSeqlens: [0]}) as
                tf.Tensor))(q))
        .toThrow(/inference only/);
    tf.dispose([q, k]);
    cache.dispose();
  });

  it('refuses bad input before any work, naming the argument', () => {
    const before = tf.memory().numTensors;
    const cache = new KVCache({batch: 2, maxSeqLen: 4, headsKV: 1, headDim: 4});
    const q = tf.ones([2, 1, 2, 4]) as tf.Tensor4D;
    const k = tf.ones([2, 1, 1, 4]) as tf.Tensor4D;
    const plain = tf.zeros([2, 4, 1, 4]) as tf.Tensor4D;
    const cos = tf.ones([2, 2]) as tf.Tensor2D;
    const tensorsBefore = tf.memory().numTensors;
    const call = (opts: object, kc: tf.Tensor4D = cache.kCache) => () =>
        flashAttentionWithKVCache(q, kc, cache.vCache, opts);
    expect(call({k, v: k, cacheSeqlens: [0, 4]}))
        .toThrow(/cacheSeqlens\[1\] must be an integer in \[0, 3\].*got 4/);
    expect(call({k, v: k, cacheSeqlens: [0]}))
        .toThrow(/cacheSeqlens must have length B = 2, got 1/);
    expect(call({k, v: k})).toThrow(/cacheSeqlens is required/);
    expect(call({k, cacheSeqlens: [0, 0]})).toThrow(/k and v must be given together/);
    expect(call({k, v: k, cacheSeqlens: [0, 0]}, plain)).toThrow(/kCache must be a tf.Variable/);
    expect(call({k: q, v: k, cacheSeqlens: [0, 0]}))
        .toThrow(/k must have shape \[B, Snew, Hk, D\] = \[2,1,1,4\], got \[2,1,2,4\]/);
    expect(call({dropoutRate: 0.1})).toThrow(/dropoutRate is not supported \(inference only\)/);
    expect(call({rotaryCos: cos})).toThrow(/rotaryCos and rotarySin must be given together/);
    expect(call({windowSize: [-2, 0]})).toThrow(/windowSize/);
    // The table-driven option checks of src/options.ts, with this op's options.
    expect(call({
      cache_seqlens: [0, 0]
    })).toThrow(/unknown option 'cache_seqlens'; did you mean 'cacheSeqlens'\?/);
    expect(call({rotaryInterleaved: 1})).toThrow(/rotaryInterleaved must be a boolean, got 1/);
    expect(call({k, v: k, cacheSeqlens: [0, 9]})).toThrow(FlashAttentionError);
    // Packed q, k, v: the head count of the projection, and the lengths.
    const packed = (qkv: tf.Tensor4D, cacheSeqlens: number[]) => () =>
        flashAttentionWithKVCachePacked(qkv, cache.kCache, cache.vCache, 2, {cacheSeqlens});
    expect(packed(q, [0, 0])).toThrow(/qkv must have H \+ 2 Hk = 2 \+ 2 \* 1 heads.*\[2,1,2,4\]/);
    const qkv = tf.ones([2, 1, 4, 4]) as tf.Tensor4D;
    expect(packed(qkv, [0, 4])).toThrow(/cacheSeqlens\[1\] must be an integer in \[0, 3\]/);
    qkv.dispose();
    expect(tf.memory().numTensors).toBe(tensorsBefore);
    tf.dispose([q, k, plain, cos]);
    cache.dispose();
    expect(() => cache.reset()).toThrow(/disposed/);
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe('planDecode', () => {
  it('fills a large GPU at every context of the decode benchmark', () => {
    // B=1, H=32, Hk=8, one token: 8 row groups of 4 query rows.
    for (const context of [512, 4096, 16384, 32768]) {
      const plan = planDecode(1, 1, 32, 8, context);
      expect(plan.rows).toBe(4);
      expect(plan.splitKeys % DECODE_TILE).toBe(0);
      expect(plan.numSplits * plan.splitKeys).toBeGreaterThanOrEqual(context);
      expect((plan.numSplits - 1) * plan.splitKeys).toBeLessThan(context);
      expect(plan.workgroups).toBe(8 * plan.numSplits);
      // At least ~2 workgroups per SM of a 132-SM GPU once there are keys enough.
      expect(plan.workgroups)
          .toBeGreaterThanOrEqual(Math.min(264, 8 * Math.ceil(context / DECODE_TILE)));
    }
  });
});
