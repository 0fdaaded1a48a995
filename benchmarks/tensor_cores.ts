/**
 * The subgroup-matrix (tensor core) attention path on a real GPU: creates
 * the device with Dawn's unsafe features (shader-f16,
 * chromium-experimental-subgroup-matrix), prints the adapter's matrix
 * configurations, checks the forward AND the backward (dQ, dK, dV) against
 * the float64 oracle (test/oracle.ts) at several shapes and options for
 * both precisions, times forward and forward+backward next to the SIMT
 * kernels (same process, same device), and prints the issue's goal table
 * with PyTorch's FlashAttention-2 float16 and SDPA float32 beside it
 * (`python3 torch_flash_fp16.py --out torch_tc.json` first, then --torch).
 *
 *   node tensor_cores.mjs [--seqs 4096,16384] [--dims 64,128] [--heads 16]
 *       [--torch torch_tc.json] [--skip-check] [--skip-time] [--json FILE]
 *       [--stand-in] [--small] [--variants] [--forward-plans] [--time-anyway]
 *       [--deadline-s N] [--time-plans "4,2,32;8,1,32"] [--skip-one-pass]
 *       [--storage] [--storage-plans "4,2,32;8,1,32"] [--fwd-only]
 *       [--skip-accumulated] [--dkdv-plans "2,1,32;4,1,16"]
 *
 * The check's columns: SIMT, both precisions, and the float32 matrix
 * backward after the SIMT forward (which kernel is wrong); --variants adds
 * the float32 path with each diagnosis flag of kernels/webgpu/subgroup_matrix.ts
 * (which construct breaks them on a GPU); --forward-plans adds the float32
 * path with other forward tilings (subgroups per workgroup, keys per tile)
 * and, as a control, with sessions 6/7's 8-byte workgroup atomics. A
 * verdict per mode (PASS within the bounds, FAIL) follows the table; a
 * tensor-core precision that failed is not timed (--time-anyway times it).
 * The forward is the two-pass kernel (O in matrix registers) unless a
 * mode says "one-pass" (the first kernel, forced through the override);
 * both are checked and timed (--skip-one-pass leaves the one-pass kernel
 * out). The "accumulated bwd" modes check and time the backward with the
 * accumulated dK/dV pass (dK, dV in matrix accumulators) beside the
 * default one (--skip-accumulated leaves them out); --dkdv-plans checks
 * and times it at other tilings (subgroups, key blocks per subgroup, rows
 * per block).
 * --time-plans times the two-pass forward at other tilings
 * (subgroups, row blocks per subgroup, keys per tile; both precisions;
 * a flag "m": pass 1 finds only the row maxima, "m" alone: planned tiling).
 * --storage checks and times the storage-loaded two-pass forward
 * (forwardTiling 'storage': operands split by a pre-pass into float16
 * matrices in storage) at its planned tiling, --storage-plans at forced
 * ones ("sg,rb,bc", flags "r": Q reloaded at each use, "m": pass 1 finds
 * row maxima only; "r" / "m" alone: the planned tiling with that flag),
 * both precisions, forward only, in a table of their own.
 * --fwd-only times no forward+backward.
 *
 * Without the feature it stops with a message, unless --stand-in: then the
 * kernels' portable stand-in runs (plain loops; checks the tiling and the
 * split arithmetic end to end, e.g. on SwiftShader, not speed). --small
 * checks tiny shapes (for a software device).
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

import {matrixGradStats, planMatrixBackward} from '../kernels/webgpu/flash_attention_grad_subgroup_matrix';
import type {MatrixDkdvTiles} from '../kernels/webgpu/flash_attention_grad_subgroup_matrix_dkdv_webgpu';
import {matrixForwardStats, MatrixForwardOverride, planMatrixForward, setMatrixForwardOverride} from '../kernels/webgpu/flash_attention_subgroup_matrix';
import {storageWorkgroupBytes} from '../kernels/webgpu/flash_attention_subgroup_matrix_storage_webgpu';
import {twoPassTileSizes} from '../kernels/webgpu/flash_attention_subgroup_matrix_two_pass_webgpu';
import {checkOwnPipelineErrors} from '../kernels/webgpu/own_pipeline';
import {allowUnvalidatedTensorCores, MatrixDiagnosis, pickSubgroupMatrixShape, subgroupMatrixConfigs} from '../kernels/webgpu/subgroup_matrix';
import {FLASH_ATTENTION_IMPL, FLASH_ATTENTION_TENSOR_CORES, flashAttention, FlashAttentionOptions} from '../src';
import {AttentionShapes} from '../src/checks';
import {randomArray, Rng} from '../test/harness/problems';
import {oracleBackward, oracleForward, OracleOptions, OracleProblem} from '../test/oracle';
import {enableTensorCores, TENSOR_CORE_DAWN_FLAGS, TENSOR_CORE_FEATURES} from '../demo/tensor_cores';

/**
 * The override of the tensor-core modes: null on a device with the
 * feature; the stand-in (8x8x8 blocks, 16 lanes) under --stand-in.
 */
