/**
 * The fused FlashAttentionGrad kernel of the webgpu backend: the
 * FlashAttention-2 backward in three passes over tfjs's GPU buffers,
 *   1. Delta = rowsum(dO * O) - dLse, stored next to lse    [B, H, Sq, 2]
 *   2. dK, dV by key blocks (query heads of a group summed in the workgroup)
 *   3. dQ by query blocks
 * recomputing P from the saved lse: nothing of size [Sq, Sk] is stored,
 * unless the plan has the dS scratch (GradTiles.dsScratch): then pass 2
 * also stores dS, which pass 3 reads instead of recomputing it, for chunks
 * of (batch, kv head) pairs whose scratch fits DS_SCRATCH_BUDGET_BYTES.
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
import {isZeroLseGradient} from '../../src/zero_gradients';

import {BoundedCache} from './bounded_cache';
import {FlashAttentionGradDeltaProgram} from './flash_attention_grad_delta_webgpu';
import {FlashAttentionGradDkDvSlicedProgram} from './flash_attention_grad_dkdv_sliced_webgpu';
import {FlashAttentionGradDqSlicedProgram} from './flash_attention_grad_dq_sliced_webgpu';
import {DkDvTiles, dkdvStorageBytes, dkdvTilesValid, FlashAttentionGradDkDvProgram} from './flash_attention_grad_dkdv_webgpu';
import {DqTiles, dqStorageBytes, dqTilesValid, FlashAttentionGradDqProgram} from './flash_attention_grad_dq_webgpu';
import {matrixBackwardWebGPU, planMatrixBackward} from './flash_attention_grad_subgroup_matrix';
import {featureKey, GradFeatures, gradFeatures, gradUniforms} from './flash_attention_grad_wgsl';
import {KeptCalls} from './kept_calls';
import {isWebGPUBackend, kernelLimits, OwnPipelineSpec, runOwnPipeline} from './own_pipeline';
import {isSoftwareDevice} from './FlashAttention';
import {DKDV_SIZES, DQ_SIZES, DS_SCRATCH_PLANS, dsScratchBudgetForced, getDsScratchBudget, GRAD_THREADS, GRAD_TILINGS} from './tuning';

/** The device limits the tile choice depends on. */
export interface GradDeviceLimits {
  maxComputeWorkgroupStorageSize: number;
  maxComputeInvocationsPerWorkgroup: number;
  maxComputeWorkgroupSizeX: number;
}

export interface GradTiles {
  dkdv: DkDvTiles;
  dq: DqTiles;
  /**
   * The dS scratch (docs/webgpu_tuning.md, "dS scratch"): true, the dK/dV
   * pass stores dS and the dQ pass reads it (where one chunk fits the
   * budget); false, never; unset, as DS_SCRATCH_PLANS say.
   */
  dsScratch?: boolean;
  /** With dsScratch: the chunks' budget in bytes instead of DS_SCRATCH_BUDGET_BYTES. */
  dsScratchBudget?: number;
  /**
   * With dsScratch: the tiles of the dQ pass that reads dS (a plain
   * dS K product, which fits tiles the recomputing pass cannot); unset: `dq`'s.
   */
  dsDq?: DqTiles;
}

/**
 * Tiles for head dims (d, dv) on a device, or null when even the smallest
 * do not fit its workgroup storage. `hardware`: not a software device
 * (GRAD_TILINGS are for GPUs only).
 */
