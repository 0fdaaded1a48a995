"""PyTorch SDPA float32 anchor (docs/design.md, "Performance method") on the benchmark's shapes.

Memory-efficient CUDA backend (the fp32 one), forward and forward+backward,
median of CUDA-event timings after warm-up. Writes JSON that
benchmarks/attention.ts --torch FILE folds into its table and chart.

    python3 torch_sdpa.py [--dims 64,128] [--seqs 512,...,16384]
        [--causal both] [--modes fwd,fwdbwd] [--out torch.json]
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, budget_ms=400.0, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    reps = int(max(5, min(50, budget_ms / est)))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--dims', default='64,128')
    p.add_argument('--seqs', default='512,1024,2048,4096,8192,16384')
    p.add_argument('--causal', default='both')
    p.add_argument('--modes', default='fwd,fwdbwd')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--heads', type=int, default=16)
    p.add_argument('--out', default='torch.json')
    p.add_argument('--budget-ms', type=float, default=400.0)
    a = p.parse_args()
    causals = [True, False] if a.causal == 'both' else [a.causal == 'true']
    dev = torch.device('cuda')
    rows = []
    for mode in a.modes.split(','):
        for d in [int(x) for x in a.dims.split(',')]:
            for causal in causals:
                for s in [int(x) for x in a.seqs.split(',')]:
                    row = {'mode': mode, 'dim': d, 'seq': s, 'causal': causal, 'ms': None}
                    try:
                        shape = (a.batch, a.heads, s, d)
                        q, k, v = (torch.randn(shape, device=dev, dtype=torch.float32,
                                               requires_grad=(mode != 'fwd')) for _ in range(3))
                        dy = torch.randn(shape, device=dev, dtype=torch.float32)
                        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                            if mode == 'fwd':
                                def fn():
                                    with torch.no_grad():
                                        F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                            else:
                                def fn():
                                    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                                    torch.autograd.grad(out, (q, k, v), dy)
                            ms, reps = median_ms(fn, a.budget_ms)
                        row['ms'] = ms
                        row['reps'] = reps
                        fl = 4 * a.batch * s * s * a.heads * d / (2 if causal else 1)
                        fl *= 1 if mode == 'fwd' else 3.5
                        print(f'torch {mode} D={d} S={s} causal={causal}: {ms:.3f} ms, '
                              f'{fl / ms / 1e9:.2f} TFLOP/s ({reps} reps)', file=sys.stderr)
                    except Exception as e:  # noqa: BLE001 (OOM etc. is reported)
                        row['error'] = str(e)[:200]
                        print(f'torch {mode} D={d} S={s} causal={causal}: {e}', file=sys.stderr)
                    rows.append(row)
                    torch.cuda.empty_cache()
    out = {'device': torch.cuda.get_device_name(0), 'torch': torch.__version__, 'rows': rows}
    with open(a.out, 'w') as f:
        json.dump(out, f, indent=1)


if __name__ == '__main__':
    main()
