/**
 * The fused training kernels of the webgpu backend: FusedNorm(Grad),
 * SoftmaxCrossEntropy(Grad), FusedRotary and FusedGelu, each a few tfjs
 * programs recorded into tfjs's command encoder (no extra queue submits, no
 * host uploads).
 *
 * tfjs-backend-webgpu is an optional peer: only its types are imported.
 */
import * as tf from '@tensorflow/tfjs-core';
import type {WebGPUBackend} from '@tensorflow/tfjs-backend-webgpu';

import {registerFusedKernel} from '../../src/dispatch';
import {dropoutThreshold} from '../../src/dropout';
import {FusedDense, FusedDenseAttrs, FusedGelu, FusedNorm, FusedNormAttrs, FusedNormDense, FusedNormDenseAttrs, FusedNormGrad, FusedRotary, FusedRotaryAttrs, SoftmaxCrossEntropy, SoftmaxCrossEntropyAttrs, SoftmaxCrossEntropyGrad} from '../../src/train/kernel_names';

import {CrossEntropyGradProgram, CrossEntropyLossProgram, CrossEntropyLseProgram} from './cross_entropy_webgpu';
import {GeluProgram} from './gelu_webgpu';
import {BoundedCache} from './bounded_cache';
import {DENSE_THREADS, FusedDenseProgram} from './dense_webgpu';
import {NormBackwardProgram, NormColumnSumProgram, NormForwardProgram, NormResidualProgram, NormStatsProgram} from './fused_norm_webgpu';
import {FusedNormDenseProgram} from './norm_dense_webgpu';
import {NormResidualForwardProgram, normResidualConfig} from './norm_residual_webgpu';
import {dispatchGrid, recordOwnPipeline, UniformWriter} from './own_pipeline';
import {RotaryProgram} from './rotary_webgpu';
import {ProgramUniform, TfjsWebGPUProgram} from './tfjs_program';

interface KernelArgs {
  inputs: Record<string, tf.TensorInfo>;
  backend: unknown;
  attrs?: tf.NamedAttrMap;
}

interface ProgramRunner {
  runWebGPUProgram(
      program: TfjsWebGPUProgram, inputs: tf.TensorInfo[], dtype: tf.DataType,
      uniforms?: ProgramUniform): tf.TensorInfo;
}

function run(
    backend: WebGPUBackend, program: TfjsWebGPUProgram, inputs: tf.TensorInfo[],
    uniforms?: ProgramUniform): tf.TensorInfo {
  return (backend as unknown as ProgramRunner)
      .runWebGPUProgram(program, inputs, 'float32', uniforms);
}

/** A second reference to t's data (what tfjs's Identity kernel returns). */
function share(backend: WebGPUBackend, t: tf.TensorInfo): tf.TensorInfo {
  backend.incRef(t.dataId);
  return {dataId: t.dataId, shape: t.shape, dtype: t.dtype};
}

function dropoutUniforms(a: FusedNormAttrs): ProgramUniform {
  return [
    {type: 'uint32', data: [dropoutThreshold(a.dropoutRate)]},
    {type: 'float32', data: [1 / (1 - a.dropoutRate)]}, {type: 'uint32', data: [a.seedLo]},
    {type: 'uint32', data: [a.seedHi]}
  ];
}

/** The one-pass norm programs, by configuration (no key string per call). */
const normResidualPrograms = new BoundedCache<NormResidualForwardProgram>(16);

