/**
 * Backward preprocessing: Delta = rowsum(dO * O) - dLse, one value per
 * (b, h, query row). Folding dLse in makes the lse output differentiable
 * for free (d lse_i / d s_ij = P_ij). Written next to the row's lse as
 * `[B, H, Sq, 2]` (lse, Delta): one binding instead of two keeps the
 * key-block pass within WebGPU's default of 8 storage buffers per stage.
 */
import type {AttentionShapes} from '../../src/checks';

import type {OwnPipelineSpec} from './own_pipeline';
import {paramsWGSL} from './flash_attention_grad_wgsl';

const WORKGROUP = 64;

export class FlashAttentionGradDeltaProgram implements OwnPipelineSpec {
  readonly key: string;
  readonly numInputs = 4;
  readonly numOutputs = 1;
  readonly hasUniforms = true;
  readonly workgroups: [number, number, number];
  private readonly source: string;

  constructor(shapes: AttentionShapes) {
    const dv = shapes.headDimV;
    const rows = shapes.batch * shapes.heads * shapes.seqQ;
    this.key = `flashAttentionGradDelta_${dv}`;
    this.workgroups = [Math.ceil(rows / WORKGROUP), 1, 1];
    this.source = `${paramsWGSL(5)}
@group(0) @binding(0) var<storage, read> dy: array<f32>;
@group(0) @binding(1) var<storage, read> outs: array<f32>;
@group(0) @binding(2) var<storage, read> dLse: array<f32>;
@group(0) @binding(3) var<storage, read> lse: array<f32>;
@group(0) @binding(4) var<storage, read_write> stats: array<vec2<f32>>;
const DV = ${dv};

@compute @workgroup_size(${WORKGROUP})
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  // Row index in the [B, H, Sq] layout of lse.
  let row = i32(gid.x);
  if (row >= p.batch * p.heads * p.seqQ) {
    return;
  }
  let i = row % p.seqQ;
  let bh = row / p.seqQ;
  let h = bh % p.heads;
  let b = bh / p.heads;
  let base = ((b * p.seqQ + i) * p.heads + h) * DV;
  var sum = 0.0;
  for (var x = 0; x < DV; x++) {
    sum += dy[base + x] * outs[base + x];
  }
  stats[row] = vec2<f32>(lse[row], sum - dLse[row]);
}
`;
  }

  code(): string {
    return this.source;
  }
}
