/**
 * Variable-length attention (src/varlen.ts) and the padded op's per-batch
 * lengths (src/seqlens.ts), against the float64 oracle run on each
 * sequence alone: forward, lse and gradients, every option, random lengths
 * that include 0 and 1, on cpu and webgpu (fused kernels, and the
 * reference on webgpu too), no leaks.
 */
import * as tf from '@tensorflow/tfjs-core';

import {FLASH_ATTENTION_IMPL, FlashAttention, flashAttention, flashAttentionVarlen, padInput, unpadInput} from '../src';
import {flashMHA} from '../src/layers';
import {alibiSlopes} from '../src/layers/alibi';
import {MultiHeadAttention} from '../src/layers/multi_head_attention';
import {LayerConfig, LayerWeights, layerOracle} from './layers/mha_oracle';
import {forwardStats, setForwardOverride} from '../kernels/webgpu/FlashAttention';
import {fusedGradRunCount, setGradTilesOverride} from '../kernels/webgpu/FlashAttentionGrad';
import {checkOwnPipelineErrors, setPoisonOutputs} from '../kernels/webgpu/own_pipeline';

import {webgpuCounters, WebGPUCounts} from '../benchmarks/webgpu_counters';

import {describeBackends} from './harness/backends';
import {useSmallTiles} from './harness/small_tiles';
import {cumulativeLengths, expectClose, FORWARD_BOUND, freshRng, GRADIENT_BOUND, ProblemShape, randomArray, randomOracleProblem, Rng, seqlensInputs, seqlensRowExpected} from './harness/problems';
import {OracleOptions, OracleProblem, oracleBackward, oracleForward} from './oracle';

interface VarlenCase {
  name: string;
  heads: number;
  headsKV: number;
  headDim: number;
  headDimV: number;
  opts: OracleOptions;
  alibi?: 'head'|'batch';
  /** Keys of sequence b as long as its queries (self-attention). */
  sameLengths?: boolean;
  /**
   * Also on webgpu. SwiftShader compiles each new pipeline variant in
   * seconds, so webgpu runs the cases that combine the options.
   */
  webgpu?: boolean;
}

const CASES: VarlenCase[] = [
  {name: 'plain', heads: 2, headsKV: 2, headDim: 16, headDimV: 16, opts: {}, webgpu: true},
  {
    name: 'causal, softcap, alibi [B, H], GQA, Dv != D',
    heads: 4,
    headsKV: 2,
    headDim: 8,
    headDimV: 12,
    opts: {causal: true, softcap: 2},
    alibi: 'batch',
    webgpu: true
  },
  {
    name: 'dropout, window [4, 1], softcap, alibi [H], MQA',
    heads: 2,
    headsKV: 1,
    headDim: 8,
    headDimV: 8,
    opts: {dropoutRate: 0.3, seed: 2 ** 33 + 5, windowSize: [4, 1], softcap: 1.5},
    alibi: 'head',
    webgpu: true
  },
  {
    name: 'causal (bottom-right per sequence)',
    heads: 2,
    headsKV: 2,
    headDim: 16,
    headDimV: 16,
    opts: {causal: true}
  },
  {
    name: 'causal, self-attention lengths',
    heads: 2,
    headsKV: 2,
    headDim: 8,
    headDimV: 8,
    opts: {causal: true},
    sameLengths: true
  },
  {
    name: 'window [3, 2]',
    heads: 2,
    headsKV: 2,
    headDim: 16,
    headDimV: 16,
    opts: {windowSize: [3, 2]}
  },
  {
    name: 'softcap, alibi [B, H], causal',
    heads: 2,
    headsKV: 2,
    headDim: 16,
    headDimV: 16,
    opts: {causal: true, softcap: 2},
    alibi: 'batch'
  },
  {
    name: 'alibi [H], custom scale',
    heads: 2,
    headsKV: 1,
    headDim: 8,
    headDimV: 8,
    opts: {softmaxScale: 0.7},
    alibi: 'head'
  },
  {
    name: 'GQA (H=4, Hk=2), Dv != D',
    heads: 4,
    headsKV: 2,
    headDim: 8,
    headDimV: 12,
    opts: {causal: true}
  },
  {
    name: 'dropout 0.3 with window',
    heads: 2,
    headsKV: 1,
    headDim: 8,
    headDimV: 8,
    opts: {dropoutRate: 0.3, seed: 2 ** 33 + 5, windowSize: [4, 1]}
  },
];

/** Random lengths in [0, max], with 0 and 1 always among them. */
function randomLengths(batch: number, max: number, rng: Rng): number[] {
  const lengths = Array.from({length: batch}, () => rng.int(0, max));
  lengths[rng.int(0, batch - 1)] = 0;
  let one = rng.int(0, batch - 1);
  while (lengths[one] === 0 && batch > 1) {
    one = (one + 1) % batch;
  }
  lengths[one] = 1;
  return lengths;
}

interface VarlenProblem {
  lenQ: number[];
  lenK: number[];
  sequences: OracleProblem[];
  /** Slopes as the op takes them ([H] or [B, H]), or null. */
  slopes: Float64Array|null;
  packed: {q: Float64Array, k: Float64Array, v: Float64Array};
}

function concat(parts: Float64Array[]): Float64Array {
  const out = new Float64Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
}

/** One oracle problem per sequence (batch 1), and their packing. */
function makeVarlenProblem(c: VarlenCase, batch: number, rng: Rng): VarlenProblem {
  const lenQ = randomLengths(batch, 11, rng);
  const lenK = c.sameLengths ? lenQ.slice() : randomLengths(batch, 14, rng);
  let slopes: Float64Array|null = null;
  if (c.alibi != null) {
    slopes = randomArray(c.alibi === 'head' ? c.heads : batch * c.heads, rng)
                 .map(x => Math.fround(0.05 + 0.1 * Math.abs(x)));
  }
  const sequences = lenQ.map((sq, b) => {
    const p = randomOracleProblem(
        {
          batch: 1,
          seqQ: sq,
          seqK: lenK[b],
          heads: c.heads,
          headsKV: c.headsKV,
          headDim: c.headDim,
          headDimV: c.headDimV
        },
        rng);
    p.alibiSlopes = slopes == null ? null :
        c.alibi === 'head'         ? slopes :
                                     slopes.slice(b * c.heads, (b + 1) * c.heads);
    return p;
  });
  return {
    lenQ,
    lenK,
    sequences,
    slopes,
    packed: {
      q: concat(sequences.map(s => s.q)),
      k: concat(sequences.map(s => s.k)),
      v: concat(sequences.map(s => s.v)),
    },
  };
}

