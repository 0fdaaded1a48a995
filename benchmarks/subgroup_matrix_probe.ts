/**
 * Pins down what the subgroup-matrix built-ins really do on this GPU (issue
 * 15): tiny raw-WebGPU shaders (no tfjs) with one workgroup compare
 * subgroupMatrixLoad / Store / MultiplyAccumulate, the zero result
 * constructor, two subgroups per workgroup, the kernels' product loops and
 * f32 -> f16 conversion with the semantics the kernels' portable stand-in
 * assumes (kernels/webgpu/subgroup_matrix_wgsl.ts). Each case prints PASS or FAIL
 * and, on FAIL, the first (index, got, expected); compile and validation
 * errors are printed per case. Without the feature it says so and exits 0.
 *
 *   node subgroup_matrix_probe.mjs
 */
/// <reference types="@webgpu/types" />
import {TENSOR_CORE_DAWN_FLAGS, TENSOR_CORE_FEATURES} from '../demo/tensor_cores';
import {MatrixShape, pickSubgroupMatrixShape, subgroupMatrixConfigs} from '../kernels/webgpu/subgroup_matrix';

import {adapterName, openWebGPUDevice} from './webgpu_setup';

const HEADER = `enable f16;
enable subgroups;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium.subgroup_matrix_uniformity);
@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
`;

let failures = 0;

/**
 * Runs `body` (WGSL after the bindings, entry point `main`) as one
 * workgroup on `input`; returns `outLength` floats of `dst` (which starts
 * at -1), or null after printing the compile/validation errors.
 */
async function run(
    device: GPUDevice, name: string, code: string, input: Float32Array,
    outLength: number): Promise<Float32Array|null> {
  device.pushErrorScope('internal');
  device.pushErrorScope('validation');
  const module = device.createShaderModule({code});
  const messages = (await module.getCompilationInfo()).messages.filter(m => m.type === 'error');
  let out: Float32Array|null = null;
  try {
    const pipeline = await device.createComputePipelineAsync(
        {layout: 'auto', compute: {module, entryPoint: 'main'}});
    const buffer = (data: Float32Array, usage: number) => {
      const b = device.createBuffer({size: Math.max(16, data.byteLength), usage});
      device.queue.writeBuffer(b, 0, data as Float32Array<ArrayBuffer>);
      return b;
    };
    const S = GPUBufferUsage.STORAGE;
    const srcBuf =
        buffer(input.length > 0 ? input : new Float32Array(1), S | GPUBufferUsage.COPY_DST);
    const dstBuf = buffer(
        new Float32Array(outLength).fill(-1),
        S | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST);
    const readBuf = device.createBuffer(
        {size: dstBuf.size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST});
    const bindGroup = device.createBindGroup({
      layout: pipeline.getBindGroupLayout(0),
      entries: [{binding: 0, resource: {buffer: srcBuf}}, {binding: 1, resource: {buffer: dstBuf}}],
    });
    const encoder = device.createCommandEncoder();
    const pass = encoder.beginComputePass();
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bindGroup);
    pass.dispatchWorkgroups(1);
    pass.end();
    encoder.copyBufferToBuffer(dstBuf, 0, readBuf, 0, dstBuf.size);
    device.queue.submit([encoder.finish()]);
    await readBuf.mapAsync(GPUMapMode.READ);
    out = new Float32Array(readBuf.getMappedRange().slice(0, outLength * 4));
    readBuf.unmap();
    [srcBuf, dstBuf, readBuf].forEach(b => b.destroy());
  } catch (e) {
    messages.push({message: `run: ${(e as Error).message}`} as GPUCompilationMessage);
  }
  for (const scope of ['validation', 'internal']) {
    const error = await device.popErrorScope();
    if (error != null) {
      messages.push({message: `${scope}: ${error.message}`} as GPUCompilationMessage);
    }
  }
  if (messages.length > 0) {
    failures++;
    console.log(`ERROR ${name}:`);
    messages.forEach(
        m => console.log(`  ${m.lineNum ?? ''}:${m.linePos ?? ''} ${m.message.slice(0, 300)}`));
    return null;
  }
  return out;
}