export function chooseGradTiles(
    d: number, dv: number, limits: GradDeviceLimits, hardware = true): GradTiles|null {
  const threads = Math.min(
      GRAD_THREADS, limits.maxComputeInvocationsPerWorkgroup, limits.maxComputeWorkgroupSizeX);
  const storage = limits.maxComputeWorkgroupStorageSize;
  const maxThreads =
      Math.min(limits.maxComputeInvocationsPerWorkgroup, limits.maxComputeWorkgroupSizeX);
  const planned = GRAD_TILINGS.find(
      ({tiles: {dkdv, dq}, minHeadDim, maxHeadDim}) => hardware && Math.min(d, dv) > minHeadDim &&
          Math.max(d, dv) <= maxHeadDim && Math.max(dkdv.threads, dq.threads) <= maxThreads &&
          dkdvStorageBytes(dkdv, d, dv) <= storage && dqStorageBytes(dq, d, dv) <= storage);
  if (planned != null) {
    return planned.tiles;
  }
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
      tiles == null ||
          (dkdvTilesValid(tiles.dkdv) && dqTilesValid(tiles.dq) &&
           (tiles.dsDq == null || dqTilesValid(tiles.dsDq))),
      () => `setGradTilesOverride: inconsistent tiles ${JSON.stringify(tiles)}`);
  tilesOverride = tiles;
}

/** Automatic tiles per device, by head dim d, then dv (a few entries). */
const tilesCache = new WeakMap<GPUDevice, Map<number, Map<number, GradTiles|null>>>();

function tilesFor(d: number, dv: number, device: GPUDevice): GradTiles|null {
  const limits = kernelLimits(device);
  if (tilesOverride != null) {
    const fits = (tiles: GradTiles) =>
        dkdvStorageBytes(tiles.dkdv, d, dv) <= limits.maxComputeWorkgroupStorageSize &&
        dqStorageBytes(tiles.dq, d, dv) <= limits.maxComputeWorkgroupStorageSize &&
        (tiles.dsDq == null ||
         dqStorageBytes(tiles.dsDq, d, dv, true) <= limits.maxComputeWorkgroupStorageSize) &&
        Math.max(tiles.dkdv.threads, tiles.dq.threads, tiles.dsDq?.threads ?? 0) <=
            limits.maxComputeInvocationsPerWorkgroup;
    return fits(tilesOverride) ? tilesOverride : null;
  }
  // Both the op's support check and the kernel ask, on every call.
  let byD = tilesCache.get(device);
  if (byD == null) {
    byD = new Map();
    tilesCache.set(device, byD);
  }
  let byDv = byD.get(d);
  if (byDv == null) {
    byDv = new Map();
    byD.set(d, byDv);
  }
  let tiles = byDv.get(dv);
  if (tiles === undefined) {
    tiles = chooseGradTiles(d, dv, limits, !isSoftwareDevice(device));
    byDv.set(dv, tiles);
  }
  return tiles;
}

