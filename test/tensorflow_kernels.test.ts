/**
 * The `tensorflow` backend's fused kernels without libtensorflow or a GPU:
 *
 * 1. The custom-op library's C code (kernels/tensorflow/flash_attention_op.cc)
 *    loaded by a test double of TensorFlow's C API (test/cuda/fake_tf.cc):
 *    what it registers, and what its Compute does with attrs, shapes,
 *    outputs, workspace, stream and errors.
 * 2. The TypeScript kernels on a stand-in of tfjs-node's backend (the cpu
 *    backend registered as `tensorflow`, whose executeMultipleOutputs runs
 *    the custom ops as the float64 oracle would): the ops and gradients go
 *    through the kernels with the right op names and attributes, match the
 *    oracle, and leak nothing.
 * 3. registerTensorflowKernels: registers only when the library loads, else
 *    logs one line saying why.
 */
import {execFileSync} from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import * as tf from '@tensorflow/tfjs-core';
import {MathBackendCPU} from '@tensorflow/tfjs-backend-cpu';
import '@tensorflow/tfjs-layers';

import {FLASH_ATTENTION_IMPL, FlashAttention, FlashAttentionGrad, flashAttention, hasFusedKernel} from '../src';
import {tensorflowOpAttrs, TFEOpAttr, TF_BACKWARD_OP, TF_FORWARD_OP} from '../kernels/tensorflow/flash_attention_tensorflow';
import {BUILD_DIR_ENV, OP_LIBRARY, registerTensorflowKernels, resetTensorflowKernelsForTests} from '../kernels/tensorflow/register';

import {oracleBackward, oracleForward, OracleOptions, OracleProblem} from './oracle';
import {expectClose, FORWARD_BOUND, freshRng, GRADIENT_BOUND, makeProblem} from './harness/problems';

const root = path.join(__dirname, '..');
// Silences tfjs's advice to install tfjs-node.
tf.env().set('IS_TEST', true);

function hasCompiler(): boolean {
  try {
    execFileSync('g++', ['--version'], {stdio: 'ignore'});
    return true;
  } catch {
    return false;
  }
}

// The C part needs a C++ compiler (always there where the library is built);
// without one it is reported as skipped, never as passed.
const describeWithCompiler = hasCompiler() ? describe : describe.skip;

