/**
 * The webgpu side of the fused AdamW optimizer (src/train/fused_adamw.ts):
 * a persistent state buffer per optimizer, and per step one compute pass
 * with [one sum-of-squares dispatch per variable, when clipping], one step
 * dispatch, and one update dispatch per variable, in place.
 *
 * Nothing is uploaded per step: the per-variable uniforms (size, workgroups,
 * partial-sum offset) are written once per set of variables (a "plan"), the
 * hyperparameters only when they change, and the step counter lives on the
 * GPU.
 *
 * Submits: the pass is recorded into the backend's own command encoder when
 * the installed tfjs-backend-webgpu has one (a private field, looked up at
 * run time), so the optimizer adds no queue submit of its own; the buffers
 * it reads and writes are marked in use by that encoder as tfjs's own
 * kernels do. A release without that field gets the portable path: tfjs's
 * recorded work is submitted, then ours (two submits per step).
 */
/// <reference types="@webgpu/types" />
import * as tf from '@tensorflow/tfjs-core';
import type {WebGPUBackend} from '@tensorflow/tfjs-backend-webgpu';

import {adamWGradNormProgram, gradNormWorkgroups} from './adamw_grad_norm_webgpu';
import {ADAMW_HYPER_WORDS, ADAMW_STATE, ADAMW_STATE_BYTES, ADAMW_UNIFORM_WORDS} from './adamw_state_wgsl';
import {adamWStepProgram} from './adamw_step_webgpu';
import {adamWUpdateProgram, updateWorkgroups} from './adamw_update_webgpu';
import {getPipeline, gpuBufferOf, pushScopes, watchScopes, webgpuBackendOf} from './own_pipeline';

export interface AdamWHyperparameters {
  learningRate: number;
  beta1: number;
  beta2: number;
  epsilon: number;
  weightDecay: number;
  /** 0 or null: no clipping. */
  clipNorm: number|null;
}

/** One variable's update: tensors whose buffers are updated in place. */
export interface AdamWSlot {
  param: tf.TensorInfo;
  m: tf.TensorInfo;
  v: tf.TensorInfo;
  grad: tf.TensorInfo;
}

/** Per-variable uniforms for one ordered set of variable sizes. */
interface Plan {
  update: GPUBuffer[];
  gradNorm: GPUBuffer[];
  step: GPUBuffer;
  partials: GPUBuffer;
  numPartials: number;
}

/** The private fields of WebGPUBackend this module uses when present. */
interface BackendInternals {
  commandEncoder?: GPUCommandEncoder|null;
  commandQueueOwnedIds?: WeakSet<object>;
}

export class AdamWWebGPUState {
  readonly backend: WebGPUBackend;
  private readonly device: GPUDevice;
  private readonly state: GPUBuffer;
  private readonly plans = new Map<string, Plan>();
  private hyperKey = '';
  private disposed = false;

  constructor(backend: tf.KernelBackend, step: number, beta1: number, beta2: number) {
    this.backend = webgpuBackendOf(backend);
    this.device = this.backend.device;
    this.state = this.device.createBuffer({
      size: ADAMW_STATE_BYTES,
      usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC,
      label: 'fused AdamW state',
    });
    this.setStep(step, beta1, beta2);
  }

  /**
   * Submits what tfjs has recorded: a host write to the state must not
   * overtake an earlier step still waiting in tfjs's encoder.
   */
  private flushRecorded(): void {
    this.backend.ensureCommandEncoderReady();
    this.backend.endComputePassEncoder();
    this.backend.submitQueue();
  }

  /** Writes the step counter and its bias corrections (init, setWeights). */
  setStep(step: number, beta1: number, beta2: number): void {
    const bytes = new ArrayBuffer(16);
    const view = new DataView(bytes);
    this.flushRecorded();
    view.setUint32(0, step, true);
    view.setFloat32(4, 1 - Math.pow(beta1, step), true);
    view.setFloat32(8, 1 - Math.pow(beta2, step), true);
    view.setFloat32(12, 1, true);
    this.device.queue.writeBuffer(this.state, ADAMW_STATE.step * 4, bytes);
  }

  /** Uploads the hyperparameters if they differ from the last ones written. */
  setHyperparameters(h: AdamWHyperparameters): void {
    const words = [
      h.learningRate, h.beta1, h.beta2, 1 - h.beta1, 1 - h.beta2, h.epsilon, h.weightDecay,
      h.clipNorm ?? 0
    ];
    const key = words.join(',');
    if (key === this.hyperKey) {
      return;
    }
    this.hyperKey = key;
    this.flushRecorded();
    this.device.queue.writeBuffer(this.state, 0, new Float32Array(words), 0, ADAMW_HYPER_WORDS);
  }

  private planFor(sizes: number[], clip: boolean): Plan {
    const key = `${clip}:${sizes.join(',')}`;
    let plan = this.plans.get(key);
    if (plan != null) {
      return plan;
    }
    const uniform = (words: number[], label: string) => {
      const buffer = this.device.createBuffer({
        size: 4 * ADAMW_UNIFORM_WORDS,
        usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
        label
      });
      const data = new Uint32Array(ADAMW_UNIFORM_WORDS);
      data.set(words);
      this.device.queue.writeBuffer(buffer, 0, data);
      return buffer;
    };
    let offset = 0;
    const gradNorm: GPUBuffer[] = [];
    if (clip) {
      for (const size of sizes) {
        const workgroups = gradNormWorkgroups(size);
        gradNorm.push(uniform([size, workgroups, offset], 'fused AdamW norm uniforms'));
        offset += workgroups;
      }
    }
    plan = {
      update: sizes.map(size => uniform([size, updateWorkgroups(size)], 'fused AdamW uniforms')),
      gradNorm,
      step: uniform([offset], 'fused AdamW step uniforms'),
      partials: this.device.createBuffer({
        size: 4 * Math.max(4, offset),
        usage: GPUBufferUsage.STORAGE,
        label: 'fused AdamW partial sums',
      }),
      numPartials: offset,
    };
    this.plans.set(key, plan);
    return plan;
  }

