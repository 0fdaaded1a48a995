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
      // Before, every dispatch kept its error-scope promise forever (about
      // 100 bytes a call, linear). The heap still grows while V8 and tfjs
      // warm up (the first rounds after round 0), then only wanders; the
      // mean growth of the last two rounds is bounded, the pending-scope
      // count above is the exact check.
      const lastTwo = after[after.length - 1].heap - after[after.length - 3].heap;
      expect(lastTwo / (2 * CALLS_PER_ROUND)).toBeLessThan(150);
    } finally {
      fs.rmSync(dir, {recursive: true, force: true});
    }
  });
});
