/**
 * Attention benchmark on tfjs-webgpu (Node + Dawn): the fused FlashAttention
 * kernels against the composed matMul+softmax baseline (benchmarks/
 * baselines.ts), same process, same device. Forward (`fwd`) and
 * forward+backward through tf.grads (`fwdbwd`).
 *
 *   node attention.mjs [--modes fwd,fwdbwd] [--dims 64,128]
 *       [--seqs 512,1024,...,16384] [--causal both|true|false]
 *       [--impls fused,composed] [--composed-max-seq 8192]
 *       [--variants "tm,tx,nq,ty;..."] [--torch torch.json] [--out DIR]
 *       [--budget-ms 600] [--warmup-ms 300] [--check]
 *
 * Time: median over repetitions after warm-up; a repetition runs the op K
 * times (K so that it lasts >= ~20 ms) and waits for the GPU queue to drain
 * (no read-back). TFLOP/s by docs/design.md, "Performance method": forward 4*B*S*S*H*D, halved for
 * causal; forward+backward 3.5x that. Peak memory: GPU bytes allocated by one
 * call starting from an empty buffer pool (inputs excluded, outputs
 * included). Progress on stderr, the table on stdout, JSON + SVG in --out.
 *
 * The device is built here with the adapter's limits (large buffers, 48 KiB
 * of workgroup memory on an H100) and subgroups, and registered as tfjs's
 * 'webgpu' backend (docs/design.md, "Platform facts").
 */
/// <reference types="@webgpu/types" />
import * as fs from 'fs';
import * as path from 'path';

type TF = typeof import('@tensorflow/tfjs-core');

interface Args {
  modes: string[];
  dims: number[];
  seqs: number[];
  causal: boolean[];
  impls: string[];
  composedMaxSeq: number;
  variants: string[];
  torch: string|null;
  out: string;
  budgetMs: number;
  /** GPU busy time before each row's timing (clocks ramp up). */
  warmupMs: number;
  check: boolean;
  batch: number;
  heads: number;
  /** Flags for Dawn's create(), e.g. enable-dawn-features=... */
  dawnFlags: string[];
}

function parseArgs(argv: string[]): Args {
  const get = (name: string, dflt: string) => {
    const i = argv.indexOf(`--${name}`);
    return i >= 0 && i + 1 < argv.length ? argv[i + 1] : dflt;
  };
  const nums = (s: string) => s.split(',').filter(x => x).map(Number);
  const causal = get('causal', 'both');
  return {
    modes: get('modes', 'fwd,fwdbwd').split(','),
    dims: nums(get('dims', '64,128')),
    seqs: nums(get('seqs', '512,1024,2048,4096,8192,16384')),
    causal: causal === 'both' ? [true, false] : [causal === 'true'],
    impls: get('impls', 'fused,composed').split(','),
    composedMaxSeq: Number(get('composed-max-seq', '8192')),
    variants: get('variants', '').split(';').filter(x => x),
    torch: argv.includes('--torch') ? get('torch', '') : null,
    out: get('out', 'benchmarks/out'),
    budgetMs: Number(get('budget-ms', '600')),
    warmupMs: Number(get('warmup-ms', '300')),
    check: argv.includes('--check'),
    batch: Number(get('batch', '1')),
    heads: Number(get('heads', '16')),
    dawnFlags: get('dawn-flags', '').split(' ').filter(x => x),
  };
}

const log = (msg: string) => process.stderr.write(`${msg}\n`);

export interface Row {
  mode: string;
  impl: string;
  variant: string;
  dim: number;
  seq: number;
  causal: boolean;
  ms: number|null;
  tflops: number|null;
  peakMiB: number|null;
  reps: number;
  status: string;
}

function flops(mode: string, b: number, h: number, s: number, d: number, causal: boolean): number {
  const fwd = 4 * b * s * s * h * d / (causal ? 2 : 1);
  return mode === 'fwd' ? fwd : 3.5 * fwd;
}

