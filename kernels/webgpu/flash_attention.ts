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
import {dropoutThreshold} from '../../src/dropout';
import {FlashAttention, FlashAttentionAttrs} from '../../src/kernel_names';

import {ForwardConfig, ForwardTiles, forwardKey, forwardWGSL, FORWARD_UNIFORMS, prefetchFloats, tileSizes, workgroupBytes} from './flash_attention_webgpu';
import {matrixForwardWebGPU, planMatrixForward} from './flash_attention_subgroup_matrix';
import {deviceHasSubgroups, dispatchGrid, runOwnPipeline, UniformWriter} from './own_pipeline';
import {scoreOptionsFromAttrs} from './wgsl_snippets';

/** A tiling and the problems it is meant for. */
export interface ForwardTilingChoice extends ForwardTiles {
  /** Only for head dims above this (where it was measured to win). */
  minHeadDim?: number;
  /** Only when the grid has at least this many workgroups (a full GPU). */
  minGroups?: number;
}

/**
 * Tilings tried in order; the first that fits the device's limits (and a
 * register budget) and the problem is used. Br x Bc and threads in the
 * comments.
 */
export const FORWARD_TILINGS: ForwardTilingChoice[] = [
  // Outer-product mode, K^T/V sharing a buffer, head-dim loop unrolled x8,
  // P V loop x16 (x8 in the measurements quoted here). H100 (benchmarks/RESULTS.md, forward tuning session 3,
  // call 3, same call): D=64 causal S=4096 1.770 ms vs 1.850 ms for
  // 4,8,2,16 outer (the default of that call's table, v4) and 2.44 ms for
  // the classic 4,16,1,8; S=2048 0.549 vs 0.574 ms (classic). Few
  // workgroups (S=1024, 256 of 64 rows) favoured the classic tiling in
  // call 2 (0.26 vs 0.35 ms), hence minGroups.
  // With P^T swizzled (ForwardConfig.swizzleP, on by default), second pass:
  // 1.673 / 1.649 ms against 1.816-1.758 unswizzled (two calls).
  {tm: 8, tx: 16, nq: 1, ty: 8, outer: true, sharedKV: true, minHeadDim: 32, minGroups: 512},  // 64 x 64, 128
  // Classic mode, fastest first, as measured on an H100 through Dawn/Vulkan
  // (D=64, causal, S=4096: 1.96, 2.00, 2.15, 2.17 ms; benchmarks/RESULTS.md).
  {tm: 4, tx: 16, nq: 1, ty: 8},   // 32 x 64, 128
  {tm: 4, tx: 8, nq: 1, ty: 16},   // 64 x 32, 128
  {tm: 2, tx: 16, nq: 1, ty: 16},  // 32 x 64, 256
  {tm: 2, tx: 8, nq: 1, ty: 16},   // 32 x 32, 128
  {tm: 4, tx: 8, nq: 1, ty: 8},    // 32 x 32, 64
  {tm: 2, tx: 16, nq: 1, ty: 8},   // 16 x 64, 128
  {tm: 4, tx: 4, nq: 1, ty: 8},    // 32 x 16, 32
  {tm: 2, tx: 4, nq: 1, ty: 8},    // 16 x 16, 32
  {tm: 1, tx: 4, nq: 1, ty: 16},   // 16 x 16, 64
  {tm: 1, tx: 4, nq: 1, ty: 8},    // 8 x 16, 32
  {tm: 1, tx: 2, nq: 1, ty: 8},    // 8 x 8, 16
  {tm: 1, tx: 1, nq: 1, ty: 8},    // 8 x 4, 8
];

/** Floats a thread keeps in registers for its tiles (S, O, prefetch). */
function registerFloats(d: number, dv: number, t: ForwardTiles): number {
  const c = {headDim: d, headDimV: dv, tiles: t};
  const s = tileSizes(c);
  const prefetch = prefetchFloats(c);
  // Without room for the prefetch, the kernel loads K/V directly.
  return 4 * (t.tm * t.nq + t.tm * s.nj) + (prefetch <= 64 ? prefetch : 0);
}
const REGISTER_BUDGET = 160;

