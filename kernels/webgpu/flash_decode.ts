/**
 * The fused FlashAttentionKVCache kernel of the webgpu backend: appends the
 * new keys and values to the caches in place (buffer copies, or the rotary
 * pass writes them; no cache copy), then runs split-KV attention (two
 * passes) over each batch row's valid keys. Everything is recorded into
 * tfjs's own command encoder.
 */
/// <reference types="@webgpu/types" />
import * as tf from '@tensorflow/tfjs-core';
import type {WebGPUBackend} from '@tensorflow/tfjs-backend-webgpu';

import type {AttentionShapes} from '../../src/checks';
import type {FlashAttentionAttrs, FlashAttentionKVCacheAttrs} from '../../src/kernel_names';
import {FlashAttentionKVCache, FlashDecodeOut} from '../../src/kernel_names';

import {BoundedCache} from './bounded_cache';
import {DENSE_THREADS} from './dense_webgpu';
import {DecodeCombineDenseProgram} from './flash_decode_combine_dense_webgpu';
import {DecodeCombineProgram, DECODE_COMBINE_UNIFORMS} from './flash_decode_combine_webgpu';
import {DecodeRotaryProgram} from './flash_decode_rotary_webgpu';
import {DECODE_MAX_ROWS, DECODE_SPLIT_UNIFORMS, DECODE_TILE} from './flash_decode_split_webgpu';
import {DecodeSplitProgram} from './flash_decode_split_webgpu';
import type {OwnCopy, OwnPipelineSpec} from './own_pipeline';
import {dispatchGrid, recordOwnPipeline, UniformWriter} from './own_pipeline';
import {scoreKey, scoreOptionsFromAttrs} from './wgsl_snippets';

/** Workgroups that keep a large GPU busy (an H100 has 132 SMs). */
const TARGET_WORKGROUPS = 528;

/** Why the fused kernel cannot take a call, or null. */
export function supportsFlashDecodeWebGPU(
    shapes: AttentionShapes, attrs: FlashAttentionAttrs): string|null {
  if (shapes.headDim % 4 !== 0 || shapes.headDimV % 4 !== 0) {
    return 'the WebGPU decode kernel needs head dims divisible by 4 (vec4 loads), got ' +
        `D=${shapes.headDim}, Dv=${shapes.headDimV}`;
  }
  if (attrs.dropoutRate !== 0) {
    return 'the WebGPU decode kernel has no dropout';
  }
  return null;
}

/** How the key range is split, from the longest row. */
export function planSplits(maxSeqK: number, rowGroups: number, target = TARGET_WORKGROUPS):
    {numSplits: number, splitKeys: number} {
  const tiles = Math.max(1, Math.ceil(maxSeqK / DECODE_TILE));
  const wanted = Math.max(1, Math.min(tiles, Math.ceil(target / rowGroups)));
  const splitKeys = Math.ceil(tiles / wanted) * DECODE_TILE;
  return {numSplits: Math.max(1, Math.ceil(maxSeqK / splitKeys)), splitKeys};
}

/** Testing and benchmarks: force the number of workgroups the splits aim at. */
let targetOverride: number|null = null;
export function setDecodeTargetWorkgroups(n: number|null): void {
  targetOverride = n;
}

/** What the split pass of one decode step runs. */
export interface DecodePlan {
  /** Query rows per workgroup and row chunks per (batch, kv head). */
  rows: number;
  rowChunks: number;
  numSplits: number;
  /** Keys per split (a multiple of DECODE_TILE). */
  splitKeys: number;
  /** Workgroups of the split pass: B * Hk * rowChunks * numSplits. */
  workgroups: number;
  threadsPerWorkgroup: number;
}

/** The plan for query [B, Sq, H, *], Hk kv heads and the longest row's keys. */
export function planDecode(
    batch: number, seqQ: number, heads: number, headsKV: number, maxSeqK: number): DecodePlan {
  const groups = heads / headsKV;
  const rows = Math.min(DECODE_MAX_ROWS, groups * seqQ);
  const rowChunks = Math.ceil(groups * seqQ / rows);
  const rowGroups = batch * headsKV * rowChunks;
  const {numSplits, splitKeys} =
      planSplits(Math.max(1, maxSeqK), rowGroups, targetOverride ?? TARGET_WORKGROUPS);
  return {
    rows,
    rowChunks,
    numSplits,
    splitKeys,
    workgroups: rowGroups * numSplits,
    threadsPerWorkgroup: DECODE_TILE,
  };
}

