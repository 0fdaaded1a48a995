/**
 * The README's TypeScript examples, run as written against the built
 * package (cpu backend), so that they stay true. The Keras loading example
 * needs a model served over HTTP: test/keras/docs.test.ts runs it.
 */
import * as fs from 'fs';
import * as path from 'path';

import {useBackend} from './harness/backends';
import {runTsExample, tsBlocks} from './harness/examples';

const root = path.join(__dirname, '..');
const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
const examples = tsBlocks(readme).filter(source => !source.includes('https://example.com/'));

const BUILT: Record<string, string> = {
  'tfjs-flash-attention': 'dist/index.cjs',
  'tfjs-flash-attention/layers': 'dist/layers.cjs',
};

/** Runs one example against the built package; returns what it printed. */
function runExample(source: string): Promise<string[]> {
  return runTsExample(
      source, name => require(BUILT[name] != null ? path.join(root, BUILT[name]) : name));
}

describe('README examples', () => {
  beforeAll(() => useBackend('cpu'));

  it('has examples', () => {
    expect(examples.length).toBeGreaterThanOrEqual(8);
  });

  examples.forEach((source, n) => {
    const firstLine = source.split('\n').find(l => l.startsWith('const') || l.startsWith('tf.'));
    it(`example ${n + 1} runs (${firstLine?.slice(0, 60)})`, async () => {
      const printed = await runExample(source);
      // Examples print shapes and checks; a printed `false` is a broken claim.
      expect(printed.filter(line => line === 'false')).toEqual([]);
    });
  });
});
