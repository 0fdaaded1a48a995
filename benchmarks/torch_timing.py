"""CUDA-event timing shared by the PyTorch anchors (torch_sdpa.py, torch_decode.py).

A sibling module: scripts/device-bundle.sh copies benchmarks/*.py together,
and Python finds it next to the script it runs.
"""
import torch


def median_ms(fn, budget_ms, warmup, min_reps, max_reps):
    """Median CUDA-event time of `fn` in ms, and the repetitions taken.

    After `warmup` calls, one timed call estimates the cost; then as many
    repetitions as fit `budget_ms`, clamped to [min_reps, max_reps].
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    reps = int(max(min_reps, min(max_reps, budget_ms / est)))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], reps
