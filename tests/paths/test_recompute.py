"""The memory-first (recompute) path on the torch backend (impl="torch", whose default it is) against
the float64 materialised-logits reference (tests/support/reference.py): every reduction, option set
and dtype, odd sizes, the backend's tiling, layouts, autocast, the module, invalid targets, padded
vocabularies, torch.compile. The same path on the Triton kernels: tests/backends/test_triton_kernels.py."""

from __future__ import annotations

import math

import pytest
import torch

from support.inputs import IGNORE, OPTIONS, TOL, make_inputs, split_options
from support.reference import reference_loss, rel_err
from vocab_parallel_cce import LinearCrossEntropy, Tuning, linear_cross_entropy


def scalarise(loss, weights):
    """A scalar whose gradient exercises every per-token coefficient ("none": random weights)."""
    return loss.sum() if weights is None else (loss * weights).sum()


def grads_of(out, leaves):
    gs = torch.autograd.grad(out, [t for t in leaves if t is not None], allow_unused=True)
    it = iter(gs)
    return [None if t is None else next(it) for t in leaves]


def check_against_reference(e, c, targets, b, *, dtype, reduction="mean", lib_kwargs=None, ref_kwargs=None,
                            weights_seed=0, check_lse=False, grad_tol=None):
    lib_kwargs = dict(lib_kwargs or {})
    ref_kwargs = dict(ref_kwargs or {})
    loss_tol, default_grad_tol = TOL[dtype]
    grad_tol = default_grad_tol if grad_tol is None else grad_tol
    if check_lse:
        loss, lse = linear_cross_entropy(e, c, targets, b, reduction=reduction, impl="torch",
                                         return_lse=True, **lib_kwargs)
        ref, ref_lse = reference_loss(e, c, targets, b, reduction=reduction, return_lse=True, **ref_kwargs)
    else:
        loss = linear_cross_entropy(e, c, targets, b, reduction=reduction, impl="torch", **lib_kwargs)
        ref = reference_loss(e, c, targets, b, reduction=reduction, **ref_kwargs)
    assert loss.shape == ref.shape
    assert torch.isfinite(loss).all()
    assert rel_err(loss, ref) <= loss_tol, (rel_err(loss, ref), loss, ref)

    gen = torch.Generator().manual_seed(weights_seed)
    weights = torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5 if reduction == "none" else None
    out = scalarise(loss.double(), weights)
    out_ref = scalarise(ref, weights)
    if check_lse:
        lw = torch.randn(ref_lse.shape, generator=gen, dtype=torch.float64)
        assert rel_err(lse, ref_lse) <= loss_tol
        out = out + (lse.double() * lw).sum()
        out_ref = out_ref + (ref_lse * lw).sum()
    leaves = [e, c, b]
    got = grads_of(out, leaves)
    want = grads_of(out_ref, leaves)
    for name, g, w, leaf in zip("ecb", got, want, leaves):
        if leaf is None:
            continue
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        assert torch.isfinite(g).all(), name
        err = rel_err(g, w)
        assert err <= grad_tol, f"d{name}: rel err {err:.3g} > {grad_tol:.1g}"
    return loss, ref


# --------------------------------------------------------------------------------------------------
# every reduction × option set × dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(seed, reduction, option, dtype):
    want_bias, opts = split_options(OPTIONS[option])
    e, c, targets, b = make_inputs(37, 48, 203, dtype, bias=want_bias)
    check_against_reference(e, c, targets, b, dtype=dtype, reduction=reduction, lib_kwargs=opts,
                            ref_kwargs=opts, weights_seed=seed)


@pytest.mark.parametrize("n,d,v", [(1, 1, 1), (1, 5, 3), (7, 3, 1), (1, 64, 129), (33, 65, 257), (19, 13, 4099)])
@pytest.mark.parametrize("option", ["plain", "all"])
def test_odd_sizes(seed, n, d, v, option):
    want_bias, opts = split_options(OPTIONS[option])
    e, c, targets, b = make_inputs(n, d, v, torch.float32, bias=want_bias, ignore_frac=0.1)
    # V = 1: the loss is 0 up to rounding, its gradient a cancellation of O(1) terms
    grad_tol = 2e-4 if v == 1 else None
    for reduction in ("mean", "sum", "none"):
        check_against_reference(e, c, targets, b, dtype=torch.float32, reduction=reduction, lib_kwargs=opts,
                                ref_kwargs=opts, weights_seed=seed, grad_tol=grad_tol)