let tensorCoreOverride: MatrixForwardOverride|null = null;
const STAND_IN: MatrixForwardOverride = {
  shape: {M: 8, N: 8, K: 8, lanes: 16, standIn: true},
  subgroups: 2,
  bc: 16,
  gradTiles: {subgroups: 2, br: 16, bc: 16},
};

/** A timed configuration: SIMT, or a tensor-core precision with an override. */
interface TimeMode {
  name: string;
  precision: 'float32'|'float16';
  /** null: SIMT. */
  override: MatrixForwardOverride|null;
  /** The verdict it must have passed before it is timed. */
  checkedAs?: string;
  /** Forward only (the tiling variants). */
  fwdOnly?: boolean;
  /** Forward+backward only (backward variants). */
  fwdbwdOnly?: boolean;
}
function timeModes(): TimeMode[] {
  const tc = tensorCoreOverride ?? {};
  const modes: TimeMode[] = [
    {name: 'simt', precision: 'float32', override: null},
    {name: 'float32', precision: 'float32', override: tc, checkedAs: 'float32'},
    {name: 'float16', precision: 'float16', override: tc, checkedAs: 'float16'},
  ];
  for (const v of tensorCoreVariants(tc)) {
    for (const p of PRECISIONS) {
      const name = `${p} ${v.name}`;
      modes.push({name, precision: p, override: v.override, checkedAs: name, ...v.time});
    }
  }
  for (const plan of timePlans()) {
    for (const p of PRECISIONS) {
      modes.push({
        name: `${p} ${planName(plan)}`,
        precision: p,
        override: {...tc, ...plan},
        checkedAs: `float32 ${planName(plan)}`,
        fwdOnly: true
      });
    }
  }
  return modes;
}

const PRECISIONS = ['float32', 'float16'] as const;

/**
 * A forced tensor-core variant that is checked and timed at both
 * precisions, as the mode `${precision} ${name}`.
 */
interface TensorCoreVariant {
  name: string;
  override: MatrixForwardOverride;
  /** What its check expects (beside one forward and two backward matrix dispatches). */
  check: Pick<CheckMode, 'twoPass'|'storage'|'accumulated'|'gradMayFallBack'|'mayFallBack'>;
  /** What of it is timed. */
  time: Pick<TimeMode, 'fwdOnly'|'fwdbwdOnly'>;
}

/**
 * The accumulated dK/dV pass (unless --skip-accumulated), at --dkdv-plans'
 * tilings, the one-pass forward (unless --skip-one-pass) and the
 * storage-loaded forward's plans, on the tensor-core override `tc`.
 */
function tensorCoreVariants(tc: MatrixForwardOverride): TensorCoreVariant[] {
  const variants: TensorCoreVariant[] = [];
  if (!process.argv.includes('--skip-accumulated')) {
    // The accumulated dK/dV pass (dK, dV in matrix accumulators), forced.
    variants.push({
      name: 'accumulated bwd',
      override: {...tc, gradTiling: 'accumulated'},
      check: {twoPass: true, accumulated: true},
      time: {fwdbwdOnly: true}
    });
  }
  for (const tiles of dkdvPlans()) {
    // Forced tilings of the accumulated pass (one that does not fit some
    // head dims falls back to the SIMT backward there: NOT TC, no failure).
    variants.push({
      name: dkdvPlanName(tiles),
      override: {...tc, gradTiling: 'accumulated', gradDkdvTiles: tiles},
      check: {twoPass: true, accumulated: true, gradMayFallBack: true},
      time: {fwdbwdOnly: true}
    });
  }
  if (!process.argv.includes('--skip-one-pass')) {
    variants.push({
      name: 'one-pass',
      override: {...tc, forwardTiling: 'online'},
      check: {twoPass: false},
      // Its backward is the two-pass modes' backward.
      time: {fwdOnly: true}
    });
  }
  for (const plan of storagePlans()) {
    variants.push({
      name: storageName(plan),
      override: {...tc, ...plan, forwardTiling: 'storage'},
      check: {twoPass: false, storage: true, mayFallBack: plan.subgroups != null},
      time: {fwdOnly: true}
    });
  }
  return variants;
}

/** A two-pass forward plan to check and time. */
type TwoPassPlan = Pick<MatrixForwardOverride, 'subgroups'|'rowBlocks'|'bc'|'rowMaxOnly'>;

/**
 * --time-plans "sg,rb,bc;...": two-pass tilings to time (forward); a flag
 * "m" finds only the row maxima in pass 1, "m" alone at the planned tiling.
 */
