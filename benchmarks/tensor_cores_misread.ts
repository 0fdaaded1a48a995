/**
 * What the tensor-core forward computes when its matrix loads read each
 * row of an operand array a few f16 elements early, as a load from an
 * array placed 8 bytes off its 16-byte alignment does (docs/tensor_cores.md).
 * Emulates the forward's tiling (kernels/webgpu/flash_attention_subgroup_matrix_webgpu.ts:
 * M = N = K = 16 blocks, subgroup g owning rows g*16.., online softmax per
 * key tile, P V per tile) in float64 on the first three problems of
 * `tensor_cores.mjs` (same generator, same seed), with the rows of Q, of
 * K/V (one array) and of P shifted or not, and prints out/lse errors
 * against the float64 oracle in the check's metric. No GPU needed:
 *
 *   node tensor_cores_misread.mjs [--plans]
 *
 * --plans adds the tilings `tensor_cores.mjs --forward-plans` checks.
 */
import {randomArray, Rng} from '../test/harness/problems';
import {oracleForward, OracleProblem} from '../test/oracle';

/** Elements each matrix row is read early, per workgroup array. */
interface Misread {
  q: number;
  kv: number;
  p: number;
}

/** The plans the planner picks on an H100 (benchmarks/RESULTS.md, session 6, call B). */
interface Plan {
  subgroups: number;
  bc: number;
}

function relError(a: ArrayLike<number>, e: ArrayLike<number>): number {
  let maxRef = 0;
  let maxErr = 0;
  for (let i = 0; i < e.length; i++) {
    maxRef = Math.max(maxRef, Math.abs(e[i]));
    maxErr = Math.max(maxErr, Math.abs(a[i] - e[i]));
  }
  return maxErr / maxRef;
}

/** The forward of one (causal or not) problem, B = 1, with matrix rows misread. */
function emulate(p: OracleProblem, causal: boolean, plan: Plan, shift: Misread) {
  const {seqQ, seqK, heads, headsKV, headDim: d, headDimV: dv} = p;
  const B = 16;
  const br = B * plan.subgroups;
  const bc = plan.bc;
  const scale = 1 / Math.sqrt(d);
  const out = new Float64Array(seqQ * heads * dv);
  const lse = new Float64Array(heads * seqQ);
  // Outside an array: what lies before it is unknown; 0 here.
  const at = (a: Float64Array, i: number) => i >= 0 && i < a.length ? a[i] : 0;
  // (A B) of one 16 x 16 block: A row-major at aOff (stride aS), B read
  // through `b(k, n)`.
  const block =
      (a: Float64Array, aOff: number, aS: number, depth: number,
       b: (k: number, n: number) => number, shiftA: number) => {
        const acc = new Float64Array(B * B);
        for (let i = 0; i < B; i++) {
          for (let n = 0; n < B; n++) {
            for (let k = 0; k < depth; k++) {
              acc[i * B + n] += at(a, aOff + i * aS + k - shiftA) * b(k, n);
            }
          }
        }
        return acc;
      };
  for (let h = 0; h < heads; h++) {
    const hk = Math.floor(h / (heads / headsKV));
    for (let r0 = 0; r0 < seqQ; r0 += br) {
      const q = new Float64Array(br * d);
      for (let i = 0; i < br && r0 + i < seqQ; i++) {
        q.set(p.q.subarray(((r0 + i) * heads + h) * d, ((r0 + i) * heads + h + 1) * d), i * d);
      }
      const m = new Float64Array(br).fill(-1e30);
      const l = new Float64Array(br);
      const o = new Float64Array(br * dv);
      for (let j0 = 0; j0 < seqK; j0 += bc) {
        const kt = new Float64Array(bc * Math.max(d, dv));
        const vt = new Float64Array(bc * Math.max(d, dv));
        for (let j = 0; j < bc && j0 + j < seqK; j++) {
          const row = (j0 + j) * headsKV + hk;
          kt.set(p.k.subarray(row * d, (row + 1) * d), j * d);
          vt.set(p.v.subarray(row * dv, (row + 1) * dv), j * dv);
        }
        const s = new Float64Array(br * bc);
        for (let g = 0; g < plan.subgroups; g++) {
          for (let cb = 0; cb < bc / B; cb++) {
            // K^T column-major: key j's row of D elements, read shift early.
            const kCol = (k: number, n: number) => at(kt, (cb * B + n) * d + k - shift.kv);
            const acc = block(q, g * B * d, d, d, kCol, shift.q);
            for (let i = 0; i < B; i++) {
              for (let n = 0; n < B; n++) {
                s[(g * B + i) * bc + cb * B + n] = acc[i * B + n];
              }
            }
          }
        }
        const pt = new Float64Array(br * bc);
        for (let i = 0; i < br; i++) {
          const row = r0 + i;
          let mx = -1e30;
          for (let j = 0; j < bc; j++) {
            const key = j0 + j;
            const visible = key < seqK && (!causal || key <= row + seqK - seqQ);
            s[i * bc + j] = visible ? s[i * bc + j] * scale : -1e30;
            mx = Math.max(mx, s[i * bc + j]);
          }
          const mNew = Math.max(m[i], mx);
          const mUse = mNew < -1e29 ? 0 : mNew;
          const alpha = Math.exp(m[i] - mUse);
          m[i] = mNew;
          l[i] *= alpha;
          for (let j = 0; j < bc; j++) {
            pt[i * bc + j] = Math.exp(s[i * bc + j] - mUse);
            l[i] += pt[i * bc + j];
          }
          for (let n = 0; n < dv; n++) {
            o[i * dv + n] *= alpha;
          }
        }
        for (let g = 0; g < plan.subgroups; g++) {
          for (let cb = 0; cb < dv / B; cb++) {
            // V row-major: key k's row of Dv elements, read shift early.
            const vRow = (k: number, n: number) => at(vt, k * dv + cb * B + n - shift.kv);
            const acc = block(pt, g * B * bc, bc, bc, vRow, shift.p);
            for (let i = 0; i < B; i++) {
              for (let n = 0; n < B; n++) {
                o[(g * B + i) * dv + cb * B + n] += acc[i * B + n];
              }
            }
          }
        }
      }
      for (let i = 0; i < br && r0 + i < seqQ; i++) {
        lse[h * seqQ + r0 + i] = m[i] + Math.log(l[i]);
        for (let n = 0; n < dv; n++) {
          out[((r0 + i) * heads + h) * dv + n] = o[i * dv + n] / l[i];
        }
      }
    }
  }
  return {out, lse};
}

