/**
 * Per-shader statistics of the fused WebGPU kernels from the Vulkan driver
 * (registers, workgroup and local memory, and the instruction mix where
 * the driver hands out assembly): docs/webgpu_tuning.md, "Per-shader
 * statistics".
 *
 *   node shader_stats.mjs --layer DIR [--out DIR] [--dump DIR] [--replay PATH]
 *       [--seq 1024] [--batch 1] [--heads 16] [--causal true|false|both]
 *       [--variants "D:name;..."] [--grad-variants "D:name;..."] [--tensor-cores]
 *   node shader_stats.mjs --summarize DIR [--dump DIR]
 *
 * --layer names the folder of the dump layer (benchmarks/shader_stats/
 * dump_layer.c built beside its JSON manifest; scripts/shader-stats-bundle.sh
 * builds it): this process turns it on for its own Vulkan instance, so the
 * layer sees the SPIR-V Dawn gives the driver. Each plan runs once on
 * random inputs of the given shape (a forward, or a forward and a backward
 * through tf.grads); every compute pipeline created meanwhile is that
 * plan's, named by its WebGPU label. Where the driver has
 * VK_KHR_pipeline_executable_properties the layer records the statistics
 * in-process; else --replay (pipeline_stats.c) compiles the dumped SPIR-V
 * again on a device that has it. Prints the tables (Markdown) on stdout and
 * writes them, shader_stats.json and plans.txt to --out (default
 * shader-stats); the layer's files go to --dump (default
 * $TMPDIR/shader-stats-dump, emptied first).
 *
 * Plans: `D:default` the planner's plan for that head dim, or D: a name of
 * tuning.ts's candidate lists (forward: SLICED_ and STREAMED_FORWARD_
 * CANDIDATES in forwardVariantName's spelling, or `sliced` / `streamed` for
 * a whole list; backward: SLICED_GRAD_CANDIDATES as
 * "bc,br,qbr,qbc,ckN,cqN[,tkN][,tqN]", or `sliced`). Defaults: the forward
 * plans at D=64 and 128 and every D=128 candidate; the backward plans at
 * D=64 and 128 and every sliced D=128 candidate.
 */
/// <reference types="@webgpu/types" />
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import type {GradTiles} from '../kernels/webgpu/FlashAttentionGrad';

import {parseForwardVariant, parseGradVariant} from './plan_variants';
import * as report from './shader_stats_report';
import type {InstructionMix, KernelRow} from './shader_stats_report';
import {adapterName, openWebGPUDevice, useWebGPUBackend} from './webgpu_setup';

const {formatSpirvTable, formatTable, instructionMix, parseStatsReport, spirvMix} = report;

const LAYER_NAME = 'VK_LAYER_TFJSFA_shader_stats';
const DEFAULT_VARIANTS = '64:default;128:default;128:sliced;128:streamed';
const DEFAULT_GRAD_VARIANTS = '64:default;128:default;128:sliced';

const log = (msg: string) => process.stderr.write(`${msg}\n`);

interface Args {
  layer: string|null;
  out: string;
  replay: string|null;
  summarize: string|null;
  dump: string|null;
  seq: number;
  batch: number;
  heads: number;
  causal: boolean[];
  variants: string;
  gradVariants: string;
  tensorCores: boolean;
}

function parseArgs(argv: string[]): Args {
  const get = (name: string, fallback: string) => {
    const i = argv.indexOf(`--${name}`);
    return i >= 0 && i + 1 < argv.length ? argv[i + 1] : fallback;
  };
  const causal = get('causal', 'true');
  const count = (name: string, fallback: number) => {
    const n = Number(get(name, String(fallback)));
    if (!Number.isInteger(n) || n < 1) {
      throw new Error(`--${name}: expected a positive integer, got "${get(name, '')}"`);
    }
    return n;
  };
  if (!['true', 'false', 'both'].includes(causal)) {
    throw new Error(`--causal: expected true, false or both, got "${causal}"`);
  }
  return {
    layer: get('layer', '') || null,
    out: get('out', 'shader-stats'),
    replay: get('replay', '') || null,
    summarize: get('summarize', '') || null,
    dump: get('dump', '') || null,
    seq: count('seq', 1024),
    batch: count('batch', 1),
    heads: count('heads', 16),
    causal: causal === 'both' ? [true, false] : [causal === 'true'],
    variants: get('variants', DEFAULT_VARIANTS),
    gradVariants: get('grad-variants', DEFAULT_GRAD_VARIANTS),
    tensorCores: argv.includes('--tensor-cores'),
  };
}

