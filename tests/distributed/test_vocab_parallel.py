"""Vocabulary parallelism over real gloo process groups (2, 3 and 4 CPU ranks).

Every rank builds the SAME full inputs from a shared seed, runs `linear_cross_entropy` on its
shard of the classifier, and compares loss and gradients with the float64 reference computed on
the FULL classifier in the same process. Many cases run inside one group per world size; the
ranks stay in lock-step because each case
runs every collective before it checks anything. The groups also run tests/support/grad_e_precision.py's
cases: bf16 dE under tensor parallelism at the tp=1 error against float64.
"""

from __future__ import annotations

import datetime
import importlib.util
import math
import time
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist

from support.process_groups import failures, record, run_group
from support.reference import reference_loss, rel_err

IGNORE = -100
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-6, 3e-5),
    torch.bfloat16: (2e-6, 1.5e-2),
}
ALL_OPTS = {"softcap": 3.0, "label_smoothing": 0.1, "z_loss": 2e-3}


@dataclass
class Case:
    name: str
    sizes: list  # rows of c held by each group rank
    order: list | None = None  # which group rank holds the 1st, 2nd, ... block of rows (default 0..W-1)
    vocab_size: int | None = None  # < sum(sizes): the last rows are padding
    opts: dict = field(default_factory=dict)  # softcap / label_smoothing / z_loss / ignore_index
    bias: bool = False
    reduction: str = "mean"
    lead: tuple = (12,)  # token dims of e and targets
    d: int = 16
    shift: int | bool = 0
    sp: bool = False  # sequence_parallel: e/targets sliced along dim 0
    reduce_grad_e: bool = True
    return_lse: bool = False
    dtype: torch.dtype = torch.float64
    api: str = "kwargs"  # "kwargs" (explicit vocab_start) | "default_start" | "vpo" (VocabParallelOptions)
    ignore_frac: float = 0.2
    all_ignored: bool = False
    int32: bool = False
    impl: str = "torch"
    gif: bool = False  # grad_in_forward=True, in chunks of 5 tokens (several chunks, one collective each)
    held: bool = False  # grad_in_forward=True, one chunk: the held-logits path (any upstream gradient)


def _layout(case: Case, grank: int):
    world = len(case.sizes)
    order = case.order or list(range(world))
    start = 0
    for r in order:
        if r == grank:
            return start, case.sizes[r]
        start += case.sizes[r]
    raise AssertionError("order must list every group rank")


