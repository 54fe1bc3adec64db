"""Experiment (GPU; CPU under TRITON_INTERPRET=1): the held-logits path's fused plain route against
the general route (triton_backend.fuses_plain patched off), bit for bit, and their cost.

For each shape and case (mean, mean with ignored tokens, sum ×3.7, none with a per-token upstream
gradient): loss, dE, dC of `linear_cross_entropy(e, c, t)` + backward on both routes, compared by
their bits (NaNs as NaNs); on CUDA also the median time of each route (CUDA events) and its
kernel count and non-GEMM kernel time (torch.profiler).

Run:  python3 benchmarks/experiments/fused_vs_general.py [NxDxV ...]   (writes $OUT/fused_vs_general.json)
Default shape: 16384x4096x16032 on CUDA (a tp=8 rank), 48x32x200 on CPU.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch

if not torch.cuda.is_available():  # the kernels in the interpreter; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
import vocab_parallel_cce.triton_backend as tb  # noqa: E402
from vocab_parallel_cce import linear_cross_entropy  # noqa: E402

GEMM_MARKERS = ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")
CASES = {"mean": dict(reduction="mean"), "mean+ignored": dict(reduction="mean", ignore_every=4),
         "sum": dict(reduction="sum", scale=3.7), "none": dict(reduction="none")}
REAL_FUSES = tb.fuses_plain


def _route(general: bool) -> None:
    tb.fuses_plain = (lambda e, plan: False) if general else REAL_FUSES


def _inputs(n, d, v, dev, ignore_every=0):
    g = torch.Generator(device=dev).manual_seed(0)
    e = torch.randn(n, d, device=dev, generator=g).bfloat16().requires_grad_()
    c = (torch.randn(v, d, device=dev, generator=g) / d**0.5).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device=dev, generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    w = torch.rand(n, device=dev, generator=g)
    return e, c, t, w


def _step(e, c, t, w, reduction, scale=1.0):
    e.grad = c.grad = None
    loss = linear_cross_entropy(e, c, t, reduction=reduction, impl="triton")
    (loss * w).sum().backward() if reduction == "none" else (loss * scale).backward()
    return loss.detach()


def _bits(x):
    x = x.detach().contiguous()
    ints = x.view({2: torch.int16, 4: torch.int32}[x.element_size()])
    return torch.where(torch.isnan(x), torch.zeros_like(ints), ints)


def _same(a, b) -> bool:
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(_bits(a), _bits(b))


def _time(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, f = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        f.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(f))
    return statistics.median(times)


def _kernels(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    count = other_ms = 0
    for ev in prof.key_averages():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        count += ev.count
        if not any(m in ev.key.lower() for m in GEMM_MARKERS):
            other_ms += (getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)) / 1e3
    return count, other_ms


def main(shapes):
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if not cuda:
        import triton_interpreter

        triton_interpreter.patch_bf16_dot()
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "shapes": {}}
    for n, d, v in shapes:
        res = {}
        for name, case in CASES.items():
            kw = dict(case)
            e, c, t, w = _inputs(n, d, v, dev, kw.pop("ignore_every", 0))
            runs = {}
            for general in (False, True):
                _route(general)
                loss = _step(e, c, t, w, **kw)
                runs[general] = (loss, e.grad.clone(), c.grad.clone())
                if cuda:
                    step = lambda: _step(e, c, t, w, **kw)  # noqa: E731
                    ms = _time(step)
                    count, other = _kernels(step)
                    runs[general] += (ms, count, other)
            _route(False)
            r = {"bit_identical": {k: _same(a, b) for k, a, b in zip(("loss", "de", "dc"), runs[False], runs[True])}}
            if cuda:
                for label, general in (("fused", False), ("general", True)):
                    r[label] = dict(zip(("ms", "kernels", "non_gemm_ms"), runs[general][3:]))
            res[name] = r
            print(f"{n}x{d}x{v} {name}: {r}", flush=True)
        out["shapes"][f"{n}x{d}x{v}"] = res
        torch.cuda.empty_cache() if cuda else None
    path = os.path.join(os.environ.get("OUT", "/tmp/out"), "fused_vs_general.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    args = [tuple(int(x) for x in a.split("x")) for a in sys.argv[1:]]
    main(args or ([(16384, 4096, 16032)] if torch.cuda.is_available() else [(48, 32, 200)]))