async function setupDevice(dawnFlags: string[]): Promise<{gpu: GPU, adapter: GPUAdapter, device: GPUDevice}> {
  const webgpu = await import('webgpu') as unknown as {create: (f: string[]) => GPU,
                                                        globals: Record<string, unknown>};
  Object.assign(globalThis, webgpu.globals);
  const gpu = webgpu.create(dawnFlags);
  const adapter = await gpu.requestAdapter({powerPreference: 'high-performance'});
  if (adapter == null) {
    throw new Error('no WebGPU adapter');
  }
  const l = adapter.limits;
  const features = ['subgroups', 'timestamp-query'].filter(
      f => adapter.features.has(f as GPUFeatureName)) as GPUFeatureName[];
  const device = await adapter.requestDevice({
    requiredFeatures: features,
    requiredLimits: {
      maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
      maxBufferSize: l.maxBufferSize,
      maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
      maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup,
      maxComputeWorkgroupSizeX: l.maxComputeWorkgroupSizeX,
      maxComputeWorkgroupsPerDimension: l.maxComputeWorkgroupsPerDimension,
      maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
    },
  });
  device.addEventListener('uncapturederror', (e: Event) => {
    log(`GPU error: ${(e as GPUUncapturedErrorEvent).error.message}`);
  });
  Object.defineProperty(globalThis, 'navigator', {value: {gpu}, configurable: true, writable: true});
  return {gpu, adapter, device};
}

interface Bench {
  tf: TF;
  backend: {device: GPUDevice, bufferManager: {numBytesAllocated: number, freeBuffers: Map<string, GPUBuffer[]>, numFreeBuffers: number},
            ensureCommandEncoderReady(): void, endComputePassEncoder(): void, submitQueue(): void};
}

async function sync(b: Bench): Promise<void> {
  b.backend.ensureCommandEncoderReady();
  b.backend.endComputePassEncoder();
  b.backend.submitQueue();
  await b.backend.device.queue.onSubmittedWorkDone();
}

/** Destroys the pooled free buffers so the next call's allocations show. */
function emptyPool(b: Bench): void {
  const bm = b.backend.bufferManager;
  bm.freeBuffers.forEach(list => {
    for (const buf of list) {
      bm.numBytesAllocated -= buf.size;
      buf.destroy();
    }
    list.length = 0;
  });
  bm.numFreeBuffers = 0;
}

