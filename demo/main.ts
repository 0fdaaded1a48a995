/**
 * `npm run demo`: bundled by esbuild and run with node (see package.json).
 * Options: --backend=auto|webgpu|cpu, --steps=N, --seconds=N, --out=DIR,
 * --tensor-cores (the subgroup-matrix kernels where the device has them;
 * docs/tensor_cores.md).
 */
import {runDemo} from './run';

function option(name: string): string|undefined {
  const prefix = `--${name}=`;
  return process.argv.slice(2).find(a => a.startsWith(prefix))?.slice(prefix.length);
}

async function main() {
  const backend = (option('backend') ?? 'auto') as 'auto' | 'webgpu' | 'cpu';
  if (!['auto', 'webgpu', 'cpu'].includes(backend)) {
    throw new Error(`--backend must be auto, webgpu or cpu, got ${backend}`);
  }
  const config: Record<string, number> = {};
  if (option('steps') != null) {
    config.steps = Number(option('steps'));
  }
  if (option('seconds') != null) {
    config.maxSeconds = Number(option('seconds'));
  }
  const t0 = performance.now();
  const tensorCores = process.argv.includes('--tensor-cores');
  await runDemo({backend, config, outDir: option('out'), tensorCores});
  console.log(`demo finished in ${((performance.now() - t0) / 1000).toFixed(0)} s`);
  // Dawn keeps the process alive otherwise.
  process.exit(0);
}

main().catch(error => {
  console.error(error);
  process.exit(1);
});
