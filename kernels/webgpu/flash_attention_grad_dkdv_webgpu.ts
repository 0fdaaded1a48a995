/**
 * Backward pass over key blocks: one workgroup holds BC keys of one
 * (batch, kv head) and accumulates their dK and dV in registers while it
 * walks every query row that can see them, for every query head of the
 * group (GQA/MQA: the group's gradients are summed here, in a fixed order,
 * with no atomics and no repeated K/V). P is recomputed from lse.
 *
 * Per block of BR query rows:
 *   S  = Q K^T, dP = dO V^T        (thread: MR rows x 4 adjacent keys)
 *   P  = exp(score(S) - lse), Pd = P * keep
 *   dV += Pd^T dO                  (thread: 4 keys x ND dims)
 *   dS = P * (dP * keep - Delta) * score' * scale
 *   dK += dS^T Q
 */
import type {OwnPipelineSpec} from './own_pipeline';
import {featureKey, GradFeatures, gradCommonWGSL, paramsWGSL} from './flash_attention_grad_wgsl';

export interface DkDvTiles {
  /** Keys per workgroup (multiple of 4). */
  bc: number;
  /** Query rows per step. */
  br: number;
  /** Invocations per workgroup. */
  threads: number;
}

/** Workgroup storage bytes of the program (must fit the device limit). */
export function dkdvStorageBytes(t: DkDvTiles, d: number, dv: number): number {
  return 4 * (t.bc * d + t.bc * dv + t.br * (d + 1) + t.br * (dv + 1) + t.br * t.bc + 2 * t.br);
}

/** Are the tiles consistent (every thread mapping divides evenly)? */
export function dkdvTilesValid(t: DkDvTiles): boolean {
  const sc = t.bc / 4;
  if (t.bc % 4 !== 0 || t.threads % sc !== 0) {
    return false;
  }
  const sr = Math.min(t.br, t.threads / sc);
  return t.br % sr === 0;
}

export class FlashAttentionGradDkDvProgram implements OwnPipelineSpec {
  readonly key: string;
  readonly numInputs: number;
  readonly numOutputs: number;
  readonly hasUniforms = true;
  private readonly source: string;

