/**
 * Rotary embedding of a decode step's q `[B, Sq, H, D]` and new keys
 * `[B, Snew, Hk, D]` in one dispatch, which also appends the new keys and
 * values `[B, Snew, Hk, Dv]` to the caches: batch row b's token s is
 * rotated by table row `starts[b] + s` (or `starts[b]` for every q row
 * when `qSameRow`, flash_attn's non-causal, non-local q) and written at
 * cache row `starts[b] + s`. The starts are in the uniforms, so a step
 * uploads nothing, and the rotated keys go straight into the cache (no
 * intermediate tensor, no buffer copies). Pairs are (i, i + rotaryDim/2),
 * or (2i, 2i + 1) interleaved; dims past rotaryDim are copied.
 *
 * Without rotary tables (rotaryDim 0) the pass only unpacks: from a
 * packed projection `[B, S, H + 2 Hk, D]` (`packed`, bound as q, k and v)
 * it writes q to its own tensor and k, v into the caches, so a layer's
 * qkv projection needs no split.
 *
 * Bindings: q, k, v (q again when there are no new keys), cos, sin
 * `[Sro, rotaryDim / 2]` (q again without tables); output qRot, then
 * kCache and vCache written in place (absent without new keys); uniforms.
 */
import {dispatchGrid, OwnPipelineSpec, UniformWriter} from './own_pipeline';

const THREADS = 64;

export const DECODE_ROTARY_UNIFORMS = [
  'qSize', 'kSize', 'vSize', 'seqQ', 'heads', 'seqNew', 'headsKV', 'seqMax', 'qSameRow', 'gridX'
] as const;
/** 4-byte slots before the starts: the fields, padded to a multiple of 4. */
const ROTARY_FIELD_SLOTS = Math.ceil(DECODE_ROTARY_UNIFORMS.length / 4) * 4;

export interface DecodeRotaryConfig {
  headDim: number;
  /** Head dim of the values (appended, not rotated). */
  headDimV: number;
  /** Rotated dims (2 x the tables' columns), <= headDim. */
  rotaryDim: number;
  interleaved: boolean;
  /** Are there new keys to rotate and append (with their values)? */
  hasK: boolean;
  /** ceil(batch / 4): the starts are packed four to a uniform vec4. */
  batchVec4: number;
  /**
   * q, k and v are one packed tensor `[B, S, H + 2 Hk, D]` (bound three
   * times), read in place: the pass unpacks q and appends k and v.
   */
  packed: boolean;
}

export class DecodeRotaryProgram implements OwnPipelineSpec {
  readonly key: string;
  readonly numInputs = 5;
  readonly numOutputs: number;
  readonly hasUniforms = true;
  readonly label = 'flash-decode-rotary';

  constructor(private readonly c: DecodeRotaryConfig) {
    this.numOutputs = c.hasK ? 3 : 1;
    this.key = `decode-rotary-${c.headDim}-${c.headDimV}-${c.rotaryDim}-${+ c.interleaved}-${
        + c.hasK}-${c.batchVec4}-${+ c.packed}`;
  }

  /** The uniform bytes for these shapes and per-batch start rows. */
  uniforms(
      dims: {
        batch: number,
        seqQ: number,
        heads: number,
        seqNew: number,
        headsKV: number,
        seqMax: number
      },
      starts: readonly number[],
      qSameRow: boolean): {bytes: ArrayBuffer, grid: [number, number, number]} {
    const {batch, seqQ, heads, seqNew, headsKV, seqMax} = dims;
    const {headDim, headDimV, hasK} = this.c;
    const qSize = batch * seqQ * heads * headDim;
    const kSize = hasK ? batch * seqNew * headsKV * headDim : 0;
    const vSize = hasK ? batch * seqNew * headsKV * headDimV : 0;
    const grid = dispatchGrid(Math.ceil((qSize + kSize + vSize) / THREADS));
    const values: Record<typeof DECODE_ROTARY_UNIFORMS[number], number> = {
      qSize,
      kSize,
      vSize,
      seqQ,
      heads,
      seqNew,
      headsKV,
      seqMax,
      qSameRow: qSameRow ? 1 : 0,
      gridX: grid[0]
    };
    const w = new UniformWriter(new ArrayBuffer(4 * ROTARY_FIELD_SLOTS + 16 * this.c.batchVec4));
    DECODE_ROTARY_UNIFORMS.forEach(name => w.i32(values[name]));
    // WGSL aligns the vec4 array that follows to 16 bytes.
    for (let i = DECODE_ROTARY_UNIFORMS.length; i < ROTARY_FIELD_SLOTS; i++) {
      w.i32(0);
    }
    for (let b = 0; b < 4 * this.c.batchVec4; b++) {
      w.i32(b < batch ? starts[b] : 0);
    }
    return {bytes: w.finish(), grid};
  }

