/**
 * Rotary position embedding (RoPE) on `[B, S, H, D]` tensors, as in
 * flash_attn's RotaryEmbedding: the first `rotaryDim` features of each head
 * are rotated by position-dependent angles, the rest pass through.
 */
import * as tf from '@tensorflow/tfjs-core';
import {fusedRotaryOrNull} from 'tfjs-flash-attention';

/**
 * cos and sin tables `[S, rotaryDim / 2]`: angle(p, i) = p * base^(-2i/rotaryDim).
 * Built in float64 on the host so long sequences keep accurate angles.
 */
function rotaryTables(seq: number, rotaryDim: number, base: number): [tf.Tensor2D, tf.Tensor2D] {
  const half = rotaryDim / 2;
  const cos = new Float32Array(seq * half);
  const sin = new Float32Array(seq * half);
  for (let i = 0; i < half; i++) {
    const invFreq = Math.pow(base, -(2 * i) / rotaryDim);
    for (let p = 0; p < seq; p++) {
      cos[p * half + i] = Math.cos(p * invFreq);
      sin[p * half + i] = Math.sin(p * invFreq);
    }
  }
  return [tf.tensor2d(cos, [seq, half]), tf.tensor2d(sin, [seq, half])];
}

/**
 * The cos/sin tables of one layer, kept between calls: building them on the
 * host and uploading them on every call was a visible part of a GPT training
 * step's JavaScript time (benchmarks/RESULTS.md, FlashMHA training).
 * Holds the tables of the longest sequence seen; shorter ones are slices.
 * The owner calls dispose().
 */
export class RotaryTables {
  private seq = 0;
  private tables: [tf.Tensor2D, tf.Tensor2D]|null = null;

  constructor(readonly rotaryDim: number, readonly base: number) {}

  /** Tables for positions 0..seq-1 (slices are the caller's to dispose). */
  get(seq: number): [tf.Tensor2D, tf.Tensor2D] {
    if (this.tables == null || seq > this.seq || this.tables[0].isDisposed) {
      this.dispose();
      this.tables = rotaryTables(seq, this.rotaryDim, this.base)
                        .map(t => tf.keep(t)) as [tf.Tensor2D, tf.Tensor2D];
      this.seq = seq;
    }
    if (seq === this.seq) {
      return this.tables;
    }
    const half = this.rotaryDim / 2;
    return this.tables.map(t => tf.slice(t, [0, 0], [seq, half])) as [tf.Tensor2D, tf.Tensor2D];
  }

  /**
   * Tables for at least positions 0..seq-1, without a slice when the kept
   * ones are longer (kernels that index them by position need no more).
   */
  covering(seq: number): [tf.Tensor2D, tf.Tensor2D] {
    if (this.tables != null && seq <= this.seq && !this.tables[0].isDisposed) {
      return this.tables;
    }
    return this.get(seq);
  }

  dispose(): void {
    if (this.tables != null) {
      tf.dispose(this.tables);
      this.tables = null;
      this.seq = 0;
    }
  }
}

/**
 * Rotates `x [B, S, H, D]` at positions 0..S-1. `interleaved`: pairs are
 * (0,1), (2,3)... (GPT-J); otherwise (i, i + rotaryDim/2) (GPT-NeoX).
 * Differentiable: the fused FusedRotary kernel where the backend has one,
 * else slices, products and concats. `cache`: the
 * caller's tables, else they are built for this call.
 */
export function applyRotary(
    x: tf.Tensor4D, rotaryDim: number, base: number, interleaved: boolean,
    cache?: RotaryTables): tf.Tensor4D {
  return tf.tidy(() => {
    const [batch, seq, heads, headDim] = x.shape;
    const half = rotaryDim / 2;
    const [cosTable, sinTable] =
        cache != null && cache.rotaryDim === rotaryDim && cache.base === base ?
        cache.get(seq) :
        rotaryTables(seq, rotaryDim, base);
    // One kernel forward and one backward where the backend has it.
    const fused = fusedRotaryOrNull(x, cosTable, sinTable, rotaryDim, interleaved);
    if (fused != null) {
      return fused;
    }
    // [S, 1, half] broadcasts over batch and heads.
    const cos = tf.reshape(cosTable, [seq, 1, half]);
    const sin = tf.reshape(sinTable, [seq, 1, half]);
    const rotated = tf.slice(x, [0, 0, 0, 0], [batch, seq, heads, rotaryDim]);
    let x1: tf.Tensor;
    let x2: tf.Tensor;
    if (interleaved) {
      const pairs = tf.reshape(rotated, [batch, seq, heads, half, 2]);
      [x1, x2] = tf.unstack(pairs, 4);
    } else {
      [x1, x2] = tf.split(rotated, 2, 3);
    }
    const y1 = tf.sub(tf.mul(x1, cos), tf.mul(x2, sin));
    const y2 = tf.add(tf.mul(x2, cos), tf.mul(x1, sin));
    const y = interleaved ? tf.reshape(tf.stack([y1, y2], 4), [batch, seq, heads, rotaryDim]) :
                            tf.concat([y1, y2], 3);
    if (rotaryDim === headDim) {
      return y as tf.Tensor4D;
    }
    const rest = tf.slice(x, [0, 0, 0, rotaryDim], [batch, seq, heads, headDim - rotaryDim]);
    return tf.concat([y, rest], 3) as tf.Tensor4D;
  });
}
