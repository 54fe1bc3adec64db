"""The library's calls routed through the Hopper kernels, on CPU: `hopper.available` forced open
and the three kernel entry points replaced by float64 emulations of their contracts, so that the
routing around them (planning's `Plan.hopper`, the "glse" statistic and its merge across ranks,
the fast paths pairing the stored bf16 logits with glse, the memory-first backward's chunks, the
fall-backs) runs in the interpreter against float64 and against the portable kernels."""

from __future__ import annotations

import pytest
import torch

from support import interpreter
from support.process_groups import run_group
from support.reference import rel_err
from vocab_parallel_cce import Tuning, linear_cross_entropy
from vocab_parallel_cce.backends import triton as triton_backend
from vocab_parallel_cce.backends.triton import hopper
from vocab_parallel_cce.plan import Plan

interpreter.on_cpu_only()

GLUON, PORTABLE = Tuning(use_gluon=True), Tuning(use_gluon=False)


def _logits(e, c, n_cols):
    return e.double() @ c[:n_cols].double().T


def _stats(z64, z_stored, t_local, n_cols, need_sum):
    """float32 [4, N]: lse, x of the float64 logits, Σz, and glse of the stored ones."""
    has_t = (t_local >= 0) & (t_local < n_cols)
    x = torch.where(has_t, z64.gather(1, t_local.clamp(0, max(n_cols - 1, 0))[:, None])[:, 0], 0.0)
    total = z64.sum(1) if need_sum else torch.zeros_like(x)
    return torch.stack([torch.logsumexp(z64, 1), x, total, torch.logsumexp(z_stored.double(), 1)]).float()


K_SLICES = []  # the k_slice each emulated statistics call received


def fake_stored_logits_and_stats(e, c, z, t_local, n_valid, need_sum, k_slice=None):
    K_SLICES.append(k_slice)
    z64 = _logits(e, c, n_valid)
    z[:, :n_valid] = z64.to(z.dtype)
    return _stats(z64, z[:, :n_valid], t_local, n_valid, need_sum)


def fake_shard_stats(e, c, t_local, n_valid, need_sum, need_pz=False, inv_temp=1.0, k_slice=None):
    K_SLICES.append(k_slice)
    z64 = _logits(e, c, n_valid) * inv_temp
    pz = (torch.softmax(z64, 1) * z64).sum(1) if need_pz else torch.zeros(e.shape[0], dtype=torch.float64)
    return torch.cat([_stats(z64, z64, t_local, n_valid, need_sum), pz.float()[None]])


def fake_logit_grad_chunk(e, c_chunk, width, g, lse, coef, t_local, col_base, inv_temp=1.0):
    z = _logits(e, c_chunk, width) * inv_temp
    hit = (torch.arange(width)[None, :] + col_base) == t_local[:, None]
    a, b, u = (q.double()[:, None] for q in coef[:3])
    p = torch.exp(z - lse.double()[:, None])
    grad = a * p + torch.where(hit, b, 0.0) + u
    if coef.shape[0] == 5:
        grad = grad + coef[3].double()[:, None] * p * (z - coef[4].double()[:, None])
    g[:, :width] = (grad * inv_temp).to(g.dtype)
    return True


def open_hopper(monkeypatch):
    """Route through the emulated kernels (also used by the ranks of the gloo test)."""
    monkeypatch.setattr(hopper, "available", lambda device, use_gluon: use_gluon is not False)
    monkeypatch.setattr(hopper, "stored_logits_and_stats", fake_stored_logits_and_stats)
    monkeypatch.setattr(hopper, "shard_stats", fake_shard_stats)
    monkeypatch.setattr(hopper, "logit_grad_chunk", fake_logit_grad_chunk)


def _inputs(n, d, v, seed, confident=False):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g)
    c = torch.randn(v, d, generator=g) * 2.0 / d**0.5
    t = torch.randint(0, v, (n,), generator=g)
    if confident:  # targets' logits raised by ~8: p_t near 1, where the gradient needs glse
        ct = c[t]
        e = e + 8.0 * ct / (ct * ct).sum(1, keepdim=True)
    t[::5] = -100
    return e.bfloat16(), c.bfloat16(), t


def _run(e, c, t, tuning, **kw):
    leaves = [x.clone().requires_grad_() for x in (e, c)]
    loss = linear_cross_entropy(leaves[0], leaves[1], t, impl="triton", tuning=tuning, **kw)
    up = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    return (loss.detach(), *torch.autograd.grad(loss, leaves, up))


