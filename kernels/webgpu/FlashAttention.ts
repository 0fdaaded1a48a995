/**
 * The fused FlashAttention kernel of the webgpu backend: chooses a tiling
 * that fits the device, and dispatches the forward program (writing `out`
 * and `lse` in one dispatch).
 */
/// <reference types="@webgpu/types" />
import * as tf from '@tensorflow/tfjs-core';
import type {WebGPUBackend} from '@tensorflow/tfjs-backend-webgpu';

import type {AttentionShapes} from '../../src/checks';
import {MAX_HEAD_DIM} from '../../src/checks';
import {FlashAttention, FlashAttentionAttrs} from '../../src/kernel_names';
import {sequenceShapes} from '../../src/seqlens';

import {BoundedCache} from './bounded_cache';
import {COMBINE_THREADS, COMBINE_UNIFORMS, ForwardConfig, forwardKey, ForwardTiles, FORWARD_UNIFORMS, forwardWGSL, prefetchFloats, splitCombineWGSL, tileSizes, workgroupBytes} from './flash_attention_webgpu';
import {forwardOutputs, forwardUniformValues} from './forward_shared';
import {deviceHasSubgroups, dispatchGrid, isWebGPUBackend, OwnOutput, OwnPipelineSpec, packUniforms, runOwnPipeline, UniformWriter} from './own_pipeline';
import {FORWARD_TILINGS, ForwardTilingChoice, getForwardOverride, MAX_SPLITS, MIN_TILES_PER_SPLIT, REGISTER_BUDGET, SHORT_GRID_GROUPS, SPLIT_TARGET_GROUPS} from './tuning';
import {matrixForwardWebGPU, planMatrixForward} from './flash_attention_subgroup_matrix';
import {KeptCalls} from './kept_calls';
import {scoreOptionsFromAttrs} from './wgsl_snippets';

/** Floats a thread keeps in registers for its tiles (S, O, prefetch). */
function registerFloats(d: number, dv: number, t: ForwardTiles): number {
  const c = {headDim: d, headDimV: dv, tiles: t};
  const s = tileSizes(c);
  const prefetch = prefetchFloats(c);
  // Without room for the prefetch, the kernel loads K/V directly.
  return 4 * (t.tm * t.nq + t.tm * s.nj) + (prefetch <= 64 ? prefetch : 0);
}

export {setForwardOverride} from './tuning';
export type{ForwardOverride} from './tuning';
export {SPLIT_TARGET_GROUPS} from './tuning';

/** A CPU implementation of WebGPU (SwiftShader): slow compiles, small tiles. */
export function isSoftwareDevice(device: GPUDevice): boolean {
  const info = (device as unknown as {adapterInfo?: GPUAdapterInfo}).adapterInfo;
  const text = `${info?.vendor ?? ''} ${info?.architecture ?? ''} ${info?.description ?? ''}`;
  return /swiftshader|llvmpipe|lavapipe|warp/i.test(text);
}

function deviceSubgroupMinSize(device: GPUDevice): number {
  const info = (device as unknown as {adapterInfo?: {subgroupMinSize?: number}}).adapterInfo;
  return info?.subgroupMinSize ?? 4;
}

export interface ForwardPlan {
  tiles: ForwardTiles;
  subgroups: boolean;
}

/**
 * The tiling for these head dims on this device, or null if none fits.
 * `rows` (batch * heads * seqQ) decides whether tilings meant for large
 * grids apply; the kernel's callers always pass it.
 */
