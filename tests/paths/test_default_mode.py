"""The default call (no `grad_in_forward` argument: "auto", the fast mode on the Triton backend)
against the memory-first mode (`grad_in_forward=False`), TRITON_INTERPRET=1 on CPU: a seeded random
sample of option combinations, then the edge cases the default exposes to every caller.

The sample (`test_default_matches_memory_first`): the loss (every reduction; for "none" a random
per-token upstream gradient), dE, dC, dbias and the extra outputs (z-loss part, with a gradient of
its own; token accuracy; predicted tokens) of both modes on the same inputs.

Each case is drawn from its own seeded `random.Random`, so the sample is the same on every run and
every worker. impl="triton" runs under TRITON_INTERPRET=1 on CPU (float32); impl="torch" runs
float32 and float64, where the default is the memory-first mode itself, so its cases also force
`grad_in_forward=True` wherever "auto" would pick the fast mode on Triton, to compare the torch
backend's fast paths too. `Tuning(fast_chunk_tokens=k)` with k < N forces the token-chunked path,
where "none" and `return_z_loss` legitimately fall back to the memory-first mode: every case
asserts which path ran (`CountFast`, `fast_path_of`), and `test_the_sample_covers_every_path`
checks that the sample holds held, chunked and fallback cases, so a passing run has exercised them.
A third of the cases also compare the memory-first result against the float64 reference
(tests/support/reference.py, from the definition), so that both modes being wrong the same way fails.

The edge cases, each against the memory-first mode or PyTorch's unfused layer: no autograd,
an empty batch, every token ignored with an upstream gradient that is not finite (a user's
`sum / n` with n = 0, the PyTorch drop-in's "mean"), a second backward, and double backward
(create_graph=True), which the fast mode cannot give and must refuse.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

import vocab_parallel_cce.integrations.compat as compat
from support import interpreter
from support.fast_mode import CountFast, fast_path_of
from support.reference import reference_argmax, reference_loss
from vocab_parallel_cce import Tuning, linear_cross_entropy

interpreter.on_cpu_only()

N_CASES = 80
MASTER_SEED = 0x5EED_C0DE
# ‖a − b‖ ≤ rtol·‖b‖ + atol·√numel: between the two modes, and against the float64 reference
# (float32 inputs: the products' and the statistics' float32 rounding). With one class (V = 1) the
# cross-entropy part's gradient vanishes analytically (p = 1), and what is computed is the
# cancellation of terms of size ~|g|·w·|c| (|e|) plus the z-loss's small 2λ·lse term: judged against
# that size, `_floor`.
MODE_TOL = {torch.float32: (1e-5, 1e-9), torch.float64: (1e-10, 1e-15)}
REF_TOL = {torch.float32: (3e-5, 1e-8), torch.float64: (1e-10, 1e-15)}
EPS = {torch.float32: 2e-7, torch.float64: 1e-15}  # the V = 1 floor per unit of the terms' size


@dataclass(frozen=True)
class Case:
    index: int
    impl: str
    dtype: torch.dtype
    lead: tuple[int, ...]  # e's leading dimensions (N = their product)
    d: int
    v: int
    bias: bool
    softcap: float | None
    label_smoothing: float
    z_loss: float
    weights: bool
    ignore: str  # "none" | "some" | "all"
    ignore_index: int
    shift: int
    reduction: str
    grads: str  # which inputs require grad: "e" | "c" (with bias) | "both"
    chunk_tokens: int | None  # Tuning(fast_chunk_tokens=...), None: default tuning
    int32_targets: bool
    strided_e: bool  # e a non-contiguous view of a wider buffer
    return_z: bool
    return_acc: bool
    return_pred: bool
    reference: bool  # also check the memory-first mode against float64

    @property
    def n(self) -> int:
        out = 1
        for k in self.lead:
            out *= k
        return out

    def __str__(self) -> str:
        shape = "x".join(map(str, self.lead)) + f"-d{self.d}-v{self.v}"
        opts = [f"{self.impl}-{str(self.dtype).split('.')[-1]}", shape, self.reduction, f"grad-{self.grads}"]
        for flag, name in ((self.bias, "bias"), (self.softcap, "cap"), (self.label_smoothing, "ls"),
                           (self.z_loss, "z"), (self.weights, "w"), (self.shift, "shift"), (self.int32_targets, "i32"),
                           (self.strided_e, "strided"), (self.return_z, "rz"), (self.return_acc, "acc"),
                           (self.return_pred, "pred"), (self.reference, "ref")):
            if flag:
                opts.append(name)
        if self.ignore != "none":
            opts.append(f"ign-{self.ignore}@{self.ignore_index}")
        if self.chunk_tokens:
            opts.append(f"k{self.chunk_tokens}")
        return f"{self.index:02d}-" + "-".join(opts)


# N → the leading shapes it may take ([B, T] with B·T = N; shift needs T > 1)
LEADS = {1: [(1,), (1, 1)], 3: [(3,), (1, 3), (3, 1)], 15: [(15,), (3, 5), (5, 3)], 17: [(17,), (1, 17)],
         37: [(37,), (1, 37)]}


def _draw(index: int) -> Case:
    rng = random.Random(MASTER_SEED * 1000 + index)
    # stratified on the axes that pick the path, random on the rest: 3 cases in 4 on Triton (float32),
    # the 4th on torch, float32 and float64 in turn; the token-chunked path forced in every 3rd case
    if index % 4 != 3:
        impl, dtype = "triton", torch.float32
    else:
        impl, dtype = "torch", (torch.float32 if index % 8 == 3 else torch.float64)
    forced = index % 3 == 0  # the token-chunked path: k < N (or, now and then, k = N: held)
    n = rng.choice([k for k in LEADS if k >= 3 or not forced])
    lead = rng.choice(LEADS[n])
    v = rng.choice([1, 7, 7, 30, 30, 70, 70])
    ignore = rng.choice(["none", "some", "some", "some", "all"])
    chunk_tokens = rng.choice([1, 2, n // 2, n - 1, n - 1, n]) if forced else None
    return Case(
        index=index, impl=impl, dtype=dtype, lead=lead, d=rng.choice([5, 16, 24]), v=v,
        bias=rng.random() < 0.5, softcap=rng.choice([None, None, 2.5]), label_smoothing=rng.choice([0.0, 0.1]),
        z_loss=rng.choice([0.0, 1e-3]), weights=rng.random() < 0.4, ignore=ignore,
        ignore_index=rng.choice([-100, -100, -100, 2 if v > 2 else -100]),  # or a class id
        shift=1 if lead[-1] > 1 and rng.random() < 0.4 else 0, reduction=rng.choice(["mean", "sum", "none"]),
        grads=rng.choice(["e", "c", "both", "both"]), chunk_tokens=chunk_tokens,
        int32_targets=rng.random() < 0.3, strided_e=rng.random() < 0.3, return_z=rng.random() < 0.4,
        return_acc=rng.random() < 0.4, return_pred=rng.random() < 0.4, reference=index % 3 == 1,
    )


CASES = [_draw(i) for i in range(N_CASES)]


def expected_fast_path(case: Case) -> str:
    """The path `grad_in_forward="auto"` takes on the Triton backend (api.linear_cross_entropy's
    rule, restated): held logits where all tokens fit one chunk, token chunks for "mean"/"sum"
    without return_z_loss, else the memory-first mode."""
    if case.chunk_tokens is None or case.chunk_tokens >= case.n:
        return "held"
    if case.reduction in ("mean", "sum") and not case.return_z:
        return "chunked"
    return "memory-first"


@dataclass
class _Inputs:
    e_leaf: torch.Tensor  # e itself, or the wider buffer e is a strided view of
    e: torch.Tensor
    c: torch.Tensor
    b: torch.Tensor | None
    t: torch.Tensor
    w: torch.Tensor | None
    names: list[str]  # the inputs that require grad, in the order of `leaves`
    leaves: list[torch.Tensor]


def _inputs(case: Case) -> _Inputs:
    """A case's inputs, from its own generator."""
    gen = torch.Generator().manual_seed(MASTER_SEED + case.index)
    dt, d, v = case.dtype, case.d, case.v
    # strided: every other column of a buffer twice as wide, a non-contiguous view
    e_leaf = torch.randn(*case.lead, 2 * d if case.strided_e else d, generator=gen, dtype=torch.float64).to(dt)
    c = (torch.randn(v, d, generator=gen, dtype=torch.float64) * 2.0 / d**0.5).to(dt)
    b = (torch.randn(v, generator=gen, dtype=torch.float64) * 0.5).to(dt) if case.bias else None
    t = torch.randint(0, v, case.lead, generator=gen)
    if case.ignore == "some":
        t = torch.where(torch.rand(case.lead, generator=gen) < 0.3, case.ignore_index, t)
    elif case.ignore == "all":
        t = torch.full(case.lead, case.ignore_index)
    t = t.to(torch.int32 if case.int32_targets else torch.int64)
    w = None
    if case.weights:
        w = (torch.rand(v, generator=gen, dtype=torch.float64) * 2 + 0.1).to(
            torch.float64 if dt == torch.float64 else torch.float32)
    named = []
    if case.grads in ("e", "both"):
        named.append(("e", e_leaf))
    if case.grads in ("c", "both"):
        named += [("c", c)] + ([("bias", b)] if b is not None else [])
    for _, q in named:
        q.requires_grad_()
    e = e_leaf[..., ::2] if case.strided_e else e_leaf
    return _Inputs(e_leaf, e, c, b, t, w, [k for k, _ in named], [q for _, q in named])


