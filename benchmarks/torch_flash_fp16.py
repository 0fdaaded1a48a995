"""PyTorch anchors for benchmarks/tensor_cores.ts: FlashAttention-2 (SDPA
flash backend, float16) and SDPA float32 (efficient backend), forward and
forward+backward, causal, B=1, H=16, median of CUDA-event timings after
warm-up. --out writes the rows as JSON for `tensor_cores.mjs --torch`.

    python3 torch_flash_fp16.py [--dims 64,128] [--seqs 4096,16384] [--out FILE]
"""
import argparse
import json

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
    p.add_argument('--out', default='')
    a = p.parse_args()
    rows = []
    for d in map(int, a.dims.split(',')):
        for s in map(int, a.seqs.split(',')):
            for dtype, backend in ((torch.float16, SDPBackend.FLASH_ATTENTION),
                                   (torch.float32, SDPBackend.EFFICIENT_ATTENTION)):
                for mode in ('fwd', 'fwdbwd'):
                    grad = mode == 'fwdbwd'
                    q, k, v, dy = (torch.randn(1, a.heads, s, d, device='cuda', dtype=dtype,
                                               requires_grad=grad and i < 3) for i in range(4))

                    def fn():
                        if not grad:
                            with torch.no_grad():
                                F.scaled_dot_product_attention(q, k, v, is_causal=True)
                        else:
                            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                            torch.autograd.grad(out, (q, k, v), dy)
                    with sdpa_kernel(backend):
                        ms = median_ms(fn)
                    tf = 4 * s * s * a.heads * d / 2 * (3.5 if grad else 1) / ms / 1e9
                    name = 'fa2_fp16' if dtype == torch.float16 else 'sdpa_fp32'
                    rows.append({'impl': name, 'mode': mode, 'dim': d, 'seq': s, 'ms': ms,
                                 'tflops': tf})
                    print(f'torch {name} {mode} D={d} S={s} causal: {ms:.3f} ms, {tf:.1f} TFLOP/s')
                    del q, k, v, dy
                    torch.cuda.empty_cache()
    if a.out:
        with open(a.out, 'w') as f:
            json.dump({'device': torch.cuda.get_device_name(0), 'torch': torch.__version__,
                       'heads': a.heads, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
    main()
