/**
 * The README's TypeScript examples, run as written against the built
 * package (cpu backend), so that they stay true. The Keras loading example
 * needs a model served over HTTP: test/keras/docs.test.ts runs it.
 */
import * as fs from 'fs';
import * as path from 'path';

import * as esbuild from 'esbuild';

import {useBackend} from './harness/backends';

const root = path.join(__dirname, '..');
const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
const examples = [...readme.matchAll(/```ts\n([\s\S]*?)```/g)]
                     .map(m => m[1])
                     .filter(source => !source.includes('https://example.com/'));

const BUILT: Record<string, string> = {
  'tfjs-flash-attention': 'dist/index.cjs',
  'tfjs-flash-attention/layers': 'dist/layers.cjs',
};

/** Runs one example (imports hoisted, the rest awaited); returns what it printed. */
async function runExample(source: string): Promise<string[]> {
  const lines = source.split('\n');
  const imports = lines.filter(l => l.startsWith('import '));
  const body = lines.filter(l => !l.startsWith('import '));
  const wrapped = `${imports.join('\n')}\nexport async function main() {\n${body.join('\n')}\n}\n`;
  const {code} = esbuild.transformSync(wrapped, {loader: 'ts', format: 'cjs'});
  const printed: string[] = [];
  const exampleRequire = (name: string) =>
      require(BUILT[name] != null ? path.join(root, BUILT[name]) : name);
  const exampleConsole = {
    log: (...args: unknown[]) => printed.push(args.map(a => JSON.stringify(a)).join(' ')),
    warn: (...args: unknown[]) => printed.push(`warn: ${args.join(' ')}`),
  };
  const module = {exports: {} as {main?: () => Promise<void>}};
  new Function('require', 'console', 'module', 'exports', code)(
      exampleRequire, exampleConsole, module, module.exports);
  await module.exports.main!();
  return printed;
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