export function planForward(
    device: GPUDevice, headDim: number, headDimV: number, rows = Infinity): ForwardPlan|null {
  const limits = device.limits;
  const hasSubgroups = deviceHasSubgroups(device);
  const override = getForwardOverride();
  const sgMin = deviceSubgroupMinSize(device);
  const fits = (tiles: ForwardTiles, subgroups: boolean) => {
    const c = {headDim, headDimV, tiles};
    const s = tileSizes(c);
    return s.threads <= limits.maxComputeInvocationsPerWorkgroup &&
        s.threads <= limits.maxComputeWorkgroupSizeX &&
        workgroupBytes(c, subgroups) <= limits.maxComputeWorkgroupStorageSize;
  };
  const useSubgroups = (tiles: ForwardTiles) =>
      (override?.subgroups ?? true) && hasSubgroups && tiles.tx <= sgMin;
  if (override?.tiles != null) {
    const subgroups = useSubgroups(override.tiles);
    return override.ignoreLimits || fits(override.tiles, subgroups) ?
        {tiles: override.tiles, subgroups} :
        null;
  }
  // Software devices compile large unrolled tiles very slowly (minutes).
  const software = isSoftwareDevice(device);
  // Short grids: 32-row tiles would leave SMs idle (tuning.ts).
  const shortGrid = !software && Math.ceil(rows / 32) < SHORT_GRID_GROUPS;
  const suits = (t: ForwardTilingChoice) => headDim > (t.minHeadDim ?? 0) &&
      headDim <= (t.maxHeadDim ?? Infinity) &&
      Math.ceil(rows / (t.tm * t.ty)) >= (t.minGroups ?? 0) && (!t.shortGrid || shortGrid);
  const candidates =
      FORWARD_TILINGS.filter(t => !software || (t.tm <= 2 && t.nq === 1 && !t.shortGrid))
          .map(({minHeadDim, maxHeadDim, minGroups, shortGrid: onlyShort, ...tiles}) => ({
                 tiles,
                 ok: suits({...tiles, minHeadDim, maxHeadDim, minGroups, shortGrid: onlyShort})
               }));
  for (const {tiles, ok} of candidates) {
    const subgroups = useSubgroups(tiles);
    const inBudget = registerFloats(headDim, headDimV, tiles) <= REGISTER_BUDGET;
    if (ok && fits(tiles, subgroups) && inBudget) {
      return {tiles, subgroups};
    }
  }
  // Nothing within the register budget: the smallest tiling that fits.
  for (const {tiles} of candidates.slice().reverse()) {
    const subgroups = useSubgroups(tiles);
    if (fits(tiles, subgroups)) {
      return {tiles, subgroups};
    }
  }
  return null;
}

/** Plans by head dims and rows, per device, for calls without an override. */
const planCache = new WeakMap<GPUDevice, BoundedCache<ForwardPlan|null>>();
/** Distinct (D, Dv, rows) kept per device before the cache starts over. */
const PLAN_CACHE_SIZE = 256;

/**
 * planForward, remembered per device: the op's support check and the
 * kernel both plan every call, and planning walks the whole tiling list
 * (the JavaScript time of a short fused call). An override bypasses it.
 */
export function cachedPlanForward(
    device: GPUDevice, headDim: number, headDimV: number, rows: number): ForwardPlan|null {
  if (getForwardOverride() != null) {
    return planForward(device, headDim, headDimV, rows);
  }
  let plans = planCache.get(device);
  if (plans == null) {
    plans = new BoundedCache(PLAN_CACHE_SIZE);
    planCache.set(device, plans);
  }
  return plans.get(
      `${headDim},${headDimV},${rows}`, () => planForward(device, headDim, headDimV, rows));
}

/**
 * Split-KV factor for a grid of `groups` query-tile workgroups over `seqK`
 * keys in tiles of `bc`: enough splits to reach `target` workgroups, none
 * shorter than MIN_TILES_PER_SPLIT tiles; 1 (no split) when `target` is 0.
 */
export function planSplits(
    groups: number, seqK: number, bc: number, target = SPLIT_TARGET_GROUPS): number {
  const override = getForwardOverride();
  if (override?.splits != null) {
    return override.splits;
  }
  const keyTiles = Math.ceil(seqK / bc);
  const wanted = Math.ceil(target / Math.max(1, groups));
  return Math.max(1, Math.min(wanted, Math.floor(keyTiles / MIN_TILES_PER_SPLIT), MAX_SPLITS));
}

