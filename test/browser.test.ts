/**
 * End to end in a browser: Debian's Chromium, headless, with WebGPU on
 * SwiftShader (docs/design.md, "Platform facts"), driven by playwright-core; never a
 * downloaded browser. The pages are the demo's (demo/web, served by
 * demo/web/serve.cjs as `npm run serve` serves them), over the built
 * package (dist/, which `npm test` builds first):
 *
 *   script-tag.html  tfjs, tfjs-backend-webgpu and the UMD bundle by script
 *                    tags; the ops are used as tf.flashAttention
 *   index.html       the demo, an ES module bundled by esbuild that imports
 *                    `tfjs-flash-attention` (dist/index.mjs)
 *
 * In each page the op runs forward and backward on webgpu and on cpu; the
 * webgpu results are compared element by element with the cpu backend's
 * from the same page and with the float64 oracle. Which path ran (fused
 * kernel or composed reference) is read from tf.profile in the page and
 * must be the fused kernel wherever the build registers one for webgpu.
 * Screenshots go to test-results/. Without /usr/bin/chromium the tests
 * fail; FLASH_ATTENTION_TEST_BACKENDS=cpu leaves them out as skipped.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import {BrowserContext, chromium, Page} from 'playwright-core';

import {FlashAttention, FlashAttentionGrad, hasFusedKernel} from '../src';

import {selectedBackends} from './harness/backends';
import {expectClose, FORWARD_BOUND, freshRng, GRADIENT_BOUND, ProblemShape, randomArray, randomOracleProblem} from './harness/problems';
import {OracleOptions, oracleBackward, oracleForward} from './oracle';

const {startDemoServer} = require('../demo/web/serve.cjs') as
    {startDemoServer(options: {port: number}): Promise<{url: string, close(): Promise<void>}>};

const CHROMIUM = '/usr/bin/chromium';
const CHROMIUM_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--enable-unsafe-webgpu',
  '--use-webgpu-adapter=swiftshader',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-quic',
  '--no-first-run',
];
const SCREENSHOTS = path.join(__dirname, '..', 'test-results');

/**
 * What the sources register for webgpu; the pages run the built bundles,
 * which must agree (npm test builds them first).
 */
const FUSED_FORWARD = hasFusedKernel(FlashAttention, 'webgpu');
const FUSED_BACKWARD = hasFusedKernel(FlashAttentionGrad, 'webgpu');
const PATH_NOTE =
    (FUSED_FORWARD ?
         'fused FlashAttention kernel' :
         'composed reference: no fused FlashAttention kernel for webgpu in this build') +
    (FUSED_BACKWARD ? ', fused FlashAttentionGrad' : ', reference backward');
/** The same, short, for test names. */
const PATH = FUSED_FORWARD ? 'fused kernel' : 'composed reference, fused kernel not available';

interface BrowserCase {
  name: string;
  shape: ProblemShape;
  opts: OracleOptions;
}

/** Small shapes: SwiftShader is slow. */
const CASES: BrowserCase[] = [
  {
    name: 'causal, GQA (H=4, Hk=2), Sq < Sk',
    shape: {batch: 2, seqQ: 24, seqK: 40, heads: 4, headsKV: 2, headDim: 32, headDimV: 32},
    opts: {causal: true}
  },
  {
    name: 'ALiBi [B, H], softcap, window [8, 2], dropout 0.2, Dv != D',
    shape: {
      batch: 2,
      seqQ: 33,
      seqK: 33,
      heads: 2,
      headsKV: 2,
      headDim: 16,
      headDimV: 24,
      alibi: 'batch'
    },
    opts: {softcap: 5, windowSize: [8, 2], dropoutRate: 0.2, seed: 20261124}
  },
];

/** What the page gets: plain arrays (they cross into the page as JSON). */
interface PageRequest {
  api: 'umd'|'esm';
  shape: ProblemShape;
  opts: OracleOptions;
  q: number[];
  k: number[];
  v: number[];
  slopes: number[]|null;
  dOut: number[];
  dLse: number[];
}

interface BackendResult {
  out: number[];
  lse: number[];
  dq: number[];
  dk: number[];
  dv: number[];
  kernelNames: string[];
  leakedTensors: number;
}

