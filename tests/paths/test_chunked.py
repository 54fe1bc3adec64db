"""The fast mode's token-chunked path (gradients computed during the forward; forced here by
`Tuning(fast_chunk_tokens=7)`) against the float64 reference, on impl="torch" (reduction "none"
with an upstream gradient uniform over the non-ignored tokens, and the NaN it gives otherwise,
included). The Triton row kernels of this path: tests/backends/test_triton_kernels.py; under
vocabulary parallelism: tests/distributed/test_vocab_parallel.py; the one-chunk held-logits path
(any upstream gradient): tests/paths/test_held.py."""

from __future__ import annotations

import pytest
import torch

from support.inputs import OPTIONS, TOL, make_inputs, split_options
from support.reference import reference_loss, rel_err
from vocab_parallel_cce import Tuning, linear_cross_entropy


@pytest.fixture
def chunk():
    """Several token chunks (the production chunk is ≈ D tokens)."""
    return Tuning(fast_chunk_tokens=7)


def _check(e, c, t, b, dtype, upstream=0.75, tuning=None, **kw):
    loss = linear_cross_entropy(e, c, t, b, impl="torch", grad_in_forward=True, tuning=tuning, **kw)
    leaves = [q for q in (e, c, b) if q is not None]
    grads = torch.autograd.grad(loss * upstream, leaves)  # upstream != 1: the backward's scaling
    ref_leaves = [q.detach().double().requires_grad_() for q in leaves]
    ref = reference_loss(ref_leaves[0], ref_leaves[1], t, ref_leaves[2] if b is not None else None, **kw)
    ref_grads = torch.autograd.grad(ref * upstream, ref_leaves)
    loss_tol, grad_tol = TOL[dtype]
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(loss.double(), ref) < loss_tol, (loss, ref)
    for name, g, rg in zip(("e", "c", "bias"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape, name
        assert rel_err(g.double(), rg) < grad_tol, (name, rel_err(g.double(), rg))
    return loss, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_reference(seed, chunk, reduction, option, dtype):
    want_bias, opts = split_options(OPTIONS[option])
    e, c, t, b = make_inputs(30, 12, 41, dtype, bias=want_bias)
    _check(e, c, t, b, dtype, reduction=reduction, tuning=chunk, **opts)


@pytest.mark.parametrize("n,d,v", [(1, 5, 3), (7, 3, 2), (22, 9, 130)])
def test_odd_sizes_and_single_token(seed, chunk, n, d, v):
    e, c, t, b = make_inputs(n, d, v, torch.float32, bias=True, ignore_frac=0.0)
    _check(e, c, t, b, torch.float32, tuning=chunk, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_token_ignored_gives_zero_loss_and_gradients(seed, chunk, reduction):
    e, c, t, b = make_inputs(15, 8, 20, torch.float32, bias=True)
    t.fill_(-100)
    loss = linear_cross_entropy(e, c, t, b, impl="torch", grad_in_forward=True, reduction=reduction, tuning=chunk)
    grads = torch.autograd.grad(loss, (e, c, b))
    assert loss.item() == 0.0 and all(not g.any() for g in grads)


def test_3d_shift_and_padded_vocabulary(seed, chunk):
    e, c, t, b = make_inputs(0, 10, 33, torch.float32, bias=True, lead=(3, 8))
    t[t >= 29] = 5
    loss, (ge, gc, gb) = _check(e, c, t, b, torch.float32, tuning=chunk, shift=1, vocab_size=29, label_smoothing=0.2)
    assert not gc[29:].any() and not gb[29:].any()


def test_out_of_range_target_is_nan(seed, chunk):
    e, c, t, b = make_inputs(12, 6, 10, torch.float32, ignore_frac=0.0)
    t[4] = 10
    loss = linear_cross_entropy(e, c, t, impl="torch", grad_in_forward=True, tuning=chunk)
    assert torch.isnan(loss)


def test_only_some_inputs_require_grad(seed, chunk):
    e, c, t, b = make_inputs(16, 8, 21, torch.float32, bias=True)
    e.requires_grad_(False)
    loss = linear_cross_entropy(e, c, t, b, impl="torch", grad_in_forward=True, tuning=chunk)
    gc, = torch.autograd.grad(loss, (c,))
    ref_c = c.detach().double().requires_grad_()
    ref = reference_loss(e.double(), ref_c, t, b.detach().double())
    assert rel_err(gc.double(), torch.autograd.grad(ref, ref_c)[0]) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("option", ["plain", "all"])
def test_none_with_a_uniform_upstream_gradient(seed, chunk, dtype, option):
    """Per-token losses whose upstream gradient is one value s on every non-ignored token (what
    Megatron's `sum(losses * loss_mask) / n` gives when loss_mask marks those tokens); the ignored
    tokens' upstream values do not matter. 3-D inputs with a shift (the shifted-out positions get 0)."""
    want_bias, opts = split_options(OPTIONS[option])
    e, c, t, b = make_inputs(0, 12, 41, dtype, bias=want_bias, lead=(3, 9))
    kw = dict(reduction="none", shift=1, **opts)
    loss = linear_cross_entropy(e, c, t, b, impl="torch", grad_in_forward=True, tuning=chunk, **kw)
    assert loss.shape == (3, 8)
    valid = t[:, 1:] != -100
    w = torch.where(valid, 0.37, torch.rand(valid.shape, dtype=torch.float64))
    w[~valid] = float("inf")  # the ignored tokens' upstream values are not used, not even inf
    leaves = [q for q in (e, c, b) if q is not None]
    grads = torch.autograd.grad((loss * w).sum(), leaves)
    ref_leaves = [q.detach().double().requires_grad_() for q in leaves]
    ref = reference_loss(ref_leaves[0], ref_leaves[1], t, ref_leaves[2] if b is not None else None, **kw)
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_leaves)
    loss_tol, grad_tol = TOL[dtype]
    assert rel_err(loss.double(), ref) < loss_tol
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == dtype and rel_err(g.double(), rg) < grad_tol


def test_none_with_a_non_uniform_upstream_gradient_gives_nan_in_token_chunks(seed, chunk):
    """The token-chunked path (logits over the one-chunk budget) needs a uniform upstream gradient;
    the held-logits path takes any (tests/paths/test_held.py)."""
    e, c, t, b = make_inputs(10, 6, 13, torch.float32, bias=True, ignore_frac=0.0)
    loss = linear_cross_entropy(e, c, t, b, impl="torch", grad_in_forward=True, reduction="none", tuning=chunk)
    w = torch.ones(10)
    w[3] = 0.5  # e.g. a fractional loss mask on a non-ignored token
    grads = torch.autograd.grad((loss * w).sum(), (e, c, b))
    assert all(torch.isnan(g).all() for g in grads)
    # all tokens ignored: any upstream gradient is fine, every gradient is 0
    t.fill_(-100)
    loss = linear_cross_entropy(e, c, t, b, impl="torch", grad_in_forward=True, reduction="none", tuning=chunk)
    grads = torch.autograd.grad((loss * torch.rand(10)).sum(), (e, c, b))
    assert all(not g.any() for g in grads)


@pytest.mark.slow
def test_under_torch_compile(seed, chunk):
    """The mode runs eagerly inside a compiled function (a graph break), with the same results."""
    torch._dynamo.reset()
    e, c, t, b = make_inputs(16, 8, 21, torch.float32, bias=True)

    def fn(e, c, t, b):
        return 2.0 * linear_cross_entropy(e, c, t, b, impl="torch", grad_in_forward=True, z_loss=1e-3, tuning=chunk)

    loss = torch.compile(fn, backend="aot_eager")(e, c, t, b)
    grads = torch.autograd.grad(loss, (e, c, b))
    ref_in = [q.detach().double().requires_grad_() for q in (e, c, b)]
    ref = 2.0 * reference_loss(*ref_in[:2], t, ref_in[2], z_loss=1e-3)
    assert rel_err(loss.double(), ref) < 2e-6
    for g, rg in zip(grads, torch.autograd.grad(ref, ref_in)):
        assert rel_err(g.double(), rg) < 2e-5


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_loss_mask_keeps_masked_losses_without_their_gradient(seed, chunk, impl):
    """loss_mask (Megatron's 0/1 mask): masked positions keep their per-token loss, the
    gradient is that of sum(loss·mask)/n, and a non-zero upstream gradient on a masked position
    gives NaN gradients instead of a silently wrong one."""
    if impl == "triton" and torch.cuda.is_available():
        pytest.skip("interpreter case: CPU only")
    e, c, t, b = make_inputs(23, 16, 41, torch.float32, bias=True)
    mask = torch.ones(23)
    mask[::3] = 0.0
    kw = dict(impl=impl, grad_in_forward=True, reduction="none", tuning=chunk)
    loss = linear_cross_entropy(e, c, t, b, loss_mask=mask, **kw)
    ref_in = [q.detach().double().requires_grad_() for q in (e, c, b)]
    ref = reference_loss(*ref_in[:2], t, ref_in[2], reduction="none")
    assert rel_err(loss.double(), ref) < 1e-5  # every position's loss, masked ones too
    grads = torch.autograd.grad((loss * mask).sum() / mask.sum(), (e, c, b))
    for g, rg in zip(grads, torch.autograd.grad((ref * mask).sum() / mask.sum(), ref_in)):
        assert rel_err(g.double(), rg) < 1e-5
    loss = linear_cross_entropy(e, c, t, b, loss_mask=mask, **kw)
    grads = torch.autograd.grad(loss.sum(), (e, c, b))  # the masked positions' gradient is not 0
    assert all(torch.isnan(g).all() for g in grads)
    with pytest.raises(ValueError, match="^loss_mask: needs reduction='none'"):
        linear_cross_entropy(e, c, t, b, impl=impl, loss_mask=mask)
    with pytest.raises(ValueError, match="^loss_mask: expected a tensor of targets' shape"):
        linear_cross_entropy(e, c, t, b, loss_mask=mask[:5], **kw)