/** Why the fused kernel cannot take a call, or null (registerFusedKernel). */
export function supportsFlashAttentionWebGPU(
    shapes: AttentionShapes, attrs: FlashAttentionAttrs, backend: tf.KernelBackend): string|null {
  if (!isWebGPUBackend(backend)) {
    return 'the active backend is not tfjs-backend-webgpu';
  }
  // (Packed varlen calls: the tensors' sizes, but B sequences' grid.)
  const {batch, seqQ, seqK, heads, headsKV, headDim, headDimV} = shapes;
  const seqs = sequenceShapes(shapes, attrs);
  if (headDim > MAX_HEAD_DIM || headDimV > MAX_HEAD_DIM) {
    return `the WebGPU kernel supports head dims up to ${MAX_HEAD_DIM}, got D=${headDim}, Dv=${
        headDimV}`;
  }
  const device = backend.device;
  const plan = cachedPlanForward(device, headDim, headDimV, seqs.batch * heads * seqs.seqQ);
  if (plan == null) {
    return `no WebGPU tiling for head dims D=${headDim}, Dv=${headDimV} fits the device (${
        device.limits.maxComputeWorkgroupStorageSize} bytes of workgroup memory, ${
        device.limits.maxComputeInvocationsPerWorkgroup} invocations)`;
  }
  const maxBinding = device.limits.maxStorageBufferBindingSize;
  const sizes: Array<[string, number]> = [
    ['q', batch * seqQ * heads * headDim],
    ['k', batch * seqK * headsKV * headDim],
    ['v', batch * seqK * headsKV * headDimV],
    ['out', batch * seqQ * heads * headDimV],
  ];
  for (const [name, n] of sizes) {
    if (n * 4 > maxBinding) {
      return `${name} needs ${n * 4} bytes, over the device's maxStorageBufferBindingSize (${
          maxBinding})`;
    }
  }
  const {br} = tileSizes({headDim, headDimV, tiles: plan.tiles});
  const groups = Math.ceil(seqs.seqQ / br) * heads * seqs.batch;
  const maxDim = device.limits.maxComputeWorkgroupsPerDimension;
  if (groups > maxDim * maxDim || groups >= 2 ** 31) {
    return `${groups} workgroups exceed the device's dispatch limits`;
  }
  return null;
}

/** Dispatches made by the fused forward (lets tests check it ran). */
export const forwardStats = {
  dispatches: 0
};

/** One dispatch of an own pipeline, all but its tensors. */
interface PlannedDispatch {
  spec: OwnPipelineSpec;
  outputs: OwnOutput[];
  uniforms: ArrayBuffer;
  grid: [number, number, number];
}

/**
 * Everything a SIMT forward call dispatches apart from its tensors: it
 * follows from the tensors' shapes, the attributes and the device only.
 */
interface ForwardCall {
  /** Which optional inputs are bound, in this order after q, k, v. */
  alibi: boolean;
  seqlens: boolean;
  packed: boolean;
  main: PlannedDispatch;
  /** The split-KV combine pass, when the keys are split. */
  combine: PlannedDispatch|null;
  /** Uniforms written per call (dropout seeds) or bound from a kept buffer. */
  cacheUniforms: boolean;
}

/** Distinct shapes and options kept per device (the least recent go first). */
const KEPT_CALLS = 32;

/** Planned forward calls per device, by the shapes of these inputs and the attributes. */
const keptCalls =
    new KeptCalls<ForwardCall>(['q', 'k', 'v', 'alibiSlopes', 'seqlens', 'cuSeqlensK'], KEPT_CALLS);

