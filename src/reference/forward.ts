/**
 * The composed-ops forward pass: tfjs ops only, so it runs on every backend.
 * Memory-lean: see blocks.ts.
 */
import * as tf from '@tensorflow/tfjs-core';

import type {FlashAttentionAttrs} from '../kernel_names';

import {ReferenceShapes, blockColumns, blockScores, consume, dropoutMask, groupedRows, headsFirst, keysGrouped, maskScores, planQueryBlocks, rowsWithKeys, ungroup, visibleMask} from './blocks';

/** Returns `[out [B, Sq, H, Dv], lse [B, H, Sq]]`. */
export function referenceForward(
    q: tf.Tensor4D, k: tf.Tensor4D, v: tf.Tensor4D, alibiSlopes: tf.Tensor|null,
    shapes: ReferenceShapes, attrs: FlashAttentionAttrs,
    blockElements: number): [tf.Tensor4D, tf.Tensor3D] {
  return tf.tidy(() => {
    const {batch, heads, seqQ, headDimV} = shapes;
    const qHeadsFirst = headsFirst(q);
    const kGrouped = keysGrouped(k);
    const vGrouped = keysGrouped(v);
    const outBlocks: tf.Tensor4D[] = [];
    const lseBlocks: tf.Tensor4D[] = [];
    for (const block of planQueryBlocks(shapes, attrs, blockElements)) {
      if (block.cols === 0) {  // No row of the block sees a key.
        outBlocks.push(tf.zeros([batch, heads, block.rows, headDimV]));
        lseBlocks.push(tf.fill([batch, heads, block.rows, 1], -Infinity));
        continue;
      }
      const [out, lse] = tf.tidy(() => {
        const visible = visibleMask(block, shapes, attrs);
        const hasKeys = rowsWithKeys(block, shapes, attrs);
        const qRows = groupedRows(qHeadsFirst, block, shapes);
        const {scores} = blockScores(
            qRows, blockColumns(kGrouped, block), alibiSlopes, block, shapes, attrs, false);
        const masked = maskScores(scores, visible);
        // Row max over visible keys; 0 for rows that see none, so that their
        // masked scores (-Infinity) give exp = 0 and their sum 0.
        const rowMax = tf.tidy(() => {
          const max = tf.max(masked, -1, true);
          return hasKeys == null ? max : tf.where(hasKeys, max, tf.zerosLike(max));
        });
        // One block-sized op per step, each freeing its input at once: at
        // most two block-sized tensors are alive (three with dropout's mask).
        let p = consume(masked, s => tf.sub(s, rowMax));
        p = consume(p, tf.exp);
        const sumExp = tf.sum(p, -1, true);
        p = consume(p, e => tf.div(e, tf.maximum(sumExp, 1e-30)));
        const lse = tf.tidy(() => {
          const lse = tf.add(rowMax, tf.log(sumExp)) as tf.Tensor4D;
          return hasKeys == null ? lse : tf.where(hasKeys, lse, tf.fill(lse.shape, -Infinity));
        });
        if (attrs.dropoutRate > 0) {
          const keep = dropoutMask(block, shapes, attrs);
          p = consume(p, x => tf.mul(x, keep));
          keep.dispose();
        }
        const groups = shapes.heads / shapes.headsKV;
        const pGrouped = consume<tf.Tensor4D, tf.Tensor3D>(
            p, x => tf.reshape(x, [batch * shapes.headsKV, groups * block.rows, block.cols]));
        const out = ungroup(tf.matMul(pGrouped, blockColumns(vGrouped, block)), block, shapes);
        return [out, lse];
      });
      outBlocks.push(out);
      lseBlocks.push(lse);
    }
    const out = (outBlocks.length === 1 ? outBlocks[0] : tf.concat(outBlocks, 2));
    const lse = (lseBlocks.length === 1 ? lseBlocks[0] : tf.concat(lseBlocks, 2));
    return [
      tf.transpose(out, [0, 2, 1, 3]) as tf.Tensor4D,
      tf.reshape(lse, [batch, heads, seqQ]) as tf.Tensor3D,
    ];
  });
}
