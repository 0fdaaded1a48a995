/**
 * The ceiling of subgroup matrices on this GPU through Dawn (issue 15):
 * what `subgroupMatrixMultiplyAccumulate` (f16 x f16 -> f32) reaches in
 * WGSL with nothing else in the way, so that the attention kernels'
 * TFLOP/s can be read against it. Raw WebGPU, no tfjs. Three kernels:
 *
 * - `mma`: each subgroup loads J left matrices and one right matrix once,
 *   then multiplies them into J independent accumulators in a loop: the
 *   issue rate of the built-in itself, no memory traffic.
 * - `gemm-wg`: C = A B (row-major f16 in storage, f32 out) with A and B
 *   tiles staged in workgroup memory each K step, as the attention
 *   kernels stage K and V (a workgroup barrier per step).
 * - `gemm-storage`: the same product, every matrix loaded straight from
 *   storage (no workgroup memory, no barriers).
 *
 * Each GEMM is checked against a float64 product of the same (f16-exact)
 * inputs first; a kernel that does not compile prints its errors.
 *
 *   node subgroup_matrix_peak.mjs [--iters 8192] [--size 4096] [--no-robustness]
 *       [--print-wgsl]
 *
 * Without the subgroup-matrix feature it says so and exits 0.
 */
/// <reference types="@webgpu/types" />
import {MatrixShape, pickSubgroupMatrixShape} from '../kernels/webgpu/subgroup_matrix';

import {arg, halfInputs, pipelineOf, readBack, storage, SUBGROUP_MATRIX_HEADER as HEADER, timeDispatch} from './raw_webgpu';
import {openTensorCoreDevice} from './webgpu_setup';

const left = (s: MatrixShape) => `subgroup_matrix_left<f16, ${s.K}, ${s.M}>`;
const right = (s: MatrixShape) => `subgroup_matrix_right<f16, ${s.N}, ${s.K}>`;
const result = (s: MatrixShape) => `subgroup_matrix_result<f32, ${s.N}, ${s.M}>`;

/** The loop kernels' bindings: inputs, results, and the iteration count. */
const LOOP_BINDINGS = `@group(0) @binding(0) var<storage, read> a: array<f16>;
@group(0) @binding(1) var<storage, read> b: array<f16>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<uniform> iters: vec4<u32>;`;

/**
 * The loop kernels' epilogue: each subgroup stores its J accumulators to
 * slots of its own, so that no product is dead code (only subgroup 0's
 * results are read).
 */
function storeAccumulators(s: MatrixShape, j: number): string {
  return Array.from({length: j}, (_, i) => i)
      .map(
          i => `subgroupMatrixStore<row_major>(&c, (sg * ${j}u + ${i}u) * ${s.M * s.N}u, acc${i}, ${
              s.N}u);`)
      .join('\n  ');
}

/** `mma`: J accumulators per subgroup, `iters` products each. */
function mmaKernel(s: MatrixShape, j: number, subgroups: number): string {
  const accs = Array.from({length: j}, (_, i) => i);
  return `${HEADER}
${LOOP_BINDINGS}
@compute @workgroup_size(${s.lanes * subgroups})
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let sg = wid.x * ${subgroups}u + lid / ${s.lanes}u;
  let r = subgroupMatrixLoad<${right(s)}, row_major>(&b, 0u, ${s.N}u);
  ${
      accs.map(
              i => `let l${i} = subgroupMatrixLoad<${left(s)}, row_major>(&a, ${i * s.M * s.K}u, ${
                  s.K}u);
  var acc${i} = subgroupMatrixLoad<${result(s)}, row_major>(&c, ${i * s.M * s.N}u, ${s.N}u);`)
          .join('\n  ')}
  for (var i = 0u; i < iters.x; i++) {
    ${
      accs.map(i => `acc${i} = subgroupMatrixMultiplyAccumulate(l${i}, r, acc${i});`)
          .join('\n    ')}
  }
  ${storeAccumulators(s, j)}
}`;
}

/**
 * `load-wg` / `load-storage`: as `mma`, but every iteration loads its J
 * left matrices and the right one again (from workgroup memory filled
 * once, or from storage): the load path's cost next to the products.
 */
