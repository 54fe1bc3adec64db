"""`dc_accumulate_into` on the memory-first path (grad_in_forward=False): the backward adds c's
gradient into the target itself, chunk by chunk (the triton backend: each vocabulary chunk's Gᵀ·E
by one float32-output product, custom op `triton_backward_into`), returns none for c, forms no
[V, D] dC tensor and leaves the target's padding rows alone.

Against float64 over two micro-batches (torch and triton backends; float32, bf16, float16), with
filter_eps (the block-sparse product accumulating), a backward with create_graph=True (dC formed
and added), torch.compile, a memory check (the torch profiler's allocations: no dC-sized block),
and two gloo ranks, vocabulary parallel and sequence parallel; the same for the token chunks of
`Tuning(dc_into_by_tokens=True)` (each over the whole vocabulary, with the options its logit
gradient carries). impl="triton" runs under TRITON_INTERPRET=1 on CPU.
"""

from __future__ import annotations

import pytest
import torch

from support import interpreter
from support.process_groups import failures, run_group
from support.reference import reference_loss, rel_err
from vocab_parallel_cce import Tuning, linear_cross_entropy
from vocab_parallel_cce.backends.triton.common import counters

interpreter.on_cpu_only()

VOCAB = 40  # of V = 45 rows: rows [40, 45) are padding


def _inputs(n, d, v, dtype, bias=False, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g)
    c = torch.randn(v, d, generator=g) * scale / d**0.5
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    t = torch.randint(0, VOCAB, (n,), generator=g)
    t[::4] = -100
    return [x.to(dtype).requires_grad_() if x is not None else None for x in (e, c, b)], t


def _grads64(leaves, t, up, **kw):
    """float64 (dE, dC, dbias) of Σ up·loss at the inputs' values."""
    leaves64 = [None if x is None else x.detach().double().requires_grad_() for x in leaves]
    loss = reference_loss(*leaves64[:2], t, leaves64[2], **kw)
    want = [x for x in leaves64 if x is not None]
    return torch.autograd.grad((loss * up).sum(), want)


CASES = [("torch", torch.float32), ("torch", torch.bfloat16), ("triton", torch.float32),
         ("triton", torch.bfloat16), ("triton", torch.float16)]
# ‖target − before − 2·dC64‖ / ‖2·dC64‖: float32 accumulation; bf16 G's rounding (the interpreter
# truncates it) for bf16 on the triton backend
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-5}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 3e-3}  # dE, dbias: in the input dtype


@pytest.mark.parametrize("impl,dtype", CASES, ids=[f"{i}-{str(d).split('.')[-1]}" for i, d in CASES])
def test_adds_into_a_float32_target(impl, dtype, seed):
    """Two micro-batches: the target gains 2·dC (float64 reference), its padding rows nothing, c
    no gradient; e and the bias get theirs as without a target. On the triton backend every
    backward takes the direct route and G never lives in a dC."""
    n, d, v = 27, 16, 45
    leaves, t = _inputs(n, d, v, dtype, bias=True)
    e, c, b = leaves
    kw = dict(reduction="none", label_smoothing=0.1, vocab_size=VOCAB)
    up = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5  # per token, not uniform
    target = torch.randn(v, d) * 0.1
    before = target.clone()
    for _ in range(2):
        loss = linear_cross_entropy(e, c, t, b, impl=impl, grad_in_forward=False, dc_accumulate_into=target, **kw)
        (loss * up).sum().backward()
        assert c.grad is None
    de64, dc64, db64 = _grads64(leaves, t, up, **kw)
    err = rel_err(target - before, 2 * dc64)
    assert err < TOL[dtype], err
    assert torch.equal(target[VOCAB:], before[VOCAB:])  # padding rows: nothing added
    assert rel_err(e.grad, 2 * de64) < GRAD_TOL[dtype]
    assert rel_err(b.grad, 2 * db64) < GRAD_TOL[dtype]
    if impl == "triton":
        assert counters["dc_into_direct"] == 2 and counters["g_in_dc"] == 0, dict(counters)
    if dtype == torch.bfloat16:  # the returned bf16 dC is rounded once more than the float32 target
        loss = linear_cross_entropy(e, c, t, b, impl=impl, grad_in_forward=False, **kw)
        dc, = torch.autograd.grad((loss * up).sum(), (c,))
        assert dc.dtype == dtype and err < rel_err(dc, dc64), (err, rel_err(dc, dc64))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_every_token_ignored_adds_nothing(impl, seed):
    leaves, t = _inputs(9, 16, 45, torch.float32)
    e, c, _ = leaves
    target = torch.randn(45, 16)
    before = target.clone()
    linear_cross_entropy(e, c, torch.full_like(t, -100), impl=impl, grad_in_forward=False, reduction="sum",
                         dc_accumulate_into=target).backward()
    assert c.grad is None and torch.equal(target, before)


