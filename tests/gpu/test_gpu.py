"""GPU tests (skipped without CUDA): Triton path at real sizes against float64, torch.compile,
CUDA-graph capture, autocast. Run them in their own pytest process
(`pytest tests/gpu/test_gpu.py`): the interpreter tests switch TRITON_INTERPRET on for the process
that imports them.
"""

from __future__ import annotations

import os

import pytest
import torch

from support.reference import rel_err
from vocab_parallel_cce import Tuning, linear_cross_entropy

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _compiled_kernels():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: run tests/gpu/test_gpu.py on its own")


def _inputs(n, d, v, dtype, kind, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if kind == "random":
        e = torch.randn(n, d, device="cuda", generator=g)
        c = torch.randn(v, d, device="cuda", generator=g) * 2.0 / d**0.5
        t = torch.randint(0, v, (n,), device="cuda", generator=g)
    else:  # trained-like: a Zipf prior along a shared direction, boosted targets
        logp = -1.1 * torch.log(torch.arange(1, v + 1, device="cuda", dtype=torch.float32))
        logp -= torch.logsumexp(logp, 0)
        t = torch.multinomial(logp.exp(), n, replacement=True, generator=g)
        u = torch.randn(d, device="cuda", generator=g)
        u /= u.norm()
        w = torch.randn(v, d, device="cuda", generator=g) / d**0.5
        c = logp[:, None] * u + w
        e = u + 8.0 * w[t]
    return e.to(dtype), c.to(dtype), t


def _logits64(e, c, bias=None, softcap=None):
    """float64 leaves (e, c[, bias]) and the (softcapped) logits materialised from them."""
    ins = [x.detach().double().requires_grad_() for x in (e, c) + (() if bias is None else (bias,))]
    z = ins[0] @ ins[1].T
    if bias is not None:
        z = z + ins[2]
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return ins, z


def _reference(e, c, t, bias=None, softcap=None, ls=0.0, zl=0.0, reduction="mean"):
    ins, z = _logits64(e, c, bias, softcap)
    loss = torch.nn.functional.cross_entropy(z, t, label_smoothing=ls, reduction="none")
    loss = torch.where(t == -100, 0.0, loss + zl * torch.logsumexp(z, -1) ** 2)
    loss = loss.sum() / (t != -100).sum() if reduction == "mean" else loss.sum()
    return loss.detach(), torch.autograd.grad(loss, ins)


CASES = [
    # n, d, v, dtype, impl, kind, bias, softcap, label_smoothing, z_loss
    (2000, 1000, 30011, torch.bfloat16, "triton", "random", False, None, 0.0, 0.0),
    (2000, 1000, 30011, torch.bfloat16, "triton", "zipf", False, None, 0.0, 0.0),
    (1537, 768, 50257, torch.bfloat16, "triton", "zipf", True, 30.0, 0.1, 1e-4),
    (1537, 768, 50257, torch.float16, "triton", "random", True, None, 0.0, 0.0),
    (999, 520, 9999, torch.float32, "triton", "random", True, 20.0, 0.0, 1e-3),
    (999, 520, 9999, torch.float32, "triton_exact", "random", True, 20.0, 0.1, 0.0),
    (2048, 1024, 32000, torch.bfloat16, "triton_exact", "zipf", False, None, 0.0, 0.0),
    (1, 256, 5000, torch.bfloat16, "triton", "random", False, None, 0.0, 0.0),
]


@pytest.mark.parametrize("mode", [True, False], ids=["fast", "memory-first"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}-{c[4]}-{c[5]}")
def test_triton_matches_float64(case, mode):
    n, d, v, dtype, impl, kind, has_bias, softcap, ls, zl = case
    e, c, t = _inputs(n, d, v, dtype, kind, seed=n + v)
    if n > 1:
        t[::13] = -100
    bias = (torch.randn(v, device="cuda") * 0.3).to(dtype) if has_bias else None
    leaves = [x.clone().requires_grad_() for x in (e, c) + (() if bias is None else (bias,))]
    loss = linear_cross_entropy(leaves[0], leaves[1], t, leaves[2] if has_bias else None, softcap=softcap,
                                label_smoothing=ls, z_loss=zl, impl=impl, grad_in_forward=mode)
    grads = torch.autograd.grad(loss, leaves)
    ref, ref_grads = _reference(e, c, t, bias, softcap, ls, zl)
    grad_tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}[dtype]
    exact_fp32 = impl == "triton_exact" and dtype == torch.float32
    # the fast mode keeps bf16 logits, as the unfused layer: ~2^-9·|z| per token's loss
    fast_bf16 = mode is True and dtype == torch.bfloat16 and impl == "triton"
    loss_tol = 1e-6 if exact_fp32 else (3e-3 if n == 1 else 5e-4) if fast_bf16 else 1e-4
    assert rel_err(loss.double(), ref) < loss_tol
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert rel_err(g.double(), rg) < grad_tol


GIF_CASES = [c for c in CASES if c[0] > 1 and c[4] == "triton"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", GIF_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}-{c[5]}")
def test_grad_in_forward_matches_float64(case, reduction):
    """"none": the per-token losses reduced as Megatron's loss function does, sum(loss·mask)/count."""
    n, d, v, dtype, impl, kind, has_bias, softcap, ls, zl = case
    tuning = Tuning(fast_chunk_tokens=640)  # several chunks, the last partial
    e, c, t = _inputs(n, d, v, dtype, kind, seed=n + v + 1)
    t[::13] = -100
    bias = (torch.randn(v, device="cuda") * 0.3).to(dtype) if has_bias else None
    leaves = [x.clone().requires_grad_() for x in (e, c) + (() if bias is None else (bias,))]
    loss = linear_cross_entropy(leaves[0], leaves[1], t, leaves[2] if has_bias else None, softcap=softcap,
                                label_smoothing=ls, z_loss=zl, reduction=reduction, grad_in_forward=True,
                                tuning=tuning)
    if reduction == "none":
        mask = (t != -100).float()
        loss = (loss * mask).sum() / mask.sum()
    grads = torch.autograd.grad(loss * 0.5, leaves)
    ref, ref_grads = _reference(e, c, t, bias, softcap, ls, zl, "sum" if reduction == "sum" else "mean")
    grad_tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}[dtype]
    # bf16 logits (as the unfused layer's): the loss's error reaches ~1e-4 on confident (zipf) tokens
    assert rel_err(loss.double(), ref) < (5e-4 if dtype == torch.bfloat16 else 1e-4)
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert rel_err(2.0 * g.double(), rg) < grad_tol