/** Prints PASS/FAIL for `got` against `expected` (exact), first mismatches on FAIL. */
function check(name: string, got: Float32Array|null, expected: ArrayLike<number>): void {
  if (got == null) {
    return;
  }
  const bad: string[] = [];
  let count = 0;
  for (let i = 0; i < expected.length; i++) {
    if (!(got[i] === expected[i])) {  // NaN never matches
      count++;
      if (bad.length < 6) {
        bad.push(`(${i}, ${got[i]}, ${expected[i]})`);
      }
    }
  }
  if (count > 0) {
    failures++;
  }
  console.log(
      count === 0 ?
          `PASS ${name}` :
          `FAIL ${name}: ${count}/${expected.length} wrong, (i, got, expected): ${bad.join(' ')}`);
}

/** WGSL of a matrix type: the template takes (component, columns, rows). */
function matrixType(kind: 'left'|'right'|'result', rows: number, cols: number): string {
  return `subgroup_matrix_${kind}<${kind === 'result' ? 'f32' : 'f16'}, ${cols}, ${rows}>`;
}

/** Where element (r, c) of a matrix lives in a flat array (the stand-in's definition). */
function at(off: number, stride: number, colMajor: boolean, r: number, c: number): number {
  return colMajor ? off + c * stride + r : off + r * stride + c;
}

/** `dst[0, n)` = `from[0, n)` as f32, by every lane of a `wg`-wide workgroup. */
const copyOut = (from: string, n: number, wg: number) =>
    `for (var i = lid; i < ${n}u; i += ${wg}u) { dst[i] = f32(${from}[i]); }`;
/** `to[at + i]` = `src[from + i]` for i < n, converted to `to`'s element type. */
const fill = (to: string, type: string, at: number, from: number, n: number, wg: number) =>
    `for (var i = lid; i < ${n}u; i += ${wg}u) { ${to}[${at}u + i] = ${type}(src[${from}u + i]); }`;

/** 1: load with (off, stride, colMajor), store with (off2, stride2, colMajor2). */
async function loadStore(
    device: GPUDevice, wg: number, kind: 'left'|'right'|'result', rows: number, cols: number,
    off: number, stride: number, colMajor: boolean, off2: number, stride2: number,
    colMajor2: boolean): Promise<void> {
  const elem = kind === 'result' ? 'f32' : 'f16';
  const inLen = off + Math.max(rows, cols) * stride;
  const outLen = off2 + Math.max(rows, cols) * stride2;
  const code = `${HEADER}
var<workgroup> inp: array<${elem}, ${inLen}>;
var<workgroup> outp: array<${elem}, ${outLen}>;
@compute @workgroup_size(${wg})
fn main(@builtin(local_invocation_index) lid: u32) {
  ${fill('inp', elem, 0, 0, inLen, wg)}
  ${fill('outp', elem, 0, inLen, outLen, wg)}
  workgroupBarrier();
  let m = subgroupMatrixLoad<${matrixType(kind, rows, cols)}>(&inp, ${off}u, ${colMajor}, ${
      stride}u);
  subgroupMatrixStore(&outp, ${off2}u, m, ${colMajor2}, ${stride2}u);
  workgroupBarrier();
  ${copyOut('outp', outLen, wg)}
}`;
  const input = new Float32Array(inLen + outLen).fill(-1);
  const expected = new Float32Array(outLen).fill(-1);
  for (let i = 0; i < inLen; i++) {
    input[i] = i;  // < 2048: exact in f16
  }
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      expected[at(off2, stride2, colMajor2, r, c)] = at(off, stride, colMajor, r, c);
    }
  }
  const name = `1 ${kind} ${rows}x${cols} load(off ${off}, stride ${stride}, col_major ${
      colMajor}) store(off ${off2}, stride ${stride2}, col_major ${colMajor2})`;
  check(name, await run(device, name, code, input, outLen), expected);
}

/** Small integers (exact in f16, products summed exactly in f32). */
const ints = (n: number, mul: number, mod: number) =>
    Float32Array.from({length: n}, (_, i) => (i * mul + 3) % mod - (mod >> 1));

