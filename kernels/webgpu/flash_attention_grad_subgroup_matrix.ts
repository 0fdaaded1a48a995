/**
 * The subgroup-matrix (tensor core) backward of the webgpu backend: plans
 * a tiling from the device's matrix configuration and runs the dK/dV and dQ
 * passes of flash_attention_grad_subgroup_matrix_webgpu.ts after the SIMT
 * delta pass. Used by FlashAttentionGrad.ts whenever `planMatrixBackward`
 * returns a plan (the same opt-in as the forward); else the SIMT passes run.
 */
/// <reference types="@webgpu/types" />
import * as tf from '@tensorflow/tfjs-core';
import type {WebGPUBackend} from '@tensorflow/tfjs-backend-webgpu';

import {matrixShapeFor, getMatrixOverride} from './flash_attention_subgroup_matrix';
import {FlashAttentionGradMatrixProgram, MatrixGradConfig, matrixGradBytes, MatrixGradTiles, matrixGradValid} from './flash_attention_grad_subgroup_matrix_webgpu';
import type {GradFeatures} from './flash_attention_grad_wgsl';
import {runOwnPipeline} from './own_pipeline';

/** Tilings tried in order (the first valid one that fits the device). */
const MATRIX_GRAD_TILINGS: MatrixGradTiles[] = [
  {subgroups: 4, br: 32, bc: 32},
  {subgroups: 4, br: 16, bc: 32},
  {subgroups: 2, br: 16, bc: 32},
  {subgroups: 4, br: 16, bc: 16},
  {subgroups: 2, br: 16, bc: 16},
  {subgroups: 2, br: 8, bc: 16},
  {subgroups: 1, br: 16, bc: 16},
  {subgroups: 1, br: 8, bc: 8},
];

/** Dispatches of the matrix backward's passes (tests check that it ran). */
export const matrixGradStats = {
  dispatches: 0
};

/** The backward's configuration for this device and call, or null. */
export function planMatrixBackward(
    device: GPUDevice, headDim: number, headDimV: number, precision: string): MatrixGradConfig|
    null {
  const shape = matrixShapeFor(device);
  if (shape == null) {
    return null;
  }
  const forced = getMatrixOverride()?.gradTiles;
  const limits = device.limits;
  for (const tiles of forced != null ? [forced] : MATRIX_GRAD_TILINGS) {
    const c:
        MatrixGradConfig = {...tiles, headDim, headDimV, shape, split: precision !== 'float16'};
    const threads = shape.lanes * tiles.subgroups;
    if (matrixGradValid(c) && threads <= limits.maxComputeInvocationsPerWorkgroup &&
        threads <= limits.maxComputeWorkgroupSizeX &&
        Math.max(matrixGradBytes(c, 'dkdv'), matrixGradBytes(c, 'dq')) <=
            limits.maxComputeWorkgroupStorageSize) {
      return c;
    }
  }
  return null;
}

/**
 * Runs the dK/dV and dQ passes on the delta pass's `stats`: returns
 * [dq, dk, dv].
 */
export function matrixBackwardWebGPU(
    backend: WebGPUBackend, inputs: tf.TensorInfo[], stats: tf.TensorInfo, config: MatrixGradConfig,
    features: GradFeatures, uniforms: ArrayBuffer): tf.TensorInfo[] {
  const [q, k, v, dy, ...slopes] = inputs;
  const [batch, seqQ, heads] = q.shape;
  const [, seqK, headsKV] = k.shape;
  const bound = [q, k, v, dy, stats, ...slopes];
  const [dk, dv] =
      runOwnPipeline(backend, new FlashAttentionGradMatrixProgram(config, 'dkdv', features), {
        inputs: bound,
        outputs: [{shape: k.shape, dtype: 'float32'}, {shape: v.shape, dtype: 'float32'}],
        uniforms,
        dispatch: [Math.ceil(seqK / config.bc), batch * headsKV, 1],
      });
  let dq: tf.TensorInfo;
  try {
    [dq] = runOwnPipeline(backend, new FlashAttentionGradMatrixProgram(config, 'dq', features), {
      inputs: bound,
      outputs: [{shape: q.shape, dtype: 'float32'}],
      uniforms,
      dispatch: [Math.ceil(seqQ / config.br), batch * heads, 1],
    });
  } catch (e) {
    backend.disposeData(dk.dataId);
    backend.disposeData(dv.dataId);
    throw e;
  }
  matrixGradStats.dispatches += 2;
  return [dq, dk, dv];
}
