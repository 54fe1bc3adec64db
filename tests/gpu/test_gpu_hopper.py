"""GPU tests of the Hopper (Gluon) kernels (skipped without an sm_90 GPU and a Triton with
Gluon): the same calls with `Tuning(use_gluon=True)` and `use_gluon=False` (the portable
Triton kernels and cuBLAS), each against float64, at real and odd sizes, in both modes. Run
them in their own pytest process, as tests/gpu/test_gpu.py."""

from __future__ import annotations

import os

import pytest
import torch

from support.reference import rel_err
from vocab_parallel_cce import Tuning, linear_cross_entropy
from vocab_parallel_cce.backends.triton import hopper

pytestmark = pytest.mark.gpu

GLUON = Tuning(use_gluon=True)
PORTABLE = Tuning(use_gluon=False)


@pytest.fixture(autouse=True)
def _hopper_only():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: run the GPU tests on their own")
    if not hopper.available(torch.device("cuda"), True):
        pytest.skip("needs an sm_90 GPU and a Triton with Gluon")


def _inputs(n, d, v, kind, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    e = torch.randn(n, d, device="cuda", generator=g)
    c = torch.randn(v, d, device="cuda", generator=g) * 2.0 / d**0.5
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    if kind == "confident":  # targets' logits raised by ~12: p_t near 1, a small loss
        ct = c[t]
        e = e + 12.0 * ct / (ct * ct).sum(1, keepdim=True)
    return e.bfloat16(), c.bfloat16(), t


def _reference(e, c, t, ls=0.0, vocab_size=None, reduction="mean"):
    """float64 loss and (dE, dC) of the unfused layer; rows of c past vocab_size are padding."""
    v = c.shape[0] if vocab_size is None else vocab_size
    e64, c64 = (x.detach().double().requires_grad_() for x in (e, c))
    z = e64 @ c64[:v].T
    loss = torch.nn.functional.cross_entropy(z, t, label_smoothing=ls, ignore_index=-100, reduction="sum")
    count = (t != -100).sum().clamp(min=1)
    loss = loss / count if reduction == "mean" else loss
    return loss.detach(), torch.autograd.grad(loss, (e64, c64))


def _run(e, c, t, tuning, **kw):
    leaves = [x.clone().requires_grad_() for x in (e, c)]
    loss = linear_cross_entropy(leaves[0], leaves[1], t, tuning=tuning, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


CASES = [  # n, d, v, kind
    (4096, 4096, 32064, "random"),
    (4096, 4096, 32064, "confident"),
    (1000, 1000, 5003, "random"),  # nothing a multiple of the tiles
    (777, 2304, 50001, "confident"),
    (1, 256, 1, "random"),
    (1, 4096, 16032, "random"),
]


@pytest.mark.parametrize("mode", [True, False], ids=["fast", "memory-first"])
@pytest.mark.parametrize("ls", [0.0, 0.1], ids=["plain", "smoothing"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:3])) + "-" + c[3])
def test_gluon_matches_float64_as_closely_as_the_portable_kernels(case, ls, mode):
    n, d, v, kind = case
    e, c, t = _inputs(n, d, v, kind, seed=n + d + v)
    if n > 1:
        t[::7] = -100
    ref, ref_grads = _reference(e, c, t, ls)
    from vocab_parallel_cce import triton_backend

    triton_backend.counters.clear()
    gluon = _run(e, c, t, GLUON, grad_in_forward=mode, label_smoothing=ls)
    assert triton_backend.counters["hopper_forward"] >= 1  # the Gluon kernels ran
    portable = _run(e, c, t, PORTABLE, grad_in_forward=mode, label_smoothing=ls)
    # the loss comes from the float32 products in both modes: ≤ 2.7e-5 relative on an H100 (Triton 3.6)
    # at these cases. (A mean over tokens of the bf16 logits' losses can come closer: their rounding
    # errors are unbiased and average out; per token they do not, see the next test.)
    assert rel_err(gluon[0].double(), ref) < 5e-5
    for g, p, r in zip(gluon[1:], portable[1:], ref_grads):
        assert torch.isfinite(g).all()
        assert rel_err(g.double(), r) <= 1.1 * rel_err(p.double(), r) + 1e-4