async function measure(
    b: Bench, run: () => unknown, budgetMs: number,
    warmupMs = 0): Promise<{ms: number, peakMiB: number, reps: number}> {
  const {tf} = b;
  const once = () => tf.dispose(run() as import("@tensorflow/tfjs-core").Tensor[]);
  // First call: compiles and uploads the inputs; the second measures peak
  // memory from an empty pool.
  once();
  await sync(b);
  emptyPool(b);
  const before = b.backend.bufferManager.numBytesAllocated;
  once();
  await sync(b);
  const peakMiB = (b.backend.bufferManager.numBytesAllocated - before) / 2 ** 20;
  let t0 = performance.now();
  once();
  await sync(b);
  const est = Math.max(performance.now() - t0, 0.005);
  const k = Math.max(1, Math.min(200, Math.ceil(20 / est)));
  // Keep the GPU busy for a while first: after the CPU-side input setup
  // the GPU has idled and its clocks come back slowly (without this the
  // first row of each shape measured slow; benchmarks/RESULTS.md).
  const w0 = performance.now();
  while (performance.now() - w0 < warmupMs) {
    for (let i = 0; i < k; i++) {
      once();
    }
    await sync(b);
  }
  const reps = Math.max(3, Math.min(30, Math.floor(budgetMs / (k * est))));
  const times: number[] = [];
  for (let r = 0; r < reps; r++) {
    t0 = performance.now();
    for (let i = 0; i < k; i++) {
      once();
    }
    await sync(b);
    times.push((performance.now() - t0) / k);
  }
  times.sort((x, y) => x - y);
  return {ms: times[Math.floor(times.length / 2)], peakMiB, reps};
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const {device, adapter} = await setupDevice(args.dawnFlags);
  const tf = await import('@tensorflow/tfjs-core');
  // tfjs-core's CommonJS bundle registers no gradients; tfjs-layers' does.
  await import('@tensorflow/tfjs-layers');
  const webgpu = await import('@tensorflow/tfjs-backend-webgpu');
  const fa = await import('../src/index');
  const {composedAttention} = await import('./baselines');
  const {setForwardOverride, planForward, forwardStats} = await import('../kernels/webgpu/FlashAttention');
  const {checkOwnPipelineErrors} = await import('../kernels/webgpu/own_pipeline');
  tf.removeBackend('webgpu');
  tf.registerBackend('webgpu', () => new webgpu.WebGPUBackend(device, adapter.info));
  await tf.setBackend('webgpu');
  const bench: Bench = {tf, backend: tf.backend() as unknown as Bench['backend']};
  const info = adapter.info;
  const deviceName = `${info.vendor} ${info.architecture} ${info.description}`.trim() +
      (args.dawnFlags.length > 0 ? ` (Dawn flags: ${args.dawnFlags.join(' ')})` : '');
  log(`device: ${deviceName}; workgroup storage ${device.limits.maxComputeWorkgroupStorageSize} B, invocations ${
      device.limits.maxComputeInvocationsPerWorkgroup}, subgroups ${device.features.has('subgroups' as GPUFeatureName)} (min ${
      (info as unknown as {subgroupMinSize?: number}).subgroupMinSize}), max binding ${
      device.limits.maxStorageBufferBindingSize}`);
  for (const d of args.dims) {
    for (const s of args.seqs) {
      log(`D=${d} S=${s}: fused tiling ${JSON.stringify(planForward(device, d, d, args.batch * args.heads * s))}`);
    }
  }
  const {batch: B, heads: H} = args;
  const rows: Row[] = [];
  const maxBinding = Math.min(device.limits.maxStorageBufferBindingSize, device.limits.maxBufferSize);

  const checks: string[] = [];
  if (args.check) {
    // Numerical sanity on this device: fused vs composed, causal and not.
    for (const d of args.dims) {
      for (const causal of args.causal) {
        const s = 1024;
        const [q, k, v] = [0, 1, 2].map(() => tf.randomNormal([B, s, H, d]) as import('@tensorflow/tfjs-core').Tensor4D);
        const a = fa.flashAttention(q, k, v, {causal});
        const c = composedAttention(q, k, v, {causal});
        const diff = tf.tidy(() => tf.max(tf.abs(tf.sub(a, c))));
        const ref = tf.tidy(() => tf.max(tf.abs(c)));
        const err = (await diff.data())[0] / (await ref.data())[0];
        tf.dispose([diff, ref]);
        await checkOwnPipelineErrors();
        log(`check D=${d} S=${s} causal=${causal}: max|fused - composed| / max|composed| = ${err.toExponential(2)}`);
        checks.push(`D=${d} S=${s} causal=${causal}: max|fused - composed| / max|composed| = ${err.toExponential(2)}`);
        tf.dispose([q, k, v, a, c]);
      }
    }
  }

  const variants = args.variants.length > 0 ? args.variants : ['default'];
  // tm,tx,nq,ty[,p0|p1 (register prefetch)][,uN (unroll)][,o (outer-product mode)][,s (K/V share a buffer)][,vN (P V unroll, outer mode)]
  // [,w|w0 (P^T swizzle on/off, outer mode; default on)]
  const variantOverride = (variant: string) => {
    const [tm, tx, nq, ty] = variant.split(',').slice(0, 4).map(Number);
    const flags = variant.split(',').slice(4);
    const p = flags.find(f => f.startsWith('p'));
    const u = flags.find(f => f.startsWith('u'));
    const v = flags.find(f => f.startsWith('v'));
    return {tiles: {tm, tx, nq, ty, outer: flags.includes('o'), sharedKV: flags.includes('s')},
            prefetch: p == null ? undefined : p === 'p1',
            unroll: u == null ? undefined : Number(u.slice(1)),
            unrollPV: v == null ? undefined : Number(v.slice(1)),
            swizzleP: flags.includes('w') ? true : flags.includes('w0') ? false : undefined};
  };
  const checked = new Set<string>();
  const checkVariant = async (d: number, causal: boolean) => {
    const s = 512;
    const [q, k, v] = [0, 1, 2].map(() => tf.randomNormal([B, s, H, d]) as import('@tensorflow/tfjs-core').Tensor4D);
    tf.env().set(fa.FLASH_ATTENTION_IMPL, 'fused');
    try {
      const a = fa.flashAttention(q, k, v, {causal});
      const c = composedAttention(q, k, v, {causal});
      const diff = tf.tidy(() => tf.max(tf.abs(tf.sub(a, c))));
      const ref = tf.tidy(() => tf.max(tf.abs(c)));
      const err = (await diff.data())[0] / (await ref.data())[0];
      tf.dispose([diff, ref, a, c]);
      await checkOwnPipelineErrors();
      return `max|fused - composed| / max|composed| = ${err.toExponential(2)}${err < 1e-4 ? '' : ' FAILED'}`;
    } catch (e) {
      return `error: ${(e as Error).message.slice(0, 160)}`;
    } finally {
      tf.dispose([q, k, v]);
    }
  };
  // Inputs are made once per (D, S) (random normals are drawn on the CPU).
  for (const d of args.dims) {
    for (const s of args.seqs) {
      const [q, k, v, dy] = [0, 1, 2, 3].map(() => tf.randomNormal([B, s, H, d]) as import('@tensorflow/tfjs-core').Tensor4D);
      for (const mode of args.modes) {
        for (const causal of args.causal) {
          for (const impl of args.impls) {
            for (const variant of impl === 'fused' ? variants : ['-']) {
              const row: Row = {mode, impl, variant, dim: d, seq: s, causal, ms: null, tflops: null,
                                peakMiB: null, reps: 0, status: 'ok'};
              rows.push(row);
              const scoreBytes = B * H * s * s * 4;
              if (impl === 'composed' && scoreBytes > maxBinding) {
                row.status = `OOM: a [${B},${H},${s},${s}] f32 score tensor (${
                    (scoreBytes / 2 ** 30).toFixed(1)} GiB) exceeds the device's ${
                    (maxBinding / 2 ** 30).toFixed(1)} GiB buffer limit`;
                log(`${mode} ${impl} D=${d} S=${s} causal=${causal}: ${row.status}`);
                continue;
              }
              if (impl === 'composed' && s > args.composedMaxSeq) {
                row.status = `skipped: S > --composed-max-seq ${args.composedMaxSeq} (time budget)`;
                log(`${mode} ${impl} D=${d} S=${s} causal=${causal}: ${row.status}`);
                continue;
              }
              if (variant !== 'default' && variant !== '-') {
                setForwardOverride(variantOverride(variant));
                if (args.check && !checked.has(`${d} ${variant}`)) {
                  // This tiling against the composed baseline at S=512.
                  checked.add(`${d} ${variant}`);
                  const msg = await checkVariant(d, causal);
                  log(`check [${variant}] D=${d}: ${msg}`);
                  checks.push(`[${variant}] D=${d} S=512 causal=${causal}: ${msg}`);
                }
              }
              // fwdbwd: the forward is fused, the backward is whatever the
              // backend has (bwd's fused kernel, else the reference).
              tf.env().set(fa.FLASH_ATTENTION_IMPL, impl === 'reference' ? 'reference' :
                               mode === 'fwd' ? 'fused' : 'auto');
              if (impl === 'fused' && mode !== 'fwd' &&
                  !fa.hasFusedKernel(fa.FlashAttentionGrad, 'webgpu')) {
                row.status = 'ok (backward: composed reference, no fused FlashAttentionGrad)';
              }
              const fwd = impl === 'composed' ?
                  () => composedAttention(q, k, v, {causal}) :
                  () => fa.flashAttention(q, k, v, {causal});
              const run = mode === 'fwd' ? fwd :
                  () => tf.grads((a: import('@tensorflow/tfjs-core').Tensor, b: import('@tensorflow/tfjs-core').Tensor,
                                  c: import('@tensorflow/tfjs-core').Tensor) =>
                                     impl === 'composed' ?
                                     composedAttention(a as import('@tensorflow/tfjs-core').Tensor4D, b as import('@tensorflow/tfjs-core').Tensor4D,
                                                       c as import('@tensorflow/tfjs-core').Tensor4D, {causal}) :
                                     fa.flashAttention(a as import('@tensorflow/tfjs-core').Tensor4D, b as import('@tensorflow/tfjs-core').Tensor4D,
                                                       c as import('@tensorflow/tfjs-core').Tensor4D, {causal}))([q, k, v], dy);
              try {
                device.pushErrorScope('out-of-memory');
                device.pushErrorScope('validation');
                const dispatches = forwardStats.dispatches;
                const m = await measure(bench, run, args.budgetMs, args.warmupMs);
                if (impl === 'fused' && forwardStats.dispatches === dispatches) {
                  throw new Error('the fused forward did not run');
                }
                const validation = await device.popErrorScope();
                const oom = await device.popErrorScope();
                await checkOwnPipelineErrors();
                if (oom != null || validation != null) {
                  row.status = `GPU error: ${(oom ?? validation)!.message.slice(0, 120)}`;
                } else {
                  row.ms = m.ms;
                  row.peakMiB = m.peakMiB;
                  row.reps = m.reps;
                  row.tflops = flops(mode, B, H, s, d, causal) / (m.ms * 1e-3) / 1e12;
                }
              } catch (e) {
                row.status = `error: ${(e as Error).message.slice(0, 160)}`;
              } finally {
                setForwardOverride(null);
              }
              log(`${mode} ${impl}${variant !== 'default' && variant !== '-' ? ` [${variant}]` : ''} D=${d} S=${
                  s} causal=${causal}: ${row.ms != null ? `${row.ms.toFixed(3)} ms, ${
                  row.tflops!.toFixed(2)} TFLOP/s, peak ${row.peakMiB!.toFixed(1)} MiB (${row.reps} reps)` : row.status}`);
            }
          }
        }
      }
      tf.dispose([q, k, v, dy]);
    }
  }
  tf.env().set(fa.FLASH_ATTENTION_IMPL, 'auto');

  const torch = args.torch != null && fs.existsSync(args.torch) ?
      JSON.parse(fs.readFileSync(args.torch, 'utf8')) as {device: string, rows: Array<{mode: string, dim: number, seq: number, causal: boolean, ms: number|null}>} :
      null;
  fs.mkdirSync(args.out, {recursive: true});
  const result = {date: new Date().toISOString(), device: deviceName, argv: process.argv.slice(2),
                  batch: B, heads: H, checks, rows, torch};
  fs.writeFileSync(path.join(args.out, 'attention.json'), JSON.stringify(result, null, 1));
  fs.writeFileSync(path.join(args.out, 'attention.svg'), chart(rows, torch?.rows ?? []));
  console.log(table(rows, torch?.rows ?? [], B, H));
  if (checks.length > 0) {
    console.log(`\nChecks (fused vs composed on this device):\n${checks.map(c => `- ${c}`).join('\n')}`);
  }
}

