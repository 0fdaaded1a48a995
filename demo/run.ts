/**
 * The demo: trains a small character-level GPT with the fused training ops
 * (FlashMHA, fused LayerNorm with the residual adds, fused cross-entropy,
 * fusedAdam) on the best backend found, then times it against the same
 * model in stock tfjs (tf.layers.layerNormalization, composed attention,
 * tf.train.adam; same weights, same batches) and reports the speed-up;
 * writes the loss curves (SVG) and a generated sample.
 */
import * as fs from 'fs';
import * as path from 'path';

import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';

import {composedMHA} from '../benchmarks/composed_mha';
import {fusedAdam} from '../src';
import {flashMHA} from '../src/layers';

import {BackendChoice, useBestBackend} from './backend';
import {enableTensorCores, tensorCoreUsage} from './tensor_cores';
import {buildGPT, CharTokenizer, generate, generateWithCache, GPTConfig, median, sampleBatch, seededRandom, trainableVariables, trainStep} from './gpt';
import {lineChartSvg} from './plot';

export interface DemoConfig extends Omit<GPTConfig, 'vocabSize'> {
  seqLen: number;
  batch: number;
  /** Training steps of the FlashMHA model (fewer if maxSeconds runs out). */
  steps: number;
  /** Steps of each model in the timed comparison. */
  compareSteps: number;
  learningRate: number;
  /** Characters of the generated sample. */
  sampleLength: number;
  /** Training stops after this long (the demo must end in a few minutes). */
  maxSeconds: number;
}

/**
 * On a GPU: a bigger model; on the cpu backend (tfjs's plain-JS kernels):
 * one whose whole run takes about two to three minutes on 2 cores.
 */
export const GPU_CONFIG: DemoConfig = {
  numLayers: 4,
  embedDim: 256,
  numHeads: 4,
  seqLen: 256,
  batch: 16,
  steps: 400,
  compareSteps: 12,
  learningRate: 2e-3,
  sampleLength: 400,
  maxSeconds: 150,
};
export const CPU_CONFIG: DemoConfig = {
  numLayers: 2,
  embedDim: 32,
  numHeads: 2,
  seqLen: 32,
  batch: 8,
  steps: 300,
  compareSteps: 6,
  learningRate: 5e-3,
  sampleLength: 200,
  maxSeconds: 100,
};

export interface DemoOptions {
  backend?: 'auto'|'webgpu'|'cpu';
  /** Ask for the tensor-core (subgroup-matrix) kernels; reports whether they ran. */
  tensorCores?: boolean;
  /** Overrides of the automatically chosen config. */
  config?: Partial<DemoConfig>;
  textPath?: string;
  outDir?: string;
  seed?: number;
  /** Where progress goes (default stdout). */
  write?: (text: string) => void;
  /** Redraw one progress line (a terminal) or print a line every few steps. */
  tty?: boolean;
}

export interface DemoResult {
  backend: BackendChoice;
  config: DemoConfig;
  losses: number[];
  /** Median step of the fused model (FlashMHA and the fused training ops). */
  flashStepMs: number;
  /** Median step of the stock-tfjs model. */
  composedStepMs: number;
  /** composedStepMs / flashStepMs: the speed-up over stock tfjs. */
  speedup: number;
  tokensPerSecond: number;
  /** Final losses of the comparison: the same start and batches, so close. */
  compareLoss: {flash: number, composed: number};
  sample: string;
  files: {svg: string, sample: string};
  generation: GenerationComparison;
}