/**
 * 2-4: per subgroup g of `groups`, out_g = reps * (A_g B_g) + C_g, with B
 * loaded col-major where `bT` (B given as its N x K transpose), the
 * accumulator loaded from C (or made by `init`, WGSL, when given).
 */
async function mma(
    device: GPUDevice, shape: MatrixShape, name: string,
    opts: {bT?: boolean, c?: boolean, reps?: number, init?: string, groups?: number} = {}):
    Promise<void> {
  const {M, N, K, lanes} = shape;
  const groups = opts.groups ?? 1;
  const wg = lanes * groups;
  const [a, b] = [ints(M * K * groups, 7, 9), ints(K * N * groups, 5, 7)];
  const c = opts.c ? ints(M * N * groups, 3, 11) : new Float32Array(M * N * groups);
  const reps = opts.reps ?? 1;
  const load =
      `subgroupMatrixLoad<${matrixType('result', M, N)}>(&cm, g * ${M * N}u, false, ${N}u)`;
  const step = `acc = subgroupMatrixMultiplyAccumulate(
      subgroupMatrixLoad<${matrixType('left', M, K)}>(&am, g * ${M * K}u, false, ${K}u),
      subgroupMatrixLoad<${matrixType('right', K, N)}>(&bm, g * ${K * N}u, ${opts.bT ?? false}, ${
      opts.bT ? K : N}u),
      acc);`;
  const [la, lb, lc] = [a.length, b.length, c.length];
  const code = `${HEADER}
var<workgroup> am: array<f16, ${la}>;
var<workgroup> bm: array<f16, ${lb}>;
var<workgroup> cm: array<f32, ${lc}>;
var<workgroup> om: array<f32, ${lc}>;  // apart from cm: no load/store overlap
@compute @workgroup_size(${wg})
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_invocation_id) sgLane: u32, @builtin(subgroup_size) sgSize: u32) {
  ${fill('am', 'f16', 0, 0, la, wg)}
  ${fill('bm', 'f16', 0, la, lb, wg)}
  ${fill('cm', 'f32', 0, la + lb, lc, wg)}
  ${fill('om', 'f32', 0, la + lb + lc, lc, wg)}
  workgroupBarrier();
  let g = lid / ${lanes}u;  // the subgroup, as the kernels derive it
  var acc = ${opts.init ?? load};
  ${step.repeat(reps)}
  subgroupMatrixStore(&om, g * ${M * N}u, acc, false, ${N}u);
  workgroupBarrier();
  ${copyOut('om', lc, wg)}
  dst[${lc}u + lid] = f32(sgLane);
  dst[${lc + wg}u + lid] = f32(sgSize);
}`;
  const expected = new Float32Array(lc + 2 * wg);
  for (let g = 0; g < groups; g++) {
    for (let r = 0; r < M; r++) {
      for (let n = 0; n < N; n++) {
        let sum = 0;
        for (let k = 0; k < K; k++) {
          const bkn = opts.bT ? b[g * K * N + n * K + k] : b[g * K * N + k * N + n];
          sum += a[g * M * K + r * K + k] * bkn;
        }
        const i = g * M * N + r * N + n;
        expected[i] = (opts.init != null ? 0 : c[i]) + reps * sum;
      }
    }
  }
  for (let i = 0; i < wg; i++) {
    expected[lc + i] = i % lanes;
    expected[lc + wg + i] = lanes;
  }
  const out = await run(
      device, name, code, Float32Array.of(...a, ...b, ...c, ...new Float32Array(lc).fill(-1)),
      expected.length);
  check(name, out?.subarray(0, lc) ?? null, expected.subarray(0, lc));
  if (groups > 1) {
    check(
        `${name}: subgroup_invocation_id == index % ${lanes}, subgroup_size == ${lanes}`,
        out?.subarray(lc) ?? null, expected.subarray(lc));
  }
}

/**
 * 6: the kernels' own pattern (flash_attention_subgroup_matrix_webgpu.ts):
 * out [M][cols] = A [M][depth] B, A row-major, B row-major [depth][cols]
 * (P V) or, where `bT`, stored [cols][depth] and loaded col-major (Q K^T);
 * per N-column block a constructed accumulator, MMAs over depth in a loop,
 * stored into a wider f32 array at the block's column.
 */
