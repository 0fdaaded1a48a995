/**
 * Everything the WebGPU kernels' planners tune, in one place: the forward
 * tilings in the order they are tried, the register budget, the split-KV
 * thresholds, the backward's tile sizes, and the overrides that tests and
 * benchmarks use to force a plan (like tfjs's env flags, but typed).
 *
 * The measurements behind each choice are in benchmarks/RESULTS.md (the
 * sections on forward and backward tuning, and issue 14's sweeps); this file
 * says why, not how fast.
 */
import type {ForwardTiles} from './flash_attention_webgpu';
import type {GradTiles} from './FlashAttentionGrad';
import type {DqTiles} from './flash_attention_grad_dq_webgpu';

/** A forward tiling and the problems it is meant for. */
export interface ForwardTilingChoice extends ForwardTiles {
  /** Only for head dims above this (where it was measured to win). */
  minHeadDim?: number;
  /** Only for head dims up to this. */
  maxHeadDim?: number;
  /** Only when the grid has at least this many workgroups (a full GPU). */
  minGroups?: number;
  /**
   * Only for short grids on a hardware GPU: when 32-row query tiles would
   * make fewer than SHORT_GRID_GROUPS workgroups.
   */
  shortGrid?: boolean;
}

/** Streaming multiprocessors of the GPU the tilings are tuned on (H100 SXM). */
export const TUNED_SM_COUNT = 132;

/**
 * A grid of 32-row query tiles with fewer workgroups than this (2 per SM)
 * leaves SMs without a second workgroup to hide latency: 16-row tiles
 * double the workgroups. WebGPU does not report SM counts, so this is
 * the H100's; smaller GPUs fill at fewer workgroups and lose little.
 */
export const SHORT_GRID_GROUPS = 2 * TUNED_SM_COUNT;

/**
 * Forward tilings tried in order; the first that fits the device's limits,
 * the register budget and the problem is used. BR x BC and threads in the
 * comments.
 */
export const FORWARD_TILINGS: ForwardTilingChoice[] = [
  // Head dims 97..128: candidate E of STREAMED_FORWARD_CANDIDATES (64 x 64
  // tiles, 256 threads, Q^T streamed beside K^T) beat the sliced tiles
  // below in 15 of 16 rows of two repeats on an H100 (benchmarks/RESULTS.md,
  // "Session 9, call 3"). It needs 48 KiB; devices with less take the next.
  {
    tm: 4,
    tx: 16,
    nq: 1,
    ty: 16,
    outer: true,
    dimChunks: 2,
    streamQuery: true,
    minHeadDim: 96,
    maxHeadDim: 128
  },
  // Head dims 97..128: 64 x 32 outer-product tiles with K^T and V streamed
  // in two head-dim slices (see SLICED_FORWARD_CANDIDATES); faster than the
  // classic tiles in every D=128 row measured (benchmarks/RESULTS.md,
  // "Session 7, call 1"). D <= 96 was not measured.
  {tm: 4, tx: 8, nq: 1, ty: 16, outer: true, dimChunks: 2, minHeadDim: 96, maxHeadDim: 128},
  // Short grids at D=64 (e.g. B x H = 16 at S = 512): 16 x 64 tiles, twice
  // the workgroups of the 32 x 64 ones (benchmarks/RESULTS.md, issue 14).
  {tm: 2, tx: 16, nq: 1, ty: 8, minHeadDim: 32, maxHeadDim: 64, shortGrid: true},  // 16 x 64, 128
  // Outer-product mode (K^T/V sharing a buffer, P^T swizzled): the fastest
  // at D=64 on large grids; with few workgroups the classic 32-row tiles
  // keep more SMs busy, hence minGroups.
  {tm: 8, tx: 16, nq: 1, ty: 8, outer: true, minHeadDim: 32, minGroups: 512},  // 64 x 64, 128
  // Classic mode, fastest first (H100 through Dawn/Vulkan, D=64).
  {tm: 4, tx: 16, nq: 1, ty: 8},   // 32 x 64, 128
  {tm: 4, tx: 8, nq: 1, ty: 16},   // 64 x 32, 128
  {tm: 2, tx: 16, nq: 1, ty: 16},  // 32 x 64, 256
  {tm: 2, tx: 8, nq: 1, ty: 16},   // 32 x 32, 128
  {tm: 4, tx: 8, nq: 1, ty: 8},    // 32 x 32, 64
  {tm: 2, tx: 16, nq: 1, ty: 8},   // 16 x 64, 128
  {tm: 4, tx: 4, nq: 1, ty: 8},    // 32 x 16, 32
  {tm: 2, tx: 4, nq: 1, ty: 8},    // 16 x 16, 32
  {tm: 1, tx: 4, nq: 1, ty: 16},   // 16 x 16, 64
  {tm: 1, tx: 4, nq: 1, ty: 8},    // 8 x 16, 32
  {tm: 1, tx: 2, nq: 1, ty: 8},    // 8 x 8, 16
  {tm: 1, tx: 1, nq: 1, ty: 8},    // 8 x 4, 8
];

