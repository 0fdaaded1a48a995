/**
 * Backward preprocessing: Delta = rowsum(dO * O) - dLse, one value per
 * (b, h, query row). Folding dLse in makes the lse output differentiable
 * for free (d lse_i / d s_ij = P_ij). Written next to the row's lse as
 * `[B, H, Sq, 2]` (lse, Delta): one binding instead of two keeps the
 * key-block pass within WebGPU's default of 8 storage buffers per stage.
 */
import type {AttentionShapes} from '../../src/checks';

import {dispatchGrid, OwnPipelineSpec, StorageBinding} from './own_pipeline';
import {gradBindingsWGSL} from './flash_attention_grad_wgsl';

// LANES invocations share a row (reading its dims side by side, then a
// fixed-order tree sum in workgroup memory), ROWS rows per workgroup, taken
// in [B, Sq, H] order so that a workgroup reads one contiguous span of dO
// and O. One invocation per row would read 256-byte strided rows, which
// measured slower (benchmarks/RESULTS.md, backward tuning).
const LANES = 16;
const ROWS = 16;

const INPUTS: StorageBinding[] = [
  {name: 'dy', type: 'f32'},
  {name: 'outs', type: 'f32'},
  {name: 'dLse', type: 'f32'},
  {name: 'lse', type: 'f32'},
];
// (lse, Delta) per row.
const OUTPUTS: StorageBinding[] = [{name: 'stats', type: 'vec2<f32>'}];

export class FlashAttentionGradDeltaProgram implements OwnPipelineSpec {
  readonly key: string;
  readonly numInputs: number;
  readonly numOutputs = OUTPUTS.length;
  readonly hasUniforms = true;
  readonly workgroups: [number, number, number];
  private readonly source: string;

  /**
   * With `seqlens` (a fifth input, [B, 2] int32), the pass also copies the
   * per-batch lengths to the end of `stats` (B more entries, bit-cast), where
   * the dK/dV and dQ passes read them: a binding of their own would take the
   * key-block pass with ALiBi past the 8 storage buffers.
   * With `zeroDLse`, dLse is known to be zero (tfjs's gradient of an unused
   * lse output, still on the host): the pass does not read it, so the
   * caller binds another tensor in its place and nothing is uploaded.
   * With `packedBatch` B > 0 (a packed varlen call, `shapes` the tensors'
   * [1, totalQ, H, Dv] rows), `seqlens` is the [B + 1] cuSeqlensQ and a
   * sixth input cuSeqlensK: the B + 1 pairs are copied, and lse is
   * [H, totalQ] (uniform totalQ).
   */
  constructor(shapes: AttentionShapes, seqlens = false, zeroDLse = false, packedBatch = 0) {
    const dv = shapes.headDimV;
    const rows = shapes.batch * shapes.heads * shapes.seqQ;
    const packed = packedBatch > 0;
    const inputs = [
      ...INPUTS, ...(seqlens ? [{name: 'seqlens', type: 'i32'}] : []),
      ...(packed ? [{name: 'cuK', type: 'i32'}] : [])
    ];
    this.numInputs = inputs.length;
    this.key = `flashAttentionGradDelta_${dv}_${+ seqlens}_${+ zeroDLse}_${+ packed}`;
    this.workgroups = dispatchGrid(Math.ceil(Math.max(rows, packedBatch + 1) / ROWS));
    const lseRows = packed ? 'p.heads * p.totalQ' : 'p.batch * p.heads * p.seqQ';
    // [B, Sq, H] rows of dO and O -> [B, H, Sq] of lse (packed: [H, totalQ]).
    const lseIndex =
        packed ? `let out = (row % p.heads) * p.totalQ + row / p.heads;` : `let h = row % p.heads;
    let i = (row / p.heads) % p.seqQ;
    let b = row / (p.heads * p.seqQ);
    let out = (b * p.heads + h) * p.seqQ + i;`;
    this.source = `${gradBindingsWGSL(inputs, OUTPUTS)}
const DV = ${dv};
const LANES = ${LANES};

var<workgroup> partial: array<f32, ${LANES * ROWS}>;

@compute @workgroup_size(${LANES * ROWS})
fn main(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let t = i32(lid);
  let lane = t % LANES;
  // Row index in the [B, Sq, H] layout of dO and O.
  let row = i32(wg.y * nwg.x + wg.x) * ${ROWS} + t / LANES;
  let valid = row < ${lseRows};
  var sum = 0.0;
  if (valid) {
    for (var x = lane; x < DV; x += LANES) {
      sum += dy[row * DV + x] * outs[row * DV + x];
    }
  }
  partial[t] = sum;
  for (var stride = LANES / 2; stride > 0; stride /= 2) {
    workgroupBarrier();
    if (lane < stride) {
      partial[t] += partial[t + stride];
    }
  }
  ${
        seqlens ? `if (row < p.batch${packed ? ' + 1' : ''} && lane == 0) {
    stats[${lseRows} + row] = bitcast<vec2<f32>>(${
                      packed ? 'vec2<i32>(seqlens[row], cuK[row])' :
                               'vec2<i32>(seqlens[2 * row], seqlens[2 * row + 1])'});
  }` :
                  ''}
  if (valid && lane == 0) {
    ${lseIndex}
    stats[out] = vec2<f32>(lse[out], partial[t]${zeroDLse ? '' : ' - dLse[out]'});
  }
}
`;
  }

  code(): string {
    return this.source;
  }
}