function main(): void {
  const cases: Array<[string, number, number, number, number, boolean, Plan]> = [
    ['plain S=256 D=64', 256, 2, 2, 64, false, {subgroups: 4, bc: 32}],
    ['causal S=300 D=64 GQA 4/2', 300, 4, 2, 64, true, {subgroups: 4, bc: 32}],
    ['causal S=200 D=128', 200, 2, 2, 128, true, {subgroups: 2, bc: 32}],
  ];
  const shifts: Array<[string, Misread]> = [
    ['aligned', {q: 0, kv: 0, p: 0}],
    ['K/V and P rows 4 early', {q: 0, kv: 4, p: 4}],
    ['Q, K/V and P rows 4 early', {q: 4, kv: 4, p: 4}],
  ];
  // tensor_cores.ts's problems: same seed, same order of draws.
  const rng = new Rng(12345);
  // --plans: also the tilings of `tensor_cores.mjs --forward-plans` (an
  // override sets subgroups, keys per tile or both; the other defaults to 2
  // subgroups, 32 keys).
  const overrides: Array<Partial<Plan>> = process.argv.includes('--plans') ?
      [{}, {subgroups: 1}, {subgroups: 2}, {bc: 16}, {bc: 64}, {subgroups: 1, bc: 16}] :
      [{}];
  console.log(`| case | plan | ${shifts.map(([name]) => `${name}: out, lse`).join(' | ')} |`);
  console.log(`|${' --- |'.repeat(shifts.length + 2)}`);
  for (const [name, seq, heads, headsKV, d, causal, planned] of cases) {
    const p: OracleProblem = {
      batch: 1,
      seqQ: seq,
      seqK: seq,
      heads,
      headsKV,
      headDim: d,
      headDimV: d,
      q: randomArray(seq * heads * d, rng),
      k: randomArray(seq * headsKV * d, rng),
      v: randomArray(seq * headsKV * d, rng),
      alibiSlopes: null,
    };
    const expected = oracleForward(p, {causal});
    randomArray(expected.out.length, rng);  // tensor_cores.ts's dOut
    for (const o of overrides) {
      const plan =
          Object.keys(o).length === 0 ? planned : {subgroups: o.subgroups ?? 2, bc: o.bc ?? 32};
      const cells = shifts.map(([, shift]) => {
        const r = emulate(p, causal, plan, shift);
        return `${relError(r.out, expected.out).toExponential(2)}, ${
            relError(r.lse, expected.lse).toExponential(2)}`;
      });
      const label = Object.keys(o).length === 0 ? 'planned' : JSON.stringify(o);
      console.log(`| ${name} | ${label}: ${plan.subgroups} x ${plan.bc} | ${cells.join(' | ')} |`);
    }
  }
}

main();