@pytest.mark.parametrize("blocks", [(2, 3), (5, 64), (1000, 7)])
def test_small_blocks(seed, blocks):
    """The torch backend's tiling (online LSE across vocabulary blocks, token blocks) is exact."""
    want_bias, opts = split_options(OPTIONS["all"])
    e, c, targets, b = make_inputs(23, 16, 37, torch.float64, bias=want_bias)
    for reduction in ("mean", "none"):
        check_against_reference(e, c, targets, b, dtype=torch.float64, reduction=reduction,
                                lib_kwargs={**opts, "tuning": Tuning(torch_block=blocks)},
                                ref_kwargs=opts, weights_seed=seed, check_lse=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", ["plain", "all"])
def test_every_token_ignored(seed, reduction, option):
    want_bias, opts = split_options(OPTIONS[option])
    e, c, targets, b = make_inputs(11, 24, 50, torch.float32, bias=want_bias)
    targets.fill_(IGNORE)
    loss = linear_cross_entropy(e, c, targets, b, reduction=reduction, impl="torch", **opts)
    assert torch.isfinite(loss).all()
    assert (loss == 0).all()
    assert loss.shape == (() if reduction != "none" else (11,))
    loss.sum().backward()
    for name, leaf in (("e", e), ("c", c), ("b", b)):
        if leaf is None:
            continue
        assert leaf.grad is not None, name
        assert torch.isfinite(leaf.grad).all(), name
        assert (leaf.grad == 0).all(), name


@pytest.mark.parametrize("ignore_index", [0, 7, -1])
def test_custom_ignore_index(seed, ignore_index):
    e, c, targets, b = make_inputs(40, 16, 30, torch.float64, ignore_frac=0)
    targets[::3] = ignore_index
    for reduction in ("mean", "none"):
        check_against_reference(e, c, targets, b, dtype=torch.float64, reduction=reduction,
                                lib_kwargs={"ignore_index": ignore_index},
                                ref_kwargs={"ignore_index": ignore_index}, weights_seed=seed)


# --------------------------------------------------------------------------------------------------
# layouts


@pytest.mark.parametrize("shift", [1, 2, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_3d_shift(seed, shift, reduction):
    want_bias, opts = split_options(OPTIONS["all"])
    e, c, targets, b = make_inputs(0, 20, 61, torch.float64, bias=want_bias, lead=(3, 9))
    loss, _ = check_against_reference(e, c, targets, b, dtype=torch.float64, reduction=reduction,
                                      lib_kwargs={**opts, "shift": shift}, ref_kwargs={**opts, "shift": shift},
                                      weights_seed=seed, check_lse=True)
    if reduction == "none":
        assert loss.shape == (3, 9 - int(shift))


def test_3d_no_shift_and_lse_shape(seed):
    e, c, targets, b = make_inputs(0, 12, 33, torch.float32, lead=(2, 5))
    loss, lse = linear_cross_entropy(e, c, targets, reduction="none", return_lse=True, impl="torch")
    assert loss.shape == (2, 5) and lse.shape == (2, 5)
    check_against_reference(e, c, targets, b, dtype=torch.float32, reduction="none", weights_seed=seed,
                            check_lse=True)


def test_shift_last_tokens_do_not_leak(seed):
    """With shift=k the last k positions of e take no part: their gradient is exactly zero."""
    e, c, targets, _ = make_inputs(0, 8, 17, torch.float64, lead=(2, 6), ignore_frac=0)
    loss = linear_cross_entropy(e, c, targets, shift=2, impl="torch")
    loss.backward()
    assert (e.grad[:, -2:] == 0).all()
    assert (e.grad[:, :-2] != 0).any()
    # and the first k targets are unused: changing them does not change the loss
    t2 = targets.clone()
    t2[:, :2] = (t2[:, :2] + 1) % 17
    loss2 = linear_cross_entropy(e, c, t2, shift=2, impl="torch")
    assert loss2.item() == loss.item()


@pytest.mark.parametrize("kind", ["transpose", "strided", "expanded_c"])
def test_non_contiguous(seed, kind):
    d, n, v = 24, 30, 77
    if kind == "transpose":
        base = torch.randn(d, n, dtype=torch.float32).requires_grad_()
        e = base.t()
    else:
        base = torch.randn(n, 2 * d, dtype=torch.float32).requires_grad_()
        e = base[:, ::2]
    assert not e.is_contiguous()
    cbase = (torch.randn(d, v) / math.sqrt(d) * 2).requires_grad_()
    c = cbase.t() if kind == "expanded_c" else cbase.t().contiguous().detach().requires_grad_()
    targets = torch.randint(0, v, (n,))
    targets[::5] = IGNORE
    loss = linear_cross_entropy(e, c, targets, impl="torch")
    ref = reference_loss(e, c, targets)
    assert rel_err(loss, ref) < 2e-6
    leaf_c = cbase if kind == "expanded_c" else c
    g_base, g_c = torch.autograd.grad(loss, [base, leaf_c])
    r_base, r_c = torch.autograd.grad(ref, [base, leaf_c])
    assert rel_err(g_base, r_base) < 2e-5
    assert rel_err(g_c, r_c) < 2e-5


def test_int32_targets(seed):
    e, c, targets, b = make_inputs(25, 16, 40, torch.float64, bias=True)
    for reduction in ("mean", "none"):
        check_against_reference(e, c, targets.to(torch.int32), b, dtype=torch.float64, reduction=reduction,
                                weights_seed=seed)


@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_return_lse(seed, option, dtype):
    want_bias, opts = split_options(OPTIONS[option])
    e, c, targets, b = make_inputs(29, 32, 90, dtype, bias=want_bias)
    loss, lse = linear_cross_entropy(e, c, targets, b, reduction="none", return_lse=True, impl="torch", **opts)
    assert lse.dtype == torch.float32 and lse.shape == targets.shape
    # lse is reported for ignored tokens as well
    assert torch.isfinite(lse).all()
    for reduction in ("mean", "sum", "none"):
        check_against_reference(e, c, targets, b, dtype=dtype, reduction=reduction, lib_kwargs=opts,
                                ref_kwargs=opts, weights_seed=seed, check_lse=True)
    # gradient through lse alone
    _, lse = linear_cross_entropy(e, c, targets, b, return_lse=True, impl="torch", **opts)
    _, ref_lse = reference_loss(e, c, targets, b, return_lse=True, **opts)
    got = grads_of(lse.double().sum(), [e, c, b])
    want = grads_of(ref_lse.sum(), [e, c, b])
    for g, w in zip(got, want):
        if w is not None:
            assert rel_err(g, w) <= TOL[dtype][1]


# --------------------------------------------------------------------------------------------------
# autocast, module, invalid targets, compile


@pytest.mark.parametrize("with_bias", [False, True])
def test_autocast_bf16(seed, with_bias):
    e, c, targets, b = make_inputs(31, 40, 70, torch.float32, bias=with_bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(e, c, targets, b, impl="torch")
    assert loss.dtype == torch.float32
    bf = lambda t: None if t is None else t.to(torch.bfloat16)  # noqa: E731
    ref_bf = reference_loss(bf(e), bf(c), targets, bf(b))
    ref_fp32 = reference_loss(e, c, targets, b)
    assert rel_err(loss, ref_bf) < 2e-6
    # and it is really the bf16 computation, not the fp32 one
    assert rel_err(ref_bf, ref_fp32) > 10 * rel_err(loss, ref_bf)
    got = grads_of(loss.double(), [e, c, b])
    want = grads_of(ref_bf, [e, c, b])
    for name, g, w, leaf in zip("ecb", got, want, [e, c, b]):
        if leaf is None:
            continue
        assert g.dtype == torch.float32, name
        assert rel_err(g, w) < 1.5e-2, name


def test_module(seed):
    want_bias, opts = split_options(OPTIONS["all"])
    e, c, targets, b = make_inputs(0, 16, 41, torch.float64, bias=True, lead=(2, 7))
    mod = LinearCrossEntropy(impl="torch", reduction="sum", shift=1, **opts)
    assert isinstance(mod, torch.nn.Module)
    loss = mod(e, c, targets, b)
    ref = reference_loss(e, c, targets, b, reduction="sum", shift=1, **opts)
    assert rel_err(loss, ref) < 1e-10
    got = grads_of(loss, [e, c, b])
    want = grads_of(ref, [e, c, b])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10
    # without bias
    loss = LinearCrossEntropy(impl="torch")(e, c, targets)
    assert rel_err(loss, reference_loss(e, c, targets)) < 1e-10


@pytest.mark.parametrize("bad", [-1, -5, "V", "V+3"])
def test_out_of_range_target_is_nan(seed, bad):
    v = 19
    e, c, targets, b = make_inputs(12, 8, v, torch.float32, ignore_frac=0)
    bad_value = {"V": v, "V+3": v + 3}.get(bad, bad)
    targets[4] = bad_value
    none = linear_cross_entropy(e, c, targets, reduction="none", impl="torch")
    assert torch.isnan(none[4])
    mask = torch.arange(12) != 4
    assert torch.isfinite(none[mask]).all()
    ref = reference_loss(e, c, targets, reduction="none")
    assert rel_err(none[mask], ref[mask]) < 2e-6
    for reduction in ("mean", "sum"):
        assert torch.isnan(linear_cross_entropy(e, c, targets, reduction=reduction, impl="torch"))


def test_out_of_range_target_with_padding_is_nan(seed):
    """A target that points at a padding row (>= vocab_size, < rows of c) is out of range too."""
    e, c, targets, _ = make_inputs(10, 8, 24, torch.float64, ignore_frac=0)
    targets = targets % 20
    targets[3] = 21
    none = linear_cross_entropy(e, c, targets, reduction="none", vocab_size=20, impl="torch")
    assert torch.isnan(none[3])
    ok = torch.arange(10) != 3
    ref = reference_loss(e, c, targets, reduction="none", vocab_size=20)
    assert rel_err(none[ok], ref[ok]) < 1e-10


@pytest.mark.parametrize("vocab_size", [1, 50, 63])
def test_padded_vocabulary(seed, vocab_size):
    want_bias, opts = split_options(OPTIONS["all"])
    e, c, targets, b = make_inputs(21, 16, 64, torch.float64, bias=True)
    targets = torch.where(targets == IGNORE, targets, targets % vocab_size)
    for reduction in ("mean", "none"):
        check_against_reference(e, c, targets, b, dtype=torch.float64, reduction=reduction,
                                lib_kwargs={**opts, "vocab_size": vocab_size},
                                ref_kwargs={**opts, "vocab_size": vocab_size}, weights_seed=seed, check_lse=True)
    # padding rows get exactly zero gradient
    loss = linear_cross_entropy(e, c, targets, b, vocab_size=vocab_size, impl="torch", **opts)
    gc, gb = torch.autograd.grad(loss, [c, b])
    assert (gc[vocab_size:] == 0).all() and (gb[vocab_size:] == 0).all()


def test_aliases_and_auto_on_cpu(seed):
    e, c, targets, _ = make_inputs(9, 8, 13, torch.float32)
    ref = reference_loss(e, c, targets)
    for impl in ("auto", "torch_compile"):
        assert rel_err(linear_cross_entropy(e, c, targets, impl=impl), ref) < 2e-6


def test_no_grad_and_partial_requires_grad(seed):
    e, c, targets, b = make_inputs(9, 8, 13, torch.float32, bias=True)
    with torch.no_grad():
        loss = linear_cross_entropy(e, c, targets, b, impl="torch")
    assert rel_err(loss, reference_loss(e, c, targets, b)) < 2e-6
    c2 = c.detach()
    loss = linear_cross_entropy(e, c2, targets, b, impl="torch")
    ge, gb = torch.autograd.grad(loss, [e, b])
    re_, rb = torch.autograd.grad(reference_loss(e, c2, targets, b), [e, b])
    assert rel_err(ge, re_) < 2e-5 and rel_err(gb, rb) < 2e-5


@pytest.mark.slow
def test_torch_compile(seed):
    torch._dynamo.reset()
    e, c, targets, b = make_inputs(16, 8, 21, torch.float32, bias=True)

    def fn(e, c, targets, b):
        return linear_cross_entropy(e, c, targets, b, impl="torch", softcap=4.0, label_smoothing=0.1, z_loss=1e-3)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=False)
    loss = compiled(e, c, targets, b)
    ref = reference_loss(e, c, targets, b, softcap=4.0, label_smoothing=0.1, z_loss=1e-3)
    assert rel_err(loss, ref) < 2e-6
    got = grads_of(loss.double(), [e, c, b])
    want = grads_of(ref, [e, c, b])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2e-5
    # and eager gives the same value
    assert torch.allclose(loss, fn(e, c, targets, b), rtol=1e-6, atol=0)


def _padding_shard_worker(rank: int, world: int, seed: int):
    """Two ranks of 16 classifier rows with a vocabulary of 14: rank 1 holds only padding, so its
    memory-first backward has no vocabulary chunk; its dE part must be 0, not the accumulator's
    unwritten memory."""
    import torch.distributed as dist

    n, d, rows, vocab = 10, 16, 16, 14
    g = torch.Generator().manual_seed(seed)
    e_all = torch.randn(n, d, generator=g)
    c_all = torch.randn(world * rows, d, generator=g) * 0.5
    t = torch.randint(0, vocab, (n,), generator=g)
    e = e_all.clone().requires_grad_()
    c = c_all[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    loss = linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=False, group=dist.group.WORLD,
                                vocab_size=vocab)
    loss.backward()
    e64, c64 = e_all.double().requires_grad_(), c_all.double().requires_grad_()
    de64, dc64 = torch.autograd.grad(reference_loss(e64, c64, t, vocab_size=vocab), (e64, c64))
    errs = rel_err(e.grad, de64), rel_err(c.grad[: max(0, vocab - rank * rows)], dc64[rank * rows:vocab])
    ok = errs[0] < 1e-5 and (rank == 0 and errs[1] < 1e-5 or rank == 1 and not c.grad.any())
    return [("padding shard", ok, f"dE error {errs[0]}, dC error {errs[1]}, dC of padding {c.grad.abs().max()}")]


def test_memory_first_with_a_shard_of_padding_only(seed):
    from support.process_groups import failures, run_group

    bad = failures(run_group(_padding_shard_worker, 2, seed))
    assert not bad, "\n".join(bad)
