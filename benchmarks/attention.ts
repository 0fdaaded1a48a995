/**
 * Attention benchmark on tfjs-webgpu (Node + Dawn): the fused FlashAttention
 * kernels against the composed matMul+softmax baseline (benchmarks/
 * baselines.ts), same process, same device. Forward (`fwd`) and
 * forward+backward through tf.grads (`fwdbwd`).
 *
 *   node attention.mjs [--modes fwd,fwdbwd] [--dims 64,128]
 *       [--seqs 512,1024,...,16384] [--causal both|true|false]
 *       [--impls fused,composed] [--composed-max-seq 8192]
 *       [--variants "tm,tx,nq,ty[,o][,p0|p1][,kN][,cN][,qs][,db][,uN];...|sliced|streamed|default"]
 *       [--torch torch.json] [--out DIR]
 *       [--budget-ms 600] [--warmup-ms 300] [--max-warmup-ms 300] [--check] [--repeat N]
 *       [--shapes "B,H,Hk,S;..."]
 *       [--grad-variants
 *         "bc,br,qbr,qbc[,s|sk|sq][,tN|tkN|tqN][,cN|ckN|cqN][,st|stk|stq][,p0|p0k|p0q];...
 *          |sliced|streamed"]
 *   node attention.mjs --sweep [--torch torch.json] [--out DIR]
 *
 * --sweep is the issue grid in one run: D 64 and 128, S 512 .. 16384, causal
 * and not, fwd and fwdbwd at B=1 x H=16, plus each D at B=4 x H=32 x S=1024
 * and at GQA H=32 / Hk=8 (S=4096); composed up to S=4096 (the score tensor
 * of larger S does not fit). It prints the issue's ratio table (fused /
 * composed / PyTorch SDPA) last. `python3 torch_sdpa.py --sweep` measures
 * the same rows for --torch.
 *
 * --keep-pool: tfjs's pooled buffers are never destroyed (no peak-memory
 * figure); by default each entry empties the pool to measure its peak.
 *
 * Warm-up: --warmup-ms of GPU work before each row, then on until two
 * repetitions agree within 5%, up to --max-warmup-ms (1500 under --sweep).
 * --repeat N (2 under --sweep) measures each row's implementations and
 * variants N times, every other pass in reverse order, and reports the
 * fastest pass (the JSON keeps them all): the first entry measured after
 * a change of shape can run several times slower than the same entry
 * measured later (benchmarks/RESULTS.md, "Session 9, call 4").
 *
 * --shapes adds problems beyond the B x H x S grid (GQA when Hk < H);
 * --grad-variants forces the backward's tiles (dK/dV keys, rows per step;
 * dQ rows, keys per step; `s`, `sk`, `sq`: S and dP on separate halves of
 * the invocations in both passes, dK/dV only, dQ only; `tN`: N invocations
 * instead of 128, `tkN`/`tqN` in one pass; `cN`: Q/dO (dK/dV pass) and K/V
 * (dQ pass) streamed in N head-dim slices, `ckN`/`cqN` in one pass; `st`:
 * with cN, the other operand streamed too (K^T/V^T in dK/dV, Q/dO rows in
 * dQ), `stk`/`stq` in one pass; `p0`: with cN, no register prefetch of the
 * slices, `p0k`/`p0q` in one pass; `sliced` / `streamed`: every candidate of
 * tuning.ts's SLICED_ / STREAMED_GRAD_CANDIDATES) on the fwdbwd rows.
 * --variants forces forward tilings
 * (`o` outer-product mode, `pN` prefetch off/on, `kN` N key-range splits,
 * `cN` K^T and V in N head-dim slices, `qs` Q^T streamed with K^T, `db`
 * two slice buffers, `uN` N head-dim steps or keys per unrolled loop
 * body; `default` the planned tiling, `sliced` / `streamed`
 * every candidate of tuning.ts's SLICED_ / STREAMED_FORWARD_CANDIDATES).
 *
 * Time: median over repetitions after warm-up; a repetition runs the op K
 * times (K so that it lasts >= ~20 ms) and waits for the GPU queue to drain
 * (no read-back). Each entry is also timed on the GPU alone (timestamp
 * queries around K calls in one command buffer): the wall time includes
 * the host, which can stall the GPU's feed for tens of milliseconds
 * (benchmarks/RESULTS.md, "Session 11, calls 4 and 5"); the ratio table is
 * printed for both clocks. TFLOP/s by docs/design.md, "Performance method": forward 4*B*S*S*H*D,
 * halved for causal; forward+backward 3.5x that. Peak memory: GPU bytes allocated by one call
 * starting from an empty buffer pool (inputs excluded, outputs included). Progress on stderr, the
 * table on stdout, JSON + SVG in --out.
 *
 * The device is built here with the adapter's limits (large buffers, 48 KiB
 * of workgroup memory on an H100) and subgroups, and registered as tfjs's
 * 'webgpu' backend (docs/design.md, "Platform facts").
 */
/// <reference types="@webgpu/types" />
import * as fs from 'fs';
import * as path from 'path';

