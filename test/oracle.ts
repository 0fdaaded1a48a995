/**
 * The float64 oracle: the formulas of docs/design.md, "Semantics", written out directly, one
 * (batch, head, query row) at a time, in plain TypeScript with no tfjs.
 * Every implementation of the package is compared with it.
 *
 * Layouts are the ops': q [B, Sq, H, D], k [B, Sk, Hk, D], v [B, Sk, Hk, Dv],
 * out [B, Sq, H, Dv], lse [B, H, Sq], all row-major.
 */
import {philox4x32} from '../src/dropout';

export interface OracleProblem {
  batch: number;
  seqQ: number;
  seqK: number;
  heads: number;
  headsKV: number;
  headDim: number;
  headDimV: number;
  q: Float64Array;
  k: Float64Array;
  v: Float64Array;
  /** `[H]` or `[B, H]` slopes, or null. */
  alibiSlopes: Float64Array|null;
}

/** The semantics, spelled as the user gives them (no normalization). */
export interface OracleOptions {
  causal?: boolean;
  softmaxScale?: number;
  windowSize?: [number, number];
  softcap?: number;
  dropoutRate?: number;
  seed?: number;
  /**
   * Added to b in the dropout keys: one sequence of a batch run alone
   * (batch 0 here) draws the bits of batch row `dropoutBatchOffset`.
   */
  dropoutBatchOffset?: number;
  /**
   * A key padding mask as lengths: batch row b sees keys j < keyLengths[b]
   * only; the causal/window/ALiBi diagonal stays at i + Sk - Sq.
   */
  keyLengths?: number[];
}

export interface OracleForward {
  out: Float64Array;
  lse: Float64Array;
}

export interface OracleGradients {
  dq: Float64Array;
  dk: Float64Array;
  dv: Float64Array;
}

/** Everything about one (b, h, i) row: the visible keys and their scores. */
interface RowScores {
  /** Visible key indices. */
  keys: number[];
  /** Final scores t_ij of the visible keys. */
  scores: number[];
  /** tanh(s / softcap) per visible key (for the softcap derivative). */
  capTanh: number[];
  /** Dropout multiplier per visible key (0 or 1 / (1 - rate)). */
  keep: number[];
}

function isVisible(i: number, j: number, p: OracleProblem, o: OracleOptions): boolean {
  const diagonal = i + p.seqK - p.seqQ;
  const [left, right] = o.windowSize ?? [-1, -1];
  const effectiveRight = o.causal ? 0 : right;
  if (left >= 0 && j < diagonal - left) {
    return false;
  }
  if (effectiveRight >= 0 && j > diagonal + effectiveRight) {
    return false;
  }
  return true;
}

function dropoutKeep(b: number, h: number, i: number, j: number, o: OracleOptions): number {
  const rate = o.dropoutRate ?? 0;
  if (rate === 0) {
    return 1;
  }
  const seed = o.seed ?? 0;
  const words = philox4x32(
      Math.floor(j / 4), i, h, b + (o.dropoutBatchOffset ?? 0), seed % 2 ** 32,
      Math.floor(seed / 2 ** 32), new Uint32Array(4));
  // The definition of src/dropout.ts, written out again.
  const threshold = Math.min(Math.floor(rate * 2 ** 32), 2 ** 32 - 1);
  return words[j % 4] >= threshold ? 1 / (1 - rate) : 0;
}

function rowScores(p: OracleProblem, o: OracleOptions, b: number, h: number, i: number): RowScores {
  const {seqQ, seqK, heads, headsKV, headDim: d} = p;
  const hk = Math.floor(h / (heads / headsKV));
  const scale = o.softmaxScale ?? 1 / Math.sqrt(d);
  const cap = o.softcap ?? 0;
  const row: RowScores = {keys: [], scores: [], capTanh: [], keep: []};
  for (let j = 0; j < seqK; j++) {
    if (!isVisible(i, j, p, o) || (o.keyLengths != null && j >= o.keyLengths[b])) {
      continue;
    }
    let dot = 0;
    for (let x = 0; x < d; x++) {
      dot +=
          p.q[((b * seqQ + i) * heads + h) * d + x] * p.k[((b * seqK + j) * headsKV + hk) * d + x];
    }
    let s = scale * dot;
    let capTanh = 0;
    if (cap > 0) {
      capTanh = Math.tanh(s / cap);
      s = cap * capTanh;
    }
    if (p.alibiSlopes != null) {
      const slope =
          p.alibiSlopes.length === heads ? p.alibiSlopes[h] : p.alibiSlopes[b * heads + h];
      s -= slope * Math.abs(i + seqK - seqQ - j);
    }
    row.keys.push(j);
    row.scores.push(s);
    row.capTanh.push(capTanh);
    row.keep.push(dropoutKeep(b, h, i, j, o));
  }
  return row;
}

