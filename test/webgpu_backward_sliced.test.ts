/**
 * The head-dim-sliced backward passes (DkDvTiles.dimChunks,
 * DqTiles.dimChunks; docs/webgpu_tuning.md, "Backward at head dims above
 * 64"), forced on Dawn (SwiftShader without a GPU), against the float64
 * oracle's gradients (docs/design.md, "Accuracy bounds": 5e-4) with the
 * option families, NaN-poisoned outputs, no leaks and bit-identical reruns.
 * Every candidate of SLICED_GRAD_CANDIDATES runs where it fits SwiftShader's
 * 32 KiB of workgroup memory (D=128 for the one that fits there, D=64, 80
 * or 96 for the H100 ones), plus head dims that are not multiples of 4 or
 * of the slice width.
 */
import * as tf from '@tensorflow/tfjs-core';

import {FLASH_ATTENTION_IMPL, flashAttention, flashAttentionVarlen} from '../src';
import {chooseGradTiles, fusedGradRunCount, GradTiles, setGradTilesOverride} from '../kernels/webgpu/FlashAttentionGrad';
import {dkdvStorageBytes, dkdvTilesValid} from '../kernels/webgpu/flash_attention_grad_dkdv_webgpu';
import {dqStorageBytes, dqTilesValid} from '../kernels/webgpu/flash_attention_grad_dq_webgpu';
import {SLICED_GRAD_CANDIDATES, STREAMED_GRAD_CANDIDATES} from '../kernels/webgpu/tuning';

import {selectedBackends} from './harness/backends';
import {D80_CAUSAL_GQA_ALIBI, OptionCase} from './harness/cases';
import {H100_STAND_IN} from './harness/devices';
import {cumulativeLengths, expectClose, freshRng, GRADIENT_BOUND, randomArray, sequenceProblem} from './harness/problems';
import {checkGradUnderTiles, expectValidSlicedGradWGSL, useFusedGradWebGPU} from './harness/small_tiles';
import {oracleBackward} from './oracle';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

const SWIFTSHADER_BYTES = 32768;

/** Does a candidate fit SwiftShader's workgroup memory at head dims d / dv? */
function fitsSwiftShader(tiles: GradTiles, d: number, dv: number): boolean {
  return dkdvStorageBytes(tiles.dkdv, d, dv) <= SWIFTSHADER_BYTES &&
      dqStorageBytes(tiles.dq, d, dv) <= SWIFTSHADER_BYTES;
}

describe('sliced backward candidates', () => {
  it('are consistent, fit the H100 at D=128, and are not planned', () => {
    for (const tiles of SLICED_GRAD_CANDIDATES) {
      expect(dkdvTilesValid(tiles.dkdv) && dqTilesValid(tiles.dq)).toBe(true);
      expect(dkdvStorageBytes(tiles.dkdv, 128, 128)).toBeLessThanOrEqual(49152);
      expect(dqStorageBytes(tiles.dq, 128, 128)).toBeLessThanOrEqual(49152);
    }
    // The planner takes none of them (at D=128 a GPU gets the streamed
    // tiles, a software device the unsliced ones).
    for (const hardware of [true, false]) {
      expect(SLICED_GRAD_CANDIDATES)
          .not.toContainEqual(chooseGradTiles(128, 128, H100_STAND_IN.limits, hardware));
    }
    expect(chooseGradTiles(128, 128, H100_STAND_IN.limits, false)!.dkdv.dimChunks).toBeUndefined();
    // A split S/dP phase does not combine with slices.
    expect(dkdvTilesValid({bc: 32, br: 32, threads: 128, split: true, dimChunks: 2})).toBe(false);
    expect(dqTilesValid({br: 32, bc: 32, threads: 128, dimChunks: 0})).toBe(false);
  });
});