def test_filtering_keeps_bf16_resolution_on_trained_like_data():
    e, c, t = _inputs(4096, 1024, 64000, torch.bfloat16, "zipf", seed=7)
    leaves = [x.clone().requires_grad_() for x in (e, c)]
    grads = torch.autograd.grad(linear_cross_entropy(*leaves, t, filter_eps=2.0**-12, grad_in_forward=False), leaves)
    _, ref_grads = _reference(e, c, t)
    errs = [rel_err(g.double(), rg) for g, rg in zip(grads, ref_grads)]
    assert errs[0] < 8e-3 and errs[1] < 8e-3, errs


@pytest.mark.parametrize("gif", [False, True, "auto"], ids=["memory-first", "grad_in_forward", "auto"])
def test_torch_compile_gives_the_same_loss_and_grads(gif):
    e, c, t = _inputs(1024, 512, 20000, torch.bfloat16, "random", seed=3)

    def step(e, c, t):
        loss = linear_cross_entropy(e, c, t, impl="triton", z_loss=1e-4, grad_in_forward=gif)
        return loss, *torch.autograd.grad(loss, (e, c))

    ins = [x.clone().requires_grad_() for x in (e, c)]
    compiled = torch.compile(step)(*ins, t)
    if gif == "auto":  # while torch.compile traces, "auto" is the memory-first mode
        gif = False
    eager = step(*ins, t)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b) or rel_err(a.double(), b.double()) < 1e-6


def test_cuda_graph_capture_and_replay():
    e, c, t = _inputs(1024, 512, 20000, torch.bfloat16, "zipf", seed=5)
    e, c = e.requires_grad_(), c.requires_grad_()

    def step():
        e.grad = c.grad = None
        linear_cross_entropy(e, c, t).backward()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    expect = (e.grad.clone(), c.grad.clone())
    graph = torch.cuda.CUDAGraph()
    e.grad = c.grad = None
    with torch.cuda.graph(graph):
        loss = linear_cross_entropy(e, c, t)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(e.grad, expect[0]) and torch.equal(c.grad, expect[1])


def test_autocast_bf16_with_fp32_parameters():
    e, c, t = _inputs(777, 256, 10000, torch.float32, "random", seed=11)
    e, c = e.requires_grad_(), c.requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(e, c, t)
    ge, gc = torch.autograd.grad(loss, (e, c))
    assert ge.dtype == gc.dtype == torch.float32
    ref, (rge, rgc) = _reference(e.bfloat16(), c.bfloat16(), t)
    assert rel_err(loss.double(), ref) < 1e-4
    assert rel_err(ge.double(), rge) < 1.5e-2 and rel_err(gc.double(), rgc) < 1.5e-2


def _twice_without_host_sync(run):
    """run() once (compilation, the cuBLAS probe), then again with any host synchronisation an error."""
    run()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_no_host_sync_on_the_default_path():
    """The default (the fast mode) and the memory-first mode."""
    e, c, t = _inputs(1024, 512, 20000, torch.bfloat16, "random", seed=13)
    e, c = e.requires_grad_(), c.requires_grad_()

    def run():
        linear_cross_entropy(e, c, t, label_smoothing=0.1).backward()
        linear_cross_entropy(e, c, t).backward()
        linear_cross_entropy(e, c, t, z_loss=1e-4, grad_in_forward=True).backward()
        linear_cross_entropy(e, c, t, grad_in_forward=False).backward()
        linear_cross_entropy(e, c, t, label_smoothing=0.1, grad_in_forward=False).backward()

    _twice_without_host_sync(run)


