"""The Triton kernels on CPU under TRITON_INTERPRET=1, through the public API, against float64: the
memory-first mode's kernels on both load paths (TMA descriptors and pointer loads), its dC tile
filter and the adaptive skip policy, G's chunks in dC's storage, and the fast mode's row kernels.

Sizes are small (the interpreter runs each program in numpy) but deliberately not multiples of
the interpreter's 16-wide blocks, so every masked edge of the kernels is exercised.
"""

from __future__ import annotations

import pytest
import torch

from support import interpreter
from support.reference import reference_loss, rel_err
from vocab_parallel_cce import Tuning, linear_cross_entropy

interpreter.on_cpu_only()

# Tolerances on ‖out − ref‖/‖ref‖: 16-bit gradients are stored in their dtype (G, dE, dC).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 3e-3), torch.bfloat16: (1e-5, 2e-2)}


# Both load paths of the kernels (triton_backend): TMA tensor descriptors (emulated by the
# interpreter) where layouts allow, masked pointer loads otherwise (or with use_tma=False).
PATHS = {"tma": Tuning(), "pointers": Tuning(use_tma=False)}


@pytest.fixture(params=list(PATHS))
def path(request):
    """The Tuning that selects the load path."""
    return PATHS[request.param]


@pytest.fixture
def counters():
    """triton_backend's counts of the paths taken, from zero."""
    from vocab_parallel_cce import triton_backend

    triton_backend.counters.clear()
    return triton_backend.counters


def _inputs(n, d, v, dtype, bias=False, scale=1.0):
    e = torch.randn(n, d) * scale
    c = torch.randn(v, d) / d**0.5
    b = torch.randn(v) * 0.5 if bias else None
    return [x.to(dtype).requires_grad_() if x is not None else None for x in (e, c, b)]


def _peaked_inputs(n, d, v):
    """bf16 (e, c, t): one logit of ~10 per row, the target half the time (a trained model's softmax)."""
    c = torch.randn(v, d) / d**0.5
    top = torch.randint(0, v, (n,))
    e = 10.0 * c[top] / (c[top] * c[top]).sum(1, keepdim=True) + 0.3 * torch.randn(n, d)
    t = torch.where(torch.arange(n) % 2 == 0, top, torch.randint(0, v, (n,)))
    return e.bfloat16().requires_grad_(), c.bfloat16().requires_grad_(), t


def _compare(ins, targets, dtype, loss_tol=None, **kw):
    e, c, b = ins
    kw.setdefault("grad_in_forward", False)  # the memory-first mode unless a test asks for the fast one
    loss = linear_cross_entropy(e, c, targets, b, impl=kw.pop("impl", "triton"), **kw)
    leaves = [x for x in (e, c, b) if x is not None]
    out = loss.sum() if loss.dim() else loss
    grads = torch.autograd.grad(out, leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    re, rc = ref_leaves[:2]
    rb = ref_leaves[2] if b is not None else None
    kw.pop("filter_eps", None)
    kw.pop("grad_in_forward", None)
    kw.pop("tuning", None)
    ref = reference_loss(re, rc, targets, rb, **kw)
    ref_grads = torch.autograd.grad(ref.sum() if ref.dim() else ref, ref_leaves)
    loss_tol, grad_tol = (loss_tol or TOL[dtype][0]), TOL[dtype][1]
    assert loss.dtype == torch.float32
    assert rel_err(loss.double(), ref) < max(loss_tol, 1e-6), (loss, ref)
    for name, g, rg in zip("e c bias".split(), grads, ref_grads):
        assert g.dtype == dtype, name
        assert rel_err(g.double(), rg) < grad_tol, (name, rel_err(g.double(), rg))
    return loss, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_plain_mean_every_dtype(dtype, seed, path):
    n, d, v = 37, 40, 83
    ins = _inputs(n, d, v, dtype)
    t = torch.randint(0, v, (n,))
    t[::5] = -100
    _compare(ins, t, dtype, tuning=path)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_all_options_together(reduction, seed, path):
    n, d, v = 29, 24, 50
    ins = _inputs(n, d, v, torch.float32, bias=True, scale=3.0)
    t = torch.randint(0, v, (n,), dtype=torch.int32)
    t[3] = -100
    _compare(ins, t, torch.float32, reduction=reduction, softcap=4.0, label_smoothing=0.15, z_loss=1e-2, tuning=path)


def test_3d_shift_and_lse(seed, path):
    b, s, d, v = 2, 9, 20, 45
    e, c, _ = _inputs(b * s, d, v, torch.float32)
    e = e.detach().view(b, s, d).requires_grad_()
    t = torch.randint(0, v, (b, s))
    loss, lse = linear_cross_entropy(e, c, t, shift=2, reduction="none", return_lse=True, impl="triton",
                                     tuning=path)
    ref, ref_lse = reference_loss(e.double(), c.double(), t, shift=2, reduction="none", return_lse=True)
    assert loss.shape == lse.shape == (b, s - 2)
    assert rel_err(loss.double(), ref) < 1e-5 and rel_err(lse.double(), ref_lse) < 1e-5
    # gradient through both outputs
    g = torch.autograd.grad((loss * 0.3).sum() + (lse * 0.7).sum(), e)[0]
    e64 = e.detach().double().requires_grad_()
    r, rl = reference_loss(e64, c.detach().double(), t, shift=2, reduction="none", return_lse=True)
    rg = torch.autograd.grad((r * 0.3).sum() + (rl * 0.7).sum(), e64)[0]
    assert rel_err(g.double(), rg) < 1e-5


def test_single_token_and_all_ignored(seed, path):
    e, c, _ = _inputs(1, 16, 17, torch.float32)
    _compare([e, c, None], torch.tensor([5]), torch.float32, tuning=path)
    t = torch.full((7,), -100)
    e, c, _ = _inputs(7, 16, 17, torch.float32)
    loss = linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=False, tuning=path)
    ge, gc = torch.autograd.grad(loss, (e, c))
    assert loss.item() == 0.0 and not ge.any() and not gc.any()


