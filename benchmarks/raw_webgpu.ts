/**
 * What the raw-WebGPU benchmarks (no tfjs) share: the subgroup-matrix
 * WGSL header, f16-exact inputs, pipelines that print their compile
 * errors, storage buffers, dispatch timing and read-back.
 * benchmarks/subgroup_matrix_peak.ts and benchmarks/attention_skeleton.ts
 * use them.
 */
/// <reference types="@webgpu/types" />

/** The `enable` lines of a kernel that uses the real matrix built-ins. */
export const SUBGROUP_MATRIX_HEADER = `enable f16;
enable subgroups;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium.subgroup_matrix_uniformity);
`;

/** The number after `--name` on the command line, or `fallback`. */
export function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}

/** The text after `--name` on the command line, or `fallback`. */
export function argText(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

/** IEEE half bits of `x`, which must be exactly representable as a normal half (or 0). */
export function halfBits(x: number): number {
  if (x === 0) {
    return 0;
  }
  const sign = x < 0 ? 0x8000 : 0;
  const a = Math.abs(x);
  const e = Math.floor(Math.log2(a));
  const mant = Math.round((a / 2 ** e - 1) * 1024);
  return sign | ((e + 15) << 10) | mant;
}

/**
 * f16-exact values `unit` x an integer in [-half, half] (by default
 * multiples of 1/16 in [-2, 2]), as numbers and half bits. `unit` must
 * keep every nonzero value a normal half.
 */
export function halfInputs(
    n: number, seed: number, unit = 1 / 16, half = 32): {values: Float64Array, bits: Uint16Array} {
  const values = new Float64Array(n);
  const bits = new Uint16Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    values[i] = ((s >>> 8) % (2 * half + 1) - half) * unit;
    bits[i] = halfBits(values[i]);
  }
  return {values, bits};
}

/** A compute pipeline, or null after printing why it does not compile. */
export async function pipelineOf(
    device: GPUDevice, name: string, code: string,
    layout: GPUPipelineLayout|'auto' = 'auto'): Promise<GPUComputePipeline|null> {
  device.pushErrorScope('validation');
  const module = device.createShaderModule({code});
  const errors = (await module.getCompilationInfo()).messages.filter(m => m.type === 'error');
  try {
    const pipeline =
        await device.createComputePipelineAsync({layout, compute: {module, entryPoint: 'main'}});
    const err = await device.popErrorScope();
    if (err == null && errors.length === 0) {
      return pipeline;
    }
    console.log(`${name}: ${err?.message ?? ''}`);
  } catch (e) {
    await device.popErrorScope();
    console.log(`${name}: ${(e as Error).message.slice(0, 400)}`);
  }
  errors.forEach(m => console.log(`  ${m.lineNum}:${m.linePos} ${m.message.slice(0, 300)}`));
  return null;
}

/**
 * A compute pipeline created asynchronously without error scopes (several
 * may compile at once), or null after printing why it does not compile.
 */
export async function compileAsync(
    device: GPUDevice, name: string, code: string,
    layout: GPUPipelineLayout|'auto'): Promise<GPUComputePipeline|null> {
  const module = device.createShaderModule({code});
  try {
    return await device.createComputePipelineAsync({layout, compute: {module, entryPoint: 'main'}});
  } catch (e) {
    console.log(`${name}: ${(e as Error).message.slice(0, 400)}`);
    const errors = (await module.getCompilationInfo()).messages.filter(m => m.type === 'error');
    errors.forEach(m => console.log(`  ${m.lineNum}:${m.linePos} ${m.message.slice(0, 300)}`));
    return null;
  }
}

/** A storage buffer holding `data`, or `data` zeroed bytes. */
export function storage(device: GPUDevice, data: ArrayBufferView|number): GPUBuffer {
  const size = typeof data === 'number' ? data : data.byteLength;
  const buffer = device.createBuffer({
    size: Math.ceil(size / 16) * 16,
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC
  });
  if (typeof data !== 'number') {
    device.queue.writeBuffer(buffer, 0, data.buffer, data.byteOffset, data.byteLength);
  }
  return buffer;
}

/** Encodes and submits `reps` dispatches of `pipeline`, one compute pass each. */
export function submitDispatches(
    device: GPUDevice, pipeline: GPUComputePipeline, bind: GPUBindGroup, groups: [number, number],
    reps: number): void {
  const enc = device.createCommandEncoder();
  for (let r = 0; r < reps; r++) {
    const pass = enc.beginComputePass();
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bind);
    pass.dispatchWorkgroups(groups[0], groups[1]);
    pass.end();
  }
  device.queue.submit([enc.finish()]);
}

/**
 * Median ms of one dispatch over `batches` batches of `reps`, after one
 * warm-up batch.
 */
export async function timeDispatch(
    device: GPUDevice, pipeline: GPUComputePipeline, bind: GPUBindGroup, groups: [number, number],
    reps: number, batches = 5): Promise<number> {
  const batch = async () => {
    const t0 = performance.now();
    submitDispatches(device, pipeline, bind, groups, reps);
    await device.queue.onSubmittedWorkDone();
    return (performance.now() - t0) / reps;
  };
  await batch();
  const times: number[] = [];
  for (let i = 0; i < batches; i++) {
    times.push(await batch());
  }
  times.sort((x, y) => x - y);
  return times[Math.floor(batches / 2)];
}

/** The first `bytes` of `buffer`, as f32. */
export async function readBack(
    device: GPUDevice, buffer: GPUBuffer, bytes: number): Promise<Float32Array> {
  const staging =
      device.createBuffer({size: bytes, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST});
  const enc = device.createCommandEncoder();
  enc.copyBufferToBuffer(buffer, 0, staging, 0, bytes);
  device.queue.submit([enc.finish()]);
  await staging.mapAsync(GPUMapMode.READ);
  const out = new Float32Array(staging.getMappedRange().slice(0));
  staging.unmap();
  staging.destroy();
  return out;
}
