/**
 * The per-shader statistics summarizer (benchmarks/shader_stats_report.ts)
 * on reports in the layer's format: columns found by the statistic's name,
 * the instruction mix of SASS and PTX listings, and no mix for listings
 * that are not machine code. The layer and replay tool themselves need gcc
 * and a Vulkan driver: benchmarks/shader_stats/selftest/selftest.sh checks
 * them (docs/webgpu_tuning.md, "Per-shader statistics").
 */
import {parseForwardVariant, parseGradVariant} from '../benchmarks/plan_variants';
import * as report from '../benchmarks/shader_stats_report';

const {formatTable, h100Occupancy, instructionMix, keyStats, mixClass, mnemonic, parseStatsReport} =
    report;
const {spirvMix} = report;

/** SPIR-V words: header, then instructions as [opcode, ...operands]. */
function spirv(...instructions: number[][]): Uint8Array {
  const words = [0x07230203, 0x00010300, 0, 100, 0];
  for (const [op, ...operands] of instructions) {
    words.push(((operands.length + 1) << 16) | op, ...operands);
  }
  return new Uint8Array(new Uint32Array(words).buffer);
}

/** "GLSL.std.450" as NUL-terminated SPIR-V string words. */
const GLSL_NAME = [...new Uint32Array(new TextEncoder().encode('GLSL.std.450\0\0\0\0').buffer)];

const REPORT = [
  'executable\t0\tCompute Shader\tmain\t0x20\t32',
  'stat\t0\tRegister Count\t168\tregisters per thread',
  'stat\t0\tShared Memory Size\t49152\tbytes',
  'stat\t0\tStack Size\t32\tbytes per thread',
  // NVIDIA's driver 580 reports 2^36 here for every pipeline.
  'stat\t0\tLocal Memory Size\t68719476736\tbytes',
  'stat\t0\tBinary Size\t20480\tbytes',
  'ir\t0\t0\tSASS\t900\t1\tpipeline-007.e0.r0.txt\tassembly',
  'irline\t0\t0\tFFMA R1, R2, R3, R1 ;',
  '',
].join('\n');

const SASS = [
  '        /*0000*/                   MOV R1, c[0x0][0x28] ;',
  '        /*0010*/                   IMAD.SHL.U32 R2, R0, 0x4, RZ ;',
  '        /*0020*/                   LDG.E.128 R4, [R2.64] ;',
  '        /*0030*/                   STS.128 [R2], R4 ;',
  '        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;',
  '        /*0050*/                   LDS.128 R8, [R2] ;',
  '        /*0060*/                   LDS R12, [R2+0x10] ;',
  '        /*0070*/                   FFMA R13, R8, R12, R13 ;',
  '        /*0080*/               @!P0 FFMA R14, R9, R12, R14 ;',
  '        /*0090*/                   FMUL R15, R13, 1.4426950216293334961 ;',
  '        /*00a0*/                   MUFU.EX2 R15, R15 ;',
  '        /*00b0*/                   SHFL.BFLY PT, R16, R15, 0x1, 0x1f ;',
  '        /*00c0*/               @P1 BRA 0x40 ;',
  '        /*00d0*/                   STG.E [R2.64], R15 ;',
  '        /*00e0*/                   EXIT ;',
  '.L_x_0:',
].join('\n');

