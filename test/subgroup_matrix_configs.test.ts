/**
 * Which subgroup-matrix configuration the tensor-core kernels pick, from
 * the adapter info Dawn reports (no GPU needed: the device is a plain
 * object). The configurations are those an H100 reported through Dawn's
 * Node binding (`benchmarks/adapter_info.ts`), where `device.adapterInfo`
 * lists none and only `adapter.info` has them.
 */
/// <reference types="@webgpu/types" />
import * as tf from '@tensorflow/tfjs-core';

import {matrixShapeFor} from '../kernels/webgpu/flash_attention_subgroup_matrix';
import {allowUnvalidatedTensorCores, pickSubgroupMatrixShape, subgroupMatrixConfigs, useAdapterInfo} from '../kernels/webgpu/subgroup_matrix';
import {FLASH_ATTENTION_TENSOR_CORES} from '../src/flags';

/** Dawn keeps a config's fields on its prototype; so does this stand-in. */
function dawnConfig(M: number, N: number, K: number, componentType: string, result: string) {
  return Object.create({M, N, K, componentType, resultComponentType: result}) as object;
}

const H100_CONFIGS = [
  dawnConfig(16, 16, 16, 'f16', 'f16'), dawnConfig(16, 8, 16, 'f16', 'f16'),
  dawnConfig(16, 8, 8, 'f16', 'f16'), dawnConfig(16, 16, 16, 'f16', 'f32'),
  dawnConfig(16, 8, 16, 'f16', 'f32'), dawnConfig(16, 8, 8, 'f16', 'f32'),
  dawnConfig(16, 16, 32, 'u8', 'u32'), dawnConfig(16, 16, 32, 'i8', 'i32')
];

function fakeDevice(features: string[], configs: object[]): GPUDevice {
  return {
    features: new Set(features),
    adapterInfo: {subgroupMinSize: 32, subgroupMaxSize: 32, subgroupMatrixConfigs: configs},
  } as unknown as GPUDevice;
}

const ALL_FEATURES = ['shader-f16', 'subgroups', 'chromium-experimental-subgroup-matrix'];

describe('subgroup-matrix configuration', () => {
  it('reads configs whose fields live on the prototype', () => {
    const device = fakeDevice(ALL_FEATURES, H100_CONFIGS);
    const configs = subgroupMatrixConfigs(device);
    expect(configs.length).toBe(H100_CONFIGS.length);
    expect(configs[3]).toEqual({M: 16, N: 16, K: 16, componentType: 'f16', resultType: 'f32'});
  });

  it('picks the largest f16 x f16 -> f32 tile', () => {
    expect(pickSubgroupMatrixShape(fakeDevice(ALL_FEATURES, H100_CONFIGS)))
        .toEqual({M: 16, N: 16, K: 16, lanes: 32, standIn: false});
  });

  it('uses the adapter info handed over when the device lists no configs', () => {
    const device = fakeDevice(ALL_FEATURES, []);
    expect(pickSubgroupMatrixShape(device)).toBeNull();
    useAdapterInfo(
        device,
        {subgroupMinSize: 32, subgroupMaxSize: 32, subgroupMatrixConfigs: H100_CONFIGS} as
            unknown as GPUAdapterInfo);
    expect(pickSubgroupMatrixShape(device))
        .toEqual({M: 16, N: 16, K: 16, lanes: 32, standIn: false});
  });

  it('stays off without a feature or with only f16 results', () => {
    expect(pickSubgroupMatrixShape(fakeDevice(['shader-f16', 'subgroups'], H100_CONFIGS)))
        .toBeNull();
    expect(pickSubgroupMatrixShape(fakeDevice(ALL_FEATURES, H100_CONFIGS.slice(0, 3)))).toBeNull();
  });

  it('keeps the real kernels off under the opt-in until they pass on hardware', () => {
    const device = fakeDevice(ALL_FEATURES, H100_CONFIGS);
    const warn = jest.spyOn(console, 'warn').mockImplementation(() => {});
    try {
      tf.env().set(FLASH_ATTENTION_TENSOR_CORES, false);
      expect(matrixShapeFor(device)).toBeNull();
      tf.env().set(FLASH_ATTENTION_TENSOR_CORES, true);
      expect(matrixShapeFor(device)).toBeNull();
      expect(warn).toHaveBeenCalledTimes(1);
      allowUnvalidatedTensorCores(true);
      expect(matrixShapeFor(device)).toEqual({M: 16, N: 16, K: 16, lanes: 32, standIn: false});
    } finally {
      allowUnvalidatedTensorCores(false);
      tf.env().set(FLASH_ATTENTION_TENSOR_CORES, false);
      warn.mockRestore();
    }
  });
});