/** Each sequence alone through the oracle; lse as [H, totalQ]. */
function expectedForward(c: VarlenCase, p: VarlenProblem) {
  const cu = cumulativeLengths(p.lenQ);
  const totalQ = cu[cu.length - 1];
  const lse = new Float64Array(c.heads * totalQ);
  const outs = p.sequences.map((s, b) => {
    const f = oracleForward(s, {...c.opts, dropoutBatchOffset: b});
    for (let h = 0; h < c.heads; h++) {
      for (let i = 0; i < p.lenQ[b]; i++) {
        lse[h * totalQ + cu[b] + i] = f.lse[h * p.lenQ[b] + i];
      }
    }
    return f.out;
  });
  return {out: concat(outs), lse};
}

function tensors(c: VarlenCase, p: VarlenProblem) {
  const totalQ = p.lenQ.reduce((a, b) => a + b, 0);
  const totalK = p.lenK.reduce((a, b) => a + b, 0);
  const batch = p.lenQ.length;
  return {
    q: tf.tensor3d(Float32Array.from(p.packed.q), [totalQ, c.heads, c.headDim]),
    k: tf.tensor3d(Float32Array.from(p.packed.k), [totalK, c.headsKV, c.headDim]),
    v: tf.tensor3d(Float32Array.from(p.packed.v), [totalK, c.headsKV, c.headDimV]),
    cuQ: tf.tensor1d(cumulativeLengths(p.lenQ), 'int32'),
    cuK: tf.tensor1d(cumulativeLengths(p.lenK), 'int32'),
    slopes: p.slopes == null ?
        undefined :
        tf.tensor(Float32Array.from(p.slopes), c.alibi === 'head' ? [c.heads] : [batch, c.heads]),
  };
}

async function checkVarlen(c: VarlenCase, rng: Rng, expectFused: boolean): Promise<void> {
  const batch = 5;
  const p = makeVarlenProblem(c, batch, rng);
  const what = `${c.name}, lengths q ${p.lenQ} k ${p.lenK} (seed ${rng.seed})`;
  const t = tensors(c, p);
  const expected = expectedForward(c, p);
  const dOut = randomArray(expected.out.length, rng);
  const dLse = randomArray(expected.lse.length, rng);
  const before = tf.memory().numTensors;
  const fwdBefore = forwardStats.dispatches;
  const gradBefore = fusedGradRunCount();
  // Padding beyond the longest sequence exercises skipped tiles and rows.
  const opts = {
    ...c.opts,
    alibiSlopes: t.slopes,
    maxSeqlenQ: Math.max(...p.lenQ) + 3,
    maxSeqlenK: Math.max(...p.lenK) + 2,
  };
  const dOutT = tf.tensor(Float32Array.from(dOut), t.q.shape.slice(0, 2).concat([c.headDimV]));
  const dLseT = tf.tensor(Float32Array.from(dLse), [c.heads, t.q.shape[0]]);
  const [out, lse] =
      flashAttentionVarlen(t.q, t.k, t.v, t.cuQ, t.cuK, {...opts, returnSoftmaxLse: true});
  expectClose(await out.data(), expected.out, FORWARD_BOUND, `${what}: out`);
  expectClose(await lse.data(), expected.lse, FORWARD_BOUND, `${what}: lse`);
  tf.dispose([out, lse]);

  const grads = tf.grads((q: tf.Tensor, k: tf.Tensor, v: tf.Tensor) => {
    const [o, l] = flashAttentionVarlen(
        q as tf.Tensor3D, k as tf.Tensor3D, v as tf.Tensor3D, t.cuQ, t.cuK,
        {...opts, returnSoftmaxLse: true});
    const finite = tf.where(tf.isFinite(l), l, tf.zerosLike(l));
    return tf.add(tf.sum(tf.mul(o, dOutT)), tf.sum(tf.mul(finite, dLseT)));
  })([t.q, t.k, t.v]);
  // The oracle's gradients, sequence by sequence.
  const cuQ = cumulativeLengths(p.lenQ);
  const dq: Float64Array[] = [];
  const dk: Float64Array[] = [];
  const dv: Float64Array[] = [];
  p.sequences.forEach((s, b) => {
    const dOutB = dOut.slice(cuQ[b] * c.heads * c.headDimV, cuQ[b + 1] * c.heads * c.headDimV);
    const dLseB = new Float64Array(c.heads * p.lenQ[b]);
    for (let h = 0; h < c.heads; h++) {
      for (let i = 0; i < p.lenQ[b]; i++) {
        dLseB[h * p.lenQ[b] + i] = dLse[h * cuQ[cuQ.length - 1] + cuQ[b] + i];
      }
    }
    const g = oracleBackward(s, {...c.opts, dropoutBatchOffset: b}, dOutB, dLseB);
    dq.push(g.dq);
    dk.push(g.dk);
    dv.push(g.dv);
  });
  expectClose(await grads[0].data(), concat(dq), GRADIENT_BOUND, `${what}: dq`);
  expectClose(await grads[1].data(), concat(dk), GRADIENT_BOUND, `${what}: dk`);
  expectClose(await grads[2].data(), concat(dv), GRADIENT_BOUND, `${what}: dv`);
  tf.dispose(grads);
  tf.dispose([dOutT, dLseT]);
  expect(tf.memory().numTensors).toBe(before);
  if (expectFused) {
    expect(forwardStats.dispatches).toBeGreaterThan(fwdBefore);
    expect(fusedGradRunCount()).toBe(gradBefore + 1);
    await checkOwnPipelineErrors();
  }
  tf.dispose([t.q, t.k, t.v, t.cuQ, t.cuK]);
  t.slopes?.dispose();
}