def test_exact_mode_bf16_is_tighter_than_default(seed):
    n, d, v = 33, 32, 60
    ins = _inputs(n, d, v, torch.bfloat16, scale=2.0)
    t = torch.randint(0, v, (n,))
    _, g_exact = _compare(ins, t, torch.bfloat16, impl="triton_exact")
    _, g_default = _compare(ins, t, torch.bfloat16)
    assert all(torch.isfinite(g).all() for g in g_exact + g_default)


def test_filtering_skips_negligible_tiles_of_dc_only(seed):
    """Columns 32.. get logits ≈ −40 for every token: their tiles are skipped (dC rows exactly 0)
    while dE stays dense; without filtering those dC rows are tiny but non-zero."""
    n, d, v = 40, 24, 64
    e = torch.randn(n, d)
    e[:, 0] = 10.0  # a shared direction, like a trained model's
    c = torch.randn(v, d) * 0.3
    c[:, 0] = 0.0
    c[32:, 0] = -4.0
    t = torch.randint(0, 32, (n,))
    for fe, expect_zero in ((2.0**-12, True), (None, False)):
        ei, ci = e.clone().requires_grad_(), c.clone().requires_grad_()
        loss = linear_cross_entropy(ei, ci, t, impl="triton", grad_in_forward=False, filter_eps=fe)
        ge, gc = torch.autograd.grad(loss, (ei, ci))
        assert bool((gc[32:] == 0).all()) == expect_zero
        e64, c64 = e.double().requires_grad_(), c.double().requires_grad_()
        rge, rgc = torch.autograd.grad(reference_loss(e64, c64, t), (e64, c64))
        assert rel_err(ge.double(), rge) < 1e-5  # dE is never filtered
        assert rel_err(gc.double(), rgc) < 1e-5


def test_padded_vocabulary_rows_are_left_out(seed, path):
    n, d, v = 21, 16, 40
    e, c, b = _inputs(n, d, v, torch.float32, bias=True)
    t = torch.randint(0, 33, (n,))
    loss = linear_cross_entropy(e, c, t, b, impl="triton", grad_in_forward=False, label_smoothing=0.1, vocab_size=33, tuning=path)
    ref = reference_loss(e.double(), c.double(), t, b.double(), label_smoothing=0.1, vocab_size=33)
    assert rel_err(loss.double(), ref) < 1e-5
    ge, gc = torch.autograd.grad(loss, (e, c))
    assert not gc[33:].any()