/** Testing and benchmarking: force a tiling (and subgroups on/off). */
export interface ForwardOverride {
  tiles?: ForwardTiles;
  subgroups?: boolean;
  /** Testing only: skip the device-limit check, so the GPU rejects it. */
  ignoreLimits?: boolean;
  /** Tuning: force the register prefetch on/off, the head-dim unroll. */
  prefetch?: boolean;
  unroll?: number;
  /** Tuning: keys per iteration of the outer mode's P V loop. */
  unrollPV?: number;
  /** Testing: constant loop bounds (the GPU code path) on any device. */
  constantLoops?: boolean;
  /** Tuning: outer mode's P^T swizzle (ForwardConfig.swizzleP; default on). */
  swizzleP?: boolean;
}
let override: ForwardOverride|null = null;
export function setForwardOverride(o: ForwardOverride|null): void {
  override = o;
}

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
export function planForward(device: GPUDevice, headDim: number, headDimV: number,
                            rows = Infinity): ForwardPlan|null {
  const limits = device.limits;
  const hasSubgroups = deviceHasSubgroups(device);
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
        {tiles: override.tiles, subgroups} : null;
  }
  // Software devices compile large unrolled tiles very slowly (minutes).
  const software = isSoftwareDevice(device);
  const suits = (t: ForwardTilingChoice) => headDim > (t.minHeadDim ?? 0) &&
      Math.ceil(rows / (t.tm * t.ty)) >= (t.minGroups ?? 0);
  const candidates = FORWARD_TILINGS.filter(t => !software || (t.tm <= 2 && t.nq === 1))
                         .map(({minHeadDim, minGroups, ...tiles}) => ({tiles, ok: suits({...tiles, minHeadDim, minGroups})}));
  for (const {tiles, ok} of candidates) {
    const subgroups = useSubgroups(tiles);
    if (ok && fits(tiles, subgroups) && registerFloats(headDim, headDimV, tiles) <= REGISTER_BUDGET) {
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

function isWebGPU(backend: tf.KernelBackend): backend is tf.KernelBackend&WebGPUBackend {
  const b = backend as unknown as Partial<WebGPUBackend>;
  return b != null && b.device != null && typeof b.submitQueue === 'function' &&
      typeof b.uploadToGPU === 'function';
}

/** Why the fused kernel cannot take a call, or null (registerFusedKernel). */
export function supportsFlashAttentionWebGPU(
    shapes: AttentionShapes, attrs: FlashAttentionAttrs,
    backend: tf.KernelBackend): string|null {
  if (!isWebGPU(backend)) {
    return 'the active backend is not tfjs-backend-webgpu';
  }
  const {batch, seqQ, seqK, heads, headsKV, headDim, headDimV} = shapes;
  if (headDim > MAX_HEAD_DIM || headDimV > MAX_HEAD_DIM) {
    return `the WebGPU kernel supports head dims up to ${MAX_HEAD_DIM}, got D=${
        headDim}, Dv=${headDimV}`;
  }
  const device = backend.device;
  const plan = planForward(device, headDim, headDimV, batch * heads * seqQ);
  if (plan == null) {
    return `no WebGPU tiling for head dims D=${headDim}, Dv=${headDimV} fits the device (${
        device.limits.maxComputeWorkgroupStorageSize} bytes of workgroup memory, ${
        device.limits.maxComputeInvocationsPerWorkgroup} invocations)`;
  }
  const maxBinding = device.limits.maxStorageBufferBindingSize;
  const sizes: Array<[string, number]> = [
    ['q', batch * seqQ * heads * headDim], ['k', batch * seqK * headsKV * headDim],
    ['v', batch * seqK * headsKV * headDimV], ['out', batch * seqQ * heads * headDimV],
  ];
  for (const [name, n] of sizes) {
    if (n * 4 > maxBinding) {
      return `${name} needs ${n * 4} bytes, over the device's maxStorageBufferBindingSize (${
          maxBinding})`;
    }
  }
  const {br} = tileSizes({headDim, headDimV, tiles: plan.tiles});
  const groups = Math.ceil(seqQ / br) * heads * batch;
  const maxDim = device.limits.maxComputeWorkgroupsPerDimension;
  if (groups > maxDim * maxDim || groups >= 2 ** 31) {
    return `${groups} workgroups exceed the device's dispatch limits`;
  }
  return null;
}

/** Dispatches made by the fused forward (lets tests check it ran). */
export const forwardStats = {dispatches: 0};

/** Runs the forward program: returns [out, lse]. */
export function flashAttentionWebGPU(
    args: {inputs: tf.NamedTensorInfoMap, backend: tf.KernelBackend,
           attrs?: tf.NamedAttrMap}): tf.TensorInfo[] {
  const backend = args.backend as unknown as WebGPUBackend;
  const {q, k, v, alibiSlopes} = args.inputs as Record<string, tf.TensorInfo>;
  const attrs = args.attrs as unknown as FlashAttentionAttrs;
  const [batch, seqQ, heads, headDim] = q.shape;
  const [, seqK, headsKV] = k.shape;
  const headDimV = v.shape[3];
  const shapes = {batch, seqQ, seqK, heads, headsKV, headDim, headDimV};
  const reason = supportsFlashAttentionWebGPU(shapes, attrs, args.backend);
  if (reason != null) {
    throw new Error(`FlashAttention (webgpu): ${reason}`);
  }
  // Tensor cores (subgroup matrices) where the device has them.
  const matrixPlan = planMatrixForward(backend.device, headDim, headDimV,
                                       attrs.precision ?? 'float32');
  if (matrixPlan != null) {
    return matrixForwardWebGPU(backend, args.inputs as Record<string, tf.TensorInfo>, attrs,
                               matrixPlan);
  }
  const plan = planForward(backend.device, headDim, headDimV, batch * heads * seqQ)!;
  const hasAlibi = alibiSlopes != null && tf.util.sizeFromShape(alibiSlopes.shape) > 0;
  const alibiMode = !hasAlibi ? 0 : alibiSlopes.shape.length === 1 ? 1 : 2;
  const score = scoreOptionsFromAttrs(attrs, hasAlibi);
  const config: ForwardConfig = {
    headDim, headDimV, tiles: plan.tiles, score, alibiMode,
    dropout: attrs.dropoutRate > 0, subgroups: plan.subgroups,
    reverseRows: score.windowRight && !score.windowLeft,
    runtimeLoops: !override?.constantLoops && isSoftwareDevice(backend.device),
    prefetch: override?.prefetch,
    unroll: override?.unroll,
    unrollPV: override?.unrollPV,
    // H100, D=64 causal S=4096, same calls: 1.673 / 1.649 ms against 1.816-1.758
    // unswizzled (benchmarks/RESULTS.md, forward tuning session 3, second pass).
    swizzleP: override?.swizzleP ?? true,
  };
  const {br, bc, dq4} = tileSizes(config);
  const numQTiles = Math.ceil(seqQ / br);
  const totalGroups = numQTiles * heads * batch;
  const grid = dispatchGrid(totalGroups, backend.device.limits.maxComputeWorkgroupsPerDimension);
  const values: Record<string, number> = {
    seqQ, seqK, heads, groups: heads / headsKV, headsKV, numQTiles, totalGroups,
    gridX: grid[0], scale: attrs.softmaxScale, softcap: attrs.softcap,
    left: attrs.windowLeft, right: attrs.windowRight, seedLo: attrs.seedLo,
    seedHi: attrs.seedHi,
    threshold: attrs.dropoutRate > 0 ? dropoutThreshold(attrs.dropoutRate) : 0,
    keepScale: attrs.dropoutRate > 0 ? 1 / (1 - attrs.dropoutRate) : 1,
    loopDQ4: dq4, loopBC4: bc / 4,
  };
  const w = new UniformWriter();
  for (const [name, type] of FORWARD_UNIFORMS) {
    w[type](values[name]);
  }
  const inputs = hasAlibi ? [q, k, v, alibiSlopes] : [q, k, v];
  forwardStats.dispatches++;
  return runOwnPipeline(backend, {
    key: forwardKey(config),
    label: 'FlashAttention forward',
    code: () => forwardWGSL(config),
    numInputs: inputs.length,
    numOutputs: 2,
    hasUniforms: true,
  }, {
    inputs,
    outputs: [
      {shape: [batch, seqQ, heads, headDimV], dtype: 'float32'},
      {shape: [batch, heads, seqQ], dtype: 'float32'},
    ],
    uniforms: w.finish(),
    dispatch: grid,
  });
}

export const flashAttentionWebGPUConfig: tf.KernelConfig = {
  kernelName: FlashAttention,
  backendName: 'webgpu',
  kernelFunc: flashAttentionWebGPU as unknown as tf.KernelFunc,
};
