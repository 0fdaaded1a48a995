/**
 * FlashMHA.decode and IncrementalDecoder: decoding token by token (or a
 * few tokens at a time) with a KV cache gives, row for row, what the
 * layer or model computes on the whole sequence; no leaks.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';

import {FLASH_ATTENTION_IMPL} from '../../src';
import {FlashMHA, flashMHA, FlashMHAArgs, IncrementalDecoder, MultiHeadAttention} from '../../src/layers';
import {describeBackends} from '../harness/backends';
import {expectClose, FORWARD_BOUND, freshRng, randomArray} from '../harness/problems';

const E = 32;
const CASES: Array<{name: string, args: FlashMHAArgs, chunks: number[]}> = [
  {
    name: 'GQA, RoPE (halves), one token per step',
    args: {embedDim: E, numHeads: 4, numHeadsKV: 2, causal: true, rotaryEmbDim: 8},
    chunks: [1, 1, 1, 1]
  },
  {
    name: 'interleaved partial RoPE, ALiBi, softcap, window; a 3-token prompt then tokens',
    args: {
      embedDim: E,
      numHeads: 2,
      causal: true,
      rotaryEmbDim: 4,
      rotaryEmbInterleaved: true,
      useAlibi: true,
      softcap: 4,
      windowSize: [3, 0]
    },
    chunks: [3, 1, 2]
  },
];

/** Rows [from, from + n) of x [B, S, E]. */
function rows(x: tf.Tensor3D, from: number, n: number): tf.Tensor3D {
  return tf.slice(x, [0, from, 0], [x.shape[0], n, x.shape[2]]);
}

