/**
 * The storage-loaded tensor-core forward's pre-pass: Q, K and V
 * ([B, S, H, D] float32 each) rewritten, in one dispatch, as float16
 * matrices that `subgroupMatrixLoad` reads straight from a storage buffer.
 *
 * Layout: one buffer `ops` holds Q's hi part, Q's lo part (split mode
 * only), then K's and V's; one buffer `scales` holds the three operands'
 * tile scales (two buffers, so that the attention kernel stays within the
 * default 8 storage buffers per stage). Within a part, per (batch, head),
 * the S rows padded with zero rows to `seqPad` (a multiple of the attention
 * kernel's tile), row-major [seqPad][D]: element (b, h, s, d) at
 * part + ((b * H + h) * seqPad + s) * D + d, so a matrix of rows s.. starts
 * at a multiple of D elements (16-byte aligned when D and every part's
 * size are multiples of 8) and every load stays inside the array. Each
 * tile of TR rows gets one power of two 2^-e, with the tile's max |x| =
 * f 2^e, f in [0.5, 1): the scaled values lie in (-1, 1), inside f16's
 * range, and their hi parts above its subnormals unless far smaller than
 * the tile's max. `scales` holds 2^e per tile, the factor that undoes it,
 * at scaleOff + (b * H + h) * tiles + tile. With `split`, the hi and lo
 * float16 parts (subgroup_matrix_wgsl.ts, splitStoreWGSL); else hi only.
 *
 * One workgroup per (operand, batch, head, tile): the tile's max |x|
 * through a workgroup atomic, then the split. Real path: an f16 array
 * (`enable f16`); stand-in (MatrixShape.standIn): an f32 array holding
 * f16-rounded values.
 */
import {MatrixShape, matrixShapeKey} from './subgroup_matrix';
import {splitStoreWGSL, standInHelpersWGSL} from './subgroup_matrix_wgsl';
import {bindingsWGSL, UniformField, uniformStructWGSL} from './own_pipeline';
import {range, VEC4_COMPONENTS as COMP} from './wgsl_snippets';

export interface OperandSplitConfig {
  shape: MatrixShape;
  split: boolean;
}

/** Invocations per workgroup. */
export const SPLIT_THREADS = 64;

/** Per operand (Q, K, V): its shape, its tiles, where its parts and scales go. */
const OPERAND_FIELDS =
    ['seq', 'heads', 'seqPad', 'tiles', 'rows', 'd4', 'hiOff', 'loOff', 'scaleOff', 'groupStart'] as
    const;
export type OperandSplitPlace = Record<typeof OPERAND_FIELDS[number], number>;

export const OPERAND_SPLIT_UNIFORMS: readonly UniformField[] = [
  ['totalGroups', 'i32'],
  ['gridX', 'i32'],
  ...range(3).flatMap(i => OPERAND_FIELDS.map(f => [`${f}${i}`, 'i32'] as UniformField)),
];

/** The uniform values of one pre-pass from its three operands' places. */
export function operandSplitUniforms(
    places: OperandSplitPlace[], totalGroups: number, gridX: number): Record<string, number> {
  const values: Record<string, number> = {totalGroups, gridX};
  places.forEach((p, i) => OPERAND_FIELDS.forEach(f => values[`${f}${i}`] = p[f]));
  return values;
}

export function operandSplitKey(c: OperandSplitConfig): string {
  return `fa_sm_split_${matrixShapeKey(c.shape)}_sp${+ c.split}`;
}

/**
 * Elements (of the output tensor, float32) that hold `count` matrix
 * elements: two f16 per float32 on the real path, one f32 each in the
 * stand-in.
 */
export function operandPartElements(shape: MatrixShape, count: number): number {
  return shape.standIn ? count : Math.ceil(count / 2);
}

export function operandSplitWGSL(c: OperandSplitConfig): string {
  const {split, shape} = c;
  const elem = shape.standIn ? 'f32' : 'f16';
  const store =
      range(4)
          .map(
              e => splitStoreWGSL(
                  `x.${COMP[e]} * scale`, `ops[at + ${e}u]`, split ? `ops[loAt + ${e}u]` : null))
          .join('\n      ');
  const operand = (i: number) => `Op(${OPERAND_FIELDS.map(f => `u.${f}${i}`).join(', ')})`;
  return `${shape.standIn ? '' : 'enable f16;'}
${uniformStructWGSL('Uniforms', OPERAND_SPLIT_UNIFORMS)}
${
      bindingsWGSL(
          [
            {name: 'qb', type: 'vec4<f32>'}, {name: 'kb', type: 'vec4<f32>'},
            {name: 'vb', type: 'vec4<f32>'}
          ],
          [{name: 'ops', type: elem}, {name: 'scales', type: 'f32'}], {
            name: 'u',
            type: 'Uniforms'
          })}
${standInHelpersWGSL(shape)}

const THREADS = ${SPLIT_THREADS}u;

struct Op {
${OPERAND_FIELDS.map(f => `  ${f}: i32,`).join('\n')}
}

fn fa_operand(i: i32) -> Op {
  if (i == 0) {
    return ${operand(0)};
  }
  if (i == 1) {
    return ${operand(1)};
  }
  return ${operand(2)};
}

fn fa_load(i: i32, at: i32) -> vec4<f32> {
  if (i == 0) {
    return qb[at];
  }
  if (i == 1) {
    return kb[at];
  }
  return vb[at];
}

// The tile's max |x| (bits of a float >= 0 order as the float does).
var<workgroup> tileMax: atomic<u32>;

@compute @workgroup_size(${SPLIT_THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let groupId = i32(wg.x + wg.y * u32(u.gridX));
  if (groupId >= u.totalGroups) {
    return;
  }
  let which = select(select(2, 1, groupId < u.groupStart2), 0, groupId < u.groupStart1);
  let p = fa_operand(which);
  let local = groupId - p.groupStart;
  let tile = local % p.tiles;
  let bh = local / p.tiles;
  let h = bh % p.heads;
  let b = bh / p.heads;
  let row0 = tile * p.rows;
  let n = u32(p.rows * p.d4);
  let d4 = u32(p.d4);
  if (lid == 0u) {
    atomicStore(&tileMax, 0u);
  }
  workgroupBarrier();
  var mx = 0.0;
  for (var i = lid; i < n; i += THREADS) {
    let r = row0 + i32(i / d4);
    if (r < p.seq) {
      let x = abs(fa_load(which, ((b * p.seq + r) * p.heads + h) * p.d4 + i32(i % d4)));
      mx = max(mx, max(max(x.x, x.y), max(x.z, x.w)));
    }
  }
  atomicMax(&tileMax, bitcast<u32>(mx));
  workgroupBarrier();
  let e = clamp(frexp(bitcast<f32>(atomicLoad(&tileMax))).exp, -100, 100);
  let scale = ldexp(1.0, -e);
  if (lid == 0u) {
    scales[p.scaleOff + local] = ldexp(1.0, e);
  }
  for (var i = lid; i < n; i += THREADS) {
    let r = row0 + i32(i / d4);
    var x = vec4<f32>(0.0);
    if (r < p.seq) {
      x = fa_load(which, ((b * p.seq + r) * p.heads + h) * p.d4 + i32(i % d4));
    }
    let at = u32(p.hiOff + (bh * p.seqPad + r) * 4 * p.d4) + 4u * (i % d4);
    let loAt = at + u32(p.loOff - p.hiOff);
    {
      ${store}
    }
  }
}
`;
}
