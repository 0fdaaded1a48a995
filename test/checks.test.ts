/**
 * Input checks (docs/design.md, "API contract", on bad input): each bad call throws an error
 * that names the argument, the expected and the actual value, and leaves no
 * tensor behind. These run on the cpu backend: the checks come before any
 * backend work.
 */
import * as tf from '@tensorflow/tfjs-core';

import {flashAttention, flashAttentionKVPacked, flashAttentionQKVPacked, FlashAttentionOptions} from '../src';

import {useBackend} from './harness/backends';

const B = 2, S = 5, H = 4, D = 8;

function rand(shape: number[], dtype: tf.DataType = 'float32'): tf.Tensor {
  const size = shape.reduce((a, b) => a * b, 1);
  const values = Float32Array.from({length: size}, () => Math.random() - 0.5);
  return dtype === 'float32' ? tf.tensor(values, shape) : tf.zeros(shape, dtype);
}

interface BadCall {
  name: string;
  call: () => unknown;
  /** Every pattern must appear in the message. */
  message: RegExp[];
}

function withOpts(opts: FlashAttentionOptions): () => unknown {
  return () => flashAttention(
             rand([B, S, H, D]) as tf.Tensor4D, rand([B, S, 2, D]) as tf.Tensor4D,
             rand([B, S, 2, D]) as tf.Tensor4D, opts);
}