describeWithCompiler('custom-op library on a fake TensorFlow C API', () => {
  let lines: Array<Record<string, unknown>>;
  let tmp: string;

  beforeAll(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'fa-fake-tf-'));
    const fake = path.join(tmp, 'fake_tf');
    const lib = path.join(tmp, 'libops.so');
    execFileSync('g++', [
      '-std=c++17', '-O1', '-Wall', '-Werror', '-rdynamic', path.join(root, 'test/cuda/fake_tf.cc'),
      path.join(root, 'test/cuda/fake_fa.cc'), '-ldl', '-o', fake
    ]);
    // As scripts/build-cuda.js builds it, minus the CUDA object and
    // libtensorflow: the TF_* and fa_* symbols come from the fake.
    execFileSync('g++', [
      '-std=c++17', '-O1', '-Wall', '-Wextra', '-Werror', '-fPIC', '-shared',
      path.join(root, 'kernels/tensorflow/flash_attention_op.cc'), '-o', lib
    ]);
    const out = execFileSync(fake, [lib], {encoding: 'utf8'});
    lines = out.trim().split('\n').map(l => JSON.parse(l));
  }, 120000);

  afterAll(() => fs.rmSync(tmp, {recursive: true, force: true}));

  const find = (key: string, value: string) =>
      lines.find(l => l[key] === value) as Record<string, any>;

  it('registers both ops with their inputs, outputs, attrs and a shape function', () => {
    expect(find('load', 'ok')).toBeDefined();
    const attrs = [
      'softmax_scale: float', 'window_left: int', 'window_right: int', 'softcap: float',
      'dropout_rate: float', 'seed_lo: int', 'seed_hi: int'
    ];
    expect(find('op', TF_FORWARD_OP)).toEqual({
      op: TF_FORWARD_OP,
      inputs: ['q: float', 'k: float', 'v: float', 'alibi_slopes: float'],
      outputs: ['out: float', 'softmax_lse: float'],
      attrs,
      shape_fn: true
    });
    expect(find('op', TF_BACKWARD_OP)).toEqual({
      op: TF_BACKWARD_OP,
      inputs: [
        'dy: float', 'd_lse: float', 'q: float', 'k: float', 'v: float', 'out: float',
        'softmax_lse: float', 'alibi_slopes: float'
      ],
      outputs: ['dq: float', 'dk: float', 'dv: float'],
      attrs,
      shape_fn: true
    });
    expect(find('kernel', TF_FORWARD_OP)).toEqual({kernel: TF_FORWARD_OP, device: 'GPU'});
    expect(find('kernel', TF_BACKWARD_OP)).toEqual({kernel: TF_BACKWARD_OP, device: 'GPU'});
    // Loading again registers nothing twice.
    expect(lines[lines.length - 1]).toEqual({reload: 'ok', ops: 2, kernels: 2});
  });

  it('forward: attrs and shapes reach the CUDA ABI, outputs are allocated and written', () => {
    const s = find('scenario', 'forward');
    expect(s.error).toBe('');
    expect(s.failures).toBe(0);
    expect(s.outputs).toEqual(
        [{shape: [2, 5, 4, 3], first: 6, last: 6}, {shape: [2, 4, 5], first: -1.5, last: -1.5}]);
    expect(s.call).toEqual({
      fn: 'fa_forward',
      params: {
        batch: 2,
        seq_q: 5,
        seq_k: 6,
        heads: 4,
        heads_kv: 2,
        head_dim: 8,
        head_dim_v: 3,
        softmax_scale: 0.25,
        window_left: 7,
        window_right: 0,
        softcap: 3.5,
        dropout_rate: 0.125,
        seed_lo: 4294967295,
        seed_hi: 12,
        alibi_kind: 0
      },
      alibi: false,
      workspace: true,
      legacy_stream: true,
      device_selected: true
    });
    expect(s.temps).toBe(1);
    expect(s.leaked_handles).toBe(0);
    expect(find('scenario', 'forward alibi [B,H]').call.params.alibi_kind).toBe(2);
    expect(find('scenario', 'forward alibi [H]').call.params.alibi_kind).toBe(1);
  });

  it('backward: three outputs shaped like q, k, v', () => {
    const s = find('scenario', 'backward');
    expect(s.error).toBe('');
    expect(s.outputs.map((o: any) => o.shape)).toEqual([[2, 5, 4, 8], [2, 6, 2, 8], [2, 6, 2, 3]]);
    expect(s.outputs.map((o: any) => o.first)).toEqual([1, 2, 3]);
    expect(s.call.fn).toBe('fa_backward');
    expect(s.call.legacy_stream).toBe(true);
    expect(s.call.params.alibi_kind).toBe(1);
    expect(s.leaked_handles).toBe(0);
  });

  it('bad inputs fail the op with a message naming the argument, before any kernel', () => {
    const expected: Array<[string, string]> = [
      ['bad k', 'k must have shape [2, 6, 2, 8], got [2, 6, 2, 9]'],
      ['bad heads', 'heads of q (3) must be a multiple of heads of k (2)'],
      ['bad alibi', 'alibi_slopes must have shape [0], [4] or [2, 4], got [5]'],
      ['bad dtype', 'q must be float32, got dtype 4'],
      ['bad rank', 'q must have rank 4, got shape [2, 5, 4]'],
      ['backward bad lse', 'softmax_lse must have shape [2, 4, 5], got [2, 5, 4]'],
    ];
    for (const [name, message] of expected) {
      const s = find('scenario', name);
      expect({name, error: s.error, failures: s.failures, call: s.call})
          .toEqual({name, error: message, failures: 1, call: null});
      expect(s.leaked_handles).toBe(0);
    }
    expect(find('scenario', 'missing attr').construction_error).toBe('no attr named window_left');
    const failed = find('scenario', 'kernel error');
    expect(failed.error).toBe(`${TF_FORWARD_OP}: fake kernel failure`);
    expect(failed.leaked_handles).toBe(0);
    // Outputs were allocated, but the kernel wrote nothing (still NaN).
    expect(failed.outputs[0].first).toBeNull();
  });
});