interface PageResult {
  fusedForward: boolean;
  fusedBackward: boolean;
  webgpu: BackendResult;
  cpu: BackendResult;
}

/**
 * Runs in the page (serialized by playwright: self-contained, no imports).
 * Forward with lse, and tf.grads of sum(out * dOut) + sum(lse * dLse), on
 * webgpu then cpu, profiled to see which kernels ran.
 */
async function runInPage(request: PageRequest): Promise<PageResult> {
  const w = window as any;
  // The UMD page: the ops on the global tf, the rest on tfFlashAttention.
  // The demo page: what its ES-module bundle imported.
  const api = request.api === 'umd' ?
      {...w.tfFlashAttention, tf: w.tf, flashAttention: w.tf.flashAttention} :
      w.flashAttentionDemo;
  const tf = api.tf;
  const {batch, seqQ, seqK, heads, headsKV, headDim, headDimV} = request.shape;
  const result: any = {
    fusedForward: api.hasFusedKernel(api.FlashAttention, 'webgpu'),
    fusedBackward: api.hasFusedKernel(api.FlashAttentionGrad, 'webgpu'),
  };
  for (const backend of ['webgpu', 'cpu']) {
    if (!(await tf.setBackend(backend))) {
      throw new Error(`the page could not start tfjs's ${backend} backend`);
    }
    tf.env().set(api.FLASH_ATTENTION_IMPL, 'auto');
    const tensorsBefore = tf.memory().numTensors;
    const q = tf.tensor4d(request.q, [batch, seqQ, heads, headDim]);
    const k = tf.tensor4d(request.k, [batch, seqK, headsKV, headDim]);
    const v = tf.tensor4d(request.v, [batch, seqK, headsKV, headDimV]);
    const dOut = tf.tensor4d(request.dOut, [batch, seqQ, heads, headDimV]);
    const dLse = tf.tensor3d(request.dLse, [batch, heads, seqQ]);
    const slopes = request.slopes == null ?
        undefined :
        tf.tensor(request.slopes, request.shape.alibi === 'head' ? [heads] : [batch, heads]);
    const opts = {...request.opts, alibiSlopes: slopes, returnSoftmaxLse: true};
    const profile = await tf.profile(() => {
      const [out, lse] = api.flashAttention(q, k, v, opts);
      const loss = (q: any, k: any, v: any) => {
        const [o, l] = api.flashAttention(q, k, v, opts);
        const finiteLse = tf.where(tf.isFinite(l), l, tf.zerosLike(l));
        return tf.add(tf.sum(tf.mul(o, dOut)), tf.sum(tf.mul(finiteLse, dLse)));
      };
      return [out, lse, ...tf.grads(loss)([q, k, v])];
    });
    const [out, lse, dq, dk, dv] = await Promise.all(profile.result.map((t: any) => t.data()));
    tf.dispose([...profile.result, q, k, v, dOut, dLse]);
    if (slopes != null) {
      slopes.dispose();
    }
    result[backend] = {
      out: Array.from(out),
      lse: Array.from(lse),
      dq: Array.from(dq),
      dk: Array.from(dk),
      dv: Array.from(dv),
      kernelNames: profile.kernelNames,
      leakedTensors: tf.memory().numTensors - tensorsBefore,
    };
  }
  return result;
}

let server: {url: string, close(): Promise<void>};
let context: BrowserContext;
let userDataDir: string;

/** Opens a page and collects its uncaught errors and console errors. */
async function openPage(url: string, init?: () => void): Promise<{page: Page, errors: string[]}> {
  const page = await context.newPage();
  const errors: string[] = [];
  page.on('pageerror', error => errors.push(`uncaught: ${error.message}`));
  page.on('console', message => {
    if (message.type() === 'error') {
      errors.push(`console: ${message.text()}`);
    }
  });
  if (init != null) {
    await page.addInitScript(init);
  }
  await page.goto(url);
  return {page, errors};
}

async function screenshot(page: Page, name: string): Promise<void> {
  fs.mkdirSync(SCREENSHOTS, {recursive: true});
  await page.screenshot({path: path.join(SCREENSHOTS, `browser-${name}.png`), fullPage: true});
}