describeBackends('flashAttentionVarlen against each sequence alone', backend => {
  const impls = backend === 'webgpu' ? ['fused', 'reference'] : ['reference'];
  for (const impl of impls) {
    describe(impl, () => {
      beforeAll(() => {
        tf.env().set(FLASH_ATTENTION_IMPL, impl === 'fused' ? 'fused' : 'reference');
        if (backend === 'webgpu') {
          setPoisonOutputs(true);
          // Small tiles: several query and key tiles per sequence (the
          // skipped ones included), and pipelines SwiftShader compiles in
          // about a second instead of half a minute.
          setForwardOverride({tiles: {tm: 1, tx: 2, nq: 1, ty: 8}});
          setGradTilesOverride(
              {dkdv: {bc: 4, br: 4, threads: 16}, dq: {br: 4, bc: 4, threads: 16}});
        }
      });
      afterAll(() => {
        tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
        setPoisonOutputs(false);
        setForwardOverride(null);
        setGradTilesOverride(null);
      });
      const cases = backend === 'cpu' ? CASES :
          impl === 'fused'            ? CASES.filter(c => c.webgpu) :
                                        CASES.filter(c => c.webgpu).slice(1, 2);
      for (const c of cases) {
        it(c.name, () => checkVarlen(c, freshRng(), impl === 'fused'));
      }
    });
  }
});

/** The first `seqQ` queries and `seqK` keys of a one-sequence problem. */
function cutSequence(p: OracleProblem, seqQ: number, seqK: number): OracleProblem {
  return {
    ...p,
    seqQ,
    seqK,
    q: p.q.slice(0, seqQ * p.heads * p.headDim),
    k: p.k.slice(0, seqK * p.headsKV * p.headDim),
    v: p.v.slice(0, seqK * p.headsKV * p.headDimV),
  };
}

/** `rows` rows of `width` values from `values`, then zero rows up to `total`. */
function padRows(values: Float64Array, width: number, total: number): Float64Array {
  const out = new Float64Array(total * width);
  out.set(values.subarray(0, Math.min(values.length, out.length)));
  return out;
}

