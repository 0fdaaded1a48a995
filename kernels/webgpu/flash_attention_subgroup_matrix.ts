/**
 * The subgroup-matrix (tensor core) forward of the webgpu backend: plans a
 * tiling from the device's matrix configuration and runs the two-pass
 * kernel (flash_attention_subgroup_matrix_two_pass_webgpu.ts, the default:
 * O stays in matrix accumulators) or, when the override forces it, the
 * one-pass kernel (flash_attention_subgroup_matrix_webgpu.ts) or the
 * storage-loaded two-pass kernel (flash_attention_subgroup_matrix_storage_webgpu.ts
 * after the pre-pass of flash_attention_subgroup_matrix_split_webgpu.ts). Used by the
 * fused forward (FlashAttention.ts) whenever `planMatrixForward` returns a
 * plan; else the SIMT kernels run.
 */
/// <reference types="@webgpu/types" />
import * as tf from '@tensorflow/tfjs-core';
import type {WebGPUBackend} from '@tensorflow/tfjs-backend-webgpu';

import {FLASH_ATTENTION_TENSOR_CORES} from '../../src/flags';
import type {FlashAttentionAttrs} from '../../src/kernel_names';

import {MatrixForwardConfig, matrixForwardKey, matrixForwardWGSL, MATRIX_FORWARD_UNIFORMS, matrixTileSizes, matrixWorkgroupBytes} from './flash_attention_subgroup_matrix_webgpu';
import type {MatrixGradTiles} from './flash_attention_grad_subgroup_matrix_webgpu';
import type {MatrixDkdvTiles} from './flash_attention_grad_subgroup_matrix_dkdv_webgpu';
import {TwoPassForwardConfig, twoPassForwardKey, twoPassForwardWGSL, twoPassTileSizes, twoPassWorkgroupBytes} from './flash_attention_subgroup_matrix_two_pass_webgpu';
import {OPERAND_SPLIT_UNIFORMS, operandPartElements, OperandSplitConfig, operandSplitKey, OperandSplitPlace, operandSplitUniforms, operandSplitWGSL} from './flash_attention_subgroup_matrix_split_webgpu';
import {STORAGE_FORWARD_UNIFORMS, StorageForwardConfig, storageForwardKey, storageForwardWGSL, storageWorkgroupBytes} from './flash_attention_subgroup_matrix_storage_webgpu';
import {forwardOutputs, forwardUniformValues} from './forward_shared';
import {dispatchGrid, packUniforms, runOwnPipeline} from './own_pipeline';
import {MatrixDiagnosis, MatrixShape, pickSubgroupMatrixShape, unvalidatedTensorCoresAllowed} from './subgroup_matrix';
import {scoreOptionsFromAttrs} from './wgsl_snippets';

/**
 * Testing and benchmarking: `off` keeps the SIMT kernels; `shape` forces a
 * matrix shape (a stand-in on devices without the feature); `subgroups` and
 * `bc` force the tiling.
 */
export interface MatrixForwardOverride {
  off?: boolean;
  shape?: MatrixShape;
  subgroups?: number;
  bc?: number;
  /**
   * The forward's kernel: 'twoPass' (the default; O in matrix registers,
   * flash_attention_subgroup_matrix_two_pass_webgpu.ts), 'online' (the
   * first kernel, one pass with O rescaled through workgroup memory) or
   * 'storage' (the two-pass kernel loading Q, K, V matrices from storage,
   * split by a pre-pass; flash_attention_subgroup_matrix_storage_webgpu.ts).
   */
  forwardTiling?: MatrixForwardTiling;
  /** Two-pass kernel: blocks of M query rows per subgroup. */
  rowBlocks?: number;
  /**
   * Storage-loaded kernel: Q's matrices loaded from storage at each use
   * instead of held in registers (fewer registers: 2 row blocks at D=128).
   */
  reloadQ?: boolean;
  /**
   * Two-pass kernels: pass 1 finds the row maxima only, pass 2 sums P and
   * O is normalised on the way out (no exponentials in pass 1).
   */
  rowMaxOnly?: boolean;
  /** The backward's tiling (flash_attention_grad_subgroup_matrix.ts). */
  gradTiles?: MatrixGradTiles;
  /**
   * The backward's dK/dV pass: 'perTile' (the default: the first
   * kernel's, whose tiling `gradTiles` forces) or 'accumulated' (dK, dV in
   * matrix accumulators).
   */
  gradTiling?: 'accumulated'|'perTile';
  /** The accumulated dK/dV pass's tiling. */
  gradDkdvTiles?: MatrixDkdvTiles;
  /** Hardware checks: the SIMT forward with the matrix backward. */
  forwardOff?: boolean;
  /** Hardware checks: diagnosis flags on the device's matrix shape. */
  diagnose?: MatrixDiagnosis;
}
let override: MatrixForwardOverride|null = null;
export function setMatrixForwardOverride(o: MatrixForwardOverride|null): void {
  override = o;
}
export function getMatrixOverride(): MatrixForwardOverride|null {
  return override;
}

