/**
 * The MultiHeadAttention layer on its own, against tfjs-layers' own
 * MultiHeadAttention (the harness) with the same weights: call
 * conventions, masks (Keras's top-left causal mask for every Sq/Sk, masks
 * with fully masked rows, broadcast masks), returned scores, inputs of
 * rank 4, output_shape; that plain calls go through flashAttention; that
 * training works; no leaks.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';

import {webgpuCounters, WebGPUCounts} from '../../benchmarks/webgpu_counters';
import {setForwardOverride} from '../../kernels/webgpu/FlashAttention';
import {FLASH_ATTENTION_IMPL} from '../../src';
import {MultiHeadAttention, MultiHeadAttentionArgs} from '../../src/layers/multi_head_attention';
import {describeBackends, useBackend} from '../harness/backends';
import {disposeKerasMHA, KERAS_MHA_WEIGHT_NAMES, kerasMultiHeadAttention, setKerasMHAWeights} from '../harness/keras_mha';
import {expectClose, FORWARD_BOUND, freshRng, GRADIENT_BOUND, Rng} from '../harness/problems';
import {useSmallTiles} from '../harness/small_tiles';

import {kerasMHAOracle, KerasMHAOracleProblem, KerasMHAOracleWeights} from './keras_oracle';
import {loadModel, randomInputs, randomWeights, readFixture, weightSpecs} from './keras_models';

const BOUND = 1e-5;
/** fwd+bwd of a padding-masked self-attention call on webgpu (the last test). */
const PADDING_MASK_GRAD_DISPATCHES = 41;
/** Its host uploads at S = 16: scalars and the mask's key range, by shape. */
const HOST_UPLOADS: Array<[string, number]> = [['bool[]', 1], ['int32[16]', 1], ['int32[]', 2]];

function normals(shape: number[], rng: Rng, scale = 1): tf.Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  return tf.tensor(Float32Array.from({length: n}, () => rng.normal() * scale), shape);
}

function zeroOneMask(shape: number[], rng: Rng): tf.Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const values = Float32Array.from({length: n}, () => (rng.uniform() < 0.6 ? 1 : 0));
  values.fill(0, 0, shape[shape.length - 1]);  // A fully masked row.
  return tf.tensor(values, shape);
}

/**
 * `[B, rows, S]` key padding mask: batch rows of 0 and 1 keys, the others
 * random lengths; every query row carries its batch row's mask.
 */
function paddingMask(shape: number[], rng: Rng): tf.Tensor {
  const [batch, rows, seq] = shape;
  const lengths = Array.from({length: batch}, (_, b) => b < 2 ? b : rng.int(0, seq));
  const values = Float32Array.from(
      {length: batch * rows * seq},
      (_, n) => n % seq < lengths[Math.floor(n / (rows * seq))] ? 1 : 0);
  return tf.tensor(values, shape);
}

interface CallCase {
  title: string;
  args: MultiHeadAttentionArgs;
  query: number[];
  value: number[];
  key?: number[];
  mask?: number[];
  /** The mask is a key padding mask (fused), not a random one. */
  padding?: boolean;
  causal?: boolean;
  scores?: boolean;
  /** Run the reference on cpu (tfjs-webgpu's einsum stops at rank 6). */
  referenceOnCpu?: boolean;
}

