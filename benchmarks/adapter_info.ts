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
  // What the kernels read: the device's own adapterInfo, with the features
  // the tensor-core path needs (the adapter's list may differ from it).
  const wanted = ['shader-f16', 'subgroups', 'chromium-experimental-subgroup-matrix'];
  const device = await adapter.requestDevice(
      {requiredFeatures: wanted.filter(f => adapter.features.has(f)) as GPUFeatureName[]});
  const deviceInfo = (device as unknown as {adapterInfo?: Record<string, unknown>}).adapterInfo;
  const deviceConfigs =
      (deviceInfo?.subgroupMatrixConfigs as Array<Record<string, unknown>>| undefined) ?? [];
  const fieldsOf = (o: object|undefined): string[] => {
    const names = new Set<string>();
    for (let p = o; p != null && p !== Object.prototype; p = Object.getPrototypeOf(p)) {
      Object.getOwnPropertyNames(p).forEach(n => names.add(n));
    }
    return [...names].filter(n => n !== 'constructor');
  };
  const deviceView = {
    features: [...device.features].sort(),
    subgroupMinSize: deviceInfo?.subgroupMinSize,
    subgroupMaxSize: deviceInfo?.subgroupMaxSize,
    configFields: fieldsOf(deviceConfigs[0] ?? configs[0]),
    subgroupMatrixConfigs:
        deviceConfigs.map(c => Object.fromEntries(fieldsOf(c).map(n => [n, String(c[n])]))),
  };
  device.destroy();
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
    requestedDevice: deviceView,
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