@pytest.mark.parametrize("mode", [True, False], ids=["fast", "memory-first"])
def test_gluon_per_token_loss_comes_from_the_float32_products(mode):
    """reduction="none": every token's loss far closer to float64 than the bf16 logits' (the portable
    fast mode's, up to ~2^-9·|z| per token), and as close as the portable float32 kernels' (the
    portable memory-first forward) up to the tensor cores' float32 accumulation: lse and the correct
    logit come from two different float32 computations of z_t, whose errors do not cancel."""
    e, c, t = _inputs(4096, 4096, 32064, "confident", seed=17)
    t[::5] = -100
    z = e.double() @ c.double().T
    valid = t != -100
    ref = torch.where(valid, torch.logsumexp(z, 1) - z.gather(1, t.clamp(0)[:, None])[:, 0], 0.0)

    def worst(tuning, gif):
        leaves = [x.clone().requires_grad_() for x in (e, c)]  # so the fast mode holds bf16 logits
        loss = linear_cross_entropy(*leaves, t, reduction="none", grad_in_forward=gif, tuning=tuning)
        assert (loss[~valid] == 0).all()
        return (loss.detach().double() - ref).abs()[valid].max().item()

    gluon = worst(GLUON, mode)
    assert gluon < worst(PORTABLE, True) / 10
    assert gluon < 3 * worst(PORTABLE, False) + 1e-6


@pytest.mark.parametrize("mode", [True, False], ids=["fast", "memory-first"])
def test_gluon_all_tokens_ignored(mode):
    e, c, t = _inputs(300, 512, 4099, "random", seed=3)
    t[:] = -100
    loss, de, dc = _run(e, c, t, GLUON, grad_in_forward=mode)
    assert loss.item() == 0.0
    assert not de.any() and not dc.any()


