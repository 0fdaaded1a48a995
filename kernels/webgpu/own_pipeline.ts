/**
 * Runs a compute pipeline of our own on the tfjs webgpu backend's device,
 * over tfjs tensors, with several outputs (tfjs's runWebGPUProgram has one).
 *
 * Ordering: our dispatches are recorded into tfjs's own command encoder
 * and compute pass, in call order with tfjs's kernels, and submitted by
 * tfjs's batching (WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE dispatches, or a
 * read). The queue runs them in order, so no barrier is needed; every
 * tensor bound is marked as owned by the pending encoder, so tfjs defers
 * the reuse of its buffer until it submits. A steady-state call costs no
 * queue submit of its own (a submit costs milliseconds on some drivers).
 *
 * Bindings, group 0: inputs (read-only storage) at 0..n-1, outputs
 * (read_write storage: the new tensors, then those updated in place) at
 * n..n+m-1, then the uniform buffer (if any) at n+m.
 * An explicit bind group layout is used, so a shader need not use every
 * binding. Bind groups are kept per pipeline by the identity of their
 * buffers (tfjs's pool returns the same buffers call after call), so a
 * steady-state call creates none.
 *
 * Errors: WebGPU reports shader and validation errors asynchronously.
 * Error scopes cost a round trip each, so only the first use of a pipeline
 * runs inside them: its creation, and its first dispatch, which is
 * submitted at once (after tfjs's pending work, so an invalid dispatch
 * cannot take tfjs's work down with it). What can differ between later
 * dispatches of the same pipeline (binding sizes, workgroup counts) is
 * checked on the CPU against the device's limits before any GPU work. An
 * error found is kept on the pipeline, which then throws on every later
 * use, and `checkOwnPipelineErrors` (awaitable) throws it once known.
 *
 * Only type imports of @tensorflow/tfjs-backend-webgpu: the package is an
 * optional peer and stays out of our bundles.
 */
/// <reference types="@webgpu/types" />
import * as tf from '@tensorflow/tfjs-core';
import type {WebGPUBackend} from '@tensorflow/tfjs-backend-webgpu';
import {BoundedCache} from './bounded_cache';

/** A pipeline: `key` names every constant baked into the code. */
export interface OwnPipelineSpec {
  key: string;
  /** The WGSL source; only called on a cache miss. */
  code: () => string;
  /** Number of input and output storage bindings, and a uniform or not. */
  numInputs: number;
  numOutputs: number;
  hasUniforms: boolean;
  entryPoint?: string;
  label?: string;
}

export interface OwnOutput {
  shape: number[];
  dtype: tf.DataType;
}

export interface OwnRun {
  inputs: tf.TensorInfo[];
  outputs: OwnOutput[];
  /**
   * Existing tensors the pipeline writes in place (e.g. a cache variable),
   * bound read_write after the new outputs; `numOutputs` counts both.
   */
  updates?: tf.TensorInfo[];
  /** Raw bytes of the uniform struct (std140-like layout is the caller's). */
  uniforms?: ArrayBuffer;
  /** Workgroup counts, each <= maxComputeWorkgroupsPerDimension. */
  dispatch: [number, number, number];
  /**
   * The uniforms repeat between calls (they follow from shapes and options
   * only): bind a buffer kept per content instead of writing a fresh one.
   */
  cacheUniforms?: boolean;
}

export interface PipelineEntry {
  pipeline: GPUComputePipeline;
  layout: GPUBindGroupLayout;
  /** Set once an error of this pipeline is known. */
  error: Error|null;
  /** Has its first dispatch (checked in error scopes) been made? */
  dispatched: boolean;
  /** Bind groups by the identities of their buffers (`bindGroupFor`). */
  bindGroups: BoundedCache<GPUBindGroup>;
}

/**
 * Buffer combinations kept per pipeline before its bind groups start over.
 * tfjs's pool order shifts with where its submits fall, so a loop of
 * forward+backward calls cycles through a few hundred combinations before
 * it repeats (benchmarks/js_overhead.ts prints bind groups per call).
 */
const BIND_GROUP_CACHE_SIZE = 512;