function timePlans(): TwoPassPlan[] {
  return arg('time-plans', '').split(';').filter(x => x).map(t => {
    const fields = t.split(',');
    const rowMaxOnly = fields.includes('m');
    const numbers = fields.filter(f => f !== 'm').map(Number);
    if (numbers.length < 3) {
      return {rowMaxOnly};
    }
    const [subgroups, rowBlocks, bc] = numbers;
    return {subgroups, rowBlocks, bc, rowMaxOnly};
  });
}
function planName(p: TwoPassPlan): string {
  const tiling = p.subgroups == null ? '' : ` sg${p.subgroups} rb${p.rowBlocks} bc${p.bc}`;
  return `2p${tiling}${p.rowMaxOnly ? ' max pass' : ''}`;
}

/** A storage-loaded forward plan to check and time. */
type StoragePlan = Pick<MatrixForwardOverride, 'subgroups'|'rowBlocks'|'bc'|'reloadQ'|'rowMaxOnly'>;

/**
 * Storage-loaded forward plans: {} (its planned tiling) under --storage,
 * then those of --storage-plans "sg,rb,bc;...", each optionally followed
 * by flags: "r" reloads Q's matrices at each use, "m" finds only the row
 * maxima in pass 1; flags alone ("r", "m", "r,m") take the planned tiling.
 */
function storagePlans(): StoragePlan[] {
  const forced = arg('storage-plans', '').split(';').filter(x => x).map(t => {
    const fields = t.split(',');
    const flags = {reloadQ: fields.includes('r'), rowMaxOnly: fields.includes('m')};
    const numbers = fields.filter(f => f !== 'r' && f !== 'm').map(Number);
    if (numbers.length < 3) {
      return flags;
    }
    const [subgroups, rowBlocks, bc] = numbers;
    return {subgroups, rowBlocks, bc, ...flags};
  });
  return [...(process.argv.includes('--storage') ? [{}] : []), ...forced];
}
function storageName(p: StoragePlan): string {
  const tiling = p.subgroups == null ? '' : ` sg${p.subgroups} rb${p.rowBlocks} bc${p.bc}`;
  return `storage${tiling}${p.reloadQ ? ' reload Q' : ''}${p.rowMaxOnly ? ' max pass' : ''}`;
}

/** --dkdv-plans "sg,kb,br;...": accumulated dK/dV tilings to check and time (fwd+bwd). */
function dkdvPlans(): MatrixDkdvTiles[] {
  return arg('dkdv-plans', '').split(';').filter(x => x).map(t => {
    const [subgroups, keyBlocks, br] = t.split(',').map(Number);
    return {subgroups, keyBlocks, br};
  });
}
function dkdvPlanName(t: MatrixDkdvTiles): string {
  return `acc sg${t.subgroups} kb${t.keyBlocks} br${t.br}`;
}

/**
 * The accuracy check's columns: SIMT, both precisions, the float32 matrix
 * backward after the SIMT forward (separates the two kernels' errors), and
 * under --variants the float32 path with one diagnosis flag each
 * (kernels/webgpu/subgroup_matrix.ts: each brings back a construct of the
 * kernels' first hardware run, to tell which one breaks them).
 */
