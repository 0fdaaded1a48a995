"""ctypes binding of kernels/cuda's C ABI (libflash_attention_cuda.so) for
PyTorch tensors, and the float64 reference of docs/design.md, "Semantics".

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


def keep_mask(b, h, Sq, Sk, rate, seed):
    """[Sq, Sk] float64 multipliers of (b, h): 0 or 1 / (1 - rate)."""
    i, j = np.meshgrid(np.arange(Sq, dtype=np.uint64), np.arange(Sk, dtype=np.uint64),
                       indexing='ij')
    words = philox(j >> np.uint64(2), i, np.full_like(i, h), np.full_like(i, b),
                   seed % 2**32, seed // 2**32)
    word = np.choose((j & np.uint64(3)).astype(np.int64), words)
    threshold = min(math.floor(rate * 2**32), 2**32 - 1)
    return np.where(word >= np.uint64(threshold), 1 / (1 - rate), 0.0)


def reference(q, k, v, opts, dout=None, dlse=None):
    """float64 forward (out, lse) and, given dout/dlse, gradients (dq, dk, dv),
    as numpy arrays. Written from docs/design.md, "Semantics" (the formulas of
    test/oracle.ts, vectorised per (batch, head)): scale, softcap, ALiBi,
    mask, softmax, dropout after the LSE; rows that see no key give 0 and
    lse -inf, and take no gradient through dlse.
    """
    as_np = lambda t: None if t is None else (
        t.detach().double().cpu().numpy() if hasattr(t, 'detach') else np.asarray(t, np.float64))
    q, k, v, dout, dlse = (as_np(t) for t in (q, k, v, dout, dlse))
    slopes = as_np(opts.get('alibi'))
    B, Sq, H, D = q.shape
    _, Sk, Hk, Dv = v.shape
    rep = H // Hk
    scale = opts.get('scale', 1 / math.sqrt(D))
    cap = opts.get('softcap', 0.0)
    rate = opts.get('dropout', 0.0)
    left, right = opts.get('window', (-1, -1))
    if opts.get('causal'):
        right = 0
    i = np.arange(Sq).reshape(Sq, 1)
    j = np.arange(Sk).reshape(1, Sk)
    diag = i + Sk - Sq
    vis = np.ones((Sq, Sk), dtype=bool)
    if left >= 0:
        vis &= j >= diag - left
    if right >= 0:
        vis &= j <= diag + right
    empty = ~vis.any(axis=1)
    out = np.zeros((B, Sq, H, Dv))
    lse = np.zeros((B, H, Sq))
    grads = (np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)) if dout is not None else None
    for b in range(B):
        for h in range(H):
            hk = h // rep
            qb, kb, vb = q[b, :, h], k[b, :, hk], v[b, :, hk]
            s = scale * (qb @ kb.T)
            th = None
            if cap > 0:
                th = np.tanh(s / cap)
                s = cap * th
            if slopes is not None:
                slope = slopes[h] if slopes.ndim == 1 else slopes[b, h]
                s = s - slope * np.abs(diag - j)
            t = np.where(vis, s, -np.inf)
            m = np.where(empty, 0.0, t.max(axis=1))
            l = np.exp(t - m[:, None]).sum(axis=1)
            with np.errstate(divide='ignore'):
                row_lse = np.where(empty, -np.inf, m + np.log(np.where(empty, 1.0, l)))
            lse[b, h] = row_lse
            p = np.where(vis, np.exp(t - np.where(empty, 0.0, row_lse)[:, None]), 0.0)
            keep = keep_mask(b, h, Sq, Sk, rate, opts.get('seed', 0)) if rate > 0 else 1.0
            out[b, :, h] = (p * keep) @ vb
            if grads is None:
                continue
            do = dout[b, :, h]
            dp = (do @ vb.T) * keep
            weighted = (p * dp).sum(axis=1, keepdims=True)
            dl = np.where(empty, 0.0, dlse[b, h])[:, None]
            dt = p * (dp - weighted + dl)
            if th is not None:
                dt = dt * (1 - th * th)
            draw = dt * scale
            grads[0][b, :, h] += draw @ kb
            grads[1][b, :, hk] += draw.T @ qb
            grads[2][b, :, hk] += (p * keep).T @ do
    if grads is None:
        return out, lse
    return out, lse, grads
