"""ctypes binding of kernels/cuda's C ABI (libflash_attention_cuda.so) for
PyTorch tensors, and the float64 reference of DESIGN.md section 2.

Used by test/cuda/check_kernels.py (correctness) and
benchmarks/cuda_bench.py (timing) on the GPU machine.
"""
import ctypes
import math
import os

import numpy as np
import torch


class FaParams(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in (
        'batch', 'seq_q', 'seq_k', 'heads', 'heads_kv', 'head_dim', 'head_dim_v')] + [
        ('softmax_scale', ctypes.c_float),
        ('window_left', ctypes.c_int), ('window_right', ctypes.c_int),
        ('softcap', ctypes.c_float), ('dropout_rate', ctypes.c_float),
        ('seed_lo', ctypes.c_uint32), ('seed_hi', ctypes.c_uint32),
        ('alibi_kind', ctypes.c_int)]


def load(path=None):
    path = path or os.environ.get('FA_LIB', 'build/cuda/libflash_attention_cuda.so')
    lib = ctypes.CDLL(os.path.abspath(path))
    vp = ctypes.c_void_p
    lib.fa_error_string.restype = ctypes.c_char_p
    lib.fa_forward_workspace_size.restype = ctypes.c_size_t
    lib.fa_forward_workspace_size.argtypes = [ctypes.POINTER(FaParams)]
    lib.fa_backward_workspace_size.restype = ctypes.c_size_t
    lib.fa_backward_workspace_size.argtypes = [ctypes.POINTER(FaParams)]
    lib.fa_forward.argtypes = [ctypes.POINTER(FaParams)] + [vp] * 8
    lib.fa_backward.argtypes = [ctypes.POINTER(FaParams)] + [vp] * 13
    return lib