describeBackends('flashAttentionVarlen: cut tokens, per-call counts', backend => {
  // The small tiles of the varlen cases above: their pipelines again.
  useSmallTiles(backend);
  beforeAll(() => {
    if (backend === 'webgpu') {
      setPoisonOutputs(true);
    }
  });
  afterAll(() => setPoisonOutputs(false));

  it('tokens past maxSeqlen or past cu[B] output 0 and get no gradient; the rest as each cut sequence alone',
     async () => {
       const rng = freshRng();
       const [heads, dim] = [2, 16];
       // Sequences 0 and 3 are longer than the bounds; 2 rows follow cu[B].
       const lenQ = [9, 0, 1, 6];
       const lenK = [12, 3, 0, 7];
       const [maxQ, maxK, extra] = [5, 8, 2];
       const cuQ = cumulativeLengths(lenQ);
       const cuK = cumulativeLengths(lenK);
       const [totalQ, totalK] = [cuQ[4] + extra, cuK[4] + extra];
       const sequences = lenQ.map(
           (sq, b) => randomOracleProblem(
               {
                 batch: 1,
                 seqQ: sq,
                 seqK: lenK[b],
                 heads,
                 headsKV: heads,
                 headDim: dim,
                 headDimV: dim
               },
               rng));
       const row = heads * dim;
       const packed = (part: 'q'|'k'|'v', total: number) =>
           Float32Array
               .from(concat([...sequences.map(s => s[part]), randomArray(extra * row, rng)]))
               .subarray(0, total * row);
       const dOut = randomArray(totalQ * row, rng);
       const want = {
         out: [] as Float64Array[],
         dq: [] as Float64Array[],
         dk: [] as Float64Array[],
         dv: [] as Float64Array[]
       };
       sequences.forEach((s, b) => {
         const [sq, sk] = [Math.min(lenQ[b], maxQ), Math.min(lenK[b], maxK)];
         const cut = cutSequence(s, sq, sk);
         const dOutB = dOut.slice(cuQ[b] * row, (cuQ[b] + sq) * row);
         const g = oracleBackward(cut, {}, dOutB, new Float64Array(heads * sq));
         want.out.push(padRows(oracleForward(cut, {}).out, row, lenQ[b]));
         want.dq.push(padRows(g.dq, row, lenQ[b]));
         want.dk.push(padRows(g.dk, row, lenK[b]));
         want.dv.push(padRows(g.dv, row, lenK[b]));
       });
       const zeros = new Float64Array(extra * row);
       const before = tf.memory().numTensors;
       const q = tf.tensor3d(packed('q', totalQ), [totalQ, heads, dim]);
       const k = tf.tensor3d(packed('k', totalK), [totalK, heads, dim]);
       const v = tf.tensor3d(packed('v', totalK), [totalK, heads, dim]);
       const cuQT = tf.tensor1d(cuQ, 'int32');
       const cuKT = tf.tensor1d(cuK, 'int32');
       const dy = tf.tensor3d(Float32Array.from(dOut), [totalQ, heads, dim]);
       const opts = {maxSeqlenQ: maxQ, maxSeqlenK: maxK};
       const out = flashAttentionVarlen(q, k, v, cuQT, cuKT, opts);
       const what = `lengths q ${lenQ} k ${lenK}, bounds ${maxQ}, ${maxK} (seed ${rng.seed})`;
       expectClose(await out.data(), concat([...want.out, zeros]), FORWARD_BOUND, `${what}: out`);
       const grads = tf.grads(
           (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => tf.sum(tf.mul(
               flashAttentionVarlen(
                   a as tf.Tensor3D, b as tf.Tensor3D, c as tf.Tensor3D, cuQT, cuKT, opts),
               dy)))([q, k, v]);
       expectClose(
           await grads[0].data(), concat([...want.dq, zeros]), GRADIENT_BOUND, `${what}: dq`);
       expectClose(
           await grads[1].data(), concat([...want.dk, zeros]), GRADIENT_BOUND, `${what}: dk`);
       expectClose(
           await grads[2].data(), concat([...want.dv, zeros]), GRADIENT_BOUND, `${what}: dv`);
       tf.dispose([out, q, k, v, cuQT, cuKT, dy, ...grads]);
       expect(tf.memory().numTensors).toBe(before);
       if (backend === 'webgpu') {
         await checkOwnPipelineErrors();
       }
     });

  if (backend === 'webgpu') {
    it('packed kernels equal the padded op with lengths bit for bit: dropout (same mask), window, softcap, ALiBi [B, H], GQA; split-KV; sliced tiles',
       async () => {
         const rng = freshRng();
         const [heads, headsKV, dim, dimV, batch] = [4, 2, 8, 12, 4];
         const lenQ = randomLengths(batch, 11, rng);
         const lenK = randomLengths(batch, 14, rng);
         const [maxQ, maxK] = [Math.max(...lenQ) + 1, Math.max(...lenK) + 2];
         const [totalQ, totalK] = [cumulativeLengths(lenQ)[batch], cumulativeLengths(lenK)[batch]];
         const random = (shape: number[]) =>
             tf.tensor(Float32Array.from(randomArray(tf.util.sizeFromShape(shape), rng)), shape);
         const q = random([totalQ, heads, dim]) as tf.Tensor3D;
         const k = random([totalK, headsKV, dim]) as tf.Tensor3D;
         const v = random([totalK, headsKV, dimV]) as tf.Tensor3D;
         const dy = random([totalQ, heads, dimV]);
         const dLse = random([heads, totalQ]);
         const slopes = tf.tensor2d(
             Array.from({length: batch * heads}, () => 0.05 + 0.2 * rng.uniform()), [batch, heads]);
         const [cuQ, cuK] =
             [cumulativeLengths(lenQ), cumulativeLengths(lenK)].map(c => tf.tensor1d(c, 'int32'));
         const [seqlensQ, seqlensK] = [lenQ, lenK].map(l => tf.tensor1d(l, 'int32'));
         const rowsOf = (lengths: number[], seq: number) => tf.tensor1d(
             lengths.flatMap((l, b) => Array.from({length: l}, (_, s) => b * seq + s)), 'int32');
         const [indexQ, indexK] = [rowsOf(lenQ, maxQ), rowsOf(lenK, maxK)];
         const pad = (x: tf.Tensor, index: tf.Tensor1D, seq: number) =>
             padInput(x, index, batch, seq) as tf.Tensor4D;
         // The padded op's [B, S, ...] rows (and [B, H, S] lse) at the packed rows.
         const packRows = (x: tf.Tensor, index: tf.Tensor1D) => tf.tidy(
             () =>
                 tf.gather(tf.reshape(x, [x.shape[0] * x.shape[1]!, ...x.shape.slice(2)]), index));
         const packLse = (lse: tf.Tensor) =>
             tf.tidy(() => tf.transpose(packRows(tf.transpose(lse, [0, 2, 1]), indexQ)));
         const opts = {
           dropoutRate: 0.25,
           seed: 2 ** 40 + 3,
           windowSize: [5, 2] as [number, number],
           softcap: 3,
           alibiSlopes: slopes
         };
         const finite = (l: tf.Tensor) =>
             tf.tidy(() => tf.where(tf.isFinite(l), l, tf.zerosLike(l)));
         const [dyPad, dLsePad] = [
           pad(dy, indexQ, maxQ), tf.tidy(() => {
             const rows = pad(tf.transpose(dLse), indexQ, maxQ);
             return tf.transpose(rows, [0, 2, 1]);
           })
         ];
         const before = tf.memory().numTensors;
         // The classic tiles, with split-KV, and the head-dim-sliced outer
         // mode (its own K/V slice loaders must read the packed rows too).
         const plans = [
           {tiles: {tm: 1, tx: 2, nq: 1, ty: 8}, splits: 1},
           {tiles: {tm: 1, tx: 2, nq: 1, ty: 8}, splits: 2},
           {tiles: {tm: 4, tx: 4, nq: 1, ty: 4, outer: true, dimChunks: 2}, splits: 1},
         ];
         for (const plan of plans) {
           setForwardOverride(plan);
           const what =
               `plan ${JSON.stringify(plan)}, lengths q ${lenQ} k ${lenK} (seed ${rng.seed})`;
           const varlen = (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => flashAttentionVarlen(
               a as tf.Tensor3D, b as tf.Tensor3D, c as tf.Tensor3D, cuQ, cuK,
               {...opts, maxSeqlenQ: maxQ, maxSeqlenK: maxK, returnSoftmaxLse: true});
           const padded = (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => flashAttention(
               a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D,
               {...opts, seqlensQ, seqlensK, returnSoftmaxLse: true});
           const [out, lse] = varlen(q, k, v);
           const [qp, kp, vp] = [pad(q, indexQ, maxQ), pad(k, indexK, maxK), pad(v, indexK, maxK)];
           const [outPad, lsePad] = padded(qp, kp, vp);
           const [outWant, lseWant] = [packRows(outPad, indexQ), packLse(lsePad)];
           expectClose(await out.data(), await outWant.data(), 0, `${what}: out`);
           const [lseF, lseWantF] = [finite(lse), finite(lseWant)];
           expectClose(await lseF.data(), await lseWantF.data(), 0, `${what}: lse`);
           tf.dispose([lseF, lseWantF]);
           const grads = tf.grads((a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => {
             const [o, l] = varlen(a, b, c);
             return tf.add(tf.sum(tf.mul(o, dy)), tf.sum(tf.mul(finite(l), dLse)));
           })([q, k, v]);
           const gradsPad = tf.grads((a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => {
             const [o, l] = padded(a, b, c);
             return tf.add(tf.sum(tf.mul(o, dyPad)), tf.sum(tf.mul(finite(l), dLsePad)));
           })([qp, kp, vp]);
           const indices = [indexQ, indexK, indexK];
           for (let i = 0; i < 3; i++) {
             const want = packRows(gradsPad[i], indices[i]);
             expectClose(await grads[i].data(), await want.data(), 0, `${what}: d${'qkv'[i]}`);
             want.dispose();
           }
           tf.dispose([out, lse, qp, kp, vp, outPad, lsePad, outWant, lseWant, ...grads]);
           tf.dispose(gradsPad);
         }
         setForwardOverride({tiles: {tm: 1, tx: 2, nq: 1, ty: 8}});
         expect(tf.memory().numTensors).toBe(before);
         tf.dispose([q, k, v, dy, dLse, slopes, cuQ, cuK, seqlensQ, seqlensK, indexQ, indexK]);
         tf.dispose([dyPad, dLsePad]);
         await checkOwnPipelineErrors();
       });
  }

  // Device-independent counts: the packed kernels and nothing else.
  if (backend === 'webgpu') {
    it('fwd+bwd on packed tensors: 4 dispatches, no upload, the padded op\'s results', async () => {
      const rng = freshRng();
      const [heads, dim, seq] = [2, 16, 12];
      const lengths = [12, 0, 5, 1];
      const batch = lengths.length;
      const cu = cumulativeLengths(lengths);
      const total = cu[batch];
      const packed = () => tf.tensor3d(
          Float32Array.from(randomArray(total * heads * dim, rng)), [total, heads, dim]);
      const [q, k, v, dy] = [packed(), packed(), packed(), packed()];
      const cuT = tf.tensor1d(cu, 'int32');
      const seqlens = tf.tensor1d(lengths, 'int32');
      const index = tf.tensor1d(
          lengths.flatMap((l, b) => Array.from({length: l}, (_, s) => b * seq + s)), 'int32');
      const pad = (x: tf.Tensor) => padInput(x, index, batch, seq) as tf.Tensor4D;
      const [qPad, kPad, vPad, dyPad] = [pad(q), pad(k), pad(v), pad(dy)];
      // dy as the upstream gradient: the counts are the op's own.
      const varlen = (xs: tf.Tensor[]) => tf.grads(
          (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => flashAttentionVarlen(
              a as tf.Tensor3D, b as tf.Tensor3D, c as tf.Tensor3D, cuT, cuT,
              {maxSeqlenQ: seq, maxSeqlenK: seq, causal: true}))(xs, dy);
      const padded = (xs: tf.Tensor[]) => tf.grads(
          (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) =>
              flashAttention(
                  a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D,
                  {seqlensQ: seqlens, seqlensK: seqlens, causal: true}) as tf.Tensor)(xs, dyPad);
      const counted = async (f: (x: tf.Tensor[]) => tf.Tensor[], xs: tf.Tensor[]) => {
        for (let warm = 0; warm < 2; warm++) {
          const g = f(xs);
          await g[0].data();
          tf.dispose(g);
        }
        const fwdBefore = forwardStats.dispatches;
        const gradBefore = fusedGradRunCount();
        const counters = webgpuCounters();
        const grads = f(xs);
        const counts = counters.snapshot();
        expect(forwardStats.dispatches - fwdBefore).toBe(1);
        expect(fusedGradRunCount() - gradBefore).toBe(1);
        return {counts, grads};
      };
      const before = tf.memory().numTensors;
      // Every op on the GPU, as at real sizes (no CPU forwarding of small ops).
      const cpuForward = tf.env().getBool('WEBGPU_CPU_FORWARD');
      tf.env().set('WEBGPU_CPU_FORWARD', false);
      let vr: {counts: WebGPUCounts, grads: tf.Tensor[]};
      let pr: {counts: WebGPUCounts, grads: tf.Tensor[]};
      try {
        vr = await counted(varlen, [q, k, v]);
        pr = await counted(padded, [qPad, kPad, vPad]);
      } finally {
        tf.env().set('WEBGPU_CPU_FORWARD', cpuForward);
      }
      // The forward and the backward's three passes, nothing else: no pad
      // or unpad, no index map, no upload (cuSeqlens are bound as they are).
      expect(vr.counts.dispatches).toBe(4);
      expect(vr.counts.hostUploads).toBe(0);
      expect(vr.counts.submits).toBe(0);
      expect(vr.counts.readBacks).toBe(0);
      // The padded op's lengths cost more small ops than the stack.
      expect(vr.counts.dispatches).toBeLessThan(pr.counts.dispatches);
      // The same gradients as the padded op with lengths, bit for bit
      // (same kernels, same sums; dropout-free).
      for (let i = 0; i < 3; i++) {
        const vPadded = pad(vr.grads[i]);
        expectClose(
            await vPadded.data(), await pr.grads[i].data(), 0,
            `gradient ${'qkv'[i]}: varlen vs padded op (seed ${rng.seed})`);
        vPadded.dispose();
      }
      tf.dispose([...vr.grads, ...pr.grads]);
      expect(tf.memory().numTensors).toBe(before);
      tf.dispose([q, k, v, dy, cuT, seqlens, index, qPad, kPad, vPad, dyPad]);
      await checkOwnPipelineErrors();
    });
  }
});

describeBackends('per-batch key lengths on the padded op', backend => {
  useSmallTiles(backend);
  it('seqlensK equals the cut sequences; keyPaddingMask equals it without a diagonal', async () => {
    const rng = freshRng();
    const [batch, seq, heads, dim] = [3, 10, 2, 8];
    const lengths = [10, 0, 4];
    const {qv, kv, vv, q, k, v, seqlensK} = seqlensInputs(rng, {batch, seq, heads, dim}, lengths);
    const mask = tf.tidy(
        () => tf.less(
            tf.reshape(tf.range(0, seq, 1, 'int32'), [1, seq]), tf.reshape(seqlensK, [batch, 1])));
    const before = tf.memory().numTensors;
    const a = flashAttention(q, k, v, {seqlensK, causal: true});
    const b = flashAttention(q, k, v, {keyPaddingMask: mask});
    const c = flashAttention(q, k, v, {seqlensK});
    const av = await a.data();
    expectClose(await b.data(), await c.data(), 0, 'mask vs lengths');
    // Row b alone, keys cut to its length (the query rows all stay), from
    // the inputs as the tensors hold them (float32).
    const f32 = (x: Float64Array) => Float64Array.from(Float32Array.from(x));
    const inputs = {q: f32(qv), k: f32(kv), v: f32(vv)};
    for (let bi = 0; bi < batch; bi++) {
      const len = lengths[bi];
      expectClose(
          av.slice(bi * seq * heads * dim, (bi + 1) * seq * heads * dim),
          seqlensRowExpected(inputs, bi, len, {seq, heads, dim}).out, FORWARD_BOUND,
          `batch row ${bi} (length ${len}, seed ${rng.seed})`);
    }
    tf.dispose([a, b, c]);
    expect(tf.memory().numTensors).toBe(before);
    const notPadding = tf.tensor2d(
        [
          [true, false, true, false, false, false, false, false, false, false],
          [true, true, false, false, false, false, false, false, false, false],
          [true, false, false, false, false, false, false, false, false, false]
        ],
        undefined, 'bool');
    const badLengths = tf.tensor1d([1, 2], 'int32');
    const n = tf.memory().numTensors;
    expect(() => flashAttention(q, k, v, {keyPaddingMask: notPadding}))
        .toThrow(/keyPaddingMask must be a padding mask/);
    expect(() => flashAttention(q, k, v, {seqlensK: badLengths}))
        .toThrow(/seqlensK must have shape \[3\] \(\[B\]\), got \[2\]/);
    expect(tf.memory().numTensors).toBe(n);
    tf.dispose([q, k, v, seqlensK, mask, notPadding, badLengths]);
  });

  it('refuses bad varlen arguments before any work', () => {
    const q = tf.zeros([5, 2, 8]) as tf.Tensor3D;
    const cu = tf.tensor1d([0, 2, 5], 'int32');
    const cuF = tf.tensor1d([0, 2, 5]);
    const n = tf.memory().numTensors;
    expect(
        () => flashAttentionVarlen(q, q, q, cuF as tf.Tensor1D, cu, {maxSeqlenQ: 3, maxSeqlenK: 3}))
        .toThrow(/cuSeqlensQ must have dtype int32, got float32/);
    expect(() => flashAttentionVarlen(q, q, q, cu, cu, {maxSeqlenQ: 0, maxSeqlenK: 3}))
        .toThrow(/maxSeqlenQ must be an integer >= 1, got 0/);
    expect(
        () => flashAttentionVarlen(
            q, q, q, cu, cu, {maxSeqlenQ: 3, maxSeqlenK: 3, windowSize: [-2, 0]}))
        .toThrow(/windowSize/);
    expect(tf.memory().numTensors).toBe(n);
    tf.dispose([q, cu, cuF]);
  });

  it('unpadInput / padInput round-trip, with gradients', async () => {
    const rng = freshRng();
    const x = tf.tensor3d(Float32Array.from(randomArray(3 * 4 * 2, rng)), [3, 4, 2]);
    const mask = tf.tensor2d([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], [3, 4], 'int32');
    const before = tf.memory().numTensors;
    const u = unpadInput(x, mask);
    expect(u.x.shape).toEqual([5, 2]);
    expect(u.maxSeqlen).toBe(3);
    expect(Array.from(await u.cuSeqlens.data())).toEqual([0, 2, 2, 5]);
    expect(Array.from(await u.indices.data())).toEqual([0, 1, 8, 10, 11]);
    const back = padInput(u.x, u.indices, 3, 4);
    const expected = tf.tidy(() => tf.mul(x, tf.expandDims(tf.cast(mask, 'float32'), 2)));
    expectClose(await back.data(), await expected.data(), 0, 'pad(unpad(x))');
    const w = tf.tensor3d(Float32Array.from(randomArray(24, rng)), [3, 4, 2]);
    const g = tf.grad(
        (t: tf.Tensor) => tf.sum(tf.mul(padInput(unpadInput(t, mask).x, u.indices, 3, 4), w)))(x);
    const gExpected = tf.tidy(() => tf.mul(w, tf.expandDims(tf.cast(mask, 'float32'), 2)));
    expectClose(await g.data(), await gExpected.data(), 0, 'gradient of pad(unpad(x))');
    // With the row count given, the same on the device (nothing read back).
    const d = unpadInput(x, mask, {totalTokens: 5});
    expect(d.maxSeqlen).toBe(4);
    expect(Array.from(await d.indices.data())).toEqual([0, 1, 8, 10, 11]);
    expect(Array.from(await d.cuSeqlens.data())).toEqual([0, 2, 2, 5]);
    expect(Array.from(await d.seqlens.data())).toEqual([2, 0, 3]);
    expectClose(await d.x.data(), await u.x.data(), 0, 'unpadInput with totalTokens');
    const gd = tf.grad(
        (t: tf.Tensor) => tf.sum(tf.mul(
            padInput(unpadInput(t, mask, {totalTokens: 5, maxSeqlen: 3}).x, u.indices, 3, 4), w)))(
        x);
    expectClose(await gd.data(), await gExpected.data(), 0, 'gradient, totalTokens given');
    tf.dispose([u.x, u.indices, u.cuSeqlens, u.seqlens, back, expected, w, g, gExpected]);
    tf.dispose([d.x, d.indices, d.cuSeqlens, d.seqlens, gd]);
    expect(tf.memory().numTensors).toBe(before);
    expect(() => unpadInput(x, mask, {totalTokens: 13}))
        .toThrow(/unpadInput: opts.totalTokens must be an integer in \[0, 12\], got 13/);
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([x, mask]);
  });
});

interface PaddingCase {
  name: string;
  shape: ProblemShape;
  opts: OracleOptions;
}

const PADDING_CASES: PaddingCase[] = [
  {
    name: 'causal, alibi [H]',
    shape: {
      batch: 4,
      seqQ: 11,
      seqK: 11,
      heads: 2,
      headsKV: 2,
      headDim: 8,
      headDimV: 8,
      alibi: 'head'
    },
    opts: {causal: true},
  },
  {
    name: 'window [3, 1], Sq < Sk, softcap, alibi [B, H], GQA, Dv != D, dropout',
    shape: {
      batch: 4,
      seqQ: 9,
      seqK: 12,
      heads: 4,
      headsKV: 2,
      headDim: 8,
      headDimV: 12,
      alibi: 'batch'
    },
    opts: {windowSize: [3, 1], softcap: 2, dropoutRate: 0.25, seed: 77},
  },
];

/**
 * A key padding mask on a causal/window/ALiBi call: keys past each row's
 * length hidden, the diagonal at the padded i + Sk - Sq (the oracle's
 * keyLengths), forward, lse and gradients.
 */
async function checkPaddingMask(c: PaddingCase, rng: Rng, expectFused: boolean): Promise<void> {
  const p = randomOracleProblem(c.shape, rng);
  const {batch, seqQ, seqK, heads, headsKV, headDim, headDimV} = c.shape;
  const lengths = randomLengths(batch, seqK, rng);
  const o: OracleOptions = {...c.opts, keyLengths: lengths};
  const what = `${c.name}, key lengths ${lengths} (seed ${rng.seed})`;
  const expected = oracleForward(p, o);
  const dOut = randomArray(expected.out.length, rng);
  const dLse = randomArray(expected.lse.length, rng);
  const g = oracleBackward(p, o, dOut, dLse);
  const q = tf.tensor4d(Float32Array.from(p.q), [batch, seqQ, heads, headDim]);
  const k = tf.tensor4d(Float32Array.from(p.k), [batch, seqK, headsKV, headDim]);
  const v = tf.tensor4d(Float32Array.from(p.v), [batch, seqK, headsKV, headDimV]);
  const slopes = tf.tensor(
      Float32Array.from(p.alibiSlopes!), c.shape.alibi === 'head' ? [heads] : [batch, heads]);
  const mask = tf.tidy(
      () => tf.less(
          tf.reshape(tf.range(0, seqK, 1, 'int32'), [1, seqK]),
          tf.reshape(tf.tensor1d(lengths, 'int32'), [batch, 1])));
  const dOutT = tf.tensor(Float32Array.from(dOut), [batch, seqQ, heads, headDimV]);
  const dLseT = tf.tensor(Float32Array.from(dLse), [batch, heads, seqQ]);
  const before = tf.memory().numTensors;
  const fwdBefore = forwardStats.dispatches;
  const gradBefore = fusedGradRunCount();
  const opts = {...c.opts, alibiSlopes: slopes, keyPaddingMask: mask, returnSoftmaxLse: true};
  const [out, lse] = flashAttention(q, k, v, opts) as tf.Tensor[];
  expectClose(await out.data(), expected.out, FORWARD_BOUND, `${what}: out`);
  expectClose(await lse.data(), expected.lse, FORWARD_BOUND, `${what}: lse`);
  tf.dispose([out, lse]);
  const grads = tf.grads((a: tf.Tensor, b: tf.Tensor, cc: tf.Tensor) => {
    const [o2, l2] =
        flashAttention(a as tf.Tensor4D, b as tf.Tensor4D, cc as tf.Tensor4D, opts) as tf.Tensor[];
    const finite = tf.where(tf.isFinite(l2), l2, tf.zerosLike(l2));
    return tf.add(tf.sum(tf.mul(o2, dOutT)), tf.sum(tf.mul(finite, dLseT)));
  })([q, k, v]);
  expectClose(await grads[0].data(), g.dq, GRADIENT_BOUND, `${what}: dq`);
  expectClose(await grads[1].data(), g.dk, GRADIENT_BOUND, `${what}: dk`);
  expectClose(await grads[2].data(), g.dv, GRADIENT_BOUND, `${what}: dv`);
  tf.dispose(grads);
  expect(tf.memory().numTensors).toBe(before);
  if (expectFused) {
    expect(forwardStats.dispatches).toBeGreaterThan(fwdBefore);
    expect(fusedGradRunCount()).toBe(gradBefore + 1);
    await checkOwnPipelineErrors();
  }
  tf.dispose([q, k, v, slopes, mask, dOutT, dLseT]);
}

describeBackends('key padding masks keep the padded diagonal', backend => {
  useSmallTiles(backend);
  beforeAll(() => {
    if (backend === 'webgpu') {
      tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
      setPoisonOutputs(true);
    }
  });
  afterAll(() => {
    tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
    setPoisonOutputs(false);
  });
  for (const c of PADDING_CASES) {
    it(c.name, () => checkPaddingMask(c, freshRng(), backend === 'webgpu'));
  }

  it('FlashMHA: a causal ALiBi window layer runs a padding mask fused, as the oracle', async () => {
    const rng = freshRng();
    const [batch, seq, embed] = [3, 10, 16];
    const layer =
        flashMHA({embedDim: embed, numHeads: 2, causal: true, useAlibi: true, windowSize: [4, -1]});
    const xValues = randomArray(batch * seq * embed, rng);
    const x = tf.tensor3d(Float32Array.from(xValues), [batch, seq, embed]);
    tf.dispose(layer.apply(x) as tf.Tensor);
    const lengths = [seq, 0, 1 + rng.int(0, seq - 2)];
    const mask = tf.tidy(
        () => tf.less(
            tf.reshape(tf.range(0, seq, 1, 'int32'), [1, seq]),
            tf.reshape(tf.tensor1d(lengths, 'int32'), [batch, 1])));
    const before = tf.memory().numTensors;
    const profile = await tf.profile(() => layer.apply(x, {keyPaddingMask: mask}) as tf.Tensor);
    tf.dispose(profile.result);
    expect(profile.kernelNames.includes(FlashAttention)).toBe(backend === 'webgpu');
    const out = layer.apply(x, {keyPaddingMask: mask}) as tf.Tensor;
    const weights: LayerWeights = {};
    for (const w of layer.weights) {
      weights[w.originalName.split('/').slice(-2).join('/')] =
          Float64Array.from(await w.read().data());
    }
    const config: LayerConfig = {
      embedDim: embed,
      numHeads: 2,
      numHeadsKV: 2,
      headDim: embed / 2,
      causal: true,
      windowSize: [4, -1],
      softcap: 0,
      useAlibi: true,
      rotaryEmbDim: 0,
      rotaryEmbBase: 10000,
      rotaryEmbInterleaved: false,
      crossAttention: false,
      alibiSlopes: alibiSlopes(2),
    };
    const keyMask = lengths.map(l => Array.from({length: seq}, (_, j) => j < l));
    const expected = layerOracle(config, weights, batch, xValues, seq, undefined, keyMask);
    expectClose(await out.data(), expected, FORWARD_BOUND, `FlashMHA (seed ${rng.seed})`);
    out.dispose();
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([x, mask]);
    layer.dispose();
  });
  // Only webgpu: on cpu every read is a host copy, with nothing to wait for.
  if (backend === 'webgpu') {
    it('no sync reads: varlen fwd+bwd, unpadInput with totalTokens, FlashMHA and MultiHeadAttention with padding masks',
       async () => {
         const [batch, seq, heads, dim] = [3, 12, 2, 8];
         const lengths = [12, 0, 5];
         const total = 17;
         const embed = heads * dim;
         const flash = flashMHA({embedDim: embed, numHeads: heads, causal: true, useAlibi: true});
         const keras = new MultiHeadAttention({numHeads: heads, keyDim: dim});
         const xBuild = tf.zeros([batch, seq, embed]);
         tf.dispose([flash.apply(xBuild), keras.apply(xBuild, {value: xBuild})] as tf.Tensor[]);
         xBuild.dispose();
         // Every op on the GPU (no CPU forwarding of small ops), so any read
         // of a result would have to wait for the GPU.
         const cpuForward = tf.env().getBool('WEBGPU_CPU_FORWARD');
         tf.env().set('WEBGPU_CPU_FORWARD', false);
         type Reader = (...args: unknown[]) => unknown;
         const gpu = tf.backend() as unknown as {readSync: Reader, read: Reader};
         const [readSync, read] = [gpu.readSync, gpu.read];
         let reads = 0;
         gpu.readSync = function(this: unknown, ...args: unknown[]) {
           reads++;
           return readSync.apply(this, args);
         };
         gpu.read = function(this: unknown, ...args: unknown[]) {
           reads++;
           return read.apply(this, args);
         };
         const before = tf.memory().numTensors;
         const fwdBefore = forwardStats.dispatches;
         const gradBefore = fusedGradRunCount();
         let readsDuringWork = -1;
         try {
           const seqlens = tf.tensor1d(lengths, 'int32');
           const mask = tf.tidy(
               () => tf.less(
                   tf.reshape(tf.range(0, seq, 1, 'int32'), [1, seq]),
                   tf.reshape(seqlens, [batch, 1])));
           const cu = tf.tidy(
               () => tf.concat([tf.zeros([1], 'int32'), tf.cumsum(seqlens)]) as tf.Tensor1D);
           const q = tf.randomNormal([total, heads, dim]);
           const kv = tf.randomNormal([total, heads, dim]);
           const varlenGrads = tf.grads(
               (a: tf.Tensor, b: tf.Tensor) => tf.sum(flashAttentionVarlen(
                   a as tf.Tensor3D, b as tf.Tensor3D, b as tf.Tensor3D, cu, cu,
                   {maxSeqlenQ: seq, maxSeqlenK: seq, causal: true})))([q, kv]);
           const x = tf.randomNormal([batch, seq, embed]);
           const unpadGrad = tf.grad((t: tf.Tensor) => {
             const u = unpadInput(t, mask, {totalTokens: total});
             const back = padInput(u.x, u.indices, batch, seq);
             tf.dispose([u.indices, u.cuSeqlens, u.seqlens]);
             return tf.sum(back);
           })(x);
           const flashGrads = tf.variableGrads(
               () => tf.sum(flash.apply(x, {keyPaddingMask: mask}) as tf.Tensor) as tf.Scalar);
           const attentionMask = tf.expandDims(mask, 1);
           const kerasGrads = tf.variableGrads(
               () => tf.sum(
                         keras.apply(x, {value: x, attentionMask, useCausalMask: true}) as
                         tf.Tensor) as tf.Scalar);
           readsDuringWork = reads;
           tf.dispose([seqlens, mask, cu, q, kv, x, unpadGrad, attentionMask, ...varlenGrads]);
           tf.dispose([flashGrads.value, ...Object.values(flashGrads.grads)]);
           tf.dispose([kerasGrads.value, ...Object.values(kerasGrads.grads)]);
           // The counter sees reads: one here.
           const probe = tf.tidy(() => tf.add(tf.zeros([4]), 1));
           await probe.data();
           probe.dispose();
         } finally {
           gpu.readSync = readSync;
           gpu.read = read;
           tf.env().set('WEBGPU_CPU_FORWARD', cpuForward);
         }
         expect(readsDuringWork).toBe(0);
         expect(reads).toBe(1);
         // varlen, FlashMHA and MultiHeadAttention: three fused forwards and backwards.
         expect(forwardStats.dispatches).toBeGreaterThanOrEqual(fwdBefore + 3);
         expect(fusedGradRunCount()).toBe(gradBefore + 3);
         await checkOwnPipelineErrors();
         expect(tf.memory().numTensors).toBe(before);
         flash.dispose();
         keras.dispose();
       });
  }
});
