/**
 * The subgroup-matrix (tensor core) forward on Dawn/SwiftShader through its
 * stand-in (kernels/webgpu/subgroup_matrix_wgsl.ts: the matrix built-ins as
 * plain loops, f16 rounding emulated), against the float64 oracle. The
 * default plan, the two-pass kernel
 * (flash_attention_subgroup_matrix_two_pass_webgpu.ts): every option case
 * at float32 accuracy (hi/lo split), the float16 precision within its
 * bound, multi-tile problems on two matrix shapes and with 2 row blocks per
 * subgroup, operands far outside f16's range, and precision's validation;
 * the one-pass kernel (flash_attention_subgroup_matrix_webgpu.ts), forced,
 * on a multi-tile problem. The real built-ins are checked on a GPU by
 * benchmarks/tensor_cores.ts (benchmarks/RESULTS.md).
 */
import * as tf from '@tensorflow/tfjs-core';

import {matrixForwardStats, planMatrixForward, setMatrixForwardOverride} from '../kernels/webgpu/flash_attention_subgroup_matrix';
import {checkOwnPipelineErrors, webgpuBackendOf} from '../kernels/webgpu/own_pipeline';
import type {MatrixShape} from '../kernels/webgpu/subgroup_matrix';
import {flashAttention, FlashAttentionOptions} from '../src';
import {oracleForward, OracleOptions} from './oracle';

import {selectedBackends} from './harness/backends';
import {SHAPE_A, SHAPE_B} from './harness/matrix_shapes';
import {OPTION_CASES, OptionCase} from './harness/cases';
import {expectClose, FORWARD_BOUND, freshRng, ProblemShape, randomOracleProblem} from './harness/problems';
import {useFusedWebGPU} from './harness/small_tiles';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;

/** The bound measured for precision 'float16' (docs/tensor_cores.md). */
const FLOAT16_BOUND = 5e-3;

interface Run {
  shape: ProblemShape;
  opts: OracleOptions;
  precision?: 'float32'|'float16';
  /** Multiplies q, k and v. */
  scale?: number;
  /** Multiplies v's rows of key j. */
  vKeyScale?: (j: number) => number;
  /** The kernel that must run: the two-pass one unless another is forced. */
  tiling?: 'online'|'storage';
}

/** One call of the op, checked against the oracle; the matrix path must run. */
async function check(name: string, r: Run, bound: number): Promise<void> {
  const rng = freshRng();
  const p = randomOracleProblem(r.shape, rng);
  const s = r.scale ?? 1;
  for (const a of [p.q, p.k, p.v]) {
    for (let i = 0; i < a.length; i++) {
      a[i] = Math.fround(a[i] * s);
    }
  }
  const {batch, seqQ, seqK, heads, headsKV, headDim, headDimV} = r.shape;
  if (r.vKeyScale != null) {
    for (let i = 0; i < p.v.length; i++) {
      p.v[i] = Math.fround(p.v[i] * r.vKeyScale(Math.floor(i / (headsKV * headDimV)) % seqK));
    }
  }
  const before = tf.memory().numTensors;
  const bytesBefore = gpuBytes();
  const q = tf.tensor4d(Float32Array.from(p.q), [batch, seqQ, heads, headDim]);
  const k = tf.tensor4d(Float32Array.from(p.k), [batch, seqK, headsKV, headDim]);
  const v = tf.tensor4d(Float32Array.from(p.v), [batch, seqK, headsKV, headDimV]);
  const slopes = p.alibiSlopes == null ?
      undefined :
      tf.tensor(
          Float32Array.from(p.alibiSlopes), r.shape.alibi === 'head' ? [heads] : [batch, heads]);
  const dispatches = matrixForwardStats.dispatches;
  const twoPass = matrixForwardStats.twoPassDispatches;
  const storage = matrixForwardStats.storageDispatches;
  const splits = matrixForwardStats.splitDispatches;
  try {
    const opts: FlashAttentionOptions =
        {...r.opts, alibiSlopes: slopes, precision: r.precision, returnSoftmaxLse: true};
    const [out, lse] = flashAttention(q, k, v, opts) as tf.Tensor[];
    expect(matrixForwardStats.dispatches).toBe(dispatches + 1);
    expect(matrixForwardStats.twoPassDispatches).toBe(twoPass + (r.tiling == null ? 1 : 0));
    // The storage-loaded kernel after its pre-pass (Q, K, V).
    expect(matrixForwardStats.storageDispatches).toBe(storage + (r.tiling === 'storage' ? 1 : 0));
    expect(matrixForwardStats.splitDispatches).toBe(splits + (r.tiling === 'storage' ? 1 : 0));
    const [outData, lseData] = [await out.data(), await lse.data()];
    tf.dispose([out, lse]);
    await checkOwnPipelineErrors();
    const expected = oracleForward(p, r.opts);
    const what = `${name} (seed ${rng.seed})`;
    expectClose(outData, expected.out, bound, `${what}: out`);
    expectClose(lseData, expected.lse, bound, `${what}: lse`);
  } finally {
    tf.dispose([q, k, v]);
    if (slopes != null) {
      slopes.dispose();
    }
  }
  expect(tf.memory().numTensors).toBe(before);
  // The storage-loaded kernel's split operands are freed after the call.
  expect(gpuBytes()).toBe(bytesBefore);
}