interface DeviceState {
  pipelines: Map<string, PipelineEntry>;
  /**
   * Error scopes not yet resolved (creation and dispatches); each removes
   * itself once resolved, so the set holds only work still in flight and a
   * long run without checkOwnPipelineErrors keeps no per-dispatch state.
   */
  pending: Set<Promise<void>>;
  /** The first error found and not yet thrown by checkOwnPipelineErrors. */
  firstError: Error|null;
  /** How many errors were found since the last check (messages dropped). */
  errorCount: number;
  /** Uniform buffers by content (`OwnRun.cacheUniforms`); never written again. */
  uniformBuffers: BoundedCache<GPUBuffer>;
  limits: KernelLimits;
}

/**
 * The device limits the kernels check on every call, read once: each read
 * of `device.limits` and its fields is a call into the native binding.
 */
export interface KernelLimits {
  maxStorageBufferBindingSize: number;
  maxComputeWorkgroupsPerDimension: number;
  maxComputeWorkgroupStorageSize: number;
  maxComputeInvocationsPerWorkgroup: number;
  maxComputeWorkgroupSizeX: number;
}

/** Uniform contents kept per device before the cache starts over. */
const UNIFORM_CACHE_SIZE = 64;

const states = new WeakMap<GPUDevice, DeviceState>();

function stateOf(device: GPUDevice): DeviceState {
  let s = states.get(device);
  if (s == null) {
    s = {
      pipelines: new Map(),
      pending: new Set(),
      firstError: null,
      errorCount: 0,
      uniformBuffers: new BoundedCache(UNIFORM_CACHE_SIZE),
      limits: readLimits(device.limits),
    };
    states.set(device, s);
  }
  return s;
}

function readLimits(limits: GPUSupportedLimits): KernelLimits {
  return {
    maxStorageBufferBindingSize: limits.maxStorageBufferBindingSize,
    maxComputeWorkgroupsPerDimension: limits.maxComputeWorkgroupsPerDimension,
    maxComputeWorkgroupStorageSize: limits.maxComputeWorkgroupStorageSize,
    maxComputeInvocationsPerWorkgroup: limits.maxComputeInvocationsPerWorkgroup,
    maxComputeWorkgroupSizeX: limits.maxComputeWorkgroupSizeX,
  };
}

/** KernelLimits of a device (read once). */
export function kernelLimits(device: GPUDevice): KernelLimits {
  return stateOf(device).limits;
}

let poisonOutputs = false;

/**
 * Testing aid: fill every output with NaN before the dispatch, so that an
 * element a kernel forgets to write is caught.
 */
export function setPoisonOutputs(on: boolean): void {
  poisonOutputs = on;
}

/**
 * Is this the tfjs webgpu backend (by what the kernels use of it: its
 * device, tensor map, uploads and queue)? Checked by shape, so the package
 * never imports @tensorflow/tfjs-backend-webgpu at run time.
 */
export function isWebGPUBackend(backend: unknown): backend is WebGPUBackend {
  const b = backend as Partial<WebGPUBackend>| null | undefined;
  return b != null && b.device != null && b.tensorMap != null &&
      typeof b.uploadToGPU === 'function' && typeof b.submitQueue === 'function';
}

/** The webgpu backend, or an error naming what is active. */
export function webgpuBackendOf(backend?: tf.KernelBackend): WebGPUBackend {
  const b = backend ?? tf.backend();
  if (!isWebGPUBackend(b)) {
    throw new Error(`expected the tfjs webgpu backend, got ${tf.getBackend()}`);
  }
  return b;
}

/** Does the backend's device have the WGSL `subgroups` extension? */
export function deviceHasSubgroups(device: GPUDevice): boolean {
  return device.features.has('subgroups' as GPUFeatureName);
}

/** Splits `total` workgroups into an (x, y, 1) grid within `maxPerDim`. */
export function dispatchGrid(total: number, maxPerDim = 65535): [number, number, number] {
  const x = Math.max(1, Math.min(total, maxPerDim));
  const y = Math.ceil(total / x);
  if (y > maxPerDim) {
    throw new Error(`too many workgroups: ${total} > ${maxPerDim}^2`);
  }
  return [x, y, 1];
}

function errorText(scopeError: GPUError|null): string|null {
  return scopeError == null ? null : scopeError.message;
}