// ------------------------------------------------------------------ 2.

const ATTR_INT = 3;  // any distinct numbers: the stand-in decodes them back
const ATTR_FLOAT = 2;

interface RecordedCall {
  name: string;
  attrs: TFEOpAttr[];
  shapes: number[][];
}

/**
 * The cpu backend dressed as tfjs-node-gpu's: executeMultipleOutputs runs
 * the two custom ops as the float64 oracle, from the attrs it is given.
 */
class TensorflowStandIn extends MathBackendCPU {
  binding = {TF_ATTR_INT: ATTR_INT, TF_ATTR_FLOAT: ATTR_FLOAT};
  isGPUPackage = true;
  calls: RecordedCall[] = [];

  executeMultipleOutputs(
      name: string, opAttrs: TFEOpAttr[], inputs: tf.TensorInfo[],
      numOutputs: number): tf.Tensor[] {
    this.calls.push({name, attrs: opAttrs, shapes: inputs.map(t => t.shape)});
    const attr = (n: string, type: number) => {
      const a = opAttrs.find(x => x.name === n);
      if (a == null || a.type !== type) {
        throw new Error(`attr ${n} missing or of the wrong type`);
      }
      return a.value as number;
    };
    const options: OracleOptions = {
      softmaxScale: attr('softmax_scale', ATTR_FLOAT),
      windowSize: [attr('window_left', ATTR_INT), attr('window_right', ATTR_INT)],
      softcap: attr('softcap', ATTR_FLOAT),
      dropoutRate: attr('dropout_rate', ATTR_FLOAT),
      seed: attr('seed_hi', ATTR_INT) * 2 ** 32 + attr('seed_lo', ATTR_INT),
    };
    const read = (t: tf.TensorInfo) => Float64Array.from(this.readSync(t.dataId) as Float32Array);
    const qi = name === TF_FORWARD_OP ? 0 : 2;
    const [q, k, v, slopes] =
        [inputs[qi], inputs[qi + 1], inputs[qi + 2], inputs[inputs.length - 1]];
    const problem: OracleProblem = {
      batch: q.shape[0],
      seqQ: q.shape[1],
      heads: q.shape[2],
      headDim: q.shape[3],
      seqK: k.shape[1],
      headsKV: k.shape[2],
      headDimV: v.shape[3],
      q: read(q),
      k: read(k),
      v: read(v),
      alibiSlopes: slopes.shape[0] === 0 ? null : read(slopes),
    };
    const make = (values: Float64Array, shape: number[]) => tf.engine().makeTensorFromTensorInfo(
        this.makeTensorInfo(shape, 'float32', Float32Array.from(values)), this);
    let outs: tf.Tensor[];
    if (name === TF_FORWARD_OP) {
      const {out, lse} = oracleForward(problem, options);
      outs = [
        make(out, [...q.shape.slice(0, 3), v.shape[3]]),
        make(lse, [q.shape[0], q.shape[2], q.shape[1]])
      ];
    } else if (name === TF_BACKWARD_OP) {
      const g = oracleBackward(problem, options, read(inputs[0]), read(inputs[1]));
      outs = [make(g.dq, q.shape), make(g.dk, k.shape), make(g.dv, v.shape)];
    } else {
      throw new Error(`unknown op ${name}`);
    }
    expect(outs.length).toBe(numOutputs);
    return outs;
  }
}

