/**
 * Stand-in GPU devices for the planners' pure logic (they read only the
 * limits, features and adapter info below): no GPU needed.
 */

/** An H100 as Dawn reports it. */
export const H100_STAND_IN = {
  limits: {
    maxComputeInvocationsPerWorkgroup: 1024,
    maxComputeWorkgroupSizeX: 1024,
    maxComputeWorkgroupStorageSize: 49152
  },
  features: new Set(['subgroups']),
  adapterInfo:
      {vendor: 'nvidia', architecture: '', description: 'NVIDIA H100', subgroupMinSize: 32},
} as unknown as GPUDevice;
