"""linear_log_probs: per-token log-probabilities and entropy, against float64 materialised logits.

The torch path in float64 (exact to ~1e-12), the Triton kernels under TRITON_INTERPRET=1 in
float32 / float16 / bfloat16, random upstream gradients on both outputs (an RL loss weights every
token differently), odd sizes, one token, all ignored, shift, 3-D inputs, padding rows, bad
arguments. Vocabulary-parallel and sequence-parallel runs:
tests/distributed/test_vocab_parallel_options.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from support import interpreter
from support.reference import reference_log_probs, rel_err
from vocab_parallel_cce import Tuning, linear_log_probs

INTERPRETER = not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="run with TRITON_INTERPRET=1 in its own process")
if INTERPRETER:
    interpreter.patch_bf16_dot()


def _inputs(lead, d, v, dtype, bias=False, scale=2.0, ignore_every=5):
    e = torch.randn(*lead, d, dtype=torch.float64)
    c = torch.randn(v, d, dtype=torch.float64) * scale / d**0.5
    b = torch.randn(v, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, v, lead)
    if ignore_every:
        t.view(-1)[::ignore_every] = -100
    leaves = [x.to(dtype).requires_grad_() if x is not None else None for x in (e, c, b)]
    return leaves, t


def _check(leaves, t, tol_out, tol_grad, **kw):
    """Outputs and the gradients of w1·log_probs + w2·entropy (random w) against float64."""
    e, c, b = leaves
    lp, ent = linear_log_probs(e, c, t, bias=b, **kw)
    kw.pop("impl", None)
    kw.pop("tuning", None)
    ref_leaves = [x.detach().double().requires_grad_() if x is not None else None for x in leaves]
    rlp, rent = reference_log_probs(ref_leaves[0], ref_leaves[1], t, ref_leaves[2], **kw)
    expect_dtype = torch.float64 if e.dtype == torch.float64 else torch.float32
    assert lp.dtype == ent.dtype == expect_dtype
    assert lp.shape == ent.shape == rlp.shape
    assert rel_err(lp, rlp) < tol_out and rel_err(ent, rent) < tol_out, (rel_err(lp, rlp), rel_err(ent, rent))
    w1, w2 = torch.randn(rlp.shape, dtype=torch.float64), torch.randn(rlp.shape, dtype=torch.float64)
    used = [x for x in leaves if x is not None]
    ref_used = [x for x in ref_leaves if x is not None]
    grads = torch.autograd.grad((lp.double() * w1).sum() + (ent.double() * w2).sum(), used)
    ref_grads = torch.autograd.grad((rlp * w1).sum() + (rent * w2).sum(), ref_used)
    for name, g, rg in zip("e c bias".split(), grads, ref_grads):
        assert g.dtype == leaves[0].dtype, name
        assert rel_err(g, rg) < tol_grad, (name, rel_err(g, rg))
    return lp, ent


@pytest.mark.parametrize("opts", [
    {},
    {"temperature": 0.6},
    {"temperature": 1.7, "softcap": 3.0},
    {"softcap": 2.5, "bias": True},
    {"temperature": 0.9, "vocab_size": 31},  # rows 31.. are padding
], ids=["plain", "T=0.6", "T=1.7+softcap", "softcap+bias", "padded"])
def test_torch_path_float64(opts, seed):
    opts = dict(opts)
    bias = opts.pop("bias", False)
    leaves, t = _inputs((23,), 13, 37, torch.float64, bias=bias)
    if "vocab_size" in opts:
        t = torch.where(t >= opts["vocab_size"], t % opts["vocab_size"], t)
    _check(leaves, t, 1e-12, 1e-10, impl="torch", **opts)


def test_shift_3d_and_the_gradient_of_one_output_only(seed):
    leaves, t = _inputs((3, 8), 12, 29, torch.float64, bias=True)
    _check(leaves, t, 1e-12, 1e-10, impl="torch", shift=2, temperature=1.3)
    e, c, b = leaves
    lp, ent = linear_log_probs(e, c, t, bias=b, shift=True, impl="torch")
    assert lp.shape == (3, 7)
    # the entropy's gradient alone (policy-gradient code often backpropagates one of them)
    g = torch.autograd.grad(ent.sum(), e)[0]
    e64 = e.detach().double().requires_grad_()
    _, rent = reference_log_probs(e64, c.detach(), t, b.detach(), shift=1)
    assert rel_err(g, torch.autograd.grad(rent.sum(), e64)[0]) < 1e-10


def test_ignored_positions_are_zero_with_zero_gradient(seed):
    leaves, t = _inputs((9,), 8, 11, torch.float64)
    t[:] = -100
    t[4] = 3
    e, c, _ = leaves
    lp, ent = linear_log_probs(e, c, t, impl="torch")
    mask = t == -100
    assert (lp[mask] == 0).all() and (ent[mask] == 0).all() and ent[4] > 0
    ge = torch.autograd.grad((lp * 3.0 + ent * 5.0).sum(), e)[0]
    assert not ge[mask].any() and ge[4].any()
    t[:] = -100
    lp, ent = linear_log_probs(e, c, t, impl="torch")
    ge, gc = torch.autograd.grad((lp + ent).sum(), (e, c))
    assert not lp.any() and not ent.any() and not ge.any() and not gc.any()


def test_out_of_range_target_gives_nan_log_prob_only(seed):
    leaves, t = _inputs((7,), 8, 11, torch.float64, ignore_every=0)
    t[2], t[5] = 11, -3
    lp, ent = linear_log_probs(leaves[0], leaves[1], t, impl="torch")
    bad = torch.zeros(7, dtype=torch.bool)
    bad[[2, 5]] = True
    assert torch.isnan(lp[bad]).all() and torch.isfinite(lp[~bad]).all() and torch.isfinite(ent).all()


def test_entropy_limits(seed):
    """A uniform policy has entropy log V; a near one-hot one ≈ 0; T → large flattens it."""
    v = 17
    e = torch.zeros(4, 6, dtype=torch.float64)
    c = torch.randn(v, 6, dtype=torch.float64)
    t = torch.randint(0, v, (4,))
    lp, ent = linear_log_probs(e, c, t, impl="torch")
    assert torch.allclose(ent, torch.full_like(ent, torch.log(torch.tensor(float(v))).item()), atol=1e-12)
    assert torch.allclose(lp, torch.full_like(lp, -torch.log(torch.tensor(float(v))).item()), atol=1e-12)
    e = torch.randn(4, 6, dtype=torch.float64) * 50
    _, sharp = linear_log_probs(e, c, t, impl="torch", temperature=0.01)
    _, flat = linear_log_probs(e, c, t, impl="torch", temperature=1e4)
    assert (sharp < 1e-6).all() and (flat > 0.99 * torch.log(torch.tensor(float(v)))).all()


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_every_dtype(dtype, seed):
    leaves, t = _inputs((37,), 40, 83, dtype, bias=True)
    tol_grad = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    tol_out = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    _check(leaves, t, tol_out, tol_grad, impl="triton", temperature=0.8, softcap=5.0)


@needs_interpreter
@pytest.mark.parametrize("tuning", [Tuning(), Tuning(use_tma=False, forward_splits=3)], ids=["tma", "pointers/3splits"])
def test_triton_padded_shift_and_splits(tuning, seed):
    """Several forward splits (pz merged across them), pointer and TMA loads, padding rows."""
    leaves, t = _inputs((2, 19), 24, 70, torch.float32)
    t = torch.where(t >= 61, t % 61, t)
    _check(leaves, t, 1e-5, 1e-5, impl="triton", tuning=tuning, vocab_size=61, shift=1, temperature=2.0)


@needs_interpreter
def test_triton_single_token_and_all_ignored(seed):
    leaves, t = _inputs((1,), 16, 17, torch.float32, ignore_every=0)
    _check(leaves, t, 1e-5, 1e-5, impl="triton")
    leaves, t = _inputs((6,), 16, 17, torch.float32)
    t[:] = -100
    lp, ent = linear_log_probs(leaves[0], leaves[1], t, impl="triton")
    ge, gc = torch.autograd.grad((lp + ent).sum(), leaves[:2])
    assert not lp.any() and not ent.any() and not ge.any() and not gc.any()


def test_triton_and_torch_paths_agree_in_float32(seed):
    if not INTERPRETER:
        pytest.skip("interpreter test")
    leaves, t = _inputs((21,), 20, 45, torch.float32, bias=True)
    a = linear_log_probs(leaves[0], leaves[1], t, bias=leaves[2], impl="triton", temperature=0.5)
    b = linear_log_probs(leaves[0], leaves[1], t, bias=leaves[2], impl="torch", temperature=0.5)
    for x, y in zip(a, b):
        assert rel_err(x, y) < 1e-5


@pytest.mark.parametrize("kw,exc,match", [
    ({"temperature": 0.0}, ValueError, r"^temperature: "),
    ({"temperature": -1.0}, ValueError, r"^temperature: "),
    ({"temperature": "hot"}, ValueError, r"^temperature: "),
    ({"temperature": True}, ValueError, r"^temperature: "),
    ({"softcap": -2.0}, ValueError, r"^softcap: "),
    ({"impl": "fast"}, ValueError, r"^impl: "),
    ({"shift": 9}, ValueError, r"^shift: "),
    ({"vocab_size": 12}, ValueError, r"^vocab_size: "),
    ({"bias": torch.zeros(3)}, ValueError, r"^bias: "),
])
def test_bad_arguments_name_themselves(kw, exc, match):
    e, c, t = torch.randn(9, 8), torch.randn(11, 8), torch.randint(0, 11, (9,))
    with pytest.raises(exc, match=match):
        linear_log_probs(e, c, t, **{"impl": "torch", **kw})
    with pytest.raises(TypeError, match=r"^targets: "):
        linear_log_probs(e, c, t.float(), impl="torch")