function logSumExp(values: number[]): number {
  if (values.length === 0) {
    return -Infinity;
  }
  const max = Math.max(...values);
  let sum = 0;
  for (const x of values) {
    sum += Math.exp(x - max);
  }
  return max + Math.log(sum);
}

export function oracleForward(p: OracleProblem, o: OracleOptions): OracleForward {
  const {batch, seqQ, seqK, heads, headsKV, headDimV: dv} = p;
  const out = new Float64Array(batch * seqQ * heads * dv);
  const lse = new Float64Array(batch * heads * seqQ);
  for (let b = 0; b < batch; b++) {
    for (let h = 0; h < heads; h++) {
      const hk = Math.floor(h / (heads / headsKV));
      for (let i = 0; i < seqQ; i++) {
        const row = rowScores(p, o, b, h, i);
        const rowLse = logSumExp(row.scores);
        lse[(b * heads + h) * seqQ + i] = rowLse;
        const outBase = ((b * seqQ + i) * heads + h) * dv;
        row.keys.forEach((j, n) => {
          const weight = Math.exp(row.scores[n] - rowLse) * row.keep[n];
          for (let x = 0; x < dv; x++) {
            out[outBase + x] += weight * p.v[((b * seqK + j) * headsKV + hk) * dv + x];
          }
        });
      }
    }
  }
  return {out, lse};
}

/**
 * Gradients of `sum(out * dOut) + sum(lse * dLse)` with respect to q, k and
 * v (rows whose lse is -Infinity contribute nothing through dLse).
 */
export function oracleBackward(
    p: OracleProblem, o: OracleOptions, dOut: Float64Array, dLse: Float64Array): OracleGradients {
  const {batch, seqQ, seqK, heads, headsKV, headDim: d, headDimV: dv} = p;
  const scale = o.softmaxScale ?? 1 / Math.sqrt(d);
  const cap = o.softcap ?? 0;
  const dq = new Float64Array(p.q.length);
  const dk = new Float64Array(p.k.length);
  const dvOut = new Float64Array(p.v.length);
  for (let b = 0; b < batch; b++) {
    for (let h = 0; h < heads; h++) {
      const hk = Math.floor(h / (heads / headsKV));
      for (let i = 0; i < seqQ; i++) {
        const row = rowScores(p, o, b, h, i);
        if (row.keys.length === 0) {
          continue;
        }
        const rowLse = logSumExp(row.scores);
        const probs = row.scores.map(s => Math.exp(s - rowLse));
        const outBase = ((b * seqQ + i) * heads + h) * dv;
        // dL/dP_j (before dropout's multiplier is undone).
        const dProbs = row.keys.map((j, n) => {
          let dot = 0;
          for (let x = 0; x < dv; x++) {
            dot += dOut[outBase + x] * p.v[((b * seqK + j) * headsKV + hk) * dv + x];
          }
          return dot * row.keep[n];
        });
        // d/dt_j of the softmax: P_j (dP_j - sum_m P_m dP_m) + P_j dLse.
        let weighted = 0;
        probs.forEach((prob, n) => weighted += prob * dProbs[n]);
        const rowDLse = dLse[(b * heads + h) * seqQ + i];
        row.keys.forEach((j, n) => {
          const dScore = probs[n] * (dProbs[n] - weighted + rowDLse);
          const dRaw = (cap > 0 ? dScore * (1 - row.capTanh[n] ** 2) : dScore) * scale;
          const qBase = ((b * seqQ + i) * heads + h) * d;
          const kBase = ((b * seqK + j) * headsKV + hk) * d;
          for (let x = 0; x < d; x++) {
            dq[qBase + x] += dRaw * p.k[kBase + x];
            dk[kBase + x] += dRaw * p.q[qBase + x];
          }
          const vBase = ((b * seqK + j) * headsKV + hk) * dv;
          const weight = probs[n] * row.keep[n];
          for (let x = 0; x < dv; x++) {
            dvOut[vBase + x] += weight * dOut[outBase + x];
          }
        });
      }
    }
  }
  return {dq, dk, dv: dvOut};
}

