"""Both backends implement backends.protocol.Backend, with the same meaning: each function against
the formulas of backends/protocol.py in float64, and the storage rule `logits_dtype` (the triton
backend under TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import pytest
import torch

from support import interpreter
from support.reference import rel_err
from vocab_parallel_cce import Tuning, torch_backend
from vocab_parallel_cce.backends.protocol import Backend
from vocab_parallel_cce.plan import Plan
from vocab_parallel_cce.planning import plan_cross_entropy

interpreter.on_cpu_only(patch_dot=False)

N, D, V_LOCAL, N_VALID, CAP = 13, 20, 37, 33, 4.0  # rows [33, 37) of the shard are padding


def _backend(name: str):
    if name == "torch":
        return torch_backend
    from vocab_parallel_cce import triton_backend

    return triton_backend


def _plan(backend) -> Plan:
    return Plan(reduction="sum", ignore_index=-100, vocab_size=N_VALID, label_smoothing=0.1, z_loss=0.0,
                softcap=CAP, vocab_start=0, n_valid=N_VALID, group=None, world=1, reduce_grad_e=True,
                sequence_parallel=False, backend=backend, exact=True, filter_eps=None, adaptive_filter=False,
                path="recompute", tuning=Tuning())


def _inputs():
    e = torch.randn(N, D)
    c = torch.randn(V_LOCAL, D) / D**0.5 * 3.0
    b = torch.randn(V_LOCAL) * 0.5
    t = torch.randint(0, N_VALID, (N,))
    t[2], t[5] = -7, N_VALID + 1  # no correct logit in this shard
    coef = [torch.randn(N) for _ in range(3)]
    return e, c, b, t, coef


def _expected(e, c, b, t, coef):
    """float64 (raw logits, lse, x, s, G) from protocol.py's formulas."""
    e, c, b = e.double(), c[:N_VALID].double(), b[:N_VALID].double()
    raw = e @ c.T
    th = torch.tanh((raw + b) / CAP)
    z = CAP * th
    lse = torch.logsumexp(z, dim=1)
    in_shard = (t >= 0) & (t < N_VALID)
    x = torch.where(in_shard, z.gather(1, t.clamp(0, N_VALID - 1)[:, None])[:, 0], 0.0)
    a, bt, u = (q.double()[:, None] for q in coef)
    is_t = torch.arange(N_VALID)[None, :] == t[:, None]
    g = (a * torch.exp(z - lse[:, None]) + torch.where(is_t, bt, 0.0) + u) * (1 - th * th)
    return raw, lse, x, z.sum(dim=1), g


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_backend_follows_the_contract(name, seed):
    backend = _backend(name)
    assert isinstance(backend, Backend)  # every function of the Protocol is there
    plan = _plan(backend)
    e, c, b, t, coef = _inputs()
    raw, lse, x, s, g = _expected(e, c, b, t, coef)

    for got, want in zip(backend.forward_stats(e, c, b, t, plan), (lse, x, s)):
        assert got.dtype == torch.float32 and rel_err(got.double(), want) < 1e-5
    z, *stats = backend.logits_and_stats(e, c, b, t, plan)
    assert rel_err(z[:, :N_VALID].double(), raw) < 1e-5  # Z is the raw logits: no bias, no softcap
    for got, want in zip(stats, (lse, x, s)):
        assert rel_err(got.double(), want) < 1e-5
    g_got = backend.grad_from_logits(z, b, t, stats[0], *coef, plan, torch.float32)
    assert g_got.shape == (N, N_VALID) and rel_err(g_got.double(), g) < 1e-5

    de, dc, db = backend.backward(e, c, b, t, lse.float(), *coef, plan, True, True, True)
    e64, c64 = e.double(), c[:N_VALID].double()
    assert rel_err(de.double(), g @ c64) < 1e-5
    assert rel_err(dc[:N_VALID].double(), g.T @ e64) < 1e-5 and not dc[N_VALID:].any()
    assert rel_err(db[:N_VALID].double(), g.sum(0)) < 1e-5 and not db[N_VALID:].any()
    assert backend.backward(e, c, b, t, lse.float(), *coef, plan, False, True, False)[::2] == (None, None)
    # dc_into: dC added into it (rows ≥ n_valid untouched), none returned; dE and dbias as before
    into = torch.randn(V_LOCAL, D)
    before = into.clone()
    de2, dc2, db2 = backend.backward(e, c, b, t, lse.float(), *coef, plan, True, True, True, dc_into=into)
    assert dc2 is None and torch.equal(into[N_VALID:], before[N_VALID:])
    assert rel_err((into - before)[:N_VALID].double(), g.T @ e64) < 1e-5
    assert rel_err(de2.double(), g @ c64) < 1e-5 and rel_err(db2[:N_VALID].double(), g.sum(0)) < 1e-5

    out = torch.full((D, D), float("nan"))
    backend.product_fp32(out, e.T, e, plan, accumulate=False)  # overwrites, NaN and all
    backend.product_fp32(out, e.T, e, plan, accumulate=True)
    assert rel_err(out.double(), 2 * e64.T @ e64) < 1e-5
    h = torch.randn(5, 7).to(torch.bfloat16)
    k = torch.tensor(0.3)
    expect = h.double() * 0.3
    backend.scale_in_place(h, k)  # (its float32 arithmetic: tests/backends/test_triton_kernels.py)
    assert rel_err(h.double(), expect) < 2**-8


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("dtype,exact", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False),
                                         (torch.float32, False)])
