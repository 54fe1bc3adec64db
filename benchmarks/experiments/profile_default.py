"""Experiment (GPU): the kernels of one default call (forward + backward), from torch.profiler.

For each shape: every CUDA kernel of `linear_cross_entropy(e, c, t).backward()` (the default, the fast
mode) and of `grad_in_forward=False`, with its count and GPU time, and the time outside the products
(kernels whose names are not cuBLAS / nvjet GEMMs): where the small per-token ops' cost shows.

Run:  python3 benchmarks/experiments/profile_default.py [NxDxV ...]   (writes $OUT/profile_default.json)
"""
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from vocab_parallel_cce import linear_cross_entropy  # noqa: E402

GEMM_MARKERS = ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")


def kernels_of(fn, steps=3):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        total_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        rows.append({"name": ev.key[:140], "count": ev.count // steps, "ms": total_us / 1e3 / steps})
    rows.sort(key=lambda r: -r["ms"])
    gemm = sum(r["ms"] for r in rows if any(m in r["name"].lower() for m in GEMM_MARKERS))
    total = sum(r["ms"] for r in rows)
    return {"kernels": rows, "total_ms": total, "gemm_ms": gemm, "other_ms": total - gemm,
            "launches": sum(r["count"] for r in rows)}


def main(shapes):
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for n, d, v in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        e = torch.randn(n, d, device="cuda", generator=g).bfloat16().requires_grad_()
        c = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).bfloat16().requires_grad_()
        t = torch.randint(0, v, (n,), device="cuda", generator=g)
        res = {}
        for mode, kw in (("default", {}), ("memory-first", {"grad_in_forward": False})):
            def fn():
                e.grad = c.grad = None
                linear_cross_entropy(e, c, t, **kw).backward()
            res[mode] = kernels_of(fn)
        out["shapes"][f"{n}x{d}x{v}"] = res
        del e, c, t
        torch.cuda.empty_cache()
    path = os.path.join(os.environ.get("OUT", "/tmp/out"), "profile_default.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    for key, res in out["shapes"].items():
        for mode, r in res.items():
            print(f"{key} {mode}: {r['total_ms']:.2f} ms GPU, GEMMs {r['gemm_ms']:.2f}, other {r['other_ms']:.2f} "
                  f"in {r['launches']} launches")
            for k in r["kernels"][:12]:
                print(f"   {k['ms']:7.3f} ms  x{k['count']:<3} {k['name'][:100]}")


if __name__ == "__main__":
    args = sys.argv[1:] or ["16384x4096x16032", "8192x4096x128256"]
    main([tuple(int(x) for x in a.split("x")) for a in args])
