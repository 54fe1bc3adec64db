"""Token accuracy, predicted tokens (argmax over the global vocabulary, ties to the smallest id) and
the z-loss as a separate output (CrossEntropyOutput), as Liger-Kernel returns them.

Exact ties come from duplicated classifier rows, placed in different vocabulary tiles and forward
splits of the Triton kernel (and, in tests/distributed/test_vocab_parallel_options.py, on different
ranks). Their inputs are small integers (e) and multiples of 1/8 (c): every product and partial sum
is exact in float64, float32 and bfloat16, so duplicated rows give bit-equal logits in any order of
summation, whatever BLAS or thread count computes the reference's product (random floats do not: a
BLAS may sum one column in another order than its copy, 1e-15 apart, and the reference's argmax
then moves).
"""

from __future__ import annotations

import pytest
import torch

from support import interpreter
from support.fast_mode import CountFast
from support.reference import reference_argmax, reference_loss, rel_err
from vocab_parallel_cce import CrossEntropyOutput, Tuning, linear_cross_entropy

pytestmark = pytest.mark.exact  # exact ties and argmax: run again under another BLAS (.ci/run)

interpreter.patch_bf16_dot()


def _inputs(lead, d, v, dtype=torch.float64, ignore_every=4):
    e = torch.randn(*lead, d, dtype=torch.float64)
    c = torch.randn(v, d, dtype=torch.float64) / d**0.5
    t = torch.randint(0, v, lead)
    if ignore_every:
        t.view(-1)[::ignore_every] = -100
    return e.to(dtype).requires_grad_(), c.to(dtype).requires_grad_(), t


def _exact_inputs(lead, d, v, copies, dtype=torch.float64, ignore_every=4):
    """(e, c, t) with rows copies[src] of c duplicating row src (exact ties).

    e: integers in [−4, 4]; c: {−1, 0, 1}/8, row src ±1/8 (no zeros): logits are multiples of 1/8,
    exact in every dtype and every summation order. Two of every three tokens are aligned with row
    src (e = 4·sign(c[src]), so z_src = d/2, the largest logit any row can give, reached only by src
    and its copies): their predicted token is the tie's smallest id. The others take random logits,
    with the natural ties of integer logits."""
    e = torch.randint(-4, 5, (*lead, d)).double()
    c = torch.randint(-1, 2, (v, d)).double() / 8
    t = torch.randint(0, v, lead)
    if ignore_every:
        t.view(-1)[::ignore_every] = -100
    for src, dsts in copies.items():
        c[src] = (torch.randint(0, 2, (d,)) * 2 - 1).double() / 8
        c[dsts] = c[src].clone()
    src = next(iter(copies))
    rows = e.view(-1, d)
    aligned = torch.arange(rows.shape[0]) % 3 != 2
    rows[aligned] = 4 * torch.sign(c[src])
    return e.to(dtype).requires_grad_(), c.to(dtype).requires_grad_(), t


def _check(e, c, t, reduction="mean", shift=0, **kw):
    out = linear_cross_entropy(e, c, t, reduction=reduction, shift=shift, return_token_accuracy=True,
                               return_predicted_tokens=True, return_z_loss=True, z_loss=kw.pop("z_loss", 1e-2),
                               **kw)
    assert isinstance(out, CrossEntropyOutput)
    softcap, vocab = kw.get("softcap"), kw.get("vocab_size")
    pred = reference_argmax(e, c, softcap=softcap, shift=shift, vocab_size=vocab)
    used = t[..., shift:] if shift else t
    valid = used != -100
    assert out.predicted_tokens.dtype == torch.int64
    assert torch.equal(out.predicted_tokens, torch.where(valid, pred, -1))
    hit = ((pred == used) & valid).float()
    assert out.token_accuracy.dtype == torch.float32
    if reduction == "none":
        assert torch.equal(out.token_accuracy, hit)
    else:
        assert torch.allclose(out.token_accuracy, hit.sum() / valid.sum().clamp(min=1))
    return out, pred


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_backend_outputs_with_ties(reduction, seed):
    e, c, t = _exact_inputs((3, 11), 12, 40, {5: [17, 33]})
    t[0, :6] = 5  # targets equal to the tie's smallest id: counted as hits
    out, pred = _check(e, c, t, reduction, shift=1, impl="torch")
    assert (pred == 5).any() and not ((pred == 17) | (pred == 33)).any()
    assert 0 < float(out.token_accuracy.mean()) < 1
    ref_loss, lse = reference_loss(e, c, t, shift=1, z_loss=1e-2, reduction=reduction, return_lse=True)
    assert rel_err(out.loss, ref_loss) < 1e-12
    valid = t[:, 1:] != -100
    zl = torch.where(valid, 1e-2 * lse**2, 0.0)
    want_z = {"mean": zl.sum() / valid.sum(), "sum": zl.sum(), "none": zl}[reduction]
    assert rel_err(out.z_loss, want_z) < 1e-12
    # the z-loss output is differentiable: its gradient is the z-loss's
    g = torch.autograd.grad(out.z_loss.sum(), e)[0]
    e64 = e.detach().clone().requires_grad_()
    _, lse64 = reference_loss(e64, c.detach(), t, shift=1, reduction="none", return_lse=True)
    want_g = torch.autograd.grad(torch.where(valid, 1e-2 * lse64**2, 0.0).sum() / (valid.sum() if reduction == "mean" else 1),
                                 e64)[0]
    assert rel_err(g, want_g) < 1e-10