/** Watches the scopes pushed by `pushScopes`, recording what they catch. */
export function watchScopes(device: GPUDevice, what: string, onError: (e: Error) => void): void {
  const state = stateOf(device);
  const internal = device.popErrorScope();
  const validation = device.popErrorScope();
  const oom = device.popErrorScope();
  const done =
      Promise.all([validation, internal, oom])
          .then(
              errors => {
                const messages = errors.map(errorText).filter(m => m != null);
                if (messages.length > 0) {
                  const error = new Error(`${what} failed on the GPU: ${messages.join('; ')}`);
                  recordError(state, error);
                  onError(error);
                }
              },
              (e: unknown) => {
                const error = new Error(`${what}: could not read the GPU error scope: ${e}`);
                recordError(state, error);
                onError(error);
              });
  track(state, done);
}

function recordError(state: DeviceState, error: Error): void {
  state.firstError = state.firstError ?? error;
  state.errorCount++;
}

/** Keeps `p` in the pending set until it settles. */
function track(state: DeviceState, p: Promise<void>): void {
  state.pending.add(p);
  void p.then(() => state.pending.delete(p));
}

/** Unresolved error scopes of the current backend's device (for tests). */
export function pendingErrorScopes(backend?: tf.KernelBackend): number {
  return stateOf(webgpuBackendOf(backend).device).pending.size;
}

/** Opens the error scopes that `watchScopes` closes. */
export function pushScopes(device: GPUDevice): void {
  device.pushErrorScope('out-of-memory');
  device.pushErrorScope('validation');
  device.pushErrorScope('internal');
}

/** The compiled pipeline of `spec` (cached per device); check its `error`. */
export function getPipeline(device: GPUDevice, spec: OwnPipelineSpec): PipelineEntry {
  const state = stateOf(device);
  const cached = state.pipelines.get(spec.key);
  if (cached != null) {
    return cached;
  }
  const label = spec.label ?? spec.key;
  const entries: GPUBindGroupLayoutEntry[] = [];
  for (let i = 0; i < spec.numInputs + spec.numOutputs; i++) {
    entries.push({
      binding: i,
      visibility: GPUShaderStage.COMPUTE,
      buffer: {type: i < spec.numInputs ? 'read-only-storage' : 'storage'},
    });
  }
  if (spec.hasUniforms) {
    entries.push({
      binding: spec.numInputs + spec.numOutputs,
      visibility: GPUShaderStage.COMPUTE,
      buffer: {type: 'uniform'},
    });
  }
  pushScopes(device);
  const layout = device.createBindGroupLayout({entries, label});
  const module = device.createShaderModule({code: spec.code(), label});
  const pipeline = device.createComputePipeline({
    label,
    layout: device.createPipelineLayout({bindGroupLayouts: [layout]}),
    compute: {module, entryPoint: spec.entryPoint ?? 'main'},
  });
  const entry: PipelineEntry = {
    pipeline,
    layout,
    error: null,
    dispatched: false,
    bindGroups: new BoundedCache(BIND_GROUP_CACHE_SIZE),
  };
  watchScopes(device, `WGSL pipeline '${label}'`, e => {
    entry.error = e;
  });
  // Shader messages carry line numbers; add them to the error once known.
  if (typeof module.getCompilationInfo === 'function') {
    track(state, module.getCompilationInfo().then(info => {
      const errors = info.messages.filter(m => m.type === 'error')
                         .map(m => `line ${m.lineNum}:${m.linePos}: ${m.message}`);
      if (errors.length > 0) {
        const error =
            new Error(`WGSL of pipeline '${label}' does not compile: ${errors.join('; ')}`);
        entry.error = entry.error ?? error;
        recordError(state, error);
      }
    }, () => undefined));
  }
  state.pipelines.set(spec.key, entry);
  return entry;
}

/**
 * A uniform buffer holding `bytes`, made once per content and device. It is
 * written at creation only, so binding it in any number of pending
 * dispatches is safe; a dropped buffer lives on while encoded work uses it.
 */
