/**
 * The demo page (demo/web/index.html, `npm run serve`): flashAttention and
 * the composed matMul + softmax attention on WebGPU, checked against the
 * cpu backend and timed. Bundled by esbuild the way a user's bundler would
 * bundle it: `tfjs-flash-attention` is the package's built ES module.
 */
import * as tf from '@tensorflow/tfjs';
import '@tensorflow/tfjs-backend-webgpu';
import {FLASH_ATTENTION_IMPL, FlashAttention, flashAttention, FlashAttentionGrad, hasFusedKernel, MAX_HEAD_DIM, version} from 'tfjs-flash-attention';

import {composedAttention} from '../../benchmarks/baselines';
import {buildGPT, CharTokenizer, generate, generateWithCache, seededRandom} from '../gpt';
// The comparison rule of the tests (docs/design.md, "Accuracy bounds"), so the page's readout
// means what the test suite's bounds mean.
import {discrepancy, FORWARD_BOUND, GRADIENT_BOUND, Rng} from '../../test/harness/problems';

interface Settings {
  batch: number;
  seq: number;
  heads: number;
  headDim: number;
  causal: boolean;
  backward: boolean;
  reps: number;
  impl: string;
  checkCpu: boolean;
}

type Attention = (q: tf.Tensor4D, k: tf.Tensor4D, v: tf.Tensor4D, causal: boolean) => tf.Tensor4D;

interface Method {
  name: string;
  attention: Attention;
  /** Which implementation ran, from the kernels tf.profile saw. */
  describePath(kernelNames: string[], backward: boolean): string;
}

const METHODS: Method[] = [
  {
    name: 'flashAttention',
    attention: (q, k, v, causal) => flashAttention(q, k, v, {causal}),
    describePath: (kernelNames, backward) => {
      const forward = kernelNames.includes(FlashAttention) ? 'fused kernel' : 'composed reference';
      if (!backward) {
        return forward;
      }
      return `${forward}, ${
          kernelNames.includes(FlashAttentionGrad) ? 'fused' : 'reference'} backward`;
    },
  },
  {
    name: 'composed matMul + softmax',
    attention: (q, k, v, causal) => composedAttention(q, k, v, {causal}),
    describePath: () => 'tfjs ops',
  },
];

interface Inputs {
  q: Float32Array;
  k: Float32Array;
  v: Float32Array;
  dOut: Float32Array;
}

interface Measurement {
  method: Method;
  path: string;
  medianMs: number;
  peakBytes: number;
  /** Per output (out, or dq/dk/dv): relative error against the cpu backend. */
  errors: {name: string, error: number, bad: string|null, bound: number}[];
}

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

function readSettings(): Settings {
  const int = (id: string) => {
    const input = $<HTMLInputElement>(id);
    const value = Number(input.value);
    const [min, max] = [Number(input.min), Number(input.max)];
    if (!Number.isInteger(value) || value < min || value > max) {
      throw new Error(`${input.parentElement!.textContent!.trim()} must be an integer in [${min}, ${
          max}], got ${JSON.stringify(input.value)}`);
    }
    return value;
  };
  return {
    batch: int('batch'),
    seq: int('seq'),
    heads: int('heads'),
    headDim: int('head-dim'),
    causal: $<HTMLInputElement>('causal').checked,
    backward: $<HTMLSelectElement>('pass').value === 'backward',
    reps: int('reps'),
    impl: $<HTMLSelectElement>('impl').value,
    checkCpu: $<HTMLInputElement>('check-cpu').checked,
  };
}

function randomInputs(s: Settings, rng: Rng): Inputs {
  const normals = (n: number) => Float32Array.from({length: n}, () => rng.normal());
  const size = s.batch * s.seq * s.heads * s.headDim;
  return {q: normals(size), k: normals(size), v: normals(size), dOut: normals(size)};
}

/**
 * One call of a method on the active backend, inside a tidy: `[out]`, or
 * the gradients `[dq, dk, dv]` of sum(out * dOut).
 */
function callOnce(method: Method, s: Settings, t: Record<keyof Inputs, tf.Tensor4D>): tf.Tensor[] {
  return tf.tidy(() => {
    if (!s.backward) {
      return [method.attention(t.q, t.k, t.v, s.causal)];
    }
    const loss = (q: tf.Tensor, k: tf.Tensor, v: tf.Tensor) => tf.sum(tf.mul(
        method.attention(q as tf.Tensor4D, k as tf.Tensor4D, v as tf.Tensor4D, s.causal), t.dOut));
    return tf.grads(loss)([t.q, t.k, t.v]);
  });
}

function outputNames(s: Settings): string[] {
  return s.backward ? ['dq', 'dk', 'dv'] : ['out'];
}

