"""Correctness of kernels/cuda against the float64 reference, every option,
forward and backward, on fresh random inputs (GPU machine; needs PyTorch).

  python3 test/cuda/check_kernels.py [--quick]

Bounds (docs/design.md, "Accuracy bounds"): max |err| / max |ref| <= 1e-4 forward,
<= 5e-4 gradients. Outputs are NaN-poisoned before each call, so an element
the kernels never write fails. Exit status 1 on any failure.
"""
import math
import sys
import time

import numpy as np
import torch

from fa_ctypes import FlashAttention, load, reference

FWD_BOUND, BWD_BOUND = 1e-4, 5e-4


def rel_err(got, ref):
    """max |got - ref| / max |ref| over every element (inf on NaN or on a
    mismatch of the -inf lse of rows that see no key)."""
    got = got.detach().double().cpu().numpy()
    if np.isnan(got).any():
        return math.inf
    finite = np.isfinite(ref)
    if not np.array_equal(np.isfinite(got), finite) or not np.array_equal(got[~finite], ref[~finite]):
        return math.inf
    denom = np.abs(ref[finite]).max() if finite.any() else 1.0
    return float(np.abs(got[finite] - ref[finite]).max() / max(denom, 1e-30))


def cuda(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).cuda()


def make_case(B, Sq, Sk, H, Hk, D, Dv, opts, gen):
    q = cuda(gen.standard_normal((B, Sq, H, D)))
    k = cuda(gen.standard_normal((B, Sk, Hk, D)))
    v = cuda(gen.standard_normal((B, Sk, Hk, Dv)))
    o = dict(opts)
    if o.get('alibi') == 'H':
        o['alibi'] = cuda(gen.random(H) * 0.5)
    elif o.get('alibi') == 'BH':
        o['alibi'] = cuda(gen.random((B, H)) * 0.5)
    if 'seed' in o:
        o['seed'] = int(gen.integers(0, 2**53 - 1))
    return q, k, v, o


def run_case(fa, name, shape, opts, gen, backward=True, logit_scale=1.0):
    B, Sq, Sk, H, Hk, D, Dv = shape
    q, k, v, o = make_case(B, Sq, Sk, H, Hk, D, Dv, opts, gen)
    q = q * logit_scale
    out = torch.full((B, Sq, H, Dv), math.nan, device='cuda')
    lse = torch.full((B, H, Sq), math.nan, device='cuda')
    fa.forward(q, k, v, o, out, lse)
    dout = cuda(gen.standard_normal((B, Sq, H, Dv)))
    dlse = cuda(gen.standard_normal((B, H, Sq)))
    grads = tuple(torch.full_like(t, math.nan) for t in (q, k, v))
    if backward:
        fa.backward(dout, dlse, q, k, v, out, lse, o, grads)
    torch.cuda.synchronize()
    if logit_scale != 1.0:
        ok = bool(torch.isfinite(out).all() and torch.isfinite(grads[0]).all() if backward
                  else torch.isfinite(out).all())
        return [name, 'finite' if ok else 'NOT FINITE', '', '', '', '', ok]
    if backward:
        ref_out, ref_lse, (rdq, rdk, rdv) = reference(q, k, v, o, dout, dlse)
    else:
        ref_out, ref_lse = reference(q, k, v, o)
    e_out, e_lse = rel_err(out, ref_out), rel_err(lse, ref_lse)
    errs = [e_out, e_lse]
    ok = e_out <= FWD_BOUND and e_lse <= FWD_BOUND
    if backward:
        e_g = [rel_err(g, r) for g, r in zip(grads, (rdq, rdk, rdv))]
        errs += e_g
        ok = ok and all(e <= BWD_BOUND for e in e_g)
    else:
        errs += [math.nan] * 3
    return [name] + [f'{e:.2e}' for e in errs] + [ok]