describe('shader statistics report', () => {
  it('parses executables, statistics and representations', () => {
    const r = parseStatsReport(REPORT);
    expect(r.error).toBeNull();
    expect(r.executables).toHaveLength(1);
    const e = r.executables[0];
    expect(e.name).toBe('Compute Shader');
    expect(e.subgroupSize).toBe(32);
    expect(e.stats['Register Count']).toBe('168');
    expect(e.stats['Binary Size']).toBe('20480');
    expect(e.representations).toEqual([
      {name: 'SASS', bytes: 900, text: true, file: 'pipeline-007.e0.r0.txt'}
    ]);
    expect(keyStats(e.stats)).toEqual({registers: '168', shared: '49152', stack: '32', local: '?'});
  });

  it('reports a driver error and unknown columns as such', () => {
    const r = parseStatsReport('error\tno pipeline executables reported\n');
    expect(r.executables).toHaveLength(0);
    expect(r.error).toBe('no pipeline executables reported');
    expect(keyStats({
      'Binary Size': '10'
    })).toEqual({registers: '-', shared: '-', stack: '-', local: '-'});
    // Spill counts are not the register column.
    expect(keyStats({'Spilled Registers': '8', 'VGPRs': '40'}).registers).toBe('40');
  });

  it('counts the instruction mix of a SASS listing', () => {
    expect(mnemonic('        /*0080*/               @!P0 FFMA R14, R9, R12, R14 ;')).toBe('FFMA');
    expect(mnemonic('.L_x_0:')).toBeNull();
    const mix = instructionMix(SASS);
    expect(mix).not.toBeNull();
    expect(mix!.total).toBe(15);
    expect(mix!.classes).toEqual({
      'FFMA': 2,
      'FMUL/FADD': 1,
      'LDS': 1,
      'LDS.128': 1,
      'STS': 1,
      'BAR': 1,
      'LDG': 1,
      'STG': 1,
      'INT': 2,
      'MUFU.EX2': 1,
      'SHFL': 1,
      'BRA': 1
    });
    expect(mix!.top[0]).toEqual(['FFMA', 2]);
  });

  it('classifies PTX and gives no mix for listings that are not machine code', () => {
    expect(mixClass('fma.rn.f32')).toBe('FFMA');
    expect(mixClass('ld.shared.v4.f32')).toBe('LDS.128');
    expect(mixClass('ld.shared.f32')).toBe('LDS');
    expect(mixClass('bar.sync')).toBe('BAR');
    expect(mixClass('ex2.approx.ftz.f32')).toBe('MUFU.EX2');
    expect(mixClass('mad.lo.s32')).toBe('INT');
    const ptx = instructionMix(
        '\t@%p1 fma.rn.f32 \t%f1, %f2, %f3, %f1;\n\tld.shared.v4.f32 {%f4}, [%r1];\n');
    expect(ptx!.classes.FFMA).toBe(1);
    expect(ptx!.classes['LDS.128']).toBe(1);
    // NIR or SPIR-V text from a software driver: no machine instructions.
    expect(instructionMix('decl_var shared float[64] @a\n%1 = load_deref %0\n')).toBeNull();
  });

  it('formats one row per executable, and a reason where there is none', () => {
    const rows = [
      {
        plan: 'fwd D=128 causal 4,16,1,16,o,c2,qs',
        kernel: 'FlashAttention forward',
        pipeline: 'pipeline-007',
        threads: 256,
        source: 'layer' as const,
        report: parseStatsReport(REPORT),
        mix: instructionMix(SASS)
      },
      {
        plan: 'fwd D=64 causal plan 8,16,1,8,o',
        kernel: 'FlashAttention forward',
        pipeline: 'pipeline-000',
        threads: null,
        source: 'none' as const,
        report: null,
        mix: null
      },
    ];
    const lines = formatTable(rows).split('\n');
    expect(lines).toHaveLength(4);
    expect(lines[0]).toMatch(new RegExp(
        '^\\| plan \\| kernel \\| pipeline \\| threads \\| regs \\| shared B \\| stack B \\| ' +
        'local B \\| WG/SM \\(H100\\) \\| warps/SM \\(H100\\) \\| FFMA'));
    // 168 registers x 256 threads: 43008 of the SM's 65536 registers, one workgroup.
    expect(lines[2]).toBe(
        '| fwd D=128 causal 4,16,1,16,o,c2,qs | FlashAttention forward | pipeline-007 | 256 | ' +
        '168 | 49152 | 32 | ? | 1 | 8 | 2 | 1 | 1 | 1 | 1 | 1 | 1 | 1 | 2 | 1 | 1 | 1 | 15 |');
    expect(lines[3]).toContain('| pipeline-000 | - | no statistics |');
  });

  it('works out workgroups per SM on an H100-class SM', () => {
    // 240 registers x 128 threads: 30 allocation units of 256 per warp, 2 workgroups.
    expect(h100Occupancy(240, 33792, 128)).toEqual({workgroups: 2, warps: 8});
    // 191 registers round up to 192 per thread (24 units per warp): still 2.
    expect(h100Occupancy(191, 49152, 128)).toEqual({workgroups: 2, warps: 8});
    // Few registers: workgroup memory bounds (228 KiB / (16 KiB + 1 KiB) = 13).
    expect(h100Occupancy(32, 16384, 64)).toEqual({workgroups: 13, warps: 26});
    // Tiny kernels: the 32 workgroup slots, then the 2048 thread slots.
    expect(h100Occupancy(16, 0, 32)).toEqual({workgroups: 32, warps: 32});
    expect(h100Occupancy(16, 0, 1024)).toEqual({workgroups: 2, warps: 64});
    expect(h100Occupancy(NaN, 0, 128)).toBeNull();
  });

  it('counts the SPIR-V instructions Dawn gave the driver', () => {
    const module = spirv(
        [11, 1, ...GLSL_NAME],        // %1 = OpExtInstImport "GLSL.std.450"
        [11, 9, 0x4c4c4f46, 0],       // %9 = another import: its Fma is not GLSL's
        [12, 2, 3, 1, 50, 4, 5, 6],   // Fma
        [12, 2, 7, 1, 38, 4, 5],      // UMin
        [12, 2, 8, 1, 39, 4, 5],      // SMin
        [12, 2, 10, 9, 50, 4, 5, 6],  // %9's instruction 50
        [133, 2, 11, 4, 5],           // OpFMul
        [129, 2, 12, 4, 5],           // OpFAdd
        [148, 2, 19, 4, 5],           // OpDot
        [61, 2, 13, 14],              // OpLoad
        [62, 14, 13],                 // OpStore
        [224, 15, 15, 16],            // OpControlBarrier
        [246, 17, 18, 0],             // OpLoopMerge
        [16, 20, 17, 64, 2, 1]);      // OpExecutionMode %20 LocalSize 64 2 1
    const expected = {total: 14, fma: 1, fmulFadd: 2, dots: 1, loads: 1, stores: 1, mins: 2};
    const more = {barriers: 1, loops: 1, workgroupSize: [64, 2, 1]};
    expect(spirvMix(module)).toEqual({...expected, ...more});
    expect(spirvMix(new Uint8Array(24))).toBeNull();  // no magic number
    // An instruction running past the end.
    expect(spirvMix(spirv([61, 2, 13, 14]).slice(0, 24))).toBeNull();
  });
});

