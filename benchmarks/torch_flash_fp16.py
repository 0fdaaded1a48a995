"""PyTorch FlashAttention-2 (SDPA flash backend, float16) forward anchor,
causal, B=1, H=16, median of CUDA-event timings after warm-up.

    python3 torch_flash_fp16.py [--dims 64,128] [--seqs 4096,16384]
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--dims', default='64,128')
    p.add_argument('--seqs', default='4096,16384')
    p.add_argument('--heads', type=int, default=16)
    a = p.parse_args()
    for d in map(int, a.dims.split(',')):
        for s in map(int, a.seqs.split(',')):
            for dtype, backend in ((torch.float16, SDPBackend.FLASH_ATTENTION),
                                   (torch.float32, SDPBackend.EFFICIENT_ATTENTION)):
                q, k, v = (torch.randn(1, a.heads, s, d, device='cuda', dtype=dtype)
                           for _ in range(3))
                with sdpa_kernel(backend):
                    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
                tf = 4 * s * s * a.heads * d / 2 / ms / 1e9
                print(f'torch {str(dtype)[6:]} {backend.name} fwd D={d} S={s} causal: '
                      f'{ms:.3f} ms, {tf:.1f} TFLOP/s')


if __name__ == '__main__':
    main()
