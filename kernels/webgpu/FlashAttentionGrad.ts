/**
 * The fused FlashAttentionGrad kernel of the webgpu backend: the
 * FlashAttention-2 backward in three passes over tfjs's GPU buffers,
 *   1. Delta = rowsum(dO * O) - dLse, stored next to lse    [B, H, Sq, 2]
 *   2. dK, dV by key blocks (query heads of a group summed in the workgroup)
 *   3. dQ by query blocks
 * recomputing P from the saved lse: nothing of size [Sq, Sk] is stored.
 * Deterministic: every sum has a fixed order and there are no atomics.
 *
 * tfjs-backend-webgpu is an optional peer: only its types are imported.
 */
import * as tf from '@tensorflow/tfjs-core';
import type {WebGPUBackend} from '@tensorflow/tfjs-backend-webgpu';

import type {AttentionShapes} from '../../src/checks';
import {registerFusedKernel} from '../../src/dispatch';
import {FlashAttentionAttrs, FlashAttentionGrad, FlashAttentionGradInputs} from '../../src/kernel_names';
import {sequenceShapes} from '../../src/seqlens';

import {BoundedCache} from './bounded_cache';
import {FlashAttentionGradDeltaProgram} from './flash_attention_grad_delta_webgpu';
import {FlashAttentionGradDkDvSlicedProgram} from './flash_attention_grad_dkdv_sliced_webgpu';
import {FlashAttentionGradDqSlicedProgram} from './flash_attention_grad_dq_sliced_webgpu';
import {DkDvTiles, dkdvStorageBytes, dkdvTilesValid, FlashAttentionGradDkDvProgram} from './flash_attention_grad_dkdv_webgpu';
import {DqTiles, dqStorageBytes, dqTilesValid, FlashAttentionGradDqProgram} from './flash_attention_grad_dq_webgpu';
import {matrixBackwardWebGPU, planMatrixBackward} from './flash_attention_grad_subgroup_matrix';
import {featureKey, GradFeatures, gradFeatures, gradUniforms} from './flash_attention_grad_wgsl';
import {isWebGPUBackend, OwnPipelineSpec, runOwnPipeline} from './own_pipeline';
import {DKDV_SIZES, DQ_SIZES, GRAD_THREADS} from './tuning';

/** The device limits the tile choice depends on. */
export interface GradDeviceLimits {
  maxComputeWorkgroupStorageSize: number;
  maxComputeInvocationsPerWorkgroup: number;
  maxComputeWorkgroupSizeX: number;
}

export interface GradTiles {
  dkdv: DkDvTiles;
  dq: DqTiles;
}

/**
 * Tiles for head dims (d, dv) on a device, or null when even the smallest
 * do not fit its workgroup storage.
 */
export function chooseGradTiles(d: number, dv: number, limits: GradDeviceLimits): GradTiles|null {
  const threads = Math.min(
      GRAD_THREADS, limits.maxComputeInvocationsPerWorkgroup, limits.maxComputeWorkgroupSizeX);
  const storage = limits.maxComputeWorkgroupStorageSize;
  // The first valid tiles, in list order, whose workgroup storage fits.
  const first = <T>(tiles: T[], valid: (t: T) => boolean, bytes: (t: T) => number) =>
      tiles.find(t => valid(t) && bytes(t) <= storage) ?? null;
  const dkdv = first(
      DKDV_SIZES.map(([bc, br]) => ({bc, br, threads})), dkdvTilesValid,
      t => dkdvStorageBytes(t, d, dv));
  const dq = first(
      DQ_SIZES.map(([br, bc]) => ({br, bc, threads})), dqTilesValid, t => dqStorageBytes(t, d, dv));
  return dkdv == null || dq == null ? null : {dkdv, dq};
}

/** Distinct tilings and programs kept before a cache starts over. */
const PROGRAM_CACHE_SIZE = 256;

let tilesOverride: GradTiles|null = null;
/**
 * Benchmarks and tests: force tiles (checked against the device limits
 * like any choice); null restores the automatic choice.
 */
export function setGradTilesOverride(tiles: GradTiles|null): void {
  tf.util.assert(
      tiles == null || (dkdvTilesValid(tiles.dkdv) && dqTilesValid(tiles.dq)),
      () => `setGradTilesOverride: inconsistent tiles ${JSON.stringify(tiles)}`);
  tilesOverride = tiles;
}

/** Automatic tiles by head dims and device limits. */
const tilesCache = new BoundedCache<GradTiles|null>(PROGRAM_CACHE_SIZE);

