/**
 * No silent wrong results (issue 13): huge windows, unknown or ill-typed
 * options, float32 range, exact masks on the reference (scores of masked
 * keys holding NaN/Inf/1e38 never reach the softmax) and on the fused
 * kernel (rows whose scores are all below -1e30), with FlashAttentionError
 * naming the argument. Numerics against the float64 oracle, on cpu and on
 * webgpu with both the fused kernel and the composed reference.
 */
import * as tf from '@tensorflow/tfjs-core';

import {FLASH_ATTENTION_IMPL, flashAttention, FlashAttentionError, FlashAttentionImpl, FlashAttentionOptions, flashAttentionQKVPacked} from '../src';

import {describeBackends} from './harness/backends';
import {discrepancy, expectClose, FORWARD_BOUND, freshRng, GRADIENT_BOUND, makeProblem, ProblemShape, Rng, TestProblem} from './harness/problems';
import {OracleOptions, oracleBackward, oracleForward} from './oracle';

const SHAPE: ProblemShape = {
  batch: 1,
  seqQ: 10,
  seqK: 12,
  heads: 2,
  headsKV: 1,
  headDim: 8,
  headDimV: 8,
};

/** The implementations a backend can run: webgpu has both. */
function implsOf(backend: string): FlashAttentionImpl[] {
  return backend === 'webgpu' ? ['fused', 'reference'] : ['auto'];
}

async function withImpl<T>(impl: FlashAttentionImpl, f: () => Promise<T>): Promise<T> {
  const previous = tf.env().get(FLASH_ATTENTION_IMPL);
  tf.env().set(FLASH_ATTENTION_IMPL, impl);
  try {
    return await f();
  } finally {
    tf.env().set(FLASH_ATTENTION_IMPL, previous);
  }
}

/** Runs the op and returns out and lse as float64. */
async function run(
    p: TestProblem, opts: FlashAttentionOptions): Promise<[Float64Array, Float64Array]> {
  const [out, lse] = flashAttention(p.q, p.k, p.v, {...opts, returnSoftmaxLse: true});
  const result: [Float64Array, Float64Array] =
      [Float64Array.from(await out.data()), Float64Array.from(await lse.data())];
  tf.dispose([out, lse]);
  return result;
}

/** Expects a FlashAttentionError naming `argument`, with nothing leaked. */
function expectRejected(f: () => unknown, argument: string, ...patterns: RegExp[]): void {
  const before = tf.memory().numTensors;
  let error: unknown;
  try {
    tf.dispose(f() as tf.Tensor);
  } catch (e) {
    error = e;
  }
  expect(error).toBeInstanceOf(FlashAttentionError);
  const e = error as FlashAttentionError;
  expect(e.argument).toBe(argument);
  expect(e.message).toContain(argument);
  for (const pattern of patterns) {
    expect(e.message).toMatch(pattern);
  }
  expect(tf.memory().numTensors).toBe(before);
}

/** Out and lse rows `[b, i, h]` of query rows i in `rows` only. */
function pickRows(out: Float64Array, lse: Float64Array, rows: number[], s = SHAPE): number[] {
  const picked: number[] = [];
  for (let b = 0; b < s.batch; b++) {
    for (const i of rows) {
      for (let h = 0; h < s.heads; h++) {
        const base = ((b * s.seqQ + i) * s.heads + h) * s.headDimV;
        picked.push(...out.subarray(base, base + s.headDimV));
        picked.push(lse[(b * s.heads + h) * s.seqQ + i]);
      }
    }
  }
  return picked;
}

/** A problem whose k is replaced (oracle and tensors) by `k`. */
function withKeys(p: TestProblem, k: Float64Array): TestProblem {
  const s = p.shape;
  const kTensor = tf.tensor4d(Float32Array.from(k), [s.batch, s.seqK, s.headsKV, s.headDim]);
  return {
    ...p,
    oracle: {...p.oracle, k},
    k: kTensor,
    dispose() {
      p.dispose();
      kTensor.dispose();
    },
  };
}