def _reference(e, c, t, ls=0.0, reduction="mean", vocab_size=None):
    v = c.shape[0] if vocab_size is None else vocab_size
    e64, c64 = (x.double().requires_grad_() for x in (e, c))
    loss = torch.nn.functional.cross_entropy(e64 @ c64[:v].T, t, label_smoothing=ls, reduction=reduction)
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    return (loss.detach(), *torch.autograd.grad(loss, (e64, c64), up))


CASES = [  # grad_in_forward, reduction, label_smoothing, fast_chunk_tokens
    ("auto", "mean", 0.0, None),  # the held path, plain route
    (True, "none", 0.1, None),  # the held path, general route
    (True, "sum", 0.0, 16),  # token chunks
    (False, "mean", 0.1, None),  # memory-first
    (False, "none", 0.0, None),
]


@pytest.mark.parametrize("gif,reduction,ls,chunk", CASES)
def test_routed_calls_match_float64_and_the_portable_kernels(gif, reduction, ls, chunk, monkeypatch):
    open_hopper(monkeypatch)
    e, c, t = _inputs(48, 32, 300, seed=3, confident=True)
    kw = dict(grad_in_forward=gif, reduction=reduction, label_smoothing=ls)
    triton_backend.counters.clear()
    routed = _run(e, c, t, Tuning(use_gluon=True, fast_chunk_tokens=chunk), **kw)
    assert triton_backend.counters["hopper_forward"] >= 1
    if gif is False:
        assert triton_backend.counters["hopper_grad"] >= 1
    portable = _run(e, c, t, Tuning(use_gluon=False, fast_chunk_tokens=chunk), **kw)
    ref = _reference(e, c, t, ls, reduction)
    # the loss from float64-exact statistics; the portable fast mode's from the rounded logits
    assert rel_err(routed[0].double(), ref[0]) < 1e-6
    for g, p, r in zip(routed[1:], portable[1:], ref[1:]):
        assert rel_err(g.double(), r) <= 1.1 * rel_err(p.double(), r) + 1e-3


def test_fast_gradient_pairs_the_stored_logits_with_their_own_lse(monkeypatch):
    """With glse replaced by the float32 lse, a confident token's p_t − 1 carries ~2^-9·|z_t|:
    the routed gradient must stay as close to float64 as the portable one."""
    open_hopper(monkeypatch)
    e, c, t = _inputs(64, 32, 257, seed=5, confident=True)
    routed = _run(e, c, t, GLUON)
    ref = _reference(e, c, t)
    assert rel_err(routed[1].double(), ref[1]) < 1.5e-2
    monkeypatch.setattr(Plan, "stored_lse", lambda plan, st: st[0])
    broken = _run(e, c, t, GLUON)
    assert rel_err(broken[1].double(), ref[1]) > 2 * rel_err(routed[1].double(), ref[1])


def test_options_the_kernels_leave_to_the_portable_path(monkeypatch):
    open_hopper(monkeypatch)
    e, c, t = _inputs(32, 16, 100, seed=7)
    bias = torch.randn(100).bfloat16()
    triton_backend.counters.clear()
    linear_cross_entropy(e, c, t, bias, impl="triton", tuning=GLUON)
    linear_cross_entropy(e, c, t, impl="triton", softcap=20.0, tuning=GLUON)
    linear_cross_entropy(e, c, t, impl="triton", tuning=GLUON, return_predicted_tokens=True)
    linear_cross_entropy(e.float(), c.float(), t, impl="triton", tuning=GLUON)
    linear_cross_entropy(e, c, t, impl="triton", tuning=PORTABLE)
    assert triton_backend.counters["hopper_forward"] == 0