def test_narrow_in_place_matches_a_copy():
    from vocab_parallel_cce.distributed import narrow_in_place as _narrow_in_place

    # one block; several doubling blocks (the first of 2^20 // 7 rows); a partial last block
    for n, d in ((5, 3), (1000, 7), (3, 5000), (1_000_000, 7), (300, 5000)):
        for dtype in (torch.bfloat16, torch.float16):
            acc = torch.randn(n, d)
            expect = acc.to(dtype)
            out = _narrow_in_place(acc, dtype)
            assert out.data_ptr() == acc.data_ptr() and torch.equal(out, expect)


@pytest.mark.parametrize("filter_eps", [None, 2.0**-12])
def test_many_small_chunks(filter_eps, seed, path):
    """Force 16-column chunks: the chunk loop and the per-chunk tile lists of the block-sparse dC
    product run several times."""
    n, d, v = 35, 20, 75  # 5 chunks, the last partial
    ins = _inputs(n, d, v, torch.float32, bias=True, scale=2.0)
    t = torch.randint(0, v, (n,))
    t[4] = -100
    _compare(ins, t, torch.float32, z_loss=1e-3, filter_eps=filter_eps,
             tuning=path.with_(min_chunk_columns=16, chunk_bytes=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("filter_eps", [None, 2.0**-12])
def test_logit_gradient_chunks_inside_dc_storage(dtype, filter_eps, seed, path, counters):
    """G chunks live in dC's not-yet-written rows while they fit there (shrinking widths), then in
    the workspace; padded rows, which G may have occupied, end up zero."""
    n, d, v, v_all = 19, 40, 150, 166  # D > N: the first chunks are wide
    e, c, b = _inputs(n, d, v_all, dtype, bias=True, scale=2.0)
    t = torch.randint(0, v, (n,))
    t[3] = -100
    loss = linear_cross_entropy(e, c, t, b, impl="triton", grad_in_forward=False, vocab_size=v, filter_eps=filter_eps,
                                tuning=path.with_(min_chunk_columns=16, chunk_bytes=1))
    ge, gc, gb = torch.autograd.grad(loss, (e, c, b))
    assert counters["g_in_dc"] and counters["g_in_workspace"], counters
    ref_in = [x.detach().double().requires_grad_() for x in (e, c, b)]
    ref = reference_loss(*ref_in[:2], t, ref_in[2], vocab_size=v)
    rge, rgc, rgb = torch.autograd.grad(ref, ref_in)
    tol = TOL[dtype][1]
    assert rel_err(loss.double(), ref) < 1e-5
    assert not gc[v:].any()
    for g, rg in ((ge, rge), (gc, rgc), (gb, rgb)):
        assert rel_err(g.double(), rg) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_in_forward_row_kernels(dtype, reduction, seed, path):
    """grad_in_forward=True, every option, padded vocabulary, several chunks: float32/float16 keep
    float32 logit chunks (row-statistics kernel, 16-bit G inside float32 rows); bf16 keeps bf16
    logits (stored-logits statistics with the final logits written back, G in place), whose
    per-logit rounding (2^-9) sets the loss error (as the unfused bf16 layer's)."""
    from vocab_parallel_cce import triton_backend

    n, d, v = 31, 20, 53
    ins = _inputs(n, d, v, dtype, bias=True, scale=2.0)
    t = torch.randint(0, 47, (n,))
    t[2] = -100
    triton_backend.counters.clear()
    # bf16: the written-back final logits are the loss's too; the interpreter truncates that
    # downcast (the GPU rounds to nearest), so its error here is biased: 2e-3, not ~1e-5
    _, grads = _compare(ins, t, dtype, loss_tol=2e-3 if dtype == torch.bfloat16 else None, reduction=reduction,
                        grad_in_forward=True, softcap=4.0, label_smoothing=0.1, z_loss=1e-3, vocab_size=47,
                        tuning=path.with_(fast_chunk_tokens=9))
    assert not grads[1][47:].any() and not grads[2][47:].any()
    assert (triton_backend.counters["fast_bf16_logits"] > 0) == (dtype == torch.bfloat16)


def test_grad_in_forward_per_token_with_uniform_upstream(seed, path):
    e, c, b = _inputs(23, 20, 37, torch.bfloat16, bias=True, scale=2.0)
    t = torch.randint(0, 37, (23,))
    t[::5] = -100
    loss = linear_cross_entropy(e, c, t, b, impl="triton", grad_in_forward=True, reduction="none", z_loss=1e-3,
                                tuning=path)
    w = torch.where(t != -100, 0.5, 3.0)
    grads = torch.autograd.grad((loss * w).sum(), (e, c, b))
    ref_in = [q.detach().double().requires_grad_() for q in (e, c, b)]
    ref = reference_loss(*ref_in[:2], t, ref_in[2], reduction="none", z_loss=1e-3)
    # bf16 logits (as the unfused bf16 layer's): each token's loss carries ~2^-9·|z| of rounding
    assert rel_err(loss.double(), ref) < 3e-3
    for g, rg in zip(grads, torch.autograd.grad((ref * w).sum(), ref_in)):
        assert rel_err(g.double(), rg) < TOL[torch.bfloat16][1]


def test_grad_in_forward_single_token_and_all_ignored(seed):
    e, c, b = _inputs(1, 16, 33, torch.bfloat16, bias=True)
    _compare((e, c, b), torch.tensor([5]), torch.bfloat16, loss_tol=3e-3, grad_in_forward=True)
    t = torch.full((1,), -100)
    loss = linear_cross_entropy(e, c, t, b, impl="triton", grad_in_forward=True)
    grads = torch.autograd.grad(loss, (e, c, b))
    assert loss.item() == 0.0 and all(not g.any() for g in grads)


@pytest.mark.parametrize("option", ["plain", "bias", "softcap"])
def test_grad_in_forward_bf16_loss_takes_the_float32_correct_logit(seed, option):
    """bf16 fast mode: the per-token loss takes the correct logit as a float32 dot product and puts
    it in lse in place of the stored one. Where the softmax is flat (small logits, as early in
    training), the target's own rounding is most of the unfused bf16 layer's per-token error
    (float64 softmax of bf16-rounded logits): the loss is then far closer to the exact logits'.
    The gradient stays the unfused layer's, p = exp(z̃ − lse(z̃)) of the stored logits z̃."""
    e, c, b = _inputs(40, 24, 300, torch.bfloat16, scale=0.5, bias=option == "bias")
    e, c = e.detach().requires_grad_(), c.detach().requires_grad_()
    cap = 0.8 if option == "softcap" else None
    t = torch.randint(0, 300, (40,))
    loss = linear_cross_entropy(e, c, t, b, impl="triton", grad_in_forward=True, reduction="none", softcap=cap)
    exact = e.detach().double() @ c.detach().double().T + (0.0 if b is None else b.detach().double())
    if cap is not None:
        exact = cap * torch.tanh(exact / cap)
    rounded = exact.to(torch.bfloat16).double()
    nll = torch.nn.functional.cross_entropy
    err_exact = rel_err(loss.detach().double(), nll(exact, t, reduction="none"))
    err_unfused = rel_err(nll(rounded, t, reduction="none"), nll(exact, t, reduction="none"))
    # with a bias or softcap the logits spread further, and the others' rounding (through lse) counts more
    assert err_exact < err_unfused / (4 if option == "plain" else 1), (err_exact, err_unfused)
    up = torch.rand(40, dtype=torch.float64)
    g_z = (torch.softmax(rounded, 1) - torch.nn.functional.one_hot(t, 300)) * up[:, None]
    if cap is not None:
        g_z = g_z * (1 - (rounded / cap) ** 2)
    de, dc = torch.autograd.grad(loss, (e, c), up.float())
    assert rel_err(de.double(), g_z @ c.detach().double()) < 1e-2
    assert rel_err(dc.double(), g_z.T @ e.detach().double()) < 1e-2


def test_grad_in_forward_bf16_loss_takes_the_largest_logits_in_float32(seed):
    """bf16 fast mode, a peaked softmax (one logit of ~10 per row, the target half the time, as a
    trained model's): lse takes the largest logits in float32 too, so the per-token loss is far
    closer to the exact logits' than the unfused bf16 layer's, whose lse carries the dominant
    logit's rounding."""
    e, c, t = _peaked_inputs(48, 64, 300)
    loss = linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=True, reduction="none")
    exact = e.detach().double() @ c.detach().double().T
    nll = torch.nn.functional.cross_entropy
    err = rel_err(loss.detach().double(), nll(exact, t, reduction="none"))
    err_unfused = rel_err(nll(exact.to(torch.bfloat16).double(), t, reduction="none"), nll(exact, t, reduction="none"))
    assert err < err_unfused / 10, (err, err_unfused)


@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1), dict(z_loss=0.1)])
def test_grad_in_forward_bf16_float32_logits_change_the_loss_only(seed, monkeypatch, options):
    """The float32 logits enter the loss only: dE and dC are computed as without them, from the
    stored logits and their own lse (glse), the z-loss's coefficient 2λ·lse included. On a peaked
    softmax the two lse differ by ~1e-3, so a gradient from the loss's lse would differ visibly."""
    from vocab_parallel_cce.plan import Plan

    e, c, t = _peaked_inputs(48, 64, 300)

    def loss_and_grads():
        loss = linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=True, reduction="none", **options)
        return (loss.detach(), *torch.autograd.grad(loss.sum(), (e, c)))

    with_float32 = loss_and_grads()
    init = Plan.__init__
    monkeypatch.setattr(Plan, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "bf16_logits": False}))
    stored_only = loss_and_grads()
    assert rel_err(with_float32[0].double(), stored_only[0].double()) > 1e-5  # the loss does change
    for g, g_stored in zip(with_float32[1:], stored_only[1:]):
        assert rel_err(g.double(), g_stored.double()) < 1e-6