def test_auto_filter_measures_then_skips_without_host_sync():
    """filter_eps="auto": the first backward runs dense and measures; once that measurement has
    reached the host (here: after a synchronize), backwards skip the negligible dC tiles, without
    any host synchronisation of their own."""
    from vocab_parallel_cce import triton_backend as TB

    TB.skip_policy.reset()
    g = torch.Generator(device="cuda").manual_seed(17)
    n, d, v = 2048, 256, 20000
    e = torch.randn(n, d, device="cuda", generator=g)
    e[:, 0] = 10.0
    c = torch.randn(v, d, device="cuda", generator=g) * 0.3
    c[:, 0] = 0.0
    c[2048:, 0] = -4.0  # vocabulary rows 2048.. are negligible for every token
    t = torch.randint(0, 2048, (n,), device="cuda", generator=g)
    e, c = e.bfloat16().requires_grad_(), c.bfloat16().requires_grad_()
    _, gc1 = torch.autograd.grad(linear_cross_entropy(e, c, t, grad_in_forward=False, filter_eps="auto"), (e, c))
    assert gc1[2048:].any()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, gc2 = torch.autograd.grad(linear_cross_entropy(e, c, t, grad_in_forward=False, filter_eps="auto"), (e, c))
        _, gc_default = torch.autograd.grad(linear_cross_entropy(e, c, t, grad_in_forward=False), (e, c))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not gc2[2048:].any()
    assert gc_default[2048:].any()  # the default never skips
    _, (_, rgc) = _reference(e.detach(), c.detach(), t)
    assert rel_err(gc2.double(), rgc) < 8e-3


@pytest.mark.parametrize("kind", ["random", "zipf"])
def test_fast_gradients_are_as_close_as_the_unfused_layers(kind):
    """The fast mode keeps bf16 logits, as the unfused bf16 layer does: its dE and dC
    stay within 1.25× the unfused layer's own error against float64, in one chunk and in several."""
    e, c, t = _inputs(4096, 1024, 50000, torch.bfloat16, kind, seed=23)
    t[::7] = -100
    _, (rge, rgc) = _reference(e, c, t)
    ins = [x.clone().requires_grad_() for x in (e, c)]
    unfused = torch.nn.functional.cross_entropy((ins[0] @ ins[1].T).float(), t)
    ue, uc = torch.autograd.grad(unfused, ins)
    base = rel_err(ue.double(), rge), rel_err(uc.double(), rgc)
    for tuning in (Tuning(), Tuning(fast_chunk_tokens=1536)):
        ge, gc = torch.autograd.grad(linear_cross_entropy(*ins, t, grad_in_forward=True, tuning=tuning), ins)
        errs = rel_err(ge.double(), rge), rel_err(gc.double(), rgc)
        assert errs[0] < 1.25 * base[0] and errs[1] < 1.25 * base[1], (errs, base)


# ---- log-probs and entropy, class weights, token accuracy / predicted tokens, z-loss output


