/**
 * The FlashDecodeQKV kernel of the webgpu backend: a decode step's qkv
 * projection, rotary and cache append in one dispatch
 * (flash_decode_qkv_webgpu.ts), recorded into tfjs's own command encoder.
 */
import * as tf from '@tensorflow/tfjs-core';
import type {WebGPUBackend} from '@tensorflow/tfjs-backend-webgpu';

import type {FlashDecodeQKVAttrs} from '../../src/kernel_names';
import {FlashDecodeQKV} from '../../src/kernel_names';

import {BoundedCache} from './bounded_cache';
import {DecodeQKVConfig, DecodeQKVProgram} from './flash_decode_qkv_webgpu';
import {dispatchGrid, recordOwnPipeline} from './own_pipeline';

const programs = new BoundedCache<DecodeQKVProgram>(16);

/** The last program's configuration: a steady decode builds no key string. */
let last: {config: DecodeQKVConfig, program: DecodeQKVProgram}|null = null;

function sameConfig(a: DecodeQKVConfig, b: DecodeQKVConfig): boolean {
  return a.inner === b.inner && a.headDim === b.headDim && a.rotaryDim === b.rotaryDim &&
      a.interleaved === b.interleaved && a.bias === b.bias && a.batchVec4 === b.batchVec4;
}

function programFor(config: DecodeQKVConfig): DecodeQKVProgram {
  if (last != null && sameConfig(last.config, config)) {
    return last.program;
  }
  const program = new DecodeQKVProgram(config);
  last = {config, program: programs.get(program.key, () => program)};
  return last.program;
}

export function flashDecodeQKVWebGPU(args: {
  inputs: tf.NamedTensorInfoMap,
  backend: tf.KernelBackend,
  attrs?: tf.NamedAttrMap,
}): tf.TensorInfo {
  const backend = args.backend as unknown as WebGPUBackend;
  const {x, w, bias, rotaryCos, rotarySin, kCache, vCache} =
      args.inputs as Record<string, tf.TensorInfo>;
  const a = args.attrs as unknown as FlashDecodeQKVAttrs;
  const [rows, inner] = x.shape;
  const cols = w.shape[1];
  const [batch, seqMax, headsKV, headDim] = kCache.shape;
  const seqNew = rows / batch;
  const program = programFor({
    inner,
    headDim,
    rotaryDim: a.hasRotary ? 2 * rotaryCos.shape[1] : 0,
    interleaved: a.rotaryInterleaved,
    bias: a.hasBias,
    batchVec4: Math.ceil(batch / 4),
  });
  const uniforms =
      program.uniforms({rows, cols, seqNew, heads: a.heads, headsKV, seqMax}, a.cacheSeqlens);
  return recordOwnPipeline(backend, program, {
    inputs: [x, w, bias, rotaryCos, rotarySin],
    outputs: [{shape: [batch, seqNew, a.heads, headDim], dtype: 'float32'}],
    updates: [kCache, vCache],
    uniforms,
    dispatch: dispatchGrid(
        DecodeQKVProgram.workgroups(rows, cols),
        backend.device.limits.maxComputeWorkgroupsPerDimension),
  })[0];
}

export const flashDecodeQKVWebGPUConfig: tf.KernelConfig = {
  kernelName: FlashDecodeQKV,
  backendName: 'webgpu',
  kernelFunc: flashDecodeQKVWebGPU as unknown as tf.KernelFunc,
};
