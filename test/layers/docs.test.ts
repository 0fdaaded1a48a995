/**
 * docs/layers.md's TypeScript examples, run as written (cpu backend):
 * `tfjs-flash-attention/layers` is the built dist/layers.cjs (which takes
 * the same core module as this test), `tfjs-flash-attention` the sources.
 */
import * as fs from 'fs';
import * as path from 'path';

import * as esbuild from 'esbuild';

import {useBackend} from '../harness/backends';

const root = path.join(__dirname, '..', '..');
const doc = fs.readFileSync(path.join(root, 'docs', 'layers.md'), 'utf8');
const examples = [...doc.matchAll(/```ts\n([\s\S]*?)```/g)].map(m => m[1]);

/** `import ... from 'x'` lines as requires, the rest inside an async function (top-level await). */
function toAsyncModule(source: string): string {
  const lines = source.split('\n').map(line => {
    const star = line.match(/^import \* as (\w+) from '([^']+)';$/);
    if (star) {
      return `const ${star[1]} = require('${star[2]}');`;
    }
    const named = line.match(/^import \{([^}]+)\} from '([^']+)';$/);
    if (named) {
      return `const {${named[1]}} = require('${named[2]}');`;
    }
    if (line.startsWith('import ')) {
      throw new Error(`docs test: unsupported import: ${line}`);
    }
    return line;
  });
  return `module.exports = (async () => {\n${lines.join('\n')}\n})();`;
}

async function runExample(source: string): Promise<string[]> {
  const {code} = esbuild.transformSync(toAsyncModule(source), {loader: 'ts'});
  const printed: string[] = [];
  const exampleRequire = (name: string) => {
    if (name === 'tfjs-flash-attention/layers') {
      return require(path.join(root, 'dist/layers.cjs'));
    }
    if (name === 'tfjs-flash-attention') {
      return require('../../src');
    }
    return require(name);
  };
  const exampleConsole = {log: (...args: unknown[]) => printed.push(args.map(a => JSON.stringify(a)).join(' '))};
  const module = {exports: undefined as unknown};
  new Function('require', 'console', 'module', code)(exampleRequire, exampleConsole, module);
  await module.exports;
  return printed;
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
