/**
 * A long run of fused WebGPU calls keeps the JS heap and tf.memory() flat
 * (issue 13: own_pipeline.ts once kept one error-scope promise per
 * dispatch). Runs in a child node process with --expose-gc, bundled with
 * esbuild, so that the heap is measured after a real garbage collection.
 */
import {execFileSync} from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import {selectedBackends} from './harness/backends';

const describeWebGPU = selectedBackends().includes('webgpu') ? describe : describe.skip;
const ROUNDS = 5;
const CALLS_PER_ROUND = 500;

describeWebGPU('long runs of fused calls [webgpu]', () => {
  it(`keep the JS heap and tf.memory() flat over ${ROUNDS * CALLS_PER_ROUND} calls`, () => {
    const root = path.join(__dirname, '..');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fa-heap-'));
    const bundle = path.join(dir, 'heap_child.cjs');
    try {
      execFileSync(path.join(root, 'node_modules', '.bin', 'esbuild'), [
        path.join(__dirname, 'harness', 'heap_child.ts'),
        '--bundle',
        '--platform=node',
        `--outfile=${bundle}`,
        '--log-level=error',
        '--external:webgpu',
        `--alias:tfjs-flash-attention=${path.join(root, 'src', 'index.ts')}`,
      ]);
      const output = execFileSync(
          process.execPath, ['--expose-gc', bundle, String(ROUNDS), String(CALLS_PER_ROUND)], {
            cwd: root,
            encoding: 'utf8',
            env: {...process.env, NODE_PATH: path.join(root, 'node_modules')}
          });
      const samples = JSON.parse(output.trim().split('\n').pop()!) as
          Array<{heap: number, tensors: number, bytes: number, pending: number}>;
      process.stdout.write(`${JSON.stringify(samples)}\n`);
      const [warm, ...after] = samples;
      for (const s of after) {
        expect(s.tensors).toBe(warm.tensors);
        expect(s.bytes).toBe(warm.bytes);
        // Only scopes of work still in flight are kept.
        expect(s.pending).toBeLessThan(64);
      }
      // The JS heap after a collection wanders by a few hundred kB between
      // samples (measured here), so a heap bound catches only leaks well
      // above that: an object graph per call (a kept tensor, a promise
      // chain) over the last four rounds. Small leaks are caught by the
      // exact counts above (tensors, bytes, pending error scopes: before,
      // every dispatch kept its error-scope promise forever).
      const lastFour = after[after.length - 1].heap - after[after.length - 5].heap;
      expect(lastFour / (4 * CALLS_PER_ROUND)).toBeLessThan(400);
    } finally {
      fs.rmSync(dir, {recursive: true, force: true});
    }
  });
});