/**
 * Head dims above 64: outer-product tilings with K^T and V streamed through
 * workgroup memory in slices of the head dim (ForwardTiles.dimChunks), so
 * that 64 query rows of Q^T stay resident beside them (docs/webgpu_tuning.md,
 * "Head dims above 64" works out each one's registers, bytes and loads).
 * All are forcible (setForwardOverride, the benchmark's `--variants
 * sliced`); the first leads FORWARD_TILINGS for head dims 97..128.
 */
export const SLICED_FORWARD_CANDIDATES: ForwardTiles[] = [
  {tm: 4, tx: 8, nq: 1, ty: 16, outer: true, dimChunks: 2},  // 64 x 32, 128, 48 KiB
  {tm: 4, tx: 8, nq: 1, ty: 16, outer: true, dimChunks: 4},  // 64 x 32, 128, 44 KiB
  {tm: 4, tx: 16, nq: 1, ty: 8, outer: true, dimChunks: 2},  // 32 x 64, 128, 40 KiB
  {tm: 4, tx: 8, nq: 1, ty: 8, outer: true, dimChunks: 2},   // 32 x 32, 64, 28 KiB
];

/**
 * Head dims 65..128 (valid up to 256 where they fit): tilings aimed at what
 * bounds the sliced candidates at D=128 (docs/webgpu_tuning.md, "What
 * bounds the D=128 forward"): barriers per FMA, the 64 output floats per
 * thread, and the 32 KiB that a resident 64-row Q^T takes. Forcible
 * (setForwardOverride, the benchmark's `--variants streamed`); the planner
 * does not take them until a GPU measures them. At D=128, subgroups on:
 */
export const STREAMED_FORWARD_CANDIDATES: ForwardTiles[] = [
  // E: 64 x 64, 256 thr, Q^T streamed with K^T in 2 slices: 48 KiB, O 32 + S 16
  // floats per thread (A: 64 + 16), 8 warps per workgroup.
  {tm: 4, tx: 16, nq: 1, ty: 16, outer: true, dimChunks: 2, streamQuery: true},
  // F: 64 x 64, 128 thr, Q^T streamed, 8 x 4 S and O micro-tiles (D=64's planned
  // shape): 48 KiB, 0.094 workgroup loads per FMA, 1024 FMAs per barrier (A: 512).
  {tm: 8, tx: 16, nq: 1, ty: 8, outer: true, dimChunks: 2, streamQuery: true},
  // G: A's 64 x 32 tiles, 4 slices in two buffers: one barrier per slice (8 per
  // tile, A4: 16), 8 prefetch floats (A: 16); 48 KiB.
  {tm: 4, tx: 8, nq: 1, ty: 16, outer: true, dimChunks: 4, doubleBuffer: true},
  // H: F's tiles with 4 x 8 S micro-tiles and 8 threads per row: the fewest
  // workgroup-memory wavefronts per FMA (a warp's K^T or V load is 128 bytes).
  {tm: 4, tx: 8, nq: 2, ty: 16, outer: true, dimChunks: 2, streamQuery: true},
];

