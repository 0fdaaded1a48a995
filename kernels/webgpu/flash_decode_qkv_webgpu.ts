/**
 * The first pass of a decode step from the layer's (normalized) input: the
 * packed qkv projection `[K, (H + 2 Hk) D]` with its bias, rotary
 * embedding of the q and k heads at each token's position, and the append
 * of the new keys and values to the caches, in one dispatch. A decoded
 * token otherwise records a projection and a rotary (unpacking) pass per
 * layer; each dispatch costs more CPU time than its GPU work at one token.
 * (A pre-norm does not fit in too: with its residual, z and parameters the
 * pass would bind 12 storage buffers, over WebGPU's default limit of 8.)
 *
 * Each workgroup holds one row (token) in workgroup memory and one thread
 * per output column walks K as in dense_webgpu.ts. The thread of the first
 * column of a rotary pair also computes its partner column and writes
 * both rotated; the partner's own thread idles. Row r = b * Snew + s sits
 * at position starts[b] + s: q goes to its own tensor `[B, Snew, H, D]`,
 * k and v to cache row starts[b] + s of batch row b. The starts are in the
 * uniforms (nothing uploaded per step).
 *
 * Bindings (own_pipeline.ts): x, w, bias, cos, sin (x for the absent
 * ones); output q, then kCache and vCache written in place; uniforms.
 */
import {DENSE_THREADS} from './dense_webgpu';
import type {OwnPipelineSpec} from './own_pipeline';
import {UniformWriter} from './own_pipeline';

export const DECODE_QKV_UNIFORMS =
    ['rows', 'cols', 'colGroups', 'seqNew', 'heads', 'headsKV', 'seqMax', 'pad'] as const;

export interface DecodeQKVConfig {
  /** Row length K (the workgroup array's size). */
  inner: number;
  headDim: number;
  /** Rotated dims of each q and k head (0: no rotary). */
  rotaryDim: number;
  interleaved: boolean;
  bias: boolean;
  /** ceil(batch / 4): the starts are packed four to a uniform vec4. */
  batchVec4: number;
}

export interface DecodeQKVDims {
  rows: number;
  cols: number;
  seqNew: number;
  heads: number;
  headsKV: number;
  seqMax: number;
}

export class DecodeQKVProgram implements OwnPipelineSpec {
  readonly key: string;
  readonly numInputs = 5;
  /** q, then the two caches written in place. */
  readonly numOutputs = 3;
  readonly hasUniforms = true;
  readonly label = 'flash-decode-qkv';

  constructor(private readonly c: DecodeQKVConfig) {
    this.key = `decode-qkv-${c.inner}-${c.headDim}-${c.rotaryDim}-${+ c.interleaved}-${+ c.bias}-${
        c.batchVec4}`;
  }

  /** Workgroups: one per DENSE_THREADS columns of each row. */
  static workgroups(rows: number, cols: number): number {
    return rows * Math.ceil(cols / DENSE_THREADS);
  }

  /** The uniform bytes for these shapes and per-batch start rows. */
  uniforms(dims: DecodeQKVDims, starts: readonly number[]): ArrayBuffer {
    const bytes = 4 * DECODE_QKV_UNIFORMS.length + 16 * this.c.batchVec4;
    const w = new UniformWriter(new ArrayBuffer(bytes));
    w.i32(dims.rows).i32(dims.cols).i32(Math.ceil(dims.cols / DENSE_THREADS)).i32(dims.seqNew);
    w.i32(dims.heads).i32(dims.headsKV).i32(dims.seqMax).i32(0);
    for (let b = 0; b < 4 * this.c.batchVec4; b++) {
      w.i32(b < starts.length ? starts[b] : 0);
    }
    return w.finish();
  }

  readonly code = (): string => {
    const {inner, headDim, rotaryDim, interleaved, bias, batchVec4} = this.c;
    // The pair of column `col` (head dim d): is it the first of the pair,
    // its partner column, and the table column j.
    const pair = interleaved ? `
    first = (d & 1) == 0;
    partner = col + 1;
    j = d / 2;` :
                               `
    first = d < HALF;
    partner = col + HALF;
    j = d;`;
    return `
struct Uniforms {
${DECODE_QKV_UNIFORMS.map(n => `  ${n}: i32,`).join('\n')}
  starts: array<vec4<i32>, ${batchVec4}>,
}
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read> cosTable: array<f32>;
@group(0) @binding(4) var<storage, read> sinTable: array<f32>;
@group(0) @binding(5) var<storage, read_write> q: array<f32>;
@group(0) @binding(6) var<storage, read_write> kCache: array<f32>;
@group(0) @binding(7) var<storage, read_write> vCache: array<f32>;
@group(0) @binding(8) var<uniform> u: Uniforms;

const K = ${inner};
const D = ${headDim};
const ROT = ${rotaryDim};
const HALF = ${rotaryDim / 2};
const WG = ${DENSE_THREADS};
var<workgroup> xs: array<f32, K>;

// Column col of row (b, s) of the packed projection: a q head to q, a k
// or v head to its cache at row start + s.
fn store(col: i32, value: f32, row: i32, b: i32, s: i32, start: i32) {
  let head = col / D;
  let d = col % D;
  if (head < u.heads) {
    q[(row * u.heads + head) * D + d] = value;
  } else if (head < u.heads + u.headsKV) {
    kCache[((b * u.seqMax + start + s) * u.headsKV + head - u.heads) * D + d] = value;
  } else {
    vCache[((b * u.seqMax + start + s) * u.headsKV + head - u.heads - u.headsKV) * D + d] = value;
  }
}

@compute @workgroup_size(${DENSE_THREADS})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let group = i32(wid.x + wid.y * nwg.x);
  let row = group / u.colGroups;
  if (row >= u.rows) { return; }  // whole workgroups: uniform
  let colGroup = group % u.colGroups;
  let tid = i32(lid);
  for (var c = tid; c < K; c += WG) { xs[c] = x[row * K + c]; }
  workgroupBarrier();
  let col = colGroup * WG + tid;
  if (col >= u.cols) { return; }
  let d = col % D;
  let rotated = d < ROT && col / D < u.heads + u.headsKV;
  var first = true;
  var partner = col;
  var j = 0;
  if (rotated) {${pair}
    if (!first) { return; }  // the first of the pair writes both
  }
  var acc = 0.0;
  var accPartner = 0.0;
  for (var k = 0; k < K; k++) {
    let xk = xs[k];
    acc += xk * w[k * u.cols + col];
    accPartner += xk * w[k * u.cols + partner];
  }
${
        bias ? `  acc += bias[col];
  accPartner += bias[partner];` :
               ''}
  let b = row / u.seqNew;
  let s = row % u.seqNew;
  let start = u.starts[b / 4][b % 4];
  if (rotated) {
    let t = (start + s) * HALF + j;
    let c = cosTable[t];
    let sn = sinTable[t];
    store(col, acc * c - accPartner * sn, row, b, s, start);
    store(partner, accPartner * c + acc * sn, row, b, s, start);
  } else {
    store(col, acc, row, b, s, start);
  }
}
`;
  };
}