import {drainQueue, gpuStepMs, TimedBackend} from './gpu_timer';
import {parseForwardVariant, parseGradVariant} from './plan_variants';
import {adapterName, openWebGPUDevice, useWebGPUBackend} from './webgpu_setup';

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
  /** Passes over each row's implementations and variants (odd ones reversed). */
  repeat: number;
  /**
   * --keep-pool: never destroy tfjs's pooled buffers (no peak-memory
   * figure), so that no call after the first allocates GPU memory afresh.
   */
  keepPool: boolean;
  /** Warm-up continues past warmupMs until timings settle, up to this. */
  maxWarmupMs: number;
  check: boolean;
  batch: number;
  heads: number;
  /** Flags for Dawn's create(), e.g. enable-dawn-features=... */
  dawnFlags: string[];
  /** --tensor-cores: the subgroup-matrix kernels where the device has them. */
  tensorCores: boolean;
  /** Extra problems [B, H, Hk, S] run at every D. */
  shapes: Shape[];
  gradVariants: string[];
  sweep: boolean;
}

/** One problem: batch, query heads, K/V heads, sequence length, head dim. */
export interface Shape {
  b: number;
  h: number;
  hk: number;
  s: number;
}

/** The issue's extra rows: a batch of 4 x 32 heads, and GQA 32 / 8. */
export const SWEEP_SHAPES = '4,32,32,1024;1,32,8,4096';

function parseShapes(text: string): Shape[] {
  return text.split(';').filter(x => x).map(x => {
    const [b, h, hk, s] = x.split(',').map(Number);
    return {b, h, hk, s};
  });
}

function parseArgs(argv: string[]): Args {
  const get = (name: string, dflt: string) => {
    const i = argv.indexOf(`--${name}`);
    return i >= 0 && i + 1 < argv.length ? argv[i + 1] : dflt;
  };
  const nums = (s: string) => s.split(',').filter(x => x).map(Number);
  const sweep = argv.includes('--sweep');
  const causal = get('causal', 'both');
  return {
    sweep,
    shapes: parseShapes(get('shapes', sweep ? SWEEP_SHAPES : '')),
    gradVariants: get('grad-variants', '').split(';').filter(x => x),
    modes: get('modes', 'fwd,fwdbwd').split(','),
    dims: nums(get('dims', '64,128')),
    seqs: nums(get('seqs', '512,1024,2048,4096,8192,16384')),
    causal: causal === 'both' ? [true, false] : [causal === 'true'],
    impls: get('impls', 'fused,composed').split(','),
    composedMaxSeq: Number(get('composed-max-seq', sweep ? '4096' : '8192')),
    variants: get('variants', '').split(';').filter(x => x),
    torch: argv.includes('--torch') ? get('torch', '') : null,
    out: get('out', 'benchmarks/out'),
    budgetMs: Number(get('budget-ms', sweep ? '120' : '600')),
    warmupMs: Number(get('warmup-ms', '300')),
    repeat: Math.max(1, Number(get('repeat', sweep ? '2' : '1'))),
    keepPool: argv.includes('--keep-pool'),
    maxWarmupMs: Number(get('max-warmup-ms', sweep ? '1500' : get('warmup-ms', '300'))),
    check: argv.includes('--check'),
    batch: Number(get('batch', '1')),
    heads: Number(get('heads', '16')),
    dawnFlags: get('dawn-flags', '').split(' ').filter(x => x),
    tensorCores: argv.includes('--tensor-cores'),
  };
}

const log = (msg: string) => process.stderr.write(`${msg}\n`);

export interface Row {
  mode: string;
  batch: number;
  heads: number;
  headsKV: number;
  impl: string;
  variant: string;
  dim: number;
  seq: number;
  causal: boolean;
  ms: number|null;
  tflops: number|null;
  peakMiB: number|null;
  reps: number;
  /** JavaScript time per call (enqueueing, no GPU wait). */
  cpuMs: number|null;
  /**
   * GPU time per call from timestamp queries (the smallest of the passes'
   * medians), null without the device feature.
   */
  gpuMs: number|null;
  /**
   * WebGPU API calls of one steady-state call (benchmarks/webgpu_counters.ts):
   * dispatches, queue submits, error scopes, host uploads.
   */
  api: {dispatches: number, submits: number, errorScopes: number, uploads: number}|null;
  status: string;
  /** The median of each --repeat pass; ms is the smallest. */
  passMs: number[];
}

function flops(mode: string, b: number, h: number, s: number, d: number, causal: boolean): number {
  const fwd = 4 * b * s * s * h * d / (causal ? 2 : 1);
  return mode === 'fwd' ? fwd : 3.5 * fwd;
}

interface Bench {
  tf: TF;
  backend: TimedBackend&{
    bufferManager:
        {numBytesAllocated: number, freeBuffers: Map<string, GPUBuffer[]>, numFreeBuffers: number},
  };
}

