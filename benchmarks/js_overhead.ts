/**
 * JavaScript time per fused attention call on the webgpu backend: how long
 * `flashAttention` (fwd) and `tf.grads` of it (fwdbwd) take to return, i.e.
 * to validate, plan and record their dispatches, before any read or wait.
 * At short sequences this, not the GPU, bounds the fused path (issue 14).
 * `decode` and `decode-rotary` time one `flashAttentionWithKVCache` step
 * (one new token appended to cache variables `[B, S, Hk, D]` at a length
 * that grows every call, as in generation; with rotary tables or not):
 * what bounds a decode step at short contexts (docs/inference.md).
 * `gen-token` times one generated token of the decode benchmark's GPT (its
 * id fed back on the device, nothing read). These record without
 * submitting until each batch's read, as generation does.
 *
 *   node js_overhead.mjs [--shape B,H,S,D] [--calls 400] [--causal]
 *       [--modes fwd,fwdbwd,decode,decode-rotary,gen-token] [--decode-shape B,H,Hk,S,D]
 *       [--profile DIR]
 *
 * Each mode runs warm-up calls (pipelines compiled), then `--calls` timed
 * calls in batches of 20; a batch ends with one read-back so the GPU queue
 * stays short, and only the time until each call returns is counted. Prints
 * the median and p10/p90 microseconds per call and the tensors left (0).
 * `--profile DIR` writes a V8 CPU profile of each mode's timed calls only
 * (warm-up and pipeline compiles excluded) to DIR/MODE.cpuprofile, and
 * prints where the calls' time went by source file (of the bundle that
 * scripts/device-bundle.sh builds): JavaScript by its file, native code
 * (Dawn's binding, V8 built-ins) by the file that called it. Sampling
 * slows the calls down: read the shares, not the microseconds.
 */
/// <reference types="@webgpu/types" />
import * as fs from 'fs';
import * as inspector from 'inspector';
import * as path from 'path';

import {webgpuCounters} from './webgpu_counters';
import {openWebGPUDevice, useWebGPUBackend} from './webgpu_setup';

function arg(argv: string[], name: string, dflt: string): string {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < argv.length ? argv[i + 1] : dflt;
}

