"""The held-logits fast mode's fused route for plain cross-entropy (`triton_backend.fuses_plain`:
bf16 stored logits, no label smoothing / z-loss / class weights / loss_mask): its loss and
gradients bit for bit those of the general route (coefficients by autograd on [N] vectors, forced
here by patching `fuses_plain` to False), over every reduction and upstream gradient, ignored and
out-of-range targets, all ignored, N = 1, odd sizes, softcap + bias, padded vocabulary, shift,
the argmax outputs, dc_accumulate_into, and two ranks (vocabulary and sequence parallel); the rare
options take the general route; and the call launches few small ops (the profiler counter of
benchmarks/experiments/count_launches.py), no host sync.

impl="triton" under TRITON_INTERPRET=1 on CPU (the interpreter computes in IEEE float32 without
fused multiply-adds: see the module docstring of backends/triton/logits_bf16.py for why the GPU gives the same).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import vocab_parallel_cce.triton_backend as tb
from support import interpreter
from support.process_groups import failures, run_group
from support.reference import rel_err
from vocab_parallel_cce import linear_cross_entropy, torch_backend

interpreter.on_cpu_only()

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "experiments")


def _bits(x: torch.Tensor) -> torch.Tensor:
    """x's bits as integers; every NaN as one pattern (a NaN's sign and payload are no result)."""
    x = x.detach().contiguous()
    ints = x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
    return torch.where(torch.isnan(x), torch.zeros_like(ints), ints)


def assert_same_bits(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
            continue
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        same_nan = torch.equal(torch.isnan(got[name]), torch.isnan(want[name]))
        assert same_nan and torch.equal(_bits(got[name]), _bits(want[name])), f"{name} differs"


class Spy:
    """Counts the fused route's backward calls (triton_backend.grad_from_logits_plain)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = tb.grad_from_logits_plain

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(tb, "grad_from_logits_plain", counted)