def _reference_rl(e, c, t, bias=None, softcap=None, temperature=1.0):
    """float64 (log_probs, entropy) and their leaves, from materialised logits."""
    ins, z = _logits64(e, c, bias, softcap)
    logp = torch.log_softmax(z / temperature, -1)
    valid = t != -100
    lp = torch.where(valid, logp.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    return lp, ent, ins


RL_CASES = [
    # n, d, v, dtype, impl, kind, bias, softcap, temperature
    (2000, 1000, 30011, torch.bfloat16, "triton", "random", False, None, 1.0),
    (2000, 1000, 30011, torch.bfloat16, "triton", "zipf", True, 30.0, 0.7),
    (1537, 768, 50257, torch.float16, "triton", "random", True, None, 1.3),
    (999, 520, 9999, torch.float32, "triton", "random", True, 20.0, 0.6),
    (999, 520, 9999, torch.float32, "triton_exact", "zipf", False, None, 1.0),
    (1, 256, 5000, torch.bfloat16, "triton", "random", False, None, 1.0),
]


@pytest.mark.parametrize("case", RL_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}-{c[4]}-{c[5]}-T{c[8]}")
def test_log_probs_and_entropy_match_float64(case):
    from vocab_parallel_cce import linear_log_probs

    n, d, v, dtype, impl, kind, has_bias, softcap, temp = case
    e, c, t = _inputs(n, d, v, dtype, kind, seed=n + v + 5)
    if n > 1:
        t[::11] = -100
    bias = (torch.randn(v, device="cuda") * 0.3).to(dtype) if has_bias else None
    leaves = [x.clone().requires_grad_() for x in (e, c) + (() if bias is None else (bias,))]
    lp, ent = linear_log_probs(leaves[0], leaves[1], t, bias=leaves[2] if has_bias else None, softcap=softcap,
                               temperature=temp, impl=impl)
    rlp, rent, rins = _reference_rl(e, c, t, bias, softcap, temp)
    g = torch.Generator(device="cuda").manual_seed(1)
    w1 = torch.randn(n, device="cuda", generator=g, dtype=torch.float64)
    w2 = torch.randn(n, device="cuda", generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((lp.double() * w1).sum() + (ent.double() * w2).sum(), leaves)
    ref_grads = torch.autograd.grad((rlp * w1).sum() + (rent * w2).sum(), rins)
    out_tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    grad_tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}[dtype]
    assert lp.dtype == ent.dtype == torch.float32
    assert rel_err(lp.double(), rlp) < out_tol and rel_err(ent.double(), rent) < out_tol
    for name, gr, rg in zip("e c bias".split(), grads, ref_grads):
        assert torch.isfinite(gr).all(), name
        assert rel_err(gr.double(), rg) < grad_tol, (name, rel_err(gr.double(), rg))


@pytest.mark.parametrize("mode", ["auto", False], ids=["auto", "memory-first"])
@pytest.mark.parametrize("ls,zl", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-4)])
def test_class_weights_match_f_cross_entropy(mode, ls, zl):
    n, d, v = 2000, 1000, 30011
    e, c, t = _inputs(n, d, v, torch.bfloat16, "zipf", seed=41)
    t[::13] = -100
    w = torch.rand(v, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)) + 0.1
    leaves = [x.clone().requires_grad_() for x in (e, c)]
    loss = linear_cross_entropy(*leaves, t, class_weights=w, label_smoothing=ls, z_loss=zl, grad_in_forward=mode)
    ins, z = _logits64(e, c)
    ref = torch.nn.functional.cross_entropy(z, t, weight=w.double(), label_smoothing=ls)
    valid = t != -100
    ref = ref + zl * torch.where(valid, torch.logsumexp(z, -1) ** 2, 0.0).sum() / valid.sum()
    ref_grads = torch.autograd.grad(ref, ins)
    assert rel_err(loss.double(), ref) < (5e-4 if mode is not False else 1e-4)  # fast mode: bf16 logits
    for gr, rg in zip(torch.autograd.grad(loss, leaves), ref_grads):
        assert rel_err(gr.double(), rg) < 1.5e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_predicted_tokens_and_accuracy(dtype):
    """The predicted token's float64 logit is the maximum up to the dot products' rounding, and
    exact ties (duplicated rows, far apart in the vocabulary) go to the smallest id."""
    n, d, v = 3000, 512, 40000
    e, c, t = _inputs(n, d, v, dtype, "random", seed=43)
    c = c.clone()
    c[[20001, 39000]] = c[5].clone()
    boost = 30.0 * c[5].float() / c[5].float().norm() ** 2  # every other token: rows 5, 20001, 39000 win, tied
    e = (e.float() + boost * (torch.arange(n, device="cuda") % 2)[:, None]).to(dtype)
    t[::9] = -100
    out = linear_cross_entropy(e, c, t, reduction="none", return_token_accuracy=True, return_predicted_tokens=True,
                               return_z_loss=True, z_loss=1e-4)
    z = e.double() @ c.double().T
    valid = t != -100
    pred = out.predicted_tokens
    assert (pred[~valid] == -1).all() and ((pred[valid] >= 0) & (pred[valid] < v)).all()
    top = z.max(-1).values
    picked = z.gather(1, pred.clamp(min=0)[:, None])[:, 0]
    # bf16: cuBLAS rounds the raw product, and with a bias the stored sum is rounded again: two
    # roundings of each of two values (measured: a gap of 0.0766 at max 8.36, above 2^-7 of it)
    slack = (2.0**-6 if dtype == torch.bfloat16 else 1e-5) * z.abs().max(-1).values
    assert ((top - picked)[valid] <= slack[valid]).all()
    assert not ((pred == 20001) | (pred == 39000)).any() and (pred == 5).sum() > n // 4
    assert torch.equal(out.token_accuracy, (valid & (pred == t)).float())
    lse = torch.logsumexp(z, -1)
    assert rel_err(out.z_loss.double(), torch.where(valid, 1e-4 * lse**2, 0.0)) < 1e-4


def test_no_host_sync_with_log_probs_weights_and_optional_outputs():
    from vocab_parallel_cce import linear_log_probs

    e, c, t = _inputs(1024, 512, 20000, torch.bfloat16, "random", seed=47)
    e, c = e.requires_grad_(), c.requires_grad_()
    w = torch.rand(20000, device="cuda") + 0.5

    def run():
        lp, ent = linear_log_probs(e, c, t, temperature=0.8)
        (lp.sum() + ent.sum()).backward()
        linear_cross_entropy(e, c, t, class_weights=w, label_smoothing=0.1).backward()
        linear_cross_entropy(e, c, t, class_weights=w).backward()
        out = linear_cross_entropy(e, c, t, return_token_accuracy=True, return_predicted_tokens=True,
                                   return_z_loss=True, z_loss=1e-4)
        out.loss.backward()

    _twice_without_host_sync(run)


