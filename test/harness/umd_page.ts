/**
 * A page-like global scope for the UMD bundles' tests (test/build.test.ts,
 * test/layers/build_layers.test.ts): the globals a browser page gives a
 * script tag, and scripts run in it in order, as tags would.
 */
import * as fs from 'fs';
import * as vm from 'vm';

/** A fresh page scope, `window` and `self` being the scope itself. */
export function umdPageContext(): vm.Context {
  const context = vm.createContext({
    console,
    setTimeout,
    clearTimeout,
    performance,
    TextEncoder,
    TextDecoder,
    document: {},
    navigator: {userAgent: 'test'},
    location: {search: ''},
  });
  context.globalThis = context;
  context.window = context;
  context.self = context;
  return context;
}

/** Runs the script `file` in the page `context`, as a script tag would. */
export function loadScript(context: vm.Context, file: string): void {
  vm.runInContext(fs.readFileSync(file, 'utf8'), context, {filename: file});
}

/** tfjs's own UMD bundles a page loads before ours: core, the cpu backend, layers. */
export const TFJS_UMD_SCRIPTS = [
  require.resolve('@tensorflow/tfjs-core/dist/tf-core.js'),
  require.resolve('@tensorflow/tfjs-backend-cpu/dist/tf-backend-cpu.js'),
  require.resolve('@tensorflow/tfjs-layers/dist/tf-layers.js'),
];