/** Runs `inspector.Session.post` as a promise. */
function post(session: inspector.Session, method: string, params?: object): Promise<unknown> {
  return new Promise(
      (resolve, reject) => session.post(method, params, (e, r) => e ? reject(e) : resolve(r)));
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const [B, H, S, D] = arg(argv, 'shape', '1,2,64,32').split(',').map(Number);
  const calls = Number(arg(argv, 'calls', '400'));
  const modes = arg(argv, 'modes', 'fwd,fwdbwd').split(',');
  const causal = argv.includes('--causal');
  const profileDir = arg(argv, 'profile', '');
  const session = profileDir !== '' ? new inspector.Session() : null;
  session?.connect();
  const setup = await openWebGPUDevice({features: ['subgroups']});
  const tf = await import('@tensorflow/tfjs-core');
  // tfjs-core's CommonJS bundle registers no gradients; tfjs-layers' does.
  await import('@tensorflow/tfjs-layers');
  const fa = await import('../src/index');
  await useWebGPUBackend(setup);
  tf.env().set(fa.FLASH_ATTENTION_IMPL, 'fused');
  const q = tf.randomNormal([B, S, H, D]) as import('@tensorflow/tfjs-core').Tensor4D;
  const k = tf.randomNormal([B, S, H, D]) as import('@tensorflow/tfjs-core').Tensor4D;
  const v = tf.randomNormal([B, S, H, D]) as import('@tensorflow/tfjs-core').Tensor4D;
  const dy = tf.randomNormal([B, S, H, D]);
  type T = import('@tensorflow/tfjs-core').Tensor;
  const opts = {causal};
  const attend = (a: T, kk: T, vv: T) => fa.flashAttention(
      a as import('@tensorflow/tfjs-core').Tensor4D, kk as import('@tensorflow/tfjs-core').Tensor4D,
      vv as import('@tensorflow/tfjs-core').Tensor4D, opts);
  const grads = tf.grads(attend);
  const decode = decodeStep(tf, fa, arg(argv, 'decode-shape', '1,32,8,512,128'));
  const generation = modes.includes('gen-token') ?
      await generationStep(tf, 40 + calls + Math.min(calls, 200) + 1) :
      null;
  const runs: Record<string, () => T[]> = {
    fwd: () => [attend(q, k, v)],
    fwdbwd: () => grads([q, k, v], dy),
    decode: () => [decode.step(false)],
    'decode-rotary': () => [decode.step(true)],
    'gen-token': () => [generation!.step()],
  };
  console.log(`B=${B} H=${H} S=${S} D=${D} causal=${causal}; decode ${decode.shape}; ${
      calls} calls per mode; CPU-side microseconds until the call returns`);
  const submitFlag = 'WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE';
  const submitBatch = tf.env().getNumber(submitFlag);
  for (const mode of modes) {
    const run = runs[mode];
    // Decode steps and tokens are timed as generation runs them (demo/gpt.ts
    // withDeferredSubmits): no submit until the batch's read, so the GPU
    // (on a software adapter, the same CPU cores) does not run meanwhile.
    const deferred = mode.startsWith('decode') || mode === 'gen-token';
    tf.env().set(submitFlag, deferred ? 1 << 30 : submitBatch);
    const tensors0 = tf.memory().numTensors;
    const times: number[] = [];
    for (let n = -40; n < calls; n++) {
      if (n === 0 && session != null) {
        await post(session, 'Profiler.enable');
        // Microseconds: the default (about 1 ms) is longer than a call.
        await post(session, 'Profiler.setSamplingInterval', {interval: 50});
        await post(session, 'Profiler.start');
      }
      const t0 = performance.now();
      const out = timedCall(run);
      const t1 = performance.now();
      if (n >= 0) {
        times.push((t1 - t0) * 1000);
      }
      if ((n + 1) % 20 === 0) {
        await out[0].data();
      }
      tf.dispose(out);
    }
    if (session != null) {
      const {profile} = await post(session, 'Profiler.stop') as {profile: unknown};
      fs.mkdirSync(profileDir, {recursive: true});
      fs.writeFileSync(path.join(profileDir, `${mode}.cpuprofile`), JSON.stringify(profile));
      printProfileByFile(profile as CpuProfile, calls);
    }
    times.sort((a, b) => a - b);
    const at = (p: number) => times[Math.floor(p * (times.length - 1))].toFixed(1);
    console.log(`${mode}: median ${at(0.5)} us (p10 ${at(0.1)}, p90 ${at(0.9)}), tensors left ${
        tf.memory().numTensors - tensors0}`);
    // The WebGPU API calls of the same loop, counted after the timing (the
    // counters wrap the API's methods).
    const counters = webgpuCounters();
    const counted = Math.min(calls, 200);
    for (let n = 0; n < counted; n++) {
      const out = run();
      if ((n + 1) % 20 === 0) {
        await out[0].data();
      }
      tf.dispose(out);
    }
    const c = counters.snapshot();
    const per = (x: number) => (x / counted).toFixed(2);
    console.log(`  per call: ${per(c.dispatches)} dispatches, ${per(c.bindGroups)} bind groups, ${
        per(c.writeBuffers)} buffer writes, ${per(c.hostUploads)} uploads, ${
        per(c.submits)} submits (${counted} calls, a read every 20)`);
  }
  tf.dispose([q, k, v, dy]);
  decode.dispose();
  generation?.dispose();
}

/** The timed call (the profile summary counts samples under this frame). */
function timedCall<R>(run: () => R): R {
  return run();
}

/** The parts of a V8 CPU profile (Profiler.stop) the summary reads. */
interface CpuProfile {
  nodes: Array<{
    id: number,
    callFrame: {functionName: string, url: string, lineNumber: number},
    children?: number[]
  }>;
  samples: number[];
  timeDeltas: number[];
}

/**
 * The source file of each line of this bundle: esbuild starts every module
 * with a `// path` comment. Empty when not running from a bundle.
 */