def test_filter_eps_accumulates_the_kept_tiles(seed):
    """filter_eps on the triton backend: the block-sparse product accumulates into the target; the
    same tiles are skipped as without a target (the same sum, up to the add's float32 rounding),
    and some are (the result differs from the dense one, by little)."""
    n, d, v, vocab = 48, 16, 100, 96
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g).requires_grad_()
    c = (torch.randn(v, d, generator=g) / d**0.5).requires_grad_()
    b = torch.full((v,), -20.0)
    b[:16] = 0.0  # the softmax lives in the first vocabulary tile: the others are negligible
    t = torch.randint(0, 16, (n,), generator=g)
    kw = dict(impl="triton", grad_in_forward=False, reduction="sum", vocab_size=vocab)
    target = torch.randn(v, d, generator=g)
    before = target.clone()
    linear_cross_entropy(e, c, t, b, filter_eps=2.0**-12, dc_accumulate_into=target, **kw).backward()
    assert c.grad is None
    assert counters["dc_into_direct"] == 1 and counters["sparse_dc"] >= 1, dict(counters)
    dc_filtered, = torch.autograd.grad(linear_cross_entropy(e, c, t, b, filter_eps=2.0**-12, **kw), (c,))
    dc_dense, = torch.autograd.grad(linear_cross_entropy(e, c, t, b, **kw), (c,))
    assert rel_err(target - before, dc_filtered) < 1e-6
    assert torch.equal(target[vocab:], before[vocab:])
    assert not dc_filtered[16:vocab].any() and dc_dense[16:vocab].any()  # the skipped tiles
    assert rel_err(dc_filtered, dc_dense) < 1e-4


def test_create_graph_forms_dc_and_adds_it(seed):
    """A backward with create_graph=True (grad mode on): the triton backend forms dC and adds it
    (the op that mutates the target has no double-backward error to give); the target gets the
    same gradient and a second differentiation meets the clear error."""
    leaves, t = _inputs(19, 16, 45, torch.float32, bias=True)
    e, c, b = leaves
    target = torch.zeros(45, 16)
    loss = linear_cross_entropy(e, c, t, b, impl="triton", grad_in_forward=False, vocab_size=VOCAB,
                                dc_accumulate_into=target)
    de, dc = torch.autograd.grad(loss, (e, c), create_graph=True, allow_unused=True)
    assert dc is None and counters["dc_into_direct"] == 0, dict(counters)
    _, dc64, _ = _grads64(leaves, t, 1.0, vocab_size=VOCAB)
    assert rel_err(target, dc64) < 1e-5 and not target[VOCAB:].any()
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(de.sum(), (e,))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_torch_compile(impl, seed):
    """Under torch.compile the call with a target runs its statistics eagerly (a graph break) and
    adds the same gradient."""
    torch._dynamo.reset()
    leaves, t = _inputs(16, 16, 45, torch.float32, bias=True)
    e, c, b = leaves
    target = torch.zeros(45, 16)

    def fn(e, c, t, b):
        return linear_cross_entropy(e, c, t, b, impl=impl, grad_in_forward=False, vocab_size=VOCAB, z_loss=1e-3,
                                    dc_accumulate_into=target)

    torch.compile(fn, backend="aot_eager")(e, c, t, b).backward()
    _, dc64, _ = _grads64(leaves, t, 1.0, vocab_size=VOCAB, z_loss=1e-3)
    assert c.grad is None and rel_err(target, dc64) < 1e-5