def test_kernel_that_cannot_run_falls_back(monkeypatch):
    """An entry point that declines (unaligned rows, a failed build) leaves the call to the
    portable kernels, with the same statistics names (glse = lse)."""
    open_hopper(monkeypatch)
    monkeypatch.setattr(hopper, "stored_logits_and_stats", lambda *a: None)
    monkeypatch.setattr(hopper, "shard_stats", lambda *a: None)
    monkeypatch.setattr(hopper, "logit_grad_chunk", lambda *a: False)
    e, c, t = _inputs(40, 24, 130, seed=9)
    for gif in (True, False):
        routed = _run(e, c, t, GLUON, grad_in_forward=gif)
        portable = _run(e, c, t, PORTABLE, grad_in_forward=gif)
        for q, p in zip(routed, portable):
            assert torch.equal(q, p)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_routed_match_float64_and_the_portable_kernels(temperature, monkeypatch):
    """linear_log_probs (log-probs and entropy, an upstream gradient on each) through the kernels'
    entropy statistic and gradient term."""
    from vocab_parallel_cce import linear_log_probs

    open_hopper(monkeypatch)
    e, c, t = _inputs(40, 24, 300, seed=13)

    def run(tuning):
        leaves = [x.clone().requires_grad_() for x in (e, c)]
        lp, ent = linear_log_probs(leaves[0], leaves[1], t, temperature=temperature, impl="triton", tuning=tuning)
        up = torch.linspace(-1.0, 1.0, lp.numel()), torch.linspace(0.3, 0.9, lp.numel())
        return (lp.detach(), ent.detach(), *torch.autograd.grad((lp * up[0] + ent * up[1]).sum(), leaves))

    triton_backend.counters.clear()
    routed = run(GLUON)
    assert triton_backend.counters["hopper_forward"] >= 1 and triton_backend.counters["hopper_grad"] >= 1
    portable = run(PORTABLE)
    e64, c64 = (x.double().requires_grad_() for x in (e, c))
    z = (e64 @ c64.T) / temperature
    logp = torch.log_softmax(z, 1)
    valid = t != -100
    lp = torch.where(valid, logp.gather(1, t.clamp(0)[:, None])[:, 0], 0.0)
    ent = torch.where(valid, -(logp.exp() * logp).sum(1), 0.0)
    up = torch.linspace(-1.0, 1.0, lp.numel(), dtype=torch.float64), torch.linspace(0.3, 0.9, lp.numel(),
                                                                                     dtype=torch.float64)
    ref = (lp.detach(), ent.detach(), *torch.autograd.grad((lp * up[0] + ent * up[1]).sum(), (e64, c64)))
    assert rel_err(routed[0].double(), ref[0]) < 1e-6 and rel_err(routed[1].double(), ref[1]) < 1e-6
    for g, p, r in zip(routed[2:], portable[2:], ref[2:]):
        assert rel_err(g.double(), r) <= 1.1 * rel_err(p.double(), r) + 1e-3


def _ranks_routed(rank, world, e, c, t, size):
    import torch.distributed as dist

    mp = pytest.MonkeyPatch()
    open_hopper(mp)
    try:
        shard = -(-size // world)
        start = rank * shard
        c_local = c[start:start + shard]
        out = []
        for gif in ("auto", False):
            leaves = [e.clone().requires_grad_(), c_local.clone().requires_grad_()]
            loss = linear_cross_entropy(leaves[0], leaves[1], t, impl="triton", tuning=GLUON, grad_in_forward=gif,
                                        group=dist.group.WORLD, vocab_start=start, vocab_size=size)
            de, dc = torch.autograd.grad(loss, leaves, torch.tensor(0.5))  # _reference's upstream
            ref = _reference(e, c, t, vocab_size=size)
            ok = (rel_err(loss.double(), ref[0]) < 1e-6 and rel_err(de.double(), ref[1]) < 1.5e-2
                  and rel_err(dc.double(), ref[2][start:start + shard]) < 1.5e-2)
            out.append((f"gif={gif}", ok, f"loss {loss.item()} vs {ref[0].item()}"))
        return out
    finally:
        mp.undo()


@pytest.mark.parametrize("world", [2, 3])
def test_routed_calls_under_vocabulary_parallelism(world):
    """glse is combined across ranks with the other statistics (one all-gather)."""
    e, c, t = _inputs(24, 16, 96, seed=11, confident=True)
    t = torch.where(t >= 0, t % 90, t)  # rows 90-95 of c are padding
    results = run_group(_ranks_routed, world, e, c, t, 90)
    for rank, rows in results.items():
        for name, ok, msg in rows:
            assert ok, f"rank {rank} {name}: {msg}"


@pytest.mark.parametrize("use_gluon,gif,routed", [
    (None, False, True),  # the default: the memory-first mode's products
    (None, True, False),  # ... not the fast mode's (cuBLAS + the statistics pass)
    (True, True, True),  # use_gluon=True: the fast mode's too
    (False, False, False),
])
def test_default_routes_only_the_memory_first_mode(use_gluon, gif, routed, monkeypatch):
    open_hopper(monkeypatch)
    e, c, t = _inputs(24, 16, 100, seed=5)
    triton_backend.counters.clear()
    _run(e, c, t, Tuning(use_gluon=use_gluon), grad_in_forward=gif)
    assert (triton_backend.counters["hopper_forward"] >= 1) is routed


@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["fast", "memory-first"])
def test_stats_k_slice_reaches_the_statistics_kernels(monkeypatch, grad_in_forward):
    """Tuning(stats_k_slice=...) is what the Gluon statistics entry points receive (None: the
    kernels' own default), in both modes."""
    open_hopper(monkeypatch)
    e, c, t = _inputs(33, 64, 50, seed=3)
    for k_slice in (None, 0, 1024):
        K_SLICES.clear()
        linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=grad_in_forward,
                             tuning=Tuning(use_gluon=True, stats_k_slice=k_slice))
        assert K_SLICES == [k_slice]