def _run_case(case: Case, seed: int, group, grank: int, gworld: int) -> list[str]:
    """Run one case on this rank; return a list of problems (empty: pass)."""
    from vocab_parallel_cce import Tuning, VocabParallelOptions, linear_cross_entropy
    from vocab_parallel_cce.distributed import clear_layout_cache

    assert len(case.sizes) == gworld
    clear_layout_cache()  # the cache is keyed on this rank's shard only; other ranks' shards change
    g = torch.Generator().manual_seed(seed)
    v_rows = sum(case.sizes)
    vocab = case.vocab_size or v_rows
    ignore_index = case.opts.get("ignore_index", IGNORE)
    opts = {k: v for k, v in case.opts.items() if k != "ignore_index"}
    dt = case.dtype
    e_full = torch.randn(*case.lead, case.d, generator=g, dtype=torch.float64).to(dt)
    c_full = (torch.randn(v_rows, case.d, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(case.d))).to(dt)
    b_full = (torch.randn(v_rows, generator=g, dtype=torch.float64) * 0.5).to(dt) if case.bias else None
    targets = torch.randint(0, vocab, case.lead, generator=g)
    keep = torch.zeros(targets.numel(), dtype=torch.bool)
    keep[1::3] = True  # every third token is never ignored, so no rank's slice is all-ignored by chance
    drop = (torch.rand(case.lead, generator=g) < case.ignore_frac) & ~keep.view(case.lead)
    targets[drop] = ignore_index
    if case.all_ignored:
        targets.fill_(ignore_index)

    # ---- reference on the full classifier (float64, same values)
    e_r = e_full.double().requires_grad_()
    c_r = c_full.double().requires_grad_()
    b_r = None if b_full is None else b_full.double().requires_grad_()
    ref = reference_loss(e_r, c_r, targets, b_r, ignore_index=ignore_index, reduction=case.reduction,
                         shift=case.shift, vocab_size=case.vocab_size, return_lse=case.return_lse, **opts)
    ref_loss, ref_lse = ref if case.return_lse else (ref, None)
    w_loss = torch.rand(ref_loss.shape, generator=g, dtype=torch.float64) + 0.5
    if case.gif and case.reduction == "none":  # the mode needs one upstream value on non-ignored tokens
        shift = int(case.shift)
        used = targets[..., shift:] if shift else targets
        w_loss = torch.where(used != ignore_index, 0.75, w_loss)
    w_lse = None if ref_lse is None else torch.randn(ref_lse.shape, generator=g, dtype=torch.float64)

    def scalar(loss, lse):
        out = (loss.double() * w_loss).sum()
        if lse is not None:
            out = out + (lse.double() * w_lse).sum()
        return out

    ref_leaves = [t for t in (e_r, c_r, b_r) if t is not None]
    ref_grads = torch.autograd.grad(scalar(ref_loss, ref_lse), ref_leaves)
    de_ref, dc_ref = ref_grads[0], ref_grads[1]
    db_ref = ref_grads[2] if b_r is not None else None

    # ---- this rank's shard
    start, size = _layout(case, grank)
    c_loc = c_full[start:start + size].clone().requires_grad_()
    b_loc = None if b_full is None else b_full[start:start + size].clone().requires_grad_()
    if case.sp and gworld > 1:
        k = case.lead[0] // gworld
        assert k * gworld == case.lead[0]
        tok = slice(grank * k, (grank + 1) * k)
    else:
        tok = slice(None)
    e_loc = e_full[tok].clone().requires_grad_()
    t_loc = targets[tok].to(torch.int32 if case.int32 else torch.int64)

    kw = dict(ignore_index=ignore_index, reduction=case.reduction, shift=case.shift, return_lse=case.return_lse,
              vocab_size=case.vocab_size, sequence_parallel=case.sp, impl=case.impl, **opts)
    if case.gif:
        kw.update(grad_in_forward=True, tuning=Tuning(fast_chunk_tokens=5))
    if case.held:  # the default tuning: every case's logits fit one chunk; w_loss stays non-uniform
        kw.update(grad_in_forward=True)
    if case.api == "kwargs":
        kw.update(group=group, vocab_start=start, reduce_grad_e=case.reduce_grad_e)
    elif case.api == "default_start":
        kw.update(group=group, reduce_grad_e=case.reduce_grad_e)
    elif case.api == "vpo":
        kw.update(vocab_parallel_options=VocabParallelOptions(start, start + size, group, case.reduce_grad_e))
    else:
        raise AssertionError(case.api)
    out = linear_cross_entropy(e_loc, c_loc, t_loc, b_loc, **kw)
    loss, lse = out if case.return_lse else (out, None)
    leaves = [t for t in (e_loc, c_loc, b_loc) if t is not None]
    grads = torch.autograd.grad(scalar(loss, lse), leaves)
    de, dc = grads[0], grads[1]
    db = grads[2] if b_loc is not None else None
    de_check = de
    if not case.reduce_grad_e and not (case.sp and gworld > 1) and gworld > 1:
        de_check = de.double().clone()
        dist.all_reduce(de_check, group=group)  # the partial sums add up to the full gradient

    # ---- checks (no collectives below this line)
    problems = []
    loss_tol, grad_tol = TOL[dt]
    if case.impl == "triton" and dt == torch.bfloat16:
        # the fast mode's bf16 logits: the interpreter truncates their written-back downcast (the GPU
        # rounds), which biases the loss: 3e-3 there
        loss_tol = 3e-3

    def close(name, got, want, tol):
        if got.shape != want.shape:
            problems.append(f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}")
            return
        if not torch.isfinite(got).all():
            problems.append(f"{name}: non-finite values")
            return
        err = rel_err(got, want)
        if not err <= tol:
            problems.append(f"{name}: rel err {err:.3g} > {tol:.1g}")

    close("loss", loss, ref_loss, loss_tol)
    if case.return_lse:
        close("lse", lse, ref_lse, loss_tol)
    if de.dtype != dt or dc.dtype != dt:
        problems.append(f"gradient dtypes {de.dtype}/{dc.dtype} != {dt}")
    close("dE", de_check, de_ref[tok], grad_tol)
    close("dC", dc, dc_ref[start:start + size], grad_tol)
    if db is not None:
        close("dbias", db, db_ref[start:start + size], grad_tol)
    if case.vocab_size is not None:
        pad_from = max(0, min(size, case.vocab_size - start))
        if (dc[pad_from:] != 0).any() or (db is not None and (db[pad_from:] != 0).any()):
            problems.append("padding rows got a non-zero gradient")
    if case.all_ignored:
        if (loss != 0).any():
            problems.append("all ignored: loss is not exactly 0")
        if any((t != 0).any() for t in grads):
            problems.append("all ignored: gradients are not exactly 0")
    return problems