  code(): string {
    const {headDim, headDimV, rotaryDim, interleaved, hasK, batchVec4, packed} = this.c;
    const half = rotaryDim / 2;
    // Element e of x [B, S, Hx, D] (at x[src]) rotated by table row `pos`
    // into y[at]; its pair partner is as far from src as from e.
    const rotate = (x: string, y: string, at: string) => `
    if (d >= ROT) {
      ${y}[${at}] = ${x}[src];
    } else {
      ${
        interleaved ? `let first = (d & 1) == 0;
      let j = d / 2;
      let partner = select(src - 1, src + 1, first);` :
                      `let first = d < HALF;
      let j = select(d - HALF, d, first);
      let partner = select(src - HALF, src + HALF, first);`}
      // y = x cos -/+ partner sin: minus for the first of a pair.
      let sign = select(1.0, -1.0, first);
      ${y}[${at}] = ${x}[src] * cosTable[pos * HALF + j] + sign * ${
        x}[partner] * sinTable[pos * HALF + j];
    }`;
    // Batch row b and token s of element e of x [B, S, Hx, dim], and where
    // it is read: x[e], or in the packed [B, S, H + 2 Hk, D] at head
    // `first` + h of token (b, s).
    const rowOf = (dim: string, heads: string, seq: string, first: string) => `
    let row = e / ${dim};              // (b * S + s) * Hx + h
    let s = (row / ${heads}) % ${seq};
    let b = row / (${heads} * ${seq});
    let src = ${
        packed ? `((row / ${heads}) * (u.heads + 2 * u.headsKV) + ${first} + row % ${heads}) * ${
                     dim} + e % ${dim}` :
                 'e'};`;
    // Element e of the new rows [B, Snew, Hk, dim] sits in the cache
    // [B, Smax, Hk, dim] at row starts[b] + s of batch row b.
    const cacheAt = (dim: string) => `e + (b * (u.seqMax - u.seqNew) + start) * u.headsKV * ${dim}`;
    const bindings = hasK ? ['qRot', 'kCache', 'vCache', 'u'] : ['qRot', 'u'];
    return `
struct Uniforms {
${DECODE_ROTARY_UNIFORMS.map(n => `  ${n}: i32,`).join('\n')}
  starts: array<vec4<i32>, ${batchVec4}>,
}
@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> cosTable: array<f32>;
@group(0) @binding(4) var<storage, read> sinTable: array<f32>;
${
        bindings
            .map(
                (name, i) => name === 'u' ?
                    `@group(0) @binding(${5 + i}) var<uniform> u: Uniforms;` :
                    `@group(0) @binding(${5 + i}) var<storage, read_write> ${name}: array<f32>;`)
            .join('\n')}

const D = ${headDim};
const DV = ${headDimV};
const ROT = ${rotaryDim};
const HALF = ${half};

@compute @workgroup_size(${THREADS})
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  let index = i32(g.y) * u.gridX * ${THREADS} + i32(g.x);
  if (index < u.qSize) {
    let e = index;
    let d = e % D;${rowOf('D', 'u.heads', 'u.seqQ', '0')}
    let pos = u.starts[b / 4][b % 4] + select(s, 0, u.qSameRow != 0);${rotate('q', 'qRot', 'e')}
  }${
        hasK ? ` else if (index < u.qSize + u.kSize) {
    let e = index - u.qSize;
    let d = e % D;${rowOf('D', 'u.headsKV', 'u.seqNew', 'u.heads')}
    let start = u.starts[b / 4][b % 4];
    let pos = start + s;${rotate('k', 'kCache', cacheAt('D'))}
  } else if (index < u.qSize + u.kSize + u.vSize) {
    let e = index - u.qSize - u.kSize;${rowOf('DV', 'u.headsKV', 'u.seqNew', 'u.heads + u.headsKV')}
    let start = u.starts[b / 4][b % 4];
    vCache[${cacheAt('DV')}] = v[src];
  }` :
               ''}
}
`;
  }
}