def _inputs(n, d, v, dtype=torch.bfloat16, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    c = (torch.randn(v, d, generator=g) * 2 / d**0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    return e, c, b, t


MASK = torch.arange(24) % 3 != 0  # a loss_mask of 24 tokens


def _upstream(loss, reduction, how):
    """The objective to differentiate: loss · s for "mean"/"sum"; for "none" Σ loss_i · w_i with
    w random ("vector"), one value through loss.sum() (an expanded, stride-0 gradient), a
    non-contiguous slice of a longer vector ("strided"), or MASK ("masked")."""
    if reduction != "none":
        return loss * {"one": 1.0, "scalar": 3.7, "negative": -0.3, "inf": float("inf"), "zero": 0.0}[how]
    g = torch.Generator().manual_seed(1)
    if how == "sum":
        return loss.sum()
    if how == "masked":
        return (loss * MASK).sum()
    if how == "strided":
        w = torch.rand(2 * loss.numel(), generator=g)[::2].view(loss.shape)
        return (loss * w).sum()
    return (loss * torch.randn(loss.shape, generator=g)).sum()


def _call(monkeypatch, general: bool, n=24, d=16, v=40, reduction="mean", how="scalar", bias=False,
          targets=None, dtype=torch.bfloat16, seed=0, dc_into=False, **kw):
    """loss, dE, dC, db (and the dc_accumulate_into target) of one default-mode call; `general`:
    the general route (fuses_plain patched off)."""
    with monkeypatch.context() as m:
        if general:
            m.setattr(tb, "fuses_plain", lambda e, plan: False)
        e, c, b, t = _inputs(n, d, v, dtype, bias, seed)
        if targets is not None:
            t = targets(t)
        into = torch.randn(v, d, generator=torch.Generator().manual_seed(2)) if dc_into else None
        out = linear_cross_entropy(e, c, t, b, reduction=reduction, impl="triton", dc_accumulate_into=into, **kw)
        loss = out.loss if hasattr(out, "loss") else out
        _upstream(loss, reduction, how).backward()
        res = {"loss": loss.detach(), "de": e.grad, "dc": c.grad, "db": None if b is None else b.grad,
               "into": into}
        if hasattr(out, "loss"):
            res.update(acc=out.token_accuracy, pred=None if out.predicted_tokens is None else out.predicted_tokens)
        return res


def _ignore_every(k, ii=-100):
    def f(t):
        t = t.clone()
        t[::k] = ii
        return t
    return f


def _bad_targets(t):
    t = t.clone()
    t[1], t[4] = 40 + 3, -5  # out of range: NaN loss for the token, no gradient
    t[::3] = -100
    return t


TARGETS = {
    "all-valid": None,
    "ignored": _ignore_every(3),
    "all-ignored": _ignore_every(1),
    "out-of-range": _bad_targets,
    "ignore_index=5": _ignore_every(2, 5),
}


@pytest.mark.exact
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("targets", list(TARGETS))
def test_fused_route_is_bit_identical(reduction, targets, monkeypatch):
    kw = dict(reduction=reduction, targets=TARGETS[targets], how="scalar" if reduction != "none" else "vector")
    if targets == "ignore_index=5":
        kw["ignore_index"] = 5
    spy = Spy(monkeypatch)
    fused = _call(monkeypatch, False, **kw)
    assert spy.calls == 1
    general = _call(monkeypatch, True, **kw)
    assert spy.calls == 1
    assert_same_bits(fused, general)


@pytest.mark.parametrize("reduction,how", [("mean", "one"), ("mean", "negative"), ("mean", "inf"), ("mean", "zero"),
                                           ("sum", "one"), ("sum", "inf"), ("none", "sum"), ("none", "strided")])
def test_fused_route_upstream_gradients(reduction, how, monkeypatch):
    kw = dict(reduction=reduction, how=how, targets=_ignore_every(4))
    assert_same_bits(_call(monkeypatch, False, **kw), _call(monkeypatch, True, **kw))


SHAPES_AND_OPTIONS = {
    "N=1": dict(n=1, d=8, v=19),
    "N=1-ignored": dict(n=1, d=8, v=19, targets=_ignore_every(1)),
    "odd": dict(n=37, d=24, v=101, targets=_ignore_every(5)),
    "softcap+bias": dict(softcap=4.0, bias=True, targets=_ignore_every(3)),
    "padded-vocab": dict(vocab_size=33, targets=lambda t: t % 35),  # ids 33, 34: out of range
    "shift+int32": dict(shift=1, targets=lambda t: t.int()),
    "argmax outputs": dict(return_token_accuracy=True, return_predicted_tokens=True, targets=_ignore_every(3)),
    "dc_accumulate_into": dict(dc_into=True),
    "filter_eps": dict(filter_eps=2.0**-12),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", list(SHAPES_AND_OPTIONS))
def test_fused_route_shapes_and_options(case, reduction, monkeypatch):
    kw = dict(SHAPES_AND_OPTIONS[case], reduction=reduction, how="scalar" if reduction != "none" else "vector")
    spy = Spy(monkeypatch)
    fused = _call(monkeypatch, False, **kw)
    assert spy.calls == 1
    assert_same_bits(fused, _call(monkeypatch, True, **kw))


def test_fused_route_agrees_with_memory_first(monkeypatch):
    kw = dict(n=37, d=24, v=101, targets=_ignore_every(5))
    fused = _call(monkeypatch, False, **kw)
    first = _call(monkeypatch, False, grad_in_forward=False, **kw)
    # bf16 stored logits (fast) against the recomputing float32 path; the interpreter truncates the
    # kernel's bf16 downcasts: tolerances as tests/paths/test_held.py's for bf16 on the triton
    # backend
    assert rel_err(fused["loss"], first["loss"]) < 3e-3
    for name in ("de", "dc"):
        assert rel_err(fused[name], first[name]) < 2e-2


RARE = {
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-2),
    "return_z_loss": dict(z_loss=1e-2, return_z_loss=True),
    "class_weights": dict(class_weights=torch.rand(40) + 0.5),
    "loss_mask": dict(reduction="none", loss_mask=MASK, how="masked"),
    "float16": dict(dtype=torch.float16),
    "float32": dict(dtype=torch.float32),
    "triton_exact": dict(impl_exact=True),
}


@pytest.mark.parametrize("case", list(RARE))
def test_rare_options_take_the_general_route(case, monkeypatch):
    kw = dict(RARE[case])
    if kw.pop("impl_exact", False):
        # exact mode keeps float32 logits: the general route (fuses_plain is False)
        e, c, _, t = _inputs(24, 16, 40)
        spy = Spy(monkeypatch)
        linear_cross_entropy(e, c, t, impl="triton_exact").backward()
        assert spy.calls == 0 and e.grad is not None
        return
    spy = Spy(monkeypatch)
    res = _call(monkeypatch, False, **kw)
    assert spy.calls == 0
    assert torch.isfinite(res["de"].float()).all() and torch.isfinite(res["dc"].float()).all()


def test_loss_mask_promise_still_checked(monkeypatch):
    """loss_mask takes the general route, whose promise check still gives NaN gradients."""
    e, c, _, t = _inputs(24, 16, 40)
    loss = linear_cross_entropy(e, c, t, reduction="none", impl="triton", loss_mask=MASK)
    loss.sum().backward()  # a gradient of 1 on masked tokens: the promise is broken
    assert torch.isnan(e.grad.float()).all()


@pytest.mark.exact
def test_torch_twin_matches_the_general_coefficients():
    """torch_backend.grad_from_logits_plain (the twin of the fused kernel) against grad_from_logits
    with the general route's coefficients k·(a, b, u) (a = 1, b = −1, u = 0 on scored tokens)."""
    from vocab_parallel_cce.plan import Plan
    from vocab_parallel_cce.tuning import Tuning

    n, d, v = 12, 8, 20
    plan = Plan(reduction="mean", ignore_index=-100, vocab_size=v, label_smoothing=0.0, z_loss=0.0, softcap=None,
                vocab_start=0, n_valid=v, group=None, world=1, reduce_grad_e=True, sequence_parallel=False,
                backend=torch_backend, exact=False, filter_eps=None, adaptive_filter=False, path="held",
                tuning=Tuning())
    e, c, _, t = _inputs(n, d, v, torch.float32)
    t[::3], t[1] = -100, v + 2
    z, lse, x, s = torch_backend.logits_and_stats(e.detach(), c.detach(), None, t, plan)
    with torch.enable_grad():
        leaves = [q.detach().requires_grad_() for q in (lse, x, s)]
        ce, _ = plan.token_loss_parts(*leaves, t)
        a, b, u = torch.autograd.grad(ce.sum(), leaves, allow_unused=True, materialize_grads=True)
    assert torch.equal(_bits(torch_backend.plain_ce(lse, x, t, plan)), _bits(ce.detach()))
    up, k = torch.tensor(2.5), torch.tensor(1 / 7)
    scored = (a != 0) | (b != 0) | (u != 0)
    kc = torch.where(scored, up * k, 0.0)
    want = torch_backend.grad_from_logits(z, None, t, lse, kc * a, kc * b, kc * u, plan, torch.float32)
    got = torch_backend.grad_from_logits_plain(z, None, t, lse, up, k, plan, torch.float32)
    assert torch.equal(_bits(got), _bits(want))


@pytest.mark.exact
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_plain_kernel_mode_float32_bits(reduction, softcap):
    """grad_from_stored_kernel's PLAIN mode against its COEF mode fed the general route's torch
    coefficients, on float32 "stored" logits: G is then stored unrounded, so every float32 bit of
    k·(a, b, u) shows (bf16 G can hide a last-bit difference). Upstream gradients include 0, a
    negative value, inf and NaN for "none" (per row, strided)."""
    import triton

    import vocab_parallel_cce.backends.triton.logits_bf16 as G

    n, v, vocab_start, vocab_size, ii = 29, 37, 5, 40, 7
    gen = torch.Generator().manual_seed(4)
    z0 = torch.randn(n, v, generator=gen) * 3
    if softcap:
        z0 = softcap * torch.tanh(z0 / softcap)
    lse = torch.logsumexp(z0, dim=1)
    t = torch.randint(-2, vocab_size + 3, (n,), generator=gen)  # some out of range, some ignored
    t[::4] = ii
    t_local = t - vocab_start
    if reduction == "none":
        up = torch.randn(2 * n, generator=gen)[::2]
        up[3], up[5], up[8], up[9] = 0.0, float("inf"), float("nan"), -0.0
        scale = None
    else:
        up, scale = torch.tensor(-2.5), (torch.tensor(1.0) / torch.tensor(7.0) if reduction == "mean" else None)
    # the general route: autograd's coefficients of the plain ce, then where(scored, g·k, 0)·(a, b, u)
    lse_l, x_l = lse.clone().requires_grad_(), torch.zeros(n).requires_grad_()
    valid = t != ii
    in_range = (t >= 0) & (t < vocab_size)
    ce = torch.where(valid, torch.where(valid & ~in_range, float("nan"), lse_l - x_l), 0.0)
    a, b = torch.autograd.grad(ce.sum(), (lse_l, x_l))
    u = torch.zeros(n)
    scored = (a != 0) | (b != 0) | (u != 0)
    kc = torch.where(scored, up if scale is None else up * scale, 0.0)
    coef = torch.stack([kc * a, kc * b, kc * u]).contiguous()
    inv_cap = 1.0 / (softcap or 1.0)
    rows, cols = 4, 16
    grid = (triton.cdiv(n, rows), triton.cdiv(v, cols))
    want, got = z0.clone(), z0.clone()
    G.grad_from_stored_kernel[grid](want, t_local, lse, coef, want, n, v, v, 0, inv_cap, 0.0, lse,
                                    HAS_SOFTCAP=softcap is not None, FILTER=False, BLOCK_R=rows, BLOCK_C=cols)
    G.grad_from_stored_kernel[grid](got, t_local, lse, lse, got, n, v, v, 0, inv_cap, 0.0, lse,
                                    HAS_SOFTCAP=softcap is not None, FILTER=False, BLOCK_R=rows, BLOCK_C=cols,
                                    UP=up, stride_up=up.stride(0) if up.dim() else 0, SCALE=scale,
                                    ignore_t=ii - vocab_start, lo_t=-vocab_start, hi_t=vocab_size - vocab_start,
                                    PLAIN=True, HAS_SCALE=scale is not None)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(_bits(got), _bits(want))


@pytest.mark.exact
def test_plain_ce_kernel_bits():
    """plain_ce_kernel (several ranks) and the statistics pass's NEED_CE against
    Plan.token_loss_parts, bit for bit."""
    n, v = 41, 23
    gen = torch.Generator().manual_seed(6)
    e, c, _, t = _inputs(n, 8, v)
    t[::5], t[2], t[3] = -100, v, -1
    from vocab_parallel_cce.plan import Plan
    from vocab_parallel_cce.tuning import Tuning

    plan = Plan(reduction="mean", ignore_index=-100, vocab_size=v, label_smoothing=0.0, z_loss=0.0, softcap=None,
                vocab_start=0, n_valid=v, group=None, world=1, reduce_grad_e=True, sequence_parallel=False,
                backend=tb, exact=False, filter_eps=None, adaptive_filter=False, path="held",
                tuning=Tuning())
    z, lse, x, s, ce = tb.logits_and_stats(e.detach(), c.detach(), None, t, plan, with_ce=True)
    want = plan.token_loss_parts(lse, x, s, t)[0]
    assert torch.equal(_bits(ce), _bits(want))
    lse2, x2 = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    assert torch.equal(_bits(tb.plain_ce(lse2, x2, t, plan)), _bits(plan.token_loss_parts(lse2, x2, s, t)[0]))


# ---- launches: the profiler counter of benchmarks/experiments/count_launches.py ----

# small aten launches of fwd + bwd at most (measured: mean 8, sum 2, "none" + .sum() 2; before the
# fused route 46, 31, 29): a regression to per-token torch ops fails here
MAX_SMALL = {"mean": 10, "sum": 4, "none+sum": 4, "mean+ignored": 10}


@pytest.fixture(scope="module")
def count_launches():
    sys.path.insert(0, EXPERIMENTS)
    try:
        import count_launches as module
    finally:
        sys.path.remove(EXPERIMENTS)
    return module


@pytest.mark.parametrize("case", list(MAX_SMALL))
def test_few_small_launches(case, count_launches):
    r = count_launches.run_case(case)
    small = sum(r["small"].values())
    assert small <= MAX_SMALL[case], dict(r["small"])
    assert r["syncs"] == 0
    assert dict(r["triton"]) == {"stored_logits_stats_kernel": 1, "grad_from_stored_kernel": 1}
    assert sum(r["gemm"].values()) == 3  # Z = E·Cᵀ, dE = G·C, dC = Gᵀ·E


# ---- two ranks: vocabulary parallel (ce from plain_ce_kernel after the combine) and sequence parallel


def _two_rank_worker(rank: int, world: int, seed: int):
    """Each case twice, fused and general (fuses_plain patched off in this process)."""
    import torch.distributed as dist

    interpreter.patch_bf16_dot()
    results = []
    n, d, v_total = 10, 16, 30
    rows = v_total // world
    real_fuses, real_plain = tb.fuses_plain, tb.grad_from_logits_plain
    for name, sp, reduction in (("vp/mean", False, "mean"), ("vp/none", False, "none"), ("sp/sum", True, "sum")):
        outs = []
        for general in (False, True):
            calls = []
            tb.grad_from_logits_plain = lambda *a, **k: calls.append(1) or real_plain(*a, **k)
            if general:
                tb.fuses_plain = lambda e, plan: False
            try:
                g = torch.Generator().manual_seed(seed)
                e = torch.randn(world * n, d, generator=g)
                c = torch.randn(v_total, d, generator=g) * 0.5
                t = torch.randint(0, v_total, (world * n,), generator=g)
                t[::4], t[1] = -100, v_total + 1
                if sp:  # this rank's tokens; every rank's loss covers all of them
                    e, t = e[rank * n:(rank + 1) * n], t[rank * n:(rank + 1) * n]
                e = e.bfloat16().requires_grad_()
                c = c[rank * rows:(rank + 1) * rows].bfloat16().requires_grad_()
                loss = linear_cross_entropy(e, c, t, reduction=reduction, impl="triton", group=dist.group.WORLD,
                                            sequence_parallel=sp)
                w = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3)) if reduction == "none" else 2.5
                (loss * w).sum().backward()
                outs.append({"loss": loss.detach(), "de": e.grad, "dc": c.grad})
                route = "general" if general else "fused"
                results.append((f"{name}/{route}", len(calls) == (0 if general else 1), f"fused calls: {len(calls)}"))
            finally:
                tb.fuses_plain, tb.grad_from_logits_plain = real_fuses, real_plain
        try:
            assert_same_bits(*outs)
            results.append((name, True, ""))
        except AssertionError as err:
            results.append((name, False, str(err)))
    return results


@pytest.mark.slow
def test_fused_route_two_ranks_bit_identical():
    results = run_group(_two_rank_worker, 2, 5, env={"TRITON_INTERPRET": "1"}, timeout_s=300)
    bad = failures(results)
    assert not bad, "\n".join(bad)