def _largest_backward_allocation(loss) -> int:
    """Bytes of the largest block the torch allocator hands out during loss.backward() (the
    profiler's per-op memory; CPU tensors)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    return max(ev.self_cpu_memory_usage for ev in prof.events())


def test_no_dc_tensor_is_allocated(seed):
    """bf16 on the triton backend: with a float32 target the backward allocates nothing as large as
    a bf16 dC (V·D·2 bytes; G's workspace is N·V·2 and the float32 dE N·D·4, both smaller here);
    without one it does (the check sees dC)."""
    n, d, v = 16, 32, 256
    leaves, t = _inputs(n, d, v, torch.bfloat16)
    e, c, _ = leaves
    dc_bytes = v * d * 2
    target = torch.zeros(v, d)
    loss = linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=False, dc_accumulate_into=target)
    largest = _largest_backward_allocation(loss)
    assert largest < dc_bytes, (largest, dc_bytes)
    assert counters["dc_into_direct"] == 1 and target.abs().sum() > 0
    loss = linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=False)
    assert _largest_backward_allocation(loss) >= dc_bytes


# ---- two gloo ranks: vocabulary parallel (padding on the last shard) and sequence parallel


def _two_rank_worker(rank: int, world: int, seed: int):
    import torch.distributed as dist

    interpreter.patch_bf16_dot()
    results = []
    n, d, v_total, vocab = 12, 16, 32, 30  # 16 rows per rank; rank 1's last two are padding
    rows = v_total // world
    by_tokens = Tuning(dc_into_by_tokens=True, chunk_bytes=1, min_chunk_columns=1)
    for name, impl, dtype, sp, tol, tuning in (("vp/torch-fp32", "torch", torch.float32, False, 1e-5, None),
                                               ("vp/triton-fp32", "triton", torch.float32, False, 1e-5, None),
                                               ("vp/triton-bf16", "triton", torch.bfloat16, False, 1e-2, None),
                                               ("sp/triton-fp32", "triton", torch.float32, True, 1e-5, None),
                                               ("vp/tokens-bf16", "triton", torch.bfloat16, False, 1e-2, by_tokens),
                                               ("sp/tokens-fp32", "triton", torch.float32, True, 1e-5, by_tokens)):
        try:
            g = torch.Generator().manual_seed(seed)
            e_all = torch.randn(world * n, d, generator=g).to(dtype)
            c_all = (torch.randn(v_total, d, generator=g) * 0.5).to(dtype)
            t_all = torch.randint(0, vocab, (world * n,), generator=g)
            t_all[::5] = -100
            up = torch.rand(world * n, generator=g) + 0.5
            e, t = e_all, t_all
            if sp:  # this rank's tokens; the loss of each rank covers all of them
                e, t = e_all[rank * n:(rank + 1) * n], t_all[rank * n:(rank + 1) * n]
            e = e.clone().requires_grad_()
            c = c_all[rank * rows:(rank + 1) * rows].clone().requires_grad_()
            target = torch.randn(rows, d, generator=torch.Generator().manual_seed(rank))
            before = target.clone()
            counters.clear()
            loss = linear_cross_entropy(e, c, t, impl=impl, grad_in_forward=False, reduction="none",
                                        group=dist.group.WORLD, vocab_size=vocab, sequence_parallel=sp,
                                        filter_eps=None, dc_accumulate_into=target, tuning=tuning)
            (loss * up).sum().backward()
            e64, c64 = e_all.double().requires_grad_(), c_all.double().requires_grad_()
            de64, dc64 = torch.autograd.grad((reference_loss(e64, c64, t_all, reduction="none", vocab_size=vocab)
                                              * up).sum(), (e64, c64))
            mine = slice(rank * rows, (rank + 1) * rows)
            err = rel_err(target - before, dc64[mine])
            assert c.grad is None, "c got a gradient"
            assert err < tol, f"dC error {err}"
            assert torch.equal(target[vocab - rank * rows:], before[vocab - rank * rows:]), "padding rows changed"
            de_err = rel_err(e.grad, de64[rank * n:(rank + 1) * n] if sp else de64)
            assert de_err < (2e-5 if dtype == torch.float32 else 1.2e-2), f"dE error {de_err}"
            if impl == "triton":
                route = "dc_into_by_tokens" if tuning is by_tokens else "dc_into_direct"
                assert counters[route] == 1, dict(counters)
            results.append((name, True, ""))
        except AssertionError as exc:
            results.append((name, False, str(exc)))
    return results


def test_two_ranks(seed):
    results = run_group(_two_rank_worker, 2, seed)
    bad = failures(results)
    assert not bad, "\n".join(bad)
    assert sorted(results) == [0, 1] and all(len(r) == 6 for r in results.values()), results


BY_TOKENS = Tuning(dc_into_by_tokens=True, chunk_bytes=1, min_chunk_columns=1)  # 16-token chunks at N = 27
OPTIONS = [  # the options the logit gradient's kernel carries, one set per case
    dict(reduction="none", label_smoothing=0.1),
    dict(reduction="mean", softcap=20.0, z_loss=1e-3),
    dict(reduction="sum", label_smoothing=0.1, class_weights=torch.linspace(0.5, 1.5, VOCAB)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("options", OPTIONS, ids=["smoothing", "softcap+zloss", "class-weights"])
def test_token_chunks_add_into_the_target(dtype, options, seed):
    """Tuning(dc_into_by_tokens=True): two token chunks of 16 and 11 tokens, each over the whole
    vocabulary; over two micro-batches the target gains 2·dC (float64), its padding rows nothing,
    and e and the bias get theirs, as through the vocabulary chunks."""
    n, d, v = 27, 16, 45
    leaves, t = _inputs(n, d, v, dtype, bias=True, seed=seed)
    e, c, b = leaves
    kw = dict(options, vocab_size=VOCAB)
    up = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5 if kw["reduction"] == "none" else 1.0
    target = torch.randn(v, d) * 0.1
    before = target.clone()
    counters.clear()
    for _ in range(2):
        loss = linear_cross_entropy(e, c, t, b, impl="triton", grad_in_forward=False, dc_accumulate_into=target,
                                    tuning=BY_TOKENS, **kw)
        (loss * up).sum().backward()
        assert c.grad is None
    assert counters["dc_into_by_tokens"] == 2 and counters["dc_into_direct"] == 0, dict(counters)
    de64, dc64, db64 = _grads64(leaves, t, up, **kw)
    err = rel_err(target - before, 2 * dc64)
    assert err < TOL[dtype], err
    assert torch.equal(target[VOCAB:], before[VOCAB:])
    assert rel_err(e.grad, 2 * de64) < GRAD_TOL[dtype]
    assert rel_err(b.grad, 2 * db64) < GRAD_TOL[dtype]


def test_token_chunks_with_every_token_ignored_add_nothing(seed):
    leaves, t = _inputs(9, 16, 45, torch.bfloat16, seed=seed)
    e, c, _ = leaves
    target = torch.randn(45, 16)
    before = target.clone()
    linear_cross_entropy(e, c, torch.full_like(t, -100), impl="triton", grad_in_forward=False, reduction="sum",
                         dc_accumulate_into=target, tuning=BY_TOKENS).backward()
    assert c.grad is None and torch.equal(target, before)
    assert e.grad is not None and not e.grad.any()


def test_token_chunks_give_way_to_dc_skipping(seed):
    """dC tile skipping needs the vocabulary chunks' flags: with filter_eps the vocabulary chunks run."""
    leaves, t = _inputs(27, 16, 45, torch.float32, seed=seed)
    e, c, _ = leaves
    target = torch.zeros(45, 16)
    counters.clear()
    linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=False, filter_eps=2.0**-12,
                         dc_accumulate_into=target, tuning=BY_TOKENS).backward()
    assert counters["dc_into_by_tokens"] == 0 and counters["dc_into_direct"] == 1, dict(counters)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_token_chunks_place_g_in_de_rows_not_yet_written(dtype, seed):
    """With dE rows wide enough (D = 64), the first token chunks' G lives in dE's unwritten rows and
    the last in the workspace; the gradients stay those of float64."""
    n, d, v = 64, 64, 45
    leaves, t = _inputs(n, d, v, dtype, seed=seed)
    e, c, _ = leaves
    target = torch.zeros(v, d)
    counters.clear()
    loss = linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=False, vocab_size=VOCAB,
                                dc_accumulate_into=target, tuning=BY_TOKENS)
    loss.backward()
    assert counters["g_in_de"] >= 1 and counters["g_in_workspace"] >= 1, dict(counters)
    de64, dc64 = _grads64(leaves, t, 1.0, vocab_size=VOCAB)
    assert rel_err(target, dc64) < TOL[dtype]
    assert rel_err(e.grad, de64) < GRAD_TOL[dtype]