function cachedUniformBuffer(device: GPUDevice, bytes: ArrayBuffer): GPUBuffer {
  const key = String.fromCharCode(...new Uint16Array(bytes));
  return stateOf(device).uniformBuffers.get(key, () => {
    const size = Math.max(16, Math.ceil(bytes.byteLength / 16) * 16);
    const buffer =
        device.createBuffer({size, usage: GPUBufferUsage.UNIFORM, mappedAtCreation: true});
    new Uint8Array(buffer.getMappedRange()).set(new Uint8Array(bytes));
    buffer.unmap();
    return buffer;
  });
}

/** A number per GPUBuffer object, for bind group keys (never reused). */
const bufferIds = new WeakMap<GPUBuffer, number>();
let nextBufferId = 0;

function bufferId(buffer: GPUBuffer): number {
  let id = bufferIds.get(buffer);
  if (id == null) {
    id = nextBufferId++;
    bufferIds.set(buffer, id);
  }
  return id;
}

/**
 * The bind group of `buffers` (whole buffers, bound in order) for a
 * pipeline, made once per combination of buffer objects: creating one
 * costs more JavaScript than the rest of a dispatch, and tfjs hands the
 * same pooled buffers back call after call. A buffer released to tfjs's
 * pool and reused by another tensor is the same binding, so the entry
 * stays right; a destroyed buffer is never bound again, so its entries
 * are never hit and leave with the bounded cache.
 */
function bindGroupFor(
    device: GPUDevice, entry: PipelineEntry, buffers: GPUBuffer[], what: string): GPUBindGroup {
  let key = '';
  for (const b of buffers) {
    key += `${bufferId(b)},`;
  }
  return entry.bindGroups.get(key, () => {
    // A buffer's size never changes: checked once per combination.
    checkBindingSizes(device, what, buffers);
    return device.createBindGroup({
      layout: entry.layout,
      entries: buffers.map((buffer, binding) => ({binding, resource: {buffer}}))
    });
  });
}

/** The GPUBuffer behind a tensor (uploading it first if needed). */
export function gpuBufferOf(backend: WebGPUBackend, t: tf.TensorInfo): GPUBuffer {
  backend.uploadToGPU(t.dataId);
  const resource = backend.tensorMap.get(t.dataId).resource;
  if (!(resource instanceof GPUBuffer)) {
    throw new Error('expected a tensor stored in a GPUBuffer (not a texture)');
  }
  return resource;
}

/**
 * The pipeline of `spec` after checking `run` against it (inputs, outputs,
 * uniforms, dispatch within the device's limits); throws, before any GPU
 * work, if the pipeline is known broken.
 */
function checkedPipeline(device: GPUDevice, spec: OwnPipelineSpec, run: OwnRun): PipelineEntry {
  tf.util.assert(
      run.inputs.length === spec.numInputs,
      () => `${spec.key}: expected ${spec.numInputs} inputs, got ${run.inputs.length}`);
  const written = run.outputs.length + (run.updates?.length ?? 0);
  tf.util.assert(
      written === spec.numOutputs,
      () => `${spec.key}: expected ${spec.numOutputs} outputs and updates, got ${written}`);
  tf.util.assert(
      spec.hasUniforms === (run.uniforms != null),
      () => `${spec.key}: uniforms ${spec.hasUniforms ? 'missing' : 'not expected'}`);
  const entry = getPipeline(device, spec);
  if (entry.error != null) {
    throw entry.error;
  }
  const maxDim = kernelLimits(device).maxComputeWorkgroupsPerDimension;
  run.dispatch.forEach(
      n => tf.util.assert(
          Number.isInteger(n) && n >= 1 && n <= maxDim,
          () => `${spec.key}: dispatch ${run.dispatch} outside [1, ${maxDim}]`));
  return entry;
}

/**
 * Dispatches `spec` once and returns its outputs (new tensors owned by the
 * backend): recorded into tfjs's command encoder like recordOwnPipeline.
 */
export function runOwnPipeline(
    backend: WebGPUBackend, spec: OwnPipelineSpec, run: OwnRun): tf.TensorInfo[] {
  for (const t of run.inputs) {
    tf.util.assert(
        tf.util.sizeFromShape(t.shape) > 0, () => `${spec.key}: empty input of shape [${t.shape}]`);
  }
  return recordOwnPipeline(backend, spec, run);
}

/**
 * Waits for the GPU's verdict on every pipeline created and dispatch made so
 * far on this device, and throws the first error found (once).
 */
