/**
 * Counts what a piece of tfjs work costs the WebGPU API: queue submits,
 * compute dispatches, host uploads (tensors tfjs-backend-webgpu copies from
 * the CPU through a staging buffer), queue.writeBuffer calls (tfjs's
 * per-kernel uniforms), buffers created, read-backs, copies recorded and
 * error scopes pushed, with the time spent
 * in submit and createBuffer. Wraps the methods once on their prototypes
 * and on the backend; counting starts and stops with `reset`/`snapshot`.
 */
import * as tf from '@tensorflow/tfjs-core';

export interface WebGPUCounts {
  submits: number;
  submitMs: number;
  dispatches: number;
  hostUploads: number;
  hostUploadBytes: number;
  writeBuffers: number;
  buffersCreated: number;
  createBufferMs: number;
  readBacks: number;
  /** copyBufferToBuffer commands recorded (e.g. cache appends). */
  bufferCopies: number;
  /** device.pushErrorScope calls (each costs a round trip to resolve). */
  errorScopes: number;
  /** device.createBindGroup calls (tfjs's kernels make one per dispatch). */
  bindGroups: number;
  /** Host uploads by dtype and shape, e.g. `float32[] 12` (12 scalars). */
  uploadShapes: Map<string, number>;
}

function zeroCounts(): WebGPUCounts {
  return {
    submits: 0,
    submitMs: 0,
    dispatches: 0,
    hostUploads: 0,
    hostUploadBytes: 0,
    writeBuffers: 0,
    buffersCreated: 0,
    createBufferMs: 0,
    readBacks: 0,
    bufferCopies: 0,
    errorScopes: 0,
    bindGroups: 0,
    uploadShapes: new Map()
  };
}

type Method = (...args: unknown[]) => unknown;

function wrap(
    proto: object, name: string, before: (self: unknown, args: unknown[]) => void,
    timed?: (ms: number) => void): void {
  const target = proto as Record<string, Method>;
  const original = target[name];
  if (typeof original !== 'function') {
    return;
  }
  target[name] = function(this: unknown, ...args: unknown[]) {
    before(this, args);
    const t0 = timed ? performance.now() : 0;
    try {
      return original.apply(this, args);
    } finally {
      timed?.(performance.now() - t0);
    }
  };
}

interface BackendLike {
  device: GPUDevice;
  uploadToGPU(dataId: object): void;
  tensorMap:
      {get(dataId: object): {values?: unknown, resource?: unknown, shape: number[], dtype: string}};
}

let installed: WebGPUCounters|null = null;
let installedOn: unknown = null;

/** The counters of the active webgpu backend (installed on first use). */
export function webgpuCounters(): WebGPUCounters {
  if (installed == null || installedOn !== tf.backend()) {
    installed = new WebGPUCounters();
    installedOn = tf.backend();
  }
  installed.reset();
  return installed;
}

export class WebGPUCounters {
  private counts = zeroCounts();

  /** Installs the counters on the active webgpu backend's device and itself. */
  constructor() {
    const backend = tf.backend() as unknown as BackendLike;
    const device = backend.device;
    if (device == null) {
      throw new Error(`WebGPUCounters: expected the webgpu backend, got ${tf.getBackend()}`);
    }
    const c = () => this.counts;
    wrap(
        Object.getPrototypeOf(device.queue), 'submit', () => c().submits++,
        ms => c().submitMs += ms);
    wrap(Object.getPrototypeOf(device.queue), 'writeBuffer', () => c().writeBuffers++);
    wrap(
        Object.getPrototypeOf(device), 'createBuffer', () => c().buffersCreated++,
        ms => c().createBufferMs += ms);
    wrap(Object.getPrototypeOf(device), 'pushErrorScope', () => c().errorScopes++);
    wrap(Object.getPrototypeOf(device), 'createBindGroup', () => c().bindGroups++);
    const encoder = device.createCommandEncoder();
    wrap(Object.getPrototypeOf(encoder), 'copyBufferToBuffer', () => c().bufferCopies++);
    const pass = encoder.beginComputePass();
    wrap(Object.getPrototypeOf(pass), 'dispatchWorkgroups', () => c().dispatches++);
    pass.end();
    encoder.finish();
    const buffer = device.createBuffer({size: 4, usage: GPUBufferUsage.MAP_READ});
    wrap(Object.getPrototypeOf(buffer), 'mapAsync', () => c().readBacks++);
    buffer.destroy();
    // An upload is a tensor with host values and no GPU buffer yet.
    const upload = backend.uploadToGPU.bind(backend);
    backend.uploadToGPU = (dataId: object) => {
      const data = backend.tensorMap.get(dataId);
      if (data != null && data.values != null && data.resource == null) {
        c().hostUploads++;
        c().hostUploadBytes += 4 * tf.util.sizeFromShape(data.shape);
        const key = `${data.dtype}[${data.shape}]`;
        c().uploadShapes.set(key, (c().uploadShapes.get(key) ?? 0) + 1);
      }
      upload(dataId);
    };
    this.counts = zeroCounts();
  }

  reset(): void {
    this.counts = zeroCounts();
  }

  /** The counts since the last reset. */
  snapshot(): WebGPUCounts {
    return {...this.counts, uploadShapes: new Map(this.counts.uploadShapes)};
  }
}