def test_torch_compile_log_probs():
    from vocab_parallel_cce import linear_log_probs

    e, c, t = _inputs(1024, 512, 20000, torch.bfloat16, "random", seed=53)

    def step(e, c, t):
        lp, ent = linear_log_probs(e, c, t, temperature=0.9)
        out = (lp * 0.3).sum() + (ent * 0.7).sum()
        return lp, ent, *torch.autograd.grad(out, (e, c))

    ins = [x.clone().requires_grad_() for x in (e, c)]
    compiled = torch.compile(step)(*ins, t)
    eager = step(*ins, t)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b) or rel_err(a.double(), b.double()) < 1e-6


# The speed of log-probs and entropy (fwd+bwd at 8192×4096×128256 bf16 against our loss's
# memory-first mode, verl alongside) is measured, not asserted here (benchmarks, not timed tests):
# `python3 benchmarks/run.py rl` (benchmarks/rl_suite.py, documented in benchmarks/README.md), which
# also reports its errors against float64 at the benchmark sizes; linear_log_probs' correctness on
# the GPU is test_log_probs_and_entropy_match_float64 above.


@pytest.mark.parametrize("world", [2, 3])
def test_grad_e_under_tensor_parallelism_over_nccl(world):
    """tests/support/grad_e_precision.py's cases on an NCCL group of `world` GPUs (bf16, N=512,
    D=256, V=8192, compiled kernels): dE at tp=1's error and the same on every rank, which checks what
    the CPU's gloo runs cannot: NCCL's in-place reduce-scatter and all-gather into dE's own
    storage (tp=2; tp=3 takes the float32 all-reduce, 512 tokens not being a multiple of 3), the
    triton backend's float32 dE, and the fast mode's cuBLAS float32-output dE product."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    from support import grad_e_precision
    from support.process_groups import failures, run_group

    results = run_group(grad_e_precision.cuda_worker, world, 900, backend="nccl", timeout_s=300)
    bad = failures(results)
    assert not bad, "\n".join(bad)
    assert all(len(r) == 12 for r in results.values()), {k: len(r) for k, r in results.items()}


# ---- the fast mode's statistics: class-weighted smoothing, z-loss output, accuracy / predicted tokens


FAST_STATS_CASES = [
    # n, d, v, dtype, kind, bias, softcap
    (2000, 1000, 30011, torch.bfloat16, "zipf", True, 30.0),  # stored bf16 logits, written back
    (2000, 1000, 30011, torch.bfloat16, "random", False, None),  # stored bf16 logits, as cuBLAS wrote them
    (1537, 768, 50257, torch.float16, "random", True, None),  # float32 logits; "mean"'s divisors after the products
    (999, 520, 9999, torch.float32, "random", True, 20.0),  # float32 logits
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", FAST_STATS_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}-{c[4]}")
def test_fast_mode_statistics_match_float64(case, reduction):
    """grad_in_forward=True with class weights, label smoothing and a z-loss ("mean": two divisors),
    the z-loss output, token accuracy and predicted tokens, in several token chunks, against float64
    F.cross_entropy(weight=, label_smoothing=) on materialised logits."""
    n, d, v, dtype, kind, has_bias, softcap = case
    e, c, t = _inputs(n, d, v, dtype, kind, seed=n + v + 61)
    t[::13] = -100
    gen = torch.Generator(device="cuda").manual_seed(3)
    bias = (torch.randn(v, device="cuda", generator=gen) * 0.3).to(dtype) if has_bias else None
    w = torch.rand(v, device="cuda", generator=gen) + 0.1
    leaves = [x.clone().requires_grad_() for x in (e, c) + (() if bias is None else (bias,))]
    out = linear_cross_entropy(leaves[0], leaves[1], t, leaves[2] if has_bias else None, softcap=softcap,
                               class_weights=w, label_smoothing=0.1, z_loss=1e-4, reduction=reduction,
                               grad_in_forward=True, tuning=Tuning(fast_chunk_tokens=640), return_z_loss=True,
                               return_token_accuracy=True, return_predicted_tokens=True)
    valid = t != -100
    mask = valid.float()
    ins, z = _logits64(e, c, bias, softcap)
    lse = torch.logsumexp(z, -1)
    ce = torch.nn.functional.cross_entropy(z, t, weight=w.double(), label_smoothing=0.1, reduction="none")
    zl = torch.where(valid, 1e-4 * lse**2, 0.0)
    if reduction == "mean":
        ref = ce.sum() / torch.where(valid, w.double()[t.clamp(min=0)], 0.0).sum() + zl.sum() / valid.sum()
        ref_z, loss = zl.sum() / valid.sum(), out.loss
    elif reduction == "sum":
        ref, ref_z, loss = ce.sum() + zl.sum(), zl.sum(), out.loss
    else:  # per token, then reduced as Megatron does (the fast mode's uniform upstream gradient)
        ref, ref_z = ((ce + zl) * mask).sum() / mask.sum(), zl
        # bf16 logits: each token's loss carries ~2^-9·|z| of rounding (|z| up to 30 here)
        assert rel_err(out.loss.double(), ce + zl) < (1e-2 if dtype == torch.bfloat16 else 1e-4)
        loss = (out.loss * mask).sum() / mask.sum()
    bf16 = dtype == torch.bfloat16  # the fast mode keeps bf16 logits, as the unfused layer
    assert rel_err(loss.double(), ref) < (5e-4 if bf16 else 1e-4)
    assert rel_err(out.z_loss.double(), ref_z) < (1e-2 if bf16 else 1e-4)  # λ·lse²: twice lse's relative error
    pred = out.predicted_tokens
    assert (pred[~valid] == -1).all() and ((pred[valid] >= 0) & (pred[valid] < v)).all()
    picked = z.detach().gather(1, pred.clamp(min=0)[:, None])[:, 0]
    top = z.detach().max(-1).values
    slack = (2.0**-7 if bf16 else 1e-5) * z.detach().abs().max(-1).values
    assert ((top - picked)[valid] <= slack[valid]).all()
    hit = (valid & (pred == t)).float()
    assert torch.equal(out.token_accuracy, hit if reduction == "none" else hit.sum() / valid.sum())
    grads = torch.autograd.grad(loss * 0.5, leaves)
    ref_grads = torch.autograd.grad(ref, ins)
    grad_tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}[dtype]
    for name, g, rg in zip("e c bias".split(), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert rel_err(2.0 * g.double(), rg) < grad_tol, (name, rel_err(2.0 * g.double(), rg))


@pytest.mark.parametrize("with_bias", [False, True], ids=["cuBLAS logits", "written-back logits"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_mode_predicted_tokens_and_ties(dtype, with_bias):
    """The fast mode's argmax: the float64 maximum up to the logits' rounding; exact ties
    (duplicated rows and biases, far apart in the vocabulary) go to the smallest id."""
    n, d, v = 3000, 512, 40000
    e, c, t = _inputs(n, d, v, dtype, "random", seed=67)
    c = c.clone()
    c[[20001, 39000]] = c[5].clone()
    bias = None
    if with_bias:
        bias = (torch.randn(v, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5)) * 0.3).to(dtype)
        bias[[20001, 39000]] = bias[5].clone()
    boost = 30.0 * c[5].float() / c[5].float().norm() ** 2  # every other token: rows 5, 20001, 39000 win, tied
    e = (e.float() + boost * (torch.arange(n, device="cuda") % 2)[:, None]).to(dtype)
    t[::9] = -100
    t[1::4] = 5
    ins = [x.clone().requires_grad_() for x in (e, c)]
    out = linear_cross_entropy(*ins, t, bias, reduction="none", grad_in_forward=True, return_token_accuracy=True,
                               return_predicted_tokens=True, return_z_loss=True, z_loss=1e-4)
    z = e.double() @ c.double().T + (0 if bias is None else bias.double())
    valid = t != -100
    pred = out.predicted_tokens
    picked = z.gather(1, pred.clamp(min=0)[:, None])[:, 0]
    # bf16: cuBLAS rounds the raw product, and with a bias the stored sum is rounded again: two
    # roundings of each of two values (measured: a gap of 0.0766 at max 8.36, above 2^-7 of it)
    slack = (2.0**-6 if dtype == torch.bfloat16 else 1e-5) * z.abs().max(-1).values
    assert ((z.max(-1).values - picked)[valid] <= slack[valid]).all()
    assert not ((pred == 20001) | (pred == 39000)).any() and (pred == 5).sum() > n // 4
    assert torch.equal(out.token_accuracy, (valid & (pred == t)).float())
    if dtype == torch.bfloat16:  # the argmax of the logits the statistics use: cuBLAS's bf16, bias added, rounded
        z16 = ins[0].detach() @ ins[1].detach().T
        if bias is not None:
            z16 = (z16.float() + bias.float()).to(torch.bfloat16)
        z16 = z16.double()
        top16 = z16.max(-1, keepdim=True).values
        pred16 = torch.where(z16 == top16, torch.arange(v, device="cuda").double(), float("inf")).amin(-1).long()
        same = (pred == pred16)[valid].float().mean()  # 1 unless the test's product differs from the library's
    else:  # float32 logits both ways: only near-ties (gap ~1e-6) may differ
        memory_first = linear_cross_entropy(*ins, t, bias, reduction="none", grad_in_forward=False,
                                            return_predicted_tokens=True)
        same = (pred == memory_first.predicted_tokens)[valid].float().mean()
    assert same > 0.99, same
    lse = torch.logsumexp(z, -1)
    assert rel_err(out.z_loss.double(), torch.where(valid, 1e-4 * lse**2, 0.0)) < 1e-2
    (out.loss * valid).sum().backward()  # a uniform upstream gradient: the fast mode's backward


def test_no_host_sync_in_the_fast_mode_with_its_statistics():
    e, c, t = _inputs(1024, 512, 20000, torch.bfloat16, "random", seed=71)
    e, c = e.requires_grad_(), c.requires_grad_()
    w = torch.rand(20000, device="cuda") + 0.5
    mask = (torch.arange(1024, device="cuda") % 5 != 0).float()
    flags = dict(return_token_accuracy=True, return_predicted_tokens=True, return_z_loss=True)

    def run():
        for tuning in (Tuning(), Tuning(fast_chunk_tokens=300)):
            kw = dict(class_weights=w, label_smoothing=0.1, z_loss=1e-4, grad_in_forward=True, tuning=tuning, **flags)
            linear_cross_entropy(e, c, t, **kw).loss.backward()  # "mean": two divisors
            linear_cross_entropy(e, c, t, reduction="sum", **kw).loss.backward()
            out = linear_cross_entropy(e, c, t, reduction="none", loss_mask=mask, **kw)
            ((out.loss * mask).sum() / mask.sum()).backward()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            linear_cross_entropy(e.float(), c.float(), t, grad_in_forward="auto", class_weights=w,
                                 label_smoothing=0.1, **flags).loss.backward()

    _twice_without_host_sync(run)


# ---- the fast mode's held-logits path (one chunk: the logits held to the backward)


def _unfused_bf16_grads(e, c, t, up):
    """dE, dC of the unfused bf16 layer for Σ up_i·ce_i: bf16 logits, float32 cross-entropy; its
    logit gradient is rounded to bf16 once (ToCopyBackward), then the products' outputs."""
    ins = [x.detach().clone().requires_grad_() for x in (e, c)]
    ce = torch.nn.functional.cross_entropy((ins[0] @ ins[1].T).float(), t, reduction="none")
    return torch.autograd.grad((ce * up).sum(), ins)