/** The benchmark's `--variants` spelling of a forced tiling. */
export function forwardVariantName(t: ForwardTiles): string {
  const flags = [
    t.outer ? 'o' : '',
    (t.dimChunks ?? 1) > 1 ? `c${t.dimChunks}` : '',
    t.streamQuery ? 'qs' : '',
    t.doubleBuffer ? 'db' : '',
    t.unroll ? `u${t.unroll}` : '',
  ];
  return [t.tm, t.tx, t.nq, t.ty, ...flags.filter(f => f !== '')].join(',');
}

/** Floats per thread (S, O, prefetch) above which a tiling spills. */
export const REGISTER_BUDGET = 160;

/**
 * Split-KV: below this many query-tile workgroups, the key range of each
 * query tile would be divided among several workgroups. 0: never. On the
 * H100 every short-sequence row measured slower with splits than without
 * (benchmarks/RESULTS.md, issue 14): those rows are bound by the
 * JavaScript and Dawn cost of each dispatch, which the combine pass adds
 * to, not by idle SMs. Tests and benchmarks force splits (splits below).
 */
export const SPLIT_TARGET_GROUPS = 0;
/** Key tiles per split at least: each split pays a Q load and a combine. */
export const MIN_TILES_PER_SPLIT = 2;
export const MAX_SPLITS = 16;

/**
 * Backward tiles, largest first: bigger tiles reuse each loaded K/V (dK/dV
 * pass, [keys, rows per step]) or Q/dO (dQ pass, [rows, keys per step])
 * over more rows. dK/dV 32x32 comes before 64x16: less workgroup storage
 * (more workgroups per SM) and half the accumulators.
 */
export const DKDV_SIZES: Array<[number, number]> =
    [[32, 32], [64, 16], [32, 16], [32, 8], [16, 8], [16, 4], [8, 4], [4, 4], [4, 2], [4, 1]];
export const DQ_SIZES: Array<[number, number]> =
    [[64, 16], [32, 16], [32, 8], [16, 8], [16, 4], [8, 4], [4, 4], [2, 4], [1, 4]];
/** Backward invocations per workgroup: more rows of S per thread than 256. */
export const GRAD_THREADS = 128;

/** Backward tiles and the head dims (both D and Dv) they are planned for. */
export interface GradTilingChoice {
  tiles: GradTiles;
  /** Only for head dims above this. */
  minHeadDim: number;
  /** Only for head dims up to this. */
  maxHeadDim: number;
}

/**
 * Head dims above 64: backward tiles with the streamed operand (Q/dO in
 * the dK/dV pass, K/V in the dQ pass) in head-dim slices (`dimChunks`), so
 * that a step takes 16-32 rows or keys instead of 8
 * (docs/webgpu_tuning.md, "Backward at head dims above 64", works out each
 * one's registers, bytes and loads). Forcible (setGradTilesOverride, the
 * benchmark's `--grad-variants sliced`); not planned (the streamed S2 below
 * measured faster). At D=128, dK/dV / dQ: workgroup bytes, and
 * floats per thread (accumulators + S/dP + prefetch).
 */
export const SLICED_GRAD_CANDIDATES: GradTiles[] = [
  // A: 32 keys x 32 rows / 32 rows x 32 keys, 128 thr: 45312 / 45312 B (5 per SM),
  // 96 / 64 floats, 2x4 S tiles.
  {
    dkdv: {bc: 32, br: 32, threads: 128, dimChunks: 2},
    dq: {br: 32, bc: 32, threads: 128, dimChunks: 2}
  },
  // B: 32 x 16 / 32 x 16, 128 thr: 39040 / 40192 B (5 per SM), 80 / 48 floats, 1x4.
  {
    dkdv: {bc: 32, br: 16, threads: 128, dimChunks: 2},
    dq: {br: 32, bc: 16, threads: 128, dimChunks: 2}
  },
  // C: 16 x 32, 64 thr / 16 x 32, 128 thr: 26880 / 26752 B (8 per SM by bytes),
  // 112 / 40 floats; fits SwiftShader's 32 KiB.
  {
    dkdv: {bc: 16, br: 32, threads: 64, dimChunks: 2},
    dq: {br: 16, bc: 32, threads: 128, dimChunks: 2}
  },
  // D: B's tiles, one slice (whole rows / key tiles streamed): 43136 / 45312 B
  // (5 per SM), 88 / 56 floats, half the barriers of B.
  {
    dkdv: {bc: 32, br: 16, threads: 128, dimChunks: 1},
    dq: {br: 32, bc: 16, threads: 128, dimChunks: 1}
  },
];

