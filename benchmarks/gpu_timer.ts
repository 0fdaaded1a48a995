/**
 * GPU time of a tfjs-webgpu step from timestamp queries, shared by the
 * benchmarks: wall-clock repetitions include the host (recording, promise
 * polling, whatever else the process does), which can stall the GPU's feed;
 * the timestamps count only the GPU's own time.
 */
/// <reference types="@webgpu/types" />
import type * as tfc from '@tensorflow/tfjs-core';

/** The parts of tfjs's WebGPUBackend the timer records into. */
export interface TimedBackend {
  device: GPUDevice;
  commandEncoder: GPUCommandEncoder|null;
  ensureCommandEncoderReady(): void;
  endComputePassEncoder(): void;
  submitQueue(): void;
}

/** Submits what tfjs has recorded and waits for the GPU to finish it. */
export async function drainQueue(b: TimedBackend): Promise<void> {
  b.ensureCommandEncoderReady();
  b.endComputePassEncoder();
  b.submitQueue();
  await b.device.queue.onSubmittedWorkDone();
}

/**
 * GPU milliseconds per `step`, or null without the 'timestamp-query'
 * feature: K steps recorded into one command buffer (no submit in
 * between) after a first timestamp, a second one after them, so the GPU
 * runs them back to back and the time is theirs (kernels, copies and the
 * barriers between them), not the CPU's recording of them.
 */
export async function gpuStepMs(
    tf: typeof tfc, b: TimedBackend, step: () => void, k: number): Promise<number|null> {
  if (typeof b.submitQueue !== 'function' || !b.device.features.has('timestamp-query')) {
    return null;
  }
  const device = b.device;
  const querySet = device.createQuerySet({type: 'timestamp', count: 2});
  const resolved = device.createBuffer(
      {size: 16, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC});
  const staging =
      device.createBuffer({size: 16, usage: GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ});
  // An empty pass that only writes a timestamp, recorded into tfjs's encoder.
  const mark = (timestampWrites: GPUComputePassTimestampWrites) => {
    b.ensureCommandEncoderReady();
    b.endComputePassEncoder();
    b.commandEncoder!.beginComputePass({timestampWrites}).end();
  };
  await drainQueue(b);
  const flag = 'WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE';
  const saved = tf.env().getNumber(flag);
  tf.env().set(flag, 1 << 30);
  try {
    mark({querySet, beginningOfPassWriteIndex: 0});
    for (let i = 0; i < k; i++) {
      step();
    }
    mark({querySet, endOfPassWriteIndex: 1});
    b.commandEncoder!.resolveQuerySet(querySet, 0, 2, resolved, 0);
    b.commandEncoder!.copyBufferToBuffer(resolved, 0, staging, 0, 16);
    b.submitQueue();
  } finally {
    tf.env().set(flag, saved);
  }
  await staging.mapAsync(GPUMapMode.READ);
  const [t0, t1] = new BigUint64Array(staging.getMappedRange().slice(0));
  staging.unmap();
  [staging, resolved].forEach(x => x.destroy());
  querySet.destroy();
  return Number(t1 - t0) / 1e6 / k;
}
