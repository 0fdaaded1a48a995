"""Which CUDA kernels PyTorch's SDPA float32 anchor runs, and on which pipes.

benchmarks/torch_sdpa.py times the memory-efficient backend in float32;
this script runs the same calls once each (forward, forward+backward;
D = 64 and 128; causal) so that a profiler can attribute them:

    python3 torch_sdpa_kernels.py                # kernel names and times (torch.profiler)
    ncu --kernel-name regex:fmha --launch-count 4 \
        --metrics sm__inst_executed_pipe_tensor_op_hmma.sum,smsp__sass_thread_inst_executed_op_ffma_pred_on.sum \
        python3 torch_sdpa_kernels.py --plain     # tensor-core (HMMA) and FFMA instruction counts

A kernel that issues HMMA instructions multiplies on the tensor cores.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def calls(seq):
    for d in (64, 128):
        q, k, v = (torch.randn(1, 16, seq, d, device='cuda', requires_grad=True) for _ in range(3))
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(torch.randn_like(out))
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--seq', type=int, default=4096)
    p.add_argument('--plain', action='store_true', help='no torch.profiler (for ncu)')
    a = p.parse_args()
    calls(a.seq)  # warm-up
    if a.plain:
        calls(a.seq)
        return
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        calls(a.seq)
    print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=12))


if __name__ == '__main__':
    main()