const CASES: CallCase[] = [
  {title: 'self-attention', args: {numHeads: 2, keyDim: 8}, query: [2, 12, 16], value: [2, 12, 16]},
  {
    title: 'cross-attention with a key, value_dim != key_dim, no bias',
    args: {numHeads: 3, keyDim: 4, valueDim: 6, useBias: false},
    query: [2, 7, 10],
    value: [2, 9, 12],
    key: [2, 9, 5]
  },
  {
    title: 'causal, Sq == Sk',
    args: {numHeads: 2, keyDim: 8},
    query: [2, 11, 16],
    value: [2, 11, 16],
    causal: true
  },
  {
    title: 'causal, Sq > Sk (top-left: a right window)',
    args: {numHeads: 2, keyDim: 8},
    query: [2, 13, 16],
    value: [2, 6, 16],
    causal: true
  },
  {
    title: 'causal, Sq < Sk (composed path)',
    args: {numHeads: 2, keyDim: 8},
    query: [2, 5, 16],
    value: [2, 9, 16],
    causal: true
  },
  {
    title: 'attention_mask [B, T, S] with a fully masked row, scores returned',
    args: {numHeads: 2, keyDim: 4},
    query: [2, 6, 8],
    value: [2, 7, 8],
    mask: [2, 6, 7],
    scores: true
  },
  {
    title: 'attention_mask [T, S] broadcast, and causal',
    args: {numHeads: 2, keyDim: 4},
    query: [2, 6, 8],
    value: [2, 6, 8],
    mask: [6, 6],
    causal: true
  },
  {
    title: 'attention_mask [B, 1, S] padding mask, causal (fused)',
    args: {numHeads: 2, keyDim: 4},
    query: [3, 9, 8],
    value: [3, 9, 8],
    mask: [3, 1, 9],
    padding: true,
    causal: true
  },
  {
    title: 'attention_mask [B, T, S] padding mask, causal, Sq > Sk (fused)',
    args: {numHeads: 2, keyDim: 4},
    query: [3, 10, 8],
    value: [3, 7, 8],
    mask: [3, 10, 7],
    padding: true,
    causal: true
  },
  {
    title: 'rank-4 inputs (attention over both middle axes), scores returned',
    args: {numHeads: 2, keyDim: 4},
    query: [2, 3, 4, 8],
    value: [2, 2, 3, 8],
    scores: true,
    referenceOnCpu: true
  },
  {
    title: 'key_dim beyond flashAttention\'s 256 (composed path)',
    args: {numHeads: 1, keyDim: 260, valueDim: 4},
    query: [1, 3, 8],
    value: [1, 4, 8]
  },
  {
    title: 'output_shape [4, 2]',
    args: {numHeads: 2, keyDim: 4, outputShape: [4, 2]},
    query: [2, 5, 8],
    value: [2, 5, 8]
  },
];

interface Result {
  shape: number[];
  data: Float32Array;
}

/**
 * tfjs-layers' MultiHeadAttention on the same inputs and weights, on the
 * current backend or on cpu (inputs copied there asynchronously: webgpu
 * in Node cannot read synchronously).
 */
async function reference(
    c: CallCase, inputs: Record<string, tf.Tensor|undefined>,
    weights: Record<string, tf.Tensor>): Promise<[Result, Result]> {
  const backend = tf.getBackend();
  const toCpu = async (t: tf.Tensor) => ({shape: t.shape, data: await t.data()});
  const onCpu = async (ts: Record<string, tf.Tensor|undefined>) => {
    const copies: Record<string, {shape: number[], data: tf.TypedArray}> = {};
    for (const [name, t] of Object.entries(ts)) {
      if (t != null) {
        copies[name] = await toCpu(t);
      }
    }
    return copies;
  };
  let x = inputs as Record<string, tf.Tensor>;
  let w = weights;
  if (c.referenceOnCpu) {
    const [xc, wc] = [await onCpu(inputs), await onCpu(weights)];
    await tf.setBackend('cpu');
    const make = (copies: typeof xc) =>
        Object.fromEntries(Object.entries(copies).map(([n, v]) => [n, tf.tensor(v.data, v.shape)]));
    [x, w] = [make(xc), make(wc)];
  }
  const ref = kerasMultiHeadAttention({
    numHeads: c.args.numHeads,
    keyDim: c.args.keyDim,
    valueDim: c.args.valueDim ?? undefined,
    useBias: c.args.useBias,
    outputShape: (c.args.outputShape ?? undefined) as number[] | undefined,
  });
  setKerasMHAWeights(ref, w, {query: c.query, value: c.value, key: c.key});
  const [out, scores] = ref.callAndReturnAttentionScores(
      x.query,
      {value: x.value, key: x.key, attentionMask: x.attentionMask, useCausalMask: c.causal});
  const result: [Result, Result] = [
    {shape: out.shape, data: await out.data() as Float32Array},
    {shape: scores.shape, data: await scores.data() as Float32Array},
  ];
  tf.dispose([out, scores]);
  disposeKerasMHA(ref);
  if (c.referenceOnCpu) {
    tf.dispose([...Object.values(x), ...Object.values(w)]);
    await tf.setBackend(backend);
  }
  return result;
}

