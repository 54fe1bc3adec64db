"""Where the backward's GPU time goes: torch.profiler over the backward op, dense and filtered.

    PYTHONPATH=. python3 benchmarks/profile_backward.py [--shape 8192x2304x256000] [--kind random1]
Prints, per variant, the CUDA kernels sorted by total time, and the wall time of the op.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from common import make_inputs, parse_shape  # noqa: E402
from vocab_parallel_cce import triton_backend as TB  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192x2304x256000")
    ap.add_argument("--kind", default="random1")
    args = ap.parse_args()
    n, d, v = parse_shape(args.shape)
    e, c, t = make_inputs(n, d, v, torch.bfloat16, args.kind)
    with torch.no_grad():
        lse, _, _ = TB._forward_stats_op(e, c, None, t, v, 0.0, False, False)
    coef = torch.stack([torch.full_like(lse, 1.0 / n), torch.full_like(lse, -1.0 / n), torch.zeros_like(lse)])
    for name, fe, env in (("dense", 0.0, {}), ("filtered sorted", 2.0**-12, {}),
                          ("filtered unsorted", 2.0**-12, {"VPCCE_SORT": "0"})):
        os.environ.update(env)

        def run():
            return TB._backward_op(e, c, None, t, lse, coef, v, 0.0, fe, False, False, True, True, False)

        run()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        print(f"\n=== {args.shape} {args.kind} {name}: wall {wall:.1f} ms", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        for k in env:
            del os.environ[k]


if __name__ == "__main__":
    main()
