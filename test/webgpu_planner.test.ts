/**
 * The forward planner's choice of tiling per problem (pure logic over a
 * stand-in device: no GPU needed): 16-row query tiles for short grids at
 * D=64 on a hardware GPU (docs/webgpu_tuning.md, "Short grids"), the
 * earlier choices everywhere else.
 */
import {planForward} from '../kernels/webgpu/FlashAttention';
import {SHORT_GRID_GROUPS} from '../kernels/webgpu/tuning';

import {H100_STAND_IN} from './harness/devices';

const H100 = H100_STAND_IN;

const SWIFTSHADER = {
  ...H100,
  adapterInfo: {vendor: 'google', architecture: '', description: 'SwiftShader', subgroupMinSize: 4},
} as unknown as GPUDevice;

const SHORT_TILE = {
  tm: 2,
  tx: 16,
  nq: 1,
  ty: 8
};  // 16 x 64
const CLASSIC_TILE = {
  tm: 4,
  tx: 16,
  nq: 1,
  ty: 8
};  // 32 x 64

/** rows = batch * heads * seqQ, as the kernel passes it. */
function tilesFor(device: GPUDevice, d: number, batch: number, heads: number, seq: number) {
  return planForward(device, d, d, batch * heads * seq)!.tiles;
}

describe('forward planner', () => {
  it('takes 16 x 64 tiles at D=64 when 32-row tiles leave the H100\'s SMs idle', () => {
    expect(SHORT_GRID_GROUPS).toBe(264);
    // B=1, H=16, S=512: 256 workgroups of 32 rows < 264.
    expect(tilesFor(H100, 64, 1, 16, 512)).toEqual(SHORT_TILE);
    expect(tilesFor(H100, 64, 1, 8, 1024)).toEqual(SHORT_TILE);
    expect(tilesFor(H100, 64, 2, 4, 128)).toEqual(SHORT_TILE);
    // At the threshold: 264 workgroups of 32 rows are enough, 263 are not.
    expect(tilesFor(H100, 64, 1, 1, 264 * 32)).toEqual(CLASSIC_TILE);
    expect(tilesFor(H100, 64, 1, 1, 263 * 32)).toEqual(SHORT_TILE);
    // S=1024 at H=16 (512 workgroups) keeps the 32-row tiles, as before.
    expect(tilesFor(H100, 64, 1, 16, 1024)).toEqual(CLASSIC_TILE);
    expect(tilesFor(H100, 64, 4, 32, 1024).outer).toBe(true);
  });

  it('keeps the other head dims and software devices on their tilings', () => {
    // D=128 takes the streamed tiles E, or the sliced ones where 48 KiB is
    // not there; D <= 32 was not measured.
    const streamed = {tm: 4, tx: 16, nq: 1, ty: 16, outer: true, dimChunks: 2, streamQuery: true};
    expect(tilesFor(H100, 128, 1, 16, 512)).toEqual(streamed);
    expect(tilesFor(H100, 100, 1, 16, 16384)).toEqual(streamed);
    expect(tilesFor(H100, 96, 1, 16, 512).streamQuery).toBeUndefined();
    const smallShared = {
      ...H100,
      limits: {...H100.limits, maxComputeWorkgroupStorageSize: 49152 - 4096},
    } as unknown as GPUDevice;
    expect(tilesFor(smallShared, 128, 1, 16, 512).streamQuery).toBeUndefined();
    expect(tilesFor(H100, 32, 1, 16, 512)).not.toEqual(SHORT_TILE);
    expect(tilesFor(H100, 32, 1, 16, 512)).toEqual(tilesFor(H100, 32, 16, 16, 4096));
    // SwiftShader: the same plan at every grid size (no SMs to fill).
    expect(tilesFor(SWIFTSHADER, 64, 1, 2, 64)).toEqual(tilesFor(SWIFTSHADER, 64, 64, 16, 4096));
    expect(tilesFor(SWIFTSHADER, 64, 1, 2, 64)).not.toEqual(SHORT_TILE);
  });
});
