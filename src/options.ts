/**
 * The public options of the flashAttention ops and their normalization into
 * kernel attributes (DESIGN.md §2).
 */
import type {Tensor} from '@tensorflow/tfjs-core';

import {randomSeed, splitSeed} from './dropout';
import type {FlashAttentionAttrs} from './kernel_names';

export interface FlashAttentionOptions {
  /** Causal mask, aligned to the bottom-right when `Sq != Sk`. */
  causal?: boolean;
  /** Multiplies q.k; defaults to `1 / sqrt(headDim)`. */
  softmaxScale?: number;
  /**
   * `[left, right]`: query i sees keys in
   * `[i + Sk - Sq - left, i + Sk - Sq + right]`; -1 = unbounded.
   */
  windowSize?: [number, number];
  /** Soft-capping of the scores: `softcap * tanh(s / softcap)`; 0 = off. */
  softcap?: number;
  /**
   * ALiBi slopes, `[H]` or `[B, H]` float32: adds
   * `-slope * |i + Sk - Sq - j|` to each score. Not differentiated (its
   * gradient is zero, as in flash_attn).
   */
  alibiSlopes?: Tensor;
  /** Attention dropout probability in [0, 1); 0 (the default) = off. */
  dropoutRate?: number;
  /**
   * Seed of the dropout mask (integer in [0, 2^53)). The same seed gives the
   * same mask on every backend. A random one is drawn when absent.
   */
  seed?: number;
  /** Also return the softmax log-sum-exp, `[B, H, Sq]`. */
  returnSoftmaxLse?: boolean;
  /**
   * 'float32' (the default): results within float32 accuracy bounds on
   * every backend. 'float16': where the WebGPU tensor-core path runs
   * (docs/tensor_cores.md), one float16 matrix product with float32
   * accumulation, faster, with the error bound documented there; other
   * kernels ignore it and stay float32.
   */
  precision?: 'float32'|'float16';
}

/** Validates the scalar options and resolves defaults into kernel attrs. */
export function normalizeOptions(
    opts: FlashAttentionOptions, headDim: number,
    opName: string): FlashAttentionAttrs {
  const causal = opts.causal ?? false;
  if (typeof causal !== 'boolean') {
    throw new Error(`${opName}: causal must be a boolean, got ${
        describeValue(causal)}`);
  }
  const softmaxScale = opts.softmaxScale ?? 1 / Math.sqrt(headDim);
  if (typeof softmaxScale !== 'number' || !Number.isFinite(softmaxScale)) {
    throw new Error(`${opName}: softmaxScale must be a finite number, got ${
        describeValue(opts.softmaxScale)}`);
  }
  const softcap = opts.softcap ?? 0;
  if (typeof softcap !== 'number' || !Number.isFinite(softcap) ||
      softcap < 0) {
    throw new Error(`${opName}: softcap must be a finite number >= 0 (0 = off), got ${
        describeValue(opts.softcap)}`);
  }
  const dropoutRate = opts.dropoutRate ?? 0;
  if (typeof dropoutRate !== 'number' || !(dropoutRate >= 0) ||
      !(dropoutRate < 1)) {
    throw new Error(`${opName}: dropoutRate must be a number in [0, 1), got ${
        describeValue(opts.dropoutRate)}`);
  }
  const seed = opts.seed ?? randomSeed();
  if (typeof seed !== 'number' || !Number.isInteger(seed) || seed < 0 ||
      seed >= 2 ** 53) {
    throw new Error(`${opName}: seed must be an integer in [0, 2^53), got ${
        describeValue(opts.seed)}`);
  }
  let [windowLeft, windowRight] = normalizeWindow(opts.windowSize, opName);
  if (causal) {
    windowRight = 0;  // flash_attn: causal is a window whose right edge is 0.
  }
  const precision = opts.precision ?? 'float32';
  if (precision !== 'float32' && precision !== 'float16') {
    throw new Error(`${opName}: precision must be 'float32' or 'float16', got ${
        describeValue(opts.precision)}`);
  }
  const {seedLo, seedHi} = splitSeed(seed);
  return {
    softmaxScale,
    causal,
    windowLeft,
    windowRight,
    softcap,
    dropoutRate,
    seedLo,
    seedHi,
    precision,
  };
}

function normalizeWindow(
    windowSize: [number, number]|undefined, opName: string): [number, number] {
  if (windowSize == null) {
    return [-1, -1];
  }
  const valid = Array.isArray(windowSize) && windowSize.length === 2 &&
      windowSize.every(w => Number.isInteger(w) && w >= -1);
  if (!valid) {
    throw new Error(`${opName}: windowSize must be [left, right] with integers >= -1 (-1 = unbounded), got ${
        describeValue(windowSize)}`);
  }
  return [windowSize[0], windowSize[1]];
}

/** A short rendering of a user value for error messages. */
export function describeValue(value: unknown): string {
  if (Array.isArray(value)) {
    return `[${value.map(describeValue).join(', ')}]`;
  }
  if (typeof value === 'string') {
    return JSON.stringify(value);
  }
  return String(value);
}
