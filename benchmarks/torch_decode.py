"""PyTorch anchor of benchmarks/decode.ts: one new token against a KV cache.

SDPA (float32, the memory-efficient CUDA backend where it takes the call)
of q [1, H, 1, D] over the first `context` rows of a preallocated cache
[1, Hk, Smax, D], GQA by enable_gqa (PyTorch >= 2.5) or repeated kv heads,
after writing the new key/value in place (index_copy_), as a decoder with a
static cache does. Median of CUDA-event timings. Writes JSON that
decode.mjs --torch FILE folds into its table.

    python3 torch_decode.py [--contexts 512,...,32768] [--heads 32]
        [--heads-kv 8] [--dim 128] [--out torch_decode.json] [--smoke]
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

import torch_timing


def median_ms(fn, budget_ms=300.0, warmup=5):
    return torch_timing.median_ms(fn, budget_ms, warmup, min_reps=10, max_reps=200)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--contexts', default='512,1024,2048,4096,8192,16384,32768')
    p.add_argument('--heads', type=int, default=32)
    p.add_argument('--heads-kv', type=int, default=8)
    p.add_argument('--dim', type=int, default=128)
    p.add_argument('--out', default='torch_decode.json')
    p.add_argument('--smoke', action='store_true', help='tiny sizes (also runs on the CPU)')
    a = p.parse_args()
    if a.smoke:
        a.contexts, a.heads, a.heads_kv, a.dim = '64,200', 4, 2, 16
    dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    h, hk, d = a.heads, a.heads_kv, a.dim
    rows = []
    for context in [int(x) for x in a.contexts.split(',')]:
        row = {'context': context, 'ms': None}
        try:
            k_cache = torch.randn(1, hk, context, d, device=dev)
            v_cache = torch.randn(1, hk, context, d, device=dev)
            q = torch.randn(1, h, 1, d, device=dev)
            k_new = torch.randn(1, hk, 1, d, device=dev)
            v_new = torch.randn(1, hk, 1, d, device=dev)
            slot = torch.tensor([context - 1], device=dev)

            def step():
                with torch.no_grad():
                    k_cache.index_copy_(2, slot, k_new)
                    v_cache.index_copy_(2, slot, v_new)
                    try:
                        return F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
                    except TypeError:  # PyTorch < 2.5: repeat the kv heads.
                        rep = h // hk
                        return F.scaled_dot_product_attention(
                            q, k_cache.repeat_interleave(rep, 1), v_cache.repeat_interleave(rep, 1))

            if dev.type == 'cuda':
                ms, reps = median_ms(step)
            else:
                import time
                t0 = time.perf_counter()
                for _ in range(5):
                    step()
                ms, reps = (time.perf_counter() - t0) * 200, 5
            row['ms'], row['reps'] = ms, reps
            gbs = 2 * context * hk * d * 4 / ms / 1e6
            print(f'torch decode context {context}: {ms:.4f} ms, {gbs:.0f} GB/s of K/V ({reps} reps)',
                  file=sys.stderr)
        except Exception as e:  # noqa: BLE001 (OOM etc. is reported)
            row['error'] = str(e)[:200]
            print(f'torch decode context {context}: {e}', file=sys.stderr)
        rows.append(row)
    name = torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'
    with open(a.out, 'w') as f:
        json.dump({'device': name, 'torch': torch.__version__, 'rows': rows}, f, indent=1)
    print(f'wrote {a.out} ({name})', file=sys.stderr)


if __name__ == '__main__':
    main()
