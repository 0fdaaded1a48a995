/**
 * The composed-ops backward pass, written as the FlashAttention backward:
 * from the saved q, k, v, out and lse it recomputes P block by block
 * (never a whole `[Sq, Sk]` score tensor), with
 *
 *   Delta = rowsum(dO * O) - dLse          (dLse: gradient of the lse output)
 *   dP    = (dO V^T) * keep                (keep: scaled dropout mask, or 1)
 *   dS    = P * (dP - Delta) * softcap'    (softcap' = 1 - tanh^2, or 1)
 *   dV   += (P * keep)^T dO,  dQ = scale dS K,  dK += scale dS^T Q
 *
 * Folding dLse into Delta makes the lse output differentiable for free:
 * d lse_i / d s_ij = P_ij.
 */
import * as tf from '@tensorflow/tfjs-core';

import type {FlashAttentionAttrs} from '../kernel_names';

import {ReferenceShapes, blockColumns, blockScores, consume, dropoutMask, groupedRows, headsFirst, keysGrouped, maskScores, planQueryBlocks, probabilitiesFromLse, regroup, rowsWithKeys, ungroup, visibleMask} from './blocks';

export interface ReferenceBackwardInputs {
  dy: tf.Tensor4D;
  dLse: tf.Tensor3D;
  q: tf.Tensor4D;
  k: tf.Tensor4D;
  v: tf.Tensor4D;
  out: tf.Tensor4D;
  softmaxLse: tf.Tensor3D;
  alibiSlopes: tf.Tensor|null;
}

/** Returns `[dq, dk, dv]`, shaped like q, k, v. */
export function referenceBackward(
    inputs: ReferenceBackwardInputs, shapes: ReferenceShapes, attrs: FlashAttentionAttrs,
    blockElements: number): [tf.Tensor4D, tf.Tensor4D, tf.Tensor4D] {
  return tf.tidy(() => {
    const {batch, heads, headsKV, seqK, headDim, headDimV} = shapes;
    const {dy, q, k, v, out, alibiSlopes} = inputs;
    const qHeadsFirst = headsFirst(q);
    const dyHeadsFirst = headsFirst(dy);
    const kGrouped = keysGrouped(k);
    const vGrouped = keysGrouped(v);
    // [B, H, Sq, 1] each.
    const delta: tf.Tensor4D = tf.tidy(
        () =>
            tf.sub(headsFirst(tf.sum(tf.mul(dy, out), -1, true)), tf.expandDims(inputs.dLse, 3)) as
            tf.Tensor4D);
    const lse = tf.expandDims(inputs.softmaxLse, 3) as tf.Tensor4D;
    const sliceRows = (x: tf.Tensor4D, row0: number, rows: number) =>
        tf.slice(x, [0, 0, row0, 0], [-1, -1, rows, -1]);

    let dk: tf.Tensor3D = tf.zeros([batch * headsKV, seqK, headDim]);
    let dv: tf.Tensor3D = tf.zeros([batch * headsKV, seqK, headDimV]);
    const dqBlocks: tf.Tensor4D[] = [];
    for (const block of planQueryBlocks(shapes, attrs, blockElements)) {
      if (block.cols === 0) {  // Rows that see no key have zero gradient.
        dqBlocks.push(tf.zeros([batch, heads, block.rows, headDim]));
        continue;
      }
      const [dqBlock, dkBlock, dvBlock] = tf.tidy(() => {
        const visible = visibleMask(block, shapes, attrs);
        const hasKeys = rowsWithKeys(block, shapes, attrs);
        const qRows = groupedRows(qHeadsFirst, block, shapes);
        const dyRows = groupedRows(dyHeadsFirst, block, shapes);
        const kCols = blockColumns(kGrouped, block);
        const vCols = blockColumns(vGrouped, block);
        const {scores, capTanh} =
            blockScores(qRows, kCols, alibiSlopes, block, shapes, attrs, true);
        const masked = maskScores(scores, visible);
        const p = probabilitiesFromLse(masked, sliceRows(lse, block.row0, block.rows), hasKeys);
        masked.dispose();
        const keep = attrs.dropoutRate > 0 ? dropoutMask(block, shapes, attrs) : null;
        const pKept = keep == null ? p : tf.mul(p, keep) as tf.Tensor4D;
        const dvBlock = tf.matMul(regroup(pKept, block, shapes), dyRows, true, false);
        let dScores = ungroup(tf.matMul(dyRows, vCols, false, true), block, shapes);
        if (keep != null) {
          dScores = consume(dScores, x => tf.mul(x, keep));
        }
        const blockDelta = sliceRows(delta, block.row0, block.rows);
        dScores = consume(dScores, dP => tf.mul(p, tf.sub(dP, blockDelta)));
        if (capTanh != null) {
          dScores = consume(dScores, dT => tf.mul(dT, tf.sub(1, tf.square(capTanh))));
        }
        // p is 0 at masked keys, but tanh' of a NaN/Inf score is not: zero
        // them by selecting, so that they cannot reach dq and dk.
        dScores = maskScores(dScores, visible, 0);
        const dsGrouped = regroup(dScores, block, shapes);
        const dqBlock =
            tf.mul(ungroup(tf.matMul(dsGrouped, kCols), block, shapes), attrs.softmaxScale) as
            tf.Tensor4D;
        const dkBlock =
            tf.mul(tf.matMul(dsGrouped, qRows, true, false), attrs.softmaxScale) as tf.Tensor3D;
        return [dqBlock, dkBlock, dvBlock];
      });
      dqBlocks.push(dqBlock);
      // Place the block's key columns within [0, Sk) and accumulate.
      const colPadding: Array<[number, number]> =
          [[0, 0], [block.col0, seqK - block.col0 - block.cols], [0, 0]];
      dk = consume(dk, acc => tf.add(acc, tf.pad(dkBlock, colPadding)));
      dv = consume(dv, acc => tf.add(acc, tf.pad(dvBlock, colPadding)));
      dkBlock.dispose();
      dvBlock.dispose();
    }
    const dq = dqBlocks.length === 1 ? dqBlocks[0] : tf.concat(dqBlocks, 2);
    const toInputLayout = (x: tf.Tensor3D, h: number, s: number) =>
        tf.transpose(tf.reshape(x, [batch, h, s, x.shape[2]]), [0, 2, 1, 3]) as tf.Tensor4D;
    return [
      tf.transpose(dq, [0, 2, 1, 3]) as tf.Tensor4D,
      toInputLayout(dk, headsKV, seqK),
      toInputLayout(dv, headsKV, seqK),
    ];
  });
}
