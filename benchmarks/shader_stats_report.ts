/**
 * Reads what the shader-statistics layer and replay tool wrote
 * (benchmarks/shader_stats/stats_common.h's line format) and makes the
 * per-kernel table of benchmarks/shader_stats.ts: registers, workgroup
 * (shared) and local (spill) memory, and where the driver hands out an
 * assembly listing, its instruction mix. Pure functions over text, so a
 * test can feed them a report.
 */

/** One pipeline executable (a compute pipeline has one) as the driver reports it. */
export interface ExecutableReport {
  name: string;
  description: string;
  subgroupSize: number;
  /** Every statistic, by the driver's name, as printed (numbers, true/false). */
  stats: Record<string, string>;
  representations: Array<{name: string, bytes: number, text: boolean, file: string}>;
}

export interface PipelineReport {
  executables: ExecutableReport[];
  error: string|null;
}

/** Parses a `.stats` file. */
export function parseStatsReport(text: string): PipelineReport {
  const executables: ExecutableReport[] = [];
  let error: string|null = null;
  for (const line of text.split('\n')) {
    const f = line.split('\t');
    const exe = executables[Number(f[1])];
    if (f[0] === 'executable' && f.length >= 6) {
      executables[Number(f[1])] = {
        name: f[2],
        description: f[3],
        subgroupSize: Number(f[5]),
        stats: {},
        representations: []
      };
    } else if (f[0] === 'stat' && exe != null && f.length >= 4) {
      exe.stats[f[2]] = f[3];
    } else if (f[0] === 'ir' && f.length >= 8) {
      executables[Number(f[1])]?.representations.push(
          {name: f[3], bytes: Number(f[4]), text: f[5] === '1', file: f[6]});
    } else if (f[0] === 'error') {
      error = f.slice(1).join(' ');
    }
  }
  return {executables, error};
}

/** The table's columns, found by the statistic's name (drivers name them differently). */
export interface KeyStats {
  registers: string;
  shared: string;
  stack: string;
  local: string;
}

/**
 * A byte or register count of 2^32 or more is no real figure (NVIDIA's
 * driver 580 reports "Local Memory Size" as 2^36 for every pipeline): '?'.
 */
export const IMPLAUSIBLE = 2 ** 32;

function findStat(stats: Record<string, string>, want: RegExp, not?: RegExp): string {
  const name = Object.keys(stats).find(n => want.test(n) && (not == null || !not.test(n)));
  if (name == null) return '-';
  return Number(stats[name]) >= IMPLAUSIBLE ? '?' : stats[name];
}

export function keyStats(stats: Record<string, string>): KeyStats {
  return {
    registers: findStat(stats, /regist|\bGPRs?\b|VGPR/i, /spill|uniform|predicate|barrier/i),
    shared: findStat(stats, /shared|workgroup|LDS/i, /spill/i),
    stack: findStat(stats, /stack/i),
    local: findStat(stats, /local|spill|scratch/i),
  };
}

/**
 * Instruction classes of the mix: SASS mnemonics (FFMA, LDS.128, ...) and,
 * if the driver hands out PTX instead, their PTX counterparts.
 */
export const MIX_CLASSES = [
  'FFMA', 'FMUL/FADD', 'LDS', 'LDS.128', 'STS', 'BAR', 'LDG', 'STG', 'INT', 'MUFU.EX2', 'SHFL',
  'BRA'
] as const;
export type MixClass = typeof MIX_CLASSES[number];

const INTEGER_SASS =
    /^(IMAD|IADD3?|IMNMX|ISETP|LOP3?|SHF|SHL|SHR|LEA|IABS|SEL|PRMT|I2F|F2I|MOV|IMUL)/;
const INTEGER_PTX = new RegExp(
    '^(mad\\.lo|mul\\.lo|mul\\.wide|add\\.[su]|sub\\.[su]|shl|shr|and|or|xor|' +
    'setp\\.[a-z]*\\.[su]|selp|min\\.[su]|max\\.[su]|cvt|mov)');