/** Checks the page's webgpu results against its cpu results and the oracle. */
async function checkInPage(page: Page, api: 'umd'|'esm', c: BrowserCase): Promise<void> {
  const rng = freshRng();
  const problem = randomOracleProblem(c.shape, rng);
  const forward = oracleForward(problem, c.opts);
  const dOut = randomArray(forward.out.length, rng);
  const dLse = randomArray(forward.lse.length, rng);
  const expected = {...forward, ...oracleBackward(problem, c.opts, dOut, dLse)};
  const request: PageRequest = {
    api,
    shape: c.shape,
    opts: c.opts,
    q: Array.from(problem.q),
    k: Array.from(problem.k),
    v: Array.from(problem.v),
    slopes: problem.alibiSlopes && Array.from(problem.alibiSlopes),
    dOut: Array.from(dOut),
    dLse: Array.from(dLse),
  };
  const result = await page.evaluate(runInPage, request);

  // The bundle in the page registers what the sources register.
  expect({fusedForward: result.fusedForward, fusedBackward: result.fusedBackward})
      .toEqual({fusedForward: FUSED_FORWARD, fusedBackward: FUSED_BACKWARD});
  // The path that ran on webgpu.
  const kernels = result.webgpu.kernelNames;
  expect(kernels.includes(FlashAttention) ? 'fused' : 'reference')
      .toBe(FUSED_FORWARD ? 'fused' : 'reference');
  expect(kernels.includes(FlashAttentionGrad) ? 'fused' : 'reference')
      .toBe(FUSED_BACKWARD ? 'fused' : 'reference');
  expect(result.webgpu.leakedTensors).toBe(0);
  expect(result.cpu.leakedTensors).toBe(0);

  const what = (name: string) => `${c.name} (seed ${rng.seed}): webgpu ${name}`;
  for (const name of ['out', 'lse'] as const) {
    expectClose(result.webgpu[name], result.cpu[name], FORWARD_BOUND, `${what(name)} vs cpu`);
    expectClose(result.webgpu[name], expected[name], FORWARD_BOUND, `${what(name)} vs oracle`);
  }
  for (const name of ['dq', 'dk', 'dv'] as const) {
    expectClose(result.webgpu[name], result.cpu[name], GRADIENT_BOUND, `${what(name)} vs cpu`);
    expectClose(result.webgpu[name], expected[name], GRADIENT_BOUND, `${what(name)} vs oracle`);
  }
}

// Left out (reported as skipped) with the other webgpu tests under
// FLASH_ATTENTION_TEST_BACKENDS=cpu.
const describeBrowser = selectedBackends().includes('webgpu') ? describe : describe.skip;

