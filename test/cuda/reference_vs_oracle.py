"""Checks the numpy float64 reference (fa_ctypes.reference) against the
TypeScript oracle (test/oracle.ts) on random problems with every option.
Runs without a GPU (numpy + node); run it after changing either:

  node_modules/.bin/esbuild test/cuda/oracle_cli.ts --bundle --platform=node \
      --outfile=/tmp/oracle_cli.js && python3 test/cuda/reference_vs_oracle.py /tmp/oracle_cli.js
"""
import importlib.util
import json
import math
import subprocess
import sys
import types

import numpy as np

sys.modules.setdefault('torch', types.ModuleType('torch'))  # the reference needs no torch
spec = importlib.util.spec_from_file_location('fa_ctypes', __file__.replace(
    'reference_vs_oracle.py', 'fa_ctypes.py'))
fa = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fa)

CASES = [
    ((2, 9, 13, 4, 2, 5, 3), {'causal': True}),
    ((1, 13, 6, 2, 2, 4, 4), {'causal': True, 'dropout': 0.3, 'seed': 2**40 + 12345}),
    ((2, 11, 11, 2, 1, 6, 7), {'window': (3, 2), 'softcap': 1.5, 'alibi': 'BH', 'scale': 0.7}),
    ((1, 10, 17, 3, 3, 8, 8), {'window': (-1, 4), 'alibi': 'H', 'dropout': 0.5, 'seed': 99}),
    ((1, 12, 12, 2, 2, 4, 4), {'window': (2, -1), 'softcap': 3.0, 'dropout': 0.2, 'seed': 5}),
]


def main():
    cli = sys.argv[1]
    rng = np.random.default_rng(7)
    worst = 0.0
    for (B, Sq, Sk, H, Hk, D, Dv), opts in CASES:
        q, k, v = (rng.standard_normal(s) for s in ((B, Sq, H, D), (B, Sk, Hk, D), (B, Sk, Hk, Dv)))
        dout, dlse = rng.standard_normal((B, Sq, H, Dv)), rng.standard_normal((B, H, Sq))
        o = dict(opts)
        alibi = None
        if o.get('alibi'):
            alibi = rng.random(H if o['alibi'] == 'H' else (B, H))
            o['alibi'] = alibi
        out, lse, (dq, dk, dv) = fa.reference(q, k, v, o, dout, dlse)
        ts_opts = {key: val for key, val in (
            ('causal', opts.get('causal', False)), ('windowSize', list(opts.get('window', (-1, -1)))),
            ('softcap', opts.get('softcap', 0.0)), ('dropoutRate', opts.get('dropout', 0.0)),
            ('seed', opts.get('seed', 0)))}
        if 'scale' in opts:
            ts_opts['softmaxScale'] = opts['scale']
        payload = {'shape': dict(batch=B, seqQ=Sq, seqK=Sk, heads=H, headsKV=Hk, headDim=D,
                                 headDimV=Dv),
                   'q': q.ravel().tolist(), 'k': k.ravel().tolist(), 'v': v.ravel().tolist(),
                   'alibi': None if alibi is None else alibi.ravel().tolist(),
                   'dOut': dout.ravel().tolist(), 'dLse': dlse.ravel().tolist(), 'options': ts_opts}
        res = json.loads(subprocess.run(['node', cli], input=json.dumps(payload), text=True,
                                        capture_output=True, check=True).stdout)
        for name, ours in (('out', out), ('lse', lse), ('dq', dq), ('dk', dk), ('dv', dv)):
            theirs = np.array([float(x) for x in res[name]])
            ours = ours.ravel()
            same_inf = np.array_equal(np.isfinite(theirs), np.isfinite(ours)) and \
                np.array_equal(theirs[~np.isfinite(theirs)], ours[~np.isfinite(ours)])
            err = np.abs(theirs[np.isfinite(theirs)] - ours[np.isfinite(ours)]).max(initial=0.0)
            worst = max(worst, err if same_inf else math.inf)
            print(f'{str(opts):80s} {name}: max abs diff {err:.2e} {"" if same_inf else "INF MISMATCH"}')
    print(f'worst {worst:.2e}')
    sys.exit(0 if worst < 1e-10 else 1)


if __name__ == '__main__':
    main()