/** "D:name;..." as [D, name] pairs. */
function parsePlanList(text: string, flag: string): Array<[number, string]> {
  return text.split(';').filter(x => x.trim() !== '').map(item => {
    const m = /^\s*(\d+):(.+?)\s*$/.exec(item);
    if (m == null) {
      throw new Error(`--${flag}: expected "D:name", got "${item}"`);
    }
    return [Number(m[1]), m[2]];
  });
}

/** The dump folder's pipeline records, sorted. */
function pipelineRecords(dump: string): string[] {
  return fs.readdirSync(dump).filter(f => /^pipeline-\d+\.txt$/.test(f)).sort();
}

/**
 * Wraps the device's pipeline creation so that every Vulkan pipeline the
 * layer records is attributed to the WebGPU pipeline (label) whose creation
 * made it, and that to the current plan. Dawn creates a Vulkan pipeline
 * inside createComputePipeline (and before an async one resolves).
 */
function attributePipelines(device: GPUDevice, dump: string) {
  const seen = new Set(pipelineRecords(dump));
  const made: Array<{plan: string, label: string, record: string}> = [];
  let plan = '(setup)';
  const collect = (label: string) => {
    for (const r of pipelineRecords(dump)) {
      if (!seen.has(r)) {
        seen.add(r);
        made.push({plan, label, record: r});
      }
    }
  };
  const sync = device.createComputePipeline.bind(device);
  const async = device.createComputePipelineAsync.bind(device);
  device.createComputePipeline = (d: GPUComputePipelineDescriptor) => {
    collect('(earlier)');
    const p = sync(d);
    collect(d.label ?? '(no label)');
    return p;
  };
  device.createComputePipelineAsync = async (d: GPUComputePipelineDescriptor) => {
    collect('(earlier)');
    const p = await async(d);
    collect(d.label ?? '(no label)');
    return p;
  };
  return {
    made,
    setPlan: (name: string) => {
      collect('(earlier)');
      plan = name;
    },
    finish: () => collect('(unattributed)'),
  };
}

function readIfExists(file: string): string|null {
  return fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : null;
}

/** The statistics of one recorded pipeline: the layer's, else the replay's. */
/** The SPIR-V a recorded pipeline was made from (its record names the module). */
function pipelineSpirv(dump: string, base: string) {
  const record = readIfExists(path.join(dump, `${base}.txt`)) ?? '';
  const module = /^module\t(\S+)$/m.exec(record)?.[1];
  const file = module == null ? '' : path.join(dump, module);
  return fs.existsSync(file) ? spirvMix(fs.readFileSync(file)) : null;
}

function pipelineRow(dump: string, plan: string, kernel: string, record: string): KernelRow&
    {spirv: ReturnType<typeof spirvMix>} {
  const base = record.replace(/\.txt$/, '');
  const spirv = pipelineSpirv(dump, base);
  const size = spirv?.workgroupSize;
  const layer = readIfExists(path.join(dump, `${base}.stats`));
  const replay = layer == null ? readIfExists(path.join(dump, `${base}.replay.stats`)) : null;
  const text = layer ?? replay;
  const report = text == null ? null : parseStatsReport(text);
  let mix: InstructionMix|null = null;
  for (const e of report?.executables ?? []) {
    for (const r of e?.representations ?? []) {
      const listing = r.text ? readIfExists(path.join(dump, r.file)) : null;
      mix = mix ?? (listing == null ? null : instructionMix(listing));
    }
  }
  return {
    plan,
    kernel,
    pipeline: base,
    threads: size == null ? null : size[0] * size[1] * size[2],
    spirv,
    source: layer != null ? 'layer' :
        replay != null    ? 'replay' :
                            'none',
    report,
    mix
  };
}