def _expect_raises(fn, exc, match) -> list[str]:
    import re

    try:
        fn()
    except exc as err:
        if re.search(match, str(err)):
            return []
        return [f"{type(err).__name__} raised but message {str(err)!r} does not match {match!r}"]
    except Exception as err:  # noqa: BLE001
        return [f"expected {exc.__name__}, got {type(err).__name__}: {err}"]
    return [f"expected {exc.__name__}, nothing raised"]


def _small_inputs(n=6, d=8, v_local=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=torch.float64)
    c = torch.randn(v_local, d, generator=g, dtype=torch.float64)
    t = torch.randint(0, v_local, (n,), generator=g)
    return e, c, t


def _layout_error_case(start_of, group, grank, gworld) -> list[str]:
    """Every rank must raise ValueError naming vocab_start (they all see the same bad layout)."""
    from vocab_parallel_cce import linear_cross_entropy
    from vocab_parallel_cce.distributed import clear_layout_cache

    clear_layout_cache()
    e, c, t = _small_inputs()
    return _expect_raises(
        lambda: linear_cross_entropy(e, c, t, group=group, vocab_start=start_of(grank), impl="torch"),
        ValueError, r"^vocab_start: .*do not tile")


def _bad_target_case(group, grank, gworld, seed) -> list[str]:
    """A target >= vocab_size (also one pointing at a padding row) gives NaN for that token only."""
    from vocab_parallel_cce import linear_cross_entropy
    from vocab_parallel_cce.distributed import clear_layout_cache

    clear_layout_cache()
    v_local, n, d = 4, 9, 8
    v_rows = v_local * gworld
    vocab = v_rows - 2
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=torch.float64)
    c = torch.randn(v_rows, d, generator=g, dtype=torch.float64)
    t = torch.randint(0, vocab, (n,), generator=g)
    t[2] = v_rows + 3  # beyond every shard
    t[5] = vocab  # a padding row
    t[7] = -3  # negative, not ignore_index
    c_loc = c[grank * v_local:(grank + 1) * v_local]
    none = linear_cross_entropy(e, c_loc, t, reduction="none", group=group, vocab_size=vocab, impl="torch")
    mean = linear_cross_entropy(e, c_loc, t, reduction="mean", group=group, vocab_size=vocab, impl="torch")
    ref = reference_loss(e, c, t, reduction="none", vocab_size=vocab)
    bad = torch.zeros(n, dtype=torch.bool)
    bad[[2, 5, 7]] = True
    problems = []
    if not torch.isnan(none[bad]).all():
        problems.append(f"out-of-range targets should give NaN, got {none[bad].tolist()}")
    if not torch.isfinite(none[~bad]).all() or rel_err(none[~bad], ref[~bad]) > 1e-10:
        problems.append("in-range tokens do not match the reference")
    if not torch.isnan(mean):
        problems.append(f"mean with an out-of-range target should be NaN, got {mean.item()}")
    return problems


def _mismatched_tokens_case(group, grank, gworld) -> list[str]:
    """Ranks passing different token counts get a clear error on every rank (not a gloo abort)."""
    from vocab_parallel_cce import linear_cross_entropy
    from vocab_parallel_cce.distributed import clear_layout_cache

    clear_layout_cache()
    e, c, t = _small_inputs(n=4 + grank)
    return _expect_raises(lambda: linear_cross_entropy(e, c, t, group=group, impl="torch"),
                          ValueError, r"different shapes")


