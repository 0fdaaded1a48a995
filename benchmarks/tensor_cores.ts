/**
 * The subgroup-matrix (tensor core) attention path on a real GPU: creates
 * the device with Dawn's unsafe features (shader-f16,
 * chromium-experimental-subgroup-matrix), prints the adapter's matrix
 * configurations, checks the forward against the float64 oracle
 * (test/oracle.ts) at several shapes and options for both precisions, and
 * times it next to the SIMT kernels, same process, same device.
 *
 *   node tensor_cores.mjs [--seqs 4096,16384] [--dims 64,128] [--heads 16]
 *       [--skip-check] [--skip-time] [--json FILE]
 *
 * Time: median of repetitions of K calls each (K so that a repetition
 * lasts >= ~30 ms), waiting for the queue to drain; TFLOP/s by
 * 4*B*S*S*H*D, halved for causal (docs/design.md, performance method).
 */
/// <reference types="@webgpu/types" />
import * as fs from 'fs';

import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import {openWebGPUDevice, useWebGPUBackend} from './webgpu_setup';

import {matrixForwardStats, planMatrixForward, setMatrixForwardOverride} from '../kernels/webgpu/flash_attention_subgroup_matrix';
import {checkOwnPipelineErrors} from '../kernels/webgpu/own_pipeline';
import {pickSubgroupMatrixShape, subgroupMatrixConfigs} from '../kernels/webgpu/subgroup_matrix';
import {FLASH_ATTENTION_IMPL, FLASH_ATTENTION_TENSOR_CORES, flashAttention, FlashAttentionOptions} from '../src';
import {oracleForward, OracleOptions, OracleProblem} from '../test/oracle';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}
const nums = (s: string) => s.split(',').filter(x => x).map(Number);

/** Deterministic normals (Box-Muller on a xorshift). */
function normals(n: number, seed: number): Float64Array {
  let x = seed >>> 0 || 1;
  const uni = () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return (x + 0.5) / 4294967296;
  };
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    out[i] = Math.fround(Math.sqrt(-2 * Math.log(uni())) * Math.cos(2 * Math.PI * uni()));
  }
  return out;
}

interface Shape {
  batch: number;
  seqQ: number;
  seqK: number;
  heads: number;
  headsKV: number;
  headDim: number;
  headDimV: number;
  alibi?: boolean;
}

function relError(a: ArrayLike<number>, e: ArrayLike<number>): number {
  let maxRef = 0;
  let maxErr = 0;
  for (let i = 0; i < e.length; i++) {
    if (Number.isFinite(e[i])) {
      maxRef = Math.max(maxRef, Math.abs(e[i]));
      maxErr = Math.max(maxErr, Math.abs(a[i] - e[i]));
    } else if (a[i] !== e[i]) {
      return Infinity;
    }
  }
  return maxErr / Math.max(maxRef, 1e-30);
}

async function accuracy(): Promise<string[]> {
  const cases: Array<[string, Shape, OracleOptions]> = [
    [
      'plain S=256 D=64',
      {batch: 1, seqQ: 256, seqK: 256, heads: 2, headsKV: 2, headDim: 64, headDimV: 64}, {}
    ],
    [
      'causal S=300 D=64 GQA 4/2',
      {batch: 1, seqQ: 300, seqK: 300, heads: 4, headsKV: 2, headDim: 64, headDimV: 64},
      {causal: true}
    ],
    [
      'causal S=200 D=128',
      {batch: 1, seqQ: 200, seqK: 200, heads: 2, headsKV: 2, headDim: 128, headDimV: 128},
      {causal: true}
    ],
    [
      'window+softcap+alibi Sq<Sk D=64', {
        batch: 2,
        seqQ: 130,
        seqK: 260,
        heads: 2,
        headsKV: 1,
        headDim: 64,
        headDimV: 64,
        alibi: true
      },
      {windowSize: [40, 7], softcap: 5}
    ],
    [
      'dropout 0.2 D=32 Dv=64',
      {batch: 1, seqQ: 160, seqK: 150, heads: 2, headsKV: 2, headDim: 32, headDimV: 64},
      {dropoutRate: 0.2, seed: 99}
    ],
  ];
  const lines: string[] = [];
  let seed = 12345;
  for (const [name, s, opts] of cases) {
    const p: OracleProblem = {
      ...s,
      q: normals(s.batch * s.seqQ * s.heads * s.headDim, seed++),
      k: normals(s.batch * s.seqK * s.headsKV * s.headDim, seed++),
      v: normals(s.batch * s.seqK * s.headsKV * s.headDimV, seed++),
      alibiSlopes: s.alibi ?
          Float64Array.from({length: s.heads}, (_, i) => Math.fround(0.05 + 0.1 * i)) :
          null,
    };
    const expected = oracleForward(p, opts);
    const q = tf.tensor4d(Float32Array.from(p.q), [s.batch, s.seqQ, s.heads, s.headDim]);
    const k = tf.tensor4d(Float32Array.from(p.k), [s.batch, s.seqK, s.headsKV, s.headDim]);
    const v = tf.tensor4d(Float32Array.from(p.v), [s.batch, s.seqK, s.headsKV, s.headDimV]);
    const slopes =
        p.alibiSlopes == null ? undefined : tf.tensor1d(Float32Array.from(p.alibiSlopes));
    const row: string[] = [name];
    for (const mode of ['simt', 'float32', 'float16'] as const) {
      setMatrixForwardOverride(mode === 'simt' ? {off: true} : null);
      const before = matrixForwardStats.dispatches;
      const o: FlashAttentionOptions = {
        ...opts,
        alibiSlopes: slopes,
        returnSoftmaxLse: true,
        precision: mode === 'float16' ? 'float16' : 'float32'
      };
      const [out, lse] = flashAttention(q, k, v, o) as tf.Tensor[];
      const [od, ld] = [await out.data(), await lse.data()];
      tf.dispose([out, lse]);
      await checkOwnPipelineErrors();
      const used = matrixForwardStats.dispatches - before;
      row.push(`${mode}${mode !== 'simt' && used !== 1 ? '(NOT TC)' : ''} out ${
          relError(od, expected.out).toExponential(2)} lse ${
          relError(ld, expected.lse).toExponential(2)}`);
    }
    setMatrixForwardOverride(null);
    tf.dispose([q, k, v]);
    if (slopes != null) {
      slopes.dispose();
    }
    lines.push(row.join(' | '));
    console.error(row.join(' | '));
  }
  return lines;
}

