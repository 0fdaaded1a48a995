/**
 * What both forward kernels (the SIMT one of FlashAttention.ts and the
 * subgroup-matrix one of flash_attention_subgroup_matrix.ts) share: the
 * runtime values of their uniform blocks (each adds its own fields) and
 * their outputs.
 */
import * as tf from '@tensorflow/tfjs-core';

import {dropoutThreshold} from '../../src/dropout';
import type {FlashAttentionAttrs} from '../../src/kernel_names';

import type {OwnOutput} from './own_pipeline';

/**
 * Shapes, grid and options of one forward call: `numQTiles` query tiles
 * per (batch, head), `totalGroups` workgroups on a grid `gridX` wide.
 */
export function forwardUniformValues(
    q: tf.TensorInfo, k: tf.TensorInfo, attrs: FlashAttentionAttrs, numQTiles: number,
    totalGroups: number, gridX: number): Record<string, number> {
  const [, seqQ, heads] = q.shape;
  const [, seqK, headsKV] = k.shape;
  const dropout = attrs.dropoutRate > 0;
  return {
    seqQ,
    seqK,
    heads,
    groups: heads / headsKV,
    headsKV,
    numQTiles,
    totalGroups,
    gridX,
    scale: attrs.softmaxScale,
    softcap: attrs.softcap,
    left: attrs.windowLeft,
    right: attrs.windowRight,
    seedLo: attrs.seedLo,
    seedHi: attrs.seedHi,
    threshold: dropout ? dropoutThreshold(attrs.dropoutRate) : 0,
    keepScale: dropout ? 1 / (1 - attrs.dropoutRate) : 1,
  };
}

/** The forward's outputs: out [B, Sq, H, Dv] and lse [B, H, Sq]. */
export function forwardOutputs(q: tf.TensorInfo, v: tf.TensorInfo): OwnOutput[] {
  const [batch, seqQ, heads] = q.shape;
  return [
    {shape: [batch, seqQ, heads, v.shape[3]], dtype: 'float32'},
    {shape: [batch, heads, seqQ], dtype: 'float32'},
  ];
}