/** The mix class of one mnemonic, or null. */
export function mixClass(op: string): MixClass|null {
  if (/^[A-Z]/.test(op)) {
    if (op.startsWith('FFMA')) return 'FFMA';
    if (/^(FMUL|FADD)/.test(op)) return 'FMUL/FADD';
    if (op.startsWith('LDS')) return /\.(128|U\.128)/.test(op) ? 'LDS.128' : 'LDS';
    if (op.startsWith('STS')) return 'STS';
    if (/^(BAR|WARPSYNC)/.test(op)) return 'BAR';
    if (/^(LDG|LD\.|LDC)/.test(op)) return 'LDG';
    if (/^(STG|ST\.)/.test(op)) return 'STG';
    if (op.startsWith('MUFU.EX2')) return 'MUFU.EX2';
    if (op.startsWith('SHFL')) return 'SHFL';
    if (/^(BRA|BRX|JMP)/.test(op)) return 'BRA';
    return INTEGER_SASS.test(op) ? 'INT' : null;
  }
  if (/^fma\.rn\.f32/.test(op)) return 'FFMA';
  if (/^(mul|add|sub)\.(rn\.)?f32/.test(op)) return 'FMUL/FADD';
  if (/^ld\.shared/.test(op)) return /\.v4/.test(op) ? 'LDS.128' : 'LDS';
  if (/^st\.shared/.test(op)) return 'STS';
  if (/^(bar|barrier)\./.test(op)) return 'BAR';
  if (/^ld\.(global|param|const)/.test(op)) return 'LDG';
  if (/^st\.global/.test(op)) return 'STG';
  if (/^ex2\.approx/.test(op)) return 'MUFU.EX2';
  if (/^shfl\./.test(op)) return 'SHFL';
  if (/^bra/.test(op)) return 'BRA';
  return INTEGER_PTX.test(op) ? 'INT' : null;
}

/**
 * The mnemonic of one assembly line (SASS as nvdisasm prints it,
 * `/*0040*\/ @!P0 FFMA R1, R2, R3, R4 ;`, or PTX, `@%p1 fma.rn.f32 %f1, ...;`),
 * or null for labels, directives and comments.
 */
