/**
 * WebGPU in Node for the tests: Dawn from the `webgpu` package, on the
 * machine's GPU where there is one, else on SwiftShader (docs/design.md, "Platform facts").
 *
 * Dawn's native module is loaded once per process and kept on `process`,
 * which all of jest's per-file module registries of a worker share.
 */
import * as fs from 'fs';
import * as path from 'path';

const SWIFTSHADER_ICD = '/usr/lib/chromium/vk_swiftshader_icd.json';
const SYSTEM_ICD_DIRS = [
  '/usr/share/vulkan/icd.d',
  '/etc/vulkan/icd.d',
  '/usr/local/share/vulkan/icd.d',
];

interface DawnModule {
  create(flags: string[]): GPU;
  globals: Record<string, unknown>;
}

interface DawnCache {
  module: DawnModule;
  gpu: GPU;
}

/**
 * Hardware Vulkan drivers installed on the system (Mesa's lavapipe, a CPU
 * driver that Dawn refuses, left out).
 */
function systemVulkanDrivers(): string[] {
  return SYSTEM_ICD_DIRS.filter(dir => fs.existsSync(dir))
      .flatMap(dir => fs.readdirSync(dir).map(f => path.join(dir, f)))
      .filter(f => f.endsWith('.json') && !path.basename(f).startsWith('lvp_'));
}

/**
 * Lets Vulkan see the system's drivers and SwiftShader, unless the caller
 * chose drivers: Dawn then picks a GPU where there is one, else SwiftShader.
 * Must run in jest's global setup: a test file's `process.env` is a copy
 * that native code never sees.
 */
export function chooseVulkanDrivers(): void {
  process.env.XDG_RUNTIME_DIR = process.env.XDG_RUNTIME_DIR || '/tmp';
  if (process.env.VK_ICD_FILENAMES || process.env.VK_DRIVER_FILES) {
    return;
  }
  const drivers = systemVulkanDrivers();
  if (fs.existsSync(SWIFTSHADER_ICD)) {
    drivers.push(SWIFTSHADER_ICD);
  }
  process.env.VK_ICD_FILENAMES = drivers.join(':');
}

function dawn(): DawnCache {
  const holder = process as unknown as {__tfjsFlashAttentionDawn?: DawnCache};
  if (holder.__tfjsFlashAttentionDawn == null) {
    const packageDir = path.dirname(require.resolve('webgpu/package.json'));
    const arch = process.platform === 'darwin' ? 'universal' : process.arch;
    const module =
        require(path.join(packageDir, 'dist', `${process.platform}-${arch}`, 'dawn.node')) as
        DawnModule;
    holder.__tfjsFlashAttentionDawn = {module, gpu: module.create([])};
  }
  return holder.__tfjsFlashAttentionDawn;
}

/**
 * Installs `navigator.gpu` and the WebGPU globals (GPUBufferUsage...) in
 * this module registry's global scope.
 */
export function installWebGPUGlobals(): GPU {
  const {module, gpu} = dawn();
  Object.assign(globalThis, module.globals);
  Object.defineProperty(globalThis, 'navigator', {
    value: {gpu},
    configurable: true,
    writable: true,
  });
  return gpu;
}