describeBackends('huge windows are unbounded on every path', backend => {
  const windows: Array<[number, number]> = [
    [-1, 2 ** 31 - 1],
    [2 ** 32, 0],
    [1e300, 1e300],
    [12, 12],
    [2 ** 31, 3],
    [3, 2 ** 53],
    [Number.MAX_SAFE_INTEGER, -1],
  ];
  for (const impl of implsOf(backend)) {
    for (const windowSize of windows) {
      for (const causal of [false, true]) {
        it(`${impl}: windowSize [${windowSize}]${causal ? ', causal' : ''}`, async () => {
          const rng = freshRng();
          const p = makeProblem(SHAPE, rng);
          try {
            const opts: OracleOptions = {windowSize, causal};
            const [out, lse] = await withImpl(impl, () => run(p, opts));
            const expected = oracleForward(p.oracle, opts);
            // Clamped to -1: the same as the unbounded side.
            const clamped = windowSize.map(w => (w >= SHAPE.seqK ? -1 : w)) as [number, number];
            expect(oracleForward(p.oracle, {windowSize: clamped, causal}).out)
                .toEqual(expected.out);
            expectClose(out, expected.out, FORWARD_BOUND, `out (seed ${rng.seed})`);
            expectClose(lse, expected.lse, FORWARD_BOUND, `lse (seed ${rng.seed})`);
          } finally {
            p.dispose();
          }
        });
      }
    }
  }
  // Sq > Sk: a right side >= Sk still hides keys from the first rows, so
  // only a right side >= Sq may become unbounded.
  for (const impl of implsOf(backend)) {
    for (const windowSize of [[-1, 8], [3, 12], [-1, 19], [20, 20]] as Array<[number, number]>) {
      it(`${impl}: Sq > Sk keeps windowSize [${windowSize}] exact`, async () => {
        const rng = freshRng();
        const p = makeProblem({...SHAPE, seqQ: 20, seqK: 6}, rng);
        try {
          const opts: OracleOptions = {windowSize};
          const [out, lse] = await withImpl(impl, () => run(p, opts));
          const expected = oracleForward(p.oracle, opts);
          expectClose(out, expected.out, FORWARD_BOUND, `out (seed ${rng.seed})`);
          expectClose(lse, expected.lse, FORWARD_BOUND, `lse (seed ${rng.seed})`);
        } finally {
          p.dispose();
        }
      });
    }
  }
  it('keeps non-integer and non-finite window sides errors', () => {
    const p = makeProblem(SHAPE, freshRng());
    for (const w of [[Infinity, 0], [0, NaN], [1.5, 2], [-2, 0], [0], [0, 0, 0]]) {
      expectRejected(
          () => flashAttention(p.q, p.k, p.v, {windowSize: w as [number, number]}), 'windowSize',
          /integers >= -1/);
    }
    p.dispose();
  });
});

