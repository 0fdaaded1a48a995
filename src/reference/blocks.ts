/**
 * Pieces shared by the composed reference's forward and backward passes.
 *
 * The reference walks the queries in blocks of rows so that no `[B, H, Sq,
 * Sk]` score tensor ever exists: a block holds at most `blockElements`
 * scores (the flag FLASH_ATTENTION_REFERENCE_BLOCK_ELEMENTS), and only the
 * key columns some row of the block can see (causal and window masks cut
 * the rest before any arithmetic).
 *
 * Tensors here use the "grouped" layout `[B * Hk, G * rows, ...]` with
 * `G = H / Hk`: query head `h = hk * G + g` of batch b sits in group
 * `b * Hk + hk`, so one batched matMul serves every query head of a kv head
 * without copying K or V (GQA/MQA).
 */
import * as tf from '@tensorflow/tfjs-core';

import type {AttentionShapes} from '../checks';
import {fillDropoutMask} from '../dropout';
import type {FlashAttentionAttrs} from '../kernel_names';

/**
 * The shapes plus, when the call has per-batch lengths, the kernels'
 * `[B, 2]` int32 seqlens tensor (on the device: its masks are built with
 * tfjs ops, never read back). Batch row b then has only seqlenQ_b query rows
 * and seqlenK_b keys, and its diagonal is `i + seqlenK_b - seqlenQ_b`.
 */
export interface ReferenceShapes extends AttentionShapes {
  seqlens?: tf.Tensor|null;
}

export interface QueryBlock {
  row0: number;
  rows: number;
  /** Key columns [col0, col0 + cols) that some row of the block may see. */
  col0: number;
  cols: number;
}

/** The keys query row i may see: [lo, hi], clamped to [0, Sk - 1]. */
export function visibleKeys(
    i: number, shapes: AttentionShapes, attrs: FlashAttentionAttrs): [number, number] {
  const diagonal = i + shapes.seqK - shapes.seqQ;
  const lo = attrs.windowLeft < 0 ? 0 : Math.max(0, diagonal - attrs.windowLeft);
  const hi = attrs.windowRight < 0 ? shapes.seqK - 1 :
                                     Math.min(shapes.seqK - 1, diagonal + attrs.windowRight);
  return [lo, hi];
}

/** `[B, 1, 1, 1]` int32: column `column` (0: seqlenQ, 1: seqlenK) of seqlens. */
function lengthOf(shapes: ReferenceShapes, column: number): tf.Tensor {
  return tf.reshape(tf.slice(shapes.seqlens!, [0, column], [-1, 1]), [shapes.batch, 1, 1, 1]);
}

/**
 * `[B or 1, 1, rows, 1]` int32: the diagonal key of rows `i` with per-batch
 * lengths: each row's own `i + seqlenK_b - seqlenQ_b`, or the padded
 * `i + Sk - Sq` for key padding masks (FlashAttentionAttrs.paddedDiagonal).
 */
function diagonalWithLengths(
    i: tf.Tensor, shapes: ReferenceShapes, attrs: FlashAttentionAttrs): tf.Tensor {
  return attrs.paddedDiagonal === true ?
      tf.add(i, tf.scalar(shapes.seqK - shapes.seqQ, 'int32')) :
      tf.sub(tf.add(i, lengthOf(shapes, 1)), lengthOf(shapes, 0));
}

/** `[1, 1, rows, 1]` and `[1, 1, 1, cols]` int32: a block's row and key indices. */
function blockIndices(block: QueryBlock): [tf.Tensor, tf.Tensor] {
  return [
    tf.reshape(tf.range(block.row0, block.row0 + block.rows, 1, 'int32'), [1, 1, block.rows, 1]),
    tf.reshape(tf.range(block.col0, block.col0 + block.cols, 1, 'int32'), [1, 1, 1, block.cols]),
  ];
}

/**
 * `[B, 1, rows, cols]` bool: which keys of a block each row of each batch
 * row sees, from the per-batch lengths (ReferenceShapes.seqlens).
 */