describe('tensorflow-backend kernels on a stand-in of tfjs-node-gpu', () => {
  let backend: TensorflowStandIn;
  const copied: string[] = [];

  beforeAll(async () => {
    // The other kernels the ops and the losses use, as the cpu backend has them.
    for (const k of tf.getKernelsForBackend('cpu')) {
      if (tf.getKernel(k.kernelName, 'tensorflow') == null) {
        tf.registerKernel({...k, backendName: 'tensorflow'});
        copied.push(k.kernelName);
      }
    }
    backend = new TensorflowStandIn();
    tf.registerBackend('tensorflow', () => backend, 0);
    resetTensorflowKernelsForTests();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fa-build-'));
    fs.writeFileSync(path.join(dir, OP_LIBRARY), '');
    process.env[BUILD_DIR_ENV] = dir;
    const loaded: string[] = [];
    const result = registerTensorflowKernels({loadLibrary: p => (loaded.push(p), null)});
    expect(result).toEqual({registered: true, libraryPath: path.join(dir, OP_LIBRARY)});
    expect(loaded).toEqual([path.join(dir, OP_LIBRARY)]);
    await tf.setBackend('tensorflow');
    tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
  });

  afterAll(async () => {
    tf.env().set(FLASH_ATTENTION_IMPL, 'auto');
    await tf.setBackend('cpu');
    tf.removeBackend('tensorflow');
    for (const name of [...copied, FlashAttention, FlashAttentionGrad]) {
      tf.unregisterKernel(name, 'tensorflow');
    }
    delete process.env[BUILD_DIR_ENV];
    resetTensorflowKernelsForTests();
  });

  it('forward and gradients run the custom ops with every option and match the oracle', () => {
    const rng = freshRng();
    const shape = {
      batch: 2,
      seqQ: 7,
      seqK: 9,
      heads: 4,
      headsKV: 2,
      headDim: 5,
      headDimV: 3,
      alibi: 'batch' as const
    };
    const p = makeProblem(shape, rng);
    const seed = 2 ** 40 + 77;
    const opts = {
      causal: true,
      windowSize: [4, -1] as [number, number],
      softcap: 2.5,
      alibiSlopes: p.alibiSlopes,
      dropoutRate: 0.25,
      seed,
      softmaxScale: 0.6
    };
    const oracleOpts: OracleOptions = {
      causal: true,
      windowSize: [4, -1],
      softcap: 2.5,
      dropoutRate: 0.25,
      seed,
      softmaxScale: 0.6
    };
    const dOut = tf.randomNormal([2, 7, 4, 3], 0, 1, 'float32', rng.int(0, 1e6)) as tf.Tensor4D;
    const start = tf.memory().numTensors;
    backend.calls = [];
    const [out, lse] = flashAttention(p.q, p.k, p.v, {...opts, returnSoftmaxLse: true});
    const grads = tf.grads(
        (q: tf.Tensor, k: tf.Tensor, v: tf.Tensor) => tf.sum(tf.mul(
            flashAttention(q as tf.Tensor4D, k as tf.Tensor4D, v as tf.Tensor4D, opts), dOut)))(
        [p.q, p.k, p.v]);
    const ref = oracleForward(p.oracle, oracleOpts);
    const refGrads = oracleBackward(
        p.oracle, oracleOpts, Float64Array.from(dOut.dataSync()), new Float64Array(2 * 4 * 7));
    const what = `seed ${rng.seed}`;
    expectClose(out.dataSync(), ref.out, FORWARD_BOUND, `${what} out`);
    expectClose(lse.dataSync(), ref.lse, FORWARD_BOUND, `${what} lse`);
    expectClose(grads[0].dataSync(), refGrads.dq, GRADIENT_BOUND, `${what} dq`);
    expectClose(grads[1].dataSync(), refGrads.dk, GRADIENT_BOUND, `${what} dk`);
    expectClose(grads[2].dataSync(), refGrads.dv, GRADIENT_BOUND, `${what} dv`);
    // Which ops ran, with which attributes.
    expect(backend.calls.map(c => c.name)).toEqual([TF_FORWARD_OP, TF_FORWARD_OP, TF_BACKWARD_OP]);
    const attrs = Object.fromEntries(backend.calls[2].attrs.map(a => [a.name, [a.type, a.value]]));
    expect(attrs).toEqual({
      // The op passes the float32 the kernels compute with (Math.fround).
      softmax_scale: [ATTR_FLOAT, Math.fround(0.6)],
      window_left: [ATTR_INT, 4],
      window_right: [ATTR_INT, 0],
      softcap: [ATTR_FLOAT, 2.5],
      dropout_rate: [ATTR_FLOAT, 0.25],
      seed_lo: [ATTR_INT, 77],
      seed_hi: [ATTR_INT, 256]
    });
    expect(backend.calls[2].shapes).toEqual([
      [2, 7, 4, 3], [2, 4, 7], [2, 7, 4, 5], [2, 9, 2, 5], [2, 9, 2, 3], [2, 7, 4, 3], [2, 4, 7],
      [2, 4]
    ]);
    tf.dispose([out, lse, ...grads]);
    expect(tf.memory().numTensors).toBe(start);
    tf.dispose(dOut);
    p.dispose();
  });

  it('without ALiBi the kernels get the [0] slopes placeholder', () => {
    const rng = freshRng();
    const p = makeProblem(
        {batch: 1, seqQ: 4, seqK: 4, heads: 2, headsKV: 2, headDim: 3, headDimV: 3}, rng);
    backend.calls = [];
    const out = flashAttention(p.q, p.k, p.v);
    expectClose(out.dataSync(), oracleForward(p.oracle, {}).out, FORWARD_BOUND, `seed ${rng.seed}`);
    expect(backend.calls[0].shapes[3]).toEqual([0]);
    expect(backend.calls[0].attrs.find(a => a.name === 'window_left')!.value).toBe(-1);
    tf.dispose(out);
    p.dispose();
  });

  it('the example of docs/cuda.md runs the fused kernel', () => {
    const doc = fs.readFileSync(path.join(root, 'docs', 'cuda.md'), 'utf8');
    const code = /```js\n([\s\S]*?)```/.exec(doc)![1];
    const modules: Record<string, () => unknown> = {
      // tfjs-node-gpu's import registers its backend: here the stand-in is.
      '@tensorflow/tfjs-node-gpu': () => tf,
      'tfjs-flash-attention': () => require('../src'),
      // The registration state is the one beforeAll made (library "loaded").
      'tfjs-flash-attention/tensorflow': () => require('../kernels/tensorflow'),
    };
    const fakeRequire = (name: string) => {
      if (!(name in modules)) {
        throw new Error(`the example requires ${name}`);
      }
      return modules[name]();
    };
    const rng = freshRng();
    const p = makeProblem(
        {batch: 1, seqQ: 6, seqK: 6, heads: 2, headsKV: 1, headDim: 4, headDimV: 4}, rng);
    backend.calls = [];
    const out = new Function('require', 'q', 'k', 'v', `${code}\nreturn out;`)(
                    fakeRequire, p.q, p.k, p.v) as tf.Tensor;
    expect(backend.calls.map(c => c.name)).toEqual([TF_FORWARD_OP]);
    expect(require('../kernels/tensorflow').tensorflowKernels.registered).toBe(true);
    expectClose(
        out.dataSync(), oracleForward(p.oracle, {causal: true}).out, FORWARD_BOUND,
        `seed ${rng.seed}`);
    tf.dispose(out);
    p.dispose();
  });

  it('op attrs are the normalized attrs, typed by the binding', () => {
    expect(tensorflowOpAttrs(backend, {
      softmaxScale: 0.5,
      causal: false,
      windowLeft: -1,
      windowRight: 3,
      softcap: 0,
      dropoutRate: 0,
      seedLo: 1,
      seedHi: 2
    }))
        .toEqual([
          {name: 'softmax_scale', type: ATTR_FLOAT, value: 0.5},
          {name: 'window_left', type: ATTR_INT, value: -1},
          {name: 'window_right', type: ATTR_INT, value: 3},
          {name: 'softcap', type: ATTR_FLOAT, value: 0},
          {name: 'dropout_rate', type: ATTR_FLOAT, value: 0},
          {name: 'seed_lo', type: ATTR_INT, value: 1},
          {name: 'seed_hi', type: ATTR_INT, value: 2},
        ]);
  });
});