describeBackends('FlashMHA.decode', backend => {
  afterAll(() => tf.env().set(FLASH_ATTENTION_IMPL, 'auto'));
  // The full-sequence call runs on the composed reference (the fused
  // forward is checked against the oracle elsewhere, and compiling it on
  // SwiftShader takes tens of seconds); decode runs fused where it can.
  const fullImpl = 'reference';
  for (const impl of ['auto']) {
    for (const c of CASES) {
      it(`${c.name} (${impl}) equals the full-sequence call row for row`, async () => {
        const rng = freshRng();
        const seq = c.chunks.reduce((a, b) => a + b, 0);
        const batch = 2;
        const layer = flashMHA(c.args);
        const x =
            tf.tensor3d(Float32Array.from(randomArray(batch * seq * E, rng)), [batch, seq, E]);
        tf.env().set(FLASH_ATTENTION_IMPL, fullImpl);
        const full = layer.apply(x) as tf.Tensor3D;
        tf.env().set(FLASH_ATTENTION_IMPL, impl);
        const before = tf.memory().numTensors;
        const cache = layer.createCache(batch, seq + 2);
        const outs: tf.Tensor3D[] = [];
        let at = 0;
        for (const n of c.chunks) {
          outs.push(tf.tidy(() => layer.decode(rows(x, at, n), cache)));
          at += n;
        }
        expect(cache.length).toBe(seq);
        const decoded = tf.concat(outs, 1);
        expectClose(
            await decoded.data(), await full.data(), FORWARD_BOUND,
            `${c.name} on ${backend} (${impl}), seed ${rng.seed}`);
        tf.dispose([decoded, ...outs]);
        cache.dispose();
        expect(tf.memory().numTensors).toBe(before);
        tf.dispose([x, full]);
        layer.dispose();
      });
    }
  }

  it('IncrementalDecoder of a small GPT-like model gives the full model\'s logits', async () => {
    tf.env().set(FLASH_ATTENTION_IMPL, fullImpl);
    const rng = freshRng();
    const vocab = 11;
    const tokens = tfl.input({shape: [null], dtype: 'int32'});
    const embedded =
        tfl.layers.embedding({inputDim: vocab, outputDim: E}).apply(tokens) as tfl.SymbolicTensor;
    const attended =
        flashMHA({embedDim: E, numHeads: 4, numHeadsKV: 1, causal: true, rotaryEmbDim: 8})
            .apply(embedded) as tfl.SymbolicTensor;
    const summed = tfl.layers.add().apply([embedded, attended]) as tfl.SymbolicTensor;
    const second =
        flashMHA({embedDim: E, numHeads: 2, causal: true}).apply(summed) as tfl.SymbolicTensor;
    const logits = tfl.layers.dense({units: vocab}).apply(second) as tfl.SymbolicTensor;
    const model = tfl.model({inputs: tokens, outputs: logits});
    const seq = 4;
    const ids = Array.from({length: 2 * seq}, () => Math.floor(rng.uniform() * vocab));
    const input = tf.tensor2d(ids, [2, seq], 'int32');
    const full = model.predict(input) as tf.Tensor3D;
    tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
    const before = tf.memory().numTensors;
    const decoder = new IncrementalDecoder(model, {batch: 2, maxSeqLen: seq});
    const steps: tf.Tensor[] = [];
    steps.push(decoder.step(tf.slice(input, [0, 0], [2, 2])));
    for (let t = 2; t < seq; t++) {
      steps.push(tf.tidy(() => decoder.step(tf.slice(input, [0, t], [2, 1]))));
    }
    expect(decoder.length).toBe(seq);
    expect(() => tf.tidy(() => decoder.step(tf.slice(input, [0, 0], [2, 1]))))
        .toThrow(/exceed maxSeqLen/);
    const got = tf.concat(steps, 1);
    expectClose(
        await got.data(), await full.data(), FORWARD_BOUND,
        `GPT decode on ${backend}, seed ${rng.seed}`);
    tf.dispose([got, ...steps]);
    decoder.dispose();
    // The slice of the first step was made outside a tidy.
    expect(tf.memory().numTensors).toBeLessThanOrEqual(before + 1);
    tf.dispose([input, full]);
    model.dispose();
  });

  it('the Keras MultiHeadAttention loader decodes like its causal self-attention call',
     async () => {
       const rng = freshRng();
       const [batch, seq, features] = [2, 5, 12];
       const layer = new MultiHeadAttention({numHeads: 2, keyDim: 8, valueDim: 4});
       const x = tf.tensor3d(
           Float32Array.from(randomArray(batch * seq * features, rng)), [batch, seq, features]);
       tf.env().set(FLASH_ATTENTION_IMPL, fullImpl);
       const full = layer.apply(x, {value: x, useCausalMask: true}) as tf.Tensor;
       tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
       const before = tf.memory().numTensors;
       const cache = layer.createCache(batch, seq);
       const outs = [2, 1, 2]
                        .reduce<{at: number, outs: tf.Tensor[]}>(
                            (acc, n) => {
                              acc.outs.push(tf.tidy(() => layer.decode(rows(x, acc.at, n), cache)));
                              return {at: acc.at + n, outs: acc.outs};
                            },
                            {at: 0, outs: []})
                        .outs;
       const decoded = tf.concat(outs, 1);
       expectClose(
           await decoded.data(), await full.data(), FORWARD_BOUND,
           `MultiHeadAttention decode on ${backend}, seed ${rng.seed}`);
       tf.dispose([decoded, ...outs]);
       cache.dispose();
       expect(tf.memory().numTensors).toBe(before);
       tf.dispose([x, full]);
       layer.dispose();
     });

  it('refuses a non-causal layer and a mismatched cache', () => {
    const layer = flashMHA({embedDim: E, numHeads: 4});
    layer.apply(tfl.input({shape: [null, E]}));
    const cache = layer.createCache(1, 4);
    expect(() => layer.decode(tf.zeros([1, 1, E]), cache)).toThrow(/needs causal self-attention/);
    const causal = new FlashMHA({embedDim: E, numHeads: 2, causal: true});
    causal.apply(tfl.input({shape: [null, E]}));
    expect(() => causal.decode(tf.zeros([1, 1, E]), cache))
        .toThrow(/cache must be a KVCache from createCache/);
    cache.dispose();
  });
});
