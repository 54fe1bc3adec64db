"""Launch count (CPU; tests/paths/test_held_plain_route.py bounds it): how many small aten ops the default
call launches, forward + backward.

On a GPU every aten op that computes something is one kernel launch; on [N]-sized vectors those
launches cost more than their arithmetic. This counts them on CPU with torch.profiler (CPU
activity), running the Triton kernels in the interpreter (TRITON_INTERPRET=1, set here):

- an aten op counts when it computes (not a view, an allocation or a dispatch-only wrapper such
  as aten::to / aten::contiguous, whose inner copy_ counts) and no aten op above it counts
  (aten::where → aten::where.self is one launch);
- ops inside a Triton launch (the interpreter's own host copies) are left out, and so is the
  launch itself: `triton` lists the kernels;
- matrix products (mm, addmm, ...) are listed apart (`gemm`): the big products;
- ops on empty tensors (no kernel on a GPU) are left out;
- `cpu_only`: copies that run only on CPU (the bf16-GEMM workaround in backends/triton/logits_bf16.py), left
  out of `small`.

Measured at N=64, D=32, V=200 bf16 (small launches, fwd + bwd; gemm 3, triton 2, syncs 0 in all):
              mean  sum  none+sum  mean+ignored
    before     46    31     29         46        (autograd coefficients, commit e949928)
    --general  41    29     27         41        (the general route today: fuses_plain off)
    now         8     2      2          8        (the fused plain route)

Run:  TRITON_INTERPRET=1 python benchmarks/experiments/count_launches.py [--detail] [--general]
(--general: with triton_backend.fuses_plain patched off, the route every rarer option takes)
"""

from __future__ import annotations

import os
import sys
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

# aten ops that launch nothing: views, allocations, and wrappers whose inner ops are counted
NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "expand", "expand_as", "as_strided", "t", "transpose", "permute",
    "detach", "detach_", "alias", "slice", "select", "unbind", "squeeze", "unsqueeze", "view_as", "flatten",
    "unflatten", "narrow", "split", "chunk", "numpy_T", "lift_fresh", "resolve_conj", "resolve_neg",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "to", "_to_copy", "contiguous",
    "clone", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "new_zeros", "new_ones",
    "new_full", "requires_grad_", "set_", "_reshape_alias", "is_nonzero", "result_type", "type_as",
    "_has_compatible_shallow_copy_type", "_local_scalar_dense", "scalar_tensor", "_unsafe_index",
}
GEMM = {"mm", "addmm", "matmul", "bmm", "baddbmm", "linear", "_addmm_activation"}
TRITON_TAG = "triton_kernel::"
# copies made only on CPU: triton_backend.grad_from_logits hands the CPU bf16 GEMM a contiguous
# G (a torch 2.13 CPU workaround; on CUDA it is a view): a 2-D aten::contiguous inside it
GRAD_TAG = "vpcce::grad_from_logits"


def _instrument() -> None:
    """Tag every Triton interpreter launch with a record_function, so that the ops inside are
    left out, and triton_backend.grad_from_logits, to find its CPU-only copy."""
    from triton.runtime import interpreter

    cls = interpreter.InterpretedFunction
    if getattr(cls, "_counted", False):
        return
    run = cls.run

    def tagged(self, *args, **kwargs):
        with record_function(TRITON_TAG + self.fn.__name__):
            return run(self, *args, **kwargs)

    cls.run, cls._counted = tagged, True
    import vocab_parallel_cce.triton_backend as tb

    grad = tb.grad_from_logits

    def grad_from_logits(*args, **kwargs):
        with record_function(GRAD_TAG):
            return grad(*args, **kwargs)

    tb.grad_from_logits = grad_from_logits


def _aten(name: str) -> str | None:
    if not name.startswith("aten::"):
        return None
    return name[len("aten::"):].split(".")[0]


def count(fn) -> dict:
    """{"small": Counter of launching aten ops, "gemm", "triton", "cpu_only": Counters, "syncs": n}."""
    _instrument()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    small, gemm, triton, cpu_only, syncs = Counter(), Counter(), Counter(), Counter(), 0
    events = prof.events()

    def skipped(ev) -> bool:
        p = ev.cpu_parent
        while p is not None:
            if p.name.startswith(TRITON_TAG):
                return True
            op = _aten(p.name)
            if op is not None and (op not in NO_LAUNCH):
                return True  # counted at its launching ancestor
            p = p.cpu_parent
        return False

    for ev in events:
        if ev.name.startswith(TRITON_TAG):
            triton[ev.name[len(TRITON_TAG):]] += 1
            continue
        op = _aten(ev.name)
        if op is None or skipped(ev):
            continue
        if op in ("item", "_local_scalar_dense") or op == "is_nonzero":
            syncs += 1
        if op in NO_LAUNCH or op == "item" or _empty(ev):
            continue
        if _cpu_only(ev):
            cpu_only[op] += 1
            continue
        (gemm if op in GEMM else small)[op] += 1
    return {"small": small, "gemm": gemm, "triton": triton, "cpu_only": cpu_only, "syncs": syncs}


def _empty(ev) -> bool:
    """An op on an empty tensor (e.g. zero_ of no padding rows): no kernel runs on a GPU."""
    shapes = [s for s in ev.input_shapes or () if s]
    return bool(shapes) and 0 in shapes[0]


def _cpu_only(ev) -> bool:
    """Whether ev is the copy of a 2-D aten::contiguous inside grad_from_logits."""
    p, contiguous_2d = ev.cpu_parent, False
    while p is not None:
        if p.name == "aten::contiguous" and p.input_shapes and len(p.input_shapes[0]) == 2:
            contiguous_2d = True
        if p.name == GRAD_TAG:
            return contiguous_2d
        p = p.cpu_parent
    return False


def _inputs(n=64, d=32, v=200, ignore_every=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g).bfloat16().requires_grad_()
    c = (torch.randn(v, d, generator=g) / d**0.5).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return e, c, t


CASES = {
    "mean": dict(reduction="mean"),
    "sum": dict(reduction="sum"),
    "none+sum": dict(reduction="none"),
    "mean+ignored": dict(reduction="mean", ignore_every=4),
}


def run_case(name: str, impl: str = "triton", **extra) -> dict:
    from vocab_parallel_cce import linear_cross_entropy

    kw = dict(CASES[name], **extra)
    e, c, t = _inputs(ignore_every=kw.pop("ignore_every", 0))
    linear_cross_entropy(e, c, t, impl=impl, **kw)  # warm-up (kernel rewriting, caches)

    def fn():
        e.grad = c.grad = None
        loss = linear_cross_entropy(e, c, t, impl=impl, **kw)
        (loss.sum() if kw.get("reduction") == "none" else loss).backward()

    return count(fn)


def main(detail: bool, general: bool) -> None:
    from support import interpreter

    interpreter.patch_bf16_dot()
    if general:
        import vocab_parallel_cce.triton_backend as tb

        tb.fuses_plain = lambda e, plan: False
    for name in CASES:
        r = run_case(name)
        small = sum(r["small"].values())
        print(f"{name:14s} small={small:3d}  gemm={sum(r['gemm'].values())}  "
              f"triton={sum(r['triton'].values())}  cpu_only={sum(r['cpu_only'].values())}  syncs={r['syncs']}")
        if detail:
            print("   ", dict(r["small"].most_common()))
            print("   ", dict(r["triton"]))


if __name__ == "__main__":
    main("--detail" in sys.argv, "--general" in sys.argv)