function tilesFor(d: number, dv: number, limits: GradDeviceLimits): GradTiles|null {
  if (tilesOverride != null) {
    const fits = (tiles: GradTiles) =>
        dkdvStorageBytes(tiles.dkdv, d, dv) <= limits.maxComputeWorkgroupStorageSize &&
        dqStorageBytes(tiles.dq, d, dv) <= limits.maxComputeWorkgroupStorageSize &&
        Math.max(tiles.dkdv.threads, tiles.dq.threads) <= limits.maxComputeInvocationsPerWorkgroup;
    return fits(tilesOverride) ? tilesOverride : null;
  }
  // Both the op's support check and the kernel ask, on every call.
  const key = `${d},${dv},${limits.maxComputeWorkgroupStorageSize},${
      limits.maxComputeInvocationsPerWorkgroup},${limits.maxComputeWorkgroupSizeX}`;
  return tilesCache.get(key, () => chooseGradTiles(d, dv, limits));
}

/** Why the fused backward cannot take a call, or null. */
export function flashAttentionGradSupports(
    tensorShapes: AttentionShapes, attrs: FlashAttentionAttrs, backend: tf.KernelBackend): string|
    null {
  const shapes = sequenceShapes(tensorShapes, attrs);
  if (!isWebGPUBackend(backend)) {
    return 'the active backend is not a tfjs webgpu backend';
  }
  const limits = backend.device.limits;
  const tiles = tilesFor(shapes.headDim, shapes.headDimV, limits);
  if (tiles == null) {
    return `head dims ${shapes.headDim}/${
        shapes.headDimV} need more workgroup storage than the device's ${
        limits.maxComputeWorkgroupStorageSize} bytes`;
  }
  const grid = Math.max(
      Math.ceil(shapes.seqK / tiles.dkdv.bc), Math.ceil(shapes.seqQ / tiles.dq.br),
      shapes.batch * shapes.heads);
  if (grid > limits.maxComputeWorkgroupsPerDimension) {
    return `the backward's grid (${grid} workgroups along one dimension) exceeds the device's ${
        limits.maxComputeWorkgroupsPerDimension}`;
  }
  return null;
}

let gradKernelRuns = 0;
/** How many times the fused backward ran (tests assert it was used). */
export function fusedGradRunCount(): number {
  return gradKernelRuns;
}

/**
 * Is `t` all zeros and still only on the host? tfjs's tape makes such a
 * tensor for the gradient of an output nothing used (here the lse), and
 * uploading it would cost an upload and a buffer per backward call.
 */
function isHostZeros(backend: WebGPUBackend, t: tf.TensorInfo): boolean {
  const data = backend.tensorMap.get(t.dataId);
  if (data == null || data.resource != null || data.values == null) {
    return false;
  }
  const values = data.values as ArrayLike<number>;
  for (let i = 0; i < values.length; i++) {
    if (values[i] !== 0) {
      return false;
    }
  }
  return true;
}

/**
 * The three passes' programs, kept between calls: their constructors put
 * the WGSL together, which is most of a short backward's JavaScript time.
 */
const programCache = new BoundedCache<OwnPipelineSpec>(PROGRAM_CACHE_SIZE);

function cachedProgram<T extends OwnPipelineSpec>(key: string, make: () => T): T {
  return programCache.get(key, make) as T;
}

/** The passes' programs for one call (the delta pass's grid is per shape). */
function gradPrograms(
    shapes: AttentionShapes, tiles: GradTiles, features: GradFeatures, hasSeqlens: boolean,
    zeroDLse: boolean, packedBatch: number) {
  const {headDim: d, headDimV: dv} = shapes;
  const f = featureKey(features);
  const deltaKey = `delta ${shapes.batch},${shapes.heads},${shapes.seqQ},${dv},${+ hasSeqlens},${
      + zeroDLse},${packedBatch}`;
  const {dkdv, dq} = tiles;
  return {
    delta: cachedProgram(
        deltaKey,
        () => new FlashAttentionGradDeltaProgram(shapes, hasSeqlens, zeroDLse, packedBatch)),
    dkdv: cachedProgram(
        `dkdv ${d},${dv},${JSON.stringify(dkdv)},${f}`,
        () => dkdv.dimChunks != null ?
            new FlashAttentionGradDkDvSlicedProgram(d, dv, dkdv, features) :
            new FlashAttentionGradDkDvProgram(d, dv, dkdv, features)),
    dq: cachedProgram(
        `dq ${d},${dv},${JSON.stringify(dq)},${f}`,
        () => dq.dimChunks != null ? new FlashAttentionGradDqSlicedProgram(d, dv, dq, features) :
                                     new FlashAttentionGradDqProgram(d, dv, dq, features)),
  };
}