describeBrowser(`in headless Chromium with WebGPU on SwiftShader [${PATH_NOTE}]`, () => {
  beforeAll(async () => {
    if (!fs.existsSync(CHROMIUM)) {
      throw new Error(
          `${CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)`);
    }
    server = await startDemoServer({port: 0});
    userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tfjs-flash-attention-chromium-'));
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_FLAGS,
    });
    console.log(`browser tests: Chromium ${context.browser()?.version() ?? ''}, webgpu runs the ${
        PATH_NOTE}`);
  });

  afterAll(async () => {
    await context?.close();
    await server?.close();
    if (userDataDir) {
      fs.rmSync(userDataDir, {recursive: true, force: true});
    }
  });

  describe('script tags: tfjs, tfjs-backend-webgpu, then the UMD bundle', () => {
    let page: Page;
    let errors: string[];
    beforeAll(async () => {
      ({page, errors} = await openPage(`${server.url}script-tag.html`));
      await page.waitForSelector('#output:not([data-state=running])', {timeout: 120000});
    });
    afterAll(() => page?.close());

    it('the page\'s own example runs tf.flashAttention forward and backward on webgpu',
       async () => {
         const output = await page.textContent('#output');
         expect(await page.getAttribute('#output', 'data-state')).toBe('done');
         expect(output).toContain('backend: webgpu;');
         expect(output).toContain(
             FUSED_FORWARD ? 'runs the fused kernel' : 'runs the composed reference');
         expect(output).toContain('out: shape [1,64,4,32]');
         expect(output).toContain('gradients: dq [1,64,4,32], dk [1,64,4,32], dv [1,64,4,32]');
         expect(output).toContain('tensors left: 0');
         expect(
             await page.evaluate(
                 () => ['flashAttention', 'flashAttentionQKVPacked', 'flashAttentionKVPacked'].map(
                     name => typeof (window as any).tf[name])))
             .toEqual(['function', 'function', 'function']);
         await screenshot(page, 'script-tag');
         expect(errors).toEqual([]);
       });

    for (const c of CASES) {
      it(`forward and backward on webgpu (${PATH}) match cpu and the oracle: ${c.name}`,
         async () => {
           await checkInPage(page, 'umd', c);
           expect(errors).toEqual([]);
         });
    }

    it('?tfjsflags=FLASH_ATTENTION_IMPL:reference sets the switch in a page', async () => {
      const flagged =
          await openPage(`${server.url}script-tag.html?tfjsflags=FLASH_ATTENTION_IMPL:reference`);
      try {
        await flagged.page.waitForSelector('#output[data-state=done]', {timeout: 120000});
        expect(
            await flagged.page.evaluate(() => (window as any).tf.env().get('FLASH_ATTENTION_IMPL')))
            .toBe('reference');
        expect(flagged.errors).toEqual([]);
      } finally {
        await flagged.page.close();
      }
    });
  });

  describe('ES module through esbuild: the demo page', () => {
    let page: Page;
    let errors: string[];
    beforeAll(async () => {
      ({page, errors} = await openPage(server.url));
      expect(await page.evaluate(() => (window as any).flashAttentionDemo.ready)).toBe(true);
    });
    afterAll(() => page?.close());

    for (const c of CASES) {
      it(`forward and backward on webgpu (${PATH}) match cpu and the oracle: ${c.name}`,
         async () => {
           await checkInPage(page, 'esm', c);
           expect(errors).toEqual([]);
         });
    }

    /** Sets the controls, clicks Run, waits for the end. */
    async function runDemo(settings: Record<string, string>, pass: string, impl = 'auto') {
      for (const [id, value] of Object.entries(settings)) {
        await page.fill(`#${id}`, value);
      }
      await page.selectOption('#pass', pass);
      await page.selectOption('#impl', impl);
      const runs = Number(await page.getAttribute('#status', 'data-runs') ?? 0);
      await page.click('#run');
      await page.waitForSelector(`#status[data-runs="${runs + 1}"]`, {timeout: 240000});
      return {
        state: await page.getAttribute('#status', 'data-state'),
        status: await page.textContent('#status')
      };
    }

    /** The results table and the chart, as the page shows them. */
    async function readResults() {
      return page.evaluate(
          () => ({
            rows: Array.from(
                document.querySelectorAll('#result-table tbody tr'),
                row => ({
                  method: row.getAttribute('data-method'),
                  path: row.querySelector('.path')!.textContent,
                  ok: row.querySelector('.error')!.getAttribute('data-ok'),
                  maxError: Number(row.querySelector('.error')!.getAttribute('data-max-error')),
                  errorText: row.querySelector('.error')!.textContent,
                })),
            bars: Array.from(
                document.querySelectorAll('#chart rect'),
                bar => ({
                  method: bar.getAttribute('data-method'),
                  ms: Number(bar.getAttribute('data-ms')),
                  width: (bar as SVGRectElement).getBBox().width,
                })),
            summary: document.getElementById('summary')!.textContent,
          }));
    }

    const SMALL = {'batch': '1', 'seq': '48', 'heads': '2', 'head-dim': '32', 'reps': '2'};

    it(`controls: Run shows the path (${
           FUSED_FORWARD ?
               'fused kernel' :
               'composed reference'}), errors within 1e-4 forward / 5e-4 gradients, and a bar chart`,
       async () => {
         const forward = await runDemo(SMALL, 'forward');
         expect(forward).toEqual({state: 'done', status: 'done'});
         const shown = await readResults();
         expect(shown.rows.map(r => r.method)).toEqual([
           'flashAttention', 'composed matMul + softmax'
         ]);
         expect(shown.rows[0].path).toBe(FUSED_FORWARD ? 'fused kernel' : 'composed reference');
         expect(shown.rows[1].path).toBe('tfjs ops');
         for (const row of shown.rows) {
           expect(row.ok).toBe('true');
           expect(row.maxError).toBeLessThanOrEqual(FORWARD_BOUND);
           expect(row.errorText).toMatch(/^out \d\.\de[-+]\d+/);
         }
         expect(shown.bars.map(b => b.method)).toEqual([
           'flashAttention', 'composed matMul + softmax'
         ]);
         for (const bar of shown.bars) {
           expect(Number.isFinite(bar.ms) && bar.ms > 0).toBe(true);
           expect(bar.width).toBeGreaterThan(0);
         }
         // Bar lengths are proportional to the times.
         const [a, b] = shown.bars;
         expect(a.width / b.width).toBeCloseTo(a.ms / b.ms, 1);
         expect(shown.summary).toContain('q, k, v [1, 48, 2, 32], causal, forward');
         await screenshot(page, 'demo-forward');

         const backward = await runDemo(SMALL, 'backward');
         expect(backward).toEqual({state: 'done', status: 'done'});
         const shownBackward = await readResults();
         expect(shownBackward.rows[0].path)
             .toBe(`${FUSED_FORWARD ? 'fused kernel' : 'composed reference'}, ${
                 FUSED_BACKWARD ? 'fused' : 'reference'} backward`);
         for (const row of shownBackward.rows) {
           expect(row.ok).toBe('true');
           expect(row.maxError).toBeLessThanOrEqual(GRADIENT_BOUND);
           expect(row.errorText).toMatch(/^dq .*dk .*dv /);
         }
         await screenshot(page, 'demo-backward');
         expect(errors).toEqual([]);
       });

    it(`controls: implementation 'reference' runs the composed reference; 'fused' ${
           FUSED_FORWARD ? 'runs the fused kernel' : 'is refused (no fused kernel in this build)'}`,
       async () => {
         expect(await runDemo(SMALL, 'forward', 'reference'))
             .toEqual({state: 'done', status: 'done'});
         expect((await readResults()).rows[0].path).toBe('composed reference');
         const fused = await runDemo(SMALL, 'forward', 'fused');
         if (FUSED_FORWARD) {
           expect(fused).toEqual({state: 'done', status: 'done'});
           expect((await readResults()).rows[0].path).toBe('fused kernel');
         } else {
           expect(fused.state).toBe('error');
           expect(fused.status).toContain('has no fused FlashAttention kernel');
         }
         expect(errors).toEqual([]);
       });
  });

  it('the demo page generates text with the KV cache, the same as without', async () => {
    const {page, errors} = await openPage(server.url);
    try {
      expect(await page.evaluate(() => (window as any).flashAttentionDemo.ready)).toBe(true);
      await page.fill('#gen-context', '6');
      await page.fill('#gen-tokens', '2');
      await page.click('#generate');
      await page.waitForSelector(
          '#gen-status[data-state=done], #gen-status[data-state=error]', {timeout: 240000});
      expect(await page.textContent('#gen-status')).toBe('done');
      expect(await page.textContent('#gen-result'))
          .toMatch(
              /tokens\/s with the KV cache, [\d.]+ tokens\/s without .*same text both ways: yes/);
      expect(await page.textContent('#gen-text')).toHaveLength(2);
      expect(errors).toEqual([]);
    } finally {
      await page.close();
    }
  });

  it('the demo says clearly that WebGPU is missing where it is', async () => {
    const {page, errors} = await openPage(server.url, () => {
      delete (Navigator.prototype as {gpu?: unknown}).gpu;
    });
    try {
      await page.waitForSelector('#status[data-state=unavailable]', {timeout: 60000});
      expect(await page.isVisible('#webgpu-message')).toBe(true);
      expect(await page.textContent('#webgpu-message'))
          .toContain('WebGPU is not available, so this demo cannot run here.');
      expect(await page.isDisabled('#run')).toBe(true);
      await screenshot(page, 'demo-no-webgpu');
      expect(errors).toEqual([]);
    } finally {
      await page.close();
    }
  });
});
