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
 * Ids of the uncached model (the whole sequence per token, composed
 * attention), picked on the host, and each pick's margin: the gap between
 * the best and second score over the largest |logit| (a pick with a margin
 * within the forward bound may legitimately differ on another path).
 */
async function uncachedIds(
    model: tfl.LayersModel, prompt: number[], length: number, temperature: number,
    random: () => number): Promise<{ids: number[], margins: number[]}> {
  tf.env().set(FLASH_ATTENTION_IMPL, 'reference');
  const seq = [...prompt];
  const margins: number[] = [];
  for (let n = 0; n < length; n++) {
    const logits = tf.tidy(() => {
      const all = model.predict(tf.tensor2d([seq], [1, seq.length], 'int32')) as tf.Tensor;
      return tf.slice(all, [0, seq.length - 1, 0], [1, 1, VOCAB]);
    });
    const values = await logits.data();
    logits.dispose();
    const noise = temperature > 0 ? scaledNoise(VOCAB, random, temperature) : null;
    const scores = Array.from(values, (l, i) => noise == null ? l : Math.fround(l + noise[i]));
    const best = scores.indexOf(Math.max(...scores));
    const second = Math.max(...scores.filter((_, i) => i !== best));
    margins.push((scores[best] - second) / Math.max(...values.map(Math.abs)));
    seq.push(best);
  }
  tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
  return {ids: seq.slice(prompt.length), margins};
}

/** `got` equals `want`, or first differs at a pick closer than the bound (a near tie). */
function expectSameIds(got: number[], want: number[], margins: number[], what: string): void {
  const first = want.findIndex((id, i) => got[i] !== id);
  if (first >= 0 && margins[first] > FORWARD_BOUND) {
    throw new Error(`${what}: id ${first} is ${got[first]}, want ${want[first]} (margin ${
        margins[first].toExponential(2)}); got [${got}], want [${want}]`);
  }
  expect(got.length).toBe(want.length);
}

describeBackends('generateIdsWithCache', () => {
  let model: tfl.LayersModel;
  beforeAll(() => {
    model = buildGPT({vocabSize: VOCAB, numLayers: 1, embedDim: 32, numHeads: 2}, flashMHA, 'g');
  });
  afterAll(() => model.dispose());

  it('greedy: the uncached model\'s ids, whatever the chunking; end ids cut the output',
     async () => {
       const rng = freshRng();
       const prompt = Array.from({length: 3}, () => Math.floor(rng.uniform() * VOCAB));
       const length = 7;
       const want = await uncachedIds(model, prompt, length, 0, Math.random);
       const before = tf.memory().numTensors;
       const runs = [
         {readEvery: 1, lag: false},  // waits for every id
         {readEvery: 3},              // chunks, each awaited one chunk later, the last one shorter
       ];
       const outputs: number[][] = [];
       for (const opts of runs) {
         const got = await generateIdsWithCache(model, prompt, length, opts);
         expectSameIds(got, want.ids, want.margins, `${JSON.stringify(opts)} (seed ${rng.seed})`);
         outputs.push(got);
       }
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
    const want = await uncachedIds(model, prompt, length, temperature, seededRandom(rng.seed));
    const before = tf.memory().numTensors;
    const got = await generateIdsWithCache(
        model, prompt, length, {temperature, random: seededRandom(rng.seed), readEvery: 3});
    expectSameIds(got, want.ids, want.margins, `sampled (seed ${rng.seed})`);
    expect(tf.memory().numTensors).toBe(before);
  });
});
