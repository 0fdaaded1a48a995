/**
 * The RowGather kernel (kernels/webgpu/row_gather_webgpu.ts) that packs and
 * pads flashAttentionVarlen's tensors: every element against a plain
 * JavaScript gather, vec4 and scalar rows, 1-based indices with 0 (zero
 * rows), both directions (more output rows than input rows and fewer), no
 * leaks. flashAttentionVarlen's own tests (test/varlen.test.ts) check it
 * end to end against the oracle.
 */
import * as tf from '@tensorflow/tfjs-core';

import {RowGather} from '../src';
import {hasFusedKernel} from '../src/dispatch';

import {describeBackends} from './harness/backends';
import {freshRng, randomArray, Rng} from './harness/problems';

/** out[i] = index[i] > 0 ? x[index[i] - 1] : 0, in plain JavaScript. */
function expectedRows(x: Float32Array, cols: number, index: Int32Array): Float32Array {
  const out = new Float32Array(index.length * cols);
  index.forEach((source, i) => {
    if (source > 0) {
      out.set(x.subarray((source - 1) * cols, source * cols), i * cols);
    }
  });
  return out;
}

/** `count` 1-based indices into `rows` rows, about a quarter 0. */
function randomIndex(count: number, rows: number, rng: Rng): Int32Array {
  return Int32Array.from({length: count}, () => rng.uniform() < 0.25 ? 0 : rng.int(1, rows));
}

describeBackends('RowGather', backend => {
  if (backend !== 'webgpu') {
    it('is a webgpu kernel only (other backends concat and gather)', () => {
      expect(hasFusedKernel(RowGather, backend)).toBe(false);
    });
    return;
  }

  // [rows of x, rows of out, row length]: pad-like (more out rows), unpad-
  // like (fewer), vec4 rows (C % 4 == 0) and scalar rows.
  const cases: Array<[number, number, number]> = [[5, 12, 8], [12, 5, 8], [7, 9, 6], [9, 4, 1]];
  for (const [rows, outRows, cols] of cases) {
    it(`x [${rows}, ${cols}] -> [${outRows}, ${cols}], every element`, async () => {
      expect(hasFusedKernel(RowGather, 'webgpu')).toBe(true);
      const rng = freshRng();
      const x = Float32Array.from(randomArray(rows * cols, rng));
      const index = randomIndex(outRows, rows, rng);
      index[0] = 0;
      index[outRows - 1] = rows;
      const before = tf.memory().numTensors;
      const xT = tf.tensor2d(x, [rows, cols]);
      const indexT = tf.tensor1d(index, 'int32');
      const out = tf.engine().runKernel(RowGather, {x: xT, rowIndex: indexT}) as tf.Tensor;
      expect(out.shape).toEqual([outRows, cols]);
      const got = await out.data();
      const want = expectedRows(x, cols, index);
      for (let i = 0; i < want.length; i++) {
        if (got[i] !== want[i]) {
          throw new Error(`element ${i}: got ${got[i]}, want ${want[i]} (seed ${rng.seed}, index ${
              Array.from(index)})`);
        }
      }
      tf.dispose([xT, indexT, out]);
      expect(tf.memory().numTensors).toBe(before);
    });
  }
});
