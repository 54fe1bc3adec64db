"""class_weights= as torch.nn.functional.cross_entropy(weight=...) defines them.

The oracle is F.cross_entropy itself on float64 materialised logits (and tests/support/reference.py, which
adds the z-loss, checked against F.cross_entropy here). Torch path in float64, Triton kernels under
the interpreter in both modes (weighted smoothing and the weighted "mean" with a z-loss included),
padded vocabularies, bad arguments. Multi-rank: tests/distributed/test_vocab_parallel_options.py. The
fast mode's statistics in depth: tests/paths/test_fast_statistics.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from support import interpreter
from support.fast_mode import CountFast
from support.inputs import weighted_inputs
from support.reference import reference_loss, rel_err
from vocab_parallel_cce import linear_cross_entropy

interpreter.patch_bf16_dot()


def _torch_loss(leaves, t, w, reduction, label_smoothing=0.0, softcap=None, ignore_index=-100):
    e, c, b = (x.detach().double().requires_grad_() if x is not None else None for x in leaves)
    z = e @ c.T + (0 if b is None else b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, t, weight=w.double(), label_smoothing=label_smoothing, reduction=reduction,
                           ignore_index=ignore_index)
    return loss, [x for x in (e, c, b) if x is not None]


def _grads(loss, leaves, upstream):
    out = (loss * upstream).sum() if loss.dim() else loss * upstream
    return torch.autograd.grad(out, leaves)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("extra", [{}, {"softcap": 3.0, "bias": True}, {"ignore_index": 2}],
                         ids=["plain", "softcap+bias", "ignore_index=2"])
def test_torch_path_equals_f_cross_entropy(reduction, ls, extra, seed):
    extra = dict(extra)
    leaves, t, w = weighted_inputs(31, 12, 41, bias=extra.pop("bias", False))
    if "ignore_index" in extra:
        t[t == -100] = extra["ignore_index"]
    loss = linear_cross_entropy(*leaves[:2], t, leaves[2], reduction=reduction, label_smoothing=ls, class_weights=w,
                                impl="torch", **extra)
    ref, ref_leaves = _torch_loss(leaves, t, w, reduction, ls, extra.get("softcap"), extra.get("ignore_index", -100))
    assert loss.shape == ref.shape and rel_err(loss, ref) < 1e-12
    up = torch.randn(ref.shape, dtype=torch.float64)
    for g, rg in zip(_grads(loss, [x for x in leaves if x is not None], up), _grads(ref, ref_leaves, up)):
        assert rel_err(g, rg) < 1e-11


def test_reference_with_weights_equals_f_cross_entropy(seed):
    """The float64 oracle used with z-loss below, checked against PyTorch without it."""
    leaves, t, w = weighted_inputs(17, 8, 23)
    for reduction in ("mean", "sum", "none"):
        ref = reference_loss(leaves[0], leaves[1], t, reduction=reduction, label_smoothing=0.1, class_weights=w)
        want, _ = _torch_loss(leaves, t, w, reduction, 0.1)
        assert rel_err(ref, want) < 1e-13


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_is_not_weighted(reduction, seed):
    """Liger-Kernel's convention: λ·lse² unweighted; "mean" divides it by the non-ignored count."""
    leaves, t, w = weighted_inputs(29, 10, 37)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=0.05)
    loss = linear_cross_entropy(*leaves[:2], t, class_weights=w, impl="torch", **kw)
    ref = reference_loss(leaves[0], leaves[1], t, class_weights=w, **kw)
    assert rel_err(loss, ref) < 1e-12
    up = torch.randn(ref.shape, dtype=torch.float64)
    for g, rg in zip(_grads(loss, leaves[:2], up), _grads(ref, leaves[:2], up)):
        assert rel_err(g, rg) < 1e-11
    if reduction == "mean":  # weighting the z-loss too would give a clearly different number
        _, lse = reference_loss(leaves[0], leaves[1], t, reduction="none", return_lse=True)
        valid = t != -100
        w_t = w[t.clamp(min=0)]
        ce = reference_loss(leaves[0], leaves[1], t, class_weights=w, reduction="none", label_smoothing=0.1)
        weighted_z = (ce.sum() + (w_t * 0.05 * lse**2)[valid].sum()) / w_t[valid].sum()
        assert abs(loss.item() - weighted_z.item()) > 1e-3