/** Waits until the tensors are computed, reading back one element of each. */
async function settle(tensors: tf.Tensor[]): Promise<void> {
  const probes = tf.tidy(() => tensors.map(t => tf.slice(tf.reshape(t, [-1]), 0, 1)));
  await Promise.all(probes.map(p => p.data()));
  tf.dispose(probes);
}

/** Runs `body` with the inputs as tensors on the active backend, then frees them. */
async function withInputs<T>(
    s: Settings, inputs: Inputs,
    body: (t: Record<keyof Inputs, tf.Tensor4D>) => Promise<T>): Promise<T> {
  const shape: [number, number, number, number] = [s.batch, s.seq, s.heads, s.headDim];
  const t = {
    q: tf.tensor4d(inputs.q, shape),
    k: tf.tensor4d(inputs.k, shape),
    v: tf.tensor4d(inputs.v, shape),
    dOut: tf.tensor4d(inputs.dOut, shape),
  };
  try {
    return await body(t);
  } finally {
    tf.dispose(Object.values(t));
  }
}

/** The cpu backend's flashAttention (the package's reference), read back. */
async function cpuExpected(s: Settings, inputs: Inputs): Promise<Float32Array[]> {
  await switchBackend('cpu');
  tf.env().set(FLASH_ATTENTION_IMPL, 'reference');
  return withInputs(s, inputs, async t => {
    const outputs = callOnce(METHODS[0], s, t);
    const values = await Promise.all(outputs.map(o => o.data() as Promise<Float32Array>));
    tf.dispose(outputs);
    return values;
  });
}

async function measure(method: Method, s: Settings, inputs: Inputs, expected: Float32Array[]|null):
    Promise<Measurement> {
  await switchBackend('webgpu');
  tf.env().set(FLASH_ATTENTION_IMPL, s.impl);
  return withInputs(s, inputs, async t => {
    // First call, profiled: which kernels ran, peak memory, the values.
    const profile = await tf.profile(() => callOnce(method, s, t));
    const outputs = profile.result as tf.Tensor[];
    const values = await Promise.all(outputs.map(o => o.data() as Promise<Float32Array>));
    tf.dispose(outputs);
    const times: number[] = [];
    for (let rep = 0; rep <= s.reps; rep++) {  // rep 0 warms up
      const start = performance.now();
      const result = callOnce(method, s, t);
      await settle(result);
      const elapsed = performance.now() - start;
      tf.dispose(result);
      if (rep > 0) {
        times.push(elapsed);
      }
    }
    times.sort((a, b) => a - b);
    const names = outputNames(s);
    const bound = s.backward ? GRADIENT_BOUND : FORWARD_BOUND;
    return {
      method,
      path: method.describePath(profile.kernelNames, s.backward),
      medianMs: times[Math.floor(times.length / 2)],
      peakBytes: profile.peakBytes,
      errors: expected == null ? [] : values.map((v, i) => {
        const {relativeError, firstBadElement} = discrepancy(v, expected[i]);
        return {name: names[i], error: relativeError, bad: firstBadElement, bound};
      }),
    };
  });
}

async function switchBackend(name: 'cpu'|'webgpu'): Promise<void> {
  if (!(await tf.setBackend(name))) {
    throw new Error(`could not start tfjs's ${name} backend`);
  }
}

// ---- rendering -------------------------------------------------------------

function setStatus(state: string, text: string): void {
  const status = $('status');
  status.dataset.state = state;
  status.textContent = text;
  if (state === 'done' || state === 'error') {
    status.dataset.runs = String(Number(status.dataset.runs ?? 0) + 1);
  }
}

function formatBytes(bytes: number): string {
  return bytes >= 2 ** 20 ? `${(bytes / 2 ** 20).toFixed(1)} MiB` :
                            `${(bytes / 1024).toFixed(1)} KiB`;
}

function errorCell(m: Measurement): HTMLTableCellElement {
  const cell = document.createElement('td');
  cell.className = 'error';
  if (m.errors.length === 0) {
    cell.textContent = 'not checked';
    return cell;
  }
  const ok = m.errors.every(e => e.bad == null && e.error <= e.bound);
  cell.dataset.ok = String(ok);
  cell.dataset.maxError = String(Math.max(...m.errors.map(e => e.error)));
  const item = (text: string) => {
    const span = document.createElement('span');
    span.textContent = text;
    return span;
  };
  cell.append(
      ...m.errors.map(e => item(`${e.name} ${e.error.toExponential(1)}`)),
      item(ok ? '\u2713 within bound' : `\u2717 over bound ${m.errors[0].bound}`),
      ...m.errors.filter(e => e.bad != null).map(e => item(`${e.name}: ${e.bad}`)));
  return cell;
}