function fusedNormWebGPU({inputs, backend, attrs}: KernelArgs): tf.TensorInfo[] {
  const webgpu = backend as WebGPUBackend;
  const a = attrs as unknown as FusedNormAttrs;
  const {x, residual, gamma, beta} = inputs;
  const shape = x.shape as [number, number];
  const hasResidual = tf.util.sizeFromShape(residual.shape) > 0;
  const dropout = a.dropoutRate > 0;
  if (!hasResidual && !dropout) {
    const y =
        run(webgpu, new NormForwardProgram(shape, a.rms), a.rms ? [x, gamma] : [x, gamma, beta],
            [{type: 'float32', data: [a.epsilon]}]);
    return [y, share(webgpu, x)];
  }
  // z and y in one pass (two outputs: an own pipeline).
  const config = normResidualConfig(shape[1], a.rms, hasResidual, dropout);
  const program = normResidualPrograms.get(
      `${+ config.rms}${+ config.residual}${+ config.dropout}${config.threads}`,
      () => new NormResidualForwardProgram(config));
  if (shape[0] === 0) {
    return [webgpu.makeTensorInfo(shape, 'float32'), webgpu.makeTensorInfo(shape, 'float32')];
  }
  const uniforms = new UniformWriter(new ArrayBuffer(32))
                       .i32(shape[0])
                       .i32(shape[1])
                       .f32(a.epsilon)
                       .u32(dropout ? dropoutThreshold(a.dropoutRate) : 0)
                       .f32(dropout ? 1 / (1 - a.dropoutRate) : 1)
                       .u32(a.seedLo)
                       .u32(a.seedHi);
  return recordOwnPipeline(webgpu, program, {
    inputs: [x, hasResidual ? residual : x, gamma, a.rms ? x : beta],
    outputs: [{shape, dtype: 'float32'}, {shape, dtype: 'float32'}],
    uniforms: uniforms.finish(),
    // Without dropout the uniforms follow from the shape: one buffer per content.
    cacheUniforms: !dropout,
    dispatch: dispatchGrid(shape[0], webgpu.device.limits.maxComputeWorkgroupsPerDimension),
  });
}

function fusedNormGradWebGPU({inputs, backend, attrs}: KernelArgs): tf.TensorInfo[] {
  const webgpu = backend as WebGPUBackend;
  const a = attrs as unknown as FusedNormAttrs;
  const {dy, dz: dzOut, z, gamma} = inputs;
  const shape = z.shape as [number, number];
  const eps: ProgramUniform = [{type: 'float32', data: [a.epsilon]}];
  const dz = run(webgpu, new NormBackwardProgram(shape, a.rms), [dy, z, gamma, dzOut], eps);
  const dx = a.dropoutRate > 0 ?
      run(webgpu, new NormResidualProgram(shape, true, false), [dz], dropoutUniforms(a)) :
      share(webgpu, dz);
  const stats = run(webgpu, new NormStatsProgram(shape, a.rms), [z], eps);
  const dgamma = run(webgpu, new NormColumnSumProgram(shape, true), [dy, z, stats]);
  webgpu.disposeData(stats.dataId);
  const dbeta = a.rms ? webgpu.makeTensorInfo([0], 'float32') :
                        run(webgpu, new NormColumnSumProgram(shape, false), [dy]);
  return [dz, dx, dgamma, dbeta];
}

function crossEntropyWebGPU({inputs, backend, attrs}: KernelArgs): tf.TensorInfo[] {
  const webgpu = backend as WebGPUBackend;
  const a = attrs as unknown as SoftmaxCrossEntropyAttrs;
  const {logits, labels} = inputs;
  const shape = logits.shape as [number, number];
  const lse = run(webgpu, new CrossEntropyLseProgram(shape), [logits]);
  const loss =
      run(webgpu, new CrossEntropyLossProgram(shape, a.labelSmoothing > 0), [logits, labels, lse],
          [{type: 'float32', data: [a.labelSmoothing]}, {type: 'float32', data: [a.zLoss]}]);
  return [loss, lse];
}

function crossEntropyGradWebGPU({inputs, backend, attrs}: KernelArgs): tf.TensorInfo {
  const webgpu = backend as WebGPUBackend;
  const a = attrs as unknown as SoftmaxCrossEntropyAttrs;
  const {dLoss, logits, labels, lse} = inputs;
  return run(
      webgpu, new CrossEntropyGradProgram(logits.shape as [number, number]),
      [dLoss, logits, labels, lse],
      [{type: 'float32', data: [a.labelSmoothing]}, {type: 'float32', data: [a.zLoss]}]);
}

function rotaryWebGPU({inputs, backend, attrs}: KernelArgs): tf.TensorInfo {
  const a = attrs as unknown as FusedRotaryAttrs;
  const {x, cos, sin} = inputs;
  return run(
      backend as WebGPUBackend, new RotaryProgram(x.shape, a.rotaryDim, a.interleaved, a.inverse),
      [x, cos, sin]);
}