def _destroyed_group_case(grank, gworld) -> list[str]:
    """A layout checked on a group that is then destroyed is not taken for a new group's (which
    may get the old one's id()): the new group's layout, the same on this rank only for rank 0, is
    checked afresh. (A reused entry would skip the collective on rank 0 alone: a timeout.)"""
    import gc

    from vocab_parallel_cce.distributed import shard_layout

    problems = []
    old = dist.new_group(list(range(gworld)))
    if shard_layout(old, 5 * grank, 5) != 5 * gworld:
        problems.append("first layout: wrong total")
    dist.destroy_process_group(old)
    del old
    gc.collect()
    new = dist.new_group(list(range(gworld)), timeout=datetime.timedelta(seconds=10))
    size = 5 if grank == 0 else 6  # rank 0 keeps [0, 5); the others grow by one row
    start = 0 if grank == 0 else 5 + 6 * (grank - 1)
    if shard_layout(new, start, size) != 5 + 6 * (gworld - 1):
        problems.append("the new group's layout was not checked afresh")
    return problems


def _graph_keeps_no_group_case(grank, gworld) -> list[str]:
    """The autograd graph of a grouped call (both modes, both fast paths, linear_log_probs) does not keep the
    group alive: with the outputs still referenced, destroy_process_group frees it (joining gloo's
    worker threads: one left running into interpreter exit can abort the process, DESIGN.md
    "Process-group lifetime"); a backward after the destroy raises a clear RuntimeError."""
    import gc
    import weakref

    from vocab_parallel_cce import Tuning, linear_cross_entropy, linear_log_probs

    problems = []
    e, c, t = _small_inputs()
    e.requires_grad_()
    c.requires_grad_()
    group = dist.new_group(list(range(gworld)))
    ref = weakref.ref(group)
    kept = [
        linear_cross_entropy(e, c, t, group=group, vocab_start=5 * grank, impl="torch"),
        linear_cross_entropy(e, c, t, group=group, vocab_start=5 * grank, impl="torch", grad_in_forward=True),
        linear_cross_entropy(e, c, t, group=group, vocab_start=5 * grank, impl="torch", grad_in_forward=True,
                             tuning=Tuning(fast_chunk_tokens=2)),  # the token-chunked fast path
        linear_log_probs(e, c, t, group=group, vocab_start=5 * grank, impl="torch")[0].sum(),
    ]
    for out in kept:
        out.backward()
    late = linear_cross_entropy(e, c, t, group=group, vocab_start=5 * grank, impl="torch")  # no backward yet
    dist.destroy_process_group(group)
    del group
    gc.collect()
    if ref() is not None:
        problems.append("the group outlives destroy_process_group while the outputs are alive: "
                        f"referred to by {[type(r).__name__ for r in gc.get_referrers(ref())]}")
    else:
        problems += _expect_raises(late.backward, RuntimeError, r"process group of this loss was destroyed")
    del kept
    return problems