async function drain(device: GPUDevice): Promise<void> {
  const b = tf.backend() as unknown as {submitQueue(): void, ensureCommandEncoderReady(): void};
  b.submitQueue();
  await device.queue.onSubmittedWorkDone();
}

async function timeMs(device: GPUDevice, run: () => void): Promise<number> {
  run();
  await drain(device);
  await checkOwnPipelineErrors();
  let t0 = performance.now();
  run();
  await drain(device);
  const est = Math.max(performance.now() - t0, 0.01);
  const k = Math.max(1, Math.min(200, Math.ceil(30 / est)));
  const times: number[] = [];
  for (let r = 0; r < 7; r++) {
    t0 = performance.now();
    for (let i = 0; i < k; i++) {
      run();
    }
    await drain(device);
    times.push((performance.now() - t0) / k);
  }
  times.sort((a, b) => a - b);
  return times[3];
}

async function main(): Promise<void> {
  const setup = await openWebGPUDevice({
    dawnFlags: ['enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia'],
    features: ['subgroups', 'shader-f16', 'chromium-experimental-subgroup-matrix'],
    onError: console.error,
  });
  const {adapter, device, features} = setup;
  await useWebGPUBackend(setup);
  tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
  tf.env().set(FLASH_ATTENTION_TENSOR_CORES, true);
  const info = adapter.info as unknown as Record<string, unknown>;
  console.log(`device: ${info.vendor} ${info.architecture} ${info.description}; features: ${
      features.join(', ')}`);
  console.log(`matrix configs: ${
      subgroupMatrixConfigs(device)
          .map(c => `${c.M}x${c.N}x${c.K} ${c.componentType}->${c.resultType}`)
          .join('; ')}`);
  const shape = pickSubgroupMatrixShape(device);
  console.log(`chosen: ${JSON.stringify(shape)}`);
  for (const d of [64, 128]) {
    for (const p of ['float32', 'float16']) {
      console.log(`plan D=${d} ${p}: ${JSON.stringify(planMatrixForward(device, d, d, p))}`);
    }
  }
  const report: Record<string, unknown> = {};
  if (!process.argv.includes('--skip-check')) {
    report.accuracy = await accuracy();
  }
  const rows: string[] = [];
  if (!process.argv.includes('--skip-time')) {
    const heads = Number(arg('heads', '16'));
    for (const d of nums(arg('dims', '64,128'))) {
      for (const s of nums(arg('seqs', '4096,16384'))) {
        const [q, k, v] = [0, 1, 2].map(() => tf.randomNormal([1, s, heads, d]) as tf.Tensor4D);
        const flops = 4 * s * s * heads * d / 2;
        const cells: string[] = [`D=${d} S=${s} causal`];
        for (const mode of ['simt', 'float32', 'float16'] as const) {
          setMatrixForwardOverride(mode === 'simt' ? {off: true} : null);
          const opts: FlashAttentionOptions = {
            causal: true,
            precision: mode === 'float16' ? 'float16' : 'float32'
          };
          try {
            const ms =
                await timeMs(device, () => tf.dispose(flashAttention(q, k, v, opts) as tf.Tensor));
            cells.push(`${mode} ${ms.toFixed(3)} ms ${(flops / ms / 1e9).toFixed(1)} TF/s`);
          } catch (e) {
            cells.push(`${mode} error ${(e as Error).message.slice(0, 200)}`);
          }
          console.error(cells[cells.length - 1]);
        }
        setMatrixForwardOverride(null);
        tf.dispose([q, k, v]);
        rows.push(cells.join(' | '));
      }
    }
    report.timings = rows;
  }
  console.log('\n== accuracy (max abs err / max abs ref vs float64 oracle) ==');
  for (const line of (report.accuracy as string[] | undefined) ?? []) {
    console.log(line);
  }
  console.log('\n== forward timings (B=1, H=16; TF/s = 2*S*S*H*D / time) ==');
  for (const line of rows) {
    console.log(line);
  }
  const jsonAt = process.argv.indexOf('--json');
  if (jsonAt >= 0) {
    fs.writeFileSync(process.argv[jsonAt + 1], JSON.stringify(report, null, 2));
  }
}

main().catch(e => {
  console.error(e);
  process.exit(1);
});