function renderTable(measurements: Measurement[]): void {
  const body = $('result-table').querySelector('tbody')!;
  body.replaceChildren(...measurements.map(m => {
    const row = document.createElement('tr');
    row.dataset.method = m.method.name;
    const cells = [m.method.name, m.path, `${m.medianMs.toFixed(2)} ms`, formatBytes(m.peakBytes)];
    for (const [i, text] of cells.entries()) {
      const cell = document.createElement('td');
      cell.textContent = text;
      cell.className = ['method', 'path', 'time', 'memory'][i];
      row.append(cell);
    }
    row.append(errorCell(m));
    return row;
  }));
}

/** Horizontal bars of the median times, in SVG. */
function renderChart(measurements: Measurement[]): void {
  const svgNS = 'http://www.w3.org/2000/svg';
  const chart = $('chart') as unknown as SVGSVGElement;
  const [labelWidth, barArea, rowHeight, valueWidth] = [200, 480, 36, 90];
  const width = labelWidth + barArea + valueWidth;
  chart.setAttribute('viewBox', `0 0 ${width} ${measurements.length * rowHeight + 8}`);
  chart.setAttribute('width', String(width));
  chart.setAttribute('height', String(measurements.length * rowHeight + 8));
  const slowest = Math.max(...measurements.map(m => m.medianMs));
  const element = (name: string, attributes: Record<string, string|number>, text?: string) => {
    const e = document.createElementNS(svgNS, name);
    for (const [key, value] of Object.entries(attributes)) {
      e.setAttribute(key, String(value));
    }
    if (text != null) {
      e.textContent = text;
    }
    return e;
  };
  chart.replaceChildren(...measurements.flatMap((m, i) => {
    const y = 4 + i * rowHeight;
    const barWidth = Math.max(1, barArea * m.medianMs / slowest);
    return [
      element(
          'text', {x: labelWidth - 8, y: y + rowHeight / 2 + 4, 'text-anchor': 'end'},
          m.method.name),
      element('rect', {
        x: labelWidth,
        y: y + 4,
        width: barWidth,
        height: rowHeight - 10,
        class: `bar bar-${i}`,
        'data-method': m.method.name,
        'data-ms': m.medianMs
      }),
      element(
          'text', {x: labelWidth + barWidth + 6, y: y + rowHeight / 2 + 4},
          `${m.medianMs.toFixed(2)} ms`),
    ];
  }));
}

function renderSummary(s: Settings, seed: number, measurements: Measurement[]): void {
  const [flash, composed] = measurements;
  const ratio = composed.medianMs / flash.medianMs;
  $('summary').textContent =
      `q, k, v [${s.batch}, ${s.seq}, ${s.heads}, ${s.headDim}], ${
          s.causal ? 'causal' : 'not causal'}, ${s.backward ? 'forward + backward' : 'forward'}, ${
          s.reps} timed repetitions, input seed ${seed}. ` +
      `flashAttention ran the ${flash.path}; the composed attention took ${
          ratio.toFixed(2)}x flashAttention's time.`;
  $('results').hidden = false;
}

async function run(): Promise<void> {
  const button = $<HTMLButtonElement>('run');
  button.disabled = true;
  const tensorsBefore = tf.memory().numTensors;
  try {
    const s = readSettings();
    const seed = Math.floor(Math.random() * 2 ** 32);
    const inputs = randomInputs(s, new Rng(seed));
    let expected: Float32Array[]|null = null;
    if (s.checkCpu) {
      setStatus('running', 'computing the cpu reference\u2026');
      expected = await cpuExpected(s, inputs);
    }
    const measurements: Measurement[] = [];
    for (const method of METHODS) {
      setStatus('running', `running ${method.name} on webgpu\u2026`);
      measurements.push(await measure(method, s, inputs, expected));
    }
    renderTable(measurements);
    renderChart(measurements);
    renderSummary(s, seed, measurements);
    const leaked = tf.memory().numTensors - tensorsBefore;
    setStatus('done', leaked === 0 ? 'done' : `done, but ${leaked} tensors were not freed`);
  } catch (error) {
    setStatus('error', `error: ${(error as Error).message}`);
  } finally {
    button.disabled = false;
  }
}

// ---- start-up --------------------------------------------------------------

function showUnavailable(reason: string): void {
  const message = $('webgpu-message');
  message.hidden = false;
  message.innerHTML = '';
  const title = document.createElement('strong');
  title.textContent = 'WebGPU is not available, so this demo cannot run here. ';
  message.append(
      title, reason, document.createElement('br'),
      'Use a browser with WebGPU enabled: Chrome or Edge 113 or newer on Windows, ' +
          'macOS or ChromeOS; on Linux, Chrome started with --enable-unsafe-webgpu. ' +
          'tfjs-flash-attention itself still works on every tfjs backend ' +
          '(cpu, wasm, webgl) through its composed reference.');
  setStatus('unavailable', 'WebGPU is not available');
}