// ------------------------------------------------------------------ 3.

describe('registerTensorflowKernels', () => {
  afterEach(() => {
    delete process.env[BUILD_DIR_ENV];
    resetTensorflowKernelsForTests();
    if (tf.findBackend('tensorflow') != null) {
      tf.removeBackend('tensorflow');
    }
    for (const name of [FlashAttention, FlashAttentionGrad]) {
      if (tf.getKernel(name, 'tensorflow') != null) {
        tf.unregisterKernel(name, 'tensorflow');
      }
    }
  });

  function attempt(loadLibrary?: (p: string) => string | null) {
    resetTensorflowKernelsForTests();
    const logged: string[] = [];
    const result = registerTensorflowKernels({log: m => logged.push(m), loadLibrary});
    return {result, logged};
  }

  function expectNotRegistered(logged: string[], reason: RegExp) {
    expect(logged.length).toBe(1);
    expect(logged[0]).toMatch(
        /^tfjs-flash-attention: fused CUDA kernels not registered for the tensorflow backend \(/);
    expect(logged[0]).toMatch(reason);
    expect(hasFusedKernel(FlashAttention, 'tensorflow')).toBe(false);
    expect(hasFusedKernel(FlashAttentionGrad, 'tensorflow')).toBe(false);
  }

  it('without a tensorflow backend: not registered, one line why', () => {
    const {result, logged} = attempt(() => null);
    expect(result.registered).toBe(false);
    expectNotRegistered(logged, /import @tensorflow\/tfjs-node-gpu before/);
  });

  it('with the CPU tfjs-node: not registered', () => {
    tf.registerBackend(
        'tensorflow', () => Object.assign(new MathBackendCPU(), {isGPUPackage: false}), 0);
    const {result, logged} = attempt(() => null);
    expect(result.registered).toBe(false);
    expectNotRegistered(logged, /@tensorflow\/tfjs-node \(CPU\)/);
  });

  it('library not built: not registered, and the loader is never called', () => {
    tf.registerBackend(
        'tensorflow', () => Object.assign(new MathBackendCPU(), {isGPUPackage: true}), 0);
    process.env[BUILD_DIR_ENV] = fs.mkdtempSync(path.join(os.tmpdir(), 'fa-empty-'));
    let called = false;
    const {result, logged} = attempt(() => (called = true, null));
    expect(result.registered).toBe(false);
    expect(called).toBe(false);
    expectNotRegistered(logged, /was not built at install/);
  });

  it('TensorFlow refuses the library: not registered, its message logged', () => {
    tf.registerBackend(
        'tensorflow', () => Object.assign(new MathBackendCPU(), {isGPUPackage: true}), 0);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fa-build-'));
    fs.writeFileSync(path.join(dir, OP_LIBRARY), '');
    process.env[BUILD_DIR_ENV] = dir;
    const {result, logged} = attempt(() => 'undefined symbol: TF_Foo');
    expect(result).toEqual({
      registered: false,
      libraryPath: path.join(dir, OP_LIBRARY),
      reason: expect.stringContaining('undefined symbol: TF_Foo')
    });
    expectNotRegistered(logged, /TensorFlow did not load .*undefined symbol: TF_Foo/);
  });

  it('loads with the real N-API loader path when no loader is given (addon missing here)', () => {
    tf.registerBackend(
        'tensorflow', () => Object.assign(new MathBackendCPU(), {isGPUPackage: true}), 0);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fa-build-'));
    fs.writeFileSync(path.join(dir, OP_LIBRARY), '');
    process.env[BUILD_DIR_ENV] = dir;
    const {result, logged} = attempt();
    expect(result.registered).toBe(false);
    expectNotRegistered(logged, /tfjs_flash_attention_loader\.node/);
  });
});