function flashAttentionGradWebGPU(
    {inputs, backend, attrs}:
        {inputs: tf.NamedTensorInfoMap, backend: unknown, attrs?: tf.NamedAttrMap}):
    tf.TensorInfo[] {
  const webgpu = backend as WebGPUBackend;
  const a = attrs as unknown as FlashAttentionAttrs;
  const {dy, dLse, q, k, v, out, softmaxLse, alibiSlopes, seqlens, cuSeqlensK} =
      inputs as unknown as FlashAttentionGradInputs;
  // The tensors' rows, and the sequences (differ for a packed varlen call).
  const [rowsB, rowsQ, heads, headDim] = q.shape;
  const [, rowsK, headsKV] = k.shape;
  const headDimV = v.shape[3];
  const tensorShapes:
      AttentionShapes = {batch: rowsB, seqQ: rowsQ, seqK: rowsK, heads, headsKV, headDim, headDimV};
  const shapes = sequenceShapes(tensorShapes, a);
  const {batch, seqQ, seqK} = shapes;
  const packedBatch = a.packedBatch! > 0 ? a.packedBatch! : 0;
  const tiles = tilesFor(headDim, headDimV, webgpu.device.limits);
  tf.util.assert(
      tiles != null,
      () => `FlashAttentionGrad: head dims ${headDim}/${
          headDimV} do not fit the device's workgroup storage`);
  const hasAlibi = alibiSlopes != null && tf.util.sizeFromShape(alibiSlopes.shape) > 0;
  const hasSeqlens = seqlens != null && tf.util.sizeFromShape(seqlens.shape) > 0;
  const features = gradFeatures(a, hasAlibi, hasSeqlens);
  const slopes = hasAlibi ? [alibiSlopes!] : [];

  const uniforms = gradUniforms(
      shapes, a, hasAlibi ? alibiSlopes!.shape : [],
      packedBatch > 0 ? {totalQ: rowsQ, totalK: rowsK} : undefined);
  const zeroDLse = isHostZeros(webgpu, dLse);
  // A dropout seed usually changes every call: those uniforms are written.
  const cacheUniforms = a.dropoutRate === 0;
  const programs = gradPrograms(tensorShapes, tiles!, features, hasSeqlens, zeroDLse, packedBatch);
  const deltaProgram = programs.delta;
  // (lse, Delta) per row, then (seqlenQ, seqlenK) per batch row if any
  // (packed: the B + 1 cumulative (cuSeqlensQ, cuSeqlensK)).
  const lengthRows = packedBatch > 0 ? packedBatch + 1 : batch;
  const statsRows = rowsB * heads * rowsQ + (hasSeqlens ? lengthRows : 0);
  const [stats] = runOwnPipeline(webgpu, deltaProgram, {
    inputs: [
      dy, out, zeroDLse ? softmaxLse : dLse, softmaxLse, ...(hasSeqlens ? [seqlens!] : []),
      ...(packedBatch > 0 ? [cuSeqlensK!] : [])
    ],
    outputs: [{shape: [statsRows, 2], dtype: 'float32'}],
    uniforms,
    dispatch: deltaProgram.workgroups,
    cacheUniforms,
  });
  try {
    // Tensor cores (subgroup matrices) where the forward would use them.
    const matrixPlan = hasSeqlens ?
        null :
        planMatrixBackward(webgpu.device, headDim, headDimV, a.precision ?? 'float32');
    if (matrixPlan != null) {
      const result = matrixBackwardWebGPU(
          webgpu, [q, k, v, dy, ...slopes], stats, matrixPlan, features, uniforms);
      gradKernelRuns++;
      return result;
    }
    const [dk, dv] = runOwnPipeline(webgpu, programs.dkdv, {
      inputs: [q, k, v, dy, stats, ...slopes],
      outputs: [{shape: k.shape, dtype: 'float32'}, {shape: v.shape, dtype: 'float32'}],
      uniforms,
      dispatch: [Math.ceil(seqK / tiles!.dkdv.bc), batch * headsKV, 1],
      cacheUniforms,
    });
    let dq: tf.TensorInfo;
    try {
      [dq] = runOwnPipeline(webgpu, programs.dq, {
        inputs: [q, k, v, dy, stats, ...slopes],
        outputs: [{shape: q.shape, dtype: 'float32'}],
        uniforms,
        dispatch: [Math.ceil(seqQ / tiles!.dq.br), batch * heads, 1],
        cacheUniforms,
      });
    } catch (e) {
      webgpu.disposeData(dk.dataId);
      webgpu.disposeData(dv.dataId);
      throw e;
    }
    gradKernelRuns++;
    return [dq, dk, dv];
  } finally {
    webgpu.disposeData(stats.dataId);
  }
}
export const flashAttentionGradWebGPUConfig: tf.KernelConfig = {
  kernelName: FlashAttentionGrad,
  backendName: 'webgpu',
  kernelFunc: flashAttentionGradWebGPU as unknown as tf.KernelFunc,
};

/** Registers the fused backward for the webgpu backend. */
export function registerFlashAttentionGradWebGPU(): void {
  registerFusedKernel(
      flashAttentionGradWebGPUConfig, flashAttentionGradSupports, {seqlens: true, packed: true});
}