interface KVCacheKernelInputs {
  q: tf.TensorInfo;
  kCache: tf.TensorInfo;
  vCache: tf.TensorInfo;
  k?: tf.TensorInfo;
  v?: tf.TensorInfo;
  alibiSlopes?: tf.TensorInfo;
  rotaryCos?: tf.TensorInfo;
  rotarySin?: tf.TensorInfo;
}

/** Copies of the new rows of each batch row into the cache (contiguous). */
function appendCopies(
    update: tf.TensorInfo, cache: tf.TensorInfo, cacheSeqlens: number[]): OwnCopy[] {
  const [, seqNew, heads, dim] = update.shape;
  const seqMax = cache.shape[1];
  const rowBytes = heads * dim * 4;
  if (seqNew === 0) {
    return [];
  }
  return cacheSeqlens.map((start, b) => ({
                            src: update,
                            srcOffset: b * seqNew * rowBytes,
                            dst: cache,
                            dstOffset: (b * seqMax + start) * rowBytes,
                            size: seqNew * rowBytes,
                          }));
}

export function flashDecodeWebGPU(args: {
  inputs: tf.NamedTensorInfoMap,
  backend: tf.KernelBackend,
  attrs?: tf.NamedAttrMap,
}): tf.TensorInfo[] {
  const backend = args.backend as unknown as WebGPUBackend;
  const inputs = args.inputs as unknown as KVCacheKernelInputs;
  const attrs = args.attrs as unknown as FlashAttentionKVCacheAttrs;
  const rotary = inputs.rotaryCos != null && inputs.rotarySin != null;
  if (!rotary && attrs.packedHeads == null) {
    return decodeAttention(backend, inputs, attrs, false, inputs.k?.shape[1] ?? 0);
  }
  // The rotary (or unpacking) pass also appends the new keys and values to
  // the caches.
  const qRot = rotateStep(backend, inputs, attrs);
  const seqNew = attrs.packedHeads != null ? inputs.q.shape[1] : inputs.k?.shape[1] ?? 0;
  try {
    return decodeAttention(backend, {...inputs, q: qRot}, attrs, true, seqNew);
  } finally {
    // Owned by the pending command queue: tfjs frees it after its submit.
    backend.disposeData(qRot.dataId);
  }
}

/** Programs by configuration, so a step builds no program or key string. */
const rotaryPrograms = new BoundedCache<DecodeRotaryProgram>(32);
const splitPrograms = new BoundedCache<OwnPipelineSpec>(32);
const combinePrograms = new BoundedCache<OwnPipelineSpec>(32);

/**
 * q rotated (one dispatch, the returned tensor), with the new keys rotated
 * and the new values written into the caches at cacheSeqlens; with a
 * packed q (attrs.packedHeads) q, k and v are read from it, rotated or not.
 */
function rotateStep(
    backend: WebGPUBackend, inputs: KVCacheKernelInputs,
    attrs: FlashAttentionKVCacheAttrs): tf.TensorInfo {
  const {kCache, vCache, rotaryCos, rotarySin} = inputs;
  const packed = attrs.packedHeads != null;
  // Packed: q, k and v are heads of one [B, S, H + 2 Hk, D] tensor.
  const q = inputs.q;
  const k = packed ? q : inputs.k;
  const v = packed ? q : inputs.v;
  const [batch, seqQ, , headDim] = q.shape;
  const heads = attrs.packedHeads ?? q.shape[2];
  const hasK = k != null && v != null;
  const config = {
    headDim,
    headDimV: vCache.shape[3],
    rotaryDim: rotaryCos == null ? 0 : 2 * rotaryCos.shape[1],
    interleaved: attrs.rotaryInterleaved ?? false,
    hasK,
    batchVec4: Math.ceil(batch / 4),
    packed,
  };
  const program = rotaryPrograms.get(
      `${config.headDim},${config.headDimV},${config.rotaryDim},${config.interleaved},${hasK},${
          config.batchVec4},${packed}`,
      () => new DecodeRotaryProgram(config));
  const {bytes, grid} = program.uniforms(
      {
        batch,
        seqQ,
        heads,
        seqNew: hasK ? k.shape[1] : 0,
        headsKV: kCache.shape[2],
        seqMax: kCache.shape[1]
      },
      attrs.cacheSeqlens, attrs.rotaryQSameRow ?? false);
  const [qRot] = recordOwnPipeline(backend, program, {
    inputs: [q, k ?? q, v ?? q, rotaryCos ?? q, rotarySin ?? q],
    outputs: [{shape: [batch, seqQ, heads, headDim], dtype: 'float32'}],
    updates: hasK ? [kCache, vCache] : [],
    uniforms: bytes,
    dispatch: grid,
  });
  return qRot;
}

