/**
 * Runs a TypeScript code example from the docs as written: its imports are
 * kept, the rest runs inside an async function (so top-level `await`
 * works), `require` is the caller's (to map package names onto this
 * checkout), and what it prints is returned, one JSON line per call.
 */
import * as esbuild from 'esbuild';
import * as fs from 'fs';
import * as path from 'path';

import {useBackend} from './backends';

const root = path.join(__dirname, '..', '..');

/** The `ts` code blocks of a markdown text. */
export function tsBlocks(markdown: string): string[] {
  return [...markdown.matchAll(/```ts\n([\s\S]*?)```/g)].map(m => m[1]);
}

export async function runTsExample(
    source: string, exampleRequire: (name: string) => unknown): Promise<string[]> {
  const lines = source.split('\n');
  const imports = lines.filter(l => l.startsWith('import '));
  const body = lines.filter(l => !l.startsWith('import '));
  const wrapped = `${imports.join('\n')}\nexport async function main() {\n${body.join('\n')}\n}\n`;
  const {code} = esbuild.transformSync(wrapped, {loader: 'ts', format: 'cjs'});
  const printed: string[] = [];
  const exampleConsole = {
    log: (...args: unknown[]) => printed.push(args.map(a => JSON.stringify(a)).join(' ')),
    warn: (...args: unknown[]) => printed.push(`warn: ${args.join(' ')}`),
  };
  const module = {
    exports: {} as {
      main?: () => Promise<void>
    }
  };
  new Function('require', 'console', 'module', 'exports', code)(
      exampleRequire, exampleConsole, module, module.exports);
  await module.exports.main!();
  return printed;
}

/** The `ts` code blocks of a file of the repository (e.g. 'docs/layers.md'). */
export function docExamples(file: string): string[] {
  return tsBlocks(fs.readFileSync(path.join(root, file), 'utf8'));
}

/**
 * For the layers docs: the cpu backend, after checking that the built
 * dist/layers.cjs exists (runLayersExample imports it).
 */
export async function useLayersBuildOnCpu(): Promise<void> {
  if (!fs.existsSync(path.join(root, 'dist/layers.cjs'))) {
    throw new Error('dist/layers.cjs is missing: run `npm run build` (npm test does)');
  }
  await useBackend('cpu');
}

/**
 * runTsExample with `tfjs-flash-attention/layers` the built dist/layers.cjs
 * (which takes the same core module as the tests) and
 * `tfjs-flash-attention` the sources.
 */
export function runLayersExample(source: string): Promise<string[]> {
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
