/**
 * Prints what the WebGPU adapter offers: name, features, the limits the
 * kernels plan with, and the subgroup-matrix configurations (tensor cores
 * from WGSL) when the feature is there. Asks Dawn for its unsafe features
 * (shader-f16 and chromium-experimental-subgroup-matrix are behind them).
 *
 *   node benchmarks/out/adapter_info.mjs [--json FILE]
 */
import * as fs from 'fs';

interface DawnNode {
  create(flags: string[]): GPU;
  globals: Record<string, unknown>;
}

async function main(): Promise<void> {
  const webgpu = await import('webgpu') as unknown as DawnNode;
  Object.assign(globalThis, webgpu.globals);
  const gpu = webgpu.create([
    'enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia',
  ]);
  const adapter = await gpu.requestAdapter({powerPreference: 'high-performance'});
  if (adapter == null) {
    throw new Error('adapter_info: no WebGPU adapter');
  }
  const info = adapter.info;
  const features = [...adapter.features].sort();
  const limitNames = [
    'maxComputeWorkgroupStorageSize',
    'maxComputeInvocationsPerWorkgroup',
    'maxStorageBufferBindingSize',
    'maxBufferSize',
    'maxStorageBuffersPerShaderStage',
  ];
  const limits: Record<string, number> = {};
  for (const name of limitNames) {
    limits[name] = (adapter.limits as unknown as Record<string, number>)[name];
  }
  // Dawn's config objects keep their fields on the prototype: read them out.
  const configs = (info as unknown as {
                    subgroupMatrixConfigs?: Array<Record<string, unknown>>
                  }).subgroupMatrixConfigs ??
      [];
  const subgroupMatrix = configs.map(c => ({
                                       M: c.M,
                                       N: c.N,
                                       K: c.K,
                                       componentType: c.componentType,
                                       resultType: c.resultType,
                                     }));
  const report = {
    vendor: info.vendor,
    architecture: info.architecture,
    device: info.device,
    description: info.description,
    subgroupMinSize: (info as unknown as {subgroupMinSize?: number}).subgroupMinSize,
    subgroupMaxSize: (info as unknown as {subgroupMaxSize?: number}).subgroupMaxSize,
    features,
    limits,
    subgroupMatrixConfigs: subgroupMatrix,
  };
  const text = JSON.stringify(report, null, 2);
  console.log(text);
  const jsonAt = process.argv.indexOf('--json');
  if (jsonAt >= 0) {
    fs.writeFileSync(process.argv[jsonAt + 1], text);
  }
}

main().catch(e => {
  console.error(e);
  process.exit(1);
});