/** Prints the table and every statistic; writes them to `out`. */
function summarize(
    dump: string, out: string, attributed: Array<{plan: string, label: string, record: string}>,
    plans: Array<{name: string, status: string}>): void {
  const rows: Array<KernelRow&{spirv: ReturnType<typeof spirvMix>}> = [];
  const row = (a: {plan: string, label: string, record: string}) =>
      pipelineRow(dump, a.plan, a.label.slice(0, 72), a.record);
  rows.push(...attributed.filter(a => !plans.some(p => p.name === a.plan)).map(row));
  for (const {name, status} of plans) {
    const own = attributed.filter(a => a.plan === name);
    rows.push(...own.map(row));
    if (own.length === 0) {
      // Failed, or an earlier plan made its kernels (the same pipeline key).
      const kernel = status === 'ok' ? '(no new pipeline: an earlier plan made its kernels)' :
                                       `(${status.slice(0, 100)})`;
      rows.push({
        plan: name,
        kernel,
        pipeline: '-',
        threads: null,
        spirv: null,
        source: 'none',
        report: null,
        mix: null
      });
    }
  }
  const device = readIfExists(path.join(dump, 'device.txt'))?.split('\n')[0].split('\t') ?? [];
  const spirv = rows.filter(r => r.pipeline !== '-');
  const reports = rows.flatMap(r => r.report?.executables ?? []).filter(e => e != null);
  const notes = [
    `"?": a figure of 2^32 or more, which is no real one (NVIDIA's driver reports its ` +
        '"Local Memory Size" so). WG/SM, warps/SM: workgroups and warps per SM on an ' +
        'H100-class SM by registers, workgroup memory (+1 KiB each), 32 workgroups and ' +
        '2048 threads; not measured, and for other GPUs wrong.',
    reports.length === 0 ? 'The driver gave no statistics (no VK_KHR_pipeline_executable_' +
            'properties, or the capture failed: see the log).' :
        reports.some(e => e.representations.length > 0) ?
                           'Instruction mix: from the internal representations the driver gave.' :
                           'The driver gives no internal representations (no assembly): ' +
            'the instruction-mix columns stay "-"; the SPIR-V table below counts what Dawn ' +
            'gave the driver instead.'
  ];
  const lines = [
    `device: ${device.slice(1).join(' ') || 'unknown (no device.txt)'}`, '', formatTable(rows), '',
    ...notes, '', 'SPIR-V as Dawn gave it to the driver (static counts):', '',
    formatSpirvTable(spirv), ''
  ];
  // Every statistic and the top mnemonics, once per pipeline.
  for (const r of rows) {
    for (const e of r.report?.executables ?? []) {
      if (e == null) continue;
      lines.push(`${r.pipeline} (${r.plan}; ${r.kernel}) [${r.source}] ${e.name}, subgroup ${
          e.subgroupSize}: ${Object.entries(e.stats).map(([k, v]) => `${k}=${v}`).join(', ')}`);
      for (const ir of e.representations) {
        lines.push(`  representation "${ir.name}": ${ir.bytes} bytes${ir.text ? ', text' : ''} (${
            ir.file})`);
      }
    }
    if (r.mix != null) {
      lines.push(`  top mnemonics: ${r.mix.top.map(([op, n]) => `${op} ${n}`).join(', ')}`);
    }
  }
  const text = lines.join('\n');
  process.stdout.write(`${text}\n`);
  fs.mkdirSync(out, {recursive: true});
  fs.writeFileSync(path.join(out, 'shader_stats.md'), `${text}\n`);
  fs.writeFileSync(
      path.join(out, 'shader_stats.json'),
      JSON.stringify({device, dump, plans, pipelines: attributed, rows}, null, 1));
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  if (args.summarize != null) {
    const saved =
        JSON.parse(fs.readFileSync(path.join(args.summarize, 'shader_stats.json'), 'utf8'));
    summarize(args.dump ?? saved.dump, args.summarize, saved.pipelines, saved.plans ?? []);
    return;
  }
  const out = path.resolve(args.out);
  // Dumps stay out of --out (SPIR-V, records and listings: many files).
  const dump = path.resolve(args.dump ?? path.join(os.tmpdir(), 'shader-stats-dump'));
  fs.rmSync(dump, {recursive: true, force: true});
  fs.mkdirSync(dump, {recursive: true});
  fs.mkdirSync(out, {recursive: true});
  if (args.layer != null) {
    // The Vulkan loader reads these when Dawn creates its instance, below.
    const layerDir = path.resolve(args.layer);
    if (!fs.existsSync(path.join(layerDir, 'VkLayer_tfjsfa_shader_stats.json'))) {
      throw new Error(`--layer: no VkLayer_tfjsfa_shader_stats.json in ${layerDir}`);
    }
    const prepend = (name: string, value: string) => {
      process.env[name] = [value, ...(process.env[name] ?? '').split(':').filter(x => x)].join(':');
    };
    prepend('VK_LAYER_PATH', layerDir);
    prepend('VK_INSTANCE_LAYERS', LAYER_NAME);
  }
  process.env.SHADER_STATS_DIR = dump;

  const {TENSOR_CORE_DAWN_FLAGS, TENSOR_CORE_FEATURES, enableTensorCores, tensorCoreUsage} =
      await import('../demo/tensor_cores');
  const setup = await openWebGPUDevice({
    dawnFlags: args.tensorCores ? TENSOR_CORE_DAWN_FLAGS : [],
    features: ['subgroups', ...(args.tensorCores ? TENSOR_CORE_FEATURES : [])],
    onError: log
  });
  const {device, adapter} = setup;
  if (!fs.existsSync(path.join(dump, 'device.txt'))) {
    throw new Error(
        `the ${LAYER_NAME} layer did not load (no ${dump}/device.txt): pass --layer DIR ` +
        '(the folder of its JSON manifest and library)');
  }
  const tf = await import('@tensorflow/tfjs-core');
  await import('@tensorflow/tfjs-layers');
  const fa = await import('../src/index');
  const {setForwardOverride, planForward} = await import('../kernels/webgpu/FlashAttention');
  const {fusedGradRunCount, setGradTilesOverride} =
      await import('../kernels/webgpu/FlashAttentionGrad');
  const {checkOwnPipelineErrors} = await import('../kernels/webgpu/own_pipeline');
  const tuning = await import('../kernels/webgpu/tuning');
  await useWebGPUBackend(setup);
  log(`device: ${adapterName(adapter)}; workgroup storage ${
      device.limits.maxComputeWorkgroupStorageSize} B; dump ${dump}`);
  const attribution = attributePipelines(device, dump);
  const {batch: B, heads: H, seq: S} = args;
  type T4 = import('@tensorflow/tfjs-core').Tensor4D;
  const namedForward: Record<string, string[]> = {
    sliced: tuning.SLICED_FORWARD_CANDIDATES.map(tuning.forwardVariantName),
    streamed: tuning.STREAMED_FORWARD_CANDIDATES.map(tuning.forwardVariantName),
  };
  // Streamed backward passes exist in builds whose tuning.ts lists them.
  type Tiles = GradTiles&{dkdv: {streamed?: boolean}, dq: {streamed?: boolean}};
  const streamedGrad =
      (tuning as unknown as {STREAMED_GRAD_CANDIDATES?: Tiles[]}).STREAMED_GRAD_CANDIDATES;
  const gradName = ({
    dkdv,
    dq
  }: Tiles) => [dkdv.bc, dkdv.br, dq.br, dq.bc, `ck${dkdv.dimChunks ?? 1}`,
                `cq${dq.dimChunks ?? 1}`, ...(dkdv.threads !== 128 ? [`tk${dkdv.threads}`] : []),
                ...(dq.threads !== 128 ? [`tq${dq.threads}`] : []),
                ...(dkdv.streamed ? ['stk'] : []), ...(dq.streamed ? ['stq'] : [])]
                   .join(',');
  const namedGrad: Record<string, string[]> = {
    sliced: tuning.SLICED_GRAD_CANDIDATES.map(gradName),
    ...(streamedGrad == null ? {} : {streamed: streamedGrad.map(gradName)}),
  };
  // Every plan name parses before any runs (a typo should not cost a GPU run).
  for (const [, variant] of parsePlanList(args.variants, 'variants')) {
    if (variant !== 'default') (namedForward[variant] ?? [variant]).forEach(parseForwardVariant);
  }
  for (const [, variant] of parsePlanList(args.gradVariants, 'grad-variants')) {
    (namedGrad[variant] ?? [variant])
        .filter(n => n !== 'default')
        .forEach(n => parseGradVariant(n, streamedGrad != null));
  }

  // One call of the op on fresh inputs; the backward through tf.grads.
  const runOnce = async (d: number, causal: boolean, backward: boolean) => {
    const inputs = [0, 1, 2, 3].map(() => tf.randomNormal([B, S, H, d]) as T4);
    const [q, k, v, dy] = inputs;
    tf.env().set(fa.FLASH_ATTENTION_IMPL, 'fused');
    try {
      const before = fusedGradRunCount();
      const outs = backward ?
          tf.grads((a, b, c) => fa.flashAttention(a as T4, b as T4, c as T4, {causal}))(
              [q, k, v], dy) :
          [fa.flashAttention(q, k, v, {causal})];
      for (const o of outs) {
        await o.data();
      }
      tf.dispose(outs);
      await checkOwnPipelineErrors();
      if (backward && fusedGradRunCount() === before) {
        return 'the fused backward did not run (tiles do not fit this device?)';
      }
      return 'ok';
    } catch (e) {
      return `error: ${(e as Error).message.slice(0, 200)}`;
    } finally {
      tf.dispose(inputs);
    }
  };

  const plans: Array<{name: string, status: string}> = [];
  const runPlan = async (name: string, d: number, backward: boolean, causal: boolean) => {
    attribution.setPlan(name);
    const status = await runOnce(d, causal, backward);
    plans.push({name, status});
    log(`${name}: ${status}`);
  };
  const plannedName = (d: number) => {
    const plan = planForward(device, d, d, B * H * S);
    return plan == null ? 'none fits' : tuning.forwardVariantName(plan.tiles);
  };
  for (const causal of args.causal) {
    const c = causal ? 'causal' : 'non-causal';
    for (const [d, variant] of parsePlanList(args.variants, 'variants')) {
      if (variant === 'default') {
        await runPlan(`fwd D=${d} ${c} plan ${plannedName(d)}`, d, false, causal);
        continue;
      }
      for (const name of namedForward[variant] ?? [variant]) {
        setForwardOverride(parseForwardVariant(name));
        try {
          await runPlan(`fwd D=${d} ${c} ${name}`, d, false, causal);
        } finally {
          setForwardOverride(null);
        }
      }
    }
    for (const [d, variant] of parsePlanList(args.gradVariants, 'grad-variants')) {
      for (const name of namedGrad[variant] ?? [variant]) {
        setGradTilesOverride(
            name === 'default' ? null : parseGradVariant(name, streamedGrad != null));
        try {
          await runPlan(`fwdbwd D=${d} ${c} bwd ${name}`, d, true, causal);
        } finally {
          setGradTilesOverride(null);
        }
      }
    }
    if (args.tensorCores) {
      log(enableTensorCores(device, adapter.info));
      for (const d of [64, 128]) {
        await runPlan(`tensor cores fwd D=${d} ${c}`, d, false, causal);
        await runPlan(`tensor cores fwdbwd D=${d} ${c}`, d, true, causal);
      }
      log(tensorCoreUsage());
      tf.env().set(fa.FLASH_ATTENTION_TENSOR_CORES, false);
    }
  }
  attribution.finish();

  const records = pipelineRecords(dump);
  const missing =
      records.filter(r => !fs.existsSync(path.join(dump, r.replace(/\.txt$/, '.stats'))));
  if (missing.length > 0 && args.replay != null) {
    log(`the driver gave no statistics in-process for ${missing.length} pipeline(s); replaying`);
    const {spawnSync} = await import('child_process');
    const r = spawnSync(args.replay, [dump, ...missing], {encoding: 'utf8'});
    log((r.stdout ?? '') + (r.stderr ?? '') + (r.error != null ? String(r.error) : ''));
  } else if (missing.length > 0) {
    log(`the driver gave no statistics in-process for ${missing.length} pipeline(s) ` +
        '(pass --replay PATH to compile them again with benchmarks/shader_stats/pipeline_stats.c)');
  }
  fs.writeFileSync(
      path.join(out, 'plans.txt'), `${plans.map(p => `${p.name}: ${p.status}`).join('\n')}\n`);
  summarize(dump, out, attribution.made, plans);
}

main().then(() => process.exit(0), e => {
  log(String(e?.stack ?? e));
  process.exit(1);
});