def test_padding_rows_never_win_and_all_ignored(seed):
    e, c, t = _inputs((9,), 8, 20, ignore_every=0)
    with torch.no_grad():
        c[17:] = c[:3] * 50  # padding rows that would win if they took part
    t = t % 17
    out, pred = _check(e, c, t, vocab_size=17, impl="torch")
    assert (pred < 17).all()
    t[:] = -100
    out = linear_cross_entropy(e, c, t, impl="torch", return_token_accuracy=True, return_predicted_tokens=True)
    assert out.token_accuracy.item() == 0.0 and (out.predicted_tokens == -1).all()
    assert out.z_loss is None and out.lse is None


def test_lse_and_z_loss_without_z_loss_option(seed):
    e, c, t = _inputs((7,), 8, 13)
    out = linear_cross_entropy(e, c, t, impl="torch", return_z_loss=True, return_lse=True, reduction="none")
    ref, lse = reference_loss(e, c, t, reduction="none", return_lse=True)
    assert (out.z_loss == 0).all() and rel_err(out.lse, lse) < 1e-12 and rel_err(out.loss, ref) < 1e-12
    assert out.token_accuracy is None and out.predicted_tokens is None


@pytest.mark.parametrize("tuning", [Tuning(), Tuning(use_tma=False, forward_splits=3)], ids=["tma", "pointers/3splits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_ties_across_tiles_and_splits(tuning, dtype, seed):
    """Interpreter tiles are 16 wide: rows 3, 19, 60 lie in different tiles (and splits)."""
    e, c, t = _exact_inputs((37,), 24, 70, {19: [3, 60]}, dtype)
    t[:10] = 3
    # the memory-first kernels' tiles and splits (the fast mode's ties: tests/paths/test_fast_statistics.py)
    out, pred = _check(e, c, t, "none", impl="triton", tuning=tuning, softcap=20.0, grad_in_forward=False)
    assert (pred == 3).sum() > 10


def test_fast_mode_runs_with_these_outputs(monkeypatch, seed):
    """No fallback: grad_in_forward=True and "auto" run the fast mode with each of the outputs (the
    held-logits path: one chunk; "auto" takes return_z_loss only there, whose output has a gradient
    of its own), and give the memory-first mode's values (tests/paths/test_fast_statistics.py checks
    them in depth)."""
    fast = CountFast(monkeypatch)
    e, c, t = _inputs((21,), 16, 30, torch.float32)
    flags = ({"return_token_accuracy": True}, {"return_predicted_tokens": True}, {"return_z_loss": True})
    for gif in (True, "auto"):
        for kw in flags:
            fast.clear()
            out = linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=gif, z_loss=1e-3, **kw)
            assert fast.paths == ["held"], (gif, kw)
            ref = linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=False, z_loss=1e-3, **kw)
            assert rel_err(out.loss, ref.loss) < 1e-6
            for name in ("z_loss", "token_accuracy", "predicted_tokens"):
                got, want = getattr(out, name), getattr(ref, name)
                assert (got is None) == (want is None), name
                if got is not None:
                    assert got.dtype == want.dtype and rel_err(got, want) < 1e-6, name
            torch.autograd.grad(out.loss, (e, c))


@pytest.mark.parametrize("name", ["return_z_loss", "return_token_accuracy", "return_predicted_tokens"])
def test_flags_must_be_bools(name):
    e, c, t = torch.randn(4, 8), torch.randn(9, 8), torch.randint(0, 9, (4,))
    with pytest.raises(TypeError, match=f"^{name}: "):
        linear_cross_entropy(e, c, t, impl="torch", **{name: 1})


def test_argmax_needs_float_exact_ids():
    """ids travel as float32 (exact below 2**24): a larger vocabulary is refused before any kernel."""
    e = torch.empty(4, 2, device="meta")
    c = torch.empty(2**24 + 1, 2, device="meta")
    t = torch.zeros(4, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"^return_token_accuracy/return_predicted_tokens: .*2\*\*24"):
        linear_cross_entropy(e, c, t, impl="torch", return_predicted_tokens=True)