async function start(): Promise<boolean> {
  $('environment').textContent = `tfjs ${tf.version.tfjs}, tfjs-flash-attention ${version}.`;
  const gpu = (navigator as Navigator & {gpu?: GPU}).gpu;
  if (gpu == null) {
    showUnavailable(
        window.isSecureContext ? 'This browser has no navigator.gpu.' :
                                 'This page is not a secure context (use https or localhost).');
    return false;
  }
  const adapter = await gpu.requestAdapter();
  if (adapter == null) {
    showUnavailable('navigator.gpu exists, but it gives no adapter (no usable GPU or driver).');
    return false;
  }
  if (!(await tf.setBackend('webgpu'))) {
    showUnavailable('tfjs could not start its webgpu backend.');
    return false;
  }
  const yesNo = (kernel: string) => hasFusedKernel(kernel, 'webgpu') ? 'yes' : 'no';
  $('environment').textContent = `tfjs ${tf.version.tfjs}, tfjs-flash-attention ${version}; ` +
      `WebGPU adapter: ${adapter.info.vendor || 'unknown vendor'} ${adapter.info.architecture}. ` +
      `Fused WebGPU kernels in this build: FlashAttention ${yesNo(FlashAttention)}, ` +
      `FlashAttentionGrad ${yesNo(FlashAttentionGrad)}. Head dim at most ${MAX_HEAD_DIM}.`;
  $<HTMLButtonElement>('run').disabled = false;
  $<HTMLButtonElement>('generate').disabled = false;
  setStatus('ready', 'ready');
  return true;
}

$('controls').addEventListener('submit', event => {
  event.preventDefault();
  void run();
});

// ---- generation with a KV cache ----------------------------------------------

const ALPHABET = 'abcdefghijklmnopqrstuvwxyz .,';

/** Generates with and without the caches, same seed; shows tokens/s. */
async function runGeneration(): Promise<void> {
  const button = $<HTMLButtonElement>('generate');
  button.disabled = true;
  const status = $('gen-status');
  const tensorsBefore = tf.memory().numTensors;
  const tokenizer = new CharTokenizer(ALPHABET);
  const model = buildGPT(
      {vocabSize: tokenizer.vocabSize, numLayers: 2, embedDim: 128, numHeads: 4}, undefined,
      'webgpt');
  try {
    const context = Number($<HTMLInputElement>('gen-context').value);
    const tokens = Number($<HTMLInputElement>('gen-tokens').value);
    const random = seededRandom(5);
    const prompt =
        Array.from({length: context}, () => ALPHABET[Math.floor(random() * ALPHABET.length)])
            .join('');
    status.dataset.state = 'running';
    status.textContent = 'compiling\u2026';
    await generateWithCache(model, tokenizer, prompt, 1, seededRandom(1));
    await generate(model, tokenizer, prompt, 1, context + tokens, seededRandom(1));
    status.textContent = 'generating with the KV cache\u2026';
    let t0 = performance.now();
    const text = await generateWithCache(model, tokenizer, prompt, tokens, seededRandom(9));
    const cached = tokens / ((performance.now() - t0) / 1000);
    status.textContent = 'generating without the cache\u2026';
    t0 = performance.now();
    const plain =
        await generate(model, tokenizer, prompt, tokens, context + tokens, seededRandom(9));
    const uncached = tokens / ((performance.now() - t0) / 1000);
    $('gen-result').textContent =
        `${cached.toFixed(1)} tokens/s with the KV cache, ${
            uncached.toFixed(1)} tokens/s without (${(cached / uncached).toFixed(2)}x) at a ${
            context}-character prompt; ` +
        `same text both ways: ${text === plain ? 'yes' : 'no'}.`;
    $('gen-text').textContent = text.slice(context);
    status.textContent = 'done';
    status.dataset.state = 'done';
  } catch (error) {
    status.textContent = `error: ${(error as Error).message}`;
    status.dataset.state = 'error';
  } finally {
    model.dispose();
    const leaked = tf.memory().numTensors - tensorsBefore;
    if (leaked !== 0) {
      status.textContent += `, but ${leaked} tensors were not freed`;
    }
    button.disabled = false;
  }
}

$('generation-controls').addEventListener('submit', event => {
  event.preventDefault();
  void runGeneration();
});

/** For the browser console and the end-to-end tests. */
(window as unknown as {flashAttentionDemo: object}).flashAttentionDemo = {
  tf,
  flashAttention,
  composedAttention,
  hasFusedKernel,
  FlashAttention,
  FlashAttentionGrad,
  FLASH_ATTENTION_IMPL,
  ready: start().catch(error => {
    showUnavailable(`Starting WebGPU failed: ${(error as Error).message}`);
    return false;
  }),
};