/** Why the fused backward cannot take a call, or null. */
export function flashAttentionGradSupports(
    tensorShapes: AttentionShapes, attrs: FlashAttentionAttrs, backend: tf.KernelBackend): string|
    null {
  const shapes = sequenceShapes(tensorShapes, attrs);
  if (!isWebGPUBackend(backend)) {
    return 'the active backend is not a tfjs webgpu backend';
  }
  const limits = kernelLimits(backend.device);
  const tiles = tilesFor(shapes.headDim, shapes.headDimV, backend.device);
  if (tiles == null) {
    return `head dims ${shapes.headDim}/${
        shapes.headDimV} need more workgroup storage than the device's ${
        limits.maxComputeWorkgroupStorageSize} bytes`;
  }
  const grid = Math.max(
      Math.ceil(shapes.seqK / tiles.dkdv.bc), Math.ceil(shapes.seqQ / tiles.dq.br),
      Math.ceil(shapes.seqQ / (tiles.dsDq ?? tiles.dq).br), shapes.batch * shapes.heads);
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

let dsChunkRuns = 0;
/** How many dS-scratch chunks ran (tests assert the scratch was used). */
export function dsScratchChunkRuns(): number {
  return dsChunkRuns;
}

/**
 * Is `t` known to be zero without reading it? The op's own gradient marks
 * the zero lse gradient it makes when the op returns no lse
 * (isZeroLseGradient). Otherwise (the op returned the lse and nothing used
 * it) tfjs's tape gives zeros it made on the host: those are scanned, as
 * uploading them would cost an upload and a buffer per backward call.
 */
function isKnownZeros(backend: WebGPUBackend, t: tf.TensorInfo): boolean {
  if (isZeroLseGradient(t)) {
    return true;
  }
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

/** One chunk of a dS-scratch backward: its uniforms (unit0, dsBase) and grids. */
interface DsChunk {
  uniforms: ArrayBuffer;
  dkdvGrid: [number, number, number];
  dqGrid: [number, number, number];
}

/**
 * (batch, kv head) pairs per dS-scratch chunk: the fewest chunks whose
 * scratch fits both the budget and, after the `statsBytes` of (lse, Delta)
 * rows, the device's largest buffer and storage binding (`maxBuffer`),
 * with the pairs spread evenly over them; 0 when not even one pair fits.
 */
export function dsChunkUnits(
    units: number, unitBytes: number, statsBytes: number, budget: number,
    maxBuffer: number): number {
  const room = Math.min(budget, maxBuffer - statsBytes);
  const most = Math.min(units, Math.floor(room / unitBytes));
  return most <= 0 ? 0 : Math.ceil(units / Math.ceil(units / most));
}

/**
 * The dS scratch of a call, as tiles with `dsScratch` (and `dsDq`,
 * `dsScratchBudget`) filled in, or null: forced by the tiles, else the
 * first of DS_SCRATCH_PLANS that fits the problem and the device (`storage`:
 * its workgroup bytes).
 * Never with per-batch lengths (`seqlens`, packed varlen calls): those are
 * read from `stats`, which the dK/dV pass then binds read_write, and WGSL's
 * uniformity rules do not let loop bounds read from such a binding reach
 * the passes' barriers.
 */
export function dsScratchPlan(
    tiles: GradTiles, shapes: AttentionShapes, a: FlashAttentionAttrs, hardware: boolean,
    hasSeqlens: boolean, storage: number): GradTiles|null {
  if (hasSeqlens) {
    return null;
  }
  if (tiles.dsScratch != null) {
    return tiles.dsScratch ? tiles : null;
  }
  const {headDim, headDimV, seqK} = shapes;
  const masked = a.windowLeft >= 0 || a.windowRight >= 0;
  const choice = DS_SCRATCH_PLANS.find(
      c => hardware && Math.min(headDim, headDimV) > c.minHeadDim &&
          Math.max(headDim, headDimV) <= c.maxHeadDim && seqK >= c.minKeys &&
          (c.masked || !masked) &&
          (c.dsDq == null || dqStorageBytes(c.dsDq, headDim, headDimV, true) <= storage));
  return choice == null ? null : {
    ...tiles,
    dsScratch: true,
    ...(choice.dsDq != null ? {dsDq: choice.dsDq} : {}),
    ...(choice.budgetBytes != null ? {dsScratchBudget: choice.budgetBytes} : {}),
  };
}

/**
 * Everything a backward call dispatches apart from its tensors: it follows
 * from the tensors' shapes, the attributes and the device only (and the
 * delta pass from whether dLse is known zero).
 */
interface GradCall {
  /** The tensors' shapes (a packed call's rows). */
  tensorShapes: AttentionShapes;
  tiles: GradTiles;
  features: GradFeatures;
  hasAlibi: boolean;
  hasSeqlens: boolean;
  packedBatch: number;
  uniforms: ArrayBuffer;
  /** Uniforms bound from a kept buffer (no dropout seed to write per call). */
  cacheUniforms: boolean;
  /** The delta pass's output: (lse, Delta) per row, then the lengths. */
  statsShape: [number, number];
  /**
   * dS-scratch chunks, in order (null: dQ recomputes dS); the scratch's
   * vec2s follow statsShape's rows in the same buffer.
   */
  dsChunks: DsChunk[]|null;
  scratchVec2s: number;
  /** The delta pass by whether dLse is known zero, made on first use. */
  delta: [FlashAttentionGradDeltaProgram|null, FlashAttentionGradDeltaProgram|null];
  dkdv: OwnPipelineSpec;
  dq: OwnPipelineSpec;
  dkdvGrid: [number, number, number];
  dqGrid: [number, number, number];
}

/** Distinct shapes and options kept per device (the least recent go first). */
const KEPT_CALLS = 32;

/** Planned backward calls per device, by the shapes of these inputs and the attributes. */
const keptCalls =
    new KeptCalls<GradCall>(['q', 'k', 'v', 'alibiSlopes', 'seqlens', 'cuSeqlensK'], KEPT_CALLS);

/** Plans a backward call (tiles, programs, uniforms, grids). */
function planGradCall(
    device: GPUDevice, inputs: FlashAttentionGradInputs, a: FlashAttentionAttrs): GradCall {
  const {q, k, v, alibiSlopes, seqlens} = inputs;
  // The tensors' rows, and the sequences (differ for a packed varlen call).
  const [rowsB, rowsQ, heads, headDim] = q.shape;
  const [, rowsK, headsKV] = k.shape;
  const headDimV = v.shape[3];
  const tensorShapes:
      AttentionShapes = {batch: rowsB, seqQ: rowsQ, seqK: rowsK, heads, headsKV, headDim, headDimV};
  const shapes = sequenceShapes(tensorShapes, a);
  const {batch, seqQ, seqK} = shapes;
  const packedBatch = a.packedBatch! > 0 ? a.packedBatch! : 0;
  const tiles = tilesFor(headDim, headDimV, device);
  tf.util.assert(
      tiles != null,
      () => `FlashAttentionGrad: head dims ${headDim}/${
          headDimV} do not fit the device's workgroup storage`);
  const hasAlibi = alibiSlopes != null && tf.util.sizeFromShape(alibiSlopes.shape) > 0;
  const hasSeqlens = seqlens != null && tf.util.sizeFromShape(seqlens.shape) > 0;
  const features = gradFeatures(a, hasAlibi, hasSeqlens);
  const f = featureKey(features);
  const {dkdv, dq} = tiles!;
  // (lse, Delta) per row, then (seqlenQ, seqlenK) per batch row if any
  // (packed: the B + 1 cumulative (cuSeqlensQ, cuSeqlensK)).
  const lengthRows = packedBatch > 0 ? packedBatch + 1 : batch;
  const statsRows = rowsB * heads * rowsQ + (hasSeqlens ? lengthRows : 0);
  const alibiShape = hasAlibi ? alibiSlopes!.shape : [];
  const packedRows = packedBatch > 0 ? {totalQ: rowsQ, totalK: rowsK} : undefined;
  // The dS scratch: chunks of (batch, kv head) pairs, each pair's query
  // heads holding seqQ rows of whole key quads (dsScratchWGSL).
  const groups = heads / headsKV;
  const units = batch * headsKV;
  const unitBytes = groups * seqQ * Math.ceil(seqK / 4) * 16;
  const limits = kernelLimits(device);
  const dsTiles = dsScratchPlan(
      tiles!, shapes, a, !isSoftwareDevice(device), hasSeqlens,
      limits.maxComputeWorkgroupStorageSize);
  const chunkUnits = dsTiles != null ?
      dsChunkUnits(
          units, unitBytes, statsRows * 8, dsTiles.dsScratchBudget ?? getDsScratchBudget(),
          Math.min(limits.maxStorageBufferBindingSize, device.limits.maxBufferSize ?? Infinity)) :
      0;
  const ds = chunkUnits > 0;
  // The dQ pass's tiles: the dS-reading pass may have its own.
  const dqTiles = ds ? dsTiles!.dsDq ?? dq : dq;
  const dsChunks = ds ? Array.from({length: Math.ceil(units / chunkUnits)}, (_, n) => {
    const unit0 = n * chunkUnits;
    const pairs = Math.min(chunkUnits, units - unit0);
    return {
      uniforms: gradUniforms(shapes, a, alibiShape, packedRows, {unit0, dsBase: statsRows}),
      dkdvGrid: [Math.ceil(seqK / dkdv.bc), pairs, 1] as [number, number, number],
      dqGrid: [Math.ceil(seqQ / dqTiles.br), pairs * groups, 1] as [number, number, number],
    };
  }) : null;
  const dsKey = ds ? ' ds' : '';
  return {
    tensorShapes,
    tiles: tiles!,
    features,
    hasAlibi,
    hasSeqlens,
    packedBatch,
    uniforms: gradUniforms(shapes, a, alibiShape, packedRows),
    // A dropout seed usually changes every call: those uniforms are written.
    cacheUniforms: a.dropoutRate === 0,
    statsShape: [statsRows, 2],
    dsChunks,
    scratchVec2s: ds ? chunkUnits * unitBytes / 8 : 0,
    delta: [null, null],
    dkdv: cachedProgram(
        `dkdv ${headDim},${headDimV},${JSON.stringify(dkdv)},${f}${dsKey}`,
        () => dkdv.dimChunks != null ?
            new FlashAttentionGradDkDvSlicedProgram(headDim, headDimV, dkdv, features, ds) :
            new FlashAttentionGradDkDvProgram(headDim, headDimV, dkdv, features, ds)),
    dq: cachedProgram(
        `dq ${headDim},${headDimV},${JSON.stringify(dqTiles)},${f}${dsKey}`,
        () => dqTiles.dimChunks != null ?
            new FlashAttentionGradDqSlicedProgram(headDim, headDimV, dqTiles, features, ds) :
            new FlashAttentionGradDqProgram(headDim, headDimV, dqTiles, features, ds)),
    dkdvGrid: [Math.ceil(seqK / dkdv.bc), batch * headsKV, 1],
    dqGrid: [Math.ceil(seqQ / dq.br), batch * heads, 1],
  };
}

/**
 * planGradCall, kept per device for calls whose plan repeats (no dropout
 * seed, no forced tiles).
 */
function gradCallFor(
    device: GPUDevice, inputs: FlashAttentionGradInputs, attrs: FlashAttentionAttrs): GradCall {
  if (attrs.dropoutRate > 0 || tilesOverride != null || dsScratchBudgetForced()) {
    return planGradCall(device, inputs, attrs);
  }
  return keptCalls.get(
      device, inputs as unknown as Record<string, tf.TensorInfo>,
      attrs as unknown as Record<string, unknown>, () => planGradCall(device, inputs, attrs));
}

/** The call's delta pass (whether dLse is known zero changes its program). */
function deltaProgram(call: GradCall, zeroDLse: boolean): FlashAttentionGradDeltaProgram {
  const at = zeroDLse ? 1 : 0;
  if (call.delta[at] == null) {
    const {batch, heads, seqQ, headDimV} = call.tensorShapes;
    const key = `delta ${batch},${heads},${seqQ},${headDimV},${+ call.hasSeqlens},${+ zeroDLse},${
        call.packedBatch}`;
    call.delta[at] = cachedProgram(
        key,
        () => new FlashAttentionGradDeltaProgram(
            call.tensorShapes, call.hasSeqlens, zeroDLse, call.packedBatch));
  }
  return call.delta[at]!;
}

function flashAttentionGradWebGPU(
    {inputs, backend, attrs}:
        {inputs: tf.NamedTensorInfoMap, backend: unknown, attrs?: tf.NamedAttrMap}):
    tf.TensorInfo[] {
  const webgpu = backend as WebGPUBackend;
  const a = attrs as unknown as FlashAttentionAttrs;
  const named = inputs as unknown as FlashAttentionGradInputs;
  const {dy, dLse, q, k, v, out, softmaxLse, alibiSlopes, seqlens, cuSeqlensK} = named;
  const call = gradCallFor(webgpu.device, named, a);
  const {hasSeqlens, packedBatch, uniforms, cacheUniforms} = call;
  const slopes = call.hasAlibi ? [alibiSlopes!] : [];
  const zeroDLse = isKnownZeros(webgpu, dLse);
  const delta = deltaProgram(call, zeroDLse);
  // Tensor cores (subgroup matrices) where the forward would use them.
  const matrixPlan = hasSeqlens ?
      null :
      planMatrixBackward(webgpu.device, q.shape[3], v.shape[3], a.precision ?? 'float32');
  const dsChunks = matrixPlan == null ? call.dsChunks : null;
  // The dS scratch (if any) after the rows: one buffer, one allocation.
  const [statsRows] = call.statsShape;
  const [stats] = runOwnPipeline(webgpu, delta, {
    inputs: [
      dy, out, zeroDLse ? softmaxLse : dLse, softmaxLse, ...(hasSeqlens ? [seqlens!] : []),
      ...(packedBatch > 0 ? [cuSeqlensK!] : [])
    ],
    outputs: [{
      shape: dsChunks != null ? [statsRows + call.scratchVec2s, 2] : call.statsShape,
      dtype: 'float32'
    }],
    uniforms,
    dispatch: delta.workgroups,
    cacheUniforms,
  });
  try {
    if (dsChunks != null) {
      const result = dsScratchPasses(webgpu, call, dsChunks, [q, k, v, dy], slopes, stats);
      gradKernelRuns++;
      return result;
    }
    if (matrixPlan != null) {
      const result = matrixBackwardWebGPU(
          webgpu, [q, k, v, dy, ...slopes], stats, matrixPlan, call.features, uniforms);
      gradKernelRuns++;
      return result;
    }
    const [dk, dv] = runOwnPipeline(webgpu, call.dkdv, {
      inputs: [q, k, v, dy, stats, ...slopes],
      outputs: [{shape: k.shape, dtype: 'float32'}, {shape: v.shape, dtype: 'float32'}],
      uniforms,
      dispatch: call.dkdvGrid,
      cacheUniforms,
    });
    let dq: tf.TensorInfo;
    try {
      [dq] = runOwnPipeline(webgpu, call.dq, {
        inputs: [q, k, v, dy, stats, ...slopes],
        outputs: [{shape: q.shape, dtype: 'float32'}],
        uniforms,
        dispatch: call.dqGrid,
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
/**
 * Passes 2 and 3 with the dS scratch, chunk by chunk: the dK/dV pass binds
 * `stats` read_write and stores the chunk's dS after its rows, then the dQ
 * pass reads it. The first chunk makes dq, dk and dv; later ones write
 * their rows of them in place. Returns [dq, dk, dv].
 */
function dsScratchPasses(
    webgpu: WebGPUBackend, call: GradCall, chunks: DsChunk[], [q, k, v, dy]: tf.TensorInfo[],
    slopes: tf.TensorInfo[], stats: tf.TensorInfo): tf.TensorInfo[] {
  // [dq, dk, dv] once the first chunk has made them.
  let grads: tf.TensorInfo[]|null = null;
  const made: tf.TensorInfo[] = [];
  try {
    for (const {uniforms, dkdvGrid, dqGrid} of chunks) {
      const common = {uniforms, cacheUniforms: call.cacheUniforms};
      const first = grads == null;
      const kv = [
        {shape: k.shape, dtype: 'float32' as const}, {shape: v.shape, dtype: 'float32' as const}
      ];
      made.push(...runOwnPipeline(webgpu, call.dkdv, {
        ...common,
        inputs: [q, k, v, dy, ...slopes],
        outputs: first ? kv : [],
        updates: first ? [stats] : [grads![1], grads![2], stats],
        dispatch: dkdvGrid,
      }));
      made.push(...runOwnPipeline(webgpu, call.dq, {
        ...common,
        inputs: [q, k, v, dy, stats, ...slopes],
        outputs: first ? [{shape: q.shape, dtype: 'float32'}] : [],
        updates: first ? [] : [grads![0]],
        dispatch: dqGrid,
      }));
      if (first) {
        grads = [made[2], made[0], made[1]];
      }
      dsChunkRuns++;
    }
    return grads!;
  } catch (e) {
    made.forEach(t => webgpu.disposeData(t.dataId));
    throw e;
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