def test_logits_dtype_is_what_logits_and_stats_stores(name, dtype, exact, monkeypatch):
    """Each backend's storage rule (`logits_dtype`, the contract's) is the dtype of the Z its
    logits_and_stats returns."""
    backend = _backend(name)
    g = torch.Generator().manual_seed(5016)
    e, c = torch.randn(5, 16, generator=g).to(dtype), torch.randn(16, 16, generator=g).to(dtype)
    t = torch.randint(0, 16, (5,), generator=g)
    plan, _ = plan_cross_entropy(e, c, t, impl=name, grad_in_forward=True)
    plan = Plan(**{**plan.__dict__, "exact": exact, "backend": backend, "path": "held"})
    z = backend.logits_and_stats(e, c, None, t, plan)[0]
    assert z.dtype == backend.logits_dtype(dtype, exact)


def _fast_plan(backend, weights, exact) -> Plan:
    """The fast mode's plan with the optional statistics: class-weighted s, max / argmax."""
    plan = _plan(backend)
    return Plan(**{**plan.__dict__, "path": "held", "class_weights": weights, "need_argmax": True,
                   "exact": exact})


@pytest.mark.parametrize("name,dtype", [("torch", torch.float32), ("triton", torch.float32), ("triton", torch.bfloat16)],
                         ids=["torch", "triton-fp32", "triton-bf16"])
@pytest.mark.exact
def test_fast_mode_statistics_follow_the_contract(name, dtype, seed):
    """logits_and_stats with class weights and the argmax: s = Σ_j w_j z_j, max, argmax (smallest id
    on ties: rows 30 and 32 copy row 4, with its bias) over the valid rows only, of the values Z
    holds where it holds the final logits (bf16: the written-back, rounded ones); grad_from_logits
    gives u·w_j. The raw logits are exact in every dtype and summation order (e: integers, c and b:
    multiples of 1/8; CAP a power of two), so the copies' logits are bit-equal whatever BLAS forms
    the product."""
    interpreter.patch_bf16_dot()  # the interpreter's bf16 tl.dot (set-up, not a kernel change)
    backend = _backend(name)
    _, _, _, t, coef = _inputs()
    e = torch.randint(-4, 5, (N, D)).float()
    c = torch.randint(-1, 2, (V_LOCAL, D)).float() / 8
    b = torch.randint(-4, 4, (V_LOCAL,)).float() / 8
    w = torch.rand(V_LOCAL) * 2 + 0.1
    c[4], b[4] = (torch.randint(0, 2, (D,)) * 2 - 1).float() / 8, 0.5  # no zeros; the largest bias
    c[[30, 32]], b[[30, 32]] = c[4].clone(), b[4].clone()
    c[34:] = c[4] * 3  # padding rows that would win
    e[::2] = 4 * torch.sign(c[4])  # row 4 (and its copies): the maximum of every other token
    e, c, b = e.to(dtype), c.to(dtype), b.to(dtype)
    plan = _fast_plan(backend, w, exact=dtype != torch.bfloat16)  # bf16, not exact: the stored-logits kernel
    assert plan.stat_names == ("lse", "x", "s", "max", "argmax")
    z, *stats = backend.logits_and_stats(e, c, b, t, plan)
    assert len(stats) == 5 and (z.dtype == torch.bfloat16) == (dtype == torch.bfloat16)
    if z.dtype == torch.bfloat16:  # the final logits, rounded to bf16, as the statistics saw them
        final = z[:, :N_VALID].double()
    else:  # the raw logits; bias and softcap applied here in float64
        final = CAP * torch.tanh((z[:, :N_VALID].double() + b[:N_VALID].double()) / CAP)
        assert rel_err(z[:, :N_VALID].double(), e.double() @ c[:N_VALID].double().T) < 1e-5
    lse = torch.logsumexp(final, dim=1)
    in_shard = (t >= 0) & (t < N_VALID)
    x = torch.where(in_shard, final.gather(1, t.clamp(0, N_VALID - 1)[:, None])[:, 0], 0.0)
    s = final @ w[:N_VALID].double()
    top = final.amax(1)
    arg = torch.where(final == top[:, None], torch.arange(N_VALID).double(), float("inf")).amin(1)
    for k, got, want in zip(plan.stat_names, stats, (lse, x, s, top, arg)):
        assert rel_err(got.double(), want) < 1e-5, (k, rel_err(got.double(), want))
    assert torch.equal(stats[4].double(), arg) and (arg[::2] == 4).sum() >= 5  # the tie happened
    g_got = backend.grad_from_logits(z, b, t, stats[0], *coef, plan, dtype)
    a, bt, u = (q.double()[:, None] for q in coef)
    is_t = torch.arange(N_VALID)[None, :] == t[:, None]
    g = (a * torch.exp(final - lse[:, None]) + torch.where(is_t, bt, 0.0) + u * w[:N_VALID].double()) \
        * (1 - (final / CAP) ** 2)
    assert g_got.shape == (N, N_VALID)
    assert rel_err(g_got.double(), g) < (1e-5 if dtype == torch.float32 else 1e-2)