/** The split pass's partial results, and the shapes the second pass needs. */
interface SplitParts {
  parts: tf.TensorInfo[];
  rowsTotal: number;
  numSplits: number;
}

/**
 * Appends the new keys and values (unless `appended`: the rotary pass
 * wrote them), then split-KV attention: [out, lse].
 */
function decodeAttention(
    backend: WebGPUBackend, inputs: KVCacheKernelInputs, attrs: FlashAttentionKVCacheAttrs,
    appended: boolean, seqNew: number): tf.TensorInfo[] {
  const [batch, seqQ, heads] = inputs.q.shape;
  const headDimV = inputs.vCache.shape[3];
  const {parts, rowsTotal, numSplits} = recordSplit(backend, inputs, attrs, appended, seqNew);
  try {
    const combineSpec = combinePrograms.get(String(headDimV), () => {
      const combine = new DecodeCombineProgram(headDimV);
      return {
        key: combine.key,
        code: () => combine.getUserCode(),
        numInputs: 2,
        numOutputs: 2,
        hasUniforms: true,
        label: 'flash-decode-combine',
      };
    });
    const combineUniforms = new UniformWriter(new ArrayBuffer(16));
    const values = {heads, seqQ, numSplits, rowsTotal};
    DECODE_COMBINE_UNIFORMS.forEach(name => combineUniforms.i32(values[name]));
    return recordOwnPipeline(backend, combineSpec, {
      inputs: parts,
      outputs: [
        {shape: [batch, seqQ, heads, headDimV], dtype: 'float32'},
        {shape: [batch, heads, seqQ], dtype: 'float32'},
      ],
      uniforms: combineUniforms.finish(),
      // Shapes only (no lengths): a buffer kept per content, no write per step.
      cacheUniforms: true,
      dispatch: dispatchGrid(rowsTotal, backend.device.limits.maxComputeWorkgroupsPerDimension),
    });
  } finally {
    // Owned by the pending command queue: tfjs frees them after its submit.
    parts.forEach(p => backend.disposeData(p.dataId));
  }
}

/** Appends (unless `appended`) and records the split pass: its partial results. */
function recordSplit(
    backend: WebGPUBackend, inputs: KVCacheKernelInputs, attrs: FlashAttentionKVCacheAttrs,
    appended: boolean, seqNew: number): SplitParts {
  const {q, kCache, vCache, k, v, alibiSlopes} = inputs;
  const [batch, seqQ, heads, headDim] = q.shape;
  const [, seqMax, headsKV] = kCache.shape;
  const headDimV = vCache.shape[3];
  const groups = heads / headsKV;
  const cacheSeqlens = attrs.cacheSeqlens;
  const seqlensK = cacheSeqlens.map(n => n + seqNew);

  const copies = k == null || v == null || appended ?
      [] :
      [...appendCopies(k, kCache, cacheSeqlens), ...appendCopies(v, vCache, cacheSeqlens)];
  const {rows, rowChunks, numSplits, splitKeys, workgroups: groupsTotal} =
      planDecode(batch, seqQ, heads, headsKV, Math.max(...seqlensK));
  const score = scoreOptionsFromAttrs(attrs, alibiSlopes != null);
  const batchVec4 = Math.ceil(batch / 4);
  const splitSpec = splitPrograms.get(
      `${headDim},${headDimV},${groups},${seqQ},${rows},${batchVec4},${scoreKey(score)}`, () => {
        const split =
            new DecodeSplitProgram({headDim, headDimV, groups, seqQ, rows, batchVec4, score});
        return {
          key: split.key,
          code: () => split.getUserCode(),
          numInputs: 4,
          numOutputs: 2,
          hasUniforms: true,
          label: 'flash-decode-split',
        };
      });
  const writer =
      new UniformWriter(new ArrayBuffer(4 * DECODE_SPLIT_UNIFORMS.length + 16 * batchVec4));
  const alibiPerBatch = alibiSlopes != null && alibiSlopes.shape.length === 2 ? 1 : 0;
  const uniformValues: Record<typeof DECODE_SPLIT_UNIFORMS[number], number> = {
    heads,
    headsKV,
    seqMax,
    numSplits,
    splitKeys,
    rowChunks,
    alibiPerBatch,
    groupsTotal,
    scale: attrs.softmaxScale,
    softcap: attrs.softcap,
    left: attrs.windowLeft,
    right: attrs.windowRight,
  };
  for (const name of DECODE_SPLIT_UNIFORMS) {
    if (name === 'scale' || name === 'softcap') {
      writer.f32(uniformValues[name]);
    } else {
      writer.i32(uniformValues[name]);
    }
  }
  for (let b = 0; b < 4 * batchVec4; b++) {
    writer.i32(b < batch ? seqlensK[b] : 0);
  }
  const rowsTotal = batch * seqQ * heads;
  const parts = recordOwnPipeline(
      backend, splitSpec, {
        inputs: [q, kCache, vCache, alibiSlopes ?? q],
        outputs: [
          {shape: [rowsTotal, numSplits, headDimV], dtype: 'float32'},
          {shape: [rowsTotal, numSplits, 2], dtype: 'float32'},
        ],
        uniforms: writer.finish(),
        dispatch: dispatchGrid(groupsTotal, backend.device.limits.maxComputeWorkgroupsPerDimension),
      },
      copies);
  return {parts, rowsTotal, numSplits};
}