def _reference_none(e, c, t, up):
    ins, z = _logits64(e, c)
    ce = torch.nn.functional.cross_entropy(z, t, reduction="none")
    return torch.autograd.grad((ce * up.double()).sum(), ins)


@pytest.mark.parametrize("upstream", ["per-token", "scalar-0.37"])
def test_held_logits_any_upstream_at_real_size(upstream):
    """(8192, 4096, 32064) bf16: a non-uniform per-token upstream gradient (RL-like weights / N), or a
    scalar that is not a power of two: dE and dC within 1.05× the unfused bf16 layer's error against
    float64 (one rounding each, as its own)."""
    n, d, v = 8192, 4096, 32064
    e, c, t = _inputs(n, d, v, torch.bfloat16, "zipf", seed=91)
    t[::11] = -100
    g = torch.Generator(device="cuda").manual_seed(5)
    up = ((torch.rand(n, device="cuda", generator=g) + 0.5) / n if upstream == "per-token"
          else torch.full((n,), 0.37, device="cuda"))
    ins = [x.clone().requires_grad_() for x in (e, c)]
    loss = linear_cross_entropy(*ins, t, grad_in_forward=True, reduction="none")
    ge, gc = torch.autograd.grad((loss * up).sum(), ins)
    ue, uc = _unfused_bf16_grads(e, c, t, up)
    re_, rc = _reference_none(e, c, t, up)
    errs = rel_err(ge.double(), re_), rel_err(gc.double(), rc)
    base = rel_err(ue.double(), re_), rel_err(uc.double(), rc)
    assert errs[0] <= 1.05 * base[0] and errs[1] <= 1.05 * base[1], (errs, base)