/** Bytes of GPU buffers in use by the webgpu backend. */
function gpuBytes(): number {
  return (tf.memory() as unknown as {numBytesInGPU: number}).numBytesInGPU;
}

/** Whether the stand-in takes these head dims on this device. */
function planned(shape: ProblemShape): boolean {
  return planMatrixForward(webgpuBackendOf().device, shape.headDim, shape.headDimV, 'float32') !=
      null;
}

describeWebGPU('subgroup-matrix forward, stand-in [webgpu]', () => {
  useFusedWebGPU(() => setMatrixForwardOverride(null));

  describe('option cases, float32 precision (split)', () => {
    beforeAll(() => setMatrixForwardOverride({shape: SHAPE_A, subgroups: 2, bc: 16}));
    // Head dims the 8 x 8 x 8 blocks tile (multiples of 8) and that fit in
    // SwiftShader's 32 KiB of workgroup memory (the D=256 case does not).
    const cases = OPTION_CASES.filter(
        c => c.shape.headDim % 8 === 0 && c.shape.headDimV % 8 === 0 && c.shape.headDim <= 64);
    it('covers most option cases', () => {
      expect(cases.length).toBeGreaterThanOrEqual(OPTION_CASES.length - 2);
      for (const c of cases) {
        expect(planned(c.shape)).toBe(true);
      }
    });
    for (const c of cases) {
      it(c.name,
         () => check(
             c.name, {shape: c.shape, opts: c.opts, scale: c.inputScale},
             c.bounds?.forward ?? FORWARD_BOUND));
    }
  });

  const multiTile: OptionCase[] = [
    {
      name: 'causal, Sq < Sk, GQA, Dv != D',
      shape: {batch: 1, seqQ: 37, seqK: 70, heads: 4, headsKV: 2, headDim: 32, headDimV: 16},
      opts: {causal: true}
    },
    {
      name: 'window [9, 4], alibi [B, H], softcap, Sq > Sk',
      shape: {
        batch: 2,
        seqQ: 61,
        seqK: 45,
        heads: 2,
        headsKV: 1,
        headDim: 16,
        headDimV: 32,
        alibi: 'batch'
      },
      opts: {windowSize: [9, 4], softcap: 3}
    },
    {
      name: 'dropout, not causal',
      shape: {batch: 1, seqQ: 33, seqK: 50, heads: 2, headsKV: 2, headDim: 32, headDimV: 32},
      opts: {dropoutRate: 0.3, seed: 77}
    },
  ];
  for (const [label, shape, subgroups, bc] of [
           // (The 8x8x8 multi-tile variants took minutes each to compile on
           // SwiftShader; the option cases above run 8x8x8 blocks.)
           ['16x8x16, 2 subgroups, 16 keys', SHAPE_B, 2, 16],
  ] as Array<[string, MatrixShape, number, number]>) {
    describe(`multi-tile problems, ${label}`, () => {
      beforeAll(() => setMatrixForwardOverride({shape, subgroups, bc}));
      for (const c of multiTile) {
        it(c.name, () => check(c.name, {shape: c.shape, opts: c.opts}, FORWARD_BOUND));
      }
    });
  }

  // The one-pass kernel (O rescaled through workgroup memory), still
  // forcible as a plan: a multi-tile case.
  describe('one-pass kernel (forced), 16x8x16, 2 subgroups, 32 keys', () => {
    beforeAll(
        () => setMatrixForwardOverride(
            {shape: SHAPE_B, subgroups: 2, bc: 32, forwardTiling: 'online'}));
    for (const c of multiTile.slice(0, 1)) {
      it(c.name,
         () => check(c.name, {shape: c.shape, opts: c.opts, tiling: 'online'}, FORWARD_BOUND));
    }
  });

  // Two row blocks of M rows per subgroup (the H100's first two-pass
  // tiling), one subgroup so that SwiftShader's 32 KiB hold it.
  describe('two-pass kernel, 2 row blocks per subgroup, 8x8x8', () => {
    beforeAll(() => setMatrixForwardOverride({shape: SHAPE_A, subgroups: 1, rowBlocks: 2, bc: 16}));
    for (const c of multiTile.slice(0, 1)) {
      it(c.name, () => check(c.name, {shape: c.shape, opts: c.opts}, FORWARD_BOUND));
    }
  });

  // The two-pass kernel with row maxima only in pass 1 (rowMaxOnly: no
  // exponentials there, P summed in pass 2, O normalised on the way out).
  describe('two-pass kernel, row maxima in pass 1, 16x8x16, 2 subgroups, 16 keys', () => {
    beforeAll(
        () => setMatrixForwardOverride({shape: SHAPE_B, subgroups: 2, bc: 16, rowMaxOnly: true}));
    // Dropout: the row's sum of P leaves the mask out.
    for (const c of multiTile.filter(m => m.opts.dropoutRate != null)) {
      it(c.name, () => check(c.name, {shape: c.shape, opts: c.opts}, FORWARD_BOUND));
    }
    const edge = OPTION_CASES.filter(
        c => c.name.startsWith('causal, Sq > Sk') || c.name.startsWith('large logits'));
    it('covers rows without keys and large logits', () => expect(edge.length).toBe(2));
    for (const c of edge) {
      it(c.name,
         () => check(
             c.name, {shape: c.shape, opts: c.opts, scale: c.inputScale},
             c.bounds?.forward ?? FORWARD_BOUND));
    }
  });

  // The storage-loaded two-pass kernel (forwardTiling 'storage'): Q, K, V
  // split by a pre-pass into float16 matrices in storage, loaded from there;
  // pass 1 with exponentials, or finding the row maxima only (rowMaxOnly).
  for (const rowMaxOnly of [false, true]) {
    const maxOnly = rowMaxOnly ? ', row maxima in pass 1' : '';
    describe(`storage-loaded kernel (forced${maxOnly}), option cases, 8x8x8`, () => {
      beforeAll(
          () => setMatrixForwardOverride(
              {shape: SHAPE_A, subgroups: 2, bc: 16, forwardTiling: 'storage', rowMaxOnly}));
      // With row maxima only, the cases its sums and masks change (the
      // rest share the code above): rows without keys, large logits, dropout.
      const cases = OPTION_CASES.filter(
          c => c.shape.headDim % 8 === 0 && c.shape.headDimV % 8 === 0 && c.shape.headDim <= 64 &&
              (!rowMaxOnly || /rows without keys|large logits|dropout 0.25/.test(c.name)));
      for (const c of cases) {
        it(c.name,
           () => check(
               c.name, {shape: c.shape, opts: c.opts, scale: c.inputScale, tiling: 'storage'},
               c.bounds?.forward ?? FORWARD_BOUND));
      }
    });
    describe(
        `storage-loaded kernel (forced${maxOnly}), multi-tile, 16x8x16, 2 subgroups, 16 keys`,
        () => {
          beforeAll(
              () => setMatrixForwardOverride(
                  {shape: SHAPE_B, subgroups: 2, bc: 16, forwardTiling: 'storage', rowMaxOnly}));
          for (const c of multiTile) {
            it(c.name,
               () =>
                   check(c.name, {shape: c.shape, opts: c.opts, tiling: 'storage'}, FORWARD_BOUND));
          }
        });
    describe(`storage-loaded kernel (forced${maxOnly}), 2 row blocks per subgroup, 8x8x8`, () => {
      beforeAll(() => setMatrixForwardOverride({
                  shape: SHAPE_A,
                  subgroups: 1,
                  rowBlocks: 2,
                  bc: 16,
                  forwardTiling: 'storage',
                  rowMaxOnly
                }));
      for (const c of multiTile.slice(0, 1)) {
        it(c.name,
           () => check(c.name, {shape: c.shape, opts: c.opts, tiling: 'storage'}, FORWARD_BOUND));
      }
    });
    describe(`storage-loaded kernel (forced${maxOnly}), precision and range`, () => {
      beforeAll(
          () => setMatrixForwardOverride(
              {shape: SHAPE_B, subgroups: 2, bc: 16, forwardTiling: 'storage', rowMaxOnly}));
      const shape: ProblemShape =
          {batch: 1, seqQ: 40, seqK: 40, heads: 2, headsKV: 1, headDim: 32, headDimV: 32};
      it('float16 precision: within its bound, and less accurate than the split', async () => {
        await check(
            'float16, causal',
            {shape, opts: {causal: true}, precision: 'float16', tiling: 'storage'}, FLOAT16_BOUND);
        await expect(check(
                         'float16 vs the float32 bound',
                         {shape, opts: {}, precision: 'float16', tiling: 'storage'}, 1e-5))
            .rejects.toThrow();
      });
      it('operands beyond f16 range (x 3e4, V tiles of unequal scales) and below (x 1e-6)',
         async () => {
           await check(
               'x 3e4',
               {shape, opts: {softmaxScale: 1 / (9e8 * 32 ** 0.5)}, scale: 3e4, tiling: 'storage'},
               FORWARD_BOUND);
           await check(
               'x 1e-6',
               {shape, opts: {softmaxScale: 1e12 / 32 ** 0.5}, scale: 1e-6, tiling: 'storage'},
               FORWARD_BOUND);
         });
      it('V key tiles of unequal scales (2^-20 .. 2^20), beyond f16 range', async () => {
        // Each 16-key tile of V gets its own scale, folded into P: a tile
        // scale applied twice or not at all is off by a power of two.
        const vKeyScale = (j: number) => [2 ** 20, 2 ** -20, 3, 2 ** 12][Math.floor(j / 16)];
        await check('V tiles', {shape, opts: {}, vKeyScale, tiling: 'storage'}, FORWARD_BOUND);
        await check(
            'V tiles, causal, float16',
            {shape, opts: {causal: true}, vKeyScale, precision: 'float16', tiling: 'storage'},
            FLOAT16_BOUND);
      });
    });
  }

  describe('precision and range', () => {
    beforeAll(() => setMatrixForwardOverride({shape: SHAPE_B, subgroups: 2, bc: 16}));
    const shape: ProblemShape =
        {batch: 1, seqQ: 40, seqK: 40, heads: 2, headsKV: 1, headDim: 32, headDimV: 32};
    it('float16 precision: within its bound, and less accurate than the split', async () => {
      await check(
          'float16, causal', {shape, opts: {causal: true}, precision: 'float16'}, FLOAT16_BOUND);
      // A split-free path that met the float32 bound would mean the
      // precision option is not reaching the kernel.
      await expect(
          check('float16 vs the float32 bound', {shape, opts: {}, precision: 'float16'}, 1e-5))
          .rejects.toThrow();
    });
    it('operands beyond f16 range (x 3e4) and below its normals (x 1e-6)', async () => {
      // |q.k| ~ 1e9 saturates the softmax: scale the scores back to O(1).
      await check(
          'x 3e4', {shape, opts: {softmaxScale: 1 / (9e8 * 32 ** 0.5)}, scale: 3e4}, FORWARD_BOUND);
      await check(
          'x 1e-6', {shape, opts: {softmaxScale: 1e12 / 32 ** 0.5}, scale: 1e-6}, FORWARD_BOUND);
    });
    it('rejects an unknown precision before any GPU work', () => {
      const q = tf.zeros([1, 4, 1, 8]) as tf.Tensor4D;
      expect(() => flashAttention(q, q, q, {precision: 'bfloat16' as 'float16'}))
          .toThrow(/precision must be 'float32' or 'float16', got "bfloat16"/);
      q.dispose();
    });
  });
});