function visibleWithLengths(
    block: QueryBlock, shapes: ReferenceShapes, attrs: FlashAttentionAttrs): tf.Tensor4D {
  return tf.tidy(() => {
    const [seqQ, seqK] = [lengthOf(shapes, 0), lengthOf(shapes, 1)];
    const [i, j] = blockIndices(block);
    const diagonal = diagonalWithLengths(i, shapes, attrs);
    let ok = tf.logicalAnd(tf.less(i, seqQ), tf.less(j, seqK));
    if (attrs.windowLeft >= 0) {
      ok = tf.logicalAnd(ok, tf.greaterEqual(j, tf.sub(diagonal, attrs.windowLeft)));
    }
    if (attrs.windowRight >= 0) {
      ok = tf.logicalAnd(ok, tf.lessEqual(j, tf.add(diagonal, attrs.windowRight)));
    }
    return ok as tf.Tensor4D;
  });
}

/** Splits the queries into blocks of at most `blockElements` scores. */
export function planQueryBlocks(
    shapes: ReferenceShapes, attrs: FlashAttentionAttrs, blockElements: number): QueryBlock[] {
  const scoresPerRow = shapes.batch * shapes.heads * shapes.seqK;
  const rowsPerBlock = Math.max(1, Math.min(shapes.seqQ, Math.floor(blockElements / scoresPerRow)));
  const blocks: QueryBlock[] = [];
  for (let row0 = 0; row0 < shapes.seqQ; row0 += rowsPerBlock) {
    const rows = Math.min(rowsPerBlock, shapes.seqQ - row0);
    if (shapes.seqlens != null) {
      // Each batch row has its own diagonal: every block spans every key
      // (the masks come from the lengths, on the device).
      blocks.push({row0, rows, col0: 0, cols: shapes.seqK});
      continue;
    }
    // Visible ranges move monotonically with i, so the first and last rows
    // bound the block's columns.
    const [lo] = visibleKeys(row0, shapes, attrs);
    const [, hi] = visibleKeys(row0 + rows - 1, shapes, attrs);
    blocks.push({row0, rows, col0: lo, cols: Math.max(0, hi - lo + 1)});
  }
  return blocks;
}

/**
 * `[rows, cols]` bool mask of a block: true where the key is visible; null
 * when the whole block is visible. Masking selects (never adds), so a
 * masked score, whatever its value (1e38, Inf, NaN), never reaches the
 * softmax.
 */
export function visibleMask(
    block: QueryBlock, shapes: ReferenceShapes, attrs: FlashAttentionAttrs): tf.Tensor|null {
  if (shapes.seqlens != null) {  // [B, 1, rows, cols]
    return visibleWithLengths(block, shapes, attrs);
  }
  const values = new Uint8Array(block.rows * block.cols);
  let all = true;
  for (let r = 0; r < block.rows; r++) {
    const [lo, hi] = visibleKeys(block.row0 + r, shapes, attrs);
    for (let c = 0; c < block.cols; c++) {
      const j = block.col0 + c;
      const visible = j >= lo && j <= hi;
      values[r * block.cols + c] = visible ? 1 : 0;
      all = all && visible;
    }
  }
  return all ? null : tf.tensor2d(values, [block.rows, block.cols], 'bool');
}

/** `[1 or B, 1, rows, 1]` bool: does the row see at least one key? */
export function rowsWithKeys(
    block: QueryBlock, shapes: ReferenceShapes, attrs: FlashAttentionAttrs): tf.Tensor4D|null {
  if (shapes.seqlens != null) {
    return tf.tidy(() => tf.any(visibleWithLengths(block, shapes, attrs), 3, true) as tf.Tensor4D);
  }
  const values = new Uint8Array(block.rows);
  let all = true;
  for (let r = 0; r < block.rows; r++) {
    const [lo, hi] = visibleKeys(block.row0 + r, shapes, attrs);
    values[r] = lo <= hi ? 1 : 0;
    all = all && lo <= hi;
  }
  return all ? null : tf.tensor4d(values, [1, 1, block.rows, 1], 'bool');
}