/** Plans a SIMT forward call (tiling, splits, uniforms, grids). */
function planForwardCall(
    device: GPUDevice, inputs: Record<string, tf.TensorInfo>,
    attrs: FlashAttentionAttrs): ForwardCall {
  const {q, k, v, alibiSlopes, seqlens} = inputs;
  // The tensors' rows: B * Sq, or totalQ of a packed varlen call.
  const [rowsB, rowsQ, heads, headDim] = q.shape;
  const [, rowsK, headsKV] = k.shape;
  const headDimV = v.shape[3];
  const shapes = {batch: rowsB, seqQ: rowsQ, seqK: rowsK, heads, headsKV, headDim, headDimV};
  // The grid's sequences (packed: B of at most maxSeqlenQ rows).
  const {batch, seqQ, seqK} = sequenceShapes(shapes, attrs);
  const plan = cachedPlanForward(device, headDim, headDimV, batch * heads * seqQ)!;
  const override = getForwardOverride();
  const hasAlibi = alibiSlopes != null && tf.util.sizeFromShape(alibiSlopes.shape) > 0;
  const alibiMode = !hasAlibi ? 0 : alibiSlopes.shape.length === 1 ? 1 : 2;
  const hasSeqlens = seqlens != null && tf.util.sizeFromShape(seqlens.shape) > 0;
  const score = scoreOptionsFromAttrs(attrs, hasAlibi, hasSeqlens);
  const config: ForwardConfig = {
    headDim,
    headDimV,
    tiles: plan.tiles,
    score,
    alibiMode,
    dropout: attrs.dropoutRate > 0,
    subgroups: plan.subgroups,
    reverseRows: score.windowRight && !score.windowLeft,
    runtimeLoops: !override?.constantLoops && isSoftwareDevice(device),
    prefetch: override?.prefetch,
  };
  const {br, bc, dq4} = tileSizes(config);
  const numQTiles = Math.ceil(seqQ / br);
  const splits = planSplits(numQTiles * heads * batch, seqK, bc);
  config.splitKeys = splits > 1;
  const totalGroups = numQTiles * heads * batch * splits;
  const maxPerDim = device.limits.maxComputeWorkgroupsPerDimension;
  const grid = dispatchGrid(totalGroups, maxPerDim);
  const uniforms = packUniforms(FORWARD_UNIFORMS, {
    ...forwardUniformValues(q, k, attrs, numQTiles, totalGroups, grid[0]),
    seqQ,
    seqK,
    batch,
    totalQ: rowsB * rowsQ,
    totalK: rowsB * rowsK,
    loopDQ4: dq4,
    loopBC4: bc / 4,
    numSplits: splits,
    splitRows: rowsB * rowsQ * heads,
    splitLse: rowsB * heads * rowsQ,
  });
  const numInputs = 3 + (hasAlibi ? 1 : 0) + (hasSeqlens ? 1 : 0) + (score.packed ? 1 : 0);
  // With splits, the partial results of split n sit at leading index n.
  const main: PlannedDispatch = {
    spec: {
      key: forwardKey(config),
      label: 'FlashAttention forward',
      code: () => forwardWGSL(config),
      numInputs,
      numOutputs: 2,
      hasUniforms: true,
    },
    outputs: [
      {shape: [splits * rowsB, rowsQ, heads, headDimV], dtype: 'float32'},
      {shape: [splits * rowsB, heads, rowsQ], dtype: 'float32'},
    ],
    uniforms,
    grid,
  };
  let combine: PlannedDispatch|null = null;
  if (splits > 1) {
    // By the tensors' rows: a packed call's [1, totalQ, ...] merges as one batch row.
    const elements = rowsB * rowsQ * heads * headDimV;
    const combineGrid = dispatchGrid(Math.ceil(elements / COMBINE_THREADS), maxPerDim);
    const cw = new UniformWriter();
    const combineValues: Record<string, number> = {
      elements,
      headDimV,
      heads,
      seqQ: rowsQ,
      numSplits: splits,
      splitRows: rowsB * rowsQ * heads,
      splitLse: rowsB * heads * rowsQ,
      gridX: combineGrid[0],
    };
    for (const [name, type] of COMBINE_UNIFORMS) {
      cw[type](combineValues[name]);
    }
    combine = {
      spec: {
        key: 'fa_fwd_split_combine',
        label: 'FlashAttention forward split-KV combine',
        code: splitCombineWGSL,
        numInputs: 2,
        numOutputs: 2,
        hasUniforms: true,
      },
      outputs: forwardOutputs(q, v),
      uniforms: cw.finish(),
      grid: combineGrid,
    };
  }
  return {
    alibi: hasAlibi,
    seqlens: hasSeqlens,
    packed: score.packed === true,
    main,
    combine,
    // A dropout seed usually changes every call: those uniforms are written.
    cacheUniforms: attrs.dropoutRate === 0,
  };
}

