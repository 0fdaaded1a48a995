/**
 * The ops' surface: packed variants, returnSoftmaxLse, dropout seeding, and
 * the FLASH_ATTENTION_IMPL switch between fused kernels and the reference.
 */
import * as tf from '@tensorflow/tfjs-core';

import {FLASH_ATTENTION_IMPL, FlashAttention, flashAttention, FlashAttentionAttrs, flashAttentionKVPacked, flashAttentionQKVPacked, hasFusedKernel, registerFusedKernel} from '../src';
import {referenceForward} from '../src/reference/forward';

import {describeBackends, useBackend} from './harness/backends';
import {checkGradients, OPTION_CASES} from './harness/cases';
import {expectClose, FORWARD_BOUND, freshRng, randomArray} from './harness/problems';
import {OracleProblem, oracleForward} from './oracle';

describeBackends('packed variants', () => {
  it('flashAttentionQKVPacked matches the oracle with q = qkv[:, :, 0] etc.', async () => {
    const rng = freshRng();
    const [B, S, H, D] = [2, 11, 3, 8];
    const packed = randomArray(B * S * 3 * H * D, rng);
    // Unpack in plain JS: [B, S, 3, H, D] -> three [B, S, H, D].
    const part = (which: number) => {
      const out = new Float64Array(B * S * H * D);
      for (let bs = 0; bs < B * S; bs++) {
        for (let hd = 0; hd < H * D; hd++) {
          out[bs * H * D + hd] = packed[(bs * 3 + which) * H * D + hd];
        }
      }
      return out;
    };
    const oracle: OracleProblem = {
      batch: B,
      seqQ: S,
      seqK: S,
      heads: H,
      headsKV: H,
      headDim: D,
      headDimV: D,
      q: part(0),
      k: part(1),
      v: part(2),
      alibiSlopes: null
    };
    const qkv = tf.tensor5d(Float32Array.from(packed), [B, S, 3, H, D]);
    const [out, lse] = flashAttentionQKVPacked(qkv, {causal: true, returnSoftmaxLse: true});
    const expected = oracleForward(oracle, {causal: true});
    expectClose(await out.data(), expected.out, FORWARD_BOUND, `qkv out (seed ${rng.seed})`);
    expectClose(await lse.data(), expected.lse, FORWARD_BOUND, `qkv lse (seed ${rng.seed})`);
    tf.dispose([qkv, out, lse]);
  });

  it('flashAttentionKVPacked matches the oracle with GQA', async () => {
    const rng = freshRng();
    const [B, Sq, Sk, H, Hk, D] = [2, 7, 12, 4, 2, 8];
    const q = randomArray(B * Sq * H * D, rng);
    const packed = randomArray(B * Sk * 2 * Hk * D, rng);
    const part = (which: number) => {
      const out = new Float64Array(B * Sk * Hk * D);
      for (let bs = 0; bs < B * Sk; bs++) {
        for (let hd = 0; hd < Hk * D; hd++) {
          out[bs * Hk * D + hd] = packed[(bs * 2 + which) * Hk * D + hd];
        }
      }
      return out;
    };
    const oracle: OracleProblem = {
      batch: B,
      seqQ: Sq,
      seqK: Sk,
      heads: H,
      headsKV: Hk,
      headDim: D,
      headDimV: D,
      q,
      k: part(0),
      v: part(1),
      alibiSlopes: null
    };
    const qT = tf.tensor4d(Float32Array.from(q), [B, Sq, H, D]);
    const kv = tf.tensor5d(Float32Array.from(packed), [B, Sk, 2, Hk, D]);
    const out = flashAttentionKVPacked(qT, kv, {windowSize: [3, 3]});
    expectClose(
        await out.data(), oracleForward(oracle, {windowSize: [3, 3]}).out, FORWARD_BOUND,
        `kv out (seed ${rng.seed})`);
    tf.dispose([qT, kv, out]);
  });

  it('packed ops propagate gradients to the packed tensor', async () => {
    const qkv = tf.randomNormal([1, 5, 3, 2, 4]) as tf.Tensor5D;
    const packedGrad =
        tf.grad((x: tf.Tensor) => tf.sum(flashAttentionQKVPacked(x as tf.Tensor5D)))(qkv);
    const [q, k, v] = tf.unstack(qkv, 2) as tf.Tensor4D[];
    const split = tf.grads(
        (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => tf.sum(
            flashAttention(a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D)))([q, k, v]);
    const expected = tf.stack(split, 2);
    expectClose(await packedGrad.data(), await expected.data(), 1e-6, 'packed gradient');
    tf.dispose([qkv, packedGrad, q, k, v, ...split, expected]);
  });
});

describeBackends('dropout seeding', () => {
  const shape: [number, number, number, number] = [2, 16, 2, 8];
  it('gives the same output for the same seed, another for another seed', async () => {
    const q = tf.randomNormal(shape) as tf.Tensor4D;
    const run = (seed?: number) => flashAttention(q, q, q, {dropoutRate: 0.5, seed});
    const a = await run(7).data();
    const b = await run(7).data();
    const c = await run(8).data();
    const d = await run().data();
    const e = await run().data();
    expect(Array.from(a)).toEqual(Array.from(b));
    expect(Array.from(a)).not.toEqual(Array.from(c));
    // Without a seed each call draws one: two calls differ.
    expect(Array.from(d)).not.toEqual(Array.from(e));
    tf.dispose(q);
  });

  it('uses the forward mask in the backward (gradients match the oracle)', async () => {
    await checkGradients(OPTION_CASES.find(c => c.name === 'dropout 0.25')!, freshRng());
  });
});

describe('FLASH_ATTENTION_IMPL', () => {
  beforeAll(() => useBackend('cpu'));
  afterEach(() => tf.env().set(FLASH_ATTENTION_IMPL, 'auto'));
  const q = () => tf.randomNormal([1, 4, 2, 8]) as tf.Tensor4D;

  it('reads the environment variable of the same name', () => {
    const flags = (tf.env() as unknown as {flags: Record<string, unknown>}).flags;
    const saved = process.env.FLASH_ATTENTION_IMPL;
    try {
      process.env.FLASH_ATTENTION_IMPL = 'reference';
      delete flags[FLASH_ATTENTION_IMPL];  // Re-evaluated on the next read.
      expect(tf.env().get(FLASH_ATTENTION_IMPL)).toBe('reference');
    } finally {
      if (saved == null) {
        delete process.env.FLASH_ATTENTION_IMPL;
      } else {
        process.env.FLASH_ATTENTION_IMPL = saved;
      }
      delete flags[FLASH_ATTENTION_IMPL];
    }
    expect(tf.env().get(FLASH_ATTENTION_IMPL)).toBe(saved ?? 'auto');
  });

  it("'fused' on a backend without a fused kernel is a clear error", () => {
    tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
    const x = q();
    expect(() => flashAttention(x, x, x))
        .toThrow(
            /FLASH_ATTENTION_IMPL is 'fused' but backend 'cpu' has no fused FlashAttention kernel/);
    x.dispose();
  });

  it('refuses an unknown value, naming the flag', () => {
    tf.env().set(FLASH_ATTENTION_IMPL, 'fast');
    const x = q();
    expect(() => flashAttention(x, x, x))
        .toThrow(/FLASH_ATTENTION_IMPL must be one of auto, fused, reference, got "fast"/);
    x.dispose();
  });

  describe('with a fused forward registered for cpu (and no fused backward)', () => {
    let calls = 0;
    let refuseReason: string|null = null;
    beforeAll(() => {
      // A stand-in fused kernel: it runs the reference's ops inside the
      // kernel, and counts its calls.
      registerFusedKernel(
          {
            kernelName: FlashAttention,
            backendName: 'cpu',
            kernelFunc: ({inputs, attrs}) => {
              calls++;
              const {q, k, v, alibiSlopes} = inputs as Record<string, tf.Tensor4D>;
              const a = attrs as unknown as FlashAttentionAttrs;
              const [B, Sq, H, D] = q.shape;
              const shapes = {
                batch: B,
                seqQ: Sq,
                seqK: k.shape[1],
                heads: H,
                headsKV: k.shape[2],
                headDim: D,
                headDimV: v.shape[3]
              };
              return referenceForward(
                  q, k, v, alibiSlopes.size ? alibiSlopes : null, shapes, a, 1 << 20);
            },
          },
          () => refuseReason);
    });
    afterAll(() => tf.unregisterKernel(FlashAttention, 'cpu'));

    it('runs the fused kernel under auto, and the reference backward with it', async () => {
      expect(hasFusedKernel(FlashAttention, 'cpu')).toBe(true);
      calls = 0;
      await checkGradients(
          OPTION_CASES.find(c => c.name === 'alibi [B, H], causal, softcap')!, freshRng());
      expect(calls).toBe(1);
    });

    it("falls back under auto when the kernel refuses a call, and errors under 'fused'", () => {
      refuseReason = 'head dim 8 is too small for this test';
      calls = 0;
      const x = q();
      try {
        flashAttention(x, x, x).dispose();
        expect(calls).toBe(0);
        tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
        expect(() => flashAttention(x, x, x)).toThrow(/head dim 8 is too small for this test/);
        tf.env().set(FLASH_ATTENTION_IMPL, 'reference');
        flashAttention(x, x, x).dispose();
        expect(calls).toBe(0);
      } finally {
        refuseReason = null;
        x.dispose();
      }
    });
  });
});