type TorchRow = {mode: string, dim: number, seq: number, causal: boolean, ms: number|null};

function table(rows: Row[], torch: TorchRow[], B: number, H: number): string {
  const lines: string[] = [];
  const f = (x: number|null, digits = 2) => x == null ? '-' : x.toFixed(digits);
  lines.push(`B=${B}, H=${H}, float32; ms = median time per call; TFLOP/s by docs/design.md, "Performance method"; peak = GPU MiB allocated by one call`);
  lines.push('');
  lines.push('| mode | D | S | causal | fused ms | fused TFLOP/s | fused peak MiB | composed ms | composed TFLOP/s | composed peak MiB | fused speedup | torch ms | torch TFLOP/s | fused / torch |');
  lines.push('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |');
  const order = (r: Row) => [r.mode === 'fwd' ? 0 : 1, r.dim, r.causal ? 0 : 1, r.seq];
  const sorted = rows.slice().sort((a, b) => {
    const x = order(a), y = order(b);
    for (let i = 0; i < x.length; i++) {
      if (x[i] !== y[i]) {
        return x[i] - y[i];
      }
    }
    return 0;
  });
  const keys = new Set(sorted.map(r => `${r.mode}|${r.dim}|${r.causal}|${r.seq}`));
  const notes: string[] = [];
  for (const key of keys) {
    const [mode, dim, causal, seq] = key.split('|');
    const match = (r: Row) => r.mode === mode && `${r.dim}` === dim && `${r.causal}` === causal && `${r.seq}` === seq;
    const fused = rows.filter(r => match(r) && r.impl === 'fused');
    const best = fused.filter(r => r.ms != null).sort((a, b) => a.ms! - b.ms!)[0] ?? fused[0];
    const comp = rows.find(r => match(r) && r.impl === 'composed');
    const t = torch.find(r => r.mode === mode && `${r.dim}` === dim && `${r.causal}` === causal && `${r.seq}` === seq);
    const fl = flops(mode, B, H, Number(seq), Number(dim), causal === 'true');
    const compCell = (x: string) => comp == null ? '-' : comp.ms == null ? `${x === 'ms' ? comp.status.split(':')[0] : '-'}` : x;
    if (comp != null && comp.ms == null) {
      notes.push(`composed ${mode} D=${dim} S=${seq} causal=${causal}: ${comp.status}`);
    }
    if (best != null && best.ms == null) {
      notes.push(`fused ${mode} D=${dim} S=${seq} causal=${causal}: ${best.status}`);
    }
    const torchMs = t?.ms ?? null;
    lines.push(`| ${mode} | ${dim} | ${seq} | ${causal} | ${f(best?.ms ?? null, 3)}${fused.length > 1 && best ? ` [${best.variant}]` : ''} | ${
        f(best?.tflops ?? null)} | ${f(best?.peakMiB ?? null, 1)} | ${compCell(f(comp?.ms ?? null, 2)).replace(/^-$/, comp && comp.ms == null ? comp.status.split(':')[0] : '-')} | ${
        comp?.tflops != null ? f(comp.tflops) : '-'} | ${comp?.peakMiB != null ? f(comp.peakMiB, 1) : '-'} | ${
        best?.ms != null && comp?.ms != null ? `${(comp.ms / best.ms).toFixed(1)}x` : '-'} | ${f(torchMs, 3)} | ${
        torchMs != null ? f(fl / (torchMs * 1e-3) / 1e12) : '-'} | ${
        best?.ms != null && torchMs != null ? `${(torchMs / best.ms).toFixed(2)}x` : '-'} |`);
  }
  if (notes.length > 0) {
    lines.push('');
    lines.push(...notes.map(n => `- ${n}`));
  }
  const variants = rows.filter(r => r.impl === 'fused' && r.variant !== 'default');
  if (variants.length > 0) {
    lines.push('');
    lines.push('Fused tilings (tm,tx,nq,ty):');
    for (const r of variants) {
      lines.push(`- ${r.mode} D=${r.dim} S=${r.seq} causal=${r.causal} [${r.variant}]: ${
          r.ms != null ? `${r.ms.toFixed(3)} ms, ${r.tflops!.toFixed(2)} TFLOP/s` : r.status}`);
    }
  }
  return lines.join('\n');
}