export function mnemonic(line: string): string|null {
  let s = line.trim().replace(/^\/\*[0-9a-fA-F]+\*\/\s*/, '');
  s = s.replace(/^\{\s*/, '').replace(/^@!?%?U?[Pp]\w*\s+/, '');
  const m = /^([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)(?=[\s;]|$)/.exec(s) ??
      /^([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+|bra|ret|exit)(?=[\s;]|$)/.exec(s);
  return m == null ? null : m[1];
}

export interface InstructionMix {
  /** Instructions (mnemonic lines) in the listing. */
  total: number;
  classes: Record<MixClass, number>;
  /** The most frequent mnemonics, most first. */
  top: Array<[string, number]>;
}

/**
 * The static instruction mix of an assembly listing, or null if it has
 * none of the mnemonics above (an intermediate form such as NIR or SPIR-V
 * text, not machine code).
 */
export function instructionMix(listing: string, topCount = 12): InstructionMix|null {
  const classes = Object.fromEntries(MIX_CLASSES.map(c => [c, 0])) as Record<MixClass, number>;
  const ops = new Map<string, number>();
  let total = 0;
  let classified = 0;
  for (const line of listing.split('\n')) {
    const op = mnemonic(line);
    if (op == null) continue;
    total++;
    ops.set(op, (ops.get(op) ?? 0) + 1);
    const c = mixClass(op);
    if (c != null) {
      classes[c]++;
      classified++;
    }
  }
  if (classes.FFMA + classes.LDS + classes['LDS.128'] + classes.LDG === 0 || classified === 0) {
    return null;
  }
  const top = [...ops.entries()].sort((a, b) => b[1] - a[1]).slice(0, topCount);
  return {total, classes, top};
}

/**
 * An H100-class SM (compute capability 9.0), the one GPU these kernels are
 * tuned on: the occupancy column assumes it and no other.
 */
export const H100_SM = {
  registers: 65536,
  /** Registers are allocated per warp in units of 256. */
  registerUnit: 256,
  sharedBytes: 228 * 1024,
  /** Workgroup memory the driver reserves per workgroup. */
  reservedSharedBytes: 1024,
  maxWorkgroups: 32,
  maxThreads: 2048,
  warpSize: 32,
};

/**
 * Workgroups and warps per SM on an H100-class SM for a kernel of
 * `registers` per thread, `sharedBytes` per workgroup and `threads` per
 * workgroup: the least of what the register file, workgroup memory, the
 * workgroup slots and the thread slots allow. Null if a figure is missing.
 */
export function h100Occupancy(registers: number, sharedBytes: number, threads: number):
    {workgroups: number, warps: number}|null {
  if (![registers, sharedBytes, threads].every(x => Number.isFinite(x) && x >= 0) ||
      threads === 0) {
    return null;
  }
  const sm = H100_SM;
  const warps = Math.ceil(threads / sm.warpSize);
  const perWarp = Math.ceil(registers * sm.warpSize / sm.registerUnit) * sm.registerUnit;
  const byRegisters = perWarp === 0 ? Infinity : Math.floor(sm.registers / (warps * perWarp));
  const byShared = Math.floor(sm.sharedBytes / (sharedBytes + sm.reservedSharedBytes));
  const byThreads = Math.floor(sm.maxThreads / threads);
  const workgroups = Math.min(byRegisters, byShared, byThreads, sm.maxWorkgroups);
  return {workgroups, warps: workgroups * warps};
}

/** One table row: a pipeline of a plan. */
export interface KernelRow {
  plan: string;
  kernel: string;
  pipeline: string;
  /** Invocations per workgroup (the SPIR-V's LocalSize), if known. */
  threads: number|null;
  source: 'layer'|'replay'|'none';
  report: PipelineReport|null;
  mix: InstructionMix|null;
}

/** The table as Markdown: one row per pipeline executable. */
export function formatTable(rows: KernelRow[]): string {
  const header = [
    'plan', 'kernel', 'pipeline', 'threads', 'regs', 'shared B', 'stack B', 'local B',
    'WG/SM (H100)', 'warps/SM (H100)', ...MIX_CLASSES, 'instr'
  ];
  const lines = [`| ${header.join(' | ')} |`, `| ${header.map(() => '---').join(' | ')} |`];
  for (const r of rows) {
    const exes = r.report?.executables.filter(e => e != null) ?? [];
    const mix = r.mix;
    const mixCells = MIX_CLASSES.map(c => (mix == null ? '-' : String(mix.classes[c])));
    const threads = r.threads == null ? '-' : String(r.threads);
    if (exes.length === 0) {
      const why = r.report?.error ?? (r.source === 'none' ? 'no statistics' : 'no executables');
      const blank = header.slice(5).map(() => '');
      lines.push(`| ${[r.plan, r.kernel, r.pipeline, threads, why, ...blank].join(' | ')} |`);
      continue;
    }
    for (const e of exes) {
      const k = keyStats(e.stats);
      const occupancy = h100Occupancy(Number(k.registers), Number(k.shared), r.threads ?? NaN);
      lines.push(`| ${
              [r.plan, r.kernel, r.pipeline, threads, k.registers, k.shared, k.stack, k.local,
               occupancy == null ? '-' : String(occupancy.workgroups),
               occupancy == null ? '-' : String(occupancy.warps), ...mixCells,
               mix == null ? '-' : String(mix.total)]
                  .join(' | ')} |`);
    }
  }
  return lines.join('\n');
}

/** Counts of a SPIR-V module's instructions that the table reports. */
export interface SpirvMix {
  /** Instructions in the module (declarations included). */
  total: number;
  /** GLSL.std.450 Fma, and plain OpFMul / OpFAdd. */
  fma: number;
  fmulFadd: number;
  /** OpDot (vec4 products). */
  dots: number;
  loads: number;
  stores: number;
  /** GLSL.std.450 UMin / SMin: Dawn's index clamps (robustness) and the kernels' own mins. */
  mins: number;
  barriers: number;
  loops: number;
  /** OpExecutionMode LocalSize: invocations per workgroup (x y z), or null. */
  workgroupSize: [number, number, number]|null;
}

const SPIRV_MAGIC = 0x07230203;
const OP = {
  executionMode: 16,
  extInstImport: 11,
  extInst: 12,
  load: 61,
  store: 62,
  fAdd: 129,
  fMul: 133,
  dot: 148,
  loopMerge: 246,
  controlBarrier: 224
};
const LOCAL_SIZE = 17;
const GLSL_FMA = 50;
const GLSL_UMIN = 38;
const GLSL_SMIN = 39;

/**
 * The instruction counts of a SPIR-V module (the words Dawn gave the
 * driver), or null if `bytes` is not SPIR-V. Static counts, like the
 * assembly mix: what Tint emitted before the driver's compiler.
 */
export function spirvMix(bytes: Uint8Array): SpirvMix|null {
  if (bytes.length < 20 || bytes.length % 4 !== 0) return null;
  const words =
      new Uint32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length));
  if (words[0] !== SPIRV_MAGIC) return null;
  const mix: SpirvMix = {
    total: 0,
    fma: 0,
    fmulFadd: 0,
    dots: 0,
    loads: 0,
    stores: 0,
    mins: 0,
    barriers: 0,
    loops: 0,
    workgroupSize: null
  };
  const glslSets = new Set<number>();
  for (let i = 5; i < words.length;) {
    const count = words[i] >>> 16;
    const op = words[i] & 0xffff;
    if (count === 0 || i + count > words.length) return null;
    mix.total++;
    if (op === OP.extInstImport) {
      const name = Buffer.from(words.buffer, (i + 2) * 4, (count - 2) * 4).toString('utf8');
      if (name.startsWith('GLSL.std.450')) glslSets.add(words[i + 1]);
    } else if (op === OP.extInst && glslSets.has(words[i + 3])) {
      const inst = words[i + 4];
      if (inst === GLSL_FMA) mix.fma++;
      if (inst === GLSL_UMIN || inst === GLSL_SMIN) mix.mins++;
    } else if (op === OP.executionMode && words[i + 2] === LOCAL_SIZE && count >= 6) {
      mix.workgroupSize = [words[i + 3], words[i + 4], words[i + 5]];
    } else if (op === OP.fMul || op === OP.fAdd) {
      mix.fmulFadd++;
    } else if (op === OP.dot) {
      mix.dots++;
    } else if (op === OP.load) {
      mix.loads++;
    } else if (op === OP.store) {
      mix.stores++;
    } else if (op === OP.controlBarrier) {
      mix.barriers++;
    } else if (op === OP.loopMerge) {
      mix.loops++;
    }
    i += count;
  }
  return mix;
}

/** The SPIR-V table: one row per pipeline whose module was dumped. */
export function formatSpirvTable(
    rows: Array<{plan: string, kernel: string, pipeline: string, spirv: SpirvMix | null}>): string {
  const header = [
    'plan', 'kernel', 'pipeline', 'instr', 'Fma', 'FMul/FAdd', 'Dot', 'loads', 'stores',
    'UMin/SMin', 'barriers', 'loops'
  ];
  const lines = [`| ${header.join(' | ')} |`, `| ${header.map(() => '---').join(' | ')} |`];
  for (const r of rows) {
    const s = r.spirv;
    const cells = s == null ? ['no module', '', '', '', '', '', '', '', ''] : [
      s.total, s.fma, s.fmulFadd, s.dots, s.loads, s.stores, s.mins, s.barriers, s.loops
    ].map(String);
    lines.push(`| ${[r.plan, r.kernel, r.pipeline, ...cells].join(' | ')} |`);
  }
  return lines.join('\n');
}