const combineDensePrograms = new BoundedCache<DecodeCombineDenseProgram>(16);

/**
 * FlashDecodeOut: split-KV attention of q over the caches (their new rows
 * already written) and the output projection of each token, the merge of
 * the splits and the projection in one pass: `[y [B * Sq, N]]`.
 */
export function flashDecodeOutWebGPU(args: {
  inputs: tf.NamedTensorInfoMap,
  backend: tf.KernelBackend,
  attrs?: tf.NamedAttrMap,
}): tf.TensorInfo {
  const backend = args.backend as unknown as WebGPUBackend;
  const inputs =
      args.inputs as unknown as KVCacheKernelInputs & {w: tf.TensorInfo, bias: tf.TensorInfo};
  const attrs = args.attrs as unknown as FlashAttentionKVCacheAttrs & {hasBias: boolean};
  const [batch, seqQ, heads] = inputs.q.shape;
  const headDimV = inputs.vCache.shape[3];
  const cols = inputs.w.shape[1];
  const {parts, numSplits} = recordSplit(backend, inputs, attrs, true, 0);
  try {
    const program = combineDensePrograms.get(
        `${heads},${headDimV},${+ attrs.hasBias}`,
        () => new DecodeCombineDenseProgram(heads, headDimV, attrs.hasBias));
    const tokens = batch * seqQ;
    const uniforms = new UniformWriter(new ArrayBuffer(16));
    uniforms.i32(tokens).i32(cols).i32(Math.ceil(cols / DENSE_THREADS)).i32(numSplits);
    return recordOwnPipeline(backend, program, {
      inputs: [parts[0], parts[1], inputs.w, inputs.bias],
      outputs: [{shape: [tokens, cols], dtype: 'float32'}],
      uniforms: uniforms.finish(),
      // Shapes only (no lengths): a buffer kept per content, no write per step.
      cacheUniforms: true,
      dispatch: dispatchGrid(
          DecodeCombineDenseProgram.workgroups(tokens, cols),
          backend.device.limits.maxComputeWorkgroupsPerDimension),
    })[0];
  } finally {
    // Owned by the pending command queue: tfjs frees them after its submit.
    parts.forEach(p => backend.disposeData(p.dataId));
  }
}

export const flashDecodeOutWebGPUConfig: tf.KernelConfig = {
  kernelName: FlashDecodeOut,
  backendName: 'webgpu',
  kernelFunc: flashDecodeOutWebGPU as unknown as tf.KernelFunc,
};

export const flashDecodeWebGPUConfig: tf.KernelConfig = {
  kernelName: FlashAttentionKVCache,
  backendName: 'webgpu',
  kernelFunc: flashDecodeWebGPU as unknown as tf.KernelFunc,
};
