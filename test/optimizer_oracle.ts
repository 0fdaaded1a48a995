/**
 * The float64 oracle of Adam and AdamW (decoupled weight decay, optional
 * clipping by global norm), written out per element in plain TypeScript.
 */

export interface AdamWOracleConfig {
  learningRate: number;
  beta1: number;
  beta2: number;
  epsilon: number;
  weightDecay: number;
  /** null or 0: no clipping. */
  clipNorm: number|null;
}

export interface AdamWOracleState {
  params: Float64Array[];
  m: Float64Array[];
  v: Float64Array[];
  step: number;
  /** Global gradient norm of the last step (before clipping). */
  gradNorm: number;
}

export function adamWOracleInit(params: Float64Array[]): AdamWOracleState {
  return {
    params: params.map(p => Float64Array.from(p)),
    m: params.map(p => new Float64Array(p.length)),
    v: params.map(p => new Float64Array(p.length)),
    step: 0,
    gradNorm: 0,
  };
}

/** One step in place; `grads[i]` belongs to `state.params[i]`. */
export function adamWOracleStep(
    state: AdamWOracleState, grads: Float64Array[], c: AdamWOracleConfig): void {
  state.step++;
  let sumSquares = 0;
  for (const g of grads) {
    for (const x of g) {
      sumSquares += x * x;
    }
  }
  const norm = Math.sqrt(sumSquares);
  state.gradNorm = norm;
  const scale = c.clipNorm != null && c.clipNorm > 0 ? c.clipNorm / Math.max(norm, c.clipNorm) : 1;
  const c1 = 1 - Math.pow(c.beta1, state.step);
  const c2 = 1 - Math.pow(c.beta2, state.step);
  grads.forEach((grad, k) => {
    const p = state.params[k];
    const m = state.m[k];
    const v = state.v[k];
    for (let i = 0; i < p.length; i++) {
      const g = grad[i] * scale;
      m[i] = c.beta1 * m[i] + (1 - c.beta1) * g;
      v[i] = c.beta2 * v[i] + (1 - c.beta2) * g * g;
      const adam = (m[i] / c1) / (Math.sqrt(v[i] / c2) + c.epsilon);
      p[i] = p[i] - c.learningRate * c.weightDecay * p[i] - c.learningRate * adam;
    }
  });
}
