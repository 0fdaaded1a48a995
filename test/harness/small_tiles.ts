/**
 * Small fused tiles on webgpu for the enclosing describe block: several
 * query and key tiles per short sequence (skipped tiles included), and
 * pipelines SwiftShader compiles in about a second instead of half a
 * minute. Other backends are left alone.
 */
import {setForwardOverride} from '../../kernels/webgpu/FlashAttention';
import {setGradTilesOverride} from '../../kernels/webgpu/FlashAttentionGrad';

import type {TestBackend} from './backends';

export function useSmallTiles(backend: TestBackend): void {
  beforeAll(() => {
    if (backend === 'webgpu') {
      setForwardOverride({tiles: {tm: 1, tx: 2, nq: 1, ty: 8}});
      setGradTilesOverride({dkdv: {bc: 4, br: 4, threads: 16}, dq: {br: 4, bc: 4, threads: 16}});
    }
  });
  afterAll(() => {
    setForwardOverride(null);
    setGradTilesOverride(null);
  });
}