/**
 * Replaces `t` by `f(t)` (same rank) and frees `t` at once, to bound peak
 * memory.
 */
export function consume<T extends tf.Tensor, R extends tf.Tensor = T>(
    t: T, f: (t: T) => tf.Tensor): R {
  const next = tf.tidy(() => f(t)) as R;
  t.dispose();
  return next;
}

/** Query rows of a block in the grouped layout: `[B*Hk, G*rows, D]`. */
export function groupedRows(
    x: tf.Tensor4D, block: QueryBlock, shapes: AttentionShapes): tf.Tensor3D {
  // x is [B, H, S, X]; view it as [B*Hk, G, S, X] and take the block's rows.
  const groups = shapes.heads / shapes.headsKV;
  const width = x.shape[3];
  return tf.tidy(() => {
    const grouped = tf.reshape(x, [shapes.batch * shapes.headsKV, groups, shapes.seqQ, width]);
    return tf.reshape(
        tf.slice(grouped, [0, 0, block.row0, 0], [-1, -1, block.rows, -1]),
        [shapes.batch * shapes.headsKV, groups * block.rows, width]);
  });
}

/** Key/value columns of a block: `[B*Hk, cols, X]` from `[B*Hk, Sk, X]`. */
export function blockColumns(x: tf.Tensor3D, block: QueryBlock): tf.Tensor3D {
  return tf.slice(x, [0, block.col0, 0], [-1, block.cols, -1]);
}

/** `[B*Hk, G*rows, X]` -> `[B, H, rows, X]`. */
export function ungroup(x: tf.Tensor3D, block: QueryBlock, shapes: AttentionShapes): tf.Tensor4D {
  return tf.reshape(x, [shapes.batch, shapes.heads, block.rows, x.shape[2]]);
}

/** `[B, H, rows, X]` -> `[B*Hk, G*rows, X]`. */
export function regroup(x: tf.Tensor4D, block: QueryBlock, shapes: AttentionShapes): tf.Tensor3D {
  const groups = shapes.heads / shapes.headsKV;
  return tf.reshape(x, [shapes.batch * shapes.headsKV, groups * block.rows, x.shape[3]]);
}

export interface BlockScores {
  /** Final scores before masking, `[B, H, rows, cols]`. */
  scores: tf.Tensor4D;
  /** `tanh(s / softcap)` when softcap is on (for its derivative). */
  capTanh: tf.Tensor4D|null;
}

/**
 * Scores of a block in the order of docs/design.md, "Semantics": scale, softcap, ALiBi.
 * `qRows` is `[B*Hk, G*rows, D]`, `kCols` is `[B*Hk, cols, D]`.
 */
export function blockScores(
    qRows: tf.Tensor3D, kCols: tf.Tensor3D, alibiSlopes: tf.Tensor|null, block: QueryBlock,
    shapes: AttentionShapes, attrs: FlashAttentionAttrs, keepCapTanh: boolean): BlockScores {
  const cap = attrs.softcap;
  // With softcap, fold 1/softcap into the scale: tanh(scale * qk / cap).
  const scale = cap > 0 ? attrs.softmaxScale / cap : attrs.softmaxScale;
  // Scale the (small) query rows rather than the scores. tfjs counts the
  // bytes of every tensor, reshaped aliases included, so each block-sized
  // tensor is handed on with `consume` and freed as soon as it is used.
  const grouped: tf.Tensor3D =
      tf.tidy(() => tf.matMul(tf.mul(qRows, scale) as tf.Tensor3D, kCols, false, true));
  let scores = consume<tf.Tensor3D, tf.Tensor4D>(grouped, g => ungroup(g, block, shapes));
  let capTanh: tf.Tensor4D|null = null;
  if (cap > 0) {
    scores = consume(scores, s => tf.tanh(s));
    if (keepCapTanh) {
      capTanh = scores.clone();
    }
    scores = consume(scores, t => tf.mul(t, cap));
  }
  if (alibiSlopes != null) {
    const bias = alibiBias(alibiSlopes, block, shapes, attrs);
    scores = consume(scores, s => tf.add(s, bias));
    bias.dispose();
  }
  return {scores, capTanh};
}