function progressBar(fraction: number, width = 24): string {
  const filled = Math.round(Math.min(1, fraction) * width);
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}]`;
}

export async function runDemo(options: DemoOptions = {}): Promise<DemoResult> {
  const write = options.write ?? ((text: string) => process.stdout.write(text));
  const tty = options.tty ?? Boolean(process.stdout.isTTY);
  const backend =
      await useBestBackend(options.backend ?? 'auto', {tensorCores: options.tensorCores});
  const config: DemoConfig = {...(backend.gpu ? GPU_CONFIG : CPU_CONFIG), ...options.config};
  const text = fs.readFileSync(options.textPath ?? path.join('demo', 'data', 'alice.txt'), 'utf8');
  const tokenizer = new CharTokenizer(text);
  const data = tokenizer.encode(text);
  const random = seededRandom(options.seed ?? 1234);
  const gptConfig: GPTConfig = {
    vocabSize: tokenizer.vocabSize,
    numLayers: config.numLayers,
    embedDim: config.embedDim,
    numHeads: config.numHeads
  };
  write(`backend: ${backend.description}\n`);
  if (options.tensorCores) {
    write(`${enableTensorCores(backend.device)}\n`);
  }
  write(
      `model: ${config.numLayers} layers of FlashMHA with fused norms, loss and Adam, width ${
          config.embedDim}, ${config.numHeads} heads, ` +
      `context ${config.seqLen}, batch ${config.batch}, vocabulary ${
          tokenizer.vocabSize} characters ` +
      `(${data.length} in the text)\n`);

  const model = buildGPT(gptConfig, flashMHA, 'gpt', 'fused');
  const optimizer = fusedAdam({learningRate: config.learningRate});
  const vars = trainableVariables(model);
  const tokensPerStep = config.batch * config.seqLen;
  const losses: number[] = [];
  const stepMs: number[] = [];
  const start = performance.now();
  for (let step = 1; step <= config.steps; step++) {
    const {x, y} = sampleBatch(data, config.batch, config.seqLen, random);
    const t0 = performance.now();
    const loss = await trainStep(model, optimizer, x, y, tokenizer.vocabSize, vars, 'fused');
    const ms = performance.now() - t0;
    tf.dispose([x, y]);
    losses.push(loss);
    stepMs.push(ms);
    const elapsed = (performance.now() - start) / 1000;
    const done = step === config.steps || elapsed > config.maxSeconds;
    const line = `${progressBar(step / config.steps)} step ${step}/${config.steps}  loss ${
                     loss.toFixed(3)}  ` +
        `${Math.round(tokensPerStep / (ms / 1000))} tokens/s  (${ms.toFixed(0)} ms)`;
    if (tty) {
      write(`\r${line}   `);
    } else if (step % 10 === 0 || step === 1 || done) {
      write(`${line}\n`);
    }
    if (done) {
      if (step < config.steps) {
        write(`${tty ? '\n' : ''}stopping after ${step} steps: the ${
            config.maxSeconds} s budget is spent\n`);
      }
      break;
    }
  }
  if (tty) {
    write('\n');
  }
  if (options.tensorCores) {
    write(`${tensorCoreUsage()}\n`);
  }
  optimizer.dispose();

  // The same weights in stock tfjs (tfjs-layers' layerNormalization,
  // composed attention, tf.train.adam); both models then take the same
  // steps on the same batches, timed alternately.
  write(
      `comparing with stock tfjs (layerNormalization, composed attention, tf.train.adam), same weights, ${
          config.compareSteps} steps each\n`);
  const composed = buildGPT(gptConfig, composedMHA, 'gpt', 'tfjs');
  // getWeights gives the variables themselves (not copies): never dispose them.
  composed.setWeights(model.getWeights());
  const runs = [
    {
      name: 'fused',
      model,
      optimizer: fusedAdam({learningRate: config.learningRate}) as tf.Optimizer,
      vars,
      loss: 'fused' as const,
      ms: [] as number[],
      losses: [] as number[]
    },
    {
      name: 'stock tfjs',
      model: composed,
      optimizer: tf.train.adam(config.learningRate) as tf.Optimizer,
      vars: trainableVariables(composed),
      loss: 'composed' as const,
      ms: [] as number[],
      losses: [] as number[]
    },
  ];
  const base = losses.length;
  for (let step = 0; step < config.compareSteps; step++) {
    const {x, y} = sampleBatch(data, config.batch, config.seqLen, random);
    for (const run of runs) {
      const t0 = performance.now();
      run.losses.push(
          await trainStep(run.model, run.optimizer, x, y, tokenizer.vocabSize, run.vars, run.loss));
      run.ms.push(performance.now() - t0);
    }
    tf.dispose([x, y]);
    write(`  step ${step + 1}/${config.compareSteps}: ${
        runs.map(r => `${r.name} ${r.ms[step].toFixed(0)} ms, loss ${r.losses[step].toFixed(3)}`)
            .join('; ')}\n`);
  }
  // The first steps compile shaders and fill caches: leave them out when there are enough.
  const timed = (ms: number[]) => median(ms.length > 4 ? ms.slice(2) : ms);
  const flashStepMs = timed(runs[0].ms);
  const composedStepMs = timed(runs[1].ms);
  const speedup = composedStepMs / flashStepMs;
  const tokensPerSecond = tokensPerStep / (flashStepMs / 1000);
  write(
      `median step: fused ${flashStepMs.toFixed(1)} ms (${
          Math.round(tokensPerSecond)} tokens/s), stock tfjs ${composedStepMs.toFixed(1)} ms (${
          Math.round(tokensPerStep / (composedStepMs / 1000))} tokens/s): ` +
      `speed-up over stock tfjs ${speedup.toFixed(2)}x on ${backend.name}${
          backend.gpu ?
              '' :
              ' (no fused kernel on this backend: both run composed ops, so expect about 1x here; the fused kernels run on WebGPU)'}\n`);

  const sample =
      await generate(model, tokenizer, 'Alice ', config.sampleLength, config.seqLen, random);
  const outDir = options.outDir ?? path.join('demo', 'out');
  fs.mkdirSync(outDir, {recursive: true});
  const svgPath = path.join(outDir, 'loss.svg');
  fs.writeFileSync(
      svgPath,
      lineChartSvg(
          `char-level GPT on ${backend.name}: training loss`, 'step', 'cross-entropy (nats)', [
            {name: 'fused training', points: losses.map((l, i) => [i + 1, l]), color: '#1f77b4'},
            {
              name: 'fused (comparison)',
              points: runs[0].losses.map((l, i) => [base + i + 1, l]),
              color: '#2ca02c'
            },
            {
              name: 'stock tfjs (comparison)',
              points: runs[1].losses.map((l, i) => [base + i + 1, l]),
              color: '#d62728'
            },
          ]));
  const samplePath = path.join(outDir, 'sample.txt');
  fs.writeFileSync(samplePath, sample + '\n');
  write(`sample:\n${sample}\n`);
  write(`wrote ${svgPath} and ${samplePath}\n`);

  const generation = await compareGeneration(model, tokenizer, config.seqLen, write);

  runs.forEach(r => r.optimizer.dispose());
  model.dispose();
  composed.dispose();
  return {
    backend,
    config,
    losses,
    flashStepMs,
    composedStepMs,
    speedup,
    tokensPerSecond,
    compareLoss: {
      flash: runs[0].losses[runs[0].losses.length - 1],
      composed: runs[1].losses[runs[1].losses.length - 1]
    },
    sample,
    files: {svg: svgPath, sample: samplePath},
    generation,
  };
}

export interface GenerationComparison {
  tokens: number;
  cachedTokensPerSecond: number;
  uncachedTokensPerSecond: number;
  /** Did both draw the same characters (same seed)? */
  sameText: boolean;
  text: string;
}

/**
 * The demo's last part: generates a context's worth of characters with the
 * KV caches (flashAttentionWithKVCache through FlashMHA.decode) and without
 * (the whole prefix through the model per character), same seed, and
 * prints tokens/s of both.
 */
async function compareGeneration(
    model: tfl.LayersModel, tokenizer: CharTokenizer, context: number,
    write: (text: string) => void): Promise<GenerationComparison> {
  const prompt = 'Alice ';
  const tokens = Math.max(1, context - prompt.length);
  write(`generating ${tokens} characters with and without the KV cache\n`);
  // Compile and warm both paths on a few characters first.
  await generateWithCache(model, tokenizer, prompt, 2, seededRandom(7));
  await generate(model, tokenizer, prompt, 2, context, seededRandom(7));
  let t0 = performance.now();
  const text = await generateWithCache(model, tokenizer, prompt, tokens, seededRandom(99));
  const cachedSeconds = (performance.now() - t0) / 1000;
  t0 = performance.now();
  const uncachedText = await generate(model, tokenizer, prompt, tokens, context, seededRandom(99));
  const uncachedSeconds = (performance.now() - t0) / 1000;
  const result = {
    tokens,
    cachedTokensPerSecond: tokens / cachedSeconds,
    uncachedTokensPerSecond: tokens / uncachedSeconds,
    sameText: text === uncachedText,
    text,
  };
  write(`generation: ${result.cachedTokensPerSecond.toFixed(1)} tokens/s with the KV cache, ${
      result.uncachedTokensPerSecond.toFixed(1)} tokens/s without (${
      (result.cachedTokensPerSecond / result.uncachedTokensPerSecond).toFixed(2)}x); same text: ${
      result.sameText ? 'yes' : 'no (float rounding changed a draw)'}\n`);
  write(`generated with the cache:\n${text}\n`);
  return result;
}