@pytest.mark.exact
def test_grad_in_forward_scales_by_the_upstream_gradient_in_float32(seed):
    """The token-chunked fast mode's backward multiplies the stored 16-bit gradients by the
    upstream gradient in float32 (scale_kernel): the factor itself is never rounded to bfloat16.
    (The held-logits path puts the factor into G instead: tests/paths/test_held.py.)"""
    e, c, b = _inputs(13, 16, 29, torch.bfloat16, bias=True)
    t = torch.randint(0, 29, (13,))
    k = 1.0 + 2.0**-7 + 2.0**-9  # bfloat16 would round it to 1 + 2**-7
    k_rounded = torch.tensor(k).to(torch.bfloat16).item()
    assert k_rounded != k
    chunks = Tuning(fast_chunk_tokens=5)
    loss = linear_cross_entropy(e, c, t, b, impl="triton", grad_in_forward=True, reduction="sum", tuning=chunks)
    grads = torch.autograd.grad(loss * k, (e, c, b))
    loss1 = linear_cross_entropy(e, c, t, b, impl="triton", grad_in_forward=True, reduction="sum", tuning=chunks)
    grads1 = torch.autograd.grad(loss1, (e, c, b))
    to_bf16 = interpreter.kernel_bf16  # the interpreter's downcast truncates
    for g, g1 in zip(grads, grads1):
        expect = to_bf16(g1.float() * k)
        assert not torch.equal(expect, to_bf16(g1.float() * k_rounded))  # so the check below can fail
        assert torch.equal(g, expect)