/**
 * Rotary embedding of `x [B, S, H, D]` in float64: row (b, s) is rotated
 * by the angles of table row `positions[b * S + s]` (`cos`, `sin`:
 * `[Sro, half]`), the first `2 * half` features only; `interleaved` pairs
 * (2i, 2i+1), else (i, i + half).
 */
export function oracleRotary(
    x: Float64Array, shape: readonly number[], cos: Float64Array, sin: Float64Array, half: number,
    positions: readonly number[], interleaved: boolean): Float64Array {
  const [batch, seq, heads, d] = shape;
  const y = Float64Array.from(x);
  for (let b = 0; b < batch; b++) {
    for (let s = 0; s < seq; s++) {
      const pos = positions[b * seq + s];
      for (let h = 0; h < heads; h++) {
        const base = ((b * seq + s) * heads + h) * d;
        for (let i = 0; i < half; i++) {
          const [i1, i2] = interleaved ? [2 * i, 2 * i + 1] : [i, i + half];
          const c = cos[pos * half + i];
          const sn = sin[pos * half + i];
          y[base + i1] = x[base + i1] * c - x[base + i2] * sn;
          y[base + i2] = x[base + i2] * c + x[base + i1] * sn;
        }
      }
    }
  }
  return y;
}

/**
 * flash_attn_with_kvcache in float64: batch row b attends over its first
 * `cacheSeqlens[b]` cache rows followed by its new rows. Caches are
 * `[B, Smax, Hk, D|Dv]`, new rows `[B, Snew, Hk, D|Dv]` (already rotated),
 * q already rotated. `alibiSlopes` as in OracleProblem.
 */
export function oracleKVCache(
    dims: {
      batch: number,
      seqQ: number,
      seqMax: number,
      seqNew: number,
      heads: number,
      headsKV: number,
      headDim: number,
      headDimV: number
    },
    q: Float64Array, kCache: Float64Array, vCache: Float64Array, kNew: Float64Array|null,
    vNew: Float64Array|null, cacheSeqlens: readonly number[], alibiSlopes: Float64Array|null,
    o: OracleOptions): OracleForward {
  const {batch, seqQ, seqMax, seqNew, heads, headsKV, headDim: d, headDimV: dv} = dims;
  const out = new Float64Array(batch * seqQ * heads * dv);
  const lse = new Float64Array(batch * heads * seqQ);
  for (let b = 0; b < batch; b++) {
    const len = cacheSeqlens[b];
    const seqK = len + seqNew;
    const rows = (cache: Float64Array, fresh: Float64Array|null, width: number) => {
      const r = new Float64Array(seqK * headsKV * width);
      const rowSize = headsKV * width;
      r.set(cache.subarray(b * seqMax * rowSize, (b * seqMax + len) * rowSize));
      if (fresh != null) {
        r.set(fresh.subarray(b * seqNew * rowSize, (b + 1) * seqNew * rowSize), len * rowSize);
      }
      return r;
    };
    const slopes = alibiSlopes == null ? null :
        alibiSlopes.length === heads   ? alibiSlopes :
                                         alibiSlopes.subarray(b * heads, (b + 1) * heads);
    const qRow = q.subarray(b * seqQ * heads * d, (b + 1) * seqQ * heads * d);
    const result = seqK === 0 ? {
      out: new Float64Array(seqQ * heads * dv),
      lse: new Float64Array(heads * seqQ).fill(-Infinity)
    } :
                                oracleForward(
                                    {
                                      batch: 1,
                                      seqQ,
                                      seqK,
                                      heads,
                                      headsKV,
                                      headDim: d,
                                      headDimV: dv,
                                      q: qRow,
                                      k: rows(kCache, kNew, d),
                                      v: rows(vCache, vNew, dv),
                                      alibiSlopes: slopes,
                                    },
                                    o);
    out.set(result.out, b * seqQ * heads * dv);
    lse.set(result.lse, b * heads * seqQ);
  }
  return {out, lse};
}
