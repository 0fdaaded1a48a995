/**
 * The fused AdamW optimizer's persistent state on the GPU, shared by its
 * three programs: hyperparameters (written by the host only when they
 * change) and the step's progress (advanced on the GPU by the step program,
 * so no value is uploaded per training step).
 */
import {uniformStructWGSL} from './own_pipeline';

/** Field indices (4-byte words) of the state buffer. */
export const ADAMW_STATE = {
  learningRate: 0,
  beta1: 1,
  beta2: 2,
  oneMinusBeta1: 3,
  oneMinusBeta2: 4,
  epsilon: 5,
  weightDecay: 6,
  clipNorm: 7,
  step: 8,
  biasCorrection1: 9,
  biasCorrection2: 10,
  gradScale: 11,
  gradNorm: 12,
} as const;

/** Words of hyperparameters (the host's writes on change). */
export const ADAMW_HYPER_WORDS = 8;
/** Bytes of the state buffer (16 words). */
export const ADAMW_STATE_BYTES = 64;

/** Words (u32) of each program's uniform buffer. */
export const ADAMW_UNIFORM_WORDS = 4;

/**
 * The `Uniforms` struct of an AdamW program: its u32 `fields`, padded to
 * ADAMW_UNIFORM_WORDS (the buffers fused_adamw.ts writes are that size).
 */
export function adamWUniformsWGSL(fields: readonly string[]): string {
  const pads = Array.from({length: ADAMW_UNIFORM_WORDS - fields.length}, (_, i) => `pad${i}`);
  return uniformStructWGSL('Uniforms', [...fields, ...pads].map(f => [f, 'u32'] as const));
}

/** The WGSL struct matching ADAMW_STATE. */
export const ADAMW_STATE_STRUCT = `
struct AdamWState {
  learningRate: f32,
  beta1: f32,
  beta2: f32,
  oneMinusBeta1: f32,
  oneMinusBeta2: f32,
  epsilon: f32,
  weightDecay: f32,
  clipNorm: f32,
  step: u32,
  biasCorrection1: f32,
  biasCorrection2: f32,
  gradScale: f32,
  gradNorm: f32,
  pad0: f32,
  pad1: f32,
  pad2: f32,
};`;

/** Threads per workgroup of every AdamW program. */
export const ADAMW_WORKGROUP = 256;

/** WGSL: a workgroup sum of `value` over ADAMW_WORKGROUP threads. */
export function workgroupSumWGSL(): string {
  return `
var<workgroup> partialSums: array<f32, ${ADAMW_WORKGROUP}>;

fn workgroupSum(value: f32, lid: u32) -> f32 {
  partialSums[lid] = value;
  workgroupBarrier();
  for (var stride = ${ADAMW_WORKGROUP / 2}u; stride > 0u; stride = stride / 2u) {
    if (lid < stride) {
      partialSums[lid] = partialSums[lid] + partialSums[lid + stride];
    }
    workgroupBarrier();
  }
  return partialSums[0];
}`;
}
