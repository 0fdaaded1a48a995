/**
 * The subgroup-matrix (tensor core) backward of the webgpu backend: plans
 * a tiling from the device's matrix configuration and runs the dK/dV and dQ
 * passes after the SIMT delta pass: those of
 * flash_attention_grad_subgroup_matrix_webgpu.ts, or where the override
 * asks for it ('accumulated') the dK/dV pass of
 * flash_attention_grad_subgroup_matrix_dkdv_webgpu.ts (dK, dV in matrix
 * accumulators) with the first one's dQ pass. Used by FlashAttentionGrad.ts whenever
 * `planMatrixBackward` returns a plan (the same opt-in as the forward); else the SIMT passes run.
 */
/// <reference types="@webgpu/types" />
import * as tf from '@tensorflow/tfjs-core';
import type {WebGPUBackend} from '@tensorflow/tfjs-backend-webgpu';

import {fitsWorkgroup, matrixShapeFor, getMatrixOverride} from './flash_attention_subgroup_matrix';
import {dkdvKeys, FlashAttentionGradDkdvMatrixProgram, MatrixDkdvConfig, matrixDkdvBytes, MatrixDkdvTiles, matrixDkdvValid} from './flash_attention_grad_subgroup_matrix_dkdv_webgpu';
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

/**
 * Tilings of the accumulated dK/dV pass, tried in order: the most keys and
 * rows that fit (48 KiB on the H100 through Dawn: D=64 split 32 x 32;
 * float16 64 x 32; D=128 split 16 x 16).
 */
const MATRIX_DKDV_TILINGS: MatrixDkdvTiles[] = [
  {subgroups: 4, keyBlocks: 1, br: 32},
  {subgroups: 2, keyBlocks: 1, br: 32},
  {subgroups: 3, keyBlocks: 1, br: 16},
  {subgroups: 2, keyBlocks: 1, br: 16},
  {subgroups: 1, keyBlocks: 1, br: 16},
  {subgroups: 1, keyBlocks: 1, br: 8},
];

/** Dispatches of the matrix backward's passes (tests check that it ran). */
export const matrixGradStats = {
  dispatches: 0,
  /** Of them, the accumulated dK/dV pass's. */
  accumulated: 0,
};

/** The backward's passes: the dQ pass's tiling, and the accumulated dK/dV pass's (or null). */
export interface MatrixBackwardPlan {
  dq: MatrixGradConfig;
  dkdv: MatrixDkdvConfig|null;
}

/** The accumulated dK/dV pass's configuration that fits the device, or null. */
function planDkdv(
    device: GPUDevice, base: Omit<MatrixDkdvConfig, keyof MatrixDkdvTiles>): MatrixDkdvConfig|null {
  const forced = getMatrixOverride()?.gradDkdvTiles;
  const limits = device.limits;
  for (const tiles of forced != null ? [forced] : MATRIX_DKDV_TILINGS) {
    const c: MatrixDkdvConfig = {...base, ...tiles};
    const threads = base.shape.lanes * tiles.subgroups;
    if (matrixDkdvValid(c) && fitsWorkgroup(limits, threads, matrixDkdvBytes(c))) {
      return c;
    }
  }
  return null;
}

/** The backward's configuration for this device and call, or null. */
export function planMatrixBackward(
    device: GPUDevice, headDim: number, headDimV: number, precision: string): MatrixBackwardPlan|
    null {
  const dq = planPerTile(device, headDim, headDimV, precision);
  if (dq == null) {
    return null;
  }
  // The accumulated pass is forcible only: on the H100 it was no faster
  // (docs/tensor_cores.md, "The backward with matrix accumulators").
  if (getMatrixOverride()?.gradTiling !== 'accumulated') {
    return {dq, dkdv: null};
  }
  const dkdv = planDkdv(device, {headDim, headDimV, shape: dq.shape, split: dq.split});
  return dkdv == null ? null : {dq, dkdv};
}

/** The first kernel's tiling (its dQ pass, and its dK/dV pass where asked for). */
function planPerTile(device: GPUDevice, headDim: number, headDimV: number, precision: string):
    MatrixGradConfig|null {
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
    const bytes = Math.max(matrixGradBytes(c, 'dkdv'), matrixGradBytes(c, 'dq'));
    if (matrixGradValid(c) && fitsWorkgroup(limits, threads, bytes)) {
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
    backend: WebGPUBackend, inputs: tf.TensorInfo[], stats: tf.TensorInfo, plan: MatrixBackwardPlan,
    features: GradFeatures, uniforms: ArrayBuffer): tf.TensorInfo[] {
  const config = plan.dq;
  const [q, k, v, dy, ...slopes] = inputs;
  const [batch, seqQ, heads] = q.shape;
  const [, seqK, headsKV] = k.shape;
  const bound = [q, k, v, dy, stats, ...slopes];
  const dkdvProgram = plan.dkdv != null ?
      new FlashAttentionGradDkdvMatrixProgram(plan.dkdv, features) :
      new FlashAttentionGradMatrixProgram(config, 'dkdv', features);
  const keys = plan.dkdv != null ? dkdvKeys(plan.dkdv) : config.bc;
  const [dk, dv] = runOwnPipeline(backend, dkdvProgram, {
    inputs: bound,
    outputs: [{shape: k.shape, dtype: 'float32'}, {shape: v.shape, dtype: 'float32'}],
    uniforms,
    dispatch: [Math.ceil(seqK / keys), batch * headsKV, 1],
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
  matrixGradStats.accumulated += plan.dkdv != null ? 1 : 0;
  return [dq, dk, dv];
}