def test_tma_descriptors_are_used_exactly_when_layouts_allow(seed, counters):
    """The `path` fixture is not a no-op: the fused kernels get descriptors for 16-byte aligned
    rows only, and none at all with use_tma=False."""
    t = torch.randint(0, 50, (20,))
    for name, d, expect in (("tma", 24, True), ("tma", 25, False), ("pointers", 24, False)):
        counters.clear()
        e, c, _ = _inputs(20, d, 50, torch.float32)  # d=25: 100-byte rows, not 16-byte aligned
        torch.autograd.grad(linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=False, tuning=PATHS[name]), (e, c))
        seen = [True] * counters["tma"] + [False] * counters["pointers"]
        assert seen == [expect, expect], (name, d, seen)  # forward and backward


def test_auto_filter_skips_dc_tiles_only_once_measured_sparse(seed, counters):
    """The default (filter_eps=None) never skips. filter_eps="auto" (16-bit inputs): the first backward of a shape runs dense and measures
    the kept-tile fraction; later ones skip dC tiles only if few were kept. dE stays dense."""
    from vocab_parallel_cce import triton_backend as TB

    TB.skip_policy.reset()
    n, d, v = 48, 32, 160
    e = torch.randn(n, d)
    e[:, 0] = 10.0
    c = torch.randn(v, d) * 0.3
    c[:, 0] = 0.0
    c[16:, 0] = -4.0  # columns 16.. negligible for every token: 9 of 10 vocabulary tiles
    t = torch.randint(0, 16, (n,))
    e, c = e.to(torch.bfloat16), c.to(torch.bfloat16)

    def grads():
        ei, ci = e.clone().requires_grad_(), c.clone().requires_grad_()
        return torch.autograd.grad(linear_cross_entropy(ei, ci, t, impl="triton", grad_in_forward=False,
                                                        filter_eps=filter_eps), (ei, ci))

    filter_eps = None  # the default: never skips, however sparse the softmax, before or after a measurement
    for _ in range(2):
        _, gc0 = grads()
        assert not counters["sparse_dc"] and gc0[16:].any()
    filter_eps = "auto"
    ge1, gc1 = grads()
    assert not counters["sparse_dc"] and gc1[16:].any()  # measured, dense
    ge2, gc2 = grads()
    assert counters["sparse_dc"] and not gc2[16:].any()  # skipped
    assert torch.equal(ge1, ge2)  # dE is never filtered
    counters.clear()  # another token count, same classifier: the measurement carries over
    ei, ci = e[:40].clone().requires_grad_(), c.clone().requires_grad_()
    gc3 = torch.autograd.grad(linear_cross_entropy(ei, ci, t[:40], impl="triton", grad_in_forward=False,
                                                   filter_eps="auto"), ci)[0]
    assert counters["sparse_dc"] and not gc3[16:].any()
    e64, c64 = e.double().requires_grad_(), c.double().requires_grad_()
    rge, rgc = torch.autograd.grad(reference_loss(e64, c64, t), (e64, c64))
    assert rel_err(gc2.double(), rgc) < 2e-2 and rel_err(ge2.double(), rge) < 2e-2

    # dense logits (every tile kept): stays dense call after call, measuring again only every
    # REMEASURE_EVERY calls; float32 never filters
    TB.skip_policy.reset()
    counters.clear()
    ins = _inputs(n, d, v, torch.bfloat16)
    t = torch.randint(0, v, (n,))
    every = Tuning().skip_remeasure_every
    for call in range(1, every + 2):
        torch.autograd.grad(linear_cross_entropy(ins[0], ins[1], t, impl="triton", grad_in_forward=False,
                                                 filter_eps="auto"), ins[:2])
        assert counters["skip_measurements"] == (1 if call <= every else 2), call
    ins32 = _inputs(n, d, 40, torch.float32)
    for _ in range(2):
        torch.autograd.grad(linear_cross_entropy(ins32[0], ins32[1], t % 40, impl="triton", grad_in_forward=False,
                                                 filter_eps="auto"), ins32[:2])
    assert not counters["sparse_dc"]