export async function checkOwnPipelineErrors(backend?: tf.KernelBackend): Promise<void> {
  const device = webgpuBackendOf(backend).device;
  const state = stateOf(device);
  while (state.pending.size > 0) {
    await Promise.all([...state.pending]);
  }
  const first = state.firstError;
  state.firstError = null;
  state.errorCount = 0;
  if (first != null) {
    throw first;
  }
}

/** A storage binding of an own pipeline: its WGSL name and array element type. */
export interface StorageBinding {
  name: string;
  type: string;
}

/**
 * WGSL declarations of a pipeline's bindings in the order runOwnPipeline
 * binds them: inputs (read-only storage arrays), outputs (read_write), then
 * the uniform block `uniform` of type `uniformType`, if given.
 */
export function bindingsWGSL(
    inputs: readonly StorageBinding[], outputs: readonly StorageBinding[],
    uniform?: {name: string, type: string}): string {
  const storage = (b: StorageBinding, i: number, access: string) =>
      `@group(0) @binding(${i}) var<storage, ${access}> ${b.name}: array<${b.type}>;`;
  const lines = [
    ...inputs.map((b, i) => storage(b, i, 'read')),
    ...outputs.map((b, i) => storage(b, inputs.length + i, 'read_write')),
  ];
  if (uniform != null) {
    lines.push(`@group(0) @binding(${inputs.length + outputs.length}) var<uniform> ${
        uniform.name}: ${uniform.type};`);
  }
  return lines.join('\n');
}

/** A uniform field: its name and 4-byte type. */
export type UniformField = readonly[string, 'i32' | 'u32' | 'f32'];

/** The WGSL struct of a uniform block, fields in list order. */
export function uniformStructWGSL(name: string, fields: readonly UniformField[]): string {
  return `struct ${name} {\n${fields.map(([f, type]) => `  ${f}: ${type},`).join('\n')}\n};`;
}

/** The bytes of a uniform block for `values` (one per field, by name). */
export function packUniforms(
    fields: readonly UniformField[], values: Readonly<Record<string, number>>): ArrayBuffer {
  const w = new UniformWriter();
  for (const [name, type] of fields) {
    tf.util.assert(values[name] != null, () => `uniform '${name}' has no value`);
    w[type](values[name]);
  }
  return w.finish();
}

/** Helper to fill a uniform buffer: 4-byte fields in declaration order. */
export class UniformWriter {
  private readonly view: DataView;
  private offset = 0;
  constructor(readonly bytes = new ArrayBuffer(256)) {
    this.view = new DataView(bytes);
  }
  f32(x: number): this {
    this.view.setFloat32(this.offset, x, true);
    this.offset += 4;
    return this;
  }
  i32(x: number): this {
    this.view.setInt32(this.offset, x, true);
    this.offset += 4;
    return this;
  }
  u32(x: number): this {
    this.view.setUint32(this.offset, x >>> 0, true);
    this.offset += 4;
    return this;
  }
  /** The bytes written, padded to 16. */
  finish(): ArrayBuffer {
    return this.bytes.slice(0, Math.max(16, Math.ceil(this.offset / 16) * 16));
  }
}

/** A buffer-to-buffer copy between tensors, in bytes (multiples of 4). */
export interface OwnCopy {
  src: tf.TensorInfo;
  srcOffset: number;
  dst: tf.TensorInfo;
  dstOffset: number;
  size: number;
}

/** Private fields of tfjs-backend-webgpu 4.x that recordOwnPipeline uses. */
interface BackendEncoderState {
  commandEncoder: GPUCommandEncoder|null;
  computePassEncoder: GPUComputePassEncoder|null;
  dispatchCountInPass: number;
  commandQueueOwnedIds: WeakSet<object>;
  uniformPendingDisposal: GPUBuffer[];
}

/** Dispatches tfjs records before it submits (its own flag). */
function submitBatchSize(): number {
  return tf.env().getNumber('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE');
}

/**
 * Throws unless each buffer fits a storage binding of the device (a uniform
 * buffer, bound last, is far smaller).
 */
function checkBindingSizes(device: GPUDevice, key: string, buffers: GPUBuffer[]): void {
  const max = kernelLimits(device).maxStorageBufferBindingSize;
  buffers.forEach(
      (b, i) => tf.util.assert(
          b.size <= max,
          () => `${key}: binding ${i} has ${b.size} bytes, over the device's ` +
              `maxStorageBufferBindingSize (${max})`));
}