def _upstream(case: Case, shape, salt: int):
    """A scalar that is not a power of two ("mean"/"sum"), or a per-token gradient of both signs."""
    gen = torch.Generator().manual_seed(MASTER_SEED + 7919 * case.index + salt)
    if case.reduction != "none":
        return 0.3 + 1.4 * torch.rand((), generator=gen, dtype=torch.float64)
    return torch.rand(shape, generator=gen, dtype=torch.float64) * 2.0 - 0.6


def _call(case: Case, e, c, b, t, w, mode):
    kw = dict(impl=case.impl, reduction=case.reduction, shift=case.shift, softcap=case.softcap,
              label_smoothing=case.label_smoothing, z_loss=case.z_loss, class_weights=w, ignore_index=case.ignore_index,
              return_z_loss=case.return_z, return_token_accuracy=case.return_acc,
              return_predicted_tokens=case.return_pred)
    if case.chunk_tokens is not None:
        kw["tuning"] = Tuning(fast_chunk_tokens=case.chunk_tokens)
    if mode != "default":
        kw["grad_in_forward"] = mode
    out = linear_cross_entropy(e, c, t, b, **kw)
    return out if case.return_z or case.return_acc or case.return_pred else _Plain(out)


@dataclass
class _Plain:
    """A CrossEntropyOutput's fields, for a call that returns the loss alone (and the reference)."""

    loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    predicted_tokens: torch.Tensor | None = None