function geluWebGPU({inputs, backend}: KernelArgs): tf.TensorInfo {
  return run(backend as WebGPUBackend, new GeluProgram(inputs.x.shape), [inputs.x]);
}

/** The FusedDense programs, by activation and bias. */
const densePrograms = new BoundedCache<FusedDenseProgram>(16);

function fusedDenseWebGPU({inputs, backend, attrs}: KernelArgs): tf.TensorInfo {
  const webgpu = backend as WebGPUBackend;
  const {activation, hasBias} = attrs as unknown as FusedDenseAttrs;
  const {x, w, bias} = inputs;
  const [rows, inner] = x.shape;
  const cols = w.shape[1];
  const program = densePrograms.get(
      `${activation},${+ hasBias}`, () => new FusedDenseProgram(activation, hasBias));
  const colGroups = Math.ceil(cols / DENSE_THREADS);
  const uniforms =
      new UniformWriter(new ArrayBuffer(16)).i32(rows).i32(inner).i32(cols).i32(colGroups);
  return recordOwnPipeline(webgpu, program, {
    inputs: [x, w, bias],
    outputs: [{shape: [rows, cols], dtype: 'float32'}],
    uniforms: uniforms.finish(),
    // Shapes only: one buffer per content, no write per call.
    cacheUniforms: true,
    dispatch: dispatchGrid(
        FusedDenseProgram.workgroups(rows, cols),
        webgpu.device.limits.maxComputeWorkgroupsPerDimension),
  })[0];
}

/** The FusedNormDense programs, by configuration. */
const normDensePrograms = new BoundedCache<FusedNormDenseProgram>(16);

function fusedNormDenseWebGPU({inputs, backend, attrs}: KernelArgs): tf.TensorInfo[] {
  const webgpu = backend as WebGPUBackend;
  const a = attrs as unknown as FusedNormDenseAttrs;
  const {x, residual, gamma, beta, w, bias} = inputs;
  const [rows, inner] = x.shape;
  const cols = w.shape[1];
  const config = {
    inner,
    rms: a.rms,
    residual: a.hasResidual,
    beta: a.hasBeta,
    bias: a.hasBias,
    activation: a.activation,
  };
  const program = normDensePrograms.get(
      `${inner},${+ a.rms}${+ a.hasResidual}${+ a.hasBeta}${+ a.hasBias},${a.activation}`,
      () => new FusedNormDenseProgram(config));
  const colGroups = Math.ceil(cols / DENSE_THREADS);
  const uniforms =
      new UniformWriter(new ArrayBuffer(16)).i32(rows).i32(cols).i32(colGroups).f32(a.epsilon);
  return recordOwnPipeline(webgpu, program, {
    inputs: [x, residual, gamma, beta, w, bias],
    outputs: [{shape: [rows, cols], dtype: 'float32'}, {shape: [rows, inner], dtype: 'float32'}],
    uniforms: uniforms.finish(),
    // Shapes and epsilon only: one buffer per content, no write per call.
    cacheUniforms: true,
    dispatch: dispatchGrid(
        FusedDenseProgram.workgroups(rows, cols),
        webgpu.device.limits.maxComputeWorkgroupsPerDimension),
  });
}

const configs: Array<[string, unknown]> = [
  [FusedDense, fusedDenseWebGPU],
  [FusedNormDense, fusedNormDenseWebGPU],
  [FusedRotary, rotaryWebGPU],
  [FusedGelu, geluWebGPU],
  [FusedNorm, fusedNormWebGPU],
  [FusedNormGrad, fusedNormGradWebGPU],
  [SoftmaxCrossEntropy, crossEntropyWebGPU],
  [SoftmaxCrossEntropyGrad, crossEntropyGradWebGPU],
];

/** Registers the fused training kernels for the webgpu backend. */
export function registerTrainingKernelsWebGPU(): void {
  for (const [kernelName, kernelFunc] of configs) {
    registerFusedKernel(
        {kernelName, backendName: 'webgpu', kernelFunc: kernelFunc as tf.KernelFunc});
  }
}