/**
 * Records `spec` into tfjs's own command encoder and compute pass (see
 * the header: no submit of its own in steady state; error scopes and a
 * submit only on the pipeline's first dispatch) and returns its outputs.
 * `copies` are recorded first, so a step can write into an existing
 * tensor (e.g. append to a cache variable) and read it in the same
 * encoder.
 */
export function recordOwnPipeline(
    backend: WebGPUBackend, spec: OwnPipelineSpec, run: OwnRun,
    copies: OwnCopy[] = []): tf.TensorInfo[] {
  const device = backend.device;
  const entry = checkedPipeline(device, spec, run);
  const outputs = run.outputs.map(o => backend.makeTensorInfo(o.shape, o.dtype));
  const state = backend as unknown as BackendEncoderState;
  let scopesOpen = false;
  const closeScopes = () => {
    scopesOpen = false;
    watchScopes(device, `dispatch of '${spec.label ?? spec.key}'`, e => {
      entry.error = entry.error ?? e;
    });
  };
  try {
    const tensors = [...run.inputs, ...outputs, ...(run.updates ?? [])];
    const buffers = tensors.map(t => gpuBufferOf(backend, t));
    const copyBuffers = copies.map(c => [gpuBufferOf(backend, c.src), gpuBufferOf(backend, c.dst)]);
    const firstUse = !entry.dispatched;
    if (firstUse) {
      // tfjs's pending work goes to the queue on its own first.
      backend.ensureCommandEncoderReady();
      backend.endComputePassEncoder();
      backend.submitQueue();
      pushScopes(device);
      scopesOpen = true;
    }
    backend.ensureCommandEncoderReady();
    const encoder = state.commandEncoder!;
    if (copies.length > 0) {
      backend.endComputePassEncoder();
      copies.forEach((c, n) => {
        encoder.copyBufferToBuffer(
            copyBuffers[n][0], c.srcOffset, copyBuffers[n][1], c.dstOffset, c.size);
        state.commandQueueOwnedIds.add(c.src.dataId);
        state.commandQueueOwnedIds.add(c.dst.dataId);
      });
    }
    if (poisonOutputs) {
      // Fresh buffers: no pending work uses them, so writing now is safe.
      for (const b of buffers.slice(run.inputs.length, run.inputs.length + outputs.length)) {
        device.queue.writeBuffer(b, 0, new Float32Array(b.size / 4).fill(NaN));
      }
    }
    const bound = buffers.slice();
    if (run.uniforms != null && run.cacheUniforms === true) {
      bound.push(cachedUniformBuffer(device, run.uniforms));
    } else if (run.uniforms != null) {
      const size = Math.max(16, Math.ceil(run.uniforms.byteLength / 16) * 16);
      const uniformBuffer = backend.bufferManager.acquireBuffer(
          size, GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST);
      device.queue.writeBuffer(uniformBuffer, 0, run.uniforms);
      // tfjs releases it after its next submit, as it does its own uniforms.
      state.uniformPendingDisposal.push(uniformBuffer);
      bound.push(uniformBuffer);
    }
    const bindGroup = bindGroupFor(device, entry, bound, spec.key);
    state.computePassEncoder ??= encoder.beginComputePass();
    const pass = state.computePassEncoder;
    pass.setPipeline(entry.pipeline);
    pass.setBindGroup(0, bindGroup);
    pass.dispatchWorkgroups(...run.dispatch);
    tensors.forEach(t => state.commandQueueOwnedIds.add(t.dataId));
    state.dispatchCountInPass++;
    if (firstUse) {
      backend.endComputePassEncoder();
      backend.submitQueue();
      entry.dispatched = true;
      closeScopes();
    } else if (state.dispatchCountInPass >= submitBatchSize()) {
      // As tfjs does after its own kernels: bounded encoders.
      backend.endComputePassEncoder();
      backend.submitQueue();
    }
  } catch (e) {
    if (scopesOpen) {
      closeScopes();
    }
    outputs.forEach(o => backend.disposeData(o.dataId));
    throw e;
  }
  return outputs;
}