def _objective(case: Case, out):
    """Σ loss·g (+ Σ z_loss·g_z, the z-loss output's own upstream gradient) in float64."""
    obj = (out.loss.double() * _upstream(case, out.loss.shape, 1)).sum()
    if out.z_loss is not None and out.z_loss.requires_grad:
        obj = obj + (out.z_loss.double() * _upstream(case, out.z_loss.shape, 2)).sum()
    return obj


def _grads(obj, leaves):
    got = torch.autograd.grad(obj, leaves, allow_unused=True) if obj.requires_grad else [None] * len(leaves)
    return [torch.zeros_like(q) if g is None else g for g, q in zip(got, leaves)]


def _floor(case: Case, x: "_Inputs") -> float:
    """The absolute bound per element for V = 1 (see EPS), else 0: EPS × the size of the terms that
    cancel, max|g| · max w · max(1, max|e|, max|c|)."""
    if case.v > 1:
        return 0.0
    up = _upstream(case, x.t[..., case.shift:].shape, 1).abs().max().item()
    w = 1.0 if x.w is None else x.w.max().item()
    size = max(1.0, x.e.detach().abs().max().item(), x.c.detach().abs().max().item())
    return EPS[case.dtype] * max(up, 1.0) * max(w, 1.0) * size


def _assert_close(name, a, b, tol, floor=0.0):
    rtol, atol = tol
    atol = max(atol, floor)
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (name, a.shape, b.shape)
    if a.numel() == 0:
        return
    assert torch.equal(torch.isnan(a), torch.isnan(b)), (name, "NaN pattern")
    diff = torch.linalg.vector_norm(torch.nan_to_num(a - b)).item()
    bound = rtol * torch.linalg.vector_norm(torch.nan_to_num(b)).item() + atol * a.numel() ** 0.5
    assert diff <= bound, (name, diff, bound)


def _compare(label, case, got, want, got_grads, want_grads, tol, leaf_names, floor):
    _assert_close(f"{label}: loss", got.loss, want.loss, tol, floor)
    if case.return_z:
        _assert_close(f"{label}: z_loss", got.z_loss, want.z_loss, tol, floor)
    if case.return_acc:
        _assert_close(f"{label}: token_accuracy", got.token_accuracy, want.token_accuracy, (1e-6, 0.0))
    if case.return_pred:
        assert torch.equal(got.predicted_tokens, want.predicted_tokens), f"{label}: predicted_tokens"
    for name, g, rg in zip(leaf_names, got_grads, want_grads):
        assert g.dtype == rg.dtype, (label, name)
        _assert_close(f"{label}: d{name}", g, rg, tol, floor)