function loadKernel(s: MatrixShape, j: number, subgroups: number, fromStorage: boolean): string {
  const accs = Array.from({length: j}, (_, i) => i);
  const aElems = j * s.M * s.K;
  const bElems = s.K * s.N;
  const threads = s.lanes * subgroups;
  const [aSrc, bSrc] = fromStorage ? ['a', 'b'] : ['aTile', 'bTile'];
  return `${HEADER}
${LOOP_BINDINGS}
var<workgroup> aTile: array<f16, ${aElems}>;
var<workgroup> bTile: array<f16, ${bElems}>;
@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let sg = wid.x * ${subgroups}u + lid / ${s.lanes}u;
  for (var e = lid; e < ${aElems}u; e += ${threads}u) { aTile[e] = a[e]; }
  for (var e = lid; e < ${bElems}u; e += ${threads}u) { bTile[e] = b[e]; }
  workgroupBarrier();
  ${
      accs.map(
              i => `var acc${i} = subgroupMatrixLoad<${result(s)}, row_major>(&c, ${
                  i * s.M * s.N}u, ${s.N}u);`)
          .join('\n  ')}
  for (var i = 0u; i < iters.x; i++) {
    // A per-iteration offset of 0 the compiler cannot prove, so that the
    // loads stay in the loop.
    let o = i & iters.y;
    let r = subgroupMatrixLoad<${right(s)}, row_major>(&${bSrc}, o, ${s.N}u);
    ${
      accs.map(
              i => `acc${i} = subgroupMatrixMultiplyAccumulate(subgroupMatrixLoad<${
                  left(s)}, row_major>(&${aSrc}, o + ${i * s.M * s.K}u, ${s.K}u), r, acc${i});`)
          .join('\n    ')}
  }
  ${storeAccumulators(s, j)}
}`;
}

/** A GEMM tiling: a workgroup's TM x TN block, by SGM x SGN subgroups, K step TK. */
interface GemmTiles {
  tm: number;
  tn: number;
  sgm: number;
  sgn: number;
  tk: number;
}

/** C[n x n] = A B, A and B row-major f16; staged in workgroup memory or not. */
function gemmKernel(s: MatrixShape, t: GemmTiles, n: number, staged: boolean): string {
  const threads = s.lanes * t.sgm * t.sgn;
  const rm = t.tm / t.sgm / s.M;  // result matrices per subgroup, down
  const rn = t.tn / t.sgn / s.N;  // and across
  const accs: Array<[number, number]> = [];
  for (let i = 0; i < rm; i++) {
    for (let k = 0; k < rn; k++) {
      accs.push([i, k]);
    }
  }
  const aSrc = staged ? 'aTile' : 'a';
  const bSrc = staged ? 'bTile' : 'b';
  // Where the subgroup's left matrix i and right matrix k start, at K offset kk.
  const aOff = (i: number) =>
      staged ? `(wr + ${i * s.M}u) * ${t.tk}u + kk` : `(row0 + wr + ${i * s.M}u) * ${n}u + k0 + kk`;
  const aStride = staged ? t.tk : n;
  const bOff = (k: number) =>
      staged ? `kk * ${t.tn}u + wc + ${k * s.N}u` : `(k0 + kk) * ${n}u + col0 + wc + ${k * s.N}u`;
  const bStride = staged ? t.tn : n;
  return `${HEADER}
@group(0) @binding(0) var<storage, read> a: array<f16>;
@group(0) @binding(1) var<storage, read> b: array<f16>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
${
      staged ? `var<workgroup> aTile: array<f16, ${t.tm * t.tk}>;
var<workgroup> bTile: array<f16, ${t.tk * t.tn}>;` :
               ''}
@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let sg = lid / ${s.lanes}u;
  let row0 = wid.y * ${t.tm}u;
  let col0 = wid.x * ${t.tn}u;
  let wr = (sg / ${t.sgn}u) * ${t.tm / t.sgm}u;
  let wc = (sg % ${t.sgn}u) * ${t.tn / t.sgn}u;
  ${
      accs.map(
              ([i, k]) => `var acc${i}_${k} = subgroupMatrixLoad<${
                  result(s)}, row_major>(&c, (row0 + wr + ${i * s.M}u) * ${n}u + col0 + wc + ${
                  k * s.N}u, ${n}u);`)
          .join('\n  ')}
  for (var k0 = 0u; k0 < ${n}u; k0 += ${t.tk}u) {
    ${
      staged ? `workgroupBarrier();
    for (var e = lid; e < ${t.tm * t.tk}u; e += ${threads}u) {
      aTile[e] = a[(row0 + e / ${t.tk}u) * ${n}u + k0 + e % ${t.tk}u];
    }
    for (var e = lid; e < ${t.tk * t.tn}u; e += ${threads}u) {
      bTile[e] = b[(k0 + e / ${t.tn}u) * ${n}u + col0 + e % ${t.tn}u];
    }
    workgroupBarrier();` :
               ''}
    for (var kk = 0u; kk < ${t.tk}u; kk += ${s.K}u) {
      ${
      Array
          .from(
              {length: rm},
              (_, i) => `let l${i} = subgroupMatrixLoad<${left(s)}, row_major>(&${aSrc}, ${
                  aOff(i)}, ${aStride}u);`)
          .join('\n      ')}
      ${
      Array
          .from(
              {length: rn},
              (_, k) => `let r${k} = subgroupMatrixLoad<${right(s)}, row_major>(&${bSrc}, ${
                  bOff(k)}, ${bStride}u);`)
          .join('\n      ')}
      ${
      accs.map(
              ([i, k]) =>
                  `acc${i}_${k} = subgroupMatrixMultiplyAccumulate(l${i}, r${k}, acc${i}_${k});`)
          .join('\n      ')}
    }
  }
  ${
      accs.map(
              ([i, k]) => `subgroupMatrixStore<row_major>(&c, (row0 + wr + ${i * s.M}u) * ${
                  n}u + col0 + wc + ${k * s.N}u, acc${i}_${k}, ${n}u);`)
          .join('\n  ')}
}`;
}

