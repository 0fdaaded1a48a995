/**
 * docs/inference.md's complete TypeScript examples, run as written (cpu
 * backend); the IncrementalDecoder fragment (it needs a trained model) is
 * left out: test/layers/flash_mha_decode.test.ts covers it.
 */
import * as fs from 'fs';
import * as path from 'path';

import {useBackend} from '../harness/backends';
import {runTsExample, tsBlocks} from '../harness/examples';

const root = path.join(__dirname, '..', '..');
const doc = fs.readFileSync(path.join(root, 'docs', 'inference.md'), 'utf8');
const examples = tsBlocks(doc).filter(source => !source.includes('promptIds'));

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

describe('docs/inference.md examples', () => {
  beforeAll(async () => {
    if (!fs.existsSync(path.join(root, 'dist/layers.cjs'))) {
      throw new Error('dist/layers.cjs is missing: run `npm run build` (npm test does)');
    }
    await useBackend('cpu');
  });

  it('has the examples', () => {
    expect(examples.length).toBe(3);
  });

  examples.forEach((source, n) => {
    const firstLine = source.split('\n').find(l => l.startsWith('const'));
    it(`example ${n + 1} runs as documented (${firstLine?.slice(0, 50)})`, async () => {
      const printed = await runExample(source);
      expect(printed.length).toBeGreaterThan(0);
      expect(printed.filter(line => line === 'false')).toEqual([]);
    });
  });
});