interface CheckMode {
  name: string;
  precision: 'float32'|'float16';
  /** null: SIMT. */
  override: MatrixForwardOverride|null;
  /** Matrix dispatches expected: forward, backward passes. */
  expect: [number, number];
  /** Whether the forward must be the two-pass kernel (when expect[0] is 1). */
  twoPass?: boolean;
  /** Whether it must be the storage-loaded kernel (and its pre-pass). */
  storage?: boolean;
  /** Whether the dK/dV pass must be the accumulated one (when expect[1] is 2). */
  accumulated?: boolean;
  /**
   * A forced backward tiling that may not fit some head dims: the SIMT
   * backward running instead is no failure (the row says NOT TC).
   */
  gradMayFallBack?: boolean;
  /**
   * A forced tiling that may not fit some head dims: the SIMT forward
   * running instead is no failure (the row says NOT TC).
   */
  mayFallBack?: boolean;
}
function checkModes(): CheckMode[] {
  const tc = tensorCoreOverride ?? {};
  const modes: CheckMode[] = [
    {name: 'simt', precision: 'float32', override: null, expect: [0, 0]},
    {
      name: 'float32',
      precision: 'float32',
      override: tc,
      expect: [1, 2],
      twoPass: true,
      accumulated: false
    },
    {
      name: 'float16',
      precision: 'float16',
      override: tc,
      expect: [1, 2],
      twoPass: true,
      accumulated: false
    },
    {
      name: 'simt fwd + tc bwd',
      precision: 'float32',
      override: {...tc, forwardOff: true},
      expect: [0, 2],
      accumulated: false
    },
  ];
  for (const v of tensorCoreVariants(tc)) {
    for (const p of PRECISIONS) {
      modes.push(
          {name: `${p} ${v.name}`, precision: p, override: v.override, expect: [1, 2], ...v.check});
    }
  }
  for (const plan of timePlans()) {
    // Each timed tiling is checked first (float32; float16 shares its code).
    modes.push({
      name: `float32 ${planName(plan)}`,
      precision: 'float32',
      override: {...tc, ...plan},
      expect: [1, 2],
      twoPass: true,
      mayFallBack: true
    });
  }
  if (process.argv.includes('--variants')) {
    const variants: Array<[string, MatrixDiagnosis]> = [
      ['legacy built-ins', {legacyBuiltins: true}],
      ['null accumulator', {nullAccumulator: true}],
      ['subgroup reductions off', {workgroupReductions: true}],
      ['ids from local_invocation_index', {indexSubgroups: true}],
      ['session 6 constructs', {legacyBuiltins: true, nullAccumulator: true, indexSubgroups: true}],
    ];
    for (const [name, diagnose] of variants) {
      modes.push({
        name: `float32 ${name}`,
        precision: 'float32',
        override: {...tc, diagnose},
        expect: [1, 2],
      });
    }
  }
  if (process.argv.includes('--forward-plans')) {
    // Other forward tilings of the float32 path: which of the kernel's
    // tile parameters (subgroups per workgroup, keys per tile) matter.
    const plans: Array<Pick<MatrixForwardOverride, 'subgroups'|'bc'>> =
        [{subgroups: 1}, {subgroups: 2}, {bc: 16}, {bc: 64}, {subgroups: 1, bc: 16}];
    for (const plan of plans) {
      modes.push({
        name: `float32 one-pass ${JSON.stringify(plan)}`,
        precision: 'float32',
        override: {...tc, ...plan, forwardTiling: 'online'},
        expect: [1, 2],
      });
    }
    // The control: sessions 6 and 7's 8-byte `wmax`, which can put the
    // matrix arrays off their 16-byte alignment. Expected to fail where
    // the driver places it before them, while the modes above pass.
    modes.push({
      name: 'float32 8-byte wmax (sessions 6/7)',
      precision: 'float32',
      override: {...tc, diagnose: {unalignedWorkgroup: true}, forwardTiling: 'online'},
      expect: [1, 2],
    });
  }
  return modes;
}

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}
const nums = (s: string) => s.split(',').filter(x => x).map(Number);

/** --deadline-s: past it, remaining checks and timings are skipped, and say so. */
const startMs = performance.now();
const pastDeadline = () =>
    (performance.now() - startMs) / 1000 > Number(arg('deadline-s', 'Infinity'));
let casesChecked = 0;