function bundleFiles(): Array<[number, string]> {
  const starts: Array<[number, string]> = [];
  const bundle = process.argv[1] ?? '';
  if (!bundle.endsWith('.mjs') || !fs.existsSync(bundle)) {
    return starts;
  }
  fs.readFileSync(bundle, 'utf8').split('\n').forEach((line, n) => {
    const m = /^\/\/ ((?:node_modules\/)?[\w@./-]+\.[cm]?[jt]s)$/.exec(line);
    if (m != null) {
      starts.push([n, m[1].replace(/^node_modules\/@tensorflow\//, '').replace('/dist/', '/')]);
    }
  });
  return starts;
}

/**
 * Prints the microseconds per call of the samples under `timedCall`, by
 * source file: a JavaScript frame's own file, native frames (Dawn's
 * binding, V8 built-ins) as `native < FILE` of their nearest JavaScript
 * caller, the garbage collector apart.
 */
function printProfileByFile(profile: CpuProfile, calls: number): void {
  const starts = bundleFiles();
  const fileOf = (line: number, url: string) => {
    if (starts.length === 0) {
      return url;
    }
    let lo = 0;
    let hi = starts.length - 1;
    let found = '?';
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (starts[mid][0] <= line) {
        found = starts[mid][1];
        lo = mid + 1;
      } else {
        hi = mid - 1;
      }
    }
    return found;
  };
  const byId = new Map(profile.nodes.map(n => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of profile.nodes) {
    for (const c of n.children ?? []) {
      parent.set(c, n.id);
    }
  }
  const micros = new Map<string, number>();
  let total = 0;
  profile.samples.forEach((id, i) => {
    let category: string|null = null;
    let inCall = false;
    for (let at: number|undefined = id; at != null; at = parent.get(at)) {
      const frame = byId.get(at)!.callFrame;
      if (frame.functionName === 'timedCall') {
        inCall = true;
        break;
      }
      const isJS = frame.url !== '' && frame.lineNumber >= 0;
      if (category == null) {
        category = isJS                                  ? fileOf(frame.lineNumber, frame.url) :
            frame.functionName === '(garbage collector)' ? 'garbage collector' :
                                                           'native';
      } else if (category === 'native' && isJS) {
        category = `native < ${fileOf(frame.lineNumber, frame.url)}`;
      }
    }
    if (inCall) {
      const dt = profile.timeDeltas[i] ?? 0;
      total += dt;
      micros.set(category!, (micros.get(category!) ?? 0) + dt);
    }
  });
  console.log(`  profile: ${(total / calls).toFixed(1)} us per call sampled, by file:`);
  [...micros].sort((a, b) => b[1] - a[1]).slice(0, 25).forEach(([file, us]) => {
    console.log(`    ${(100 * us / total).toFixed(1).padStart(5)}%  ${
        (us / calls).toFixed(1).padStart(7)} us  ${file}`);
  });
}

/**
 * One generated token of the demo GPT (4 blocks of FlashMHA width 256, as
 * benchmarks/decode.ts generates): an IncrementalDecoder step on the
 * previous id tensor and the argmax of its logits, nothing read.
 */
async function generationStep(tf: TF, tokens: number) {
  const {buildGPT} = await import('../demo/gpt');
  const {flashMHA, IncrementalDecoder} = await import('../src/layers');
  const model =
      buildGPT({numLayers: 4, embedDim: 256, numHeads: 4, vocabSize: 64}, flashMHA, 'js', 'fused');
  const decoder = new IncrementalDecoder(model, {batch: 1, maxSeqLen: tokens + 2});
  let id = tf.tensor2d([[1]], [1, 1], 'int32') as import('@tensorflow/tfjs-core').Tensor;
  const step = () => {
    const next = tf.tidy(() => tf.reshape(tf.argMax(tf.reshape(decoder.step(id), [-1])), [1, 1]));
    id.dispose();
    id = next;
    return tf.clone(next);
  };
  // The layers make their rotary tables on first use (kept until disposed).
  step().dispose();
  return {
    step,
    dispose() {
      id.dispose();
      decoder.dispose();
      model.dispose();
    },
  };
}

type TF = typeof import('@tensorflow/tfjs-core');
type FA = typeof import('../src/index');

/**
 * One decode step of a generation: q `[B, 1, H, D]`, the new key and value
 * appended at a length that grows by one per call (wrapping around before
 * the cache is full), causal, rotary tables optional.
 */
function decodeStep(tf: TF, fa: FA, shapeArg: string) {
  const [B, H, Hk, S, D] = shapeArg.split(',').map(Number);
  type T4 = import('@tensorflow/tfjs-core').Tensor4D;
  type T2 = import('@tensorflow/tfjs-core').Tensor2D;
  const owned = (shape: number[]) => {
    const init = tf.randomNormal(shape);
    const variable = tf.variable(init, false) as
        import('@tensorflow/tfjs-core').Variable<import('@tensorflow/tfjs-core').Rank.R4>;
    init.dispose();
    return variable;
  };
  const kCache = owned([B, S, Hk, D]);
  const vCache = owned([B, S, Hk, D]);
  const q = tf.randomNormal([B, 1, H, D]) as T4;
  const k = tf.randomNormal([B, 1, Hk, D]) as T4;
  const v = tf.randomNormal([B, 1, Hk, D]) as T4;
  const rotaryCos = tf.randomUniform([S, D / 2]) as T2;
  const rotarySin = tf.randomUniform([S, D / 2]) as T2;
  let length = S / 2;
  return {
    shape: `B=${B} H=${H} Hk=${Hk} cache S=${S} D=${D}`,
    step(rotary: boolean) {
      length = length + 1 < S ? length + 1 : S / 2;
      const tables = rotary ? {rotaryCos, rotarySin} : {};
      return fa.flashAttentionWithKVCache(
          q, kCache, vCache,
          {k, v, cacheSeqlens: new Array(B).fill(length), causal: true, ...tables});
    },
    dispose() {
      tf.dispose([kCache, vCache, q, k, v, rotaryCos, rotarySin]);
    },
  };
}

main().catch(e => {
  console.error(e);
  process.exit(1);
});
