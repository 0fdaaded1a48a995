/**
 * KVCache: the keys and values of one attention layer during generation,
 * kept in two preallocated tf.Variables `[B, Smax, Hk, D]` and filled step
 * by step by flashAttentionWithKVCache (in place on WebGPU).
 *
 * Lifetime: the cache owns its variables from construction to dispose();
 * tensors returned by `keys()`/`values()` are views the caller disposes.
 * The valid lengths live on the host (no readback per step).
 */
import * as tf from '@tensorflow/tfjs-core';

import {flashAttentionWithKVCache, FlashAttentionWithKVCacheOptions, flashAttentionWithKVCachePacked, flashDecodeOutOrNull, flashDecodeQKVOrNull} from './ops_kv_cache';

export interface KVCacheArgs {
  batch: number;
  /** Capacity in tokens (Smax). */
  maxSeqLen: number;
  headsKV: number;
  headDim: number;
  /** Head dim of the values; defaults to headDim. */
  headDimV?: number;
}

export type KVCacheAttendOptions = Omit<FlashAttentionWithKVCacheOptions, 'k'|'v'|'cacheSeqlens'>;

export class KVCache {
  readonly batch: number;
  readonly maxSeqLen: number;
  readonly headsKV: number;
  readonly headDim: number;
  readonly headDimV: number;
  private kVar: tf.Variable<tf.Rank.R4>|null;
  private vVar: tf.Variable<tf.Rank.R4>|null;
  private lengths: number[];
  /** Tensors a decoding layer keeps for this cache's lifetime (constant). */
  private readonly constants = new Map<string, tf.Tensor>();

  constructor(args: KVCacheArgs) {
    const {batch, maxSeqLen, headsKV, headDim} = args;
    const headDimV = args.headDimV ?? headDim;
    for (const [name, value] of Object.entries({batch, maxSeqLen, headsKV, headDim, headDimV})) {
      if (!Number.isInteger(value) || value < 1) {
        throw new Error(`KVCache: ${name} must be a positive integer, got ${String(value)}`);
      }
    }
    this.batch = batch;
    this.maxSeqLen = maxSeqLen;
    this.headsKV = headsKV;
    this.headDim = headDim;
    this.headDimV = headDimV;
    // Variables made from fresh zeros own their data alone once the zeros
    // are disposed, which is what lets the WebGPU kernel write in place.
    this.kVar = KVCache.zerosVariable([batch, maxSeqLen, headsKV, headDim]);
    this.vVar = KVCache.zerosVariable([batch, maxSeqLen, headsKV, headDimV]);
    this.lengths = new Array(batch).fill(0);
  }

  private static zerosVariable(shape: [number, number, number, number]): tf.Variable<tf.Rank.R4> {
    const zeros = tf.zeros(shape);
    const variable = tf.variable(zeros, false) as tf.Variable<tf.Rank.R4>;
    zeros.dispose();
    return variable;
  }

  private live(): [tf.Variable<tf.Rank.R4>, tf.Variable<tf.Rank.R4>] {
    if (this.kVar == null || this.vVar == null) {
      throw new Error('KVCache: the cache has been disposed');
    }
    return [this.kVar, this.vVar];
  }

  /** Valid tokens per batch row. */
  get seqlens(): number[] {
    return this.lengths.slice();
  }

  /** Valid tokens (the same for every row once filled by `attend`). */
  get length(): number {
    return Math.max(...this.lengths);
  }

  /** The key cache variable `[B, Smax, Hk, D]` (owned by the cache). */
  get kCache(): tf.Variable<tf.Rank.R4> {
    return this.live()[0];
  }

  /** The value cache variable `[B, Smax, Hk, Dv]` (owned by the cache). */
  get vCache(): tf.Variable<tf.Rank.R4> {
    return this.live()[1];
  }

  /**
   * Appends `k`, `v` `[B, Snew, Hk, D]` and returns the attention of `q`
   * `[B, Sq, H, D]` over everything cached so far (with the new keys).
   */
  attend(q: tf.Tensor4D, k: tf.Tensor4D, v: tf.Tensor4D, opts: KVCacheAttendOptions = {}):
      tf.Tensor4D {
    const [kCache, vCache] = this.live();
    const seqNew = k.shape[1];
    this.checkRoom(seqNew);
    const out =
        flashAttentionWithKVCache(
            q, kCache, vCache,
            {...opts, k, v, cacheSeqlens: this.lengths, returnSoftmaxLse: false}) as tf.Tensor4D;
    this.lengths = this.lengths.map(n => n + seqNew);
    return out;
  }

