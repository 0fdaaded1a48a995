/**
 * Reads a problem (JSON on stdin: shapes, q, k, v, slopes, dOut, dLse,
 * options) and writes the float64 oracle's out, lse, dq, dk, dv as JSON.
 * Used by test/cuda/reference_vs_oracle.py to check that the numpy
 * reference of the GPU checks computes exactly test/oracle.ts's function.
 */
import {readFileSync} from 'fs';

import {oracleBackward, oracleForward} from '../oracle';

const input = JSON.parse(readFileSync(0, 'utf8'));
const f64 = (a: number[]|null) => a == null ? null : Float64Array.from(a);
const problem = {
  ...input.shape,
  q: f64(input.q)!,
  k: f64(input.k)!,
  v: f64(input.v)!,
  alibiSlopes: f64(input.alibi),
};
const fwd = oracleForward(problem, input.options);
const bwd = oracleBackward(problem, input.options, f64(input.dOut)!, f64(input.dLse)!);
const plain = (a: Float64Array) => Array.from(a, x => Number.isFinite(x) ? x : String(x));
process.stdout.write(JSON.stringify({
  out: plain(fwd.out),
  lse: plain(fwd.lse),
  dq: plain(bwd.dq),
  dk: plain(bwd.dk),
  dv: plain(bwd.dv),
}));