CASES = [
    # name, (B, Sq, Sk, H, Hk, D, Dv), opts
    ('plain d64', (2, 128, 128, 4, 4, 64, 64), {}),
    ('causal d64', (2, 130, 130, 4, 4, 64, 64), {'causal': True}),
    ('causal Sq<Sk', (1, 70, 200, 4, 2, 64, 64), {'causal': True}),
    ('causal Sq>Sk (empty rows)', (1, 200, 70, 4, 4, 64, 64), {'causal': True}),
    ('window (32,8)', (2, 190, 190, 2, 1, 64, 64), {'window': (32, 8)}),
    ('window (-1,5) Sq!=Sk', (1, 100, 150, 2, 2, 64, 64), {'window': (-1, 5)}),
    ('window (3,-1)', (1, 100, 90, 2, 2, 64, 64), {'window': (3, -1)}),
    ('softcap 5', (2, 96, 140, 4, 4, 64, 64), {'softcap': 5.0, 'scale': 0.3}),
    ('alibi [H] causal', (2, 128, 160, 4, 2, 64, 64), {'alibi': 'H', 'causal': True}),
    ('alibi [B,H]', (2, 77, 77, 4, 4, 64, 64), {'alibi': 'BH'}),
    ('dropout 0.17', (2, 100, 120, 4, 2, 64, 64), {'dropout': 0.17, 'seed': 1}),
    ('dropout causal softcap', (1, 64, 64, 2, 1, 32, 32),
     {'dropout': 0.5, 'seed': 1, 'causal': True, 'softcap': 2.0}),
    ('MQA d128', (1, 150, 150, 8, 1, 128, 128), {'causal': True}),
    ('D=96 Dv=80', (1, 100, 130, 4, 2, 96, 80), {}),
    ('D=40 Dv=24 odd S', (2, 33, 45, 3, 1, 40, 24), {'window': (10, 10)}),
    ('D=7 Dv=5', (1, 19, 23, 2, 2, 7, 5), {'causal': True}),
    ('d256', (1, 130, 130, 2, 1, 256, 256), {'causal': True}),
    ('D=200 Dv=130 all', (1, 90, 100, 4, 2, 200, 130),
     {'alibi': 'H', 'softcap': 8.0, 'dropout': 0.1, 'seed': 1, 'window': (40, 20)}),
    ('everything d64', (2, 150, 170, 4, 2, 64, 64),
     {'alibi': 'BH', 'softcap': 4.0, 'dropout': 0.25, 'seed': 1, 'window': (60, 0),
      'scale': 0.2}),
    ('long S=1024 causal', (1, 1024, 1024, 2, 2, 64, 64), {'causal': True}),
]


def main():
    quick = '--quick' in sys.argv
    fa = FlashAttention(load())
    seed = int(time.time())
    gen = np.random.default_rng(seed)
    print(f'random seed {seed}')
    rows = []
    cases = CASES[:6] if quick else CASES
    for name, shape, opts in cases:
        rows.append(run_case(fa, name, shape, opts, gen))
    rows.append(run_case(fa, 'large logits |s|~1e4', (1, 64, 64, 2, 2, 64, 64), {}, gen,
                         logit_scale=1e4 / 8))
    # Accuracy at the benchmark shape (forward only, and both).
    if not quick:
        rows.append(run_case(fa, 'bench S=4096 d64 causal', (1, 4096, 4096, 16, 16, 64, 64),
                             {'causal': True}, gen))
        rows.append(run_case(fa, 'bench S=2048 d128', (1, 2048, 2048, 16, 16, 128, 128),
                             {}, gen))
    head = ['case', 'out', 'lse', 'dq', 'dk', 'dv', 'ok']
    widths = [max(len(str(r[c])) for r in rows + [head]) for c in range(len(head))]
    fmt = ' | '.join('{:<%d}' % w for w in widths)
    print(fmt.format(*head))
    for r in rows:
        print(fmt.format(*[str(x) for x in r]))
    failed = [r[0] for r in rows if not r[-1]]
    print(f'{len(rows) - len(failed)}/{len(rows)} cases within bounds '
          f'(fwd {FWD_BOUND}, grads {BWD_BOUND})' + (f'; FAILED: {failed}' if failed else ''))
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