/**
 * The matrix shape the tensor-core kernels use on this device, or null
 * (path off: no opt-in, no feature, or forced off). The real matrix
 * built-ins only when the user opts in; tests force a stand-in shape
 * through the override.
 */
export function matrixShapeFor(device: GPUDevice): MatrixShape|null {
  if (override?.off) {
    return null;
  }
  if (override?.shape != null) {
    return override.diagnose != null ? {...override.shape, diagnose: override.diagnose} :
                                       override.shape;
  }
  if (!tf.env().getBool(FLASH_ATTENTION_TENSOR_CORES)) {
    return null;
  }
  const shape = pickSubgroupMatrixShape(device);
  if (shape != null && !unvalidatedTensorCoresAllowed()) {
    warnUnvalidatedOnce();
    return null;
  }
  return shape != null && override?.diagnose != null ? {...shape, diagnose: override.diagnose} :
                                                       shape;
}

let warnedUnvalidated = false;
/** Says once why the opt-in has no effect (wrong results beat no speed-up in no case). */
function warnUnvalidatedOnce(): void {
  if (!warnedUnvalidated) {
    warnedUnvalidated = true;
    console.warn(
        `${FLASH_ATTENTION_TENSOR_CORES}: the subgroup-matrix kernels are correct on ` +
        'tensor-core hardware but still slower than the float32 SIMT kernels, which run ' +
        'instead (docs/tensor_cores.md)');
  }
}

export type MatrixForwardTiling = 'twoPass'|'online'|'storage';

export interface MatrixForwardPlan {
  tiling: MatrixForwardTiling;
  shape: MatrixShape;
  subgroups: number;
  /** Two-pass kernels: blocks of M rows per subgroup (1 for 'online'). */
  rowBlocks: number;
  bc: number;
  split: boolean;
  /** Storage-loaded kernel: Q's matrices reloaded at each use. */
  reloadQ?: boolean;
  /** Two-pass kernels: pass 1 finds row maxima only. */
  rowMaxOnly?: boolean;
}

/**
 * Two-pass workgroup shapes tried in order: (subgroups, row blocks per
 * subgroup, keys per tile). More query rows per workgroup first: each K
 * and V tile is loaded from global memory and split once per workgroup.
 */
const TWO_PASS_TILINGS: Array<[number, number, number]> = [
  [4, 2, 32],
  [8, 1, 32],
  [4, 1, 64],
  [4, 1, 32],
  [2, 2, 32],
  [2, 1, 32],
  [4, 1, 16],
  [2, 1, 16],
  [1, 1, 16],
];

/**
 * 32-bit registers per lane that the two-pass kernel's long-lived matrices
 * (Q's left matrices and O's accumulators) may take, at most: beyond about
 * half the register file the per-tile temporaries spill.
 */
const MAX_MATRIX_REGISTERS = 128;

/** Registers per lane of a subgroup's Q matrices (unless reloaded) and O accumulators. */
function twoPassMatrixRegisters(
    shape: MatrixShape, headDim: number, headDimV: number, rowBlocks: number, split: boolean,
    reloadQ: boolean): number {
  const {M, N, K, lanes} = shape;
  const q = reloadQ ? 0 : rowBlocks * (headDim / K) * (split ? 2 : 1) * (M * K / lanes / 2);
  const o = rowBlocks * (headDimV / N) * (M * N / lanes);
  return q + o;
}

/** One-pass workgroup shapes tried in order: (subgroups, keys per tile). */
const MATRIX_TILINGS: Array<[number, number]> = [
  [4, 64],
  [4, 32],
  [2, 64],
  [2, 32],
  [4, 16],
  [2, 16],
  [1, 32],
  [1, 16],
];