def test_skip_policy_reads_a_measurement_only_once_its_event_has_completed(monkeypatch):
    """The CUDA branch of the policy with a stand-in event: a measurement in flight leaves the
    decision alone (no waiting), a completed one is read, and nothing is queried under capture."""
    from vocab_parallel_cce.triton_backend import TileSkipPolicy

    class StandInEvent:
        def __init__(self):
            self.done, self.queries = False, 0

        def query(self):
            self.queries += 1
            return self.done

    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    policy, key, tuning = TileSkipPolicy(), ("cuda:0", 1000, 64), Tuning()
    assert policy.decide(key, tuning) == (False, True)  # never measured: dense, measure
    event = StandInEvent()
    policy.state[key] = {"fraction": None, "pinned": torch.tensor(0.1), "event": event, "since": 0}
    assert policy.decide(key, tuning) == (False, False) and event.queries == 1  # in flight: dense
    capturing[0], event.done = True, True
    assert policy.decide(key, tuning) == (False, False) and event.queries == 1  # captured: no query
    capturing[0] = False
    assert policy.decide(key, tuning) == (True, True) and policy.state[key]["event"] is None  # 10% kept: skip
    # that call measured again (record() restarts the count); its result: 90% kept
    policy.state[key].update(pinned=torch.tensor(0.9), event=StandInEvent(), since=0)
    policy.state[key]["event"].done = True
    for _ in range(tuning.skip_remeasure_every - 1):
        assert policy.decide(key, tuning) == (False, False)  # dense again, not measuring for a while
    assert policy.decide(key, tuning) == (False, True)  # every skip_remeasure_every calls while dense