describe('forced plans for the statistics tool', () => {
  it('reads the benchmark spelling of forward tilings', () => {
    expect(parseForwardVariant('4,16,1,16,o,c2,qs')).toEqual({
      tiles: {tm: 4, tx: 16, nq: 1, ty: 16, outer: true, dimChunks: 2, streamQuery: true},
      prefetch: undefined,
      splits: undefined
    });
    expect(parseForwardVariant('4,8,1,16,o,c4,db,p0,k2,u4')).toEqual({
      tiles:
          {tm: 4, tx: 8, nq: 1, ty: 16, outer: true, dimChunks: 4, doubleBuffer: true, unroll: 4},
      prefetch: false,
      splits: 2
    });
    expect(parseForwardVariant('k4')).toEqual({splits: 4});
    expect(() => parseForwardVariant('4,16,1,16,o,zz'))
        .toThrow(/--variants: expected .*"4,16,1,16,o,zz"/);
    expect(() => parseForwardVariant('4,16,1')).toThrow(/--variants/);
  });

  it('reads the benchmark spelling of backward tiles', () => {
    expect(parseGradVariant('32,32,32,32,ck2,cq2', false)).toEqual({
      dkdv: {bc: 32, br: 32, threads: 128, dimChunks: 2},
      dq: {br: 32, bc: 32, threads: 128, dimChunks: 2}
    });
    expect(parseGradVariant('16,32,16,32,c2,tk64,sq', false)).toEqual({
      dkdv: {bc: 16, br: 32, threads: 64, dimChunks: 2},
      dq: {br: 16, bc: 32, threads: 128, split: true, dimChunks: 2}
    });
    // Streamed passes only where the build has them.
    expect(() => parseGradVariant('64,32,64,64,ck2,cq4,stk', false)).toThrow(/--grad-variants/);
    expect(parseGradVariant('64,32,64,64,ck2,cq4,tk256,stk', true)).toEqual({
      dkdv: {bc: 64, br: 32, threads: 256, dimChunks: 2, streamed: true},
      dq: {br: 64, bc: 64, threads: 128, dimChunks: 4}
    });
  });
});