/**
 * Head dims 97..128 (valid up to 256 where they fit): backward tiles with
 * both operands streamed in head-dim slices (`streamed`): K^T and V^T
 * beside Q and dO in the dK/dV pass, the rows of Q and dO beside K and V
 * in the dQ pass, so that nothing of the head dim is resident and 64 keys
 * (rows) with 256 invocations fit (docs/webgpu_tuning.md, "Streamed
 * backward", works out each one's bytes, registers and loads). Forcible
 * (setGradTilesOverride, the benchmark's `--grad-variants streamed`); the
 * planner takes S2 (GRAD_TILINGS) on hardware GPUs. At D=128, dK/dV /
 * dQ: workgroup bytes, floats per thread (accumulators + S/dP + prefetch).
 */
export const STREAMED_GRAD_CANDIDATES: GradTiles[] = [
  // S1: 64 keys x 32 rows / 64 rows x 32 keys, 256 thr, 2 slices: 33024 / 33280 B,
  // 104 / 72 floats, 2x4 S tiles.
  {
    dkdv: {bc: 64, br: 32, threads: 256, dimChunks: 2, streamed: true},
    dq: {br: 64, bc: 32, threads: 256, dimChunks: 2, streamed: true}
  },
  // S2: S1's dK/dV; dQ 64 rows x 64 keys in 4 slices: 33280 B, 80 floats, 4x4 S tiles.
  {
    dkdv: {bc: 64, br: 32, threads: 256, dimChunks: 2, streamed: true},
    dq: {br: 64, bc: 64, threads: 256, dimChunks: 4, streamed: true}
  },
  // S3: sliced candidate A's tiles streamed: 20736 / 20736 B, 112 / 80 floats:
  // what residency is worth at A's shape.
  {
    dkdv: {bc: 32, br: 32, threads: 128, dimChunks: 2, streamed: true},
    dq: {br: 32, bc: 32, threads: 128, dimChunks: 2, streamed: true}
  },
  // S4: S1 in 4 slices: 20736 / 20992 B, 92 / 60 floats (half the prefetch),
  // twice the barriers.
  {
    dkdv: {bc: 64, br: 32, threads: 256, dimChunks: 4, streamed: true},
    dq: {br: 64, bc: 32, threads: 256, dimChunks: 4, streamed: true}
  },
  // S5, S6: S2's dQ with register-light dK/dV passes (S1's dK/dV pass fits one
  // workgroup per SM by its registers on the H100: docs/webgpu_tuning.md). One
  // slice, so that each key quad's lanes cover the head dim; 32 dK/dV
  // accumulator floats.
  // S5: 32 keys x 32 rows, 256 thr: 37120 B, 32 + 8 + 32 floats, 1x4 S tiles.
  {
    dkdv: {bc: 32, br: 32, threads: 256, dimChunks: 1, streamed: true},
    dq: {br: 64, bc: 64, threads: 256, dimChunks: 4, streamed: true}
  },
  // S6: 16 keys x 32 rows, 128 thr: 28928 B, 32 + 8 + 48 floats, 1x4 S tiles.
  {
    dkdv: {bc: 16, br: 32, threads: 128, dimChunks: 1, streamed: true},
    dq: {br: 64, bc: 64, threads: 256, dimChunks: 4, streamed: true}
  },
];

