"""Kept-tile fractions that filter_eps="auto" measures on the benchmark inputs (one GPU).

    PYTHONPATH=. python3 benchmarks/skip_fractions.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import make_inputs  # noqa: E402
from vocab_parallel_cce import linear_cross_entropy  # noqa: E402
from vocab_parallel_cce import triton_backend as TB  # noqa: E402

print("| shape | kind | kept fraction | auto skips |\n|---|---|---|---|")
for n, d, v in ((8192, 4096, 128256), (8192, 2304, 256000)):
    for kind in ("random", "random1", "zipf"):
        TB._SKIP_POLICY.state.clear()
        e, c, t = make_inputs(n, d, v, torch.bfloat16, kind)
        e, c = e.requires_grad_(), c.requires_grad_()
        torch.autograd.grad(linear_cross_entropy(e, c, t), (e, c))
        torch.cuda.synchronize()
        key = next(iter(TB._SKIP_POLICY.state))
        skips = TB._SKIP_POLICY.plan(key)[0]
        print(f"| {n}×{d}×{v} | {kind} | {TB._SKIP_POLICY.state[key]['fraction']:.3f} | {skips} |", flush=True)
        del e, c, t