describeBackends('unknown and ill-typed options throw', () => {
  let p: TestProblem;
  beforeAll(() => {
    p = makeProblem(SHAPE, freshRng());
  });
  afterAll(() => p.dispose());

  const misspelt: Array<[string, unknown, string]> = [
    ['casual', true, 'causal'],
    ['is_causal', true, 'causal'],
    ['isCausal', true, 'causal'],
    ['dropout_p', 0.1, 'dropoutRate'],
    ['dropout', 0.1, 'dropoutRate'],
    ['window_size', [2, 2], 'windowSize'],
    ['scale', 0.5, 'softmaxScale'],
    ['softmax_scale', 0.5, 'softmaxScale'],
    ['return_softmax_lse', true, 'returnSoftmaxLse'],
    ['return_attn_probs', true, 'returnSoftmaxLse'],
    ['alibi_slopes', null, 'alibiSlopes'],
    ['softcapp', 2, 'softcap'],
    ['Causal', true, 'causal'],
    ['seeed', 1, 'seed'],
  ];
  for (const [key, value, meant] of misspelt) {
    it(`rejects '${key}', suggesting '${meant}'`, () => {
      expectRejected(
          () => flashAttention(p.q, p.k, p.v, {[key]: value} as FlashAttentionOptions), key,
          new RegExp(`did you mean '${meant}'`));
    });
  }
  it('rejects unknown keys without a near miss, listing the known options', () => {
    expectRejected(
        () => flashAttention(p.q, p.k, p.v, {banana: 1} as FlashAttentionOptions), 'banana',
        /unknown option 'banana'/, /causal, softmaxScale/);
    expectRejected(
        () => flashAttention(p.q, p.k, p.v, {deterministic: true} as FlashAttentionOptions),
        'deterministic', /deterministic already/);
    const qkv = tf.zeros([1, 4, 3, 2, 8]) as tf.Tensor5D;
    expectRejected(
        () => flashAttentionQKVPacked(qkv, {is_causal: true} as FlashAttentionOptions), 'is_causal',
        /flashAttentionQKVPacked/);
    qkv.dispose();
  });
  it('rejects non-boolean flags instead of reading them as truthy', () => {
    for (const [key, value] of [
             ['returnSoftmaxLse', 'false'], ['returnSoftmaxLse', 0], ['causal', 'true'],
             ['causal', 1], ['causal', null]]) {
      expectRejected(
          () => flashAttention(p.q, p.k, p.v, {[key as string]: value} as FlashAttentionOptions),
          key as string, /a boolean/);
    }
  });
  it('rejects options objects that are not objects', () => {
    for (const opts of ['causal', 1, true, [true], tf.scalar(1)]) {
      expectRejected(
          () => flashAttention(p.q, p.k, p.v, opts as FlashAttentionOptions), 'opts',
          /options object/);
    }
  });
  it('treats null and undefined options as none, and undefined values as absent', async () => {
    const none = flashAttention(p.q, p.k, p.v);
    const expected = await none.data();
    none.dispose();
    for (const opts of [null, undefined, {causal: undefined, softcap: undefined}]) {
      const out = flashAttention(p.q, p.k, p.v, opts as FlashAttentionOptions) as tf.Tensor;
      expect(out).toBeInstanceOf(tf.Tensor);
      expect(await out.data()).toEqual(expected);
      out.dispose();
    }
  });
  it('throws FlashAttentionError for bad tensors, with the disposed alibiSlopes named', () => {
    const slopes = tf.tensor1d([0.1, 0.2]);
    slopes.dispose();
    expectRejected(
        () => flashAttention(p.q, p.k, p.v, {alibiSlopes: slopes}), 'alibiSlopes',
        /has been disposed/);
    expectRejected(
        () => flashAttention(
            p.q, p.k, p.v, {alibiSlopes: [0.1, 0.2]} as unknown as FlashAttentionOptions),
        'alibiSlopes', /tf.Tensor/);
    const kInt = tf.cast(p.k, 'int32') as tf.Tensor4D;
    const kShort = tf.zeros([1, 5, 1, 8]) as tf.Tensor4D;
    expectRejected(() => flashAttention(p.q, kInt, p.v), 'k', /float32/);
    expectRejected(() => flashAttention(p.q, kShort, p.v), 'v', /sequence length/);
    tf.dispose([kInt, kShort]);
  });
});

