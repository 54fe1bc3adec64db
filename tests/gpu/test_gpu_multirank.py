"""Vocabulary parallelism on ONE GPU shared by 2, 3 and 4 processes (gloo, CUDA tensors).

Four spawned processes all use cuda:0 and talk over gloo groups of 2, 3 and 4 of them, at a
size where the Triton kernels take their real tile paths: N = 4096 tokens, D = 4096,
V = 128256 rows in bf16. This checks the vocabulary-parallel GPU path (shards, statistics
combined across ranks, dE summed or reduce-scattered, sequence parallelism, the Megatron adapter)
without a multi-GPU machine; the NCCL tests in tests/gpu/test_gpu.py cover NCCL itself. Every
process spawns with its own CUDA context (~0.5 GB); each holds the full bf16 classifier (1 GB) for
the one-rank reference, so the run peaks at about 4 × 5 GB of GPU memory.

Every rank draws the SAME full e, c, bias, targets from one seed and slices its shard. Each case
checks, on every rank taking part, the loss, dE (this rank's rows under sequence parallelism),
this rank's dC shard and dbias against
  (a) the one-rank result of the same call on the full classifier, in the same process:
      relative difference < 5e-3 for the bf16 gradients, < 1e-5 for the loss (the statistics are
      combined in float32), 1e-4 for the fast mode's per-token losses (its bf16 logits come from a
      product of another shape, which may round a logit to the neighbouring bf16 value);
  (b) float64 from the definition: the loss of all tokens, dE on 256 of this rank's tokens, dC and
      dbias on 256 rows of this rank's shard (from all tokens), within tests/gpu/test_gpu.py's
      tolerances (bf16 gradients 1.5e-2); padding rows get exactly zero gradient.
The cases: even shards over 2 and 4 ranks; uneven shards over 3 ranks (the last rank holding
the first rows; N = 4096 is not a multiple of 3, so dE takes the float32 all-reduce); a padded
vocabulary (`vocab_size` 300 below the rows: the last shard holds them); explicit `vocab_start`
and `VocabParallelOptions`; both modes (`grad_in_forward` "auto", the default, and True: the
fast mode, on its held-logits path and, forced by `Tuning.fast_chunk_tokens`, on its
token-chunked path; False: memory-first); "mean" and "none" with a per-token upstream
gradient; `sequence_parallel=True`; and the Megatron adapter's `fused_loss` on a megatron-core
ColumnParallelLinear (tensor-parallel groups of 2 from `parallel_state.initialize_model_parallel`
over the 4 processes) against Megatron's own `vocab_parallel_cross_entropy` on the same layer,
with and without sequence parallelism, and with gradient-accumulation fusion (dC added into a
float32 `main_grad`). The adapter's other half, patching a whole GPTModel, is left to
tests/integrations/test_megatron.py (CPU): a GPTModel at this size would not fit the time budget,
and its hidden states would not be the test's choice.

What gloo does with CUDA tensors (torch's ProcessGroupGloo): it copies them to pinned host
memory, runs the collective on the CPU and copies the result back (no GPU reduction):
  - all_reduce: supported (the library's 16-bit dE sum when N is not a multiple of the ranks);
  - all_gather_into_tensor / all_gather_single: supported, by chunking the output into
    all_gather's CUDA work (the statistics, sequence-parallel hidden states and targets, the
    all-gather half of the 16-bit dE sum, whose input is a view of its output);
  - reduce_scatter_tensor / reduce_scatter_single: supported by composition: a clone of the
    input, one all_reduce, a copy of this rank's chunk (twice a real reduce-scatter's traffic;
    the clone makes the library's in-place form, output a view of the input, safe);
  - send/recv and all_reduce_coalesced take CPU tensors only; the library uses none of them.
The library needs no gloo fallback: it calls only the three supported collectives, its
shard-layout check uses a CPU tensor on a group that is not NCCL, and its same-shape check runs
for CPU tensors only. The "collectives" case checks the three on CUDA tensors with exact values
(float32, bf16, int64; the in-place forms too) through the names the library calls, so a torch
that drops one is named there first.

Runtime: one spawned run of 4 processes serves every case (one pytest item each: the first item
runs it, the others read its results; under pytest-xdist use --dist loadgroup). Expected on an
H100: about 60-90 s, most of it process start-up and first-call kernel compilation. Each case has
a time limit on every rank (CASE_LIMIT_S), the whole run a hang guard (RUN_LIMIT_S).

On CPU: VPCCE_TEST_MULTIRANK_CPU=1 runs the same rank functions on CPU tensors (impl="torch",
N=64, D=32, V=1000), which checks the slicing, references and comparisons without a GPU:
    VPCCE_TEST_MULTIRANK_CPU=1 pytest tests/gpu/test_gpu_multirank.py
Run the GPU items in their own pytest process (like tests/gpu/test_gpu.py): TRITON_INTERPRET=1
in the process skips them, and a spawned rank would inherit it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
import traceback
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from support.process_groups import run_group
from support.reference import rel_err

CPU_SWITCH = "VPCCE_TEST_MULTIRANK_CPU"
PROCESSES = 4
GROUP_TIMEOUT_S = 180  # a case's group: a rank may wait there while the others run cases without it
CASE_LIMIT_S = 60  # one case on one rank, first-call kernel compilation included
RUN_LIMIT_S = 480  # the whole spawned run: a hang guard
IGNORE = -100
BF16_GRAD_TOL = 1.5e-2  # bf16 gradients against float64 (tests/gpu/test_gpu.py's)
ONE_RANK_GRAD_TOL = 5e-3  # bf16 gradients, several ranks against one
FALLBACK_WARNING = "using the exact torch path"


@dataclass(frozen=True)
class Sizes:
    n: int
    d: int
    v: int
    pad: int  # padding rows of the padded cases
    probe_tokens: int  # tokens of dE checked against float64
    probe_rows: int  # rows of the dC shard checked against float64
    v_chunk: int  # vocabulary rows per float64 product
    impl: str


SIZES = {
    "cuda": Sizes(4096, 4096, 128256, pad=300, probe_tokens=256, probe_rows=256, v_chunk=8192, impl="triton"),
    "cpu": Sizes(64, 32, 1000, pad=30, probe_tokens=16, probe_rows=24, v_chunk=256, impl="torch"),
}


@dataclass(frozen=True)
class Case:
    name: str
    world: int  # the spawned processes 0..world-1 take part
    kind: str = "loss"  # "loss" | "megatron" (tensor-parallel groups of 2) | "collectives"
    grad_in_forward: bool | str = True  # True: the fast mode; False: memory-first; "auto": the default
    reduction: str = "mean"  # "mean", or "none" differentiated as Σ_i up_i·loss_i
    uneven: bool = False  # 3 ranks: shards of 44.7%, 20.3%, 35% of the rows, the last rank's first
    padded: bool = False  # vocab_size = rows − pad: the last shard holds the padding rows
    bias: bool = False
    sp: bool = False  # sequence_parallel: each rank passes its slice of the tokens
    vpo: bool = False  # VocabParallelOptions instead of group= and vocab_start=
    chunked: bool = False  # the fast mode's token-chunked path (4 chunks) instead of held logits
    main_grad: bool = False  # megatron: gradient-accumulation fusion, dC added into a float32 main_grad


CASES = [
    Case("collectives", 4, kind="collectives"),
    Case("4-even-bias-fast-mean", 4, bias=True),
    Case("4-even-bias-memory_first-none", 4, grad_in_forward=False, reduction="none", bias=True),
    Case("4-padded-vpo-bias-fast-none", 4, padded=True, vpo=True, bias=True, reduction="none"),
    Case("4-padded-memory_first-mean", 4, padded=True, grad_in_forward=False),
    Case("4-sp-fast-none", 4, sp=True, reduction="none"),
    Case("4-sp-padded-bias-memory_first-mean", 4, sp=True, padded=True, bias=True, grad_in_forward=False),
    Case("4-fast-token_chunks-mean", 4, chunked=True),
    Case("3-uneven-bias-fast-mean", 3, uneven=True, bias=True),
    Case("3-uneven-memory_first-none", 3, uneven=True, grad_in_forward=False, reduction="none"),
    Case("3-uneven-padded-vpo-fast-none", 3, uneven=True, padded=True, vpo=True, reduction="none"),
    Case("3-uneven-padded-bias-memory_first-mean", 3, uneven=True, padded=True, bias=True, grad_in_forward=False),
    Case("2-even-auto-mean", 2, grad_in_forward="auto"),  # the default: the fast mode with the triton backend
    Case("2-even-memory_first-mean", 2, grad_in_forward=False),
    Case("2-even-fast-none", 2, reduction="none"),
    Case("2-even-memory_first-none", 2, grad_in_forward=False, reduction="none"),
    Case("2-sp-fast-mean", 2, sp=True),
    Case("2-sp-memory_first-none", 2, sp=True, grad_in_forward=False, reduction="none"),
    Case("megatron-tp2-auto-main_grad", 4, kind="megatron", grad_in_forward="auto", main_grad=True),
    Case("megatron-tp2-sp-memory_first", 4, kind="megatron", sp=True, grad_in_forward=False),
]


# --------------------------------------------------------------------------------------------------
# inputs, layouts, the float64 reference


def _inputs(sizes: Sizes, device: str, seed: int = 20240611) -> dict:
    """The same full e [N, D], c [V, D], bias [V] (bf16), targets [N] (every 13th ignored, all
    below the padded vocabulary) and per-token upstream weights [N] on every rank."""
    g = torch.Generator(device=device).manual_seed(seed)
    n, d, v = sizes.n, sizes.d, sizes.v
    e = torch.randn(n, d, device=device, generator=g).bfloat16()
    c = (torch.randn(v, d, device=device, generator=g) * (2.0 / d**0.5)).bfloat16()
    b = (torch.randn(v, device=device, generator=g) * 0.3).bfloat16()
    t = torch.randint(0, v - sizes.pad, (n,), device=device, generator=g)
    t[::13] = IGNORE
    up = (torch.rand(n, device=device, generator=g) + 0.5) / n
    return {"e": e, "c": c, "b": b, "t": t, "up": up}


def _layout(case: Case, sizes: Sizes, grank: int) -> tuple[int, int, int | None]:
    """(vocab_start, rows) of group rank `grank`'s shard, and the vocab_size argument."""
    w, v = case.world, sizes.v
    if case.uneven:
        assert w == 3
        first, second = round(0.447 * v), round(0.203 * v)
        rows = [first, second, v - first - second]
        order = [2, 1, 0]  # the last rank holds the first rows
    else:
        assert v % w == 0
        rows, order = [v // w] * w, list(range(w))
    start = sum(rows[r] for r in order[: order.index(grank)])
    return start, rows[grank], (v - sizes.pad if case.padded else None)


def _spread(lo: int, hi: int, k: int, device) -> torch.Tensor:
    """About k indices spread evenly over [lo, hi), both ends included."""
    return torch.linspace(lo, hi - 1, min(k, hi - lo), device=device).round().long().unique()


def _float64_reference(e, c, b, t, vocab, g, tokens, rows, v_chunk, lse_cache) -> dict:
    """From the definition, in float64, of Σ_i g_i·loss_i (loss_i = lse_i − z_{i,t_i} over the rows
    below `vocab`, 0 where t_i is ignored): the per-token loss of all N tokens, dE on `tokens`, dC
    and dbias on vocabulary `rows` (from all tokens). The logits are formed v_chunk rows at a time;
    lse is cached per (bias, vocab) in `lse_cache` (the inputs stay the same for a whole run)."""
    vocab = c.shape[0] if vocab is None else vocab
    e64 = e.double()

    def logits(x64, lo, hi):
        z = x64 @ c[lo:hi].double().T
        return z if b is None else z + b[lo:hi].double()

    key = (b is not None, vocab)
    if key not in lse_cache:
        lse = torch.full((e.shape[0],), float("-inf"), dtype=torch.float64, device=e.device)
        for lo in range(0, vocab, v_chunk):
            lse = torch.logaddexp(lse, torch.logsumexp(logits(e64, lo, min(vocab, lo + v_chunk)), dim=1))
        lse_cache[key] = lse
    lse = lse_cache[key]
    valid = t != IGNORE
    tc = t.clamp(min=0)
    z_t = (e64 * c[tc].double()).sum(1) + (0.0 if b is None else b[tc].double())
    g = torch.where(valid, g.double(), 0.0)
    # dE_i = g_i·(Σ_j p_ij·c_j − c_{t_i})
    pc = torch.zeros(len(tokens), e.shape[1], dtype=torch.float64, device=e.device)
    for lo in range(0, vocab, v_chunk):
        hi = min(vocab, lo + v_chunk)
        pc += torch.exp(logits(e64[tokens], lo, hi) - lse[tokens, None]) @ c[lo:hi].double()
    de = g[tokens, None] * (pc - c[tc[tokens]].double())
    # dC_j = Σ_i g_i·(p_ij − [t_i = j])·e_i and dbias_j = Σ_i g_i·(p_ij − [t_i = j]); p_ij = 0 on padding rows
    z = e64 @ c[rows].double().T + (0.0 if b is None else b[rows].double())
    p = torch.exp(z - lse[:, None]) * (rows < vocab)
    gz = g[:, None] * (p - (tc[:, None] == rows[None, :]).double())
    return {"loss": torch.where(valid, lse - z_t, 0.0), "dE": de, "dC": gz.T @ e64, "dbias": gz.sum(0)}


class _Checks:
    """Collects the problems of one case (no collectives run while checking)."""

    def __init__(self):
        self.problems: list[str] = []

    def close(self, name, got, want, tol):
        if tuple(got.shape) != tuple(want.shape):
            self.problems.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        elif not torch.isfinite(got).all():
            self.problems.append(f"{name}: non-finite values")
        else:
            err = rel_err(got, want)
            if not err <= tol:
                self.problems.append(f"{name}: relative difference {err:.3g} > {tol:g}")

    def true(self, ok: bool, what: str):
        if not ok:
            self.problems.append(what)


# --------------------------------------------------------------------------------------------------
# the cases (run in every spawned rank)


def _loss_case(case: Case, inp: dict, group, grank: int, sizes: Sizes, lse_cache: dict) -> list[str]:
    """linear_cross_entropy on this rank's shard against the one-rank call and float64."""
    from vocab_parallel_cce import Tuning, VocabParallelOptions, linear_cross_entropy
    from vocab_parallel_cce.distributed import clear_layout_cache

    clear_layout_cache()  # the other ranks' shards change from case to case
    e, c, t, up = inp["e"], inp["c"], inp["t"], inp["up"]
    b = inp["b"] if case.bias else None
    n, w = sizes.n, case.world
    start, rows, vocab = _layout(case, sizes, grank)
    tok = slice(grank * n // w, (grank + 1) * n // w) if case.sp else slice(0, n)
    kw = dict(reduction=case.reduction, vocab_size=vocab, impl=sizes.impl, grad_in_forward=case.grad_in_forward,
              tuning=Tuning(fast_chunk_tokens=n // 4) if case.chunked else None)

    def differentiated(loss):
        return loss if case.reduction == "mean" else (loss * up).sum()

    # (a) one rank: the full classifier, the same call
    leaves = [x.detach().requires_grad_() for x in (e, c) + (() if b is None else (b,))]
    loss1 = linear_cross_entropy(leaves[0], leaves[1], t, leaves[2] if b is not None else None, **kw)
    grads1 = torch.autograd.grad(differentiated(loss1), leaves)
    one = {"loss": loss1.detach(), "dE": grads1[0][tok], "dC": grads1[1][start:start + rows].clone()}
    if b is not None:
        one["dbias"] = grads1[2][start:start + rows].clone()
    del leaves, loss1, grads1

    # this rank's shard (and, under sequence parallelism, its tokens)
    e_in = e[tok].detach().requires_grad_()
    c_in = c[start:start + rows].detach().requires_grad_()
    b_in = None if b is None else b[start:start + rows].detach().requires_grad_()
    where = (dict(vocab_parallel_options=VocabParallelOptions(start, start + rows, group)) if case.vpo
             else dict(group=group, vocab_start=start))
    loss = linear_cross_entropy(e_in, c_in, t[tok], b_in, sequence_parallel=case.sp, **where, **kw)
    grads = torch.autograd.grad(differentiated(loss), [x for x in (e_in, c_in, b_in) if x is not None])
    got = {"loss": loss.detach(), "dE": grads[0], "dC": grads[1]}
    if b is not None:
        got["dbias"] = grads[2]

    # (b) float64
    valid = (t != IGNORE).double()
    g = valid / valid.sum() if case.reduction == "mean" else up.double() * valid
    tokens = _spread(tok.start, tok.stop, sizes.probe_tokens, e.device)
    probe = _spread(start, start + rows, sizes.probe_rows, e.device)
    ref = _float64_reference(e, c, b, t, vocab, g, tokens, probe, sizes.v_chunk, lse_cache)
    ref_loss = (ref["loss"] * g).sum() if case.reduction == "mean" else ref["loss"]

    checks = _Checks()
    fast = case.grad_in_forward is not False
    per_token_fast = fast and case.reduction == "none"
    checks.true(got["loss"].dtype == torch.float32, f"loss dtype {got['loss'].dtype}")
    checks.true(got["dE"].dtype == got["dC"].dtype == torch.bfloat16,
                f"gradient dtypes {got['dE'].dtype}/{got['dC'].dtype}, expected bf16")
    checks.close("loss vs one rank", got["loss"], one["loss"], 1e-4 if per_token_fast else 1e-5)
    checks.close("loss vs float64", got["loss"], ref_loss,
                 (1e-3 if per_token_fast else 5e-4) if fast else 1e-4)  # the fast mode: bf16 logits
    for name in ("dE", "dC", "dbias"):
        if name in got:
            checks.close(f"{name} vs one rank", got[name], one[name], ONE_RANK_GRAD_TOL)
    checks.close("dE vs float64", got["dE"][tokens - tok.start], ref["dE"], BF16_GRAD_TOL)
    checks.close("dC vs float64", got["dC"][probe - start], ref["dC"], BF16_GRAD_TOL)
    if b is not None:
        checks.close("dbias vs float64", got["dbias"][probe - start], ref["dbias"], BF16_GRAD_TOL)
    if vocab is not None:
        pad_from = max(0, min(rows, vocab - start))
        checks.true(not got["dC"][pad_from:].any() and (b is None or not got["dbias"][pad_from:].any()),
                    "padding rows got a non-zero gradient")
    return checks.problems


def _megatron_case(case: Case, inp: dict, sizes: Sizes, lse_cache: dict) -> list[str]:
    """The adapter's fused head (`_PatchState.fused_loss`, what a patched model's loss calls) on a
    megatron-core ColumnParallelLinear, against Megatron's own logits + vocab_parallel_cross_entropy
    on the same layer and against float64: hidden [s, b, h] (s = N/2, b = 2: token i = s·2 + b),
    labels [b, s] valid everywhere, a loss mask that drops every 13th position, the masked mean
    differentiated (Megatron's loss function)."""
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy

    from vocab_parallel_cce.distributed import clear_layout_cache
    from vocab_parallel_cce.integrations.megatron_head import MegatronLossOptions, _PatchState

    clear_layout_cache()
    group = parallel_state.get_tensor_model_parallel_group()
    tp, tp_rank = dist.get_world_size(group), dist.get_rank(group)
    e, c, t = inp["e"], inp["c"], inp["t"]
    n, d, v = sizes.n, sizes.d, sizes.v
    batch, s = 2, n // 2
    rows, start = v // tp, tp_rank * (v // tp)
    seq = slice(tp_rank * s // tp, (tp_rank + 1) * s // tp) if case.sp else slice(0, s)
    labels_flat = torch.where(t == IGNORE, 0, t)  # Megatron's labels are ids everywhere; the mask decides
    mask_flat = (t != IGNORE).float()
    labels = labels_flat.view(s, batch).T.contiguous()  # [b, s]
    loss_mask = mask_flat.view(s, batch).T.contiguous()
    hidden = e.view(s, batch, d)
    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=case.sp, params_dtype=torch.bfloat16,
                              use_cpu_initialization=e.device.type == "cpu", perform_initialization=False)
    layer = ColumnParallelLinear(d, v, config=cfg, init_method=lambda w: None, bias=False, gather_output=False)
    with torch.no_grad():
        layer.weight.copy_(c[start:start + rows])

    def masked_mean(per_token):
        return (per_token * loss_mask).sum() / loss_mask.sum()

    # Megatron's own loss (GPTModel.compute_language_model_loss's path)
    h_native = hidden[seq].detach().requires_grad_()
    logits, _ = layer(h_native)
    native_loss = vocab_parallel_cross_entropy(logits, labels.T.contiguous(), tp_group=layer.tp_group).T
    masked_mean(native_loss).backward()
    native = {"loss": (native_loss * loss_mask).detach(), "dE": h_native.grad, "dC": layer.weight.grad}
    del logits
    layer.weight.grad = None

    # the adapter's
    state = _PatchState(SimpleNamespace(config=cfg), layer,
                        MegatronLossOptions(grad_in_forward=case.grad_in_forward))
    state.loss_mask = loss_mask  # what the patched forward records from its loss_mask argument
    if case.main_grad:
        layer.gradient_accumulation_fusion = True  # after Megatron's own forward, which would need apex for it
        layer.weight.main_grad = torch.zeros(rows, d, dtype=torch.float32, device=e.device)
    h = hidden[seq].detach().requires_grad_()
    fused_loss = state.fused_loss(h, None, labels)
    masked_mean(fused_loss).backward()
    got = {"loss": (fused_loss * loss_mask).detach(), "dE": h.grad,
           "dC": layer.weight.main_grad if case.main_grad else layer.weight.grad}

    tokens = _spread(seq.start * batch, seq.stop * batch, sizes.probe_tokens, e.device)
    probe = _spread(start, start + rows, sizes.probe_rows, e.device)
    g = mask_flat.double() / mask_flat.sum()
    ref = _float64_reference(e, c, None, labels_flat, None, g, tokens, probe, sizes.v_chunk, lse_cache)

    checks = _Checks()
    checks.true(got["dC"] is not None and got["dE"] is not None, "no gradient reached the hidden states or weight")
    if checks.problems:
        return checks.problems
    if case.main_grad:
        checks.true(layer.weight.grad is None, "gradient-accumulation fusion: weight.grad was set as well")
    checks.close("masked loss vs Megatron", got["loss"], native["loss"], 1e-3)
    checks.close("masked loss vs float64", got["loss"].T.reshape(-1), ref["loss"] * mask_flat.double(),
                 1e-3 if case.grad_in_forward is not False else 1e-4)
    for name in ("dE", "dC"):
        checks.close(f"{name} vs Megatron", got[name], native[name], BF16_GRAD_TOL)
    checks.close("dE vs float64", got["dE"].reshape(-1, d)[tokens - seq.start * batch], ref["dE"], BF16_GRAD_TOL)
    checks.close("dC vs float64", got["dC"][probe - start], ref["dC"], BF16_GRAD_TOL)
    return checks.problems


def _collectives_case(groups: dict, rank: int, device: str) -> list[str]:
    """all_reduce, all_gather_single / all_gather_into_tensor and reduce_scatter_single /
    reduce_scatter_tensor (the names the library calls) on this device's tensors, over the groups
    of 4 and 3, with exact values; the in-place forms as the library's 16-bit dE sum uses them."""
    from vocab_parallel_cce.distributed import _all_gather_single, _reduce_scatter_single

    problems = []

    def attempt(what, fn):
        try:
            if not fn():
                problems.append(f"{what}: wrong values")
        except Exception as err:  # noqa: BLE001 - a collective gloo does not do raises here
            problems.append(f"{what}: {type(err).__name__}: {err}")

    for w in (4, 3):
        if rank >= w:
            continue
        group = groups[w]
        for dtype in (torch.float32, torch.bfloat16, torch.int64):
            tag = f"{w} ranks, {dtype}"

            def all_reduce():
                x = torch.full((5, 3), rank + 1, dtype=dtype, device=device)
                dist.all_reduce(x, group=group)
                return bool((x == w * (w + 1) // 2).all())

            def all_gather(in_place: bool):
                out = torch.full((2 * w, 3), -1, dtype=dtype, device=device)
                mine = out[2 * rank:2 * rank + 2] if in_place else torch.empty(2, 3, dtype=dtype, device=device)
                mine.fill_(rank)
                _all_gather_single(out, mine, group=group)
                want = torch.arange(w, device=device).repeat_interleave(2)[:, None].expand(2 * w, 3)
                return bool((out == want.to(dtype)).all())

            def reduce_scatter(in_place: bool):
                block = torch.arange(1, w + 1, device=device).repeat_interleave(2)[:, None].expand(2 * w, 3)
                x = (block * (rank + 1)).to(dtype).contiguous()
                out = x[2 * rank:2 * rank + 2] if in_place else torch.empty(2, 3, dtype=dtype, device=device)
                _reduce_scatter_single(out, x, group=group)
                return bool((out == (rank + 1) * w * (w + 1) // 2).all())

            attempt(f"all_reduce ({tag})", all_reduce)
            attempt(f"all-gather ({tag})", lambda: all_gather(False))
            attempt(f"all-gather in place ({tag})", lambda: all_gather(True))
            if dtype != torch.int64:
                attempt(f"reduce-scatter ({tag})", lambda: reduce_scatter(False))
                attempt(f"reduce-scatter in place ({tag})", lambda: reduce_scatter(True))
    return problems


# --------------------------------------------------------------------------------------------------
# the spawned rank


def _record(results: list, name: str, fn, device: str) -> bool:
    """Run one case on this rank and append (name, ok, message): its problems, or its time.
    False when it raised (its collectives may then be out of step with the other ranks')."""
    t0 = time.monotonic()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            problems = fn()
        problems += [f"the call fell back: {w.message}" for w in seen if FALLBACK_WARNING in str(w.message)]
        took = time.monotonic() - t0
        if took > CASE_LIMIT_S:
            problems.append(f"took {took:.1f} s on this rank, over the {CASE_LIMIT_S} s limit")
        results.append((name, not problems, "; ".join(problems) or f"{took:.1f} s"))
        return True
    except Exception:  # noqa: BLE001 - report everything to the parent
        results.append((name, False, traceback.format_exc()))
        return False
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def _megatron_skip() -> str | None:
    """None, or why megatron-core cannot be used here (a "SKIP: " message)."""
    try:
        import megatron.core  # noqa: F401
    except Exception as err:  # noqa: BLE001 - not installed, or not importable
        return f"SKIP: megatron-core is not importable ({type(err).__name__}: {err})"
    return None


@contextlib.contextmanager
def _megatron_parallel_state(device: str, all_ranks):
    """Megatron's model-parallel state with tensor-parallel groups of 2 over the 4 processes ([0, 1]
    and [2, 3]: both pairs run every case); on CPU with tests/support/megatron_cpu.py's stand-ins for
    the CUDA calls megatron-core makes."""
    from megatron.core import parallel_state

    dist.barrier(group=all_ranks)  # the ranks left idle by the smaller groups catch up here
    if device == "cpu":
        from support.megatron_cpu import cpu_megatron

        shims = cpu_megatron()
    else:
        shims = contextlib.nullcontext()
    with shims:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2,
                                                 distributed_timeout_minutes=GROUP_TIMEOUT_S // 60)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()


def _rank_main(rank: int, world: int, device: str) -> list:
    """Every case this rank takes part in, in CASES order (every rank creates every group first).
    After a case raised on this rank, the rest are reported as not run: its collectives could pair
    with the wrong ones of the other ranks."""
    assert world == PROCESSES
    if device == "cuda":
        torch.cuda.set_device(0)  # every process on the same GPU
    sizes = SIZES[device]
    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    groups = {w: dist.new_group(list(range(w)), timeout=timeout) for w in (2, 3, 4)}
    inp = _inputs(sizes, device)
    lse_cache: dict = {}
    results: list = []
    raised: list[str] = []

    def run(name, fn):
        if raised:
            results.append((name, False, f"not run: case {raised[0]!r} raised on this rank"))
        elif not _record(results, name, fn, device):
            raised.append(name)

    for case in CASES:
        if case.kind == "collectives":
            run(case.name, lambda: _collectives_case(groups, rank, device))
        elif case.kind == "loss" and rank < case.world:
            run(case.name, lambda: _loss_case(case, inp, groups[case.world], rank, sizes, lse_cache))
    megatron = [case for case in CASES if case.kind == "megatron"]
    skip = _megatron_skip()
    if skip:
        return results + [(case.name, True, skip) for case in megatron]
    if raised:
        for case in megatron:
            run(case.name, None)
        return results
    try:
        with _megatron_parallel_state(device, groups[4]):
            for case in megatron:
                run(case.name, lambda: _megatron_case(case, inp, sizes, lse_cache))
    except Exception:  # noqa: BLE001 - the set-up failed: report it as each case's result
        done = {name for name, _, _ in results}
        results += [(case.name, False, f"megatron set-up:\n{traceback.format_exc()}")
                    for case in megatron if case.name not in done]
    return results


# --------------------------------------------------------------------------------------------------
# pytest


_RUNS: dict[str, dict] = {}


def _run(device: str) -> dict:
    """{rank: [(case name, ok, message)]} of the one spawned run on `device` (run on first use)."""
    if device not in _RUNS:
        # an environment of their own makes the GPU ranks spawn (CUDA does not survive a fork)
        env = {"VPCCE_TEST_GPU_RANKS": "1"} if device == "cuda" else {"TRITON_INTERPRET": "1"}
        _RUNS[device] = run_group(_rank_main, PROCESSES, device, env=env, timeout_s=RUN_LIMIT_S)
    return _RUNS[device]


DEVICES = [
    pytest.param("cuda", marks=pytest.mark.gpu),
    pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get(CPU_SWITCH) != "1",
                                                 reason=f"the CPU run of the rank functions: set {CPU_SWITCH}=1")),
]


@pytest.fixture(autouse=True)
def _compiled_kernels(request):
    if request.node.callspec.params["device"] == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: run tests/gpu/test_gpu_multirank.py on its own")


@pytest.mark.xdist_group("gpu_multirank")
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("device", DEVICES)
def test_vocab_parallel_on_one_shared_gpu(device, case):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    results = _run(device)
    problems, skips = [], []
    for rank in range(PROCESSES if case.kind != "loss" else case.world):
        entries = [(ok, msg) for name, ok, msg in results[rank] if name == case.name]
        crashed = [msg for name, ok, msg in results[rank] if name == "<worker>"]
        if not entries:
            problems.append(f"[rank {rank}] no result for this case" + (f":\n{crashed[0]}" if crashed else ""))
            continue
        for ok, msg in entries:
            if ok and msg.startswith("SKIP: "):
                skips.append(msg[len("SKIP: "):])
            elif not ok:
                problems.append(f"[rank {rank}] {msg}")
    assert not problems, "\n".join(problems)
    if skips:
        pytest.skip(skips[0])