def _reference(case: Case, x: _Inputs):
    """The float64 oracle's outputs (as a `_Plain`) and gradients w.r.t. x.leaves (in their dtypes)."""
    ref = {k: q.detach().double().requires_grad_() for k, q in zip(x.names, x.leaves)}
    e64 = ref["e"] if "e" in ref else x.e_leaf.detach().double()
    e64 = e64[..., ::2] if case.strided_e else e64
    c64 = ref.get("c", x.c.detach().double())
    b64 = None if x.b is None else ref.get("bias", x.b.detach().double())
    kw = dict(ignore_index=case.ignore_index, softcap=case.softcap, reduction=case.reduction, shift=case.shift,
              label_smoothing=case.label_smoothing, class_weights=x.w)
    out = _Plain(reference_loss(e64, c64, x.t, b64, z_loss=case.z_loss, **kw))
    if case.return_z:  # the z-loss part, reduced as the loss ("mean": over the non-ignored count)
        out.z_loss = out.loss - reference_loss(e64, c64, x.t, b64, z_loss=0.0, **kw)
    if case.return_acc or case.return_pred:
        y = x.t[..., case.shift:].long()
        valid = y != case.ignore_index
        top = reference_argmax(e64.detach(), c64.detach(), bias=None if b64 is None else b64.detach(),
                               softcap=case.softcap, shift=case.shift)
        pred = torch.where(valid, top, -1)
        hit = (valid & (pred == y)).float()
        out.token_accuracy = hit if case.reduction == "none" else hit.sum() / valid.sum().clamp(min=1)
        out.predicted_tokens = pred
    grads = _grads(_objective(case, out), list(ref.values()))
    return out, [g.to(q.dtype) for g, q in zip(grads, x.leaves)]


def test_the_sample_covers_every_path():
    """Every case asserts which path its default call ran (== expected_fast_path), so these counts
    are what a passing run exercised."""
    triton = Counter(expected_fast_path(k) for k in CASES if k.impl == "triton")
    forced = Counter(expected_fast_path(k) for k in CASES if k.impl == "torch")
    assert triton["held"] >= 10 and triton["chunked"] >= 4 and triton["memory-first"] >= 1, triton
    assert forced["held"] >= 3, forced
    for field in ("bias", "softcap", "label_smoothing", "z_loss", "weights", "shift", "int32_targets", "strided_e",
                  "return_z", "return_acc", "return_pred", "reference"):
        assert any(getattr(k, field) for k in CASES) and not all(getattr(k, field) for k in CASES), field
    for field, values in (("reduction", {"mean", "sum", "none"}), ("grads", {"e", "c", "both"}),
                          ("ignore", {"none", "some", "all"}), ("v", {1, 7, 30, 70}), ("d", {5, 16, 24}),
                          ("n", {1, 3, 15, 17, 37})):
        assert {getattr(k, field) for k in CASES} == values, field
    assert any(k.chunk_tokens is not None and k.chunk_tokens >= k.n for k in CASES)  # the held boundary


def test_compared_predictions_are_clear_of_rounding():
    """The cases that compare predicted tokens or accuracies exactly (the two modes, and the
    float64 reference) need every token's top two logits further apart than float32 rounding
    (≈ 1e-6 relative) could move them, or the argmax would depend on each mode's (and each
    BLAS's) order of summation: the smallest gap in the sample is 7.6e-5 of the largest logit."""
    gaps = []
    for case in CASES:
        if not (case.return_pred or case.return_acc) or case.v == 1:
            continue
        x = _inputs(case)
        e = x.e.detach().double()
        e = e[..., :-case.shift, :] if case.shift else e
        z = e.reshape(-1, case.d) @ x.c.detach().double().T
        if x.b is not None:
            z = z + x.b.detach().double()
        if case.softcap:
            z = case.softcap * torch.tanh(z / case.softcap)
        top2 = z.topk(2, dim=1).values
        gaps.append(((top2[:, 0] - top2[:, 1]) / z.abs().amax(1)).min().item())
    assert len(gaps) >= 20 and min(gaps) > 1e-5, min(gaps)