async function kernelPattern(
    device: GPUDevice, shape: MatrixShape, depth: number, cols: number,
    bT: boolean): Promise<void> {
  const {M, N, K, lanes} = shape;
  const [a, b] = [ints(M * depth, 7, 9), ints(depth * cols, 5, 7)];
  const [la, lb, lo] = [a.length, b.length, M * cols];
  const bOff = bT ? `cb * ${N * depth}u + ks * ${K}u` : `ks * ${K * cols}u + cb * ${N}u`;
  const code = `${HEADER}
var<workgroup> am: array<f16, ${la}>;
var<workgroup> bm: array<f16, ${lb}>;
var<workgroup> om: array<f32, ${lo}>;
@compute @workgroup_size(${lanes})
fn main(@builtin(local_invocation_index) lid: u32) {
  ${fill('am', 'f16', 0, 0, la, lanes)}
  ${fill('bm', 'f16', 0, la, lb, lanes)}
  workgroupBarrier();
  for (var cb = 0u; cb < ${cols / N}u; cb++) {
    var acc = ${matrixType('result', M, N)}();
    for (var ks = 0u; ks < ${depth / K}u; ks++) {
      acc = subgroupMatrixMultiplyAccumulate(
          subgroupMatrixLoad<${matrixType('left', M, K)}>(&am, ks * ${K}u, false, ${depth}u),
          subgroupMatrixLoad<${matrixType('right', K, N)}>(&bm, ${bOff}, ${bT}, ${
      bT ? depth : cols}u),
          acc);
    }
    subgroupMatrixStore(&om, cb * ${N}u, acc, false, ${cols}u);
  }
  workgroupBarrier();
  ${copyOut('om', lo, lanes)}
}`;
  const expected = new Float32Array(lo);
  for (let r = 0; r < M; r++) {
    for (let n = 0; n < cols; n++) {
      for (let k = 0; k < depth; k++) {
        expected[r * cols + n] += a[r * depth + k] * (bT ? b[n * depth + k] : b[k * cols + n]);
      }
    }
  }
  const name = `6 kernel pattern ${bT ? 'Q K^T' : 'P V'}: [${M}][${depth}] x ${
      bT ? `[${cols}][${depth}]^T` : `[${depth}][${cols}]`}`;
  check(name, await run(device, name, code, Float32Array.of(...a, ...b), lo), expected);
}

/** x rounded to the nearest f16 (ties to even; overflow to infinity), as IEEE does. */
function toF16(x: number): number {
  const a = Math.abs(x);
  if (!isFinite(a) || a === 0) {
    return x;
  }
  let e = Math.max(-14, Math.floor(Math.log2(a)));
  e += a >= 2 ** (e + 1) ? 1 : (a < 2 ** e && e > -14 ? -1 : 0);
  const ulp = 2 ** (e - 10);
  let q = Math.floor(a / ulp);
  const rest = a / ulp - q;
  q += rest > 0.5 || (rest === 0.5 && q % 2 === 1) ? 1 : 0;
  const y = q * ulp;
  return Math.sign(x) * (y > 65504 ? Infinity : y);
}

/** 5: f32(f16(x)) at runtime, and the hi/lo split the kernels store. */
async function conversions(device: GPUDevice): Promise<void> {
  const xs = Float32Array.of(
      1e5, -1e5, 65504, 65519, 65520, 70000, 1e-8, 3e-8, 6e-8, 1e-5, 0.1, 1 / 3, -2.5, Math.PI);
  const n = xs.length;
  const code = `${HEADER}
@compute @workgroup_size(1)
fn main(@builtin(local_invocation_index) lid: u32) {
  for (var i = 0u; i < ${n}u; i++) {
    let x = src[i];
    let hi = f16(x);
    dst[i] = f32(hi);
    dst[${n}u + i] = f32(f16(x - f32(hi)));
  }
}`;
  const out = await run(device, '5 f16 conversion', code, xs, 2 * n);
  if (out == null) {
    return;
  }
  const hi = Array.from(xs, toF16);
  const lo = Array.from(xs, (x, i) => toF16(Math.fround(x - hi[i])));
  for (let i = 0; i < n; i++) {
    const inRange = Math.abs(xs[i]) < 65520;
    const ok = inRange ? out[i] === hi[i] && out[n + i] === lo[i] : !isNaN(out[i]);
    failures += ok ? 0 : 1;
    console.log(`${ok ? 'PASS' : 'FAIL'} 5 f16(${xs[i]}) = ${out[i]} (IEEE ${hi[i]}), lo = ${
        out[n + i]} (IEEE ${lo[i]})${inRange ? '' : ' [out of range: only NaN fails]'}`);
  }
}

