/**
 * The oracle checked against itself: its backward against central finite
 * differences of its forward (in float64), and the dropout bits against
 * Philox's published known answers.
 */
import {dropoutThreshold, philox4x32} from '../src/dropout';

import {freshRng, ProblemShape, randomArray, randomOracleProblem, Rng} from './harness/problems';
import {OracleOptions, OracleProblem, oracleBackward, oracleForward} from './oracle';

/** sum(out * dOut) + sum over finite lse of lse * dLse. */
function loss(p: OracleProblem, o: OracleOptions, dOut: Float64Array, dLse: Float64Array): number {
  const {out, lse} = oracleForward(p, o);
  let total = 0;
  out.forEach((x, i) => total += x * dOut[i]);
  lse.forEach((x, i) => total += Number.isFinite(x) ? x * dLse[i] : 0);
  return total;
}

function finiteDifference(
    p: OracleProblem, o: OracleOptions, dOut: Float64Array, dLse: Float64Array,
    which: 'q'|'k'|'v'): Float64Array {
  const x = p[which];
  const grad = new Float64Array(x.length);
  const h = 1e-6;
  for (let i = 0; i < x.length; i++) {
    const saved = x[i];
    x[i] = saved + h;
    const up = loss(p, o, dOut, dLse);
    x[i] = saved - h;
    const down = loss(p, o, dOut, dLse);
    x[i] = saved;
    grad[i] = (up - down) / (2 * h);
  }
  return grad;
}

const CASES: Array<{name: string, shape: Partial<ProblemShape>, opts: OracleOptions}> = [
  {name: 'plain', shape: {}, opts: {}},
  {name: 'causal, Sq < Sk', shape: {seqQ: 3, seqK: 5}, opts: {causal: true}},
  {name: 'causal, Sq > Sk (masked rows)', shape: {seqQ: 5, seqK: 3}, opts: {causal: true}},
  {name: 'window', shape: {seqQ: 5, seqK: 5}, opts: {windowSize: [1, 1]}},
  {name: 'softcap + scale', shape: {}, opts: {softcap: 0.8, softmaxScale: 0.9}},
  {name: 'alibi per batch', shape: {alibi: 'batch'}, opts: {}},
  {name: 'GQA', shape: {heads: 4, headsKV: 2}, opts: {causal: true}},
  {name: 'dropout', shape: {}, opts: {dropoutRate: 0.3, seed: 12345}},
  {name: 'Dv != D', shape: {headDim: 3, headDimV: 5}, opts: {}},
];

describe('float64 oracle', () => {
  for (const c of CASES) {
    it(`backward matches finite differences: ${c.name}`, () => {
      const rng = freshRng();
      const shape: ProblemShape = {
        batch: 2,
        seqQ: 4,
        seqK: 4,
        heads: 2,
        headsKV: 2,
        headDim: 4,
        headDimV: 4,
        ...c.shape,
      };
      const oracle = randomOracleProblem(shape, rng);
      const {out, lse} = oracleForward(oracle, c.opts);
      const dOut = randomArray(out.length, rng);
      const dLse = randomArray(lse.length, rng);
      const grads = oracleBackward(oracle, c.opts, dOut, dLse);
      for (const which of ['q', 'k', 'v'] as const) {
        const numeric = finiteDifference(oracle, c.opts, dOut, dLse, which);
        const analytic = grads[which === 'q' ? 'dq' : which === 'k' ? 'dk' : 'dv'];
        let maxRef = 0, maxErr = 0;
        numeric.forEach((n, i) => {
          maxRef = Math.max(maxRef, Math.abs(n));
          maxErr = Math.max(maxErr, Math.abs(n - analytic[i]));
        });
        expect(maxRef).toBeGreaterThan(0);
        if (maxErr / maxRef > 1e-6) {
          throw new Error(
              `d${which}: finite-difference mismatch ${maxErr / maxRef} (seed ${rng.seed})`);
        }
      }
    });
  }

  it('gives 0 output and -Infinity lse to rows that see no key', () => {
    const rng = freshRng();
    const shape = {batch: 1, seqQ: 5, seqK: 2, heads: 1, headsKV: 1, headDim: 3, headDimV: 3};
    const oracle = randomOracleProblem(shape, rng);
    const {out, lse} = oracleForward(oracle, {causal: true});
    // Bottom-right causal: row i sees keys j <= i - 3, so rows 0..2 see none.
    expect(Array.from(lse.slice(0, 3))).toEqual([-Infinity, -Infinity, -Infinity]);
    expect(Array.from(out.slice(0, 9)).every(x => x === 0)).toBe(true);
    expect(Number.isFinite(lse[3]) && Number.isFinite(lse[4])).toBe(true);
  });
});

describe('dropout bits (Philox4x32-10)', () => {
  it('matches the Random123 known-answer vectors', () => {
    const out = new Uint32Array(4);
    expect(Array.from(philox4x32(0, 0, 0, 0, 0, 0, out))).toEqual([
      0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8
    ]);
    expect(Array.from(philox4x32(
               0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, out)))
        .toEqual([0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
    expect(Array.from(philox4x32(
               0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0, out)))
        .toEqual([0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]);
  });

  it('drops about the requested fraction, independently of the seed', () => {
    const rng = new Rng(Math.floor(Math.random() * 2 ** 32));
    const rate = 0.3;
    const threshold = dropoutThreshold(rate);
    const out = new Uint32Array(4);
    let dropped = 0;
    const n = 40000;
    const seed = rng.int(0, 2 ** 31);
    for (let c = 0; c < n / 4; c++) {
      philox4x32(c, c % 7, 1, 2, seed, 0, out);
      out.forEach(w => dropped += w < threshold ? 1 : 0);
    }
    // 5 standard deviations of a binomial(40000, 0.3).
    expect(Math.abs(dropped / n - rate)).toBeLessThan(5 * Math.sqrt(rate * (1 - rate) / n));
    expect(dropoutThreshold(0)).toBe(0);
  });
});