def _single_device_equivalence(group, seed, expect_world) -> list[str]:
    """group=None (or a group of one rank) with the full classifier equals the plain call."""
    from vocab_parallel_cce import linear_cross_entropy

    g = torch.Generator().manual_seed(seed)
    e = torch.randn(10, 12, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(23, 12, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 23, (10,), generator=g)
    problems = []
    if group is not None and dist.get_world_size(group) != expect_world:
        problems.append("unexpected group size")
    for kw in ({}, {"label_smoothing": 0.2, "softcap": 2.0, "reduction": "none"}):
        plain = linear_cross_entropy(e, c, t, impl="torch", **kw)
        grouped = linear_cross_entropy(e, c, t, impl="torch", group=group, **kw)
        grouped_sp = linear_cross_entropy(e, c, t, impl="torch", group=group, sequence_parallel=group is not None,
                                          **kw)
        ref = reference_loss(e, c, t, **kw)
        for name, got in (("group", grouped), ("group+sp", grouped_sp)):
            if not torch.equal(got, plain):
                problems.append(f"{name} {kw}: differs from the call without a group")
        if rel_err(plain, ref) > 1e-10:
            problems.append(f"{kw}: the call without a group differs from the reference")
        ga = torch.autograd.grad(grouped.sum(), [e, c])
        gb = torch.autograd.grad(ref.sum(), [e, c])
        if any(rel_err(a, b) > 1e-10 for a, b in zip(ga, gb)):
            problems.append(f"{kw}: gradients differ from the reference")
    return problems


# --------------------------------------------------------------------------------------------------
# the case lists


def _cases(world: int) -> list[Case]:
    W = world
    even = [8] * W
    uneven = [5, 9, 3, 7][:W]
    uneven_order = list(reversed(range(W)))  # the last rank holds the first rows
    cases = [
        Case("even/plain/default_start", even, api="default_start"),
        Case("uneven/all/none/reversed", uneven, order=uneven_order, bias=True, opts=ALL_OPTS, reduction="none"),
        Case("padded/all/mean", even, vocab_size=W * 8 - 5, bias=True, opts=ALL_OPTS),
        Case("padded/last-shard-all-padding", [4] * W, vocab_size=(W - 1) * 4 - 1, bias=True,
             opts={"label_smoothing": 0.2}, reduction="none", return_lse=True),
        Case("sp/2d/mean", even, sp=True, lead=(4 * W,)),
        Case("sp/3d/shift1/all/none", uneven, sp=True, lead=(W, 7), shift=1, bias=True, opts=ALL_OPTS,
             reduction="none", return_lse=True),
        Case("reduce_grad_e=False/all/sum", uneven, bias=True, opts=ALL_OPTS, reduction="sum", reduce_grad_e=False),
        Case("vpo/reduce_e_grad=True", even, api="vpo", opts={"label_smoothing": 0.3}),
        Case("vpo/reduce_e_grad=False/uneven", uneven, order=uneven_order, api="vpo", reduce_grad_e=False,
             reduction="none"),
        Case("all-ignored/mean", even, bias=True, opts=ALL_OPTS, all_ignored=True),
        Case("fp32/sp/all", uneven, sp=True, lead=(2 * W,), bias=True, opts=ALL_OPTS, dtype=torch.float32),
        Case("gif/uneven/padded/all/mean", uneven, order=uneven_order, vocab_size=sum(uneven) - 2, bias=True,
             opts=ALL_OPTS, gif=True),
        Case("gif/sp/sum", even, sp=True, lead=(4 * W,), reduction="sum", gif=True),
        Case("gif/reduce_grad_e=False/all-ignored", uneven, reduce_grad_e=False, all_ignored=True, gif=True),
        Case("gif/sp/3d/shift1/all/none", even, sp=True, lead=(W, 7), shift=1, bias=True, opts=ALL_OPTS,
             reduction="none", gif=True),
        # the held-logits fast mode, per-token upstream gradients that are not uniform
        Case("held/uneven/padded/all/none/reversed", uneven, order=uneven_order, vocab_size=sum(uneven) - 2,
             bias=True, opts=ALL_OPTS, reduction="none", held=True),
        Case("held/uneven/sp/3d/shift1/all/none", uneven, sp=True, lead=(W, 7), shift=1, bias=True, opts=ALL_OPTS,
             reduction="none", held=True),
        Case("held/uneven/sp/bf16/all/mean", uneven, sp=True, lead=(4 * W,), bias=True, opts=ALL_OPTS,
             dtype=torch.bfloat16, held=True),
        Case("held/reduce_grad_e=False/sum", uneven, reduce_grad_e=False, opts={"label_smoothing": 0.1},
             reduction="sum", held=True),
        Case("held/all-ignored/none", even, bias=True, all_ignored=True, reduction="none", held=True),
    ]
    if W == 2:
        cases += [
            Case(f"even/{opt}/{red}", even, bias=opt == "bias", reduction=red, opts=opts)
            for opt, opts in (("bias", {}), ("softcap", {"softcap": 2.0}), ("label_smoothing", {"label_smoothing": 0.25}),
                              ("z_loss", {"z_loss": 1e-2}))
            for red in ("mean", "sum", "none")
        ]
        cases += [
            Case(f"all/{red}", even, bias=True, opts=ALL_OPTS, reduction=red, return_lse=True)
            for red in ("mean", "sum", "none")
        ]
        cases += [
            Case("3d/shift2/all/sum", uneven, lead=(3, 6), shift=2, bias=True, opts=ALL_OPTS, reduction="sum"),
            Case("3d/shift=True/none/lse", even, lead=(2, 5), shift=True, reduction="none", return_lse=True),
            Case("ignore_index=3", even, opts={"ignore_index": 3, "label_smoothing": 0.1}, reduction="none"),
            Case("int32 targets", uneven, int32=True, bias=True),
            Case("sp/2d/shift1/sum", even, sp=True, lead=(10,), shift=1, reduction="sum"),
            Case("sp/reduce_grad_e=False ignored under sp", uneven, sp=True, lead=(6,), reduce_grad_e=False),
            Case("sp/all-ignored/none", even, sp=True, lead=(4,), all_ignored=True, reduction="none"),
            Case("bf16/all/mean", even, bias=True, opts=ALL_OPTS, dtype=torch.bfloat16, lead=(20,)),
            Case("bf16/reduce_grad_e=False", uneven, dtype=torch.bfloat16, reduce_grad_e=False, reduction="sum"),
            Case("gif/bf16/all/sum", uneven, bias=True, opts=ALL_OPTS, dtype=torch.bfloat16, lead=(20,),
                 reduction="sum", gif=True),
            Case("vpo/sp/padded", even, vocab_size=13, api="vpo", sp=True, lead=(6,), opts={"label_smoothing": 0.1}),
        ]
    else:
        cases += [
            Case("all/sum/lse", even, bias=True, opts=ALL_OPTS, reduction="sum", return_lse=True),
            Case("3d/shift2/padded/vpo", uneven, lead=(2, 6), shift=2, vocab_size=sum(uneven) - 4, api="vpo",
                 opts={"label_smoothing": 0.1, "z_loss": 1e-3}, reduction="none"),
        ]
    return cases


def _world_worker(rank: int, world: int, base_seed: int):
    """Runs in every rank: all cases of this world size, then the special ones."""
    from support import grad_e_precision
    from vocab_parallel_cce import linear_cross_entropy

    results = []
    world_group = dist.group.WORLD
    for i, case in enumerate(_cases(world)):
        record(results, case.name, lambda: _run_case(case, base_seed + i, world_group, rank, world))
    # bf16 dE at the tp=1 error (all-reduce and reduce-scatter in float32): tests/support/grad_e_precision.py
    results += grad_e_precision.worker_results(rank, world, base_seed + 500)

    # group=None and groups of one rank behave like a single device
    record(results, "group=None", lambda: _single_device_equivalence(None, base_seed + 100, 1))
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    record(results, "group of size 1", lambda: _single_device_equivalence(singles[rank], base_seed + 101, 1))

    # an explicit new_group over all ranks (a different object from WORLD)
    all_group = dist.new_group(list(range(world)))
    record(results, "new_group(all)/uneven/all",
            lambda: _run_case(Case("x", [3, 6, 2, 5][:world], bias=True, opts=ALL_OPTS, reduction="none"),
                              base_seed + 102, all_group, rank, world))

    # layouts that do not tile the vocabulary: every rank raises ValueError naming vocab_start
    v_local = 5  # _small_inputs' shard size
    bad_layouts = {
        "gap": lambda r: r * (v_local + 1),
        "overlap": lambda r: r * (v_local - 1),
        "does not start at 0": lambda r: 1 + r * v_local,
        "duplicate": lambda r: 0,
    }
    for name, start_of in bad_layouts.items():
        record(results, f"layout error: {name}", lambda: _layout_error_case(start_of, world_group, rank, world))

    record(results, "out-of-range targets give NaN", lambda: _bad_target_case(world_group, rank, world, base_seed + 103))
    record(results, "different token counts per rank", lambda: _mismatched_tokens_case(world_group, rank, world))

    # a subgroup of some ranks; the others get a clear error
    if world >= 3:
        members = [0, 1] if world == 3 else [1, 3]
        sub = dist.new_group(members)
        if rank in members:
            grank = members.index(rank)
            record(results, "subgroup member", lambda: _run_case(
                Case("sub", [4, 7], order=[1, 0], bias=True, opts=ALL_OPTS, sp=True, lead=(6,), reduction="none"),
                base_seed + 104, sub, grank, len(members)))
            record(results, "subgroup member/default start", lambda: _run_case(
                Case("sub2", [6, 6], api="default_start", reduction="sum"), base_seed + 105, sub, grank, len(members)))
        else:
            e, c, t = _small_inputs()
            record(results, "non-member of subgroup", lambda: _expect_raises(
                lambda: linear_cross_entropy(e, c, t, group=sub, impl="torch"), ValueError, r"^group: .*not a member"))

    if world == 2:
        record(results, "layout cache: destroyed group", lambda: _destroyed_group_case(rank, world))
        record(results, "the graph keeps no group alive", lambda: _graph_keeps_no_group_case(rank, world))

    # a rank that never joins: a RuntimeError within the (short) group timeout, not a hang
    if world == 2:
        slow = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=5))
        if rank == 0:
            def missing_peer():
                e, c, t = _small_inputs()
                t0 = time.monotonic()
                problems = _expect_raises(
                    lambda: linear_cross_entropy(e, c, t, group=slow, impl="torch"),
                    RuntimeError, r"vocab_parallel_cce: collective")
                took = time.monotonic() - t0
                if took > 40:
                    problems.append(f"took {took:.0f} s with a 5 s timeout")
                return problems

            record(results, "peer never joins -> RuntimeError", missing_peer)
        dist.barrier(group=world_group)  # rank 1 waits here, outside the slow group's collective
    return results