async function main(): Promise<void> {
  const {adapter, device} = await openWebGPUDevice({
    dawnFlags: TENSOR_CORE_DAWN_FLAGS,
    features: TENSOR_CORE_FEATURES,
    onError: m => console.log(m),
  });
  const info = adapter.info as unknown as {subgroupMinSize?: number, subgroupMaxSize?: number};
  console.log(`adapter: ${adapterName(adapter)}; subgroup sizes ${info.subgroupMinSize}..${
      info.subgroupMaxSize}`);
  console.log(`device features: ${
      TENSOR_CORE_FEATURES
          .map(f => `${f} ${device.features.has(f as GPUFeatureName) ? 'yes' : 'no'}`)
          .join(', ')}`);
  for (const c of subgroupMatrixConfigs(device)) {
    console.log(
        `  matrix config: M ${c.M} N ${c.N} K ${c.K} ${c.componentType} -> ${c.resultType}`);
  }
  // The harness itself, on any device: a plain f32 shader round trip.
  const plain = HEADER.split('\n').slice(4).join('\n') + `
@compute @workgroup_size(4)
fn main(@builtin(local_invocation_index) lid: u32) { dst[lid] = 2.0 * src[lid]; }`;
  check(
      '0 harness (f32 copy, no extensions)',
      await run(device, '0 harness', plain, Float32Array.of(1, 2, 3, 4), 4), [2, 4, 6, 8]);
  const shape = pickSubgroupMatrixShape(device);
  if (shape == null) {
    console.log(
        'no f16 x f16 -> f32 subgroup-matrix configuration with a fixed subgroup ' +
        'size on this device: nothing to probe');
    return;
  }
  const {M, N, K, lanes} = shape;
  console.log(`probing ${M}x${N}x${K} f16 -> f32, ${lanes} lanes`);
  for (const colMajor of [false, true]) {
    for (const stride of [16, 24]) {
      for (const off of [0, 8]) {
        await loadStore(device, lanes, 'left', M, K, off, stride, colMajor, 0, K, false);
      }
    }
  }
  for (const colMajor2 of [false, true]) {
    for (const stride2 of [16, 24]) {
      await loadStore(device, lanes, 'left', M, K, 0, K, false, 8, stride2, colMajor2);
    }
  }
  for (const colMajor of [false, true]) {
    await loadStore(device, lanes, 'right', K, N, 8, 24, colMajor, 0, N, false);
    await loadStore(device, lanes, 'result', M, N, 8, 24, colMajor, 4, 20, colMajor);
  }
  await mma(device, shape, '2 A*B, acc loaded zero');
  await mma(device, shape, '2 A*B^T, B col_major', {bT: true});
  await mma(device, shape, '2 A*B + C, acc loaded C', {c: true});
  await mma(device, shape, '2 MMA twice = 2AB', {reps: 2});
  const zero = `${matrixType('result', M, N)}()`;
  await mma(device, shape, `3 ${zero} stored (is it zero?)`, {init: zero, reps: 0});
  await mma(device, shape, `3 A*B from ${zero}`, {init: zero});
  await mma(device, shape, '4 two subgroups, own tiles at g = index / lanes', {groups: 2});
  await kernelPattern(device, shape, 64, 32, true);
  await kernelPattern(device, shape, 128, 64, true);
  await kernelPattern(device, shape, 32, 64, false);
  await conversions(device);
  console.log(failures === 0 ? 'all PASS' : `${failures} FAIL/ERROR`);
}

main().then(() => process.exit(0), e => {
  console.error(e);
  process.exit(1);
});