/**
 * planForwardCall, remembered per device for calls whose plan repeats (no
 * dropout seed, no forced plan): the JavaScript of a short call is most of
 * its time (benchmarks/js_overhead.ts). A call found here passed the
 * support check when it was planned, with the same shapes and attributes
 * (the device is the cache's).
 */
function forwardCallFor(
    backend: WebGPUBackend, inputs: Record<string, tf.TensorInfo>, attrs: FlashAttentionAttrs,
    check: () => void): ForwardCall {
  const device = backend.device;
  if (attrs.dropoutRate > 0 || getForwardOverride() != null) {
    check();
    return planForwardCall(device, inputs, attrs);
  }
  return keptCalls.get(device, inputs, attrs as unknown as Record<string, unknown>, () => {
    check();
    return planForwardCall(device, inputs, attrs);
  });
}

/** Runs the forward program: returns [out, lse]. */
export function flashAttentionWebGPU(
    args: {inputs: tf.NamedTensorInfoMap, backend: tf.KernelBackend, attrs?: tf.NamedAttrMap}):
    tf.TensorInfo[] {
  const backend = args.backend as unknown as WebGPUBackend;
  const inputs = args.inputs as Record<string, tf.TensorInfo>;
  const {q, k, v, alibiSlopes, seqlens, cuSeqlensK} = inputs;
  const attrs = args.attrs as unknown as FlashAttentionAttrs;
  const headDim = q.shape[3];
  const headDimV = v.shape[3];
  const check = () => {
    const [rowsB, rowsQ, heads] = q.shape;
    const [, rowsK, headsKV] = k.shape;
    const shapes = {batch: rowsB, seqQ: rowsQ, seqK: rowsK, heads, headsKV, headDim, headDimV};
    const reason = supportsFlashAttentionWebGPU(shapes, attrs, args.backend);
    if (reason != null) {
      throw new Error(`FlashAttention (webgpu): ${reason}`);
    }
  };
  // Tensor cores (subgroup matrices) where the device has them.
  // (Not with per-batch lengths: that kernel does not read them.)
  const matrixPlan = attrs.hasSeqlens ?
      null :
      planMatrixForward(backend.device, headDim, headDimV, attrs.precision ?? 'float32');
  if (matrixPlan != null) {
    check();
    return matrixForwardWebGPU(backend, inputs, attrs, matrixPlan);
  }
  const call = forwardCallFor(backend, inputs, attrs, check);
  const boundInputs = [
    q, k, v, ...(call.alibi ? [alibiSlopes] : []), ...(call.seqlens ? [seqlens] : []),
    ...(call.packed ? [cuSeqlensK] : [])
  ];
  forwardStats.dispatches++;
  const {main, combine, cacheUniforms} = call;
  const outputs = runOwnPipeline(backend, main.spec, {
    inputs: boundInputs,
    outputs: main.outputs,
    uniforms: main.uniforms,
    dispatch: main.grid,
    cacheUniforms,
  });
  if (combine == null) {
    return outputs;
  }
  try {
    return runOwnPipeline(backend, combine.spec, {
      inputs: outputs,
      outputs: combine.outputs,
      uniforms: combine.uniforms,
      dispatch: combine.grid,
      cacheUniforms,
    });
  } finally {
    outputs.forEach(o => backend.disposeData(o.dataId));
  }
}

export const flashAttentionWebGPUConfig: tf.KernelConfig = {
  kernelName: FlashAttention,
  backendName: 'webgpu',
  kernelFunc: flashAttentionWebGPU as unknown as tf.KernelFunc,
};