def ptr(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


class FlashAttention:
    """Calls the C ABI on the current PyTorch stream."""

    def __init__(self, lib):
        self.lib = lib
        self._ws = {}

    def params(self, q, k, v, opts):
        B, Sq, H, D = q.shape
        _, Sk, Hk, Dv = v.shape
        slopes = opts.get('alibi')
        kind = 0 if slopes is None else (1 if slopes.dim() == 1 else 2)
        left, right = opts.get('window', (-1, -1))
        if opts.get('causal'):
            right = 0
        seed = opts.get('seed', 0)
        return FaParams(B, Sq, Sk, H, Hk, D, Dv,
                        opts.get('scale', 1 / math.sqrt(D)), left, right,
                        opts.get('softcap', 0.0), opts.get('dropout', 0.0),
                        seed % 2**32, seed // 2**32, kind)

    def workspace(self, nbytes, key):
        buf = self._ws.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device='cuda')
            self._ws[key] = buf
        return buf

    def check(self, status):
        if status != 0:
            raise RuntimeError(self.lib.fa_error_string(status).decode())

    def forward(self, q, k, v, opts, out=None, lse=None):
        p = self.params(q, k, v, opts)
        B, Sq, H, _ = q.shape
        if out is None:
            out = torch.empty(B, Sq, H, v.shape[3], device='cuda')
        if lse is None:
            lse = torch.empty(B, H, Sq, device='cuda')
        ws = self.workspace(self.lib.fa_forward_workspace_size(ctypes.byref(p)), 'f')
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self.check(self.lib.fa_forward(ctypes.byref(p), ptr(q), ptr(k), ptr(v),
                                       ptr(opts.get('alibi')), ptr(out), ptr(lse),
                                       ptr(ws), stream))
        return out, lse

    def backward(self, dout, dlse, q, k, v, out, lse, opts, grads=None):
        p = self.params(q, k, v, opts)
        if grads is None:
            grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
        dq, dk, dv = grads
        ws = self.workspace(self.lib.fa_backward_workspace_size(ctypes.byref(p)), 'b')
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self.check(self.lib.fa_backward(
            ctypes.byref(p), ptr(dout), ptr(dlse), ptr(q), ptr(k), ptr(v), ptr(out),
            ptr(lse), ptr(opts.get('alibi')), ptr(dq), ptr(dk), ptr(dv), ptr(ws), stream))
        return dq, dk, dv


# ------------------------------------------------------------ reference

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = np.uint64(0xFFFFFFFF)


def philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint64 arrays holding uint32 values (src/dropout.ts)."""
    c = [np.asarray(x, dtype=np.uint64) for x in (c0, c1, c2, c3)]
    k0 = np.uint64(k0)
    k1 = np.uint64(k1)
    for _ in range(10):
        p0 = np.uint64(M0) * c[0]
        p1 = np.uint64(M1) * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0 = (k0 + np.uint64(W0)) & MASK
        k1 = (k1 + np.uint64(W1)) & MASK
    return c


def keep_mask(B, H, Sq, Sk, rate, seed):
    """[B, H, Sq, Sk] float64 multipliers: 0 or 1 / (1 - rate)."""
    b, h, i, j = np.meshgrid(np.arange(B), np.arange(H), np.arange(Sq), np.arange(Sk),
                             indexing='ij')
    words = philox(j >> 2, i, h, b, seed % 2**32, seed // 2**32)
    word = np.choose(j & 3, words)
    threshold = min(math.floor(rate * 2**32), 2**32 - 1)
    keep = np.where(word >= threshold, 1 / (1 - rate), 0.0)
    return torch.from_numpy(keep)


def reference(q, k, v, opts, dout=None, dlse=None):
    """float64 forward (out, lse) and, given dout/dlse, gradients (dq, dk, dv).

    Written from DESIGN.md section 2: scale, softcap, ALiBi, mask, softmax,
    dropout after the LSE; rows that see no key give 0 and lse -inf.
    """
    dev = q.device
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    B, Sq, H, D = q.shape
    _, Sk, Hk, Dv = v.shape
    rep = H // Hk
    qh = q64.permute(0, 2, 1, 3)
    kh = k64.permute(0, 2, 1, 3).repeat_interleave(rep, dim=1)
    vh = v64.permute(0, 2, 1, 3).repeat_interleave(rep, dim=1)
    scale = opts.get('scale', 1 / math.sqrt(D))
    s = scale * (qh @ kh.transpose(-1, -2))
    cap = opts.get('softcap', 0.0)
    if cap > 0:
        s = cap * torch.tanh(s / cap)
    i = torch.arange(Sq, device=dev).view(Sq, 1)
    j = torch.arange(Sk, device=dev).view(1, Sk)
    diag = i + Sk - Sq
    slopes = opts.get('alibi')
    if slopes is not None:
        sl = slopes.double().view(1, H, 1, 1) if slopes.dim() == 1 else slopes.double().view(B, H, 1, 1)
        s = s - sl * (diag - j).abs().double()
    left, right = opts.get('window', (-1, -1))
    if opts.get('causal'):
        right = 0
    vis = torch.ones(Sq, Sk, dtype=torch.bool, device=dev)
    if left >= 0:
        vis &= j >= diag - left
    if right >= 0:
        vis &= j <= diag + right
    empty = ~vis.any(dim=1)  # [Sq]
    # Rows that see nothing: finite placeholder scores so autograd stays finite.
    s_masked = torch.where(vis, s, torch.full_like(s, -math.inf))
    s_masked = torch.where(empty.view(Sq, 1), torch.zeros_like(s), s_masked)
    lse_all = torch.logsumexp(s_masked, dim=-1)
    p = torch.exp(s_masked - lse_all.unsqueeze(-1)) * vis
    rate = opts.get('dropout', 0.0)
    if rate > 0:
        p = p * keep_mask(B, H, Sq, Sk, rate, opts.get('seed', 0)).to(dev)
    out = (p @ vh).permute(0, 2, 1, 3)
    lse = torch.where(empty.view(1, 1, Sq), torch.full_like(lse_all, -math.inf), lse_all)
    if dout is None:
        return out.detach(), lse.detach()
    dlse_masked = torch.where(empty.view(1, 1, Sq), torch.zeros_like(lse_all), dlse.double())
    loss = (out * dout.double()).sum() + (lse_all * dlse_masked).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q64, k64, v64))
    return out.detach(), lse.detach(), (dq, dk, dv)
