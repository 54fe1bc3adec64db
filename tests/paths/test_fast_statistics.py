"""The fast mode's (grad_in_forward=True) optional statistics: class-weighted label
smoothing (s = Σ_j w_j z_j), max / argmax (token accuracy, predicted tokens), the z-loss part as its
own output, and the class-weighted "mean" with a z-loss (two divisors).

Oracles: float64 `F.cross_entropy(weight=, label_smoothing=)` on materialised logits (plus the
unweighted z-loss, "mean" over the non-ignored count), `reference_argmax`, and the memory-first mode.
impl="torch" (float64 and float16) and impl="triton" (TRITON_INTERPRET=1 on CPU: float32 and float16
take the float32-logits kernels, bf16 the stored-logits kernel, with write-back under bias/softcap),
every reduction, several token chunks, odd sizes, N=1, all tokens ignored, padded vocabulary rows.
Exact argmax ties come from inputs whose logits are exact in every dtype (small integers times 1/8):
every ordering of the dot products gives the same values, so ties are ties everywhere.
Multi-rank: tests/distributed/test_vocab_parallel_options.py; real sizes: tests/gpu/test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from support import interpreter
from support.inputs import weighted_inputs
from support.reference import reference_argmax, rel_err
from vocab_parallel_cce import CrossEntropyOutput, Tuning, linear_cross_entropy

interpreter.on_cpu_only()

CHUNKS = Tuning(fast_chunk_tokens=7)  # several token chunks, the last one partial
FLAGS = dict(return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True)
# ‖out − ref‖/‖ref‖ bounds (loss and outputs, gradients). The interpreter truncates the bf16 downcast
# of the written-back logits (the GPU rounds), which biases the bf16 loss: 2e-3 there.
TOL = {torch.float64: (1e-12, 1e-11), torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 3e-3),
       torch.bfloat16: (2e-3, 2e-2)}


def _oracle(leaves, t, w, reduction, ls=0.0, zl=0.0, softcap=None, vocab=None):
    """float64 (loss, z-loss output, leaves) with F.cross_entropy as the cross-entropy oracle."""
    e, c, b = (x.detach().double().requires_grad_() if x is not None else None for x in (leaves + [None])[:3])
    z = e @ c.T + (0 if b is None else b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z[:, :vocab]
    ce = F.cross_entropy(z, t, weight=None if w is None else w[:z.shape[1]].double(), label_smoothing=ls,
                         reduction=reduction)
    valid = t != -100
    zterm = torch.where(valid, zl * torch.logsumexp(z, -1) ** 2, 0.0)
    zred = {"mean": lambda: zterm.sum() / valid.sum(), "sum": zterm.sum, "none": lambda: zterm}[reduction]()
    return ce + zred, zred, [x for x in (e, c, b) if x is not None]


def _upstream(t, reduction):
    """A uniform upstream gradient (the fast mode's condition): 0.7, and anything on ignored tokens."""
    return torch.where(t != -100, 0.7, 3.0).double() if reduction == "none" else 0.7


def _grads(loss, leaves, up):
    return torch.autograd.grad((loss.double() * up).sum(), leaves)


def _run(leaves, t, gif, **kw):
    e, c, b = (leaves + [None])[:3]
    out = linear_cross_entropy(e, c, t, b, grad_in_forward=gif, **FLAGS, **kw)
    assert isinstance(out, CrossEntropyOutput)
    return out


def _check_argmax(pred, leaves, t, softcap=None, vocab=None, exact=False):
    """pred [N]: −1 where ignored, else an id whose float64 logit is the maximum up to the logits'
    rounding (and equal to the float64 argmax where the top two are clearly apart, or `exact`)."""
    e, c, b = (x.detach().double() if x is not None else None for x in (leaves + [None])[:3])
    z = e @ c.T + (0 if b is None else b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z[:, :vocab]
    valid = t != -100
    assert pred.dtype == torch.int64 and (pred[~valid] == -1).all()
    ref = reference_argmax(e, c, bias=b, softcap=softcap, vocab_size=vocab)
    if exact:
        assert torch.equal(pred[valid], ref[valid]), (pred, ref)
        return
    top2 = z.topk(min(2, z.shape[1]), dim=1).values
    slack = 1e-5 * z.abs().amax(1)
    picked = z.gather(1, pred.clamp(min=0)[:, None])[:, 0]
    assert ((top2[:, 0] - picked)[valid] <= slack[valid]).all()
    clear = valid & ((top2[:, 0] - top2[:, -1]) > 2 * slack)
    assert torch.equal(pred[clear], ref[clear])


OPTIONS = {
    "weighted smoothing": dict(label_smoothing=0.2, weights=True),
    "weighted smoothing + z-loss": dict(label_smoothing=0.1, z_loss=1e-2, weights=True),
    "weighted z-loss (two divisors)": dict(z_loss=2e-2, weights=True),
    "z-loss, bias, softcap": dict(z_loss=1e-2, softcap=3.0, bias=True),
    "everything": dict(label_smoothing=0.15, z_loss=1e-2, softcap=3.0, bias=True, weights=True),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl,dtype", [("torch", torch.float64), ("triton", torch.float32)], ids=["torch", "triton"])
def test_fast_mode_equals_f_cross_entropy_and_the_memory_first_mode(impl, dtype, reduction, option, seed):
    opt = dict(OPTIONS[option])
    want_bias, want_w = opt.pop("bias", False), opt.pop("weights", False)
    leaves, t, w = weighted_inputs(31, 12, 41, dtype, bias=want_bias)
    leaves = [x for x in leaves if x is not None]
    weights = w.to(torch.float64 if dtype == torch.float64 else torch.float32) if want_w else None
    kw = dict(impl=impl, reduction=reduction, class_weights=weights, tuning=CHUNKS, **opt)
    fast, slow = _run(leaves, t, True, **kw), _run(leaves, t, False, **kw)
    ref, ref_z, ref_leaves = _oracle(leaves, t, w if want_w else None, reduction, opt.get("label_smoothing", 0.0),
                                     opt.get("z_loss", 0.0), opt.get("softcap"))
    loss_tol, grad_tol = TOL[dtype]
    up = _upstream(t, reduction)
    ref_grads = _grads(ref, ref_leaves, up)
    for name, out in (("fast", fast), ("memory-first", slow)):
        assert out.loss.shape == ref.shape and out.loss.dtype == (torch.float64 if dtype == torch.float64
                                                                   else torch.float32), name
        assert rel_err(out.loss, ref) < loss_tol, (name, rel_err(out.loss, ref))
        assert rel_err(out.z_loss, ref_z) < loss_tol, (name, rel_err(out.z_loss, ref_z))
        _check_argmax(out.predicted_tokens, leaves, t, opt.get("softcap"))
        valid = t != -100
        hit = ((out.predicted_tokens == t) & valid).float()
        want_acc = hit if reduction == "none" else hit.sum() / valid.sum()
        assert out.token_accuracy.dtype == torch.float32 and torch.allclose(out.token_accuracy, want_acc)
        for leaf, g, rg in zip("e c bias".split(), _grads(out.loss, leaves, up), ref_grads):
            assert g.dtype == dtype and rel_err(g, rg) < grad_tol, (name, leaf, rel_err(g, rg))
    if dtype == torch.float64:
        assert torch.equal(fast.predicted_tokens, slow.predicted_tokens)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("write_back", [False, True], ids=["plain", "bias+softcap"])
@pytest.mark.parametrize("impl,dtype", [("triton", torch.bfloat16), ("triton", torch.float16), ("torch", torch.float16)],
                         ids=["triton-bf16", "triton-fp16", "torch-fp16"])
def test_16bit_inputs(impl, dtype, write_back, reduction, seed):
    """bf16: the stored-logits kernel (the final logits written back with bias/softcap); fp16: the
    float32-logits kernel with "mean"'s divisors applied after the products (p/count would underflow
    float16), the z-loss's second divisor entering G as their ratio."""
    from vocab_parallel_cce import triton_backend

    leaves, t, w = weighted_inputs(29, 16, 45, dtype, bias=write_back)
    leaves = [x for x in leaves if x is not None]
    cap = 4.0 if write_back else None
    kw = dict(impl=impl, reduction=reduction, class_weights=w.float(), label_smoothing=0.1, z_loss=1e-2,
              softcap=cap, tuning=CHUNKS)
    triton_backend.counters.clear()
    out = _run(leaves, t, True, **kw)
    assert (triton_backend.counters["fast_bf16_logits"] > 0) == (dtype == torch.bfloat16)
    ref, ref_z, ref_leaves = _oracle(leaves, t, w, reduction, 0.1, 1e-2, cap)
    loss_tol, grad_tol = TOL[dtype]
    assert rel_err(out.loss, ref) < loss_tol and rel_err(out.z_loss, ref_z) < 10 * loss_tol
    up = _upstream(t, reduction)
    for g, rg in zip(_grads(out.loss, leaves, up), _grads(ref, ref_leaves, up)):
        assert g.dtype == dtype and rel_err(g, rg) < grad_tol, rel_err(g, rg)
    pred, valid = out.predicted_tokens, t != -100
    z = (leaves[0].detach().double() @ leaves[1].detach().double().T)
    if write_back:
        z = cap * torch.tanh((z + leaves[2].detach().double()) / cap)
    picked, top = z.gather(1, pred.clamp(min=0)[:, None])[:, 0], z.amax(1)
    assert ((top - picked)[valid] <= 2**-6 * z.abs().amax(1)[valid]).all()  # within the 16-bit logits' rounding


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("n,d,v", [(1, 5, 3), (7, 3, 2), (22, 9, 130)])
def test_odd_sizes_and_a_single_token(impl, n, d, v, seed):
    dtype = torch.float64 if impl == "torch" else torch.float32
    leaves, t, w = weighted_inputs(n, d, v, dtype, bias=True, ignore_every=0)
    weights = w.to(dtype if impl == "torch" else torch.float32)
    kw = dict(impl=impl, class_weights=weights, label_smoothing=0.1, z_loss=1e-2, softcap=4.0, tuning=CHUNKS)
    out = _run(leaves, t, True, **kw)
    ref, ref_z, ref_leaves = _oracle(leaves, t, w, "mean", 0.1, 1e-2, 4.0)
    loss_tol, grad_tol = TOL[dtype]
    assert rel_err(out.loss, ref) < loss_tol and rel_err(out.z_loss, ref_z) < loss_tol
    _check_argmax(out.predicted_tokens, leaves, t, 4.0)
    for g, rg in zip(torch.autograd.grad(out.loss, leaves), torch.autograd.grad(ref, ref_leaves)):
        assert rel_err(g, rg) < grad_tol


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_every_token_ignored(impl, reduction, seed):
    leaves, t, w = weighted_inputs(9, 8, 20, torch.float32, bias=True)
    t[:] = -100
    out = _run(leaves, t, True, impl=impl, reduction=reduction, class_weights=w.float(), label_smoothing=0.1,
               z_loss=1e-2, tuning=CHUNKS)
    assert not out.loss.any() and not out.z_loss.any() and not out.token_accuracy.any()
    assert (out.predicted_tokens == -1).all()
    grads = torch.autograd.grad(out.loss.sum(), leaves)
    assert all(not g.any() for g in grads)


def _exact_inputs(n, d, v, dtype, bias, copies):
    """e: integers in [−4, 4]; c: {−1, 0, 1}/8; bias: multiples of 1/8: every logit and partial sum is
    exact in float32 and bfloat16, so exact ties stay ties in any order of summation. Rows copies[src]
    duplicate row src; every third token is aligned with it (those rows are its maximum)."""
    e = torch.randint(-4, 5, (n, d)).double()
    c = torch.randint(-1, 2, (v, d)).double() / 8
    b = torch.randint(-4, 5, (v,)).double() / 8 if bias else None
    for src, dsts in copies.items():
        c[dsts] = c[src].clone()
        if b is not None:
            b[dsts] = b[src].clone()
        e[::3] = 4 * torch.sign(c[src]) + (c[src] == 0) * e[::3].clamp(-1, 1)
    t = torch.randint(0, v, (n,))
    t[::4] = -100
    t[3::6] = min(min(d) for d in copies.values())  # aligned tokens: hits on the tie's smallest id
    return [x.to(dtype).requires_grad_() if x is not None else None for x in (e, c, b)], t


@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias (write-back)"])
@pytest.mark.parametrize("impl,dtype", [("triton", torch.float32), ("triton", torch.bfloat16), ("triton", torch.float16),
                                        ("torch", torch.float32)], ids=["triton-fp32", "triton-bf16", "triton-fp16",
                                                                        "torch"])
@pytest.mark.exact
def test_exact_ties_go_to_the_smallest_id(impl, dtype, bias, seed):
    """Duplicated rows 3, 9, 19, 60 (interpreter blocks are 16 wide: 3 and 9 share a block, 19 and 60
    lie in others; in the float32 kernel's 16 lanes 3 and 19 share a lane) and the many natural ties
    of integer logits: the predicted token is exactly the float64 argmax with ties to the smallest id."""
    leaves, t = _exact_inputs(37, 24, 70, dtype, bias, {19: [3, 9, 60]})
    leaves = [x for x in leaves if x is not None]
    out = _run(leaves, t, True, impl=impl, reduction="none", z_loss=1e-3, tuning=CHUNKS)
    _check_argmax(out.predicted_tokens, leaves, t, exact=True)
    pred = out.predicted_tokens
    assert (pred == 3).sum() >= 8 and not ((pred == 9) | (pred == 19) | (pred == 60)).any()
    slow = _run(leaves, t, False, impl=impl, reduction="none", z_loss=1e-3)
    assert torch.equal(pred, slow.predicted_tokens)
    assert torch.equal(out.token_accuracy, slow.token_accuracy) and 0 < out.token_accuracy.sum() < 37


@pytest.mark.exact
def test_argmax_of_the_stored_rounded_logits():
    """bf16 with bias: the statistics are those of the written-back (rounded) logits, the argmax too.
    Rows 6 and 21 have the same raw logit 8 and biases 0 and 2^-10: in float32 row 21 wins, but
    8 + 2^-10 is 8 in bf16, so the stored logits tie and the smallest id, 6, wins (as the
    gradient pass's softmax, which sees the stored values, has them equal)."""
    torch.manual_seed(0)
    n, d, v = 10, 16, 40
    c = torch.randn(v, d) * 0.05
    c[[6, 21]] = 0.0
    c[[6, 21], 0] = 8.0
    e = torch.randn(n, d)
    e[:, 0] = 1.0
    b = torch.zeros(v)
    b[21] = 2.0**-10
    e, c, b = (x.to(torch.bfloat16).requires_grad_() for x in (e, c, b))
    t = torch.randint(0, v, (n,))
    fast = linear_cross_entropy(e, c, t, b, impl="triton", grad_in_forward=True, return_predicted_tokens=True)
    memory_first = linear_cross_entropy(e, c, t, b, impl="triton", grad_in_forward=False,
                                        return_predicted_tokens=True)
    assert (reference_argmax(e.detach(), c.detach(), bias=b.detach()) == 21).all()
    assert (memory_first.predicted_tokens == 21).all()  # float32 logits: not rounded
    assert (fast.predicted_tokens == 6).all()


@pytest.mark.parametrize("padded_weights", [False, True], ids=["weights[:vocab]", "weights[:V]"])
@pytest.mark.parametrize("impl,dtype", [("torch", torch.float64), ("triton", torch.float32), ("triton", torch.bfloat16)],
                         ids=["torch", "triton-fp32", "triton-bf16"])
def test_padded_vocabulary_rows(impl, dtype, padded_weights, seed):
    """Rows ≥ vocab_size (with large logits and weights that would dominate) take no part: not the
    argmax, not in the weighted sum; their dC and dbias are 0."""
    v, vocab = 43, 37
    leaves, t, w = weighted_inputs(27, 16, v, dtype, bias=True)
    with torch.no_grad():
        leaves[1][vocab:] = leaves[1][:v - vocab] * 20
        leaves[2][vocab:] = 5.0
    t = torch.where(t >= vocab, t % vocab, t)
    w[vocab:] = 50.0
    weights = (w if padded_weights else w[:vocab]).to(torch.float64 if dtype == torch.float64 else torch.float32)
    kw = dict(impl=impl, vocab_size=vocab, class_weights=weights, label_smoothing=0.2, z_loss=1e-2, softcap=6.0,
              tuning=CHUNKS)
    out = _run(leaves, t, True, **kw)
    ref, ref_z, ref_leaves = _oracle(leaves, t, w, "mean", 0.2, 1e-2, 6.0, vocab=vocab)
    loss_tol, grad_tol = TOL[dtype]
    assert rel_err(out.loss, ref) < loss_tol and rel_err(out.z_loss, ref_z) < 10 * loss_tol
    assert (out.predicted_tokens < vocab).all()
    if dtype != torch.bfloat16:
        _check_argmax(out.predicted_tokens, leaves, t, 6.0, vocab=vocab)
    grads = torch.autograd.grad(out.loss, leaves)
    assert not grads[1][vocab:].any() and not grads[2][vocab:].any()
    for g, rg in zip(grads, torch.autograd.grad(ref, ref_leaves)):
        assert rel_err(g, rg) < grad_tol


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_gradient_through_the_z_loss_output(impl, reduction, seed):
    """The held-logits fast mode (one chunk) honours a gradient through the z-loss output (its
    coefficient a_z is kept apart); the token-chunked one cannot (the output's gradient is inside
    the loss's, formed in the forward): NaN gradients, never silently wrong ones; through the loss
    alone, the right ones on both."""
    leaves, t, _ = weighted_inputs(17, 8, 23, torch.float32, bias=True)
    kw = dict(impl=impl, reduction=reduction, z_loss=1e-2)
    up = _upstream(t, reduction)
    for through in ("z_loss", "loss + z_loss"):
        ref, ref_z, ref_leaves = _oracle(leaves, t, None, reduction, zl=1e-2)
        def objective(out):
            return out.z_loss if through == "z_loss" else out.loss + out.z_loss

        out = _run(leaves, t, True, **kw)  # held
        w = up if reduction != "none" else 0.3 + torch.rand(t.shape, dtype=torch.float64)  # any upstream
        grads = torch.autograd.grad((objective(out).double() * w).sum(), leaves)
        r = ref_z if through == "z_loss" else ref + ref_z
        for g, rg in zip(grads, torch.autograd.grad((r * w).sum(), ref_leaves)):
            assert rel_err(g, rg) < 1e-5, through
        out = _run(leaves, t, True, tuning=CHUNKS, **kw)  # token chunks
        grads = torch.autograd.grad((objective(out) * up).sum(), leaves)
        assert all(torch.isnan(g).all() for g in grads), through
    for tuning in (None, CHUNKS):
        out = _run(leaves, t, True, tuning=tuning, **kw)
        ref, _, ref_leaves = _oracle(leaves, t, None, reduction, zl=1e-2)
        for g, rg in zip(_grads(out.loss, leaves, up), _grads(ref, ref_leaves, up)):
            assert rel_err(g, rg) < 1e-5
    slow = _run(leaves, t, False, **kw)  # the memory-first mode differentiates it
    assert torch.isfinite(torch.autograd.grad(slow.z_loss.sum(), leaves[0])[0]).all()