describeWebGPU('fused WebGPU backward, head-dim slices [webgpu]', () => {
  useFusedGradWebGPU();

  const [A, B, , D] = SLICED_GRAD_CANDIDATES;
  it('every candidate\'s WGSL at D=128, and D=256 tiles, pass Dawn\'s validation (pipelines: GPU)',
     async () => {
       // Plus D=256 in four slices (43 KiB per pass).
       const d256: GradTiles = {
         dkdv: {bc: 16, br: 32, threads: 64, dimChunks: 4},
         dq: {br: 16, bc: 32, threads: 128, dimChunks: 4}
       };
       expect(dkdvStorageBytes(d256.dkdv, 256, 256)).toBeLessThanOrEqual(49152);
       expect(dqStorageBytes(d256.dq, 256, 256)).toBeLessThanOrEqual(49152);
       const plans =
           [...SLICED_GRAD_CANDIDATES.map(t => ({d: 128, tiles: t})), {d: 256, tiles: d256}];
       await expectValidSlicedGradWGSL(plans);
     });

  const FITS_D128 = SLICED_GRAD_CANDIDATES.find(t => fitsSwiftShader(t, 128, 128))!;
  // Shapes with several key and query blocks per head; every pipeline
  // takes SwiftShader seconds to compile at these head dims, so the option
  // families are spread over few cases.
  const CASES: Array<{tiles: GradTiles, c: OptionCase}> = [
    {
      tiles: FITS_D128,
      c: {
        name: 'D=128, causal, GQA, dropout',
        shape: {batch: 1, seqQ: 40, seqK: 40, heads: 2, headsKV: 1, headDim: 128, headDimV: 128},
        opts: {causal: true, dropoutRate: 0.2, seed: 9}
      }
    },
    {
      tiles: FITS_D128,
      c: {
        name: 'D=128, Sq < Sk, window, softcap, alibi per batch',
        shape: {
          batch: 2,
          seqQ: 37,
          seqK: 64,
          heads: 2,
          headsKV: 2,
          headDim: 128,
          headDimV: 128,
          alibi: 'batch'
        },
        opts: {windowSize: [20, 7], softcap: 3}
      }
    },
    {tiles: A, c: D80_CAUSAL_GQA_ALIBI},
    {
      tiles: B,
      c: {
        name: 'D=96, Sq > Sk, MQA, dropout (a slice narrower than the lanes per key quad)',
        shape: {batch: 2, seqQ: 45, seqK: 29, heads: 3, headsKV: 1, headDim: 96, headDimV: 96},
        opts: {dropoutRate: 0.3, seed: 2 ** 33 + 5}
      }
    },
    {
      tiles: FITS_D128,
      c: {
        name: 'D=98, Dv=100 (not multiples of 4 or of the slices), causal, Sq > Sk',
        shape: {batch: 1, seqQ: 50, seqK: 33, heads: 2, headsKV: 2, headDim: 98, headDimV: 100},
        opts: {causal: true}
      }
    },
  ];
  for (const {tiles, c} of CASES) {
    it(`kernel vs oracle with ${JSON.stringify(tiles)}: ${c.name}`,
       () => checkGradUnderTiles(tiles, c));
  }

  // The length-aware calls under a sliced candidate and under the streamed
  // mode (STREAMED_GRAD_CANDIDATES' S1: both operands streamed).
  const [S1] = STREAMED_GRAD_CANDIDATES;
  for (const [name, tiles] of [['sliced D', D], ['streamed S1', S1]] as const) {
    it(`per-batch lengths (seqlensQ, seqlensK) through tf.grads, D=64, ${
           name}: each batch row alone`,
       async () => {
         setGradTilesOverride(tiles);
         tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
         const rng = freshRng();
         const [batch, seq, heads, dim] = [3, 40, 2, 64];
         const lensQ = [40, 0, 23];
         const lensK = [33, 17, 40];
         const values = () => randomArray(batch * seq * heads * dim, rng);
         const [qv, kv, vv, dov] = [values(), values(), values(), values()];
         const shape: [number, number, number, number] = [batch, seq, heads, dim];
         const [q, k, v, dOut] =
             [qv, kv, vv, dov].map(x => tf.tensor4d(Float32Array.from(x), shape));
         const seqlensQ = tf.tensor1d(lensQ, 'int32');
         const seqlensK = tf.tensor1d(lensK, 'int32');
         const tensors = tf.memory().numTensors;
         try {
           const before = fusedGradRunCount();
           const grads = tf.grads(
               (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => tf.sum(tf.mul(
                   flashAttention(
                       a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D,
                       {seqlensQ, seqlensK, causal: true}),
                   dOut)))([q, k, v]);
           const [dq, dk, dv] =
               await Promise.all(grads.map(g => g.data() as Promise<Float32Array>));
           tf.dispose(grads);
           expect(fusedGradRunCount()).toBe(before + 1);
           expect(tf.memory().numTensors).toBe(tensors);
           const rowSize = seq * heads * dim;
           for (let b = 0; b < batch; b++) {
             const [lq, lk] = [lensQ[b], lensK[b]];
             const cut = (x: Float64Array, rows: number) =>
                 x.slice(b * rowSize, b * rowSize + rows * heads * dim);
             const expected = {
               dq: new Float64Array(rowSize),
               dk: new Float64Array(rowSize),
               dv: new Float64Array(rowSize)
             };
             if (lq > 0 && lk > 0) {
               const g = oracleBackward(
                   sequenceProblem({
                     seqQ: lq,
                     seqK: lk,
                     heads,
                     headsKV: heads,
                     dim,
                     q: cut(qv, lq),
                     k: cut(kv, lk),
                     v: cut(vv, lk)
                   }),
                   {causal: true}, cut(dov, lq), new Float64Array(heads * lq));
               expected.dq.set(g.dq);
               expected.dk.set(g.dk);
               expected.dv.set(g.dv);
             }
             const got = {dq, dk, dv};
             for (const key of ['dq', 'dk', 'dv'] as const) {
               expectClose(
                   got[key].slice(b * rowSize, (b + 1) * rowSize), expected[key], GRADIENT_BOUND,
                   `${key} of batch row ${b} (lengths ${lq}, ${lk}; seed ${rng.seed})`);
             }
           }
         } finally {
           setGradTilesOverride(null);
           tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
           tf.dispose([q, k, v, dOut, seqlensQ, seqlensK]);
         }
       });
  }

  for (const [name, tiles] of [['sliced B', B], ['streamed S1', S1]] as const) {
    it(`a packed varlen call (GQA, causal, an empty sequence), D=64, ${name}: each sequence alone`,
       async () => {
         setGradTilesOverride(tiles);
         tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
         const rng = freshRng();
         const [heads, headsKV, dim] = [4, 2, 64];
         const lensQ = [20, 0, 37];
         const lensK = [29, 6, 37];
         const [cuQ, cuK] = [cumulativeLengths(lensQ), cumulativeLengths(lensK)];
         const [totalQ, totalK] = [cuQ[3], cuK[3]];
         const [qv, dov] = [0, 1].map(() => randomArray(totalQ * heads * dim, rng));
         const [kv, vv] = [0, 1].map(() => randomArray(totalK * headsKV * dim, rng));
         const q = tf.tensor3d(Float32Array.from(qv), [totalQ, heads, dim]);
         const dOut = tf.tensor3d(Float32Array.from(dov), [totalQ, heads, dim]);
         const [k, v] =
             [kv, vv].map(x => tf.tensor3d(Float32Array.from(x), [totalK, headsKV, dim]));
         const [cuSeqlensQ, cuSeqlensK] = [cuQ, cuK].map(x => tf.tensor1d(x, 'int32'));
         const tensors = tf.memory().numTensors;
         try {
           const before = fusedGradRunCount();
           const opts = {causal: true, maxSeqlenQ: 37, maxSeqlenK: 37};
           const grads = tf.grads(
               (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => tf.sum(tf.mul(
                   flashAttentionVarlen(
                       a as tf.Tensor3D, b as tf.Tensor3D, c as tf.Tensor3D, cuSeqlensQ, cuSeqlensK,
                       opts) as tf.Tensor,
                   dOut)))([q, k, v]);
           const [dq, dk, dv] =
               await Promise.all(grads.map(g => g.data() as Promise<Float32Array>));
           tf.dispose(grads);
           expect(fusedGradRunCount()).toBe(before + 1);
           expect(tf.memory().numTensors).toBe(tensors);
           const qRow = heads * dim;
           const kRow = headsKV * dim;
           for (let b = 0; b < lensQ.length; b++) {
             const [lq, lk] = [lensQ[b], lensK[b]];
             const qSlice = <T extends Float32Array|Float64Array>(x: T) =>
                 x.slice(cuQ[b] * qRow, cuQ[b + 1] * qRow) as T;
             const kSlice = <T extends Float32Array|Float64Array>(x: T) =>
                 x.slice(cuK[b] * kRow, cuK[b + 1] * kRow) as T;
             const expected = {
               dq: new Float64Array(lq * qRow),
               dk: new Float64Array(lk * kRow),
               dv: new Float64Array(lk * kRow)
             };
             if (lq > 0 && lk > 0) {
               Object.assign(
                   expected,
                   oracleBackward(
                       sequenceProblem({
                         seqQ: lq,
                         seqK: lk,
                         heads,
                         headsKV,
                         dim,
                         q: qSlice(qv),
                         k: kSlice(kv),
                         v: kSlice(vv)
                       }),
                       {causal: true}, qSlice(dov), new Float64Array(heads * lq)));
             }
             const what = (key: string) =>
                 `${key} of sequence ${b} (lengths ${lq}, ${lk}; seed ${rng.seed})`;
             expectClose(qSlice(dq), expected.dq, GRADIENT_BOUND, what('dq'));
             expectClose(kSlice(dk), expected.dk, GRADIENT_BOUND, what('dk'));
             expectClose(kSlice(dv), expected.dv, GRADIENT_BOUND, what('dv'));
           }
         } finally {
           setGradTilesOverride(null);
           tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
           tf.dispose([q, k, v, dOut, cuSeqlensQ, cuSeqlensK]);
         }
       });
  }
});
