/**
 * Runs the backward's own compute pipelines on the tfjs webgpu backend's
 * device, over buffers that tfjs owns: tfjs's `runWebGPUProgram` has one
 * output, while the backward writes dK and dV in one pass.
 *
 * The passes are recorded into the backend's command encoder, after what
 * tfjs has recorded so far, and submitted at once; the buffers they touch
 * are marked as owned by the command queue, so tfjs does not recycle them
 * before the submit.
 */
import type {TensorInfo} from '@tensorflow/tfjs-core';
import type {WebGPUBackend} from '@tensorflow/tfjs-backend-webgpu';

/** One program: WGSL source and a key naming everything baked into it. */
export interface GradProgram {
  shaderKey: string;
  source: string;
}

export interface GradDispatch {
  program: GradProgram;
  /** Storage buffers in binding order, after the uniform buffer (binding 0). */
  tensors: TensorInfo[];
  workgroups: [number, number, number];
}

/** The backend's private members this module relies on. */
interface BackendInternals {
  commandEncoder: GPUCommandEncoder|null;
  commandQueueOwnedIds: WeakSet<object>;
  uniformPendingDisposal: GPUBuffer[];
  tensorMap: WebGPUBackend['tensorMap'];
  bufferManager: WebGPUBackend['bufferManager'];
}

const pipelines = new WeakMap<GPUDevice, Map<string, GPUComputePipeline>>();

function pipelineFor(device: GPUDevice, program: GradProgram): GPUComputePipeline {
  let cache = pipelines.get(device);
  if (cache == null) {
    cache = new Map();
    pipelines.set(device, cache);
  }
  let pipeline = cache.get(program.shaderKey);
  if (pipeline == null) {
    device.pushErrorScope('validation');
    const module = device.createShaderModule({code: program.source, label: program.shaderKey});
    pipeline = device.createComputePipeline(
        {layout: 'auto', compute: {module, entryPoint: 'main'}, label: program.shaderKey});
    // A failed pipeline would silently leave the outputs unwritten: report it.
    device.popErrorScope().then(error => {
      if (error != null) {
        console.error(`${program.shaderKey}: ${error.message}`);
      }
    });
    cache.set(program.shaderKey, pipeline);
  }
  return pipeline;
}

/** The GPU buffer of a tensor, uploading it first if it lives on the CPU. */
export function gpuBuffer(backend: WebGPUBackend, t: TensorInfo): GPUBuffer {
  backend.uploadToGPU(t.dataId);
  return backend.tensorMap.get(t.dataId).resource as GPUBuffer;
}

/**
 * Records the dispatches, in order, in one compute pass (each dispatch sees
 * the writes of the previous ones) sharing one uniform buffer, and submits.
 */
export function runGradDispatches(
    backend: WebGPUBackend, uniforms: ArrayBuffer, dispatches: GradDispatch[],
    poisonOutputs: TensorInfo[] = []): void {
  const device = backend.device;
  const internals = backend as unknown as BackendInternals;
  const size = Math.ceil(uniforms.byteLength / 16) * 16;
  const uniformBuffer = internals.bufferManager.acquireBuffer(
      size, GPUBufferUsage.COPY_DST | GPUBufferUsage.UNIFORM);
  device.queue.writeBuffer(uniformBuffer, 0, uniforms);
  for (const t of poisonOutputs) {  // Tests: prove every element is written.
    const n = t.shape.reduce((a, b) => a * b, 1);
    device.queue.writeBuffer(gpuBuffer(backend, t), 0, new Float32Array(n).fill(NaN));
  }
  const bound = dispatches.map(d => ({
    pipeline: pipelineFor(device, d.program),
    buffers: d.tensors.map(t => gpuBuffer(backend, t)),
    d,
  }));
  backend.ensureCommandEncoderReady();
  backend.endComputePassEncoder();
  const pass = internals.commandEncoder!.beginComputePass();
  for (const {pipeline, buffers, d} of bound) {
    const bindGroup = device.createBindGroup({
      layout: pipeline.getBindGroupLayout(0),
      entries: [
        {binding: 0, resource: {buffer: uniformBuffer}},
        ...buffers.map((buffer, i) => ({binding: i + 1, resource: {buffer}})),
      ],
    });
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bindGroup);
    pass.dispatchWorkgroups(...d.workgroups);
    for (const t of d.tensors) {
      internals.commandQueueOwnedIds.add(t.dataId);
    }
  }
  pass.end();
  internals.uniformPendingDisposal.push(uniformBuffer);
  backend.submitQueue();
}
