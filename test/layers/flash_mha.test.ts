/**
 * FlashMHA against a float64 oracle of the whole layer (projections, RoPE,
 * attention, output projection), and its properties: causality, GQA/MQA,
 * key padding masks, dropout only in training, no leaks.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';

import {FlashAttention, hasFusedKernel} from '../../src';
import {alibiSlopes, FlashMHA, flashMHA, FlashMHAArgs} from '../../src/layers';
import {describeBackends} from '../harness/backends';
import {expectClose, FORWARD_BOUND, freshRng, randomArray, Rng} from '../harness/problems';

import {LayerConfig, LayerWeights, layerOracle, maskedAttentionOracle} from './mha_oracle';
import {oracleForward} from '../oracle';

/** The layer's weights by short name ('qkv/kernel'...), in float64. */
async function weightsOf(layer: FlashMHA): Promise<LayerWeights> {
  const result: LayerWeights = {};
  for (const w of layer.weights) {
    const name = w.originalName.split('/').slice(-2).join('/');
    result[name] = Float64Array.from(await w.read().data());
  }
  return result;
}

/** Random (non-zero) biases, so that bias handling is checked too. */
function randomizeBiases(layer: FlashMHA, rng: Rng) {
  for (const w of layer.weights) {
    if (w.originalName.endsWith('bias')) {
      const shape = w.shape as number[];
      w.write(tf.tensor(
          Float32Array.from(randomArray(shape.reduce((a, b) => a * b, 1), rng, 0.5)), shape));
    }
  }
}

function configOf(layer: FlashMHA): LayerConfig {
  return {
    embedDim: layer.embedDim,
    numHeads: layer.numHeads,
    numHeadsKV: layer.numHeadsKV,
    headDim: layer.headDim,
    causal: layer.causal,
    softmaxScale: layer.softmaxScale,
    windowSize: layer.windowSize,
    softcap: layer.softcap,
    useAlibi: layer.useAlibi,
    rotaryEmbDim: layer.rotaryEmbDim,
    rotaryEmbBase: layer.rotaryEmbBase,
    rotaryEmbInterleaved: layer.rotaryEmbInterleaved,
    crossAttention: layer.crossAttention,
    alibiSlopes: layer.useAlibi ? alibiSlopes(layer.numHeads) : [],
  };
}

interface Case {
  name: string;
  args: FlashMHAArgs;
  seqQ: number;
  seqK?: number;
  kvDim?: number;
}

const E = 32;
const CASES: Case[] = [
  {name: 'plain', args: {embedDim: E, numHeads: 4}, seqQ: 9},
  {
    name: 'causal, GQA numHeadsKV=2, RoPE (halves)',
    args: {embedDim: E, numHeads: 4, numHeadsKV: 2, causal: true, rotaryEmbDim: 8},
    seqQ: 12
  },
  {
    name: 'MQA numHeadsKV=1, interleaved partial RoPE, ALiBi, softcap, scale',
    args: {
      embedDim: E,
      numHeads: 4,
      numHeadsKV: 1,
      rotaryEmbDim: 4,
      rotaryEmbInterleaved: true,
      rotaryEmbBase: 500,
      useAlibi: true,
      softcap: 2,
      softmaxScale: 0.5,
      causal: true
    },
    seqQ: 10
  },
  {
    name: 'window [3, 1], headDim 16 != E/H, no biases',
    args: {
      embedDim: E,
      numHeads: 2,
      headDim: 16,
      windowSize: [3, 1],
      qkvProjBias: false,
      outProjBias: false
    },
    seqQ: 11
  },
  {
    name: 'cross-attention, causal, Sq < Sk, xKV of another width',
    args: {embedDim: E, numHeads: 4, numHeadsKV: 2, crossAttention: true, causal: true},
    seqQ: 5,
    seqK: 13,
    kvDim: 24
  },
];

