/**
 * Child process of test/long_run_memory.test.ts, run with --expose-gc: runs
 * thousands of fused WebGPU forward calls (tiny shapes) without ever calling
 * checkOwnPipelineErrors, and prints the JS heap and tf.memory() after each
 * round as one JSON line.
 */
import * as tf from '@tensorflow/tfjs-core';

import {pendingErrorScopes} from '../../kernels/webgpu/own_pipeline';
import {FLASH_ATTENTION_IMPL, flashAttention} from '../../src';

import {chooseVulkanDrivers, installWebGPUGlobals} from './webgpu';

async function main(): Promise<void> {
  const [rounds, callsPerRound] = process.argv.slice(2).map(Number);
  chooseVulkanDrivers();
  installWebGPUGlobals();
  require('@tensorflow/tfjs-backend-webgpu');
  tf.env().set('IS_TEST', true);
  if (!(await tf.setBackend('webgpu'))) {
    throw new Error('no webgpu backend');
  }
  tf.env().set(FLASH_ATTENTION_IMPL, 'fused');
  const q = tf.randomNormal([1, 8, 1, 8]) as tf.Tensor4D;
  const k = tf.randomNormal([1, 8, 1, 8]) as tf.Tensor4D;
  const v = tf.randomNormal([1, 8, 1, 8]) as tf.Tensor4D;
  const gc = (globalThis as unknown as {gc: () => void}).gc;
  const samples: Array<{heap: number, tensors: number, bytes: number, pending: number}> = [];
  for (let round = 0; round <= rounds; round++) {
    // Round 0 warms up (pipelines, buffer pools, JIT).
    for (let call = 0; call < callsPerRound; call++) {
      const out = flashAttention(q, k, v, {causal: call % 2 === 0});
      if (call % 50 === 49) {
        await out.data();  // lets the GPU and its error scopes catch up
      }
      out.dispose();
    }
    const last = flashAttention(q, k, v);
    await last.data();
    last.dispose();
    // Several collections with the event loop turning in between: Dawn's
    // callbacks and tfjs's pending promises free objects late.
    for (let pass = 0; pass < 4; pass++) {
      await new Promise(resolve => setTimeout(resolve, 20));
      gc();
    }
    const memory = tf.memory();
    samples.push({
      heap: process.memoryUsage().heapUsed,
      tensors: memory.numTensors,
      bytes: memory.numBytes,
      pending: pendingErrorScopes(),
    });
  }
  process.stdout.write(`${JSON.stringify(samples)}\n`);
  tf.dispose([q, k, v]);
}

main().then(() => process.exit(0), e => {
  process.stderr.write(`${e.stack ?? e}\n`);
  process.exit(1);
});