interface Shape extends AttentionShapes {
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

const SMALL_CASES: Array<[string, Shape, OracleOptions]> = [
  [
    'causal S=40 D=32 GQA 4/2',
    {batch: 1, seqQ: 40, seqK: 40, heads: 4, headsKV: 2, headDim: 32, headDimV: 32}, {causal: true}
  ],
  [
    'window+softcap+alibi Sq<Sk D=16',
    {batch: 2, seqQ: 21, seqK: 37, heads: 2, headsKV: 1, headDim: 16, headDimV: 16, alibi: true},
    {windowSize: [9, 3], softcap: 5}
  ],
];

/** Bounds (max error / max reference) of out, lse, dq, dk, dv per precision. */
const BOUNDS: Record<'float32'|'float16', number[]> = {
  // docs/design.md, "Accuracy bounds" (the SIMT kernels too).
  float32: [1e-4, 1e-4, 5e-4, 5e-4, 5e-4],
  // docs/tensor_cores.md, "Precision".
  float16: [5e-3, 5e-3, 1e-2, 1e-2, 1e-2],
};
const OUTPUTS = ['out', 'lse', 'dq', 'dk', 'dv'];

/** A check mode's worst errors over the cases, and whether it met its bounds. */
interface Verdict {
  worst: number[];
  /** Every case ran the kernels the mode names. */
  ran: boolean;
  pass: boolean;
}
const verdicts = new Map<string, Verdict>();

function record(mode: CheckMode, errors: number[], ran: boolean): void {
  const v = verdicts.get(mode.name) ?? {worst: errors.map(() => 0), ran: true, pass: true};
  // NaN or Infinity counts as the worst.
  v.worst = v.worst.map((w, i) => Number.isFinite(errors[i]) ? Math.max(w, errors[i]) : Infinity);
  v.ran = v.ran && ran;
  v.pass = v.ran && v.worst.every((w, i) => w <= BOUNDS[mode.precision][i]);
  verdicts.set(mode.name, v);
}

function verdictLines(): string[] {
  return [...verdicts].map(
      ([name, v]) => `${v.pass ? 'PASS' : 'FAIL'} ${name}${v.ran ? '' : ' (NOT TC)'}: worst ${
          OUTPUTS.map((o, i) => `${o} ${v.worst[i].toExponential(2)}`).join(', ')}`);
}

async function accuracy(): Promise<string[]> {
  const cases: Array<[string, Shape, OracleOptions]> =
      process.argv.includes('--small') ? SMALL_CASES : [
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
  // Fixed seed: the same problems on every run and machine.
  const rng = new Rng(12345);
  for (const [name, s, opts] of cases) {
    if (pastDeadline()) {
      lines.push(`${name}: not checked (past --deadline-s)`);
      continue;
    }
    casesChecked++;
    const p: OracleProblem = {
      ...s,
      q: randomArray(s.batch * s.seqQ * s.heads * s.headDim, rng),
      k: randomArray(s.batch * s.seqK * s.headsKV * s.headDim, rng),
      v: randomArray(s.batch * s.seqK * s.headsKV * s.headDimV, rng),
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
    const dOut = randomArray(expected.out.length, rng);
    const expectedGrads = oracleBackward(p, opts, dOut, new Float64Array(expected.lse.length));
    const dOutT = tf.tensor4d(Float32Array.from(dOut), [s.batch, s.seqQ, s.heads, s.headDimV]);
    const row: string[] = [name];
    for (const mode of checkModes()) {
      // A kernel that fails (compilation, validation) fails its mode only.
      try {
        setMatrixForwardOverride(mode.override ?? {off: true});
        const before = matrixForwardStats.dispatches;
        const twoPassBefore = matrixForwardStats.twoPassDispatches;
        const storageBefore = matrixForwardStats.storageDispatches;
        const splitBefore = matrixForwardStats.splitDispatches;
        const o: FlashAttentionOptions =
            {...opts, alibiSlopes: slopes, returnSoftmaxLse: true, precision: mode.precision};
        const [out, lse] = flashAttention(q, k, v, o) as tf.Tensor[];
        const [od, ld] = [await out.data(), await lse.data()];
        tf.dispose([out, lse]);
        await checkOwnPipelineErrors();
        const used = matrixForwardStats.dispatches - before;
        const twoPassUsed = matrixForwardStats.twoPassDispatches - twoPassBefore;
        const storageUsed = matrixForwardStats.storageDispatches - storageBefore;
        const splitUsed = matrixForwardStats.splitDispatches - splitBefore;
        // The backward: gradients of sum(out * dOut).
        const gradBefore = matrixGradStats.dispatches;
        const accumulatedBefore = matrixGradStats.accumulated;
        const grads = tf.grads(
            (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => tf.sum(tf.mul(
                flashAttention(
                    a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D,
                    {...opts, alibiSlopes: slopes, precision: o.precision}) as tf.Tensor,
                dOutT)))([q, k, v]);
        const [dq, dk, dv] = await Promise.all(grads.map(g => g.data()));
        tf.dispose(grads);
        await checkOwnPipelineErrors();
        const gradUsed = matrixGradStats.dispatches - gradBefore;
        const accumulatedUsed = matrixGradStats.accumulated - accumulatedBefore;
        const ran = used === mode.expect[0] && gradUsed === mode.expect[1] &&
            (mode.twoPass == null || twoPassUsed === (mode.twoPass ? used : 0)) &&
            storageUsed === (mode.storage ? used : 0) && splitUsed === storageUsed &&
            (mode.accumulated == null || accumulatedUsed === (mode.accumulated ? 1 : 0));
        const fellBack = (mode.mayFallBack === true && used === 0) ||
            (mode.gradMayFallBack === true && gradUsed === 0);
        const errors = [
          relError(od, expected.out), relError(ld, expected.lse), relError(dq, expectedGrads.dq),
          relError(dk, expectedGrads.dk), relError(dv, expectedGrads.dv)
        ];
        record(mode, errors, ran || fellBack);
        row.push(`${mode.name}${ran ? '' : '(NOT TC)'} ${
            OUTPUTS.map((o, i) => `${o} ${errors[i].toExponential(2)}`).join(' ')}`);
      } catch (e) {
        record(mode, OUTPUTS.map(() => Infinity), false);
        row.push(`${mode.name} ERROR ${(e as Error).message.slice(0, 300)}`);
      }
    }
    setMatrixForwardOverride(null);
    tf.dispose([q, k, v, dOutT]);
    if (slopes != null) {
      slopes.dispose();
    }
    lines.push(row.join(' | '));
    console.error(row.join(' | '));
  }
  return lines;
}

async function drain(device: GPUDevice): Promise<void> {
  const b = tf.backend() as unknown as
      {submitQueue(): void, ensureCommandEncoderReady(): void, endComputePassEncoder(): void};
  // The fused dispatches are recorded into tfjs's open compute pass: end it
  // before the encoder is finished (a finished encoder with an open pass
  // invalidates the whole command buffer).
  b.ensureCommandEncoderReady();
  b.endComputePassEncoder();
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

interface Timing {
  /** A TimeMode's name. */
  mode: string;
  kind: 'fwd'|'fwdbwd';
  dim: number;
  seq: number;
  ms: number|null;
  tflops: number|null;
  /** Whether a tensor-core kernel ran (from the dispatch counts). */
  tensorCores?: boolean;
  error?: string;
}

/** A row of torch_flash_fp16.py --out. */
interface TorchRow {
  impl: 'fa2_fp16'|'sdpa_fp32';
  mode: 'fwd'|'fwdbwd';
  dim: number;
  seq: number;
  tflops: number;
}

/**
 * The issue's goal table: TFLOP/s (causal, B=1) of the SIMT kernels, both
 * tensor-core precisions, PyTorch FA2 float16 and SDPA float32.
 */
function goalTable(timings: Timing[], torch: TorchRow[], standIn: boolean): string {
  const tf = (t: Timing|undefined) => t == null ?
      '-' :
      t.tflops == null ?
      (t.error?.includes('accuracy')     ? 'failed check' :
           t.error?.includes('deadline') ? 'deadline' :
                                           'error') :
      `${t.tflops.toFixed(1)}${t.mode !== 'simt' && !t.tensorCores ? ' (NOT TC)' : ''}`;
  const torchTf = (impl: string, r: Timing) => {
    const row =
        torch.find(x => x.impl === impl && x.mode === r.kind && x.dim === r.dim && x.seq === r.seq);
    return row == null ? '-' : row.tflops.toFixed(1);
  };
  const out = [
    `TFLOP/s, causal, B=1 (4*S*S*H*D/2 per forward, x3.5 with the backward)${
        standIn ? '; STAND-IN: not tensor cores, not a performance number' : ''}`,
    'TC = the two-pass forward and the per-tile backward (default plans); 1-pass = the ' +
        'first forward, accum. = the accumulated dK/dV pass (fwd+bwd), forced',
    '',
    '| pass | D | S | SIMT f32 | TC float32 | TC float16 | 1-pass f32 | 1-pass f16 | ' +
        'accum. f32 | accum. f16 | torch FA2 f16 | torch SDPA f32 | TC f32 / SDPA | ' +
        'TC f16 / FA2 |',
    `|${' --- |'.repeat(14)}`,
  ];
  const at = (mode: string, kind: string, dim: number, seq: number) =>
      timings.find(t => t.mode === mode && t.kind === kind && t.dim === dim && t.seq === seq);
  const keys = [...new Set(timings.map(t => `${t.kind} ${t.dim} ${t.seq}`))];
  for (const key of keys) {
    const [kind, dimS, seqS] = key.split(' ');
    const [dim, seq] = [Number(dimS), Number(seqS)];
    const [simt, f32, f16, f32one, f16one, f32acc, f16acc] = [
      'simt', 'float32', 'float16', 'float32 one-pass', 'float16 one-pass',
      'float32 accumulated bwd', 'float16 accumulated bwd'
    ].map(m => at(m, kind, dim, seq));
    const ref = (f32 ?? simt)!;
    const sdpa = torchTf('sdpa_fp32', ref);
    const fa2 = torchTf('fa2_fp16', ref);
    const ratio = (a: Timing|undefined, b: string) =>
        a?.tflops == null || b === '-' ? '-' : (a.tflops / Number(b)).toFixed(2);
    out.push(`| ${kind} | ${dim} | ${seq} | ${tf(simt)} | ${tf(f32)} | ${tf(f16)} | ${
        tf(f32one)} | ${tf(f16one)} | ${tf(f32acc)} | ${tf(f16acc)} | ${fa2} | ${sdpa} | ${
        ratio(f32, sdpa)} | ${ratio(f16, fa2)} |`);
  }
  const stored = storagePlans();
  if (stored.length > 0) {
    out.push(
        '',
        'Storage-loaded forward (operands from storage) vs two-pass (TFLOP/s, fwd, ' +
            'float32 / float16):',
        '', `| D | S | SIMT f32 | two-pass | ${stored.map(storageName).join(' | ')} |`,
        `|${' --- |'.repeat(stored.length + 4)}`);
    const fwdKeys =
        [...new Set(timings.filter(t => t.kind === 'fwd').map(t => `${t.dim} ${t.seq}`))];
    for (const key of fwdKeys) {
      const [dim, seq] = key.split(' ').map(Number);
      const pair = (a: string, b: string) =>
          `${tf(at(a, 'fwd', dim, seq))} / ${tf(at(b, 'fwd', dim, seq))}`;
      out.push(`| ${dim} | ${seq} | ${tf(at('simt', 'fwd', dim, seq))} | ${
          pair('float32', 'float16')} | ${
          stored.map(p => pair(`float32 ${storageName(p)}`, `float16 ${storageName(p)}`))
              .join(' | ')} |`);
    }
  }
  const plans = timePlans();
  if (plans.length > 0) {
    out.push(
        '', 'Two-pass forward tilings (TFLOP/s, fwd, float32 / float16):', '',
        `| D | S | ${plans.map(planName).join(' | ')} |`, `|${' --- |'.repeat(plans.length + 2)}`);
    const fwdKeys =
        [...new Set(timings.filter(t => t.kind === 'fwd').map(t => `${t.dim} ${t.seq}`))];
    for (const key of fwdKeys) {
      const [dim, seq] = key.split(' ').map(Number);
      out.push(`| ${dim} | ${seq} | ${
          plans
              .map(
                  p => `${tf(at(`float32 ${planName(p)}`, 'fwd', dim, seq))} / ${
                      tf(at(`float16 ${planName(p)}`, 'fwd', dim, seq))}`)
              .join(' | ')} |`);
    }
  }
  const tilings = dkdvPlans();
  if (tilings.length > 0) {
    out.push(
        '', 'Accumulated dK/dV tilings (TFLOP/s, fwd+bwd, float32 / float16):', '',
        `| D | S | ${tilings.map(dkdvPlanName).join(' | ')} |`,
        `|${' --- |'.repeat(tilings.length + 2)}`);
    const bwdKeys =
        [...new Set(timings.filter(t => t.kind === 'fwdbwd').map(t => `${t.dim} ${t.seq}`))];
    for (const key of bwdKeys) {
      const [dim, seq] = key.split(' ').map(Number);
      out.push(`| ${dim} | ${seq} | ${
          tilings
              .map(
                  p => `${tf(at(`float32 ${dkdvPlanName(p)}`, 'fwdbwd', dim, seq))} / ${
                      tf(at(`float16 ${dkdvPlanName(p)}`, 'fwdbwd', dim, seq))}`)
              .join(' | ')} |`);
    }
  }
  return out.join('\n');
}

async function main(): Promise<void> {
  const setup = await openWebGPUDevice({
    dawnFlags: TENSOR_CORE_DAWN_FLAGS,
    features: TENSOR_CORE_FEATURES,
    onError: console.error,
  });
  const {adapter, device, features} = setup;
  await useWebGPUBackend(setup);
  tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
  const info = adapter.info as unknown as Record<string, unknown>;
  console.log(`device: ${info.vendor} ${info.architecture} ${info.description}; features: ${
      features.join(', ')}`);
  console.log(`matrix configs: ${
      subgroupMatrixConfigs(device)
          .map(c => `${c.M}x${c.N}x${c.K} ${c.componentType}->${c.resultType}`)
          .join('; ')}`);
  // This script is the hardware check of the real kernels: they run here
  // even though they have not passed it yet.
  allowUnvalidatedTensorCores(true);
  const status = enableTensorCores(device);
  console.log(status);
  if (!tf.env().getBool(FLASH_ATTENTION_TENSOR_CORES)) {
    if (!process.argv.includes('--stand-in')) {
      console.log(
          'tensor_cores: nothing to validate on this device (--stand-in runs the ' +
          'portable stand-in of the kernels instead)');
      process.exit(2);
    }
    console.log('tensor_cores: --stand-in: the portable stand-in runs (no tensor cores)');
    tensorCoreOverride = STAND_IN;
  }
  const shape = pickSubgroupMatrixShape(device);
  console.log(`chosen: ${JSON.stringify(shape)}`);
  console.log(`workgroup storage: ${device.limits.maxComputeWorkgroupStorageSize} B`);
  for (const d of nums(arg('dims', '64,128'))) {
    for (const p of ['float32', 'float16']) {
      setMatrixForwardOverride(tensorCoreOverride);
      const plan = JSON.stringify(planMatrixForward(device, d, d, p));
      const backward = JSON.stringify(planMatrixBackward(device, d, d, p));
      setMatrixForwardOverride({...tensorCoreOverride, forwardTiling: 'online'});
      const onePass = JSON.stringify(planMatrixForward(device, d, d, p));
      setMatrixForwardOverride({...tensorCoreOverride, forwardTiling: 'storage'});
      const storage = JSON.stringify(planMatrixForward(device, d, d, p));
      console.log(`plan D=${d} ${p}: forward ${plan}, one-pass ${onePass}, storage ${
          storage}, backward ${backward}`);
      // Forced storage tilings that do not fit run SIMT (NOT TC): say why.
      for (const forced of storagePlans().filter(x => x.subgroups != null)) {
        setMatrixForwardOverride({...tensorCoreOverride, ...forced, forwardTiling: 'storage'});
        if (planMatrixForward(device, d, d, p) == null && shape != null) {
          const c = {
            headDim: d,
            headDimV: d,
            shape,
            subgroups: forced.subgroups!,
            rowBlocks: forced.rowBlocks!,
            bc: forced.bc!,
            split: p === 'float32'
          };
          console.log(`  ${storageName(forced)} D=${d} ${p}: no plan (${
              twoPassTileSizes(c) == null ?
                  'the tiling does not suit the head dim' :
                  `needs ${storageWorkgroupBytes(c)} B of workgroup memory, or more ` +
                      'invocations than the device allows'})`);
        }
      }
    }
  }
  setMatrixForwardOverride(null);
  const report: Record<string, unknown> = {};
  if (!process.argv.includes('--skip-check')) {
    report.accuracy = await accuracy();
  }
  const timings: Timing[] = [];
  if (!process.argv.includes('--skip-time')) {
    const heads = Number(arg('heads', '16'));
    for (const d of nums(arg('dims', '64,128'))) {
      for (const s of nums(arg('seqs', '4096,16384'))) {
        const [q, k, v, dy] =
            [0, 1, 2, 3].map(() => tf.randomNormal([1, s, heads, d]) as tf.Tensor4D);
        const fwdFlops = 4 * s * s * heads * d / 2;
        for (const mode of timeModes()) {
          // Wrong kernels' times are no result: tensor-core modes are timed
          // only after they passed the check (or under --time-anyway).
          const verdict = mode.checkedAs == null ? undefined : verdicts.get(mode.checkedAs);
          const failed =
              verdict != null && !verdict.pass && !process.argv.includes('--time-anyway');
          // --fwd-only: no forward+backward timing (backward-only modes none).
          const fwdOnly = process.argv.includes('--fwd-only');
          const kinds: ReadonlyArray<'fwd'|'fwdbwd'> = mode.fwdbwdOnly ?
              (fwdOnly ? [] : ['fwdbwd']) :
              (mode.fwdOnly || fwdOnly ? ['fwd'] : ['fwd', 'fwdbwd']);
          if (failed || pastDeadline()) {
            for (const kind of kinds) {
              timings.push({
                mode: mode.name,
                kind,
                dim: d,
                seq: s,
                ms: null,
                tflops: null,
                error: `not timed: ${failed ? 'failed the accuracy check' : 'past --deadline-s'}`
              });
            }
            continue;
          }
          setMatrixForwardOverride(mode.override ?? {off: true});
          const opts: FlashAttentionOptions = {causal: true, precision: mode.precision};
          const attend = (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) =>
              flashAttention(a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D, opts) as
              tf.Tensor;
          const runs: Array<['fwd' | 'fwdbwd', () => void]> = [
            ['fwd', () => tf.dispose(attend(q, k, v))],
            ['fwdbwd', () => tf.dispose(tf.grads(attend)([q, k, v], dy))],
          ];
          for (const [kind, run] of runs.filter(
                   ([kind]) => (kinds as readonly string[]).includes(kind))) {
            const t: Timing = {mode: mode.name, kind, dim: d, seq: s, ms: null, tflops: null};
            const before = matrixForwardStats.dispatches + matrixGradStats.dispatches;
            const accumulatedBefore = matrixGradStats.accumulated;
            try {
              t.ms = await timeMs(device, run);
              t.tflops = fwdFlops * (kind === 'fwd' ? 1 : 3.5) / t.ms / 1e9;
              t.tensorCores = matrixForwardStats.dispatches + matrixGradStats.dispatches > before;
              if (kind === 'fwdbwd' && mode.override?.gradTiling === 'accumulated') {
                // NOT TC where the forced accumulated tiling did not fit.
                t.tensorCores = matrixGradStats.accumulated > accumulatedBefore;
              }
            } catch (e) {
              t.error = (e as Error).message.slice(0, 200);
            }
            console.error(JSON.stringify(t));
            timings.push(t);
          }
        }
        setMatrixForwardOverride(null);
        tf.dispose([q, k, v, dy]);
      }
    }
    report.timings = timings;
  }
  console.log(
      '\n== accuracy (max abs err / max abs ref vs float64 oracle; bounds: ' +
      'fwd 1e-4, grads 5e-4 for simt and float32) ==');
  for (const line of (report.accuracy as string[] | undefined) ?? []) {
    console.log(line);
  }
  if (verdicts.size > 0) {
    console.log(
        `\n== verdict per mode (worst over ${casesChecked} checked cases; bounds: float32 and ` +
        'simt fwd 1e-4, grads 5e-4; float16 fwd 5e-3, grads 1e-2) ==');
    report.verdicts = verdictLines();
    verdictLines().forEach(line => console.log(line));
  }
  const torchAt = process.argv.indexOf('--torch');
  const torch = torchAt >= 0 && fs.existsSync(process.argv[torchAt + 1]) ?
      JSON.parse(fs.readFileSync(process.argv[torchAt + 1], 'utf8')) as {rows: TorchRow[]} :
      null;
  if (timings.length > 0) {
    console.log(`\n${goalTable(timings, torch?.rows ?? [], tensorCoreOverride != null)}`);
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