/** TFLOP/s against S (log scale), one panel per mode. */
function chart(rows: Row[], torch: TorchRow[]): string {
  const modes = [...new Set(rows.map(r => r.mode))];
  const W = 560, Hh = 360, pad = 50;
  const colors = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#e377c2', '#17becf'];
  const parts: string[] = [];
  const seqs = [...new Set(rows.map(r => r.seq))].sort((a, b) => a - b);
  const lx = (s: number) => pad + (Math.log2(s) - Math.log2(seqs[0])) /
      Math.max(1, Math.log2(seqs[seqs.length - 1]) - Math.log2(seqs[0])) * (W - 2 * pad);
  modes.forEach((mode, mi) => {
    const ox = mi * W;
    type Series = {name: string, points: Array<[number, number]>};
    const series: Series[] = [];
    const keyOf = (impl: string, dim: number, causal: boolean) => `${impl} D=${dim}${causal ? ' causal' : ''}`;
    const groups = new Map<string, Array<[number, number]>>();
    for (const r of rows.filter(r => r.mode === mode && r.tflops != null && (r.variant === 'default' || r.variant === '-'))) {
      const key = keyOf(r.impl, r.dim, r.causal);
      groups.set(key, [...(groups.get(key) ?? []), [r.seq, r.tflops!]]);
    }
    for (const t of torch.filter(t => t.mode === mode && t.ms != null)) {
      const key = keyOf('torch SDPA', t.dim, t.causal);
      const tfl = flops(mode, 1, 16, t.seq, t.dim, t.causal) / (t.ms! * 1e-3) / 1e12;
      groups.set(key, [...(groups.get(key) ?? []), [t.seq, tfl]]);
    }
    groups.forEach((points, name) => series.push({name, points: points.sort((a, b) => a[0] - b[0])}));
    const ymax = Math.max(1, ...series.flatMap(s => s.points.map(p => p[1])));
    const ly = (y: number) => Hh - pad - y / ymax * (Hh - 2 * pad);
    parts.push(`<g transform="translate(${ox},0)"><text x="${W / 2}" y="20" text-anchor="middle" font-size="14">${mode}: TFLOP/s vs S (B=1, H=16, f32)</text>`);
    parts.push(`<line x1="${pad}" y1="${Hh - pad}" x2="${W - pad}" y2="${Hh - pad}" stroke="#000"/><line x1="${pad}" y1="${pad}" x2="${pad}" y2="${Hh - pad}" stroke="#000"/>`);
    for (const s of seqs) {
      parts.push(`<text x="${lx(s)}" y="${Hh - pad + 15}" text-anchor="middle" font-size="10">${s}</text>`);
    }
    for (let i = 0; i <= 4; i++) {
      const y = ymax * i / 4;
      parts.push(`<text x="${pad - 5}" y="${ly(y) + 3}" text-anchor="end" font-size="10">${y.toFixed(1)}</text>`);
    }
    series.forEach((s, i) => {
      const c = colors[i % colors.length];
      const dash = s.name.includes('causal') ? '' : ' stroke-dasharray="4 3"';
      parts.push(`<polyline fill="none" stroke="${c}" stroke-width="2"${dash} points="${s.points.map(p => `${lx(p[0]).toFixed(1)},${ly(p[1]).toFixed(1)}`).join(' ')}"/>`);
      parts.push(`<text x="${pad + 8}" y="${pad + 12 * i}" font-size="10" fill="${c}">${s.name}</text>`);
    });
    parts.push('</g>');
  });
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W * modes.length}" height="${Hh}" font-family="sans-serif">\n${parts.join('\n')}\n</svg>\n`;
}

main().then(() => process.exit(0), e => {
  log(`benchmark failed: ${e?.stack ?? e}`);
  process.exit(1);
});
