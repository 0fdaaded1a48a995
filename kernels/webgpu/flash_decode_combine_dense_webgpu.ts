/**
 * The second pass of split-KV decoding merged with the layer's output
 * projection: y = concat_h(out_h) w + bias for each query token, where
 * out_h is the merge of the splits' partial results of head h (as in
 * flash_decode_combine_webgpu.ts). A decoded layer otherwise records a
 * combine pass and a matMul; each dispatch costs more CPU time than its
 * GPU work at one token.
 *
 * Each workgroup takes one token and DENSE_THREADS output columns: it first
 * merges the token's H x Dv attention outputs into workgroup memory (every
 * workgroup of the token recomputes them: H x numSplits x Dv partial values,
 * cheap), then each thread walks K = H Dv for its column as in
 * dense_webgpu.ts. A head whose splits saw no key gives 0. No LSE.
 *
 * Bindings (own_pipeline.ts): partAcc [T H, splits, Dv], partMaxSum
 * [T H, splits, 2], w [H Dv, N], bias (partAcc when absent); output y
 * [T, N]; uniforms.
 */
import {DENSE_THREADS} from './dense_webgpu';
import type {OwnPipelineSpec} from './own_pipeline';
import {FA_NEG_BIG} from './wgsl_snippets';

export const DECODE_COMBINE_DENSE_UNIFORMS = ['tokens', 'cols', 'colGroups', 'numSplits'] as const;

export class DecodeCombineDenseProgram implements OwnPipelineSpec {
  readonly key: string;
  readonly numInputs = 4;
  readonly numOutputs = 1;
  readonly hasUniforms = true;
  readonly label = 'flash-decode-combine-dense';

  constructor(readonly heads: number, readonly headDimV: number, readonly bias: boolean) {
    this.key = `decode-combine-dense-${heads}-${headDimV}-${+ bias}`;
  }

  /** Workgroups: one per DENSE_THREADS columns of each token. */
  static workgroups(tokens: number, cols: number): number {
    return tokens * Math.ceil(cols / DENSE_THREADS);
  }

  readonly code = (): string => `
struct Uniforms { tokens: i32, cols: i32, colGroups: i32, numSplits: i32 }
@group(0) @binding(0) var<storage, read> partAcc: array<f32>;
@group(0) @binding(1) var<storage, read> partMaxSum: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<uniform> u: Uniforms;

const H = ${this.heads};
const DV = ${this.headDimV};
const K = ${this.heads * this.headDimV};
const WG = ${DENSE_THREADS};
var<workgroup> att: array<f32, K>;

@compute @workgroup_size(${DENSE_THREADS})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let group = i32(wid.x + wid.y * nwg.x);
  let token = group / u.colGroups;
  if (token >= u.tokens) { return; }  // whole workgroups: uniform
  let colGroup = group % u.colGroups;
  let tid = i32(lid);
  // Element e = h * DV + d of the token's attention output: the splits of
  // row token * H + h merged (max, then the rescaled sums).
  for (var e = tid; e < K; e += WG) {
    let base = (token * H + e / DV) * u.numSplits;
    var m = ${FA_NEG_BIG};
    for (var s = 0; s < u.numSplits; s++) { m = max(m, partMaxSum[2 * (base + s)]); }
    var total = 0.0;
    var o = 0.0;
    for (var s = 0; s < u.numSplits; s++) {
      let scale = exp(partMaxSum[2 * (base + s)] - m);
      total += partMaxSum[2 * (base + s) + 1] * scale;
      o += partAcc[(base + s) * DV + e % DV] * scale;
    }
    att[e] = select(0.0, o / total, total > 0.0);
  }
  workgroupBarrier();
  let col = colGroup * WG + tid;
  if (col >= u.cols) { return; }
  var acc = 0.0;
  for (var k = 0; k < K; k++) {
    acc += att[k] * w[k * u.cols + col];
  }
  y[token * u.cols + col] = acc${this.bias ? ' + bias[col]' : ''};
}
`;
}