async function checkCase(c: CallCase): Promise<void> {
  const rng = freshRng();
  const what = `${c.title} (seed ${rng.seed})`;
  const start = tf.memory().numTensors;
  const query = normals(c.query, rng);
  const value = normals(c.value, rng);
  const key = c.key ? normals(c.key, rng) : undefined;
  const attentionMask =
      c.mask ? (c.padding ? paddingMask(c.mask, rng) : zeroOneMask(c.mask, rng)) : undefined;
  const layer = new MultiHeadAttention(c.args);
  const kwargs =
      {value, key, attentionMask, useCausalMask: c.causal, returnAttentionScores: c.scores};
  // Builds (Keras's weight shapes), then gets random weights.
  tf.dispose(layer.apply(query, kwargs) as tf.Tensor);
  const values: Record<string, tf.Tensor> = {};
  layer.weights.forEach((w, i) => {
    const name =
        KERAS_MHA_WEIGHT_NAMES.filter(n => c.args.useBias !== false || n.endsWith('kernel'))[i];
    expect(w.originalName).toBe(`${layer.name}/${name}`);
    values[name] = normals(w.shape as number[], rng, 1 / Math.sqrt(w.shape[0]!));
  });
  layer.setWeights(Object.values(values));

  const [want, wantScores] = await reference(c, {query, value, key, attentionMask}, values);
  const got = layer.apply(query, kwargs) as tf.Tensor | tf.Tensor[];
  const [out, scores] = Array.isArray(got) ? got : [got];
  expect(out.shape).toEqual(want.shape);
  expectClose(await out.data(), want.data, BOUND, `${what} output`);
  if (c.scores) {
    expect(scores.shape).toEqual(wantScores.shape);
    expectClose(await scores.data(), wantScores.data, BOUND, `${what} scores`);
  } else {
    expect(Array.isArray(got)).toBe(false);
  }
  // tfjs-layers' own convention, layer.call(query, {value, ...}), too.
  const called =
      layer.call(query, kwargs as unknown as Parameters<typeof layer.call>[1]) as tf.Tensor |
      tf.Tensor[];
  const calledOut = Array.isArray(called) ? called[0] : called;
  expectClose(await calledOut.data(), want.data, BOUND, `${what} call()`);

  tf.dispose([
    query, value, ...(key ? [key] : []), ...(attentionMask ? [attentionMask] : []), got, called,
    ...Object.values(values)
  ] as tf.Tensor[]);
  layer.dispose();
  expect(tf.memory().numTensors).toBe(start);
}

describeBackends('MultiHeadAttention vs tfjs-layers\' MultiHeadAttention', () => {
  for (const c of CASES) {
    it(c.title, async () => {
      // The padding cases' pipeline variant is new to this file: small
      // tiles, which SwiftShader compiles in a second rather than ~20.
      setForwardOverride(c.padding ? {tiles: {tm: 1, tx: 2, nq: 1, ty: 8}} : null);
      try {
        await checkCase(c);
      } finally {
        setForwardOverride(null);
      }
    });
  }
});

describeBackends('MultiHeadAttention: Keras masks of the inputs (Embedding mask_zero)', () => {
  /**
   * tokens -> Embedding(mask_zero) -> self-attention (cross-attention is
   * refused: errors.test.ts). Compared with tfjs-layers' MHA given the
   * same mask as `kerasMask`.
   */
  async function check(run: 'predict'|'apply'): Promise<void> {
    const rng = freshRng();
    const tokens = tfl.input({shape: [6], dtype: 'int32'});
    const context = tfl.input({shape: [5, 8]});
    const embedding = tfl.layers.embedding({inputDim: 10, outputDim: 8, maskZero: true});
    const embedded = embedding.apply(tokens) as tfl.SymbolicTensor;
    const layer = new MultiHeadAttention({numHeads: 2, keyDim: 4});
    const model = tfl.model({
      inputs: [tokens, context],
      outputs: layer.apply(embedded, {value: embedded}) as tfl.SymbolicTensor,
    });
    const values: Record<string, tf.Tensor> = {};
    layer.weights.forEach((w, i) => {
      values[KERAS_MHA_WEIGHT_NAMES[i]] = normals(w.shape as number[], rng, 0.5);
    });
    layer.setWeights(Object.values(values));
    // Padding (0) at the ends; the second example has a padded query row.
    const ids = tf.tensor2d([[3, 1, 4, 1, 5, 9], [2, 6, 5, 0, 0, 0]], [2, 6], 'int32');
    const ctx = normals([2, 5, 8], rng);
    const start = tf.memory().numTensors;
    const got =
        (run === 'predict' ? model.predict([ids, ctx]) : model.apply([ids, ctx])) as tf.Tensor;

    const ref = kerasMultiHeadAttention({numHeads: 2, keyDim: 4});
    // Embedding's eager apply sets q.kerasMask (ids != 0).
    const q = embedding.apply(ids) as tf.Tensor;
    expect(Array.from(await q.kerasMask!.data())).toEqual([1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]);
    setKerasMHAWeights(ref, values, {query: [2, 6, 8], value: [2, 6, 8]});
    const want = ref.call(q, {value: q}) as tf.Tensor;
    expectClose(await got.data(), await want.data(), BOUND, `${run} (seed ${rng.seed})`);
    tf.dispose([got, want, q, q.kerasMask]);
    disposeKerasMHA(ref);
    expect(tf.memory().numTensors).toBe(start);
    tf.dispose([ids, ctx, ...Object.values(values)]);
    model.dispose();
  }

  it('self-attention, predict (tfjs\'s executor passes the query\'s mask)', async () => {
    await check('predict');
  });
  it('self-attention, apply', async () => {
    await check('apply');
  });
});

