"""Both backends implement backend.Backend, with the same meaning: each function against the
formulas of backend.py in float64 (the triton backend under TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import os

import triton_interpreter  # noqa: F401  (turns the interpreter on before triton is imported)

import pytest
import torch

from reference import rel_err
from vocab_parallel_cce import Tuning, torch_backend
from vocab_parallel_cce.backend import Backend
from vocab_parallel_cce.plan import Plan

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("on a GPU machine run these with TRITON_INTERPRET=1 in their own pytest process",
                allow_module_level=True)

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
                grad_in_forward=False, tuning=Tuning())


def _inputs():
    e = torch.randn(N, D)
    c = torch.randn(V_LOCAL, D) / D**0.5 * 3.0
    b = torch.randn(V_LOCAL) * 0.5
    t = torch.randint(0, N_VALID, (N,))
    t[2], t[5] = -7, N_VALID + 1  # no correct logit in this shard
    coef = [torch.randn(N) for _ in range(3)]
    return e, c, b, t, coef


def _expected(e, c, b, t, coef):
    """float64 (raw logits, lse, x, s, G) from backend.py's formulas."""
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

    out = torch.full((D, D), float("nan"))
    backend.product_fp32(out, e.T, e, plan, accumulate=False)  # overwrites, NaN and all
    backend.product_fp32(out, e.T, e, plan, accumulate=True)
    assert rel_err(out.double(), 2 * e64.T @ e64) < 1e-5
    h = torch.randn(5, 7).to(torch.bfloat16)
    k = torch.tensor(0.3)
    expect = h.double() * 0.3
    backend.scale_in_place(h, k)  # (its float32 arithmetic: test_triton_interpreter, test_grad_in_forward)
    assert rel_err(h.double(), expect) < 2**-8
