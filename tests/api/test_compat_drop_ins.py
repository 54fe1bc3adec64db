"""Drop-ins: PyTorch 2.13's torch.nn.functional.linear_cross_entropy (compared with the real one)
and Apple CCE's API (positional order, LinearCrossEntropyImpl, the cce_kahan* names, filter_*_grad,
the module's positional constructor, VocabParallelOptions.from_vocab). Multi-rank parts (Apple's
group=None, DTensor classifiers): tests/distributed/test_vocab_parallel_options.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from support.reference import reference_loss, rel_err
from vocab_parallel_cce import (
    LinearCrossEntropy,
    LinearCrossEntropyImpl,
    VocabParallelOptions,
    linear_cross_entropy,
    torch_linear_cross_entropy,
)

HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy")
needs_torch_lce = pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch.nn.functional.linear_cross_entropy: torch >= 2.13")


def _inputs(n, d, v, dtype=torch.float64, bias=True):
    x = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, d, dtype=dtype) * 2 / d**0.5).requires_grad_()
    b = torch.randn(v, dtype=dtype, requires_grad=True) if bias else None
    t = torch.randint(0, v, (n,))
    t[::5] = -100
    return x, w, b, t


@needs_torch_lce
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kw", [{}, {"weight": True}, {"weight": True, "label_smoothing": 0.15},
                                {"label_smoothing": 0.3, "ignore_index": 4}, {"ignore_index": None}],
                         ids=["plain", "weight", "weight+smoothing", "smoothing+ignore_index=4", "ignore_index=None"])
def test_equals_torch_linear_cross_entropy(dtype, reduction, kw, seed):
    x, w, b, t = _inputs(29, 12, 31, dtype)
    kw = dict(kw)
    if kw.get("weight"):
        kw["weight"] = torch.rand(31, dtype=dtype) + 0.1
    if kw.get("ignore_index") == 4:
        t[t == -100] = 4
    ours = torch_linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, **kw)
    theirs = F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, **kw)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_err(ours, theirs) < tol
    up = torch.randn(theirs.shape, dtype=dtype)
    g1 = torch.autograd.grad((ours * up).sum(), (x, w, b))
    g2 = torch.autograd.grad((theirs * up).sum(), (x, w, b))
    for a, r in zip(g1, g2):
        assert rel_err(a, r) < tol * 10


@needs_torch_lce
def test_torch_drop_in_edge_cases(seed):
    x, w, b, t = _inputs(9, 8, 13, bias=False)
    t[:] = -100  # all ignored: PyTorch's mean is 0/0
    assert torch.isnan(torch_linear_cross_entropy(x, w, t)) and torch.isnan(F.linear_cross_entropy(x, w, t))
    assert torch_linear_cross_entropy(x, w, t, reduction="sum").item() == 0.0
    x1, t1 = x[0].detach(), torch.tensor(3)  # unbatched
    for red in ("mean", "sum", "none"):
        a = torch_linear_cross_entropy(x1, w, t1, reduction=red)
        r = F.linear_cross_entropy(x1, w, t1, reduction=red)
        assert a.shape == r.shape and rel_err(a, r) < 1e-12
    opts = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else object()
    t[::2] = 1
    a = torch_linear_cross_entropy(x, w, t, options=opts)
    assert rel_err(a, F.linear_cross_entropy(x, w, t)) < 1e-12
    bf = torch_linear_cross_entropy(x.detach().bfloat16(), w.detach().bfloat16(), t)
    assert bf.dtype == torch.bfloat16  # the input's dtype, as cross_entropy of bf16 logits


def test_torch_drop_in_refuses_what_it_lacks():
    x, w, _, t = _inputs(6, 8, 11, bias=False)
    with pytest.raises(NotImplementedError, match="^linear_weight: "):
        torch_linear_cross_entropy(x, w.detach()[:, None, :].expand(11, 2, 8), t)
    with pytest.raises(NotImplementedError, match="^target: class-probability"):
        torch_linear_cross_entropy(x, w, torch.softmax(torch.randn(6, 11), -1))
    with pytest.raises(ValueError, match="^reduction: "):
        torch_linear_cross_entropy(x, w, t, reduction="avg")


# ---------------------------------------------------------------------------------------- Apple CCE


def test_apple_positional_order(seed):
    """e, c, targets, bias, ignore_index, softcap, reduction, shift, return_lse, filter_eps,
    accum_e_fp32, accum_c_fp32, filter_e_grad, filter_c_grad, impl, vocab_parallel_options."""
    e = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(19, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(19, dtype=torch.float64)
    t = torch.randint(0, 19, (2, 7))
    loss, lse = linear_cross_entropy(e, c, t, b, 3, 4.0, "sum", 1, True, None, True, True, False, False, "torch_compile",
                                     None)
    ref, ref_lse = reference_loss(e, c, t, b, ignore_index=3, softcap=4.0, reduction="sum", shift=1, return_lse=True)
    assert rel_err(loss, ref) < 1e-12 and rel_err(lse, ref_lse) < 1e-12


def test_impl_enum_and_kahan_names_map_to_our_paths(seed):
    from vocab_parallel_cce import triton_backend

    e = torch.randn(40, 24)
    e[:, 0] = 10.0  # vocabulary rows 32.. negligible for every token: skippable dC tiles
    c = torch.randn(64, 24) * 0.3
    c[:, 0] = 0.0
    c[32:, 0] = -4.0
    t = torch.randint(0, 32, (40,))
    e, c = e.requires_grad_(), c.requires_grad_()
    grads = {}
    for impl in ["cce", "cce_kahan_full_c", "cce_kahan_full_e", "cce_kahan_full", "cce_kahan_full_c_full_e",
                 LinearCrossEntropyImpl.CCE_EXACT, LinearCrossEntropyImpl.CCE_KAHAN_FULL_C]:
        triton_backend.counters.clear()
        loss = linear_cross_entropy(e, c, t, filter_eps=2.0**-12, impl=impl, grad_in_forward=False)
        grads[impl] = torch.autograd.grad(loss, (e, c))
        skipped = triton_backend.counters["sparse_dc"] > 0
        name = impl.name.lower() if isinstance(impl, LinearCrossEntropyImpl) else impl
        # dC is filtered exactly where Apple's preset filters it (cce, cce_kahan_full_e)
        assert skipped == (name in ("cce", "cce_kahan_full_e")), name
    # dE is never filtered, so every name gives the same dE; unfiltered dC rows are non-zero
    for impl, (ge, gc) in grads.items():
        assert rel_err(ge, grads["cce_kahan_full"][0]) < 1e-6, impl
    assert not grads["cce"][1][32:].any() and grads["cce_kahan_full_c"][1][32:].any()
    # filter_c_grad=False turns dC's skipping off, as in Apple's presets
    triton_backend.counters.clear()
    linear_cross_entropy(e, c, t, filter_eps=2.0**-12, impl="cce", filter_c_grad=False, grad_in_forward=False).backward()
    assert triton_backend.counters["sparse_dc"] == 0
    # the torch path takes the enum too
    a = linear_cross_entropy(e, c, t, impl=LinearCrossEntropyImpl.TORCH_COMPILE)
    assert rel_err(a, reference_loss(e, c, t)) < 1e-6


def test_module_positional_constructor(seed):
    e = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(15, 8, dtype=torch.float64)
    t = torch.randint(0, 15, (2, 6))
    mod = LinearCrossEntropy(-100, 3.0, "none", 1, "auto", False, False, True, True, "torch_compile", True,
                             label_smoothing=0.1)
    loss, lse = mod(e, c, t)
    ref, ref_lse = reference_loss(e, c, t, softcap=3.0, reduction="none", shift=1, label_smoothing=0.1, return_lse=True)
    assert rel_err(loss, ref) < 1e-12 and rel_err(lse, ref_lse) < 1e-12
    assert mod.options["reduction"] == "none" and mod.options["impl"] == "torch_compile"
    with pytest.raises(TypeError, match="at most 11 positional"):
        LinearCrossEntropy(*range(12))
    with pytest.raises(TypeError, match="reduction given both"):
        LinearCrossEntropy(-100, None, "sum", reduction="mean")


@pytest.mark.exact
def test_from_vocab_single_process():
    opts = VocabParallelOptions.from_vocab(1000)
    assert (opts.start, opts.stop, opts.group, opts.reduce_e_grad) == (0, 1000, None, True)
    e, c, t = torch.randn(5, 8), torch.randn(1000, 8), torch.randint(0, 1000, (5,))
    # without a process group, group=None is one rank holding everything
    a = linear_cross_entropy(e, c, t, impl="torch", vocab_parallel_options=opts)
    assert torch.equal(a, linear_cross_entropy(e, c, t, impl="torch"))
    with pytest.raises(ValueError, match="^vocab_size: "):
        VocabParallelOptions.from_vocab(0)


def test_check_loss_options_takes_the_enum():
    """The adapters validate impl with check_loss_options: an enum member passes, a bad name names impl."""
    from vocab_parallel_cce.planning import check_loss_options

    check_loss_options(None, 0.0, 0.0, "auto", LinearCrossEntropyImpl.CCE_KAHAN_FULL)
    with pytest.raises(ValueError, match="^impl: "):
        check_loss_options(None, 0.0, 0.0, "auto", "cce_kahan")
