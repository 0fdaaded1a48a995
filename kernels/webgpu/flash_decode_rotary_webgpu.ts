/**
 * Rotary embedding of a decode step's q `[B, Sq, H, D]` and new keys
 * `[B, Snew, Hk, D]` in one dispatch, before the new keys are appended to
 * the cache: batch row b's token s is rotated by table row
 * `starts[b] + s` (or `starts[b]` for every q row when `qSameRow`,
 * flash_attn's non-causal, non-local q). The starts are in the uniforms, so
 * a step uploads nothing. Pairs are (i, i + rotaryDim/2), or (2i, 2i + 1)
 * interleaved; dims past rotaryDim are copied.
 *
 * Bindings: q, k (q again when there are no new keys), cos, sin
 * `[Sro, rotaryDim / 2]`; outputs qRot, kRot (absent without new keys);
 * uniforms.
 */
import {dispatchGrid, OwnPipelineSpec, UniformWriter} from './own_pipeline';

const THREADS = 64;

export const DECODE_ROTARY_UNIFORMS =
    ['qSize', 'kSize', 'seqQ', 'heads', 'seqNew', 'headsKV', 'qSameRow', 'gridX'] as const;

export interface DecodeRotaryConfig {
  headDim: number;
  /** Rotated dims (2 x the tables' columns), <= headDim. */
  rotaryDim: number;
  interleaved: boolean;
  /** Are there new keys to rotate? */
  hasK: boolean;
  /** ceil(batch / 4): the starts are packed four to a uniform vec4. */
  batchVec4: number;
}

export class DecodeRotaryProgram implements OwnPipelineSpec {
  readonly key: string;
  readonly numInputs = 4;
  readonly numOutputs: number;
  readonly hasUniforms = true;
  readonly label = 'flash-decode-rotary';

  constructor(private readonly c: DecodeRotaryConfig) {
    this.numOutputs = c.hasK ? 2 : 1;
    this.key =
        `decode-rotary-${c.headDim}-${c.rotaryDim}-${+ c.interleaved}-${+ c.hasK}-${c.batchVec4}`;
  }

  /** The uniform bytes for these shapes and per-batch start rows. */
  uniforms(
      dims: {batch: number, seqQ: number, heads: number, seqNew: number, headsKV: number},
      starts: readonly number[],
      qSameRow: boolean): {bytes: ArrayBuffer, grid: [number, number, number]} {
    const {batch, seqQ, heads, seqNew, headsKV} = dims;
    const d = this.c.headDim;
    const qSize = batch * seqQ * heads * d;
    const kSize = this.c.hasK ? batch * seqNew * headsKV * d : 0;
    const grid = dispatchGrid(Math.ceil((qSize + kSize) / THREADS));
    const values: Record<typeof DECODE_ROTARY_UNIFORMS[number], number> =
        {qSize, kSize, seqQ, heads, seqNew, headsKV, qSameRow: qSameRow ? 1 : 0, gridX: grid[0]};
    const w = new UniformWriter(
        new ArrayBuffer(4 * DECODE_ROTARY_UNIFORMS.length + 16 * this.c.batchVec4));
    DECODE_ROTARY_UNIFORMS.forEach(name => w.i32(values[name]));
    for (let b = 0; b < 4 * this.c.batchVec4; b++) {
      w.i32(b < batch ? starts[b] : 0);
    }
    return {bytes: w.finish(), grid};
  }

  code(): string {
    const {headDim, rotaryDim, interleaved, hasK, batchVec4} = this.c;
    const half = rotaryDim / 2;
    // One element of x [B, S, Hx, D] at flat index e, table row `pos`.
    const rotate = (x: string, y: string, heads: string, seq: string, sameRow: string) => `{
    let d = e % D;
    let row = e / D;              // (b * S + s) * Hx + h
    let s = (row / ${heads}) % ${seq};
    let b = row / (${heads} * ${seq});
    if (d >= ROT) {
      ${y}[e] = ${x}[e];
    } else {
      let pos = u.starts[b / 4][b % 4] + select(s, 0, ${sameRow});
      ${
        interleaved ? `let first = (d & 1) == 0;
      let j = d / 2;
      let partner = select(e - 1, e + 1, first);` :
                      `let first = d < HALF;
      let j = select(d - HALF, d, first);
      let partner = select(e - HALF, e + HALF, first);`}
      // y = x cos -/+ partner sin: minus for the first of a pair.
      let sign = select(1.0, -1.0, first);
      ${y}[e] = ${x}[e] * cosTable[pos * HALF + j] + sign * ${
        x}[partner] * sinTable[pos * HALF + j];
    }
  }`;
    return `
struct Uniforms {
${DECODE_ROTARY_UNIFORMS.map(n => `  ${n}: i32,`).join('\n')}
  starts: array<vec4<i32>, ${batchVec4}>,
}
@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> cosTable: array<f32>;
@group(0) @binding(3) var<storage, read> sinTable: array<f32>;
@group(0) @binding(4) var<storage, read_write> qRot: array<f32>;
${
        hasK ? `@group(0) @binding(5) var<storage, read_write> kRot: array<f32>;
@group(0) @binding(6) var<uniform> u: Uniforms;` :
               '@group(0) @binding(5) var<uniform> u: Uniforms;'}

const D = ${headDim};
const ROT = ${rotaryDim};
const HALF = ${half};

@compute @workgroup_size(${THREADS})
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  let index = i32(g.y) * u.gridX * ${THREADS} + i32(g.x);
  if (index < u.qSize) {
    let e = index;
    ${rotate('q', 'qRot', 'u.heads', 'u.seqQ', 'u.qSameRow != 0')}
  }${
        hasK ? ` else if (index < u.qSize + u.kSize) {
    let e = index - u.qSize;
    ${rotate('k', 'kRot', 'u.headsKV', 'u.seqNew', 'false')}
  }` :
               ''}
}
`;
  }
}