/**
 * `-slope * |i + Sk - Sq - j|` of a block, `[B or 1, H, rows, cols]` (with
 * per-batch lengths, each batch row's own diagonal).
 */
function alibiBias(
    alibiSlopes: tf.Tensor, block: QueryBlock, shapes: ReferenceShapes,
    attrs: FlashAttentionAttrs): tf.Tensor4D {
  return tf.tidy(() => {
    let distance: tf.Tensor;
    if (shapes.seqlens != null) {
      const [i, j] = blockIndices(block);
      distance = tf.cast(tf.abs(tf.sub(diagonalWithLengths(i, shapes, attrs), j)), 'float32');
    } else {
      const values = new Float32Array(block.rows * block.cols);
      for (let r = 0; r < block.rows; r++) {
        const diagonal = block.row0 + r + shapes.seqK - shapes.seqQ;
        for (let c = 0; c < block.cols; c++) {
          values[r * block.cols + c] = Math.abs(diagonal - (block.col0 + c));
        }
      }
      distance = tf.tensor2d(values, [block.rows, block.cols]);
    }
    const slopes = alibiSlopes.rank === 1 ?
        tf.reshape(alibiSlopes, [1, shapes.heads, 1, 1]) :
        tf.reshape(alibiSlopes, [shapes.batch, shapes.heads, 1, 1]);
    return tf.mul(tf.neg(slopes), distance) as tf.Tensor4D;
  });
}

/** Replaces masked entries of `x` by `fill` (-Infinity for scores). */
export function maskScores(x: tf.Tensor4D, visible: tf.Tensor|null, fill = -Infinity): tf.Tensor4D {
  return visible == null ?
      x :
      consume(x, s => tf.where(visible, s, tf.scalar(fill) as tf.Tensor as tf.Tensor4D));
}

/**
 * Probabilities `exp(scores - lse)` of a block. `lse` is `[B, H, rows, 1]`
 * and -Infinity for rows that see no key. Masked scores are -Infinity, so
 * their exp is exactly 0 without another select.
 */
export function probabilitiesFromLse(
    maskedScores: tf.Tensor4D, lse: tf.Tensor4D, hasKeys: tf.Tensor4D|null): tf.Tensor4D {
  return tf.tidy(() => {
    const finiteLse = hasKeys == null ? lse : tf.where(hasKeys, lse, tf.zerosLike(lse));
    return tf.exp(tf.sub(maskedScores, finiteLse)) as tf.Tensor4D;
  });
}

/** The scaled keep-mask of dropout for a block, `[B, H, rows, cols]`. */
export function dropoutMask(
    block: QueryBlock, shapes: AttentionShapes, attrs: FlashAttentionAttrs): tf.Tensor4D {
  const {batch, heads} = shapes;
  const perHead = block.rows * block.cols;
  const values = new Float32Array(batch * heads * perHead);
  for (let b = 0; b < batch; b++) {
    for (let h = 0; h < heads; h++) {
      fillDropoutMask(
          values, (b * heads + h) * perHead, attrs.seedLo, attrs.seedHi, attrs.dropoutRate, b, h,
          block.row0, block.rows, block.col0, block.cols);
    }
  }
  return tf.tensor4d(values, [batch, heads, block.rows, block.cols]);
}

/** q/k/v from `[B, S, H, X]` to the grouped `[B*Hk, S, X]` (k, v) layout. */
export function keysGrouped(x: tf.Tensor4D): tf.Tensor3D {
  const [batch, seq, heads, width] = x.shape;
  return tf.tidy(() => tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [batch * heads, seq, width]));
}

/** `[B, S, H, X]` -> `[B, H, S, X]`. */
export function headsFirst(x: tf.Tensor4D): tf.Tensor4D {
  return tf.transpose(x, [0, 2, 1, 3]);
}