# the cases that compare predicted tokens / accuracies exactly: run again under another BLAS (.ci/run)
@pytest.mark.parametrize("case", [pytest.param(k, marks=pytest.mark.exact) if k.return_pred or k.return_acc else k
                                  for k in CASES], ids=str)
def test_default_matches_memory_first(case: Case, monkeypatch):
    fast = CountFast(monkeypatch)
    x = _inputs(case)
    args = (x.e, x.c, x.b, x.t, x.w)
    tol, floor = MODE_TOL[case.dtype], _floor(case, x)

    memory = _call(case, *args, False)
    assert fast_path_of(memory.loss) == "memory-first" and fast.calls == 0
    memory_grads = _grads(_objective(case, memory), x.leaves)

    default = _call(case, *args, "default")
    want = expected_fast_path(case) if case.impl == "triton" else "memory-first"
    assert fast_path_of(default.loss) == want and fast.paths == ([] if want == "memory-first" else [want]), \
        (fast_path_of(default.loss), fast.paths, want)
    default_grads = _grads(_objective(case, default), x.leaves)
    _compare("default vs memory-first", case, default, memory, default_grads, memory_grads, tol, x.names, floor)

    if case.impl == "torch" and expected_fast_path(case) != "memory-first":
        # the torch backend's default is the memory-first mode: its fast paths where "auto" takes them on Triton
        fast.clear()
        forced = _call(case, *args, True)
        assert fast.paths == [expected_fast_path(case)] and fast_path_of(forced.loss) == expected_fast_path(case)
        forced_grads = _grads(_objective(case, forced), x.leaves)
        _compare("grad_in_forward=True vs memory-first", case, forced, memory, forced_grads, memory_grads, tol,
                 x.names, floor)

    if case.reference:
        ref, ref_grads = _reference(case, x)
        _compare("memory-first vs float64", case, memory, ref, memory_grads, ref_grads, REF_TOL[case.dtype], x.names,
                 floor)


# ---- edge cases

CHUNKS = Tuning(fast_chunk_tokens=3)  # forces the token-chunked path at N > 3
PATHS = {"held": None, "chunked": CHUNKS}


def _small_inputs(n=9, d=16, v=30, bias=False):
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
    e, c, _, t = _small_inputs()
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
    e, c, _, t = _small_inputs()
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
    e, c, b, t = _small_inputs(bias=True)

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
    e, c, b, t = _small_inputs(bias=True)
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
    e, c, _, t = _small_inputs()
    loss = linear_cross_entropy(e, c, t, impl="triton", tuning=PATHS[path])
    assert fast_path_of(loss) == path
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once.*pass grad_in_forward=False"):
        loss.backward()


def test_default_backward_twice_names_the_way_out(seed):
    """The default ("auto") is the fast mode on the Triton backend: a second backward is refused with
    the argument that allows it, and grad_in_forward=False does allow it."""
    e, c, _, t = _small_inputs(8, 4, 9)
    loss = linear_cross_entropy(e, c, t, impl="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="default 'auto'.*pass grad_in_forward=False"):
        loss.backward()
    loss = linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=False)
    loss.backward(retain_graph=True)
    loss.backward()


@pytest.mark.parametrize("impl", ["triton", "triton_exact", "torch"])
@pytest.mark.parametrize("mode", ["default", False, "chunked"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_empty_batch_gives_zero_gradients(impl, mode, reduction, seed):
    """N = 0 tokens: a zero loss and exactly zero dC and dbias in every mode (the memory-first
    Triton backward once left dC unwritten: whatever the allocator held)."""
    _, c, b, _ = _small_inputs(bias=True)
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
    e, c, b, t = _small_inputs(bias=True)
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
    e, c, b, t = _small_inputs(bias=True)
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
    e, c, b, t = _small_inputs(bias=True)
    kw = dict(impl="triton", reduction="none", label_smoothing=0.1, z_loss=1e-3, return_token_accuracy=True)
    want = linear_cross_entropy(e, c, t, b, grad_in_forward=False, **kw)
    if context == "nothing requires grad":
        got = linear_cross_entropy(e.detach(), c.detach(), t, b.detach(), **kw)
    else:
        with getattr(torch, context)():
            got = linear_cross_entropy(e, c, t, b, **kw)
    assert fast.calls == 0 and fast_path_of(got.loss) == "no autograd"
    assert torch.allclose(got.loss, want.loss, rtol=1e-6) and torch.equal(got.token_accuracy, want.token_accuracy)