describe('MultiHeadAttention: flashAttention, training (cpu)', () => {
  beforeAll(() => useBackend('cpu'));
  afterEach(() => {
    tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
  });

  it('plain, causal and padding-masked calls run flashAttention; other masks the composed path',
     () => {
       // cpu has no fused kernel: under FLASH_ATTENTION_IMPL=fused,
       // flashAttention refuses, which shows which calls go through it.
       const layer = new MultiHeadAttention({numHeads: 2, keyDim: 4});
       const x = tf.randomNormal([1, 6, 8]);
       const y = tf.randomNormal([1, 4, 8]);
       const mask = tf.ones([1, 6, 4]);
       tf.dispose(layer.apply(x, {value: y}) as tf.Tensor);
       tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
       expect(() => layer.apply(x, {value: y})).toThrow(/FLASH_ATTENTION_IMPL is 'fused'/);
       expect(() => layer.apply(x, {value: y, useCausalMask: true}))
           .toThrow(/FLASH_ATTENTION_IMPL is 'fused'/);
       // An attention_mask whose rows are one key padding mask runs fused
       // (per-batch key lengths); any other mask, the composed path.
       expect(() => layer.apply(x, {value: y, attentionMask: mask}))
           .toThrow(/FLASH_ATTENTION_IMPL is 'fused'/);
       // With the causal mask too (Sq >= Sk: its diagonal stays on the padding).
       expect(() => layer.apply(x, {value: y, attentionMask: mask, useCausalMask: true}))
           .toThrow(/FLASH_ATTENTION_IMPL is 'fused'/);
       const holes = tf.tile(tf.tensor3d([[[1, 0, 1, 1]]]), [1, 6, 1]);
       tf.dispose(layer.apply(x, {value: y, attentionMask: holes}) as tf.Tensor);
       holes.dispose();
       const [, scores] = layer.apply(x, {value: y, returnAttentionScores: true}) as tf.Tensor[];
       expect(scores.shape).toEqual([1, 2, 6, 4]);
       tf.dispose([x, y, mask, scores]);
       layer.dispose();
     });

  it('model.fit trains the encoder block (dropout in training), weights of MHA change',
     async () => {
       const rng = freshRng();
       const json = readFixture('encoder_block');
       const model = await loadModel(json, randomWeights(weightSpecs(json), rng).data);
       const start = tf.memory().numTensors;
       const [x] = randomInputs(model, 4, rng);
       const target = tf.randomNormal(x.shape);
       const mha = model.getLayer('multi_head_attention');
       const before = mha.getWeights().map(w => w.dataSync().slice());
       model.compile({optimizer: tf.train.sgd(0.1), loss: 'meanSquaredError'});
       const history = await model.fit(x, target, {epochs: 2, batchSize: 4, verbose: 0});
       expect(history.history.loss.every(l => Number.isFinite(l as number))).toBe(true);
       const after = mha.getWeights().map(w => w.dataSync());
       mha.weights.forEach((w, i) => {
         // Softmax ignores a per-row constant: the key bias gets no gradient.
         if (!w.originalName.endsWith('key/bias')) {
           expect(Array.from(after[i])).not.toEqual(Array.from(before[i]));
         }
       });
       // Inference (dropout off) is deterministic.
       const a = model.predict(x) as tf.Tensor;
       const b = model.predict(x) as tf.Tensor;
       expect(Array.from(await a.data())).toEqual(Array.from(await b.data()));
       tf.dispose([x, target, a, b]);
       model.optimizer.dispose();
       expect(tf.memory().numTensors).toBeLessThanOrEqual(start);
       model.dispose();
     });

  it('gradients flow through the composed (masked) path', () => {
    const rng = freshRng();
    const layer = new MultiHeadAttention({numHeads: 2, keyDim: 4});
    const q = normals([2, 5, 8], rng);
    const v = normals([2, 6, 8], rng);
    const mask = zeroOneMask([2, 5, 6], rng);
    tf.dispose(layer.apply(q, {value: v}) as tf.Tensor);
    const start = tf.memory().numTensors;
    const {value, grads} = tf.variableGrads(
        () => tf.sum(tf.square(
                  layer.apply(q, {value: v, attentionMask: mask, useCausalMask: true}) as
                  tf.Tensor)) as tf.Scalar);
    expect(Object.keys(grads).sort()).toEqual(layer.weights.map(w => w.name).sort());
    for (const g of Object.values(grads)) {
      const data = g.dataSync();
      expect(data.every(Number.isFinite)).toBe(true);
      expect(data.some(d => d !== 0)).toBe(true);
    }
    tf.dispose([value, ...Object.values(grads)]);
    expect(tf.memory().numTensors).toBe(start);
    tf.dispose([q, v, mask]);
    layer.dispose();
  });
});