@pytest.mark.parametrize("case", ["mean", "mean+ignored", "sum*3.7", "none*w"])
def test_plain_route_is_bitwise_the_general_route(case, monkeypatch):
    """The held path's fused plain cross-entropy route (coefficients formed inside the kernels) gives
    the loss, dE and dC of the general route (coefficients by autograd on [N] vectors) bit for bit on
    the GPU, where the compiler may contract the gradient's arithmetic differently from the
    interpreter: (3000, 512, 50001) bf16, odd V, ignored tokens, scalar and per-token upstream."""
    import vocab_parallel_cce.triton_backend as tb

    n, d, v = 3000, 512, 50001
    e, c, t = _inputs(n, d, v, torch.bfloat16, "zipf", seed=93)
    if case == "mean+ignored":
        t[::5] = -100
    w = torch.rand(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(6))
    reduction = case.split("*")[0].split("+")[0]

    def run():
        ins = [x.clone().requires_grad_() for x in (e, c)]
        loss = linear_cross_entropy(*ins, t, reduction=reduction)
        out = (loss * w).sum() if reduction == "none" else loss * (3.7 if case == "sum*3.7" else 1.0)
        return (loss.detach(), *torch.autograd.grad(out, ins))

    fused = run()
    monkeypatch.setattr(tb, "fuses_plain", lambda e, plan: False)
    general = run()
    for name, a, b in zip(("loss", "dE", "dC"), fused, general):
        assert torch.equal(a, b), (case, name, (a.float() - b.float()).abs().max().item())