async function sync(b: Bench): Promise<void> {
  await drainQueue(b.backend);
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
    b: Bench, run: () => unknown, budgetMs: number, warmupMs = 0, maxWarmupMs = warmupMs,
    keepPool = false): Promise<{
  ms: number,
  peakMiB: number | null,
  reps: number,
  cpuMs: number,
  repRange: [number, number],
  gpuMs: number | null,
  api: NonNullable<Row['api']>
}> {
  const {tf} = b;
  const once = () => tf.dispose(run() as import("@tensorflow/tfjs-core").Tensor[]);
  // First call: compiles and uploads the inputs; the second measures peak
  // memory from an empty pool.
  once();
  await sync(b);
  let peakMiB: number|null = null;
  if (!keepPool) {
    emptyPool(b);
    const before = b.backend.bufferManager.numBytesAllocated;
    once();
    await sync(b);
    peakMiB = (b.backend.bufferManager.numBytesAllocated - before) / 2 ** 20;
  }
  const {webgpuCounters} = await import('./webgpu_counters');
  const counters = webgpuCounters();
  once();
  const c = counters.snapshot();
  const api = {
    dispatches: c.dispatches,
    submits: c.submits,
    errorScopes: c.errorScopes,
    uploads: c.hostUploads
  };
  await sync(b);
  let t0 = performance.now();
  once();
  await sync(b);
  const est = Math.max(performance.now() - t0, 0.005);
  const k = Math.max(1, Math.min(200, Math.ceil(20 / est)));
  // Keep the GPU busy first: after the CPU-side input setup the GPU has
  // idled and its clocks come back slowly (in the issue 14 sweep one plan
  // measured 2x apart in one process after a short fixed warm-up). Warm up
  // for warmupMs, then on until two consecutive repetitions agree within
  // 5% (at most maxWarmupMs).
  const w0 = performance.now();
  let last = Infinity;
  while (performance.now() - w0 < maxWarmupMs) {
    const r0 = performance.now();
    for (let i = 0; i < k; i++) {
      once();
    }
    await sync(b);
    const perCall = (performance.now() - r0) / k;
    if (performance.now() - w0 >= warmupMs && Math.abs(perCall - last) <= 0.05 * last) {
      break;
    }
    last = perCall;
  }
  const reps = Math.max(3, Math.min(30, Math.floor(budgetMs / (k * est))));
  const times: number[] = [];
  const cpu: number[] = [];
  for (let r = 0; r < reps; r++) {
    t0 = performance.now();
    for (let i = 0; i < k; i++) {
      once();
    }
    cpu.push((performance.now() - t0) / k);
    await sync(b);
    times.push((performance.now() - t0) / k);
  }
  const median = (xs: number[]) => xs.sort((x, y) => x - y)[Math.floor(xs.length / 2)];
  const repRange: [number, number] = [Math.min(...times), Math.max(...times)];
  // The same calls timed on the GPU alone: a wall-clock repetition that is
  // slow where these are not was slowed by the host, not by the kernels.
  const gpu: number[] = [];
  for (let r = 0; r < 3; r++) {
    const g = await gpuStepMs(tf, b.backend, once, k);
    if (g != null) {
      gpu.push(g);
    }
  }
  const gpuMs = gpu.length > 0 ? median(gpu) : null;
  return {ms: median(times), peakMiB, reps, cpuMs: median(cpu), repRange, gpuMs, api};
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const {TENSOR_CORE_DAWN_FLAGS, TENSOR_CORE_FEATURES} = await import('../demo/tensor_cores');
  const setup = await openWebGPUDevice({
    dawnFlags: args.tensorCores ? [...args.dawnFlags, ...TENSOR_CORE_DAWN_FLAGS] : args.dawnFlags,
    features: ['subgroups', 'timestamp-query', ...(args.tensorCores ? TENSOR_CORE_FEATURES : [])],
    onError: log
  });
  const {device, adapter} = setup;
  const tf = await import('@tensorflow/tfjs-core');
  // tfjs-core's CommonJS bundle registers no gradients; tfjs-layers' does.
  await import('@tensorflow/tfjs-layers');
  const fa = await import('../src/index');
  const {composedAttention} = await import('./baselines');
  const {setForwardOverride, planForward, forwardStats} =
      await import('../kernels/webgpu/FlashAttention');
  const {checkOwnPipelineErrors} = await import('../kernels/webgpu/own_pipeline');
  const {enableTensorCores, tensorCoreUsage} = await import('../demo/tensor_cores');
  await useWebGPUBackend(setup);
  const bench: Bench = {tf, backend: tf.backend() as unknown as Bench['backend']};
  const info = adapter.info;
  const deviceName = adapterName(adapter) +
      (args.dawnFlags.length > 0 ? ` (Dawn flags: ${args.dawnFlags.join(' ')})` : '');
  log(`device: ${deviceName}; workgroup storage ${
      device.limits.maxComputeWorkgroupStorageSize} B, invocations ${
      device.limits.maxComputeInvocationsPerWorkgroup}, subgroups ${
      device.features.has('subgroups' as GPUFeatureName)} (min ${
      (info as unknown as {subgroupMinSize?: number}).subgroupMinSize}), max binding ${
      device.limits.maxStorageBufferBindingSize}`);
  if (args.tensorCores) {
    log(enableTensorCores(device));
  }
  for (const d of args.dims) {
    for (const s of args.seqs) {
      log(`D=${d} S=${s}: fused tiling ${
          JSON.stringify(planForward(device, d, d, args.batch * args.heads * s))}`);
    }
  }
  const {batch: B, heads: H} = args;
  const rows: Row[] = [];
  const maxBinding =
      Math.min(device.limits.maxStorageBufferBindingSize, device.limits.maxBufferSize);

  const checks: string[] = [];
  if (args.check) {
    // Numerical sanity on this device: fused vs composed, causal and not.
    for (const d of args.dims) {
      for (const causal of args.causal) {
        const s = 1024;
        const [q, k, v] = [0, 1, 2].map(
            () => tf.randomNormal([B, s, H, d]) as import('@tensorflow/tfjs-core').Tensor4D);
        const a = fa.flashAttention(q, k, v, {causal});
        const c = composedAttention(q, k, v, {causal});
        const diff = tf.tidy(() => tf.max(tf.abs(tf.sub(a, c))));
        const ref = tf.tidy(() => tf.max(tf.abs(c)));
        const err = (await diff.data())[0] / (await ref.data())[0];
        tf.dispose([diff, ref]);
        await checkOwnPipelineErrors();
        log(`check D=${d} S=${s} causal=${causal}: max|fused - composed| / max|composed| = ${
            err.toExponential(2)}`);
        checks.push(`D=${d} S=${s} causal=${causal}: max|fused - composed| / max|composed| = ${
            err.toExponential(2)}`);
        tf.dispose([q, k, v, a, c]);
      }
    }
  }

  // `sliced` / `streamed`: those candidate lists of tuning.ts; `default`: the plan.
  const {SLICED_FORWARD_CANDIDATES, STREAMED_FORWARD_CANDIDATES, forwardVariantName} =
      await import('../kernels/webgpu/tuning');
  const namedVariants: Record<string, string[]> = {
    sliced: SLICED_FORWARD_CANDIDATES.map(forwardVariantName),
    streamed: STREAMED_FORWARD_CANDIDATES.map(forwardVariantName),
  };
  const variants =
      args.variants.length > 0 ? args.variants.flatMap(x => namedVariants[x] ?? [x]) : ['default'];
  const checked = new Set<string>();
  const checkVariant = async (d: number, causal: boolean) => {
    const s = 512;
    const [q, k, v] = [0, 1, 2].map(
        () => tf.randomNormal([B, s, H, d]) as import('@tensorflow/tfjs-core').Tensor4D);
    tf.env().set(fa.FLASH_ATTENTION_IMPL, 'fused');
    try {
      const a = fa.flashAttention(q, k, v, {causal});
      const c = composedAttention(q, k, v, {causal});
      const diff = tf.tidy(() => tf.max(tf.abs(tf.sub(a, c))));
      const ref = tf.tidy(() => tf.max(tf.abs(c)));
      const err = (await diff.data())[0] / (await ref.data())[0];
      tf.dispose([diff, ref, a, c]);
      await checkOwnPipelineErrors();
      return `max|fused - composed| / max|composed| = ${err.toExponential(2)}${
          err < 1e-4 ? '' : ' FAILED'}`;
    } catch (e) {
      return `error: ${(e as Error).message.slice(0, 160)}`;
    } finally {
      tf.dispose([q, k, v]);
    }
  };
  const {fusedGradRunCount, setGradTilesOverride} =
      await import('../kernels/webgpu/FlashAttentionGrad');
  // The forced backward tiles (set by the caller) against the composed
  // baseline's gradients at S=512: dq, dk, dv within the gradient bound,
  // and the fused backward must have run (tiles that do not fit the device
  // would fall back to the reference backward).
  const checkGradVariant = async (d: number, causal: boolean) => {
    const s = 512;
    const inputs = [0, 1, 2, 3].map(
        () => tf.randomNormal([B, s, H, d]) as import('@tensorflow/tfjs-core').Tensor4D);
    const [q, k, v, dy] = inputs;
    type T4 = import('@tensorflow/tfjs-core').Tensor4D;
    tf.env().set(fa.FLASH_ATTENTION_IMPL, 'fused');
    try {
      const before = fusedGradRunCount();
      const fused = tf.grads(
          (a, kk, vv) => fa.flashAttention(a as T4, kk as T4, vv as T4, {causal}))([q, k, v], dy);
      const ran = fusedGradRunCount() - before;
      const ref = tf.grads((a, kk, vv) => composedAttention(a as T4, kk as T4, vv as T4, {causal}))(
          [q, k, v], dy);
      let err = 0;
      for (let i = 0; i < 3; i++) {
        const diff = tf.tidy(() => tf.max(tf.abs(tf.sub(fused[i], ref[i]))));
        const top = tf.tidy(() => tf.max(tf.abs(ref[i])));
        err = Math.max(err, (await diff.data())[0] / (await top.data())[0]);
        tf.dispose([diff, top]);
      }
      tf.dispose([...fused, ...ref]);
      await checkOwnPipelineErrors();
      if (ran !== 1) {
        return 'FAILED: the fused backward did not run (do the tiles fit the device?)';
      }
      return `max|fused - composed| / max|composed| over dq, dk, dv = ${err.toExponential(2)}${
          err < 5e-4 ? '' : ' FAILED'}`;
    } catch (e) {
      return `error: ${(e as Error).message.slice(0, 160)}`;
    } finally {
      tf.dispose(inputs);
    }
  };
  // `sliced` / `streamed`: every candidate of tuning.ts's SLICED_ /
  // STREAMED_GRAD_CANDIDATES, in the syntax above.
  const {SLICED_GRAD_CANDIDATES, STREAMED_GRAD_CANDIDATES} =
      await import('../kernels/webgpu/tuning');
  type GradTiles = import('../kernels/webgpu/FlashAttentionGrad').GradTiles;
  const gradVariantName = ({dkdv, dq}: GradTiles) => {
    const flags = [
      `ck${dkdv.dimChunks}`,
      `cq${dq.dimChunks}`,
      dkdv.threads !== 128 ? `tk${dkdv.threads}` : '',
      dq.threads !== 128 ? `tq${dq.threads}` : '',
      dkdv.streamed ? 'stk' : '',
      dq.streamed ? 'stq' : '',
      dkdv.prefetch === false ? 'p0k' : '',
      dq.prefetch === false ? 'p0q' : '',
    ];
    return [dkdv.bc, dkdv.br, dq.br, dq.bc, ...flags.filter(f => f !== '')].join(',');
  };
  const gradLists: Record<string, string[]> = {
    sliced: SLICED_GRAD_CANDIDATES.map(gradVariantName),
    streamed: STREAMED_GRAD_CANDIDATES.map(gradVariantName),
  };
  const gradVariants = args.gradVariants.flatMap(g => gradLists[g] ?? [g]);
  type Tensor4D = import('@tensorflow/tfjs-core').Tensor4D;
  const problems: Shape[] = [
    ...args.seqs.map(s => ({b: B, h: H, hk: H, s})),
    ...args.shapes,
  ];
  // Inputs are made once per problem (random normals are drawn on the CPU).
  for (const d of args.dims) {
    for (const p of problems) {
      const s = p.s;
      const [q, dy] = [0, 1].map(() => tf.randomNormal([p.b, s, p.h, d]) as Tensor4D);
      const [k, v] = [0, 1].map(() => tf.randomNormal([p.b, s, p.hk, d]) as Tensor4D);
      // The composed baseline repeats K/V heads for GQA, as users do.
      const heads = p.hk === p.h ?
          null :
          tf.tensor1d(Array.from({length: p.h}, (_, i) => Math.floor(i * p.hk / p.h)), 'int32');
      const composed = (a: Tensor4D, kk: Tensor4D, vv: Tensor4D, causal: boolean) => heads == null ?
          composedAttention(a, kk, vv, {causal}) :
          tf.tidy(
              () => composedAttention(
                  a, tf.gather(kk, heads, 2) as Tensor4D, tf.gather(vv, heads, 2) as Tensor4D,
                  {causal}));
      const label = `B=${p.b} H=${p.h}${p.hk !== p.h ? `/${p.hk}` : ''} D=${d} S=${s}`;
      for (const mode of args.modes) {
        for (const causal of args.causal) {
          const fusedVariants =
              [...variants, ...(mode === 'fwd' ? [] : gradVariants.map(g => `g:${g}`))];
          const entries = args.impls.flatMap(
              impl => (impl === 'fused' ? fusedVariants : ['-']).map(variant => ({impl, variant})));
          // Each pass measures every entry of this row; odd passes go in
          // reverse order, so that no entry is always the first measured
          // after a change of shape (which can be slowed by what ran before).
          const entryRows = new Map<string, Row>();
          let lastRepRange: [number, number] = [NaN, NaN];
          let lastGpuMs: number|null = null;
          for (let pass = 0; pass < args.repeat; pass++) {
            for (const {impl, variant} of pass % 2 === 0 ? entries : [...entries].reverse()) {
              const entryKey = `${impl} ${variant}`;
              const earlier = entryRows.get(entryKey);
              if (earlier != null && earlier.ms == null) {
                continue;  // refused or failed on an earlier pass
              }
              const row: Row = earlier ?? {
                mode,
                batch: p.b,
                heads: p.h,
                headsKV: p.hk,
                impl,
                variant,
                dim: d,
                seq: s,
                causal,
                ms: null,
                tflops: null,
                peakMiB: null,
                reps: 0,
                cpuMs: null,
                gpuMs: null,
                api: null,
                status: 'ok',
                passMs: []
              };
              if (earlier == null) {
                entryRows.set(entryKey, row);
                rows.push(row);
              }
              const scoreBytes = p.b * p.h * s * s * 4;
              if (impl === 'composed' && scoreBytes > maxBinding) {
                row.status = `OOM: a [${p.b},${p.h},${s},${s}] f32 score tensor (${
                    (scoreBytes / 2 ** 30).toFixed(1)} GiB) exceeds the device's ${
                    (maxBinding / 2 ** 30).toFixed(1)} GiB buffer limit`;
                log(`${mode} ${impl} ${label} causal=${causal}: ${row.status}`);
                continue;
              }
              if (impl === 'composed' && s > args.composedMaxSeq) {
                row.status = `skipped: S > --composed-max-seq ${args.composedMaxSeq} (time budget)`;
                log(`${mode} ${impl} ${label} causal=${causal}: ${row.status}`);
                continue;
              }
              if (variant.startsWith('g:')) {
                try {
                  setGradTilesOverride(parseGradVariant(variant.slice(2), true));
                } catch (e) {
                  row.status = `error: ${(e as Error).message.slice(0, 160)}`;
                  continue;
                }
                if (args.check && !checked.has(`${d} ${causal} ${variant}`)) {
                  checked.add(`${d} ${causal} ${variant}`);
                  const msg = await checkGradVariant(d, causal);
                  log(`check [${variant}] D=${d} causal=${causal}: ${msg}`);
                  checks.push(`[${variant}] D=${d} S=512 causal=${causal}: ${msg}`);
                }
              } else if (variant !== 'default' && variant !== '-') {
                try {
                  setForwardOverride(parseForwardVariant(variant));
                } catch (e) {
                  row.status = `error: ${(e as Error).message.slice(0, 160)}`;
                  continue;
                }
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
              tf.env().set(
                  fa.FLASH_ATTENTION_IMPL,
                  impl === 'reference' ? 'reference' :
                      mode === 'fwd'   ? 'fused' :
                                         'auto');
              if (impl === 'fused' && mode !== 'fwd' &&
                  !fa.hasFusedKernel(fa.FlashAttentionGrad, 'webgpu')) {
                row.status = 'ok (backward: composed reference, no fused FlashAttentionGrad)';
              }
              const attend = (a: Tensor4D, kk: Tensor4D, vv: Tensor4D) => impl === 'composed' ?
                  composed(a, kk, vv, causal) :
                  fa.flashAttention(a, kk, vv, {causal});
              const run = mode === 'fwd' ?
                  () => attend(q, k, v) :
                  () => tf.grads(
                      (a: import('@tensorflow/tfjs-core').Tensor,
                       kk: import('@tensorflow/tfjs-core').Tensor,
                       vv: import('@tensorflow/tfjs-core').Tensor) =>
                          attend(a as Tensor4D, kk as Tensor4D, vv as Tensor4D))([q, k, v], dy);
              try {
                device.pushErrorScope('out-of-memory');
                device.pushErrorScope('validation');
                const dispatches = forwardStats.dispatches;
                const m = await measure(
                    bench, run, args.budgetMs, args.warmupMs, args.maxWarmupMs, args.keepPool);
                if (impl === 'fused' && forwardStats.dispatches === dispatches) {
                  throw new Error('the fused forward did not run');
                }
                const validation = await device.popErrorScope();
                const oom = await device.popErrorScope();
                await checkOwnPipelineErrors();
                if (oom != null || validation != null) {
                  row.status = `GPU error: ${(oom ?? validation)!.message.slice(0, 120)}`;
                  row.ms = null;
                  row.tflops = null;
                } else {
                  // The fastest pass: the others were slowed by something
                  // outside the op (all of them are kept in passMs).
                  row.passMs.push(m.ms);
                  if (row.ms == null || m.ms < row.ms) {
                    row.ms = m.ms;
                    row.reps = m.reps;
                    row.cpuMs = m.cpuMs;
                    row.tflops = flops(mode, p.b, p.h, s, d, causal) / (m.ms * 1e-3) / 1e12;
                  }
                  row.peakMiB = m.peakMiB;
                  row.api = m.api;
                  lastRepRange = m.repRange;
                  lastGpuMs = m.gpuMs;
                  if (m.gpuMs != null && (row.gpuMs == null || m.gpuMs < row.gpuMs)) {
                    row.gpuMs = m.gpuMs;
                  }
                }
              } catch (e) {
                row.status = `error: ${(e as Error).message.slice(0, 160)}`;
                row.ms = null;
                row.tflops = null;
              } finally {
                setForwardOverride(null);
                setGradTilesOverride(null);
              }
              log(`${args.repeat > 1 ? `[pass ${pass + 1}/${args.repeat}] ` : ''}${mode} ${impl}${
                  variant !== 'default' && variant !== '-' ? ` [${variant}]` :
                                                             ''} ${label} causal=${causal}: ${
                  row.ms != null ?
                      `${row.passMs[row.passMs.length - 1].toFixed(3)} ms${
                          args.repeat > 1 ? ` (fastest pass ${row.ms.toFixed(3)})` :
                                            ''}, ${row.tflops!.toFixed(2)} TFLOP/s, reps ${
                          lastRepRange.map(x => x.toFixed(3)).join('..')} ms, GPU ${
                          lastGpuMs == null ? '-' : lastGpuMs.toFixed(3)} ms, peak ${
                          row.peakMiB == null ? '-' : row.peakMiB.toFixed(1)} MiB, JS ${
                          row.cpuMs!.toFixed(3)} ms/call (${row.reps} reps), ${
                          row.api!.dispatches} dispatches, ${row.api!.submits} submits, ${
                          row.api!.errorScopes} error scopes, ${row.api!.uploads} uploads/call` :
                      row.status}`);
            }
          }
        }
      }
      tf.dispose([q, k, v, dy]);
      if (heads != null) {
        heads.dispose();
      }
    }
  }
  tf.env().set(fa.FLASH_ATTENTION_IMPL, 'auto');

  const torch = args.torch != null && fs.existsSync(args.torch) ?
      JSON.parse(fs.readFileSync(args.torch, "utf8")) as {device: string, rows: TorchRow[]} :
      null;
  fs.mkdirSync(args.out, {recursive: true});
  const result = {
    date: new Date().toISOString(),
    device: deviceName,
    argv: process.argv.slice(2),
    batch: B,
    heads: H,
    checks,
    rows,
    torch
  };
  fs.writeFileSync(path.join(args.out, 'attention.json'), JSON.stringify(result, null, 1));
  fs.writeFileSync(
      path.join(args.out, 'attention.svg'),
      chart(
          rows.filter(r => r.batch === B && r.heads === H && r.headsKV === H),
          (torch?.rows ?? [
          ]).filter(t => (t.batch ?? B) === B && (t.heads ?? H) === H && (t.headsKV ?? H) === H)));
  console.log(table(rows, torch?.rows ?? [], B, H));
  if (checks.length > 0) {
    console.log(
        `\nChecks (fused vs composed on this device):\n${checks.map(c => `- ${c}`).join('\n')}`);
  }
  console.log(`\n${ratioTable(rows, torch?.rows ?? [], B, H)}`);
  if (rows.some(r => r.gpuMs != null)) {
    console.log(`\n${ratioTable(rows, torch?.rows ?? [], B, H, 'gpu')}`);
  }
  if (args.tensorCores) {
    console.log(`\n${tensorCoreUsage()}`);
  }
}

type TorchRow = {
  mode: string,
  dim: number,
  seq: number,
  causal: boolean,
  ms: number|null,
  batch?: number,
  heads?: number,
  headsKV?: number
};

/** The problem a row measures, as one string (torch rows default to B, H). */
function problemKey(
    r: {
      mode: string,
      dim: number,
      seq: number,
      causal: boolean,
      batch?: number,
      heads?: number,
      headsKV?: number
    },
    B: number, H: number): string {
  const h = r.heads ?? H;
  return `${r.mode}|${r.batch ?? B}|${h}|${r.headsKV ?? h}|${r.dim}|${r.causal}|${r.seq}`;
}

interface Line {
  mode: string;
  b: number;
  h: number;
  hk: number;
  dim: number;
  causal: boolean;
  seq: number;
  fused: Row|undefined;
  composed: Row|undefined;
  torchMs: number|null;
  variants: number;
}

/** One line per problem: the fastest fused variant, composed and PyTorch. */
function lines(rows: Row[], torch: TorchRow[], B: number, H: number): Line[] {
  const order = (l: Line) =>
      [l.mode === 'fwd' ? 0 : 1, l.b * l.h === B * H && l.hk === l.h ? 0 : 1, l.b, l.h, l.hk, l.dim,
       l.causal ? 0 : 1, l.seq];
  const byKey = new Map<string, Line>();
  for (const r of rows) {
    const key = problemKey(r, B, H);
    let l = byKey.get(key);
    if (l == null) {
      const t = torch.find(t => problemKey(t, B, H) === key);
      l = {
        mode: r.mode,
        b: r.batch,
        h: r.heads,
        hk: r.headsKV,
        dim: r.dim,
        causal: r.causal,
        seq: r.seq,
        fused: undefined,
        composed: undefined,
        torchMs: t?.ms ?? null,
        variants: 0
      };
      byKey.set(key, l);
    }
    if (r.impl === 'composed') {
      l.composed = r;
    } else if (r.impl === 'fused') {
      l.variants++;
      if (l.fused == null || l.fused.ms == null || (r.ms != null && r.ms < l.fused.ms)) {
        l.fused = r;
      }
    }
  }
  return [...byKey.values()].sort((x, y) => {
    const a = order(x), b = order(y);
    const i = a.findIndex((v, n) => v !== b[n]);
    return i < 0 ? 0 : a[i] - b[i];
  });
}

function table(rows: Row[], torch: TorchRow[], B: number, H: number): string {
  const out: string[] = [];
  const f = (x: number|null|undefined, digits = 2) => x == null ? '-' : x.toFixed(digits);
  const ratio = (num: number|null|undefined, den: number|null|undefined) =>
      num != null && den != null ? `${(num / den).toFixed(2)}x` : '-';
  out.push(
      'float32; ms = median time per call; TFLOP/s by docs/design.md, "Performance method"; peak = GPU MiB ' +
      'allocated by one call; JS = enqueue time per call; x = speed ratio (higher: fused faster)');
  out.push('');
  out.push(
      '| mode | B x H/Hk | D | S | causal | fused ms | fused TFLOP/s | fused peak MiB | JS ms | ' +
      'composed ms | composed peak MiB | torch ms | fused / composed | fused / torch | ' +
      'composed / torch |');
  out.push(`|${' --- |'.repeat(15)}`);
  const notes: string[] = [];
  for (const l of lines(rows, torch, B, H)) {
    const {fused, composed} = l;
    const what = `${l.mode} B=${l.b} H=${l.h}/${l.hk} D=${l.dim} S=${l.seq} causal=${l.causal}`;
    if (composed != null && composed.ms == null) {
      notes.push(`composed ${what}: ${composed.status}`);
    }
    if (fused != null && fused.ms == null) {
      notes.push(`fused ${what}: ${fused.status}`);
    }
    const compMs = composed == null ? '-' :
        composed.ms == null         ? composed.status.split(':')[0] :
                                      f(composed.ms);
    out.push(`| ${l.mode} | ${l.b} x ${l.h}/${l.hk} | ${l.dim} | ${l.seq} | ${l.causal} | ${
        f(fused?.ms, 3)}${l.variants > 1 && fused ? ` [${fused.variant}]` : ''} | ${
        f(fused?.tflops)} | ${f(fused?.peakMiB, 1)} | ${f(fused?.cpuMs, 3)} | ${compMs} | ${
        f(composed?.peakMiB, 1)} | ${f(l.torchMs, 3)} | ${ratio(composed?.ms, fused?.ms)} | ${
        ratio(l.torchMs, fused?.ms)} | ${ratio(l.torchMs, composed?.ms)} |`);
  }
  if (notes.length > 0) {
    out.push('');
    out.push(...notes.map(n => `- ${n}`));
  }
  const variants = rows.filter(r => r.impl === 'fused' && r.variant !== 'default');
  if (variants.length > 0) {
    out.push('');
    out.push('Fused variants (forward tm,tx,nq,ty[,flags]; g: backward tiles bc,br,qbr,qbc):');
    for (const r of variants) {
      out.push(`- ${r.mode} B=${r.batch} H=${r.heads}/${r.headsKV} D=${r.dim} S=${r.seq} causal=${
          r.causal} [${r.variant}]: ${
          r.ms != null ? `${r.ms.toFixed(3)} ms, ${r.tflops!.toFixed(2)} TFLOP/s` : r.status}`);
    }
  }
  return out.join('\n');
}

/**
 * The issue's table: per (mode, D, causal), fused / PyTorch at each S of
 * the B x H grid (fused / composed in brackets where composed ran), and
 * the extra problems after it.
 */
function ratioTable(
    rows: Row[], torch: TorchRow[], B: number, H: number, clock: 'wall'|'gpu' = 'wall'): string {
  const all = lines(rows, torch, B, H);
  const grid = all.filter(l => l.b === B && l.h === H && l.hk === H);
  const seqs = [...new Set(grid.map(l => l.seq))].sort((a, b) => a - b);
  const time = (r: Row|undefined) => clock === 'wall' ? r?.ms : r?.gpuMs;
  const cell = (l: Line|undefined) => {
    const fusedMs = time(l?.fused);
    if (l == null || fusedMs == null) {
      return '-';
    }
    const composedMs = time(l.composed);
    const t = l.torchMs != null ? `${(l.torchMs / fusedMs).toFixed(2)}x` : '-';
    const c = composedMs != null ? ` (${(composedMs / fusedMs).toFixed(2)}x)` : '';
    return `${t}${c}`;
  };
  const out = [
    `fused / PyTorch SDPA f32 (fused / composed), B=${B}, H=${H}, by ${
        clock === 'wall' ? 'wall time per call' :
                           'GPU time per call (timestamp queries; PyTorch: CUDA events)'}; ` +
        'higher is faster, below 1 in brackets: fused slower than composed',
    ''
  ];
  out.push(`| | ${seqs.map(s => `S=${s}`).join(' | ')} |`);
  out.push(`|${' --- |'.repeat(seqs.length + 1)}`);
  const groups = [...new Set(grid.map(l => `${l.mode}|${l.dim}|${l.causal}`))];
  for (const g of groups) {
    const [mode, dim, causal] = g.split('|');
    const at = (s: number) => grid.find(l => `${l.mode}|${l.dim}|${l.causal}` === g && l.seq === s);
    out.push(`| ${mode} D=${dim} ${causal === 'true' ? 'causal' : 'non-causal'} | ${
        seqs.map(s => cell(at(s))).join(' | ')} |`);
  }
  const extra = all.filter(l => !grid.includes(l));
  if (extra.length > 0) {
    out.push('');
    out.push('| problem | fused / torch (fused / composed) |');
    out.push('| --- | --- |');
    for (const l of extra) {
      out.push(`| ${l.mode} B=${l.b} H=${l.h}/${l.hk} D=${l.dim} S=${l.seq} ${
          l.causal ? 'causal' : 'non-causal'} | ${cell(l)} |`);
    }
  }
  return out.join('\n');
}

/** TFLOP/s against S (log scale), one panel per mode. */
function chart(rows: Row[], torch: TorchRow[]): string {
  const modes = [...new Set(rows.map(r => r.mode))];
  const W = 560, Hh = 360, pad = 50;
  const colors =
      ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#e377c2', '#17becf'];
  const parts: string[] = [];
  const seqs = [...new Set(rows.map(r => r.seq))].sort((a, b) => a - b);
  const lx = (s: number) => pad +
      (Math.log2(s) - Math.log2(seqs[0])) /
          Math.max(1, Math.log2(seqs[seqs.length - 1]) - Math.log2(seqs[0])) * (W - 2 * pad);
  modes.forEach((mode, mi) => {
    const ox = mi * W;
    type Series = {name: string, points: Array<[number, number]>};
    const series: Series[] = [];
    const keyOf = (impl: string, dim: number, causal: boolean) =>
        `${impl} D=${dim}${causal ? ' causal' : ''}`;
    const groups = new Map<string, Array<[number, number]>>();
    for (const r of rows.filter(
             r => r.mode === mode && r.tflops != null &&
                 (r.variant === 'default' || r.variant === '-'))) {
      const key = keyOf(r.impl, r.dim, r.causal);
      groups.set(key, [...(groups.get(key) ?? []), [r.seq, r.tflops!]]);
    }
    for (const t of torch.filter(t => t.mode === mode && t.ms != null)) {
      const key = keyOf('torch SDPA', t.dim, t.causal);
      const tfl = flops(mode, 1, 16, t.seq, t.dim, t.causal) / (t.ms! * 1e-3) / 1e12;
      groups.set(key, [...(groups.get(key) ?? []), [t.seq, tfl]]);
    }
    groups.forEach(
        (points, name) => series.push({name, points: points.sort((a, b) => a[0] - b[0])}));
    const ymax = Math.max(1, ...series.flatMap(s => s.points.map(p => p[1])));
    const ly = (y: number) => Hh - pad - y / ymax * (Hh - 2 * pad);
    parts.push(`<g transform="translate(${ox},0)"><text x="${
        W / 2}" y="20" text-anchor="middle" font-size="14">${
        mode}: TFLOP/s vs S (B=1, H=16, f32)</text>`);
    parts.push(`<line x1="${pad}" y1="${Hh - pad}" x2="${W - pad}" y2="${
        Hh - pad}" stroke="#000"/><line x1="${pad}" y1="${pad}" x2="${pad}" y2="${
        Hh - pad}" stroke="#000"/>`);
    for (const s of seqs) {
      parts.push(`<text x="${lx(s)}" y="${Hh - pad + 15}" text-anchor="middle" font-size="10">${
          s}</text>`);
    }
    for (let i = 0; i <= 4; i++) {
      const y = ymax * i / 4;
      parts.push(`<text x="${pad - 5}" y="${ly(y) + 3}" text-anchor="end" font-size="10">${
          y.toFixed(1)}</text>`);
    }
    series.forEach((s, i) => {
      const c = colors[i % colors.length];
      const dash = s.name.includes('causal') ? '' : ' stroke-dasharray="4 3"';
      parts.push(`<polyline fill="none" stroke="${c}" stroke-width="2"${dash} points="${
          s.points.map(p => `${lx(p[0]).toFixed(1)},${ly(p[1]).toFixed(1)}`).join(' ')}"/>`);
      parts.push(
          `<text x="${pad + 8}" y="${pad + 12 * i}" font-size="10" fill="${c}">${s.name}</text>`);
    });
    parts.push('</g>');
  });
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W * modes.length}" height="${
      Hh}" font-family="sans-serif">\n${parts.join('\n')}\n</svg>\n`;
}

main().then(() => process.exit(0), e => {
  log(`benchmark failed: ${e?.stack ?? e}`);
  process.exit(1);
});