/**
 * Do `threads` invocations and `bytes` of workgroup memory fit the
 * device's workgroup limits (the planners' last test of a tiling)?
 */
export function fitsWorkgroup(limits: GPUSupportedLimits, threads: number, bytes: number): boolean {
  return threads <= limits.maxComputeInvocationsPerWorkgroup &&
      threads <= limits.maxComputeWorkgroupSizeX && bytes <= limits.maxComputeWorkgroupStorageSize;
}

/** Dispatches of the matrix forward (lets tests check that it ran). */
export const matrixForwardStats = {
  dispatches: 0,
  /** Of which the two-pass kernel's. */
  twoPassDispatches: 0,
  /** Of which the storage-loaded kernel's (not counting its pre-pass). */
  storageDispatches: 0,
  /** The storage-loaded kernel's pre-pass dispatches (1 per call: Q, K and V). */
  splitDispatches: 0,
};

/**
 * The tiling for this device and call, or null (no feature, no f16 x f16
 * -> f32 configuration, head dims the configuration cannot tile, or no
 * tiling within the device's workgroup memory).
 */
export function planMatrixForward(
    device: GPUDevice, headDim: number, headDimV: number, precision: string): MatrixForwardPlan|
    null {
  const shape = override?.forwardOff ? null : matrixShapeFor(device);
  if (shape == null) {
    return null;
  }
  const split = precision !== 'float16';
  if (override?.forwardTiling !== 'online') {
    return planTwoPass(
        device, headDim, headDimV, shape, split, override?.forwardTiling === 'storage');
  }
  const tilings = override?.subgroups != null || override?.bc != null ?
      [[override.subgroups ?? 2, override.bc ?? 32] as [number, number]] :
      MATRIX_TILINGS;
  const limits = device.limits;
  for (const [subgroups, bc] of tilings) {
    const c = {headDim, headDimV, shape, subgroups, bc, split};
    const sizes = matrixTileSizes(c);
    if (sizes == null) {
      continue;
    }
    const bytes = matrixWorkgroupBytes({
      ...c,
      score: scoreOptionsFromAttrs({softcap: 0, windowLeft: -1, windowRight: -1}, false),
      alibiMode: 0,
      dropout: false,
      reverseRows: false
    });
    if (fitsWorkgroup(limits, sizes.threads, bytes)) {
      return {tiling: 'online', shape, subgroups, rowBlocks: 1, bc, split};
    }
  }
  return null;
}

/** A two-pass tiling: operands staged in workgroup memory, or loaded from storage. */
function planTwoPass(
    device: GPUDevice, headDim: number, headDimV: number, shape: MatrixShape, split: boolean,
    storage: boolean): MatrixForwardPlan|null {
  const forced = override?.subgroups != null || override?.bc != null || override?.rowBlocks != null;
  const tilings = forced ?
      [[override!.subgroups ?? 2, override!.rowBlocks ?? 1,
        override!.bc ?? 32] as [number, number, number]] :
      TWO_PASS_TILINGS;
  const limits = device.limits;
  const reloadQ = storage && override?.reloadQ === true;
  for (const [subgroups, rowBlocks, bc] of tilings) {
    const c = {headDim, headDimV, shape, subgroups, rowBlocks, bc, split};
    const sizes = twoPassTileSizes(c);
    if (sizes == null ||
        (!forced && !shape.standIn &&
         twoPassMatrixRegisters(shape, headDim, headDimV, rowBlocks, split, reloadQ) >
             MAX_MATRIX_REGISTERS)) {
      continue;
    }
    const bytes = storage ? storageWorkgroupBytes(c) : twoPassWorkgroupBytes(c);
    if (fitsWorkgroup(limits, sizes.threads, bytes)) {
      const rowMaxOnly = override?.rowMaxOnly === true;
      return storage ?
          {tiling: 'storage', shape, subgroups, rowBlocks, bc, split, reloadQ, rowMaxOnly} :
          {tiling: 'twoPass', shape, subgroups, rowBlocks, bc, split, rowMaxOnly};
    }
  }
  return null;
}

