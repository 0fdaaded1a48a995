"""PyTorch SDPA float32 anchor (docs/design.md, "Performance method") on the benchmark's shapes.

Memory-efficient CUDA backend (the fp32 one), forward and forward+backward,
median of CUDA-event timings after warm-up. Writes JSON that
benchmarks/attention.ts --torch FILE folds into its table and chart.

    python3 torch_sdpa.py [--dims 64,128] [--seqs 512,...,16384]
        [--causal both] [--modes fwd,fwdbwd] [--shapes "B,H,Hk,S;..."]
        [--sweep] [--out torch.json]

--shapes adds problems at every D beyond the B x H grid; Hk < H is GQA,
K/V heads repeated (repeat_interleave, inside the timing) for SDPA.
--sweep adds the extra problems of benchmarks/attention.ts --sweep.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import torch_timing


def median_ms(fn, budget_ms=400.0, warmup=3):
    return torch_timing.median_ms(fn, budget_ms, warmup, min_reps=5, max_reps=50)


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
    p.add_argument('--shapes', default='')
    p.add_argument('--sweep', action='store_true')
    a = p.parse_args()
    causals = [True, False] if a.causal == 'both' else [a.causal == 'true']
    dev = torch.device('cuda')
    shapes = a.shapes or ('4,32,32,1024;1,32,8,4096' if a.sweep else '')
    problems = [(a.batch, a.heads, a.heads, int(s)) for s in a.seqs.split(',')]
    problems += [tuple(int(x) for x in p.split(',')) for p in shapes.split(';') if p]
    rows = []
    for mode in a.modes.split(','):
        for d in [int(x) for x in a.dims.split(',')]:
            for causal in causals:
                for b, h, hk, s in problems:
                    row = {'mode': mode, 'dim': d, 'seq': s, 'causal': causal, 'ms': None,
                           'batch': b, 'heads': h, 'headsKV': hk}
                    try:
                        grad = mode != 'fwd'
                        q, dy = (torch.randn((b, h, s, d), device=dev, dtype=torch.float32,
                                             requires_grad=grad and i == 0) for i in range(2))
                        k, v = (torch.randn((b, hk, s, d), device=dev, dtype=torch.float32,
                                            requires_grad=grad) for _ in range(2))

                        def attend():
                            kk, vv = k, v
                            if hk != h:
                                kk = k.repeat_interleave(h // hk, dim=1)
                                vv = v.repeat_interleave(h // hk, dim=1)
                            return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal)
                        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                            if mode == 'fwd':
                                def fn():
                                    with torch.no_grad():
                                        attend()
                            else:
                                def fn():
                                    torch.autograd.grad(attend(), (q, k, v), dy)
                            ms, reps = median_ms(fn, a.budget_ms)
                        row['ms'] = ms
                        row['reps'] = reps
                        fl = 4 * b * s * s * h * d / (2 if causal else 1)
                        fl *= 1 if mode == 'fwd' else 3.5
                        print(f'torch {mode} B={b} H={h}/{hk} D={d} S={s} causal={causal}: '
                              f'{ms:.3f} ms, {fl / ms / 1e9:.2f} TFLOP/s ({reps} reps)',
                              file=sys.stderr)
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
