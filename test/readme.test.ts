/**
 * The README's TypeScript examples, run as written against the built
 * package (cpu backend), so that they stay true.
 */
import * as fs from 'fs';
import * as path from 'path';

import * as esbuild from 'esbuild';

import {useBackend} from './harness/backends';

const root = path.join(__dirname, '..');
const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
const examples = [...readme.matchAll(/```ts\n([\s\S]*?)```/g)].map(m => m[1]);

/** Runs one example; returns what it printed. */
function runExample(source: string): string[] {
  const {code} = esbuild.transformSync(source, {loader: 'ts', format: 'cjs'});
  const printed: string[] = [];
  const exampleRequire = (name: string) =>
      require(name === 'tfjs-flash-attention' ? path.join(root, 'dist/index.cjs') : name);
  const exampleConsole = {
    log: (...args: unknown[]) => printed.push(args.map(a => JSON.stringify(a)).join(' ')),
    warn: (...args: unknown[]) => printed.push(`warn: ${args.join(' ')}`),
  };
  new Function('require', 'console', 'exports', code)(exampleRequire, exampleConsole, {});
  return printed;
}

describe('README examples', () => {
  beforeAll(() => useBackend('cpu'));

  it('has examples', () => {
    expect(examples.length).toBeGreaterThanOrEqual(8);
  });

  examples.forEach((source, n) => {
    const firstLine = source.split('\n').find(l => l.startsWith('const') || l.startsWith('tf.'));
    it(`example ${n + 1} runs (${firstLine?.slice(0, 60)})`, () => {
      const printed = runExample(source);
      // Examples print shapes and checks; a printed `false` is a broken claim.
      expect(printed.filter(line => line === 'false')).toEqual([]);
    });
  });
});
