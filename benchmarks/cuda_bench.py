"""kernels/cuda vs PyTorch SDPA float32 (memory-efficient backend), B=1, H=16.

  python3 benchmarks/cuda_bench.py [--quick] [--out results.md]

CUDA events around each call, warm-up first, median of repeats; inputs
rotate over 3 sets. FLOPs as docs/design.md, "Performance method": fwd 4*B*S*S*H*D (halved
when causal), fwd+bwd 3.5x that. Ratio > 1 means ours is faster.
"""
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, 'test/cuda')
from fa_ctypes import FlashAttention, load  # noqa: E402


def timeit(fn, budget_s=0.25, max_reps=30):
    fn()
    torch.cuda.synchronize()
    times = []
    start = time.time()
    while len(times) < max_reps and (len(times) < 3 or time.time() - start < budget_s):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench(fa, S, D, causal):
    B, H = 1, 16
    sets = []
    for _ in range(3):
        q, k, v = (torch.randn(B, S, H, D, device='cuda') for _ in range(3))
        dout = torch.randn(B, S, H, D, device='cuda')
        sets.append((q, k, v, dout))
    opts = {'causal': causal}
    dlse = torch.zeros(B, H, S, device='cuda')
    out = torch.empty(B, S, H, D, device='cuda')
    lse = torch.empty(B, H, S, device='cuda')
    grads = tuple(torch.empty(B, S, H, D, device='cuda') for _ in range(3))
    idx = [0]

    def nxt():
        idx[0] = (idx[0] + 1) % 3
        return sets[idx[0]]

    def ours_fwd():
        q, k, v, _ = nxt()
        fa.forward(q, k, v, opts, out, lse)

    def ours_fb():
        q, k, v, dout = nxt()
        fa.forward(q, k, v, opts, out, lse)
        fa.backward(dout, dlse, q, k, v, out, lse, opts, grads)

    # PyTorch in its own layout [B, H, S, D].
    tsets = [tuple(t.transpose(1, 2).contiguous() for t in s) for s in sets]
    tq = [tuple(t.clone().requires_grad_(True) for t in s[:3]) + (s[3],) for s in tsets]

    def torch_fwd():
        nxt()
        q, k, v, _ = tsets[idx[0]]
        with torch.no_grad(), sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def torch_fb():
        nxt()
        q, k, v, dout = tq[idx[0]]
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        q.grad = k.grad = v.grad = None
        o.backward(dout)

    flops = 4 * B * S * S * H * D / (2 if causal else 1)
    res = {}
    for name, fn in (('ours_fwd', ours_fwd), ('torch_fwd', torch_fwd),
                     ('ours_fb', ours_fb), ('torch_fb', torch_fb)):
        res[name] = timeit(fn)
    res['tflops_fwd'] = flops / res['ours_fwd'] / 1e9
    res['tflops_fb'] = 3.5 * flops / res['ours_fb'] / 1e9
    return res


def main():
    quick = '--quick' in sys.argv
    out_path = sys.argv[sys.argv.index('--out') + 1] if '--out' in sys.argv else None
    torch.backends.cuda.matmul.allow_tf32 = False
    fa = FlashAttention(load())
    # The goal shape (S=4096, D=64, causal) comes first and again last, so
    # the table shows the run-to-run spread.
    configs = ([(4096, 64, True), (4096, 128, True), (4096, 64, False)] if quick else
               [(S, D, c) for D in (64, 128) for c in (True, False)
                for S in (512, 1024, 2048, 4096, 8192, 16384)] + [(4096, 64, True)])
    lines = ['| D | causal | S | ours fwd ms | SDPA fwd ms | fwd ratio | ours fwd+bwd ms | '
             'SDPA fwd+bwd ms | fwd+bwd ratio | ours fwd TFLOP/s | ours fwd+bwd TFLOP/s |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    print(f'device: {torch.cuda.get_device_name()}  torch {torch.__version__}', flush=True)
    for S, D, causal in configs:
        r = bench(fa, S, D, causal)
        line = (f"| {D} | {causal} | {S} | {r['ours_fwd']:.3f} | {r['torch_fwd']:.3f} | "
                f"{r['torch_fwd'] / r['ours_fwd']:.2f}x | {r['ours_fb']:.3f} | {r['torch_fb']:.3f} | "
                f"{r['torch_fb'] / r['ours_fb']:.2f}x | {r['tflops_fwd']:.1f} | {r['tflops_fb']:.1f} |")
        lines.append(line)
        print(line, flush=True)
        if out_path:  # as it goes, so a run cut short still leaves its rows
            with open(out_path, 'w') as f:
                f.write('\n'.join(lines) + '\n')
        torch.cuda.empty_cache()
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
