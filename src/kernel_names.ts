/**
 * Kernel names, inputs and attributes of the FlashAttention kernels.
 *
 * Every backend kernel (WGSL, CUDA, the composed reference) sees the same
 * normalized attributes: defaults resolved, `causal` folded into the window,
 * so a kernel never re-derives the semantics of docs/design.md, "Semantics".
 */
import type {NamedTensorInfoMap, TensorInfo} from '@tensorflow/tfjs-core';

/** Forward kernel. Outputs: `[out [B, Sq, H, Dv], softmaxLse [B, H, Sq]]`. */
export const FlashAttention = 'FlashAttention';
/** Backward kernel. Outputs: `[dq, dk, dv]`, shaped like q, k, v. */
export const FlashAttentionGrad = 'FlashAttentionGrad';

export interface FlashAttentionInputs extends NamedTensorInfoMap {
  q: TensorInfo;
  k: TensorInfo;
  v: TensorInfo;
  /** `[H]` or `[B, H]`; absent when ALiBi is off. */
  alibiSlopes?: TensorInfo;
  /**
   * `[B, 2]` int32 (seqlenQ_b, seqlenK_b); shape `[0]` or absent when every
   * batch row uses the whole Sq and Sk. Only kernels registered with
   * `{seqlens: true}` (registerFusedKernel) receive a non-empty one.
   */
  seqlens?: TensorInfo;
  /**
   * Packed varlen calls (FlashAttentionAttrs.packedBatch): `[B + 1]` int32
   * cuSeqlensK, while `seqlens` is then `[B + 1]` cuSeqlensQ; shape `[0]`
   * or absent otherwise.
   */
  cuSeqlensK?: TensorInfo;
}

export interface FlashAttentionGradInputs extends NamedTensorInfoMap {
  /** Gradient of the loss with respect to `out`. */
  dy: TensorInfo;
  /** Gradient of the loss with respect to `softmaxLse`, `[B, H, Sq]`. */
  dLse: TensorInfo;
  q: TensorInfo;
  k: TensorInfo;
  v: TensorInfo;
  out: TensorInfo;
  softmaxLse: TensorInfo;
  alibiSlopes?: TensorInfo;
  seqlens?: TensorInfo;
  cuSeqlensK?: TensorInfo;
}

/**
 * Normalized attributes. A plain object of numbers and booleans so that it
 * passes through `engine.runKernel` and the gradient tape unchanged.
 */
export interface FlashAttentionAttrs {
  /** Multiplies q.k before softcap; default `1 / sqrt(D)` already applied. */
  softmaxScale: number;
  /** True when the caller asked for causal (informative: windowRight is 0). */
  causal: boolean;
  /** Keys before the diagonal a query sees; -1 = unbounded. */
  windowLeft: number;
  /** Keys after the diagonal a query sees; -1 = unbounded; 0 when causal. */
  windowRight: number;
  /** 0 = off; else scores become `softcap * tanh(s / softcap)`. */
  softcap: number;
  /** Probability of dropping an attention weight; 0 = off. */
  dropoutRate: number;
  /** Low and high 32 bits of the dropout seed (the Philox key). */
  seedLo: number;
  seedHi: number;
  /**
   * 'float32' (default) or 'float16': the matrix products of kernels that
   * use f16 hardware (WebGPU subgroup matrices) with one f16 product
   * instead of the float32-accurate split; ignored elsewhere.
   */
  precision?: 'float32'|'float16';
  /**
   * True when the call has per-batch lengths (the `seqlens` input). Lets
   * dispatch keep such calls away from fused kernels that ignore them.
   */
  hasSeqlens?: boolean;
  /**
   * With seqlens: the causal/window/ALiBi diagonal stays at the padded
   * `i + Sk - Sq` (a key padding mask hides keys, it does not move them)
   * instead of each batch row's own `i + seqlenK_b - seqlenQ_b` (varlen).
   */
  paddedDiagonal?: boolean;
  /**
   * Packed varlen layout (flashAttentionVarlen), when > 0: the number of
   * sequences B. q, k, v (and out, dq, dk, dv) are then `[1, totalQ or
   * totalK, H, D]`, sequence b's rows starting at its cumulative length;
   * the inputs `seqlens` and `cuSeqlensK` are the `[B + 1]` int32
   * cuSeqlensQ and cuSeqlensK; lse is `[1, H, totalQ]`. Only kernels
   * registered with `{packed: true}` take such calls (the reference has no
   * packed layout).
   */
  packedBatch?: number;
  /** With packedBatch: the longest query and key sequence (rows past are cut). */
  maxSeqlenQ?: number;
  maxSeqlenK?: number;
}

/**
 * Inference-only attention over a KV cache (flash_attn_with_kvcache).
 * Inputs: q, kCache, vCache, optional k, v (new rows, appended in place at
 * `cacheSeqlens`), alibiSlopes, rotaryCos and rotarySin. Outputs:
 * `[out, softmaxLse]`.
 */
export const FlashAttentionKVCache = 'FlashAttentionKVCache';

export interface FlashAttentionKVCacheAttrs extends FlashAttentionAttrs {
  /** Valid cache rows per batch row before this call's new keys. */
  cacheSeqlens: number[];
  /**
   * With the inputs rotaryCos and rotarySin (`[Sro, rotaryDim / 2]`), the
   * kernel rotates q and the new keys itself, at rows `cacheSeqlens[b] + s`
   * (q at `cacheSeqlens[b]` for every row when `rotaryQSameRow`).
   */
  rotaryInterleaved?: boolean;
  rotaryQSameRow?: boolean;
  /**
   * Set when the input q is a packed projection `[B, Snew, H + 2 Hk, D]`
   * (q, k, v heads side by side, no k or v input): the number of q heads H.
   * Every fused kernel of FlashAttentionKVCache must take this layout
   * (flashAttentionWithKVCachePacked sends it to any fused kernel).
   */
  packedHeads?: number;
}

/**
 * The first pass of a decode step from a layer's (normalized) input,
 * inference only: the packed qkv projection, rotary on the q and k heads,
 * and the append of the new keys and values to the caches in place.
 * Inputs `{x [B * Snew, K], w [K, (H + 2 Hk) D], bias, rotaryCos,
 * rotarySin, kCache, vCache}` (absent ones given as x); output
 * `[q [B, Snew, H, D]]`.
 */
export const FlashDecodeQKV = 'FlashDecodeQKV';

export interface FlashDecodeQKVAttrs {
  heads: number;
  /** Valid cache rows per batch row before this step: where its keys go. */
  cacheSeqlens: number[];
  hasBias: boolean;
  hasRotary: boolean;
  rotaryInterleaved: boolean;
}

/**
 * Split-KV attention of a decode step's q over the caches (the step's keys
 * already in them, as FlashDecodeQKV writes them) and the layer's output
 * projection, inference only. Inputs `{q [B, Sq, H, D], kCache, vCache,
 * alibiSlopes?, w [H Dv, N], bias}` (bias given as q when absent); attrs
 * those of FlashAttentionKVCache (cacheSeqlens: the valid rows, new ones
 * included) plus `hasBias`; output `[y [B * Sq, N]]`.
 */
export const FlashDecodeOut = 'FlashDecodeOut';