async function main(): Promise<void> {
  const {device} = await openTensorCoreDevice();
  if (process.argv.includes('--print-wgsl')) {
    // The kernels for a 16x16x16, 32-lane configuration, without running them.
    const s: MatrixShape = {M: 16, N: 16, K: 16, lanes: 32, standIn: false};
    console.log(mmaKernel(s, 2, 4));
    console.log(loadKernel(s, 2, 4, false));
    console.log(gemmKernel(s, {tm: 64, tn: 64, sgm: 2, sgn: 2, tk: 32}, 256, true));
    console.log(gemmKernel(s, {tm: 64, tn: 64, sgm: 2, sgn: 2, tk: 32}, 256, false));
    return;
  }
  const shape = pickSubgroupMatrixShape(device);
  if (shape == null) {
    console.log(
        'no f16 x f16 -> f32 subgroup-matrix configuration on this device: ' +
        'nothing to run');
    return;
  }
  console.log(`matrices ${shape.M}x${shape.N}x${shape.K} f16 -> f32, ${shape.lanes} lanes`);
  const iters = arg('iters', 8192);
  const n = arg('size', 4096);
  const rows: string[] = [];

  // The built-in alone.
  const maxJ = 8;
  const aIn = halfInputs(maxJ * shape.M * shape.K, 1);
  const bIn = halfInputs(shape.K * shape.N, 2);
  const a = storage(device, aIn.bits);
  const b = storage(device, bIn.bits);
  const uni =
      device.createBuffer({size: 16, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST});
  device.queue.writeBuffer(uni, 0, Uint32Array.of(iters, 0, 0, 0));
  // The load kernels run an eighth of the iterations (each also loads).
  const uniLoad =
      device.createBuffer({size: 16, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST});
  device.queue.writeBuffer(uniLoad, 0, Uint32Array.of(iters / 8, 0, 0, 0));
  for (const subgroups of [4, 8]) {
    const groups = 132 * 4;
    const c = storage(device, groups * subgroups * maxJ * shape.M * shape.N * 4);
    for (const j of [1, 2, 4, 8]) {
      const name = `mma J=${j} ${subgroups} subgroups/workgroup`;
      const pipeline = await pipelineOf(device, name, mmaKernel(shape, j, subgroups));
      if (pipeline == null) {
        rows.push(`| ${name} | compile error | - |`);
        continue;
      }
      const bind = device.createBindGroup({
        layout: pipeline.getBindGroupLayout(0),
        entries: [a, b, c, uni].map((buffer, binding) => ({binding, resource: {buffer}}))
      });
      const ms = await timeDispatch(device, pipeline, bind, [groups, 1], 3);
      const flops = 2 * shape.M * shape.N * shape.K * j * iters * subgroups * groups;
      rows.push(`| ${name} | ${ms.toFixed(3)} | ${(flops / ms / 1e9).toFixed(1)} |`);
    }
    c.destroy();
  }
  for (const fromStorage of [false, true]) {
    const subgroups = 4;
    const groups = 132 * 4;
    const c = storage(device, groups * subgroups * maxJ * shape.M * shape.N * 4);
    for (const j of [1, 4, 8]) {
      const name = `load-${fromStorage ? 'storage' : 'wg'} J=${j} ${subgroups} subgroups/workgroup`;
      const pipeline = await pipelineOf(device, name, loadKernel(shape, j, subgroups, fromStorage));
      if (pipeline == null) {
        rows.push(`| ${name} | compile error | - |`);
        continue;
      }
      const bind = device.createBindGroup({
        layout: pipeline.getBindGroupLayout(0),
        entries: [a, b, c, uniLoad].map((buffer, binding) => ({binding, resource: {buffer}}))
      });
      const ms = await timeDispatch(device, pipeline, bind, [groups, 1], 3);
      const flops = 2 * shape.M * shape.N * shape.K * j * iters / 8 * subgroups * groups;
      rows.push(`| ${name} | ${ms.toFixed(3)} | ${(flops / ms / 1e9).toFixed(1)} |`);
    }
    c.destroy();
  }

  // GEMMs: checked on a small problem, timed on n x n.
  const tilings: GemmTiles[] = [
    {tm: 64, tn: 64, sgm: 2, sgn: 2, tk: 32},
    {tm: 128, tn: 128, sgm: 2, sgn: 4, tk: 32},
    {tm: 128, tn: 64, sgm: 4, sgn: 2, tk: 32},
  ];
  for (const staged of [true, false]) {
    for (const t of tilings) {
      const name = `gemm-${staged ? 'wg' : 'storage'} ${t.tm}x${t.tn}, ${t.sgm}x${t.sgn} subgroups`;
      let ok = true;
      for (const size of [256, n]) {
        const pipeline = await pipelineOf(device, name, gemmKernel(shape, t, size, staged));
        if (pipeline == null) {
          rows.push(`| ${name} | compile error | - |`);
          ok = false;
          break;
        }
        const ga = halfInputs(size * size, 3);
        const gb = halfInputs(size * size, 4);
        const [ba, bb, bc] =
            [storage(device, ga.bits), storage(device, gb.bits), storage(device, size * size * 4)];
        const bind = device.createBindGroup({
          layout: pipeline.getBindGroupLayout(0),
          entries: [ba, bb, bc].map((buffer, binding) => ({binding, resource: {buffer}}))
        });
        const groups: [number, number] = [size / t.tn, size / t.tm];
        if (size !== n) {
          const enc = device.createCommandEncoder();
          const pass = enc.beginComputePass();
          pass.setPipeline(pipeline);
          pass.setBindGroup(0, bind);
          pass.dispatchWorkgroups(...groups);
          pass.end();
          device.queue.submit([enc.finish()]);
          const got = await readBack(device, bc, size * size * 4);
          let err = 0;
          let top = 0;
          for (let r = 0; r < size; r++) {
            for (let col = 0; col < size; col++) {
              let want = 0;
              for (let k = 0; k < size; k++) {
                want += ga.values[r * size + k] * gb.values[k * size + col];
              }
              err = Math.max(err, Math.abs(got[r * size + col] - want));
              top = Math.max(top, Math.abs(want));
            }
          }
          const rel = err / top;
          console.log(`${name}: ${size}^3 check, max error / max value ${rel.toExponential(2)}`);
          if (!(rel < 1e-5)) {
            rows.push(`| ${name} | wrong result (${rel.toExponential(2)}) | - |`);
            ok = false;
          }
        } else {
          const ms = await timeDispatch(device, pipeline, bind, groups, 5);
          rows.push(
              `| ${name}, ${n}^3 | ${ms.toFixed(3)} | ${(2 * n * n * n / ms / 1e9).toFixed(1)} |`);
        }
        [ba, bb, bc].forEach(x => x.destroy());
        if (!ok) {
          break;
        }
      }
    }
  }
  console.log(`\n| kernel | ms per dispatch | TFLOP/s |\n| --- | --- | --- |\n${rows.join('\n')}`);
}

main().catch(e => {
  console.error(e);
  process.exit(1);
});
