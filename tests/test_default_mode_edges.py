"""Edge cases the default ("auto": the fast mode on the Triton backend) exposes to every caller,
each against the memory-first mode (grad_in_forward=False) or PyTorch's unfused layer: no autograd,
an empty batch, every token ignored with an upstream gradient that is not finite (a user's
`sum / n` with n = 0, the PyTorch drop-in's "mean"), a second backward, and double backward
(create_graph=True), which the fast mode cannot give and must refuse. TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import functools

import pytest
import torch

import vocab_parallel_cce.integrations.compat as compat
from support import interpreter
from support.fast_mode import CountFast, fast_path_of
from vocab_parallel_cce import Tuning, linear_cross_entropy

interpreter.on_cpu_only()

CHUNKS = Tuning(fast_chunk_tokens=3)  # forces the token-chunked path at N > 3
PATHS = {"held": None, "chunked": CHUNKS}


def _inputs(n=9, d=16, v=30, bias=False):
    e = torch.randn(n, d, requires_grad=True)
    c = (torch.randn(v, d) / 4).requires_grad_()
    b = (torch.randn(v) * 0.1).requires_grad_() if bias else None
    return e, c, b, torch.randint(0, v, (n,))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("grads", ["e", "c", "both"])
def test_double_backward_is_refused_with_the_way_out(path, grads, seed):
    """The fast mode forms its gradients outside autograd: with create_graph=True they would be
    constants (a gradient penalty on them silently 0) or fail inside the backward's products.
    Both fast paths refuse, naming the mode that can (impl="torch", grad_in_forward=False)."""
    e, c, _, t = _inputs()
    e.requires_grad_(grads != "c")
    c.requires_grad_(grads != "e")
    wrt = [q for q in (e, c) if q.requires_grad]
    loss = linear_cross_entropy(e, c, t, impl="triton", tuning=PATHS[path])
    assert fast_path_of(loss) == path
    with pytest.raises(RuntimeError, match=r"no double backward.*create_graph=True.*impl='torch', "
                                           r"grad_in_forward=False"):
        torch.autograd.grad(loss, wrt, create_graph=True)
    # the way out differentiates twice, as the unfused layer does
    e64, c64 = e.detach().double().requires_grad_(), c.detach().double().requires_grad_()

    def penalty_grads(loss):
        ge, = torch.autograd.grad(loss, e64, create_graph=True)
        return torch.autograd.grad((ge**2).sum(), (e64, c64))

    ours = penalty_grads(linear_cross_entropy(e64, c64, t, impl="torch", grad_in_forward=False))
    unfused = penalty_grads(torch.nn.functional.cross_entropy(e64 @ c64.T, t))
    for p, q in zip(ours, unfused):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-14)

@pytest.mark.exact
def test_memory_first_triton_second_differentiation_names_the_way_out(seed):
    """The memory-first mode's first backward under create_graph=True runs (its gradients are right);
    differentiating them again through the Triton kernels raises, naming the mode that can."""
    e, c, _, t = _inputs()
    loss = linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=False)
    ge, = torch.autograd.grad(loss, e, create_graph=True)
    ref, = torch.autograd.grad(linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=False), e)
    assert torch.equal(ge.detach(), ref)
    with pytest.raises(RuntimeError, match=r"cannot be differentiated again.*impl='torch', grad_in_forward=False"):
        (ge**2).sum().backward()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_the_default_call_compiles_as_one_graph(impl, seed, monkeypatch):
    """torch.compile(fullgraph=True) of the default call (which takes the memory-first mode while
    compiling): no graph break, also when the Tuning comes from VPCCE_* variables; the values are
    eager's (the eager default is the fast mode: float32 rounding apart)."""
    monkeypatch.setenv("VPCCE_GROUP_V", "8")
    torch._dynamo.reset()
    e, c, b, t = _inputs(bias=True)

    def fn(e, c, b, t):
        return linear_cross_entropy(e, c, t, b, impl=impl, label_smoothing=0.1)

    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(e, c, b, t)
    grads = torch.autograd.grad(out, (e, c, b))
    ref = fn(e, c, b, t)
    ref_grads = torch.autograd.grad(ref, (e, c, b))
    assert torch.allclose(out, ref, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.exact
def test_held_logits_go_through_saved_tensor_hooks(seed):
    """The held path's logits are a saved tensor: saved-tensor hooks pack them (so save_on_cpu can
    offload them), and non-reentrant checkpointing around the loss gives the same values."""
    e, c, b, t = _inputs(bias=True)
    packed = []

    def pack(x):
        packed.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = linear_cross_entropy(e, c, t, b, impl="triton")
    assert fast_path_of(loss) == "held"
    assert any(shape[0] == e.shape[0] and shape[1] >= c.shape[0] for shape in packed if len(shape) == 2), packed
    grads = torch.autograd.grad(loss, (e, c, b))

    def fn(e, c, b):
        return linear_cross_entropy(e, c, t, b, impl="triton")

    ckpt = torch.utils.checkpoint.checkpoint(fn, e, c, b, use_reentrant=False)
    ckpt_grads = torch.autograd.grad(ckpt, (e, c, b))
    assert torch.equal(ckpt.detach(), loss.detach())
    for g, r in zip(ckpt_grads, grads):
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_second_backward_names_grad_in_forward_false(path, seed):
    e, c, _, t = _inputs()
    loss = linear_cross_entropy(e, c, t, impl="triton", tuning=PATHS[path])
    assert fast_path_of(loss) == path
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once.*pass grad_in_forward=False"):
        loss.backward()


@pytest.mark.parametrize("impl", ["triton", "triton_exact", "torch"])
@pytest.mark.parametrize("mode", ["default", False, "chunked"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_empty_batch_gives_zero_gradients(impl, mode, reduction, seed):
    """N = 0 tokens: a zero loss and exactly zero dC and dbias in every mode (the memory-first
    Triton backward once left dC unwritten: whatever the allocator held)."""
    _, c, b, _ = _inputs(bias=True)
    e = torch.randn(0, 16, requires_grad=True)
    kw = dict(tuning=CHUNKS, grad_in_forward=True) if mode == "chunked" else (
        {} if mode == "default" else dict(grad_in_forward=mode))
    out = linear_cross_entropy(e, c, torch.zeros(0, dtype=torch.long), b, impl=impl, reduction=reduction,
                               return_token_accuracy=True, z_loss=1e-3, return_z_loss=True, **kw)
    assert out.loss.shape == ((0,) if reduction == "none" else ())
    de, dc, db = torch.autograd.grad(out.loss.sum() + out.z_loss.sum(), (e, c, b))
    assert de.shape == (0, 16) and dc.shape == c.shape and db.shape == b.shape
    assert not dc.any() and not db.any() and not out.loss.any() and not out.token_accuracy.any()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_token_ignored_with_a_non_finite_upstream_gives_zero_gradients(path, reduction, seed):
    """All tokens ignored and the loss divided by their count (0): the value is NaN and the
    upstream gradient inf. No token is scored, so every gradient is 0: as the memory-first mode and
    the unfused layer (F.cross_entropy(reduction="sum") / 0) give, where the fast mode gave NaN."""
    e, c, b, t = _inputs(bias=True)
    t.fill_(-100)
    zero = torch.zeros(())
    for mode in (path, "memory-first", "unfused"):
        if mode == "unfused":
            loss = torch.nn.functional.cross_entropy(e @ c.T + b, t, reduction="sum")
        else:
            loss = linear_cross_entropy(e, c, t, b, impl="triton", reduction=reduction, label_smoothing=0.1,
                                        z_loss=1e-3, tuning=PATHS[path], grad_in_forward=mode != "memory-first")
            assert fast_path_of(loss) == mode
        grads = torch.autograd.grad(loss / zero, (e, c, b))
        assert all(not g.any() for g in grads), (mode, [g.abs().max() for g in grads])


def test_the_pytorch_drop_in_every_target_ignored(seed, monkeypatch):
    """torch_linear_cross_entropy's "mean" with every target ignored: F.cross_entropy's NaN loss and
    its zero gradients, with the library's default mode on Triton (the held-logits path)."""
    fast = CountFast(monkeypatch)
    monkeypatch.setattr(compat, "linear_cross_entropy", functools.partial(linear_cross_entropy, impl="triton"))
    e, c, b, t = _inputs(bias=True)
    t.fill_(-100)
    loss = compat.torch_linear_cross_entropy(e, c, t, linear_bias=b)
    assert fast.paths == ["held"] and torch.isnan(loss)
    ref = torch.nn.functional.cross_entropy(e @ c.T + b, t)
    assert torch.isnan(ref)
    for g, rg in zip(torch.autograd.grad(loss, (e, c, b)), torch.autograd.grad(ref, (e, c, b))):
        assert torch.equal(g, rg)  # zeros


@pytest.mark.exact
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "nothing requires grad"])
def test_without_autograd_the_memory_first_forward_runs(context, seed, monkeypatch):
    """No autograd: no logits are materialised (the memory-first forward), the same values."""
    fast = CountFast(monkeypatch)
    e, c, b, t = _inputs(bias=True)
    kw = dict(impl="triton", reduction="none", label_smoothing=0.1, z_loss=1e-3, return_token_accuracy=True)
    want = linear_cross_entropy(e, c, t, b, grad_in_forward=False, **kw)
    if context == "nothing requires grad":
        got = linear_cross_entropy(e.detach(), c.detach(), t, b.detach(), **kw)
    else:
        with getattr(torch, context)():
            got = linear_cross_entropy(e, c, t, b, **kw)
    assert fast.calls == 0 and fast_path_of(got.loss) == "no autograd"
    assert torch.allclose(got.loss, want.loss, rtol=1e-6) and torch.equal(got.token_accuracy, want.token_accuracy)