/** Runs the matrix forward (the plan's one-pass or two-pass kernel): returns [out, lse]. */
export function matrixForwardWebGPU(
    backend: WebGPUBackend, inputs: Record<string, tf.TensorInfo>, attrs: FlashAttentionAttrs,
    plan: MatrixForwardPlan): tf.TensorInfo[] {
  const {q, k, v, alibiSlopes} = inputs;
  const [batch, seqQ, heads, headDim] = q.shape;
  const headDimV = v.shape[3];
  const hasAlibi = alibiSlopes != null && tf.util.sizeFromShape(alibiSlopes.shape) > 0;
  const score = scoreOptionsFromAttrs(attrs, hasAlibi);
  const config: MatrixForwardConfig = {
    headDim,
    headDimV,
    shape: plan.shape,
    subgroups: plan.subgroups,
    bc: plan.bc,
    split: plan.split,
    score,
    alibiMode: !hasAlibi               ? 0 :
        alibiSlopes.shape.length === 1 ? 1 :
                                         2,
    dropout: attrs.dropoutRate > 0,
    reverseRows: score.windowRight && !score.windowLeft,
  };
  if (plan.tiling === 'storage') {
    return storageForwardWebGPU(backend, inputs, attrs, {
      ...config,
      rowBlocks: plan.rowBlocks,
      reloadQ: plan.reloadQ === true,
      rowMaxOnly: plan.rowMaxOnly === true
    });
  }
  let br: number;
  let program: {key: string, label: string, code: () => string};
  if (plan.tiling === 'twoPass') {
    const twoPass: TwoPassForwardConfig = {
      ...config,
      rowBlocks: plan.rowBlocks,
      rowMaxOnly: plan.rowMaxOnly === true
    };
    br = twoPassTileSizes(twoPass)!.br;
    program = {
      key: twoPassForwardKey(twoPass),
      label: 'FlashAttention two-pass forward (subgroup matrices)',
      code: () => twoPassForwardWGSL(twoPass),
    };
  } else {
    br = matrixTileSizes(config)!.br;
    program = {
      key: matrixForwardKey(config),
      label: 'FlashAttention forward (subgroup matrices)',
      code: () => matrixForwardWGSL(config),
    };
  }
  const numQTiles = Math.ceil(seqQ / br);
  const totalGroups = numQTiles * heads * batch;
  const grid = dispatchGrid(totalGroups, backend.device.limits.maxComputeWorkgroupsPerDimension);
  const uniforms = packUniforms(MATRIX_FORWARD_UNIFORMS, {
    ...forwardUniformValues(q, k, attrs, numQTiles, totalGroups, grid[0]),
    one: 1,
  });
  const bound = hasAlibi ? [q, k, v, alibiSlopes] : [q, k, v];
  matrixForwardStats.dispatches++;
  if (plan.tiling === 'twoPass') {
    matrixForwardStats.twoPassDispatches++;
  }
  return runForwardKernel(backend, program, bound, q, v, uniforms, grid);
}

/** Records the attention kernel `program` on the `bound` inputs: returns [out, lse]. */
function runForwardKernel(
    backend: WebGPUBackend, program: {key: string, label: string, code: () => string},
    bound: tf.TensorInfo[], q: tf.TensorInfo, v: tf.TensorInfo, uniforms: ArrayBuffer,
    grid: [number, number, number]): tf.TensorInfo[] {
  return runOwnPipeline(
      backend, {
        ...program,
        numInputs: bound.length,
        numOutputs: 2,
        hasUniforms: true,
      },
      {
        inputs: bound,
        outputs: forwardOutputs(q, v),
        uniforms,
        dispatch: grid,
      });
}

/**
 * Where the pre-pass puts Q, K and V ([B, S, H, D] each) in `ops` and
 * `scales` (flash_attention_subgroup_matrix_split_webgpu.ts): Q in scale
 * tiles of M rows padded to BR rows, K and V in tiles of BC keys padded to
 * BC; `elements` and `scaleCount` are the two buffers' lengths, `groups`
 * the pre-pass's workgroups.
 */