@pytest.mark.parametrize("mode", [True, False], ids=["fast", "memory-first"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gluon_padded_vocabulary_and_reductions(mode, reduction):
    """Rows of c past vocab_size (a padded shard) take no part, whatever their values."""
    n, d, v, size = 2048, 1024, 32000, 31871
    e, c, t = _inputs(n, d, v, "random", seed=11)
    c[size:] = 50.0  # would dominate every softmax if it took part
    t = t % size
    loss_kw = dict(grad_in_forward=mode, vocab_size=size, reduction=reduction)
    leaves = [x.clone().requires_grad_() for x in (e, c)]
    loss = linear_cross_entropy(leaves[0], leaves[1], t, tuning=GLUON, **loss_kw)
    up = torch.rand_like(loss) if reduction == "none" else torch.tensor(0.37, device="cuda")
    de, dc = torch.autograd.grad(loss, leaves, up)
    e64, c64 = (x.detach().double().requires_grad_() for x in (e, c))
    ref = torch.nn.functional.cross_entropy(e64 @ c64[:size].T, t, reduction=reduction)
    rde, rdc = torch.autograd.grad(ref, (e64, c64), up.double())
    assert rel_err(loss.double(), ref.detach()) < 1e-6
    assert rel_err(de.double(), rde) < 1.5e-2 and rel_err(dc.double(), rdc) < 1.5e-2
    assert not dc[size:].any()


def test_gluon_and_portable_fast_gradients_agree_at_real_size():
    """(8192, 4096, 128256): the gradient is the unfused layer's arithmetic on both paths."""
    e, c, t = _inputs(8192, 4096, 128256, "confident", seed=5)
    gluon = _run(e, c, t, GLUON)
    portable = _run(e, c, t, PORTABLE)
    for g, p in zip(gluon[1:], portable[1:]):
        assert rel_err(g.double(), p.double()) < 5e-3


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("case", [(4096, 4096, 32064), (777, 2304, 50001), (1, 256, 1)],
                         ids=lambda c: "x".join(map(str, c)))
def test_gluon_log_probs_match_float64_as_closely_as_the_portable_kernels(case, temperature):
    """linear_log_probs: the entropy statistic and gradient term of the kernels, any upstream gradient."""
    from vocab_parallel_cce import linear_log_probs, triton_backend

    n, d, v = case
    e, c, t = _inputs(n, d, v, "random", seed=n + v)
    if n > 1:
        t[::7] = -100
    g = torch.Generator(device="cuda").manual_seed(1)
    up = (torch.randn(n, device="cuda", generator=g), torch.rand(n, device="cuda", generator=g))

    def run(tuning):
        leaves = [x.clone().requires_grad_() for x in (e, c)]
        lp, ent = linear_log_probs(leaves[0], leaves[1], t, temperature=temperature, tuning=tuning)
        return (lp.detach(), ent.detach(), *torch.autograd.grad((lp * up[0] + ent * up[1]).sum(), leaves))

    triton_backend.counters.clear()
    gluon = run(GLUON)
    assert triton_backend.counters["hopper_forward"] >= 1 and triton_backend.counters["hopper_grad"] >= 1
    portable = run(PORTABLE)
    e64, c64 = (x.detach().double().requires_grad_() for x in (e, c))
    logp = torch.log_softmax((e64 @ c64.T) / temperature, 1)
    valid = t != -100
    lp = torch.where(valid, logp.gather(1, t.clamp(0)[:, None])[:, 0], 0.0)
    ent = torch.where(valid, -(logp.exp() * logp).sum(1), 0.0)
    ref = (lp.detach(), ent.detach(),
           *torch.autograd.grad((lp * up[0].double() + ent * up[1].double()).sum(), (e64, c64)))
    for out, r in zip(gluon[:2], ref[:2]):
        assert rel_err(out.double(), r) < 1e-5
    for q, p, r in zip(gluon[2:], portable[2:], ref[2:]):
        assert torch.isfinite(q).all()
        assert rel_err(q.double(), r) <= 1.1 * rel_err(p.double(), r) + 1e-4


COOPERATIVE = (128, 256, 64, 3, 1, 16, 8)  # one consumer of two warpgroups on 128×256 tiles


@pytest.mark.parametrize("mode", ["logits", "stats"])
@pytest.mark.parametrize("case", [(1, 256, 1), (1000, 1000, 5003), (777, 4096, 16032), (4096, 4096, 32064)],
                         ids=lambda c: "x".join(map(str, c)))
def test_pingpong_consumers_match_the_cooperative_kernel_bitwise(case, mode):
    """The statistics modes' ping-pong configuration (logits.CONFIGS) and one cooperative consumer
    reduce the same 16 rows × 256 columns per warp in the same order: bitwise the same z and
    partials, every tile written (NaN-poisoned outputs), at N = 1 and sizes off the tiles."""
    from vocab_parallel_cce.backends.triton.hopper import logits as L

    n, d, v = case
    e, c, _ = _inputs(n, d, v, "random", seed=n + v)
    m = L.MODE_LOGITS.value if mode == "logits" else L.MODE_STATS.value
    assert L.CONFIGS[m][7:] == (2,)  # the default is the ping-pong configuration
    outs = []
    for config in (None, COOPERATIVE):
        z = torch.full((n, -(-v // 8) * 8), float("nan"), device="cuda", dtype=torch.bfloat16)
        part = torch.full((L.partial_rows(m, True), -(-v // 256), n), float("nan"), device="cuda")
        L.launch(e, c, v, m, out=z if m == L.MODE_LOGITS.value else None, partials=part, need_sum=True,
                 num_sms=torch.cuda.get_device_properties(0).multi_processor_count, config=config)
        outs.append((z[:, :v], part))
    (z_pp, part_pp), (z_coop, part_coop) = outs
    assert not part_pp.isnan().any() and torch.equal(part_pp, part_coop)
    if m == L.MODE_LOGITS.value:
        assert not z_pp.isnan().any() and torch.equal(z_pp, z_coop)


@pytest.mark.parametrize("case", [(1, 256, 1), (777, 4160, 16411), (2048, 8192, 8000)],
                         ids=lambda c: "x".join(map(str, c)))
def test_accumulator_slices_shrink_the_products_bias_and_keep_every_logit(case):
    """Statistics and logits with the accumulator sliced (Tuning.stats_k_slice; D = 4160 leaves one
    64-column block after the last full slice, 8192 crosses several slices): every stored logit is
    float64's rounded to bf16 (within one bf16 step: a column swap or a lost slice would not be),
    and the lse's bias against float64 shrinks with the slice width."""
    from vocab_parallel_cce.backends.triton.hopper import logits as L
    from vocab_parallel_cce.backends.triton.hopper import partials as P

    n, d, v = case
    e, c, t = _inputs(n, d, v, "random", seed=d)
    z64 = e.double() @ c.double().T
    lse64 = torch.logsumexp(z64, -1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bias = {}
    for k_slice in (0, 2048, 512):
        z = torch.full((n, -(-v // 8) * 8), float("nan"), device="cuda", dtype=torch.bfloat16)
        part = torch.empty(L.partial_rows(L.MODE_LOGITS.value, False), -(-v // 256), n, device="cuda")
        L.launch(e, c, v, L.MODE_LOGITS.value, out=z, partials=part, num_sms=sms, k_slice=k_slice)
        # one bf16 step at |z|: rounding takes half of it, the float32 products' error the rest
        step = torch.exp2(torch.floor(torch.log2(z64.abs().clamp(min=2.0**-6))) - 7)
        off = (z[:, :v].double() - z64).abs() / step
        assert off.max().item() <= 1, (k_slice, off.max().item(), z[:, :v].isnan().sum().item())
        lse = P.merge(part, e, c, t, v, True, False)[0].double()
        assert rel_err(lse, lse64) < 1e-5
        bias[k_slice] = (lse - lse64).mean().item()
    if d >= 4096:  # one slice: ≈ −4e-9·D nats on these logits; slices of 512: a quarter of that or less
        assert bias[0] < -1e-6 and abs(bias[512]) < abs(bias[0]) / 4 and abs(bias[2048]) < abs(bias[0])


@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["fast", "memory-first"])
def test_default_slices_bring_the_loss_within_1e6_of_float64(grad_in_forward):
    """Through the public API: with the default accumulator slices (2048) the Gluon modes' mean loss
    is within 1e-6 of float64 at D = 4096 and closer than with one slice (Tuning(stats_k_slice=0):
    the products' pull, ~1.2e-6), and the gradients stay the one-slice call's (the slices change
    only the float32 statistics)."""
    e, c, t = _inputs(2048, 4096, 16032, "random", seed=11)
    ref = _reference(e, c, t)
    sliced = _run(e, c, t, GLUON, grad_in_forward=grad_in_forward)
    one = _run(e, c, t, Tuning(use_gluon=True, stats_k_slice=0), grad_in_forward=grad_in_forward)
    assert rel_err(sliced[0], ref[0]) < min(1e-6, rel_err(one[0], ref[0]))
    for g_sliced, g_one in zip(sliced[1:], one[1:]):
        assert rel_err(g_sliced, g_one) < 1e-3


# Megatron-core's fused linear cross-entropy is checked against a float32 reference: the bf16 inputs'
# float32 logits, F.cross_entropy, and torch.testing.assert_close at float32's default tolerances
# (rtol 1.3e-6, atol 1e-5) on the loss, 1e-3 on the gradients. These are its problem sizes.
MEGATRON_PROBLEMS = [  # token shape, V, D
    ((80,), 125, 64),
    ((80,), 152064, 64),
    ((1024,), 152064, 4096),
    ((4096,), 152063, 8192),
    ((2, 4096), 152064, 8192),
]


@pytest.mark.parametrize("ignore_index", [-100, 4])
@pytest.mark.parametrize("problem", MEGATRON_PROBLEMS, ids=lambda p: "x".join(map(str, (*p[0], p[1], p[2]))))
def test_modes_meet_float32_tolerances_per_token(problem, ignore_index):
    """Every reduction; both modes on the Gluon kernels, and the fast mode on the portable ones (its
    float32 correct and largest logits): the loss (per token for "none") within float32's default
    assert_close tolerances of the float32 reference, the gradients for a random upstream gradient
    within 1e-3. Uniform(−0.1, 0.1) inputs, as Megatron-core's own test draws."""
    tokens, v, d = problem
    g = torch.Generator(device="cuda").manual_seed(v + d)
    e = (torch.rand(*tokens, d, device="cuda", generator=g) * 0.2 - 0.1).bfloat16()
    c = (torch.rand(v, d, device="cuda", generator=g) * 0.2 - 0.1).bfloat16()
    t = torch.randint(0, v, tokens, device="cuda", generator=g)
    t.view(-1)[::9] = ignore_index  # ignored tokens in every case (label 4 is a real id otherwise)
    e32, c32 = (x.float().requires_grad_() for x in (e, c))
    for reduction in ("none", "mean", "sum"):
        ref = torch.nn.functional.cross_entropy((e32 @ c32.T).flatten(0, -2), t.flatten(), reduction=reduction,
                                                ignore_index=ignore_index)
        ref = ref.view(tokens) if reduction == "none" else ref
        up = torch.rand(ref.shape, device="cuda", generator=g) * 0.2 - 0.1
        ref_grads = torch.autograd.grad(ref, (e32, c32), up)
        for mode, tuning in ((True, GLUON), (False, GLUON), (True, PORTABLE)):
            leaves = [x.clone().requires_grad_() for x in (e, c)]
            loss = linear_cross_entropy(*leaves, t, reduction=reduction, ignore_index=ignore_index,
                                        grad_in_forward=mode, tuning=tuning)
            torch.testing.assert_close(loss, ref.detach(), msg=lambda m: f"{reduction}, fast={mode}, {tuning}: {m}")
            for ours, r in zip(torch.autograd.grad(loss, leaves, up), ref_grads):
                torch.testing.assert_close(ours.float(), r, atol=1e-3, rtol=1e-3)