describeBackends('float32 range of scalar options', backend => {
  let p: TestProblem;
  beforeAll(() => {
    p = makeProblem(SHAPE, freshRng());
  });
  afterAll(() => p.dispose());

  const bad: Array<[string, number, RegExp]> = [
    ['softcap', 1e-45, /normal float32/],
    ['softcap', 1e-39, /normal float32/],
    ['softcap', 3.5e38, /normal float32/],
    ['softcap', -1, />= 0/],
    ['softmaxScale', 1e39, /finite as a float32/],
    ['softmaxScale', -4e38, /finite as a float32/],
    ['softmaxScale', Infinity, /finite/],
    ['dropoutRate', 1 - 1e-12, /\[0, 1\)/],
  ];
  for (const [key, value, pattern] of bad) {
    it(`rejects ${key}: ${value}`, () => {
      expectRejected(() => flashAttention(p.q, p.k, p.v, {[key]: value}), key, pattern);
    });
  }
  it('rejects softmaxScale / softcap overflowing float32', () => {
    expectRejected(
        () => flashAttention(p.q, p.k, p.v, {softmaxScale: 1e30, softcap: 1e-20}), 'softcap',
        /softmaxScale \/ softcap/);
  });
  for (const impl of implsOf(backend)) {
    for (const opts
             of [{softcap: 1e-30}, {softcap: 2 ** -126}, {softmaxScale: 1e30},
                 {softmaxScale: 1e-40}]) {
      it(`${impl}: accepts ${JSON.stringify(opts)} and matches the oracle`, async () => {
        const [out, lse] = await withImpl(impl, () => run(p, opts));
        const expected = oracleForward(p.oracle, {
          softmaxScale:
              Math.fround((opts as {softmaxScale?: number}).softmaxScale ?? 1 / Math.sqrt(8)),
          ...opts
        });
        expectClose(out, expected.out, FORWARD_BOUND, 'out');
        expectClose(lse, expected.lse, FORWARD_BOUND, 'lse');
      });
    }
  }
});

/** Keys i of `keys` set to `value` in every head and feature. */
function poisonKeys(p: TestProblem, keys: number[], value: number): Float64Array {
  const s = p.shape;
  const k = Float64Array.from(p.oracle.k);
  for (let b = 0; b < s.batch; b++) {
    for (const j of keys) {
      const base = (b * s.seqK + j) * s.headsKV * s.headDim;
      k.fill(value, base, base + s.headsKV * s.headDim);
    }
  }
  return k;
}