  /**
   * Encodes one optimizer step over `slots` (all float32, each param, m, v
   * and grad the same size). The caller guarantees that param, m and v own
   * their buffers (no other tensor shares them).
   */
  step(slots: AdamWSlot[], h: AdamWHyperparameters): void {
    tf.util.assert(!this.disposed, () => 'fused AdamW: the optimizer was disposed');
    const clip = h.clipNorm != null && h.clipNorm > 0;
    const sizes = slots.map(s => tf.util.sizeFromShape(s.param.shape));
    const plan = this.planFor(sizes, clip);
    this.setHyperparameters(h);
    const backend = this.backend;
    const device = this.device;
    const update = getPipeline(device, adamWUpdateProgram());
    const stepProgram = getPipeline(device, adamWStepProgram());
    const norm = clip ? getPipeline(device, adamWGradNormProgram()) : null;
    for (const entry of [update, stepProgram, norm]) {
      if (entry?.error != null) {
        throw entry.error;
      }
    }
    // Uploads (if any) are recorded into tfjs's encoder, before our pass.
    const buffers = slots.map(s => ({
                                grad: gpuBufferOf(backend, s.grad),
                                param: gpuBufferOf(backend, s.param),
                                m: gpuBufferOf(backend, s.m),
                                v: gpuBufferOf(backend, s.v),
                              }));
    backend.ensureCommandEncoderReady();
    backend.endComputePassEncoder();
    const internals = backend as unknown as BackendInternals;
    const shared = typeof internals.commandEncoder?.beginComputePass === 'function' &&
        internals.commandQueueOwnedIds instanceof WeakSet;
    let encoder: GPUCommandEncoder;
    if (shared) {
      encoder = internals.commandEncoder!;
      for (const s of slots) {
        for (const t of [s.grad, s.param, s.m, s.v]) {
          internals.commandQueueOwnedIds!.add(t.dataId);
        }
      }
    } else {
      backend.submitQueue();
      encoder = device.createCommandEncoder();
    }
    pushScopes(device);
    const bind = (layout: GPUBindGroupLayout, list: GPUBuffer[]) => device.createBindGroup({
      layout,
      entries: list.map((buffer, binding) => ({binding, resource: {buffer}})),
    });
    const pass = encoder.beginComputePass({label: 'fused AdamW'});
    if (norm != null) {
      pass.setPipeline(norm.pipeline);
      buffers.forEach((b, i) => {
        pass.setBindGroup(0, bind(norm.layout, [b.grad, plan.partials, plan.gradNorm[i]]));
        pass.dispatchWorkgroups(gradNormWorkgroups(sizes[i]));
      });
    }
    pass.setPipeline(stepProgram.pipeline);
    pass.setBindGroup(0, bind(stepProgram.layout, [plan.partials, this.state, plan.step]));
    pass.dispatchWorkgroups(1);
    pass.setPipeline(update.pipeline);
    buffers.forEach((b, i) => {
      pass.setBindGroup(
          0, bind(update.layout, [b.grad, this.state, b.param, b.m, b.v, plan.update[i]]));
      pass.dispatchWorkgroups(updateWorkgroups(sizes[i]));
    });
    pass.end();
    if (!shared) {
      device.queue.submit([encoder.finish()]);
    }
    watchScopes(device, 'fused AdamW step', () => undefined);
    // Values a read cached on the CPU are stale now.
    for (const s of slots) {
      for (const t of [s.param, s.m, s.v]) {
        const data = backend.tensorMap.get(t.dataId);
        if (data != null) {
          (data as {values: unknown}).values = null;
        }
      }
    }
  }

  /** The state buffer's words (tests and diagnostics; reads the GPU). */
  async readState(): Promise<{
    step: number,
    gradNorm: number,
    gradScale: number,
    biasCorrection1: number,
    biasCorrection2: number
  }> {
    const staging = this.device.createBuffer({
      size: ADAMW_STATE_BYTES,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    this.flushRecorded();
    const encoder = this.device.createCommandEncoder();
    encoder.copyBufferToBuffer(this.state, 0, staging, 0, ADAMW_STATE_BYTES);
    this.device.queue.submit([encoder.finish()]);
    await staging.mapAsync(GPUMapMode.READ);
    const bytes = staging.getMappedRange().slice(0);
    staging.unmap();
    staging.destroy();
    const f = new Float32Array(bytes);
    const u = new Uint32Array(bytes);
    return {
      step: u[ADAMW_STATE.step],
      gradNorm: f[ADAMW_STATE.gradNorm],
      gradScale: f[ADAMW_STATE.gradScale],
      biasCorrection1: f[ADAMW_STATE.biasCorrection1],
      biasCorrection2: f[ADAMW_STATE.biasCorrection2],
    };
  }

  dispose(): void {
    if (this.disposed) {
      return;
    }
    this.disposed = true;
    // Destroying is safe once the work using the buffers is submitted.
    try {
      this.flushRecorded();
    } catch {
      // The backend is gone (tf.removeBackend): nothing of ours is pending.
    }
    this.state.destroy();
    for (const plan of this.plans.values()) {
      [...plan.update, ...plan.gradNorm, plan.step, plan.partials].forEach(b => b.destroy());
    }
    this.plans.clear();
  }
}