@pytest.mark.parametrize("world", [2, 3, 4])
def test_vocab_parallel(world):
    results = run_group(_world_worker, world, 1000 * world, timeout_s=300)
    bad = failures(results)
    assert not bad, "\n".join(bad)
    n_cases = len(_cases(world))
    assert all(len(results[r]) >= n_cases + 8 for r in range(world)), {r: len(v) for r, v in results.items()}


# --------------------------------------------------------------------------------------------------
# impl="triton" under the Triton interpreter


def _triton_worker(rank: int, world: int, base_seed: int):
    try:
        import vocab_parallel_cce.triton_backend  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return [("<skip>", True, f"triton_backend does not import: {err!r}")]
    from support import interpreter

    interpreter.patch_bf16_dot()  # test set-up: the interpreter's bf16 tl.dot gap (bf16 case below)
    results = []
    cases = [
        # one case with everything: the interpreter is slow
        Case("triton/uneven/sp/padded/all/none/lse", [5, 11], order=[1, 0], vocab_size=14, bias=True, opts=ALL_OPTS,
             sp=True, lead=(8,), reduction="none", return_lse=True, dtype=torch.float32, impl="triton"),
        Case("triton/gif/uneven/padded/all/mean", [5, 11], vocab_size=15, bias=True, opts=ALL_OPTS,
             lead=(12,), dtype=torch.float32, impl="triton", gif=True),
        Case("triton/held/uneven/sp/padded/all/none", [5, 11], order=[1, 0], vocab_size=14, bias=True,
             opts=ALL_OPTS, sp=True, lead=(8,), reduction="none", dtype=torch.float32, impl="triton", held=True),
        Case("triton/held/bf16/uneven/sp/all/sum", [5, 11], bias=True, opts=ALL_OPTS, sp=True, lead=(10,),
             reduction="sum", dtype=torch.bfloat16, impl="triton", held=True),
    ]
    for i, case in enumerate(cases):
        record(results, case.name, lambda: _run_case(case, base_seed + i, dist.group.WORLD, rank, world))
    from support import grad_e_precision  # bf16 dE at the tp=1 error, the kernels' float32 dE handed to the collectives

    results += grad_e_precision.worker_results(rank, world, base_seed + 500, torch_cases=False, triton=True)
    return results


@pytest.mark.slow
def test_vocab_parallel_triton_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if importlib.util.find_spec("vocab_parallel_cce.triton_backend") is None:
        pytest.skip("vocab_parallel_cce/triton_backend.py does not exist yet")
    results = run_group(_triton_worker, 2, 77, env={"TRITON_INTERPRET": "1"}, timeout_s=300)
    skip = [msg for r in results.values() for name, _, msg in r if name == "<skip>"]
    if skip:
        pytest.skip(skip[0])
    bad = failures(results)
    assert not bad, "\n".join(bad)