describeBackends('masking is exact: masked scores never reach the softmax', backend => {
  // Key j is masked for the listed rows (Sq = 10, Sk = 12, diagonal i + 2).
  const cases: Array<{name: string, opts: OracleOptions, keys: number[], rows: number[]}> = [
    {
      name: 'causal, last keys',
      opts: {causal: true},
      keys: [10, 11],
      rows: [0, 1, 2, 3, 4, 5, 6, 7]
    },
    {name: 'causal, key 5', opts: {causal: true}, keys: [5], rows: [0, 1, 2]},
    {
      name: 'window [1, 1], key 0',
      opts: {windowSize: [1, 1]},
      keys: [0],
      rows: [2, 3, 4, 5, 6, 7, 8, 9]
    },
    {
      name: 'window [2, 0], keys 0 and 11',
      opts: {windowSize: [2, 0]},
      keys: [0, 11],
      rows: [1, 2, 3, 4, 5, 6, 7, 8]
    },
  ];
  for (const impl of implsOf(backend)) {
    for (const c of cases) {
      // tfjs-backend-webgpu's matMul spreads a NaN/Inf of one key to other
      // columns of its tile, so the composed reference on webgpu can only
      // be exact for finite keys (its fused kernel is exact for all).
      const values = backend === 'webgpu' && impl === 'reference' ?
          [1e38, -1e38, 1e30, 3e38] :
          [NaN, Infinity, -Infinity, 1e38, -1e38, 1e30];
      for (const value of values) {
        it(`${impl}: ${c.name} holding ${value}`, async () => {
          const rng = freshRng();
          const clean = makeProblem(SHAPE, rng);
          const p = withKeys(clean, poisonKeys(clean, c.keys, value));
          try {
            const [out, lse] = await withImpl(impl, () => run(p, c.opts));
            const expected = oracleForward(clean.oracle, c.opts);
            const what = `seed ${rng.seed}`;
            expectClose(
                pickRows(out, lse, c.rows), pickRows(expected.out, expected.lse, c.rows),
                FORWARD_BOUND, `visible rows (${what})`);
          } finally {
            p.dispose();
          }
        });
      }
    }
    it(`${impl}: gradients ignore masked keys holding 1e34`, async () => {
      const c = cases[0];
      const rng = freshRng();
      const clean = makeProblem(SHAPE, rng);
      const p = withKeys(clean, poisonKeys(clean, c.keys, 1e34));
      // Upstream gradient only on the rows that do not see the keys: every
      // gradient is then that of the clean problem.
      const dOut = new Float64Array(p.oracle.q.length / SHAPE.headDim * SHAPE.headDimV);
      const rowSize = SHAPE.heads * SHAPE.headDimV;
      for (const i of c.rows) {
        for (let x = 0; x < rowSize; x++) {
          dOut[i * rowSize + x] = rng.uniform() - 0.5;
        }
      }
      const dy = tf.tensor4d(Float32Array.from(dOut), [1, SHAPE.seqQ, SHAPE.heads, SHAPE.headDimV]);
      try {
        const grads = await withImpl(impl, async () => {
          const g = tf.grads(
              (q: tf.Tensor, k: tf.Tensor, v: tf.Tensor) =>
                  flashAttention(q as tf.Tensor4D, k as tf.Tensor4D, v as tf.Tensor4D, c.opts));
          const [dq, dk, dv] = g([p.q, p.k, p.v], dy);
          const data = [await dq.data(), await dk.data(), await dv.data()];
          tf.dispose([dq, dk, dv]);
          return data;
        });
        const expected =
            oracleBackward(clean.oracle, c.opts, dOut, new Float64Array(SHAPE.heads * SHAPE.seqQ));
        expectClose(grads[0], expected.dq, GRADIENT_BOUND, `dq (seed ${rng.seed})`);
        expectClose(grads[1], expected.dk, GRADIENT_BOUND, `dk (seed ${rng.seed})`);
        expectClose(grads[2], expected.dv, GRADIENT_BOUND, `dv (seed ${rng.seed})`);
      } finally {
        dy.dispose();
        p.dispose();
      }
    });
  }
});

/** q > 0 and k < 0: every score is negative, times `scale`. */
function negativeScoresProblem(rng: Rng): TestProblem {
  const p = makeProblem(SHAPE, rng);
  const q = p.oracle.q.map(x => Math.fround(0.5 + Math.abs(x) / 4));
  const k = p.oracle.k.map(x => Math.fround(-0.5 - Math.abs(x) / 4));
  const qTensor = tf.tensor4d(Float32Array.from(q), p.q.shape);
  const withQ: TestProblem = {
    ...p,
    oracle: {...p.oracle, q},
    q: qTensor,
    dispose() {
      p.dispose();
      qTensor.dispose();
    }
  };
  return withKeys(withQ, k);
}

describeBackends('rows whose scores are all below -1e30 get their softmax', backend => {
  for (const impl of implsOf(backend)) {
    for (const softmaxScale of [1e31, 1e33, 1e36]) {
      for (const opts of [{}, {causal: true}, {windowSize: [3, 1]}] as OracleOptions[]) {
        it(`${impl}: softmaxScale ${softmaxScale} ${JSON.stringify(opts)}`, async () => {
          const rng = freshRng();
          const p = negativeScoresProblem(rng);
          try {
            const all = {...opts, softmaxScale};
            const [out, lse] = await withImpl(impl, () => run(p, all));
            const expected = oracleForward(p.oracle, all);
            expect(Math.max(...expected.lse)).toBeLessThan(-1e30);
            expectClose(out, expected.out, FORWARD_BOUND, `out (seed ${rng.seed})`);
            const {relativeError} = discrepancy(lse, expected.lse);
            expect(relativeError).toBeLessThanOrEqual(FORWARD_BOUND);
          } finally {
            p.dispose();
          }
        });
      }
    }
  }
});
