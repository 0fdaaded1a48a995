/**
 * docs/layers.md's TypeScript examples, run as written (cpu backend):
 * `tfjs-flash-attention/layers` is the built dist/layers.cjs (which takes
 * the same core module as this test), `tfjs-flash-attention` the sources.
 */
import * as fs from 'fs';
import * as path from 'path';

import {useBackend} from '../harness/backends';
import {runTsExample, tsBlocks} from '../harness/examples';

const root = path.join(__dirname, '..', '..');
const doc = fs.readFileSync(path.join(root, 'docs', 'layers.md'), 'utf8');
const examples = tsBlocks(doc);

function runExample(source: string): Promise<string[]> {
  return runTsExample(source, name => {
    if (name === 'tfjs-flash-attention/layers') {
      return require(path.join(root, 'dist/layers.cjs'));
    }
    if (name === 'tfjs-flash-attention') {
      return require('../../src');
    }
    return require(name);
  });
}

describe('docs/layers.md examples', () => {
  beforeAll(async () => {
    if (!fs.existsSync(path.join(root, 'dist/layers.cjs'))) {
      throw new Error('dist/layers.cjs is missing: run `npm run build` (npm test does)');
    }
    await useBackend('cpu');
  });

  it('has the examples', () => {
    expect(examples.length).toBeGreaterThanOrEqual(5);
  });

  examples.forEach((source, n) => {
    const firstLine = source.split('\n').find(l => l.startsWith('const'));
    it(`example ${n + 1} runs and its checks print true (${firstLine?.slice(0, 50)})`, async () => {
      const printed = await runExample(source);
      expect(printed.length).toBeGreaterThan(0);
      expect(printed.filter(line => line !== 'true')).toEqual([]);
    });
  });
});