const BAD_CALLS: BadCall[] = [
  {
    name: 'q of wrong rank',
    call: () => flashAttention(
        rand([S, H, D]) as never, rand([B, S, H, D]) as tf.Tensor4D,
        rand([B, S, H, D]) as tf.Tensor4D),
    message: [/\bq\b/, /rank 4/, /got rank 3/, /\[5, 4, 8\]/]
  },
  {
    name: 'k of wrong rank',
    call: () => flashAttention(
        rand([B, S, H, D]) as tf.Tensor4D, rand([B, S, H, D, 1]) as never,
        rand([B, S, H, D]) as tf.Tensor4D),
    message: [/\bk\b/, /rank 4/, /got rank 5/]
  },
  {
    name: 'q not a tensor',
    call: () => flashAttention(
        [[1]] as never, rand([B, S, H, D]) as tf.Tensor4D, rand([B, S, H, D]) as tf.Tensor4D),
    message: [/\bq\b/, /tf\.Tensor/, /object/]
  },
  {
    name: 'int32 v',
    call: () => flashAttention(
        rand([B, S, H, D]) as tf.Tensor4D, rand([B, S, H, D]) as tf.Tensor4D,
        rand([B, S, H, D], 'int32') as tf.Tensor4D),
    message: [/\bv\b/, /float32/, /int32/]
  },
  {
    name: 'head dims of q and k differ',
    call: () => flashAttention(
        rand([B, S, H, D]) as tf.Tensor4D, rand([B, S, H, 16]) as tf.Tensor4D,
        rand([B, S, H, 16]) as tf.Tensor4D),
    message: [/head dim/, /8 \(q\)/, /16 \(k\)/]
  },
  {
    name: 'k and v lengths differ',
    call: () => flashAttention(
        rand([B, S, H, D]) as tf.Tensor4D, rand([B, 7, H, D]) as tf.Tensor4D,
        rand([B, 6, H, D]) as tf.Tensor4D),
    message: [/sequence length/, /7 \(k\)/, /6 \(v\)/]
  },
  {
    name: 'k and v head counts differ',
    call: () => flashAttention(
        rand([B, S, H, D]) as tf.Tensor4D, rand([B, S, 2, D]) as tf.Tensor4D,
        rand([B, S, 1, D]) as tf.Tensor4D),
    message: [/number of heads/, /2 \(k\)/, /1 \(v\)/]
  },
  {
    name: 'batch sizes differ',
    call: () => flashAttention(
        rand([B, S, H, D]) as tf.Tensor4D, rand([3, S, H, D]) as tf.Tensor4D,
        rand([3, S, H, D]) as tf.Tensor4D),
    message: [/batch/, /q has 2/, /k has 3/]
  },
  {
    name: 'H % Hk != 0',
    call: () => flashAttention(
        rand([B, S, H, D]) as tf.Tensor4D, rand([B, S, 3, D]) as tf.Tensor4D,
        rand([B, S, 3, D]) as tf.Tensor4D),
    message: [/H % Hk/, /H=4/, /Hk=3/]
  },
  {
    name: 'head dim beyond 256',
    call: () => flashAttention(
        rand([1, 2, 1, 300]) as tf.Tensor4D, rand([1, 2, 1, 300]) as tf.Tensor4D,
        rand([1, 2, 1, 8]) as tf.Tensor4D),
    message: [/head dim of q/, /\[1, 256\]/, /300/]
  },
  {
    name: 'window with -2',
    call: withOpts({windowSize: [-2, 0]}),
    message: [/windowSize/, />= -1/, /\[-2, 0\]/]
  },
  {
    name: 'window not integers',
    call: withOpts({windowSize: [1.5, 2]}),
    message: [/windowSize/, /integers/, /\[1.5, 2\]/]
  },
  {
    name: 'window of one value',
    call: withOpts({windowSize: [3] as never}),
    message: [/windowSize/, /\[left, right\]/, /\[3\]/]
  },
  {
    name: 'dropoutRate 1',
    call: withOpts({dropoutRate: 1}),
    message: [/dropoutRate/, /\[0, 1\)/, /got 1\b/]
  },
  {
    name: 'dropoutRate negative',
    call: withOpts({dropoutRate: -0.1}),
    message: [/dropoutRate/, /\[0, 1\)/, /-0.1/]
  },
  {name: 'dropoutRate NaN', call: withOpts({dropoutRate: NaN}), message: [/dropoutRate/, /NaN/]},
  {name: 'negative softcap', call: withOpts({softcap: -1}), message: [/softcap/, />= 0/, /-1/]},
  {
    name: 'softmaxScale Infinity',
    call: withOpts({softmaxScale: Infinity}),
    message: [/softmaxScale/, /finite/, /Infinity/]
  },
  {
    name: 'seed not an integer',
    call: withOpts({dropoutRate: 0.1, seed: 1.5}),
    message: [/seed/, /integer/, /1.5/]
  },
  {
    name: 'causal not boolean',
    call: withOpts({causal: 1 as never}),
    message: [/causal/, /boolean/, /got 1/]
  },
  {
    name: 'alibi of wrong shape',
    call: () => withOpts({alibiSlopes: tf.ones([3])})(),
    message: [/alibiSlopes/, /\[4\] or \[2, 4\]/, /got \[3\]/]
  },
  {
    name: 'alibi [H, B] instead of [B, H]',
    call: () => withOpts({alibiSlopes: tf.ones([4, 2])})(),
    message: [/alibiSlopes/, /\[B, H\]/, /got \[4, 2\]/]
  },
  {
    name: 'alibi int32',
    call: () => withOpts({alibiSlopes: tf.ones([4], 'int32')})(),
    message: [/alibiSlopes/, /float32/, /int32/]
  },
  {
    name: 'qkv with 2 at axis 2',
    call: () => flashAttentionQKVPacked(rand([B, S, 2, H, D]) as tf.Tensor5D),
    message: [/qkv/, /\[B, S, 3, H, D\]/, /\[2, 5, 2, 4, 8\]/]
  },
  {
    name: 'qkv of rank 4',
    call: () => flashAttentionQKVPacked(rand([B, S, 3, H]) as never),
    message: [/qkv/, /rank 5/, /got rank 4/]
  },
  {
    name: 'kv with 3 at axis 2',
    call: () => flashAttentionKVPacked(
        rand([B, S, H, D]) as tf.Tensor4D, rand([B, S, 3, H, D]) as tf.Tensor5D),
    message: [/kv/, /\[B, Sk, 2, Hk, D\]/, /\[2, 5, 3, 4, 8\]/]
  },
  {
    name: 'kv head dim differs from q',
    call: () => flashAttentionKVPacked(
        rand([B, S, H, D]) as tf.Tensor4D, rand([B, S, 2, H, 4]) as tf.Tensor5D),
    message: [/head dim/, /8 \(q\)/, /4 \(kv\[:, :, 0\]\)/]
  },
  {
    name: 'empty sequence',
    call: () => flashAttention(
        rand([B, 0, H, D]) as tf.Tensor4D, rand([B, S, H, D]) as tf.Tensor4D,
        rand([B, S, H, D]) as tf.Tensor4D),
    message: [/\bq\b/, /empty/, /\[2, 0, 4, 8\]/]
  },
];

describe('input checks', () => {
  beforeAll(() => useBackend('cpu'));

  for (const bad of BAD_CALLS) {
    it(`refuses ${bad.name}, naming argument, expected and actual`, async () => {
      // Inputs are made inside the scope (by plain value uploads, no
      // kernel); the scope frees them, so any tensor left afterwards was
      // leaked by the op, and any kernel that ran was work done too early.
      const before = tf.memory().numTensors;
      let error: Error|undefined;
      const profile = await tf.profile(() => tf.tidy(() => {
        try {
          bad.call();
        } catch (e) {
          error = e as Error;
        }
      }));
      expect(profile.kernelNames).toEqual([]);
      expect(error).toBeInstanceOf(Error);
      for (const pattern of bad.message) {
        expect(error!.message).toMatch(pattern);
      }
      expect(tf.memory().numTensors).toBe(before);
    });
  }

  it('accepts the edge values the checks allow', () => {
    const out = tf.tidy(
        () => withOpts({windowSize: [-1, -1], dropoutRate: 0, softcap: 0, seed: 2 ** 53 - 1})() as
            tf.Tensor);
    expect(out.shape).toEqual([B, S, H, D]);
    out.dispose();
  });
});
