/**
 * The FlashAttentionGrad kernel alone, fed the float64 oracle's forward
 * outputs (out, lse) for a fresh problem: what the backward tests of each
 * fused path compare against the oracle's gradients.
 */
import * as tf from '@tensorflow/tfjs-core';

import {FlashAttentionGrad} from '../../src';
import {normalizeOptions} from '../../src/options';
import {checkOwnPipelineErrors} from '../../kernels/webgpu/own_pipeline';
import {oracleBackward, oracleForward, OracleGradients, OracleOptions} from '../oracle';

import {makeProblem, ProblemShape, randomArray, Rng} from './problems';

export interface GradRun {
  dq: Float32Array;
  dk: Float32Array;
  dv: Float32Array;
}

export interface GradKernelRunOptions {
  inputScale?: number;
  /** Kernel runs on the same inputs (determinism checks). */
  repeats?: number;
  /** Attributes beyond the normalized options (e.g. precision). */
  extraAttrs?: Record<string, unknown>;
  /**
   * Called before each run; the function it returns is called after the
   * run's gradients are read (the caller's dispatch-count checks).
   */
  aroundRun?: () => () => void;
  /** A factor on every dOut element of query row `row` (uneven dynamic range across rows). */
  dOutRowScale?: (row: number) => number;
}

/** The gradients of each run and the oracle's, for upstream dOut and dLse drawn from `rng`. */
export async function runGradKernelOnOracle(
    shape: ProblemShape, opts: OracleOptions, rng: Rng,
    options: GradKernelRunOptions = {}): Promise<{runs: GradRun[], expected: OracleGradients}> {
  const problem = makeProblem(shape, rng, options.inputScale);
  const {batch, seqQ, heads, headDimV} = shape;
  const forward = oracleForward(problem.oracle, opts);
  const dOut = randomArray(forward.out.length, rng);
  const rowScale = options.dOutRowScale;
  if (rowScale != null) {
    // dOut is [B, Sq, H, Dv]: element e is in query row (e / (H Dv)) mod Sq.
    dOut.forEach((x, e) => {
      dOut[e] = x * rowScale(Math.floor(e / (heads * headDimV)) % seqQ);
    });
  }
  const dLse = randomArray(forward.lse.length, rng);
  const attrs = {...normalizeOptions(opts, shape.headDim, 'test'), ...options.extraAttrs};
  const tensors = {
    dy: tf.tensor4d(Float32Array.from(dOut), [batch, seqQ, heads, headDimV]),
    dLse: tf.tensor3d(Float32Array.from(dLse), [batch, heads, seqQ]),
    q: problem.q,
    k: problem.k,
    v: problem.v,
    out: tf.tensor4d(Float32Array.from(forward.out), [batch, seqQ, heads, headDimV]),
    softmaxLse: tf.tensor3d(Float32Array.from(forward.lse), [batch, heads, seqQ]),
    alibiSlopes: problem.alibiSlopes ?? tf.zeros([0]),
  };
  const runs: GradRun[] = [];
  try {
    for (let n = 0; n < (options.repeats ?? 1); n++) {
      const afterRun = options.aroundRun?.();
      const grads = tf.engine().runKernel(
                        FlashAttentionGrad, tensors as unknown as tf.NamedTensorMap,
                        attrs as unknown as tf.NamedAttrMap) as tf.Tensor[];
      const [dq, dk, dv] = await Promise.all(grads.map(g => g.data() as Promise<Float32Array>));
      tf.dispose(grads);
      await checkOwnPipelineErrors();
      afterRun?.();
      runs.push({dq, dk, dv});
    }
  } finally {
    problem.dispose();
    tf.dispose([tensors.dy, tensors.dLse, tensors.out, tensors.softmaxLse]);
    if (problem.alibiSlopes == null) {
      tensors.alibiSlopes.dispose();
    }
  }
  return {runs, expected: oracleBackward(problem.oracle, opts, dOut, dLse)};
}
