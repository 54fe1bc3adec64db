"""Experiment (GPU): where a call's wall time exceeds its kernels' time (idle gaps between kernels).

For each shape and method (ours default, ours memory-first, torch.compile): the wall time per call of
back-to-back calls (CUDA events around 10 calls, as the loss suite times), and from a profiler trace
of 3 back-to-back calls: the kernels' summed time, the span from the first kernel's start to the last
one's end, the idle time inside the span, and the 8 largest gaps with the kernels on either side.

Run:  python3 benchmarks/experiments/gpu_gaps.py [NxDxV ...]   (writes $OUT/gpu_gaps.json)
"""
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from race import block_ms  # noqa: E402
from vocab_parallel_cce import linear_cross_entropy  # noqa: E402


def compiled_loss():
    @torch.compile(dynamic=False)
    def loss(e, c, t):
        return F.cross_entropy((e @ c.T).float(), t)
    return loss


def wall_ms(fn, reps=10):
    for _ in range(3):
        fn()
    return block_ms(fn, reps, cuda=True)


def trace(fn, calls=3):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.time_range.end > ev.time_range.start:
            kernels.append((ev.time_range.start, ev.time_range.end, ev.name[:80]))
    kernels.sort()
    busy = sum(e - s for s, e, _ in kernels)
    span = kernels[-1][1] - kernels[0][0]
    gaps = []
    for (s0, e0, n0), (s1, e1, n1) in zip(kernels, kernels[1:]):
        if s1 > e0:
            gaps.append((s1 - e0, n0, n1))
    gaps.sort(reverse=True)
    return {"kernels_per_call": len(kernels) / calls, "busy_ms": busy / 1e3 / calls,
            "span_ms": span / 1e3 / calls, "idle_ms": (span - busy) / 1e3 / calls,
            "gaps_over_5us": sum(1 for g in gaps if g[0] > 5) / calls,
            "top_gaps_us": [[round(g, 1), a, b] for g, a, b in gaps[:8]]}


def main(shapes):
    out = {"device": torch.cuda.get_device_name(), "shapes": {}}
    comp = compiled_loss()
    for n, d, v in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        e = torch.randn(n, d, device="cuda", generator=g).bfloat16().requires_grad_()
        c = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).bfloat16().requires_grad_()
        t = torch.randint(0, v, (n,), device="cuda", generator=g)
        methods = {
            "ours": lambda: torch.autograd.grad(linear_cross_entropy(e, c, t), (e, c)),
            "ours_memory_first": lambda: torch.autograd.grad(linear_cross_entropy(e, c, t, grad_in_forward=False),
                                                             (e, c)),
            "torch_compile": lambda: torch.autograd.grad(comp(e, c, t), (e, c)),
        }
        res = {}
        for name, fn in methods.items():
            res[name] = {"wall_ms": wall_ms(fn), **trace(fn)}
            torch.cuda.set_sync_debug_mode("warn")  # a host synchronisation inside the call warns
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
            torch.cuda.set_sync_debug_mode("default")
            res[name]["host_syncs"] = [str(w.message)[:120] for w in caught if "synchroniz" in str(w.message)]
        out["shapes"][f"{n}x{d}x{v}"] = res
        del e, c, t
        torch.cuda.empty_cache()
    path = os.path.join(os.environ.get("OUT", "/tmp/out"), "gpu_gaps.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    for key, res in out["shapes"].items():
        for name, r in res.items():
            print(f"{key} {name:18s} wall {r['wall_ms']:.3f}  busy {r['busy_ms']:.3f}  span {r['span_ms']:.3f}  "
                  f"idle {r['idle_ms']:.3f} ms  kernels {r['kernels_per_call']:.0f}  gaps>5us {r['gaps_over_5us']:.1f}  "
                  f"host syncs {len(r['host_syncs'])}")
            for msg in r["host_syncs"][:3]:
                print("      sync:", msg)
            for gap in r["top_gaps_us"][:5]:
                print(f"      {gap[0]:8.1f} us  {gap[1][:45]}  ->  {gap[2][:45]}")


if __name__ == "__main__":
    args = sys.argv[1:] or ["16384x4096x16032", "8192x4096x128256"]
    main([tuple(int(x) for x in a.split("x")) for a in args])