describeBackends('FlashMHA', backend => {
  let rng: Rng;
  beforeEach(() => {
    rng = freshRng();
  });

  function randomInput(batch: number, seq: number, dim: number) {
    const values = randomArray(batch * seq * dim, rng);
    return {values, tensor: tf.tensor3d(Float32Array.from(values), [batch, seq, dim])};
  }

  for (const c of CASES) {
    it(`matches the float64 oracle: ${c.name}`, async () => {
      const batch = 2;
      const layer = flashMHA(c.args);
      const x = randomInput(batch, c.seqQ, E);
      const xKV = c.seqK ? randomInput(batch, c.seqK, c.kvDim ?? E) : null;
      const inputs = xKV ? [x.tensor, xKV.tensor] : x.tensor;
      tf.dispose(layer.apply(inputs) as tf.Tensor);  // builds the weights
      randomizeBiases(layer, rng);
      const before = tf.memory().numTensors;
      const out = layer.apply(inputs) as tf.Tensor;
      expect(out.shape).toEqual([batch, c.seqQ, E]);
      const expected = layerOracle(
          configOf(layer), await weightsOf(layer), batch, x.values, c.seqQ,
          xKV ? {values: xKV.values, seq: c.seqK!, dim: c.kvDim ?? E} : undefined);
      expectClose(await out.data(), expected, FORWARD_BOUND, `${c.name} (seed ${rng.seed})`);
      out.dispose();
      expect(tf.memory().numTensors).toBe(before);
      tf.dispose([x.tensor, xKV?.tensor as tf.Tensor]);
      layer.dispose();
    });
  }

  it('keeps its RoPE tables between calls: longer and shorter sequences match the oracle; dispose frees them',
     async () => {
       const start = tf.memory().numTensors;
       const layer = flashMHA({
         embedDim: E,
         numHeads: 4,
         numHeadsKV: 2,
         causal: true,
         rotaryEmbDim: 8,
         rotaryEmbInterleaved: true
       });
       for (const seq of [12, 5, 12, 17, 3]) {
         const x = randomInput(2, seq, E);
         const out = layer.apply(x.tensor) as tf.Tensor;
         const expected = layerOracle(configOf(layer), await weightsOf(layer), 2, x.values, seq);
         expectClose(
             await out.data(), expected, FORWARD_BOUND,
             `RoPE tables at seq ${seq} (seed ${rng.seed})`);
         tf.dispose([out, x.tensor]);
       }
       layer.dispose();
       expect(tf.memory().numTensors).toBe(start);
     });

  it('the masked oracle agrees with oracleForward when nothing is masked', () => {
    const shape = {batch: 2, seqQ: 6, seqK: 7, heads: 4, headsKV: 2, headDim: 8, headDimV: 8};
    const p = {
      ...shape,
      q: randomArray(2 * 6 * 4 * 8, rng),
      k: randomArray(2 * 7 * 2 * 8, rng),
      v: randomArray(2 * 7 * 2 * 8, rng),
      alibiSlopes: Float64Array.from([0.1, 0.2, 0.3, 0.4])
    };
    const o = {causal: true, softcap: 3, windowSize: [2, -1] as [number, number]};
    const all = [Array(7).fill(true), Array(7).fill(true)];
    expectClose(maskedAttentionOracle(p, o, all), oracleForward(p, o).out, 1e-12, 'masked oracle');
  });

  for (const causal of [false, true]) {
    it(`key padding mask (causal ${
           causal}): masked keys get no weight, a fully masked row gives zeros`,
       async () => {
         const batch = 3;
         const seq = 8;
         const layer = flashMHA({embedDim: E, numHeads: 4, numHeadsKV: 2, causal, rotaryEmbDim: 8});
         const x = randomInput(batch, seq, E);
         tf.dispose(layer.apply(x.tensor) as tf.Tensor);
         randomizeBiases(layer, rng);
         // Batch 0: random padding; batch 1: the first keys hidden, so early
         // causal rows see nothing; batch 2: every key hidden.
         const mask = [
           Array.from({length: seq}, (_, j) => j === 0 || rng.uniform() < 0.6),
           Array.from({length: seq}, (_, j) => j >= 3),
           Array(seq).fill(false),
         ];
         const maskTensor = tf.tensor2d(mask, [batch, seq], 'bool');
         const before = tf.memory().numTensors;
         const out = layer.apply(x.tensor, {keyPaddingMask: maskTensor}) as tf.Tensor;
         const expected = layerOracle(
             configOf(layer), await weightsOf(layer), batch, x.values, seq, undefined, mask);
         const actual = await out.data();
         expectClose(actual, expected, FORWARD_BOUND, `mask causal=${causal} (seed ${rng.seed})`);
         // Batch 2 sees no key: its attention is 0, so its output is the output bias.
         const outBias =
             await layer.weights.find(w => w.originalName.endsWith('out/bias'))!.read().data();
         for (let i = 0; i < seq * E; i++) {
           expect(actual[2 * seq * E + i]).toBeCloseTo(outBias[i % E], 6);
         }
         out.dispose();
         expect(tf.memory().numTensors).toBe(before);
         tf.dispose([x.tensor, maskTensor]);
       });
  }

  it('causal: the output at t does not change when inputs after t change', async () => {
    const seq = 10;
    const t = 4;
    const causalLayer = flashMHA({embedDim: E, numHeads: 4, causal: true, rotaryEmbDim: 8});
    const fullLayer = flashMHA({embedDim: E, numHeads: 4, causal: false, rotaryEmbDim: 8});
    const x = randomInput(1, seq, E).values;
    const changed = Float64Array.from(x);
    for (let i = (t + 1) * E; i < seq * E; i++) {
      changed[i] = rng.normal();
    }
    for (const [layer, isCausal] of [[causalLayer, true], [fullLayer, false]] as const) {
      const [a, b] = await Promise.all([x, changed].map(async v => {
        const input = tf.tensor3d(Float32Array.from(v), [1, seq, E]);
        const out = layer.apply(input) as tf.Tensor;
        const values = await out.data();
        tf.dispose([input, out]);
        return values;
      }));
      let maxPrefixChange = 0;
      for (let i = 0; i < (t + 1) * E; i++) {
        maxPrefixChange = Math.max(maxPrefixChange, Math.abs(a[i] - b[i]));
      }
      if (isCausal) {
        expect(maxPrefixChange).toBeLessThan(1e-6);
      } else {
        // The same check fails without causal: it can tell.
        expect(maxPrefixChange).toBeGreaterThan(1e-3);
      }
    }
  });

  it('GQA with numHeadsKV=1 has the fewer weights and trains', async () => {
    const layer = flashMHA({embedDim: E, numHeads: 8, numHeadsKV: 1, causal: true});
    const x = randomInput(2, 6, E).tensor;
    const target = tf.randomNormal([2, 6, E]);
    tf.dispose(layer.apply(x) as tf.Tensor);
    // q: 8 heads x 4, k and v: 1 head x 4 each.
    expect(layer.weights.find(w => w.originalName.endsWith('qkv/kernel'))!.shape).toEqual([
      E, (8 + 2) * 4
    ]);
    const optimizer = tf.train.adam(0.01);
    const loss = () => tf.losses.meanSquaredError(target, layer.apply(x) as tf.Tensor) as tf.Scalar;
    const lossValue = async () => {
      const l = loss();
      const value = (await l.data())[0];
      l.dispose();
      return value;
    };
    const first = await lossValue();
    for (let i = 0; i < 10; i++) {
      tf.dispose(optimizer.minimize(loss, true)!);
    }
    const last = await lossValue();
    expect(last).toBeLessThan(first);
    tf.dispose([x, target]);
    optimizer.dispose();
  });

  it('dropout is active only when training', async () => {
    const layer = flashMHA({embedDim: E, numHeads: 4, dropout: 0.5, causal: true});
    const x = randomInput(2, 8, E);
    const run = async (training?: boolean) => {
      const out = layer.apply(x.tensor, training == null ? undefined : {training}) as tf.Tensor;
      const values = Float64Array.from(await out.data());
      out.dispose();
      return values;
    };
    const inference = await run();
    expect(await run(false)).toEqual(inference);
    const expected = layerOracle(configOf(layer), await weightsOf(layer), 2, x.values, 8);
    expectClose(inference, expected, FORWARD_BOUND, `dropout off (seed ${rng.seed})`);
    const trainA = await run(true);
    const trainB = await run(true);
    const differs = (a: Float64Array, b: Float64Array) =>
        a.some((v, i) => Math.abs(v - b[i]) > 1e-4);
    expect(differs(trainA, inference)).toBe(true);
    expect(differs(trainA, trainB)).toBe(true);
    x.tensor.dispose();
  });

  it('its gradients match those of the composed masked path (all keys kept)', async () => {
    const layer = flashMHA(
        {embedDim: E, numHeads: 4, numHeadsKV: 2, causal: true, rotaryEmbDim: 8, softcap: 5});
    const x = randomInput(2, 7, E).tensor;
    const keep = tf.ones([2, 7], 'bool');
    const dy = tf.randomNormal([2, 7, E]);
    tf.dispose(layer.apply(x) as tf.Tensor);
    const vars = layer.trainableWeights.map(w => w.read() as tf.Variable);
    const grads = (kwargs: object) => {
      const {value, grads: g} = tf.variableGrads(
          () => tf.sum(tf.mul(layer.apply(x, kwargs) as tf.Tensor, dy)) as tf.Scalar,
          vars as tf.Variable[]);
      value.dispose();
      const xGrad =
          tf.grad((input: tf.Tensor) => tf.mul(layer.apply(input, kwargs) as tf.Tensor, dy))(x);
      return [...vars.map(v => g[v.name]), xGrad];
    };
    const before = tf.memory().numTensors;
    const flash = grads({});
    const masked = grads({keyPaddingMask: keep});
    for (let i = 0; i < flash.length; i++) {
      expectClose(
          await flash[i].data(), await masked[i].data(), 5e-4, `gradient ${i} (seed ${rng.seed})`);
    }
    tf.dispose([...flash, ...masked]);
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([x, keep, dy]);
  });

  it('runs the backend\'s fused kernel when it has one (padding masks too), the masked path for other masks',
     async () => {
       // Not causal: per-batch key lengths would move a causal diagonal, so
       // causal layers keep padding masks on the masked composed path.
       const layer = flashMHA({embedDim: E, numHeads: 4});
       const x = randomInput(1, 8, E).tensor;
       const keep = tf.ones([1, 8], 'bool');
       const kernelsOf = async (kwargs?: object) =>
           (await tf.profile(() => layer.apply(x, kwargs) as tf.Tensor)).kernelNames;
       const fused = hasFusedKernel(FlashAttention, tf.getBackend());
       expect(fused).toBe(backend === 'webgpu');  // The package's kernels are WebGPU's.
       const used = fused && tf.env().get('FLASH_ATTENTION_IMPL') !== 'reference';
       expect((await kernelsOf()).includes(FlashAttention)).toBe(used);
       // A padding mask runs fused (per-batch key lengths); a mask with a
       // hole, the masked composed path.
       expect((await kernelsOf({keyPaddingMask: keep})).includes(FlashAttention)).toBe(used);
       const holes =
           tf.tensor2d([[true, false, true, true, true, true, true, true]], [1, 8], 'bool');
       expect((await kernelsOf({keyPaddingMask: holes})).includes(FlashAttention)).toBe(false);
       tf.dispose([x, keep, holes]);
     });

  it('refuses bad arguments with errors naming them', () => {
    expect(() => flashMHA({embedDim: 30, numHeads: 4}))
        .toThrow(/embedDim must be a multiple of numHeads.*30/);
    expect(() => flashMHA({embedDim: 32, numHeads: 4, numHeadsKV: 3})).toThrow(/numHeadsKV.*3/);
    expect(() => flashMHA({embedDim: 32, numHeads: 0}))
        .toThrow(/numHeads must be a positive integer, got 0/);
    expect(() => flashMHA({embedDim: 32, numHeads: 4, rotaryEmbDim: 5}))
        .toThrow(/rotaryEmbDim.*got 5/);
    expect(() => flashMHA({embedDim: 32, numHeads: 4, dropout: 1})).toThrow(/dropout.*got 1/);
    expect(() => flashMHA({embedDim: 32, numHeads: 4, windowSize: [-2, 0]}))
        .toThrow(/windowSize.*\[-2, 0\]/);
    expect(() => flashMHA({embedDim: 32, numHeads: 4, kernelInitializer: 'noSuchInit' as never}))
        .toThrow(/kernelInitializer 'noSuchInit'/);
    const layer = flashMHA({embedDim: 32, numHeads: 4});
    const wrongWidth = tf.zeros([1, 3, 16]);
    const before = tf.memory().numTensors;
    expect(() => layer.apply(wrongWidth)).toThrow(/last dim of x must be embedDim = 32.*16/);
    expect(tf.memory().numTensors).toBe(before);
    const x = tf.zeros([1, 3, 32]);
    const badMask = tf.ones([1, 4], 'bool');
    expect(() => layer.apply(x, {
      keyPaddingMask: badMask
    })).toThrow(/keyPaddingMask must have shape \[batch, seqK\] = \[1, 3\], got \[1, 4\]/);
    tf.dispose([wrongWidth, x, badMask]);
    // Unused import guard: tfl is the layers package the layer extends.
    expect(layer).toBeInstanceOf(tfl.layers.Layer);
  });
});
