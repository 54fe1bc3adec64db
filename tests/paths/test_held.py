"""The fast mode's held-logits path (`LossWithHeldLogits`: all tokens in one chunk, the logits held
to the backward and the gradient formed there with the upstream gradient known) against float64.

impl="torch" (float64, float32, bfloat16, float16) and impl="triton" (TRITON_INTERPRET=1 on CPU:
bf16 takes the stored-logits kernels, float32/float16 the float32-logits ones), every reduction
with a NON-uniform per-token upstream gradient for "none" and a scalar that is not a power of two
for "mean"/"sum", label smoothing, z-loss, class weights, softcap, bias, ignore_index, N=1, all
ignored, padded vocabulary rows; the bf16 single rounding of dE and dC against an unfused bf16
layer built here; `dc_accumulate_into` (a float32 target accumulated straight from the product,
no dC returned); loss_mask; retain_graph; torch.compile; the token-chunked fallback over the
budget; a second backward refused on the torch backend, return_lse refused, the same loss as
the memory-first mode and without autograd. Multi-rank: tests/distributed/test_vocab_parallel.py
("held/..." cases); real sizes: tests/gpu/test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from support import interpreter
from support.fast_mode import CountFast
from support.inputs import make_inputs
from support.reference import reference_loss, rel_err
from vocab_parallel_cce import Tuning, linear_cross_entropy

interpreter.on_cpu_only()

# ‖out − ref‖/‖ref‖ bounds (loss, gradients). bf16 on the Triton backend: the interpreter truncates
# the downcast of the written-back logits (the GPU rounds), which biases the loss: 3e-3 there.
TOL = {
    ("torch", torch.float64): (1e-12, 1e-11),
    ("torch", torch.float32): (2e-6, 2e-5),
    ("torch", torch.bfloat16): (2e-6, 1.2e-2),
    ("torch", torch.float16): (2e-6, 3e-3),
    ("triton", torch.float32): (1e-5, 1e-5),
    ("triton", torch.bfloat16): (3e-3, 2e-2),
    ("triton", torch.float16): (1e-5, 3e-3),
}
CASES = [("torch", torch.float64), ("torch", torch.bfloat16), ("triton", torch.float32),
         ("triton", torch.bfloat16), ("triton", torch.float16)]
CASE_IDS = [f"{i}-{str(d).split('.')[-1]}" for i, d in CASES]

OPTIONS = {
    "plain": {},
    "smoothing+z-loss": dict(label_smoothing=0.1, z_loss=1e-2),
    "everything": dict(label_smoothing=0.15, z_loss=1e-2, softcap=3.0, bias=True, weights=True, vocab_size=37),
    "ignore_index=3+bias+weights": dict(ignore_index=3, bias=True, weights=True),
}


def _inputs(n, d, v, dtype, bias=False, ignore_every=4, scale=2.0, ignore_index=-100):
    e = torch.randn(n, d, dtype=torch.float64)
    c = torch.randn(v, d, dtype=torch.float64) * scale / d**0.5
    b = torch.randn(v, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, v, (n,))
    if ignore_every:
        t[::ignore_every] = ignore_index
    return [x.to(dtype).requires_grad_() if x is not None else None for x in (e, c, b)], t


def _upstream(reduction, n, scale=1.0):
    """A scalar that is not a power of two, or a per-token upstream gradient that is not uniform."""
    if reduction != "none":
        return 0.37 * scale
    return (0.2 + torch.rand(n, dtype=torch.float64)) * scale


def _ref_grads(leaves, t, up, **kw):
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref = reference_loss(*ref_leaves[:2], t, ref_leaves[2] if len(ref_leaves) > 2 else None, **kw)
    return ref, torch.autograd.grad((ref * up).sum(), ref_leaves)


def _opts(option, v):
    opts = dict(OPTIONS[option])
    want_bias, want_w = opts.pop("bias", False), opts.pop("weights", False)
    weights = torch.rand(v, dtype=torch.float64) * 2 + 0.1 if want_w else None
    return want_bias, weights, opts


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl,dtype", CASES, ids=CASE_IDS)
def test_any_upstream_gradient_matches_float64(impl, dtype, reduction, option, seed, monkeypatch):
    fast = CountFast(monkeypatch)
    n, d, v = 29, 16, 41
    want_bias, weights, opts = _opts(option, v)
    leaves, t = _inputs(n, d, v, dtype, bias=want_bias, ignore_index=opts.get("ignore_index", -100))
    if "vocab_size" in opts:
        t = torch.where((t >= 0) & (t >= opts["vocab_size"]), t % opts["vocab_size"], t)
    leaves = [x for x in leaves if x is not None]
    wt = None if weights is None else weights.to(torch.float64 if dtype == torch.float64 else torch.float32)
    loss = linear_cross_entropy(*leaves[:2], t, leaves[2] if want_bias else None, impl=impl, reduction=reduction,
                                grad_in_forward=True, class_weights=wt, **opts)
    assert fast.paths == ["held"]
    up = _upstream(reduction, n)
    grads = torch.autograd.grad((loss.double() * up).sum(), leaves)
    ref, ref_grads = _ref_grads(leaves, t, up, reduction=reduction, class_weights=weights, **opts)
    loss_tol, grad_tol = TOL[(impl, dtype)]
    assert rel_err(loss, ref) < loss_tol
    for name, g, rg in zip("ecb", grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape, name
        assert rel_err(g, rg) < grad_tol, (name, rel_err(g, rg))
    if "vocab_size" in opts:  # padded rows: exactly zero gradients
        assert not grads[1][opts["vocab_size"]:].any() and not grads[2][opts["vocab_size"]:].any()


@pytest.mark.parametrize("impl,dtype", CASES, ids=CASE_IDS)
def test_single_token_and_all_ignored(impl, dtype, seed):
    leaves, _ = _inputs(1, 16, 23, dtype, bias=True)
    t = torch.tensor([5])
    loss = linear_cross_entropy(*leaves[:2], t, leaves[2], impl=impl, reduction="none", grad_in_forward=True,
                                label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    grads = torch.autograd.grad(loss.sum() * 0.37, leaves)
    _, ref_grads = _ref_grads(leaves, t, 0.37, reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < TOL[(impl, dtype)][1]
    leaves, t = _inputs(9, 16, 23, dtype, bias=True)
    t.fill_(-100)
    for reduction in ("mean", "sum", "none"):
        loss = linear_cross_entropy(*leaves[:2], t, leaves[2], impl=impl, reduction=reduction, grad_in_forward=True)
        up = torch.full((9,), float("inf")) if reduction == "none" else 1.0  # unused on ignored tokens, even inf
        grads = torch.autograd.grad((loss * up).sum() if reduction == "none" else loss, leaves)
        assert not loss.any() and all(not g.any() for g in grads), reduction


def _unfused_logit_grad(e, c, t, k):
    """float32 logit gradient of an unfused bf16 layer for the loss k·Σ ce: bf16 logits
    z = round(e·cᵀ), float32 softmax, k·(p − y) (0 where ignored); the caller rounds it ONCE to bf16,
    as the native layer's logit gradient is, then dE = G·c and dC = Gᵀ·e with bf16 outputs."""
    z = torch.mm(e.detach(), c.detach().T).float()
    p = torch.softmax(z, dim=1)
    y = torch.nn.functional.one_hot(t.clamp(min=0), z.shape[1]).float()
    return torch.where((t != -100)[:, None], k * (p - y), 0.0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_bf16_gradients_are_rounded_once_at_a_non_power_of_two_upstream(impl, reduction, seed):
    """k = 0.37: the held-logits path puts k into G, so dE and dC are rounded once (the product's
    output), as the unfused bf16 layer's; the token-chunked path (its products for k = 1, then × k)
    rounds twice. The fast mode's bf16 error against float64 must be ≤ 1.05× the unfused layer's."""
    n, d, v, k = 96, 64, 160, 0.37
    leaves, t = _inputs(n, d, v, torch.bfloat16, ignore_every=7)
    e, c = leaves[:2]
    g32 = _unfused_logit_grad(e, c, t, k)
    # on the interpreter the kernels' downcast truncates (the GPU rounds to nearest): so does the reference's
    to_bf16 = interpreter.kernel_bf16 if impl == "triton" else (lambda x: x.to(torch.bfloat16))
    g_ref = to_bf16(g32)
    de_ref, dc_ref = torch.mm(g_ref, c.detach()), torch.mm(g_ref.T, e.detach())
    _, (de64, dc64) = _ref_grads([e, c], t, k, reduction=reduction)

    def fast(tuning=None):
        loss = linear_cross_entropy(e, c, t, impl=impl, reduction=reduction, grad_in_forward=True, tuning=tuning)
        up = torch.full((n,), k) if reduction == "none" else k
        return torch.autograd.grad((loss * up).sum(), (e, c))

    held = fast()
    errs = {name: (rel_err(g, r64), rel_err(ref, r64))
            for name, g, ref, r64 in (("dE", held[0], de_ref, de64), ("dC", held[1], dc_ref, dc64))}
    for name, (err, err_ref) in errs.items():
        assert err <= 1.05 * err_ref, (name, err, err_ref)
    # the check discriminates: the token-chunked path's second rounding (× k after the product)
    # costs it ~√2 against the held path's single one
    chunked = fast(Tuning(fast_chunk_tokens=n // 3))
    assert rel_err(chunked[0], de64) > 1.2 * errs["dE"][0], (rel_err(chunked[0], de64), errs)


class _RecordProducts:
    """Wraps backend.product_fp32 to record (out's data_ptr, accumulate) of each call."""

    def __init__(self, monkeypatch, backend):
        self.calls = []
        real = backend.product_fp32

        def product_fp32(out, a, b, plan, accumulate):
            self.calls.append((out.data_ptr(), accumulate))
            return real(out, a, b, plan, accumulate)

        monkeypatch.setattr(backend, "product_fp32", product_fp32)


@pytest.mark.parametrize("impl,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                        ("triton", torch.float32), ("triton", torch.bfloat16)],
                         ids=["torch-fp32", "torch-bf16", "triton-fp32", "triton-bf16"])
def test_dc_accumulates_straight_into_a_float32_target(impl, dtype, seed, monkeypatch):
    """dc_accumulate_into=main_grad (float32): the held path adds Gᵀ·E into it with one
    accumulate=True float32 product, returns no gradient for c (c.grad stays None) and forms no
    dC tensor; the result is target + the float64 dC up to G's own rounding."""
    from vocab_parallel_cce import torch_backend, triton_backend

    backend = torch_backend if impl == "torch" else triton_backend
    rec = _RecordProducts(monkeypatch, backend)
    n, d, v = 27, 16, 45
    leaves, t = _inputs(n, d, v, dtype, bias=True)
    t = torch.where(t >= 40, t % 40, t)  # targets inside vocab_size=40
    e, c, b = leaves
    target = torch.randn(v, d) * 0.1
    before = target.clone()
    up = _upstream("none", n)
    for step in range(2):  # two micro-batches accumulate
        loss = linear_cross_entropy(e, c, t, b, impl=impl, reduction="none", grad_in_forward=True,
                                    label_smoothing=0.1, vocab_size=40, dc_accumulate_into=target)
        loss.backward(up.float())
        assert c.grad is None
        assert (target.data_ptr(), True) in rec.calls
    _, (de64, dc64, db64) = _ref_grads(leaves, t, up, reduction="none", label_smoothing=0.1, vocab_size=40)
    # float32 G: the float32 accumulation only; bf16 G: G's rounding (truncation on the interpreter)
    err = rel_err(target - before, 2 * dc64)
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err
    assert torch.equal(target[40:], before[40:])  # padded rows: nothing added
    assert rel_err(e.grad, 2 * de64) < (1e-5 if dtype == torch.float32 else 1.2e-2)
    # without the target the same call returns a bf16/fp32 dC, and never calls an accumulating product
    rec.calls.clear()
    loss = linear_cross_entropy(e, c, t, b, impl=impl, reduction="none", grad_in_forward=True, label_smoothing=0.1,
                                vocab_size=40)
    dc, = torch.autograd.grad((loss * up.float()).sum(), (c,))
    assert dc.dtype == dtype and not any(acc for _, acc in rec.calls)
    if dtype == torch.bfloat16:  # the returned bf16 dC has one more rounding than the float32 target
        assert err < rel_err(dc, dc64), (err, rel_err(dc, dc64))


@pytest.mark.parametrize("mode", ["memory-first", "chunked"])
def test_dc_accumulate_into_on_the_other_paths(mode, seed):
    """The memory-first mode (its backward adds dC block by block) and the token-chunked fast mode
    (dC formed, then added): with a target c's gradient goes there (and none is returned), the same
    numbers as c.grad without one (tests/paths/test_recompute_dc_into.py: the memory-first mode's
    own tests)."""
    leaves, t = _inputs(19, 8, 30, torch.float32, bias=True)
    e, c, b = leaves
    kw = dict(impl="torch", reduction="sum", z_loss=1e-3,
              grad_in_forward=mode == "chunked", tuning=Tuning(fast_chunk_tokens=5))
    dc_plain, = torch.autograd.grad(linear_cross_entropy(e, c, t, b, **kw), (c,))
    target = torch.ones(30, 8)
    linear_cross_entropy(e, c, t, b, dc_accumulate_into=target, **kw).backward()
    assert c.grad is None and torch.allclose(target, 1 + dc_plain, rtol=1e-6, atol=1e-7)


def test_dc_accumulate_into_under_autocast_with_float32_parameters(seed, monkeypatch):
    """float32 parameters under bf16 autocast: the classifier's gradient is float32 anyway, so it is
    accumulated into the float32 target straight from the product (no bf16 dC, no float32 copy)."""
    from vocab_parallel_cce import triton_backend

    rec = _RecordProducts(monkeypatch, triton_backend)
    leaves, t = _inputs(21, 16, 33, torch.float32)
    e, c = leaves[:2]
    target = torch.zeros(33, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=True, reduction="mean",
                                    dc_accumulate_into=target)
    loss.backward()
    assert c.grad is None and e.grad is not None and (target.data_ptr(), True) in rec.calls
    _, (_, dc64) = _ref_grads([e.to(torch.bfloat16), c.to(torch.bfloat16)], t, 1.0)
    assert rel_err(target, dc64) < 1.2e-2


def test_dc_accumulate_into_is_checked(seed):
    leaves, t = _inputs(5, 8, 11, torch.float32)
    e, c = leaves[:2]
    for bad, exc, match in ((torch.zeros(11, 7), ValueError, "shape"), (torch.zeros(11, 8).T.contiguous().T, ValueError,
                            "contiguous"), (torch.zeros(11, 8, dtype=torch.int32), TypeError, "floating-point")):
        with pytest.raises(exc, match=f"^dc_accumulate_into: .*{match}"):
            linear_cross_entropy(e, c, t, impl="torch", grad_in_forward=True, dc_accumulate_into=bad)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_loss_mask_on_the_held_path(impl, seed):
    """loss_mask keeps the masked losses, gives them no gradient (coefficient 0), and an upstream
    gradient that is not exactly 0 there breaks the promise: NaN gradients, never silently wrong."""
    leaves, t = _inputs(23, 16, 41, torch.float32, bias=True)
    mask = torch.ones(23)
    mask[::3] = 0.0
    kw = dict(impl=impl, grad_in_forward=True, reduction="none")
    loss = linear_cross_entropy(*leaves[:2], t, leaves[2], loss_mask=mask, **kw)
    up = (0.3 + torch.rand(23, dtype=torch.float64)) * mask  # non-uniform on the unmasked tokens
    grads = torch.autograd.grad((loss.double() * up).sum(), leaves)
    ref, ref_grads = _ref_grads(leaves, t, up, reduction="none")
    assert rel_err(loss, ref) < 1e-5  # every position's loss, masked ones too
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-5
    loss = linear_cross_entropy(*leaves[:2], t, leaves[2], loss_mask=mask, **kw)
    grads = torch.autograd.grad(loss.sum(), leaves)  # non-zero on masked positions
    assert all(torch.isnan(g).all() for g in grads)


def test_backward_runs_once(seed):
    leaves, t = _inputs(8, 4, 9, torch.float32)
    loss = linear_cross_entropy(*leaves[:2], t, impl="torch", grad_in_forward=True, reduction="none")
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="grad_in_forward=True.*only once"):
        loss.sum().backward()


def test_backward_runs_once_and_bad_options_raise(seed):
    e, c, t, _ = make_inputs(8, 4, 9, torch.float32)
    loss = linear_cross_entropy(e, c, t, impl="torch", grad_in_forward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="grad_in_forward=True.*only once"):
        loss.backward()
    with pytest.raises(ValueError, match=r"^grad_in_forward: needs return_lse=False"):
        linear_cross_entropy(e, c, t, impl="torch", grad_in_forward=True, return_lse=True)


def test_same_loss_as_the_default_path_and_forward_only_use(seed):
    e, c, t, b = make_inputs(20, 8, 25, torch.float32, bias=True)
    default = linear_cross_entropy(e, c, t, b, impl="torch", z_loss=1e-3)
    mode = linear_cross_entropy(e, c, t, b, impl="torch", z_loss=1e-3, grad_in_forward=True)
    assert torch.allclose(default, mode, rtol=1e-6)
    with torch.no_grad():  # nothing to differentiate: the default path runs, same value
        assert torch.allclose(linear_cross_entropy(e, c, t, b, impl="torch", z_loss=1e-3, grad_in_forward=True),
                              default, rtol=1e-6)


def test_over_the_budget_the_token_chunked_path_runs(seed, monkeypatch):
    """Logits over Tuning.fast_logits_bytes: token chunks (gradients in the forward), still exact
    for "mean" (a scalar upstream gradient)."""
    fast = CountFast(monkeypatch)
    leaves, t = _inputs(300, 8, 20, torch.float32, bias=True)
    tiny = Tuning(fast_logits_bytes=128 * 20 * 4)  # 128 tokens per chunk: 3 chunks
    loss = linear_cross_entropy(*leaves[:2], t, leaves[2], impl="torch", grad_in_forward=True, tuning=tiny,
                                label_smoothing=0.1, z_loss=1e-3)
    assert fast.paths == ["chunked"]
    grads = torch.autograd.grad(loss * 0.37, leaves)
    ref, ref_grads = _ref_grads(leaves, t, 0.37, label_smoothing=0.1, z_loss=1e-3)
    assert rel_err(loss, ref) < 2e-6
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 2e-5


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_float16_small_per_token_upstream_does_not_underflow(impl, seed):
    """float16 G: the coefficients are brought near 1 by a power of two and the products scaled
    back, so an upstream gradient ~1e-4 (1/N) is not flushed to zero in G."""
    n = 37
    leaves, t = _inputs(n, 16, 41, torch.float16, bias=True)
    loss = linear_cross_entropy(*leaves[:2], t, leaves[2], impl=impl, grad_in_forward=True, reduction="none",
                                z_loss=1e-2)
    up = (0.5 + torch.rand(n, dtype=torch.float64)) * 1e-4
    grads = torch.autograd.grad((loss.double() * up).sum(), leaves)
    _, ref_grads = _ref_grads(leaves, t, up, reduction="none", z_loss=1e-2)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 3e-3, rel_err(g, rg)


@pytest.mark.slow
def test_under_torch_compile(seed):
    """The held path runs eagerly inside a compiled function (a graph break), with per-token
    upstream gradients."""
    torch._dynamo.reset()
    leaves, t = _inputs(16, 8, 21, torch.float32, bias=True)
    w = 0.2 + torch.rand(16)

    def fn(e, c, t, b):
        loss = linear_cross_entropy(e, c, t, b, impl="torch", grad_in_forward=True, reduction="none", z_loss=1e-3)
        return (loss * w).sum()

    out = torch.compile(fn, backend="aot_eager")(*leaves[:2], t, leaves[2])
    grads = torch.autograd.grad(out, leaves)
    ref, ref_grads = _ref_grads(leaves, t, w.double(), reduction="none", z_loss=1e-3)
    assert rel_err(out, (ref * w.double()).sum()) < 2e-6
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 2e-5