def test_held_logits_accumulates_into_main_grad_without_a_dc_tensor():
    """dc_accumulate_into=main_grad (float32): one float32-output product with beta = 1; c.grad stays
    None; the backward's peak is lower by about dC's bf16 bytes; closer to float64 than the bf16 dC."""
    n, d, v = 8192, 4096, 32064
    e, c, t = _inputs(n, d, v, torch.bfloat16, "zipf", seed=92)
    main_grad = torch.randn(v, d, device="cuda") * 1e-3
    before = main_grad.clone()
    peaks = {}
    for target in (None, main_grad):
        ins = [x.clone().requires_grad_() for x in (e, c)]
        loss = linear_cross_entropy(*ins, t, grad_in_forward=True, dc_accumulate_into=target)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss.backward()
        torch.cuda.synchronize()
        peaks["into" if target is not None else "dc"] = torch.cuda.max_memory_allocated() - start
        if target is None:
            dc = ins[1].grad
        else:
            assert ins[1].grad is None and ins[0].grad is not None
    assert peaks["dc"] - peaks["into"] >= 0.9 * v * d * 2, peaks
    _, (_, rc) = _reference(e, c, t)
    err_into, err_dc = rel_err((main_grad - before).double(), rc), rel_err(dc.double(), rc)
    assert err_into < err_dc, (err_into, err_dc)


def test_held_logits_peak_memory_is_logits_plus_gradients():
    """Forward + backward peak over the inputs ≤ 1.05 × (Z + dE + dC) in bf16 (Z padded to 8 columns)."""
    n, d, v = 8192, 4096, 32064
    e, c, t = _inputs(n, d, v, torch.bfloat16, "random", seed=93)
    ins = [x.clone().requires_grad_() for x in (e, c)]
    linear_cross_entropy(*ins, t, grad_in_forward=True, reduction="none").sum().backward()  # warm (cuBLAS workspace)
    ins = [x.clone().requires_grad_() for x in (e, c)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    linear_cross_entropy(*ins, t, grad_in_forward=True, reduction="none").sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    bound = 2 * n * ((v + 7) // 8 * 8) + 2 * n * d + 2 * v * d
    assert peak <= 1.05 * bound, (peak / 2**20, bound / 2**20)


def test_no_host_sync_on_the_held_logits_path():
    e, c, t = _inputs(2048, 1024, 20000, torch.bfloat16, "random", seed=94)
    e, c = e.requires_grad_(), c.requires_grad_()
    up = torch.rand(2048, device="cuda") / 2048
    mask = (torch.arange(2048, device="cuda") % 5 != 0)
    main_grad = torch.zeros(20000, 1024, device="cuda")

    def run():
        for kw in (dict(), dict(dc_accumulate_into=main_grad), dict(loss_mask=mask, z_loss=1e-4, label_smoothing=0.1)):
            loss = linear_cross_entropy(e, c, t, grad_in_forward=True, reduction="none", **kw)
            (loss * up * (mask if "loss_mask" in kw else 1)).sum().backward()
        linear_cross_entropy(e, c, t, grad_in_forward="auto", reduction="none").sum().backward()

    _twice_without_host_sync(run)


@pytest.mark.parametrize("use_gluon", [None, False], ids=["default", "portable"])
def test_memory_first_token_chunks_into_main_grad(use_gluon):
    """Tuning(dc_into_by_tokens=True): the memory-first backward in token chunks over the whole
    vocabulary (several, the last partial) adds dC into main_grad and returns dE, as exact as the
    vocabulary chunks against float64, with a lower backward peak (no float32 dE accumulator)."""
    n, d, v = 8000, 4096, 32064
    e, c, t = _inputs(n, d, v, torch.bfloat16, "zipf", seed=94)
    _, (rde, rdc) = _reference(e, c, t)
    got, peaks = {}, {}
    for by_tokens in (False, True):
        main_grad = torch.zeros(v, d, device="cuda")
        ins = [x.clone().requires_grad_() for x in (e, c)]
        tuning = Tuning(use_gluon=use_gluon, dc_into_by_tokens=by_tokens, min_chunk_columns=4096)
        loss = linear_cross_entropy(*ins, t, grad_in_forward=False, dc_accumulate_into=main_grad, tuning=tuning)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss.backward()
        torch.cuda.synchronize()
        peaks[by_tokens] = torch.cuda.max_memory_allocated() - start
        assert ins[1].grad is None
        got[by_tokens] = (rel_err(ins[0].grad.double(), rde), rel_err(main_grad.double(), rdc))
    for vocab_err, token_err in zip(got[False], got[True]):
        assert token_err <= 1.1 * vocab_err + 1e-4, got
    assert peaks[False] - peaks[True] >= 0.5 * n * d * 2, peaks