@pytest.mark.exact
def test_padded_vocabulary_and_weights_of_either_length(seed):
    leaves, t, w = weighted_inputs(19, 8, 30)
    vocab = 26
    t = torch.where(t >= vocab, t % vocab, t)
    short = linear_cross_entropy(*leaves[:2], t, class_weights=w[:vocab], vocab_size=vocab, label_smoothing=0.1,
                                 impl="torch")
    long = linear_cross_entropy(*leaves[:2], t, class_weights=w, vocab_size=vocab, label_smoothing=0.1, impl="torch")
    z = (leaves[0] @ leaves[1].T)[:, :vocab]
    ref = F.cross_entropy(z, t, weight=w[:vocab], label_smoothing=0.1)
    assert rel_err(short, ref) < 1e-12 and torch.equal(short, long)


def test_all_ignored_or_zero_weights_give_zero(seed):
    leaves, t, w = weighted_inputs(9, 8, 12)
    t[:] = -100
    loss = linear_cross_entropy(*leaves[:2], t, class_weights=w, impl="torch")
    assert loss.item() == 0.0 and not torch.autograd.grad(loss, leaves[0])[0].any()
    t[:] = 3
    w[3] = 0.0
    loss = linear_cross_entropy(*leaves[:2], t, class_weights=w, impl="torch")
    assert loss.item() == 0.0 and torch.isfinite(loss)


def test_uniform_weights_change_nothing(seed):
    leaves, t, _ = weighted_inputs(21, 8, 17)
    ones = torch.ones(17, dtype=torch.float64)
    for kw in ({}, {"label_smoothing": 0.3, "z_loss": 1e-2}):
        a = linear_cross_entropy(*leaves[:2], t, class_weights=ones, impl="torch", **kw)
        b = linear_cross_entropy(*leaves[:2], t, impl="torch", **kw)
        assert rel_err(a, b) < 1e-14


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ls,zl", [(0.0, 0.0), (0.0, 1e-2), (0.15, 0.0)])
@pytest.mark.parametrize("gif", [False, True], ids=["recompute", "fast"])
def test_triton_both_modes(reduction, ls, zl, gif, seed, monkeypatch):
    fast = CountFast(monkeypatch)
    leaves, t, w = weighted_inputs(37, 24, 53, torch.float32, bias=True)
    loss = linear_cross_entropy(*leaves[:2], t, leaves[2], reduction=reduction, label_smoothing=ls, z_loss=zl,
                                class_weights=w.float(), softcap=4.0, impl="triton", grad_in_forward=gif)
    # the fast mode runs whenever asked: weighted smoothing and the weighted mean with a z-loss included
    assert fast.paths == (["held"] if gif else [])
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref = reference_loss(*ref_leaves[:2], t, ref_leaves[2], softcap=4.0, reduction=reduction, label_smoothing=ls,
                         z_loss=zl, class_weights=w)
    assert rel_err(loss, ref) < 1e-5
    # the held-logits fast mode (one chunk here) takes any upstream gradient: a non-uniform one
    up = 0.4 + torch.rand(ref.shape, dtype=torch.float64)
    for g, rg in zip(_grads(loss.double(), leaves, up), _grads(ref, ref_leaves, up)):
        assert rel_err(g, rg) < 1e-5


@pytest.mark.parametrize("gif,loss_tol", [(False, 1e-4), (True, 1e-3)])
def test_triton_bf16_weighted_smoothing(seed, gif, loss_tol):
    """Memory-first: float32 logits; the fast mode (the default here): bf16 logits, as the unfused
    layer's (their rounding, ~2^-9·|z| per logit, moves the loss by up to ~1e-3 relative)."""
    leaves, t, w = weighted_inputs(33, 32, 60, torch.bfloat16)
    loss = linear_cross_entropy(*leaves[:2], t, class_weights=w, label_smoothing=0.1, impl="triton",
                                grad_in_forward=gif)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves[:2]]
    ref = reference_loss(*ref_leaves, t, label_smoothing=0.1, class_weights=w)
    assert rel_err(loss, ref) < loss_tol
    for g, rg in zip(torch.autograd.grad(loss, leaves[:2]), torch.autograd.grad(ref, ref_leaves)):
        assert rel_err(g, rg) < 2e-2


@pytest.mark.parametrize("w,exc,match", [
    (torch.ones(10), ValueError, r"^class_weights: expected shape \(11,\)"),
    (torch.ones(11, 1), ValueError, r"^class_weights: expected shape"),
    (torch.ones(11, dtype=torch.int64), TypeError, r"^class_weights: .*floating"),
    ([1.0] * 11, TypeError, r"^class_weights: .*torch.Tensor"),
    (torch.ones(11, device="meta"), ValueError, r"^class_weights: is on meta"),
    (torch.ones(11, requires_grad=True), ValueError, r"^class_weights: gradients"),
])
def test_bad_class_weights(w, exc, match):
    e, c, t = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
    with pytest.raises(exc, match=match):
        linear_cross_entropy(e, c, t, class_weights=w, impl="torch")