  constructor(d: number, dv: number, tiles: DkDvTiles, f: GradFeatures) {
    const {bc, br, threads} = tiles;
    const sc = bc / 4;                       // S phase: threads per row
    const sr = Math.min(br, threads / sc);   // S phase: rows of threads
    const mr = br / sr;                      // S phase: rows per thread
    const kt = sc;                           // accumulation: key quads
    const xt = threads / kt;                 // accumulation: dim stride
    const nd = Math.ceil(d / xt);
    const ndv = Math.ceil(dv / xt);
    this.key = `flashAttentionGradDkDv_${d}_${dv}_${bc}_${br}_${threads}_${featureKey(f)}`;
    const guard = (n: number, width: string) =>
        n % xt === 0 ? 'true' : `x < ${width}`;
    this.numInputs = f.alibi ? 6 : 5;
    this.numOutputs = 2;
    const out0 = this.numInputs;
    this.source = `${paramsWGSL(out0 + 2)}
@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read> stats: array<vec2<f32>>;  // (lse, Delta)
${f.alibi ? '@group(0) @binding(5) var<storage, read> slopes: array<f32>;' : ''}
@group(0) @binding(${out0}) var<storage, read_write> dk: array<f32>;
@group(0) @binding(${out0 + 1}) var<storage, read_write> dv: array<f32>;
${gradCommonWGSL(f)}
const D = ${d};
const DV = ${dv};
const DP = ${d + 1};
const DVP = ${dv + 1};
const BC = ${bc};
const BR = ${br};
const T = ${threads};
const SC = ${sc};
const MR = ${mr};
const XT = ${xt};

// K and V transposed, four keys per vec4: kT[x * SC + quad].
var<workgroup> kT: array<vec4<f32>, ${d * sc}>;
var<workgroup> vT: array<vec4<f32>, ${dv * sc}>;
// Query-side rows, padded by one so rows fall in different banks.
var<workgroup> qS: array<f32, ${br * (d + 1)}>;
var<workgroup> doS: array<f32, ${br * (dv + 1)}>;
// P * keep, then dS: pS[r * SC + quad].
var<workgroup> pS: array<vec4<f32>, ${br * sc}>;
var<workgroup> lseS: array<f32, BR>;
var<workgroup> deltaS: array<f32, BR>;

@compute @workgroup_size(T)
fn main(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let t = i32(lid);
  let j0 = i32(wg.x) * BC;
  let b = i32(wg.y) / p.headsKV;
  let hk = i32(wg.y) % p.headsKV;
  let groups = p.heads / p.headsKV;

  for (var e = t; e < SC * D; e += T) {
    let x = e % D;
    let quad = e / D;
    var kv = vec4<f32>(0.0);
    for (var c = 0; c < 4; c++) {
      let j = j0 + quad * 4 + c;
      if (j < p.seqK) {
        kv[c] = k[((b * p.seqK + j) * p.headsKV + hk) * D + x];
      }
    }
    kT[x * SC + quad] = kv;
  }
  for (var e = t; e < SC * DV; e += T) {
    let x = e % DV;
    let quad = e / DV;
    var vv = vec4<f32>(0.0);
    for (var c = 0; c < 4; c++) {
      let j = j0 + quad * 4 + c;
      if (j < p.seqK) {
        vv[c] = v[((b * p.seqK + j) * p.headsKV + hk) * DV + x];
      }
    }
    vT[x * SC + quad] = vv;
  }

  var dkAcc: array<vec4<f32>, ${nd}>;
  var dvAcc: array<vec4<f32>, ${ndv}>;
  for (var n = 0; n < ${nd}; n++) { dkAcc[n] = vec4<f32>(0.0); }
  for (var n = 0; n < ${ndv}; n++) { dvAcc[n] = vec4<f32>(0.0); }

  // Query rows that can see some key of this block.
  let off = p.seqK - p.seqQ;
  let jLast = min(j0 + BC, p.seqK) - 1;
  var iLo = 0;
  if (p.windowRight >= 0) { iLo = max(0, j0 - off - p.windowRight); }
  var iHi = p.seqQ - 1;
  if (p.windowLeft >= 0) { iHi = min(p.seqQ - 1, jLast - off + p.windowLeft); }

  let tc = t % SC;           // S phase: key quad
  let tr = t / SC;           // S phase: row group
  let sActive = tr * MR < BR;
  let kx = t % XT;           // accumulation: first dim
  let kq = t / XT;           // accumulation: key quad

  for (var g = 0; g < groups; g++) {
    let h = hk * groups + g;
    let sp = gradScoreParams(b, h);
    for (var i0 = iLo; i0 <= iHi; i0 += BR) {
      workgroupBarrier();
      for (var e = t; e < BR * D; e += T) {
        let r = e / D;
        let x = e % D;
        let i = i0 + r;
        var val = 0.0;
        if (i < p.seqQ) { val = q[((b * p.seqQ + i) * p.heads + h) * D + x]; }
        qS[r * DP + x] = val;
      }
      for (var e = t; e < BR * DV; e += T) {
        let r = e / DV;
        let x = e % DV;
        let i = i0 + r;
        var val = 0.0;
        if (i < p.seqQ) { val = dy[((b * p.seqQ + i) * p.heads + h) * DV + x]; }
        doS[r * DVP + x] = val;
      }
      for (var r = t; r < BR; r += T) {
        let i = i0 + r;
        var st = vec2<f32>(0.0);
        if (i < p.seqQ) { st = stats[(b * p.heads + h) * p.seqQ + i]; }
        lseS[r] = st.x;
        deltaS[r] = st.y;
      }
      workgroupBarrier();

      var ds: array<vec4<f32>, MR>;
      if (sActive) {
        var s: array<vec4<f32>, MR>;
        var dp: array<vec4<f32>, MR>;
        for (var m = 0; m < MR; m++) {
          s[m] = vec4<f32>(0.0);
          dp[m] = vec4<f32>(0.0);
        }
        for (var x = 0; x < D; x++) {
          let kv = kT[x * SC + tc];
          for (var m = 0; m < MR; m++) {
            s[m] += qS[(tr * MR + m) * DP + x] * kv;
          }
        }
        for (var x = 0; x < DV; x++) {
          let vv = vT[x * SC + tc];
          for (var m = 0; m < MR; m++) {
            dp[m] += doS[(tr * MR + m) * DVP + x] * vv;
          }
        }
        for (var m = 0; m < MR; m++) {
          let r = tr * MR + m;
          let i = i0 + r;
          let jq = j0 + tc * 4;
          ${f.dropout ? 'let keep = gradKeep4(b, h, i, jq);' : 'let keep = vec4<f32>(1.0);'}
          var pv = vec4<f32>(0.0);
          var dsv = vec4<f32>(0.0);
          for (var c = 0; c < 4; c++) {
            let j = jq + c;
            if (i < p.seqQ && fa_visible(i, j, sp)) {
              let sc = gradScore(s[m][c], i, j, sp);
              let prob = exp(sc.x - lseS[r]);
              pv[c] = prob * keep[c];
              dsv[c] = prob * (dp[m][c] * keep[c] - deltaS[r]) * sc.y * p.scale;
            }
          }
          pS[r * SC + tc] = pv;
          ds[m] = dsv;
        }
      }
      workgroupBarrier();
      for (var r = 0; r < BR; r++) {
        let pv = pS[r * SC + kq];
        for (var n = 0; n < ${ndv}; n++) {
          let x = kx + n * XT;
          if (${guard(dv, 'DV')}) {
            dvAcc[n] += pv * doS[r * DVP + x];
          }
        }
      }
      workgroupBarrier();
      if (sActive) {
        for (var m = 0; m < MR; m++) {
          pS[(tr * MR + m) * SC + tc] = ds[m];
        }
      }
      workgroupBarrier();
      for (var r = 0; r < BR; r++) {
        let dsv = pS[r * SC + kq];
        for (var n = 0; n < ${nd}; n++) {
          let x = kx + n * XT;
          if (${guard(d, 'D')}) {
            dkAcc[n] += dsv * qS[r * DP + x];
          }
        }
      }
    }
  }

  if (kq < SC) {
    for (var c = 0; c < 4; c++) {
      let j = j0 + kq * 4 + c;
      if (j < p.seqK) {
        let kBase = ((b * p.seqK + j) * p.headsKV + hk) * D;
        for (var n = 0; n < ${nd}; n++) {
          let x = kx + n * XT;
          if (x < D) { dk[kBase + x] = dkAcc[n][c]; }
        }
        let vBase = ((b * p.seqK + j) * p.headsKV + hk) * DV;
        for (var n = 0; n < ${ndv}; n++) {
          let x = kx + n * XT;
          if (x < DV) { dv[vBase + x] = dvAcc[n][c]; }
        }
      }
    }
  }
}
`;
  }

  code(): string {
    return this.source;
  }
}