  /**
   * `attend` for a fused projection's output: the q, k and v heads of the
   * new tokens side by side in `qkv [B, Snew, heads + 2 Hk, D]`
   * (flashAttentionWithKVCachePacked: on webgpu no split of it is made).
   */
  attendPacked(qkv: tf.Tensor4D, heads: number, opts: KVCacheAttendOptions = {}): tf.Tensor4D {
    const [kCache, vCache] = this.live();
    const seqNew = qkv.shape[1];
    this.checkRoom(seqNew);
    const out = flashAttentionWithKVCachePacked(
        qkv, kCache, vCache, heads, {...opts, cacheSeqlens: this.lengths});
    this.lengths = this.lengths.map(n => n + seqNew);
    return out;
  }

  /**
   * `attendPacked` from the projection's input: `x [B * Snew, K]` (batch
   * major) times the packed qkv projection `w [K, (heads + 2 Hk) D]` (+
   * `bias`), rotated with `opts`' tables and appended, in one kernel where
   * there is one (flashDecodeQKVOrNull), then attention over the caches,
   * and with `outProj` (`w [heads Dv, N]`, bias) the output projection,
   * merged into attention's second pass where a kernel does it
   * (flashDecodeOutOrNull). Returns the projected `y [B * Snew, N]`, or
   * the attention `out` to project; null, with nothing done, where the
   * first kernel does not run: project and call `attendPacked` instead.
   */
  attendProjected(
      x: tf.Tensor2D, w: tf.Tensor2D, bias: tf.Tensor1D|null, heads: number,
      opts: KVCacheAttendOptions = {},
      outProj: {w: tf.Tensor2D, bias: tf.Tensor1D|null}|null = null): {y: tf.Tensor2D}|
      {out: tf.Tensor4D}|null {
    const [kCache, vCache] = this.live();
    const seqNew = x.shape[0] / this.batch;
    this.checkRoom(seqNew);
    const {rotaryCos, rotarySin, rotaryInterleaved, ...attention} = opts;
    const rotary = rotaryCos == null || rotarySin == null ?
        null :
        {cos: rotaryCos, sin: rotarySin, interleaved: rotaryInterleaved ?? false};
    const q = flashDecodeQKVOrNull(
        {x, w, bias, heads, kCache, vCache, cacheSeqlens: this.lengths, rotary});
    if (q == null) {
      return null;
    }
    // The new keys are in the caches: attention over the longer prefix.
    const after = this.lengths.map(n => n + seqNew);
    try {
      const y = outProj == null ?
          null :
          flashDecodeOutOrNull(q, kCache, vCache, after, attention, outProj.w, outProj.bias);
      const result = y != null ? {y} : {
        out: flashAttentionWithKVCache(
                 q, kCache, vCache, {...attention, cacheSeqlens: after, returnSoftmaxLse: false}) as
            tf.Tensor4D
      };
      this.lengths = after;
      return result;
    } finally {
      q.dispose();
    }
  }

  private checkRoom(seqNew: number): void {
    if (this.length + seqNew > this.maxSeqLen) {
      throw new Error(`KVCache: ${seqNew} new tokens do not fit: ${this.length} of maxSeqLen = ${
          this.maxSeqLen} are used`);
    }
  }

  /** Forgets the cached tokens (the memory stays allocated). */
  reset(): void {
    this.live();
    this.lengths = new Array(this.batch).fill(0);
  }

  /**
   * A constant tensor a decoding layer needs at every step (e.g. its ALiBi
   * slopes), made by `make` on first use and kept until the cache is
   * disposed: a step then uploads nothing.
   */
  constant<T extends tf.Tensor>(key: string, make: () => T): T {
    this.live();
    let t = this.constants.get(key);
    if (t == null || t.isDisposed) {
      t = tf.keep(make());
      this.constants.set(key, t);
    }
    return t as T;
  }

  /** Frees both variables; the cache cannot be used afterwards. */
  dispose(): void {
    this.constants.forEach(t => t.dispose());
    this.constants.clear();
    this.kVar?.dispose();
    this.vVar?.dispose();
    this.kVar = null;
    this.vVar = null;
  }

  get isDisposed(): boolean {
    return this.kVar == null;
  }
}