export function storageOperandPlaces(
    qShape: number[], kShape: number[], vShape: number[],
    config: Pick<
        TwoPassForwardConfig, 'headDim'|'headDimV'|'shape'|'subgroups'|'rowBlocks'|'bc'|'split'>):
    {places: OperandSplitPlace[], elements: number, scaleCount: number, groups: number} {
  const {br, bc} = twoPassTileSizes(config)!;
  const seqQPad = Math.ceil(qShape[1] / br) * br;
  const seqKPad = Math.ceil(kShape[1] / bc) * bc;
  let elements = 0;
  let scaleCount = 0;
  let groups = 0;
  const operands: Array<[number[], number, number]> =
      [[qShape, config.shape.M, seqQPad], [kShape, bc, seqKPad], [vShape, bc, seqKPad]];
  const places = operands.map(([[b, seq, h, dim], rows, seqPad]) => {
    const size = b * h * seqPad * dim;
    const tiles = seqPad / rows;
    const place: OperandSplitPlace = {
      seq,
      heads: h,
      seqPad,
      tiles,
      rows,
      d4: dim / 4,
      hiOff: elements,
      loOff: elements + (config.split ? size : 0),
      scaleOff: scaleCount,
      groupStart: groups,
    };
    elements += (config.split ? 2 : 1) * size;
    scaleCount += b * h * tiles;
    groups += b * h * tiles;
    return place;
  });
  return {places, elements, scaleCount, groups};
}

/**
 * The storage-loaded forward: the pre-pass splits Q (scale tiles of M
 * rows, padded to BR), K and V (tiles of BC keys, padded to BC) into
 * float16 matrices in one storage buffer, then the attention kernel reads
 * them. The split operands are freed once the kernel is recorded.
 */
function storageForwardWebGPU(
    backend: WebGPUBackend, inputs: Record<string, tf.TensorInfo>, attrs: FlashAttentionAttrs,
    config: StorageForwardConfig): tf.TensorInfo[] {
  const {q, k, v, alibiSlopes} = inputs;
  const [batch, , heads] = q.shape;
  const {br} = twoPassTileSizes(config)!;
  const {places, elements, scaleCount, groups} =
      storageOperandPlaces(q.shape, k.shape, v.shape, config);
  const [qp, kp, vp] = places;
  const seqQPad = qp.seqPad;
  const seqKPad = kp.seqPad;
  const opsBytes = elements * (config.shape.standIn ? 4 : 2);
  const maxBinding = backend.device.limits.maxStorageBufferBindingSize;
  tf.util.assert(
      opsBytes <= maxBinding && elements < 2 ** 31,
      () => `FlashAttention storage-loaded forward: the split operands take ${
          opsBytes} bytes, more than maxStorageBufferBindingSize (${maxBinding})`);
  const limit = backend.device.limits.maxComputeWorkgroupsPerDimension;
  const splitGrid = dispatchGrid(groups, limit);
  const splitConfig: OperandSplitConfig = {shape: config.shape, split: config.split};
  matrixForwardStats.splitDispatches++;
  const [ops, scales] = runOwnPipeline(
      backend, {
        key: operandSplitKey(splitConfig),
        label: 'FlashAttention operand split (subgroup matrices)',
        code: () => operandSplitWGSL(splitConfig),
        numInputs: 3,
        numOutputs: 2,
        hasUniforms: true,
      },
      {
        inputs: [q, k, v],
        outputs: [
          {shape: [operandPartElements(config.shape, elements)], dtype: 'float32'},
          {shape: [scaleCount], dtype: 'float32'},
        ],
        uniforms: packUniforms(
            OPERAND_SPLIT_UNIFORMS, operandSplitUniforms(places, groups, splitGrid[0])),
        dispatch: splitGrid,
      });
  const numQTiles = seqQPad / br;
  const totalGroups = numQTiles * heads * batch;
  const grid = dispatchGrid(totalGroups, limit);
  const uniforms = packUniforms(STORAGE_FORWARD_UNIFORMS, {
    ...forwardUniformValues(q, k, attrs, numQTiles, totalGroups, grid[0]),
    one: 1,
    seqQPad,
    seqKPad,
    qhOff: qp.hiOff,
    qlOff: qp.loOff,
    khOff: kp.hiOff,
    klOff: kp.loOff,
    vhOff: vp.hiOff,
    vlOff: vp.loOff,
    qsOff: qp.scaleOff,
    ksOff: kp.scaleOff,
    vsOff: vp.scaleOff,
  });
  const bound = config.alibiMode !== 0 ? [ops, scales, alibiSlopes] : [ops, scales];
  matrixForwardStats.dispatches++;
  matrixForwardStats.storageDispatches++;
  try {
    const program = {
      key: storageForwardKey(config),
      label: 'FlashAttention storage-loaded forward (subgroup matrices)',
      code: () => storageForwardWGSL(config),
    };
    return runForwardKernel(backend, program, bound, q, v, uniforms, grid);
  } finally {
    backend.disposeData(ops.dataId);
    backend.disposeData(scales.dataId);
  }
}
