"""PyTorch SDPA float32 forward+backward anchor (docs/design.md, "Performance method"), causal,
B=1, H=16, D=64: median of CUDA-event timings. Usage: python3 torch_sdpa_backward.py 4096 16384"""
import sys
import torch
import torch.nn.functional as F


def time_ms(f, reps=20):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        f()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


for s in [int(a) for a in sys.argv[1:]]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, s, 64, device='cuda', requires_grad=True) for _ in range(3))
    dy = torch.randn(1, 16, s, 64, device='cuda')
    flops = 4 * s * s * 16 * 64 / 2

    def fwd():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(dy)

    for name, f, n in [('PyTorch SDPA fp32 forward', fwd, flops),
                       ('PyTorch SDPA fp32 forward+backward', fwd_bwd, 3.5 * flops)]:
        with torch.no_grad() if f is fwd else torch.enable_grad():
            ms = time_ms(f)
        print(f'| {name} | {s} | {ms:.3f} | {n / ms / 1e9:.2f} |', flush=True)