/**
 * Gradients through the fused padding-mask path (attention_mask [B, 1, S],
 * and the inputs' Keras masks: masked queries and keyless batch rows get
 * Keras's mean of V), against central differences of the float64 oracle;
 * and their cost on webgpu: no dispatch per query row, no upload of V's
 * size (tf.where against tf.mean had both: Tile's and Mean's gradients).
 */
describeBackends('MultiHeadAttention: gradients through the fused padding mask', backend => {
  const [B, E, H, Dk] = [3, 8, 2, 4];
  /** Batch rows of 0 and 1 keys, the third `seq - 2` (its tail is padding). */
  const lengthsOf = (seq: number) => [0, 1, seq - 2];
  /** [B, S] of 0/1: the padding mask of `lengthsOf(seq)`. */
  const paddingOf = (seq: number) => Float32Array.from(
      {length: B * seq}, (_, n) => n % seq < lengthsOf(seq)[Math.floor(n / seq)] ? 1 : 0);

  useSmallTiles(backend);

  /** A built layer with random float32 weights, and those weights in float64. */
  function layerWithWeights(
      rng: Rng, seq: number): {layer: MultiHeadAttention, weights: KerasMHAOracleWeights} {
    const layer = new MultiHeadAttention({numHeads: H, keyDim: Dk});
    tf.tidy(() => layer.apply(tf.zeros([B, seq, E]), {value: tf.zeros([B, seq, E])}) as tf.Tensor);
    // Keras-like scales: with scores far below 32, a keyless row's scores
    // (score - 1e9 in float32, ulp 64) are all -1e9: Keras's uniform row.
    const arrays = layer.weights.map((w, i) => {
      const shape = w.shape as number[];
      const scale = i === 6 ? 1 / Math.sqrt(H * Dk) : i % 2 === 0 ? 1 / Math.sqrt(shape[0]) : 0.3;
      return Float32Array.from(
          {length: shape.reduce((a, b) => a * b, 1)}, () => scale * rng.normal());
    });
    layer.setWeights(arrays.map((a, i) => tf.tensor(a, layer.weights[i].shape as number[])));
    const f64 = (i: number) => Float64Array.from(arrays[i]);
    const weights = {
      query: {kernel: f64(0), bias: f64(1)},
      key: {kernel: f64(2), bias: f64(3)},
      value: {kernel: f64(4), bias: f64(5)},
      output: {kernel: f64(6), bias: f64(7)},
    };
    return {layer, weights};
  }

  /** Self-attention on x (query = value = key) for the oracle. */
  function oracleProblem(
      x: Float64Array, seq: number, weights: KerasMHAOracleWeights, attentionMask: Float64Array,
      causal: boolean): KerasMHAOracleProblem {
    return {
      batch: B,
      seqQ: seq,
      seqK: seq,
      queryDim: E,
      valueDim: E,
      keyInputDim: E,
      heads: H,
      keyDim: Dk,
      headDimV: Dk,
      outDim: E,
      query: x,
      value: x,
      key: null,
      weights,
      attentionMask,
      causal,
    };
  }

  /** d sum(out * dy) / dx of self-attention on x, by central differences in float64. */
  function oracleGradient(
      x: Float64Array, dy: Float64Array, seq: number, weights: KerasMHAOracleWeights,
      attentionMask: Float64Array, causal: boolean): Float64Array {
    const loss = (input: Float64Array) => {
      const {out} = kerasMHAOracle(oracleProblem(input, seq, weights, attentionMask, causal));
      return out.reduce((s, o, i) => s + o * dy[i], 0);
    };
    const step = 1e-5;
    return x.map((xi, i) => {
      const shifted = Float64Array.from(x);
      shifted[i] = xi + step;
      const up = loss(shifted);
      shifted[i] = xi - step;
      return (up - loss(shifted)) / (2 * step);
    });
  }

  for (const [title, keras, causal] of [
           ['attention_mask [B, 1, S] padding mask, causal', false, true],
           ['Keras masks of the inputs (masked queries too)', true, false],
  ] as Array<[string, boolean, boolean]>) {
    it(title, async () => {
      const rng = freshRng();
      const seq = 6;
      const {layer, weights} = layerWithWeights(rng, seq);
      const x = Float32Array.from({length: B * seq * E}, () => rng.normal());
      const dy = Float32Array.from({length: B * seq * E}, () => rng.normal());
      const padding = paddingOf(seq);
      // Keras: attention mask = query mask (rows) & key mask (columns).
      const full = Float64Array.from(
          {length: B * seq * seq},
          (_, n) => padding[Math.floor(n / (seq * seq)) * seq + (n % seq)] *
              (keras ? padding[Math.floor(n / seq)] : 1));
      const start = tf.memory().numTensors;
      const [xt, dyt] = [tf.tensor(x, [B, seq, E]), tf.tensor(dy, [B, seq, E])];
      const mask = keras ? tf.tensor(padding, [B, seq], 'bool') : tf.tensor(padding, [B, 1, seq]);
      const call = (a: tf.Tensor) => layer.apply(
          a, keras ? {value: a, mask} : {value: a, attentionMask: mask, useCausalMask: causal});
      const out = call(xt) as tf.Tensor;
      const {out: wantOut} =
          kerasMHAOracle(oracleProblem(Float64Array.from(x), seq, weights, full, causal));
      expectClose(await out.data(), wantOut, FORWARD_BOUND, `${title} out (seed ${rng.seed})`);
      const [grad] = tf.grads(a => call(a) as tf.Tensor)([xt], dyt);
      const want =
          oracleGradient(Float64Array.from(x), Float64Array.from(dy), seq, weights, full, causal);
      expectClose(await grad.data(), want, GRADIENT_BOUND, `${title} dx (seed ${rng.seed})`);
      tf.dispose([xt, dyt, mask, out, grad]);
      expect(tf.memory().numTensors).toBe(start);
      layer.dispose();
    });
  }

  if (backend === 'webgpu') {
    it('fwd+bwd cost does not grow with the sequence: no per-row dispatch, no V-sized upload',
       async () => {
         const rng = freshRng();
         const cpuForward = tf.env().getBool('WEBGPU_CPU_FORWARD');
         tf.env().set('WEBGPU_CPU_FORWARD', false);
         try {
           const costs: WebGPUCounts[] = [];
           for (const seq of [8, 16]) {
             const {layer} = layerWithWeights(rng, seq);
             const x = tf.randomNormal([B, seq, E]);
             const mask = tf.tensor(paddingOf(seq), [B, 1, seq]);
             const run = () => tf.grads(
                 (a: tf.Tensor) =>
                     layer.apply(a, {value: a, attentionMask: mask, useCausalMask: true}) as
                     tf.Tensor)([x], x);
             tf.dispose(run());  // compiles
             const counters = webgpuCounters();
             const [grad] = run();
             costs.push(counters.snapshot());
             await grad.data();
             tf.dispose([x, mask, grad]);
             layer.dispose();
           }
           // Projections, flashAttention fwd+bwd and the keyless rows' blend:
           // the same programs whatever the length.
           expect(costs[1].dispatches).toBe(costs[0].dispatches);
           expect(costs[0].dispatches).toBe(PADDING_MASK_GRAD_DISPATCHES);
           // Small index ranges and scalars go up, nothing of V's size.
           expect([...costs[1].uploadShapes]).toEqual(HOST_UPLOADS);
         } finally {
           tf.env().set('WEBGPU_CPU_FORWARD', cpuForward);
         }
       });
  }
});
