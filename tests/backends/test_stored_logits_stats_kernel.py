"""`stored_logits_stats_kernel` called directly (TRITON_INTERPRET=1 on CPU) against float64.

The kernel keeps per-lane running statistics (max, Σexp, target logit, logit sum, argmax) and
merges its BLOCK_C lanes once per row; these cases are built so that a wrong merge shows:
lanes with very different maxima (−1e4 next to 0, a spike in one lane), empty lanes (V < BLOCK_C),
exact argmax ties in different lanes and blocks where the smallest column is not in the lowest
lane, the row max alone in the last partial block, −inf logits, and targets outside [0, V)
(including a masked column of the last block).

Inputs are small integers times 1/8 (bias too), exact in bf16 and in every float32 sum, so ties
are ties in the kernel and in the reference alike; softcap keeps the distinct values well apart.
With WRITE_BACK the reference statistics are those of the values the kernel stored (the
interpreter truncates the bf16 downcast, the GPU rounds), and those values are checked against
the float64 final logits to one bf16 ulp.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from support import interpreter

interpreter.on_cpu_only()

import triton  # noqa: E402

from vocab_parallel_cce.backends.triton import logits_bf16 as G  # noqa: E402

BLOCK_C = 16
CAP = 10.0
PAD = 3  # extra columns after V in each row of Z (an odd row stride); they must stay untouched
SENTINEL = 77.0


def _inputs(n, v, gen):
    """(raw Z [n, v + PAD] bf16, bias [v] bf16, targets [n] int64, class weights [v] float32)."""
    raw = torch.randint(-64, 64, (n, v), generator=gen).double() / 8
    bias = torch.randint(-16, 16, (v,), generator=gen).double() / 8
    t = torch.randint(0, v, (n,), generator=gen)
    # row 0: the max (12 after the bias) at columns in different lanes and blocks, the smallest
    # (5, lane 5) in a higher lane than later ones (18 and 34, lane 2; 48, lane 0 of the last,
    # one-column block when V = 49); 21 shares lane 5 with 5.
    ties = [j for j in (5, 18, 21, 3 * BLOCK_C, 0 if v < 5 else 2 * BLOCK_C + 2) if j < v]
    raw[0, ties] = 12 - bias[ties]
    t[0] = ties[0] if v > 5 else v  # n = 1: a target ≥ V (x = 0)
    if n > 1:  # row 1: the max alone in the last column (in the last, partial, block when V % 16)
        raw[1, v - 1] = 14 - bias[v - 1]
        t[1] = -1
    if n > 2:  # row 2: −1e4 on every other column, 0 (before the bias) on the others
        raw[2, ::2] = -1e4
        raw[2, 1::2] = 0.0
        t[2] = v + 1  # a masked column of the last block when V % 16 ≤ 14
    if n > 3:  # row 3: one large spike, in the last lane of the first block when there is one
        raw[3, min(v - 1, BLOCK_C - 1)] = 15
    if n > 4:
        t[4] = -103
    if n > 5:
        t[5] = 10**6
    if n > 6:
        t[6] = v - 1
    z = torch.full((n, v + PAD), SENTINEL, dtype=torch.bfloat16)
    z[:, :v] = raw.to(torch.bfloat16)
    w = torch.rand(v, generator=gen) * 2
    return z, bias.to(torch.bfloat16), t, w


def _final_logits(z, bias, v, has_bias, has_softcap):
    """float64 logits the kernel computes from raw Z (before any storing)."""
    y = z[:, :v].double()
    if has_bias:
        y = y + bias.double()
    if has_softcap:
        y = CAP * torch.tanh(y / CAP)
    return y


def _reference(y, t, w, need_sum, has_sumw):
    """(lse, x, s, max, argmax) of float64 logits y [n, v]: x = 0 for a target outside [0, v)."""
    n, v = y.shape
    ok = (t >= 0) & (t < v)
    x = torch.where(ok, y.gather(1, t.clamp(0, v - 1)[:, None])[:, 0], 0.0)
    s = (y * w.double()).sum(1) if has_sumw else y.sum(1) if need_sum else torch.zeros(n, dtype=y.dtype)
    top = y.amax(1)
    return torch.logsumexp(y, 1), x, s, top, torch.argmax(y, 1).double()  # argmax: the first max


def _run(z, bias, t, w, n, v, block_r, has_bias, has_softcap, write_back, need_sum, has_sumw, need_argmax):
    out = torch.full((5, n), 1234.5)
    G.stored_logits_stats_kernel[(triton.cdiv(n, block_r),)](
        z, bias if has_bias else z, t, out, n, v, z.stride(0), CAP, w if has_sumw else out,
        HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, NEED_SUM=need_sum, WRITE_BACK=write_back,
        BLOCK_R=block_r, BLOCK_C=BLOCK_C, HAS_SUMW=has_sumw, NEED_ARGMAX=need_argmax, num_warps=1,
    )
    return out


def _check(n, v, block_r, has_bias, has_softcap, write_back, need_sum, has_sumw, need_argmax, seed):
    gen = torch.Generator().manual_seed(seed)
    z, bias, t, w = _inputs(n, v, gen)
    z0 = z.clone()
    out = _run(z, bias, t, w, n, v, block_r, has_bias, has_softcap, write_back, need_sum, has_sumw, need_argmax)
    y = _final_logits(z0, bias, v, has_bias, has_softcap)
    if write_back:
        # stored within one bf16 ulp of the float64 logits (truncation here, rounding on a GPU),
        # the padding columns untouched; the statistics are those of the stored values
        stored = z[:, :v].double()
        assert ((stored - y).abs() <= y.abs() * 2.0**-7).all()
        assert (z[:, v:] == SENTINEL).all()
        y = stored
    else:
        assert torch.equal(z, z0)
    lse, x, s, top, arg = _reference(y, t, w, need_sum, has_sumw)
    # float32 against float64: a few float32 ulps of each value (sums: of Σ|terms|)
    assert ((out[0].double() - lse).abs() <= 4e-6 * (1 + lse.abs())).all(), (out[0], lse)
    assert ((out[1].double() - x).abs() <= 1e-6 * (1 + x.abs())).all(), (out[1], x)
    s_scale = 1 + ((y * w.double()) if has_sumw else y).abs().sum(1)
    assert ((out[2].double() - s).abs() <= 1e-6 * s_scale).all(), (out[2], s)
    if need_argmax:
        assert ((out[3].double() - top).abs() <= 1e-6 * (1 + top.abs())).all(), (out[3], top)
        assert torch.equal(out[4].double(), arg), (out[4], arg)
    else:
        assert (out[3:] == 1234.5).all()  # OUT[3], OUT[4] untouched


# (HAS_BIAS, HAS_SOFTCAP, WRITE_BACK, NEED_SUM, HAS_SUMW, NEED_ARGMAX): every valid combination
OPTIONS = [(b, c, wb, ns, sw, am) for b, c, wb, (ns, sw), am in itertools.product(
    (False, True), (False, True), (False, True), ((False, False), (True, False), (True, True)), (False, True))]
OPT_ID = lambda o: "-".join(k for k, on in zip(("bias", "cap", "wb", "sum", "sumw", "arg"), o) if on) or "plain"  # noqa: E731


@pytest.mark.parametrize("opts", OPTIONS, ids=OPT_ID)
@pytest.mark.parametrize("block_r", [1, 4])
def test_every_option_combination(opts, block_r, seed):
    """All 48 switch combinations at every size: N in {1, 7} (BLOCK_R = 4: one partial row block;
    a full one and a partial one of 3 rows, every special row of `_inputs`), V from one column (15
    empty lanes) to 4 blocks with a one-column last block (36: a last block of 4 columns, the
    masked target column 37 in it)."""
    for n, v in itertools.product((1, 7), (1, 5, 17, 36, 49)):
        _check(n, v, block_r, *opts, seed=seed + 1000 * n + v)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # numpy's log(0)
@pytest.mark.parametrize("block_r", [1, 4])
@pytest.mark.parametrize("has_softcap", [False, True])
def test_minus_inf_logits(block_r, has_softcap):
    """−inf logits (a −inf bias masking tokens out, or −inf raw values) leave the lanes that see
    them as they were, also as a lane's first element; a row of only −inf logits has
    lse = max = −inf and argmax 0 (softcap maps −inf to −cap instead: a row of ties)."""
    n, v = 5, 37
    gen = torch.Generator().manual_seed(7)
    z, bias, t, w = _inputs(n, v, gen)
    bias[[0, 3, 16, 17, 36]] = float("-inf")  # first elements of lanes 0, 1, 3 and the last column
    z[4, :v] = float("-inf")  # a row of −inf raw logits
    z[3, 20:v] = float("-inf")
    t[4] = 2
    z0 = z.clone()
    out = _run(z, bias, t, w, n, v, block_r, True, has_softcap, True, True, False, True)
    y = _final_logits(z0, bias, v, True, has_softcap)
    stored = z[:, :v].double()
    assert torch.equal(torch.isinf(stored), torch.isinf(y)) and ((stored - y).abs()[~torch.isinf(y)]
                                                                 <= y.abs()[~torch.isinf(y)] * 2.0**-7).all()
    lse, x, s, top, arg = _reference(stored, t, w, True, False)
    torch.testing.assert_close(out[0].double(), lse, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(out[1].double(), x, rtol=0, atol=0)
    torch.testing.assert_close(out[2].double(), s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[3].double(), top, rtol=0, atol=1e-6)
    assert torch.equal(out[4].double(), arg)
    if not has_softcap:
        assert out[0, 4] == float("-inf") and out[3, 4] == float("-inf") and out[4, 4] == 0