/**
 * Backward tiles tried before DKDV_SIZES / DQ_SIZES on hardware GPUs (a
 * software device keeps the size lists: it compiles these tiles slowly), the
 * first whose head dims, workgroup bytes and invocations fit. Head dims
 * 97..128: candidate S2 of STREAMED_GRAD_CANDIDATES, the fastest backward
 * in most D=128 rows of three H100 calls (benchmarks/RESULTS.md, "Session
 * 10"; docs/webgpu_tuning.md, "Streamed backward").
 */
export const GRAD_TILINGS: GradTilingChoice[] = [
  {tiles: STREAMED_GRAD_CANDIDATES[1], minHeadDim: 96, maxHeadDim: 128},
];

/**
 * The dS scratch (GradTiles.dsScratch; docs/webgpu_tuning.md, "dS
 * scratch"): the dK/dV pass stores its dS tiles and the dQ pass reads them
 * instead of recomputing S, P, dP and dS, for (batch, kv head) pairs in
 * chunks whose scratch stays within this many bytes (and the device's
 * buffer limits; a test hook, setDsScratchBudget, lowers it). 1 GiB: a
 * causal chunk needs many heads to fill the GPU (with 256 MiB, D=128
 * S=4096 H=16 ran in 4 chunks and lost the gain; benchmarks/RESULTS.md,
 * "Session 11, call 7").
 */
export const DS_SCRATCH_BUDGET_BYTES = 2 ** 30;

/** Problems the planner gives the dS scratch (on hardware GPUs). */
export interface DsScratchChoice {
  /** Head dims (both D and Dv) above this ... */
  minHeadDim: number;
  /** ... and up to this. */
  maxHeadDim: number;
  /** Keys per sequence at least. */
  minKeys: number;
  /** Also with a causal mask or a window (else only without). */
  masked: boolean;
  /** Tiles of the dS-reading dQ pass (GradTiles.dsDq); unset: the planned dQ tiles. */
  dsDq?: DqTiles;
  /** The chunks' budget instead of DS_SCRATCH_BUDGET_BYTES. */
  budgetBytes?: number;
}

/**
 * Where the planner turns the dS scratch on without a forced plan (hardware
 * GPUs only: software devices keep the recomputing dQ pass). Every head
 * dim up to 128, masked or not: on the H100 it was faster than the
 * recomputing dQ pass in every D=64 and D=128 row measured, causal and
 * not, S=1024..4096 and B=4 x H=32 (benchmarks/RESULTS.md, "Session 11,
 * call 7"; planned in "call 8 (continued)");
 * the scratch only removes work at other head dims too.
 */
export const DS_SCRATCH_PLANS: DsScratchChoice[] = [
  {minHeadDim: 0, maxHeadDim: 128, minKeys: 0, masked: true},
];

let dsScratchBudget: number|null = null;
/** Tests: lower the dS scratch budget (bytes); null restores DS_SCRATCH_BUDGET_BYTES. */
export function setDsScratchBudget(bytes: number|null): void {
  dsScratchBudget = bytes;
}
export function getDsScratchBudget(): number {
  return dsScratchBudget ?? DS_SCRATCH_BUDGET_BYTES;
}
/** Is the budget lowered (plans made under it are not kept)? */
export function dsScratchBudgetForced(): boolean {
  return dsScratchBudget != null;
}

/** Testing and benchmarking: force a forward plan (tiling, subgroups, splits). */
export interface ForwardOverride {
  tiles?: ForwardTiles;
  subgroups?: boolean;
  /** Testing only: skip the device-limit check, so the GPU rejects it. */
  ignoreLimits?: boolean;
  /** Force the register prefetch of K/V on or off. */
  prefetch?: boolean;
  /** Testing: constant loop bounds (the GPU code path) on any device. */
  constantLoops?: boolean;
  /** Split-KV: key-range splits per query tile (1: none). */
  splits?: number;
}

let forwardOverride: ForwardOverride|null = null;
/** Forces a forward plan until called with null. */
export function setForwardOverride(o: ForwardOverride|null): void {
  forwardOverride = o;
}
export function getForwardOverride(): ForwardOverride|null {
  return forwardOverride;
}
