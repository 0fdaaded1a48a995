/**
 * Generation with KV caches that does not wait for the GPU per token
 * (demo/gpt.ts generateIdsWithCache): the ids picked on the device and fed
 * into the next step, read back in chunks, against the uncached model's
 * ids computed token by token on the host (greedy, and Gumbel-max sampling
 * with the same seed); end ids, no leaks; on cpu and webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';

import {buildGPT, generateIdsWithCache, scaledNoise, seededRandom} from '../demo/gpt';
import {FLASH_ATTENTION_IMPL} from '../src';
import {flashMHA} from '../src/layers';

import {describeBackends} from './harness/backends';
import {FORWARD_BOUND, freshRng} from './harness/problems';

const VOCAB = 16;

/**
 * Checks generated ids against the uncached model: the whole sequence
 * through it at once (composed attention; causal, so position t's logits
 * are those of the prefix up to t, as when generating token by token).
 * Each id must be the host's pick from those logits (plus the same noise,
 * drawn from `random` in order, when sampling), unless that pick is a near
 * tie (best and second score closer than the forward bound, relative to
 * the largest |logit|), where another path may legitimately differ.
 */
async function expectUncachedIds(
    model: tfl.LayersModel, prompt: number[], got: number[], temperature: number,
    random: () => number, what: string): Promise<void> {
  tf.env().set(FLASH_ATTENTION_IMPL, 'reference');
  const seq = [...prompt, ...got];
  const logits =
      tf.tidy(() => model.predict(tf.tensor2d([seq], [1, seq.length], 'int32')) as tf.Tensor);
  const values = await logits.data();
  logits.dispose();
  tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
  got.forEach((id, n) => {
    const at = (prompt.length - 1 + n) * VOCAB;
    const row = Array.from(values.subarray(at, at + VOCAB));
    const noise = temperature > 0 ? scaledNoise(VOCAB, random, temperature) : null;
    const scores = row.map((l, i) => noise == null ? l : Math.fround(l + noise[i]));
    const best = scores.indexOf(Math.max(...scores));
    const second = Math.max(...scores.filter((_, i) => i !== best));
    const margin = (scores[best] - second) / Math.max(...row.map(Math.abs));
    if (id !== best && margin > FORWARD_BOUND) {
      throw new Error(`${what}: id ${n} is ${id}, the uncached model picks ${best} (margin ${
          margin.toExponential(2)}); ids [${got}]`);
    }
  });
}

describeBackends('generateIdsWithCache', () => {
  let model: tfl.LayersModel;
  beforeAll(() => {
    model = buildGPT({vocabSize: VOCAB, numLayers: 1, embedDim: 32, numHeads: 2}, flashMHA, 'g');
    // The layers make their rotary tables on first use and keep them: made
    // here, so the leak checks below see only what generation makes.
    tf.tidy(() => model.predict(tf.tensor2d([[1, 2]], [1, 2], 'int32')));
  });
  afterAll(() => model.dispose());

  it('greedy: the uncached model\'s ids, whatever the chunking; end ids cut the output',
     async () => {
       const rng = freshRng();
       const prompt = Array.from({length: 3}, () => Math.floor(rng.uniform() * VOCAB));
       const length = 7;
       const before = tf.memory().numTensors;
       const runs = [
         {readEvery: 1, lag: false},  // waits for every id
         {readEvery: 3},              // chunks, each awaited one chunk later, the last one shorter
       ];
       const outputs: number[][] = [];
       for (const opts of runs) {
         outputs.push(await generateIdsWithCache(model, prompt, length, opts));
       }
       expect(outputs[0]).toHaveLength(length);
       await expectUncachedIds(
           model, prompt, outputs[0], 0, Math.random, `greedy (seed ${rng.seed})`);
       // One device path: every chunking gives the very same ids.
       outputs.forEach(o => expect(o).toEqual(outputs[0]));
       // An end id: the output stops at its first occurrence, also mid-chunk.
       const ids = outputs[0];
       const endAt = ids.findIndex((id, i) => i >= 2 && ids.indexOf(id) === i);
       if (endAt >= 0) {
         const ended =
             await generateIdsWithCache(model, prompt, length, {readEvery: 3, endId: ids[endAt]});
         expect(ended).toEqual(ids.slice(0, endAt + 1));
       }
       expect(tf.memory().numTensors).toBe(before);
     });

  it('sampling: the uncached host draws for the same seed (Gumbel-max on the device)', async () => {
    const rng = freshRng();
    const prompt = Array.from({length: 2}, () => Math.floor(rng.uniform() * VOCAB));
    const [length, temperature] = [5, 0.9];
    const before = tf.memory().numTensors;
    const got = await generateIdsWithCache(
        model, prompt, length, {temperature, random: seededRandom(rng.seed), readEvery: 3});
    expect(got).toHaveLength(length);
    await expectUncachedIds(
        model, prompt, got, temperature, seededRandom(rng.seed), `sampled (seed ${rng.seed})`);
    expect(tf.memory().numTensors).toBe(before);
  });
});
