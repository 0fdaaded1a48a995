/**
 * Runs a TypeScript code example from the docs as written: its imports are
 * kept, the rest runs inside an async function (so top-level `await`
 * works), `require` is the caller's (to map package names onto this
 * checkout), and what it prints is returned, one JSON line per call.
 */
import * as esbuild from 'esbuild';

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
