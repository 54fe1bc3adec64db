"""The options and outputs beyond the plain loss under vocabulary parallelism, on real gloo groups
of 2 and 3 CPU ranks.

Every rank builds the same full inputs from a shared seed, runs on its shard (uneven, reordered,
padded shards; sequence parallel) and compares with the float64 reference on the FULL classifier:
linear_log_probs (log-probs and entropy, random upstream gradients), class weights, token
accuracy / predicted tokens with exact ties on different ranks, the z-loss output, exactly one
statistics all-gather per call (per token chunk in the fast mode, whose weighted smoothing, z-loss
output, accuracy and predicted tokens also equal one process's), Apple CCE's VocabParallelOptions
with group=None (the default group) and from_vocab, and a DTensor classifier sharded along the
vocabulary. Where the Triton interpreter is on (CPU machines: tests/conftest.py), the 2-rank group
also runs the kernels.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
import torch.distributed as dist

from support.process_groups import failures, record, run_group
from support.reference import reference_argmax, reference_log_probs, reference_loss, rel_err


def _shard(sizes, order, grank):
    """(start, size) of this group rank when the blocks of rows go to ranks in `order`."""
    start = 0
    for r in order:
        if r == grank:
            return start, sizes[r]
        start += sizes[r]
    raise AssertionError(order)


def _full_inputs(seed, lead, d, v, vocab, dtype=torch.float64, ignore=True):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(*lead, d, generator=g, dtype=torch.float64).to(dtype)
    c = (torch.randn(v, d, generator=g, dtype=torch.float64) * 2 / math.sqrt(d)).to(dtype)
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    t = torch.randint(0, vocab, lead, generator=g)
    if ignore:
        t.view(-1)[::4] = -100
    w = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.2
    up = torch.randn(lead, generator=g, dtype=torch.float64), torch.randn(lead, generator=g, dtype=torch.float64)
    return e, c, b, t, w, up


class _Count:
    """Counts the statistics all-gathers ("combine per-token LSE") of this process."""

    def __init__(self):
        import vocab_parallel_cce.distributed as vp

        self.vp, self.real, self.n = vp, vp.all_gather_along_dim0, 0

        def counted(t, group, what):
            self.n += what == "combine per-token LSE"
            return self.real(t, group, what)

        vp.all_gather_along_dim0 = counted

    def close(self):
        self.vp.all_gather_along_dim0 = self.real


def _close(problems, name, got, want, tol):
    if got.shape != want.shape:
        problems.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    elif not torch.isfinite(got).all():
        problems.append(f"{name}: non-finite values")
    elif not rel_err(got, want) <= tol:
        problems.append(f"{name}: rel err {rel_err(got, want):.3g} > {tol:.1g}")


def _tokens(sp, lead, grank, world):
    if not sp:
        return slice(None)
    k = lead[0] // world
    return slice(grank * k, (grank + 1) * k)

def _local_leaves(e, c, b, sizes, order, grank, sp, lead, world):
    """(shard start, shard size, this rank's token index, its leaves e [tokens], c and b [shard rows])."""
    start, size = _shard(sizes, order, grank)
    tok = _tokens(sp, lead, grank, world)
    e_loc = e[tok].clone().requires_grad_()
    c_loc, b_loc = (x[start:start + size].clone().requires_grad_() for x in (c, b))
    return start, size, tok, e_loc, c_loc, b_loc



def _rl_case(seed, grank, world, sizes, order, vocab=None, sp=False, lead=(12,), shift=0, reduce_grad_e=True,
             impl="torch", dtype=torch.float64, tol=(1e-11, 1e-10)):
    from vocab_parallel_cce import linear_log_probs
    from vocab_parallel_cce.distributed import clear_layout_cache

    clear_layout_cache()
    v = sum(sizes)
    vocab = vocab or v
    e, c, b, t, _, (w1, w2) = _full_inputs(seed, lead, 10, v, vocab, dtype)
    kw = dict(temperature=0.7, softcap=3.0, shift=shift)
    leaves = [x.double().requires_grad_() for x in (e, c, b)]
    rlp, rent = reference_log_probs(leaves[0], leaves[1], t, leaves[2], vocab_size=vocab if vocab < v else None, **kw)
    used = (Ellipsis, slice(shift, None)) if shift else (Ellipsis,)
    w1, w2 = w1[used], w2[used]
    ref_grads = torch.autograd.grad((rlp * w1).sum() + (rent * w2).sum(), leaves)

    start, size, tok, e_loc, c_loc, b_loc = _local_leaves(e, c, b, sizes, order, grank, sp, lead, world)
    counter = _Count()
    try:
        lp, ent = linear_log_probs(e_loc, c_loc, t[tok], bias=b_loc, group=dist.group.WORLD, vocab_start=start,
                                   vocab_size=vocab, sequence_parallel=sp, reduce_grad_e=reduce_grad_e, impl=impl, **kw)
    finally:
        counter.close()
    de, dc, db = torch.autograd.grad((lp.double() * w1).sum() + (ent.double() * w2).sum(), (e_loc, c_loc, b_loc))
    if not reduce_grad_e and not sp:
        de = de.double().clone()
        dist.all_reduce(de)
    problems = []
    if counter.n != 1:
        problems.append(f"{counter.n} statistics all-gathers, expected 1")
    _close(problems, "log_probs", lp, rlp, tol[0])
    _close(problems, "entropy", ent, rent, tol[0])
    _close(problems, "dE", de, ref_grads[0][tok], tol[1])
    _close(problems, "dC", dc, ref_grads[1][start:start + size], tol[1])
    _close(problems, "dbias", db, ref_grads[2][start:start + size], tol[1])
    if vocab < v and (dc[max(0, vocab - start):] != 0).any():
        problems.append("padding rows got a gradient")
    return problems


def _weights_case(seed, grank, world, sizes, order, reduction, vocab=None, sp=False, lead=(12,), ls=0.1, zl=1e-2,
                  padded_weights=False):
    from vocab_parallel_cce import linear_cross_entropy
    from vocab_parallel_cce.distributed import clear_layout_cache

    clear_layout_cache()
    v = sum(sizes)
    vocab = vocab or v
    e, c, b, t, w, (up, _) = _full_inputs(seed, lead, 8, v, vocab)
    if padded_weights:
        w = torch.cat([w, torch.full((v - vocab,), 7.0, dtype=w.dtype)])
    kw = dict(reduction=reduction, label_smoothing=ls, z_loss=zl)
    leaves = [x.double().requires_grad_() for x in (e, c, b)]
    ref = reference_loss(*leaves[:2], t, leaves[2], vocab_size=vocab if vocab < v else None, class_weights=w, **kw)
    ref_grads = torch.autograd.grad((ref * (up if reduction == "none" else 1.0)).sum(), leaves)
    start, size, tok, e_loc, c_loc, b_loc = _local_leaves(e, c, b, sizes, order, grank, sp, lead, world)
    loss = linear_cross_entropy(e_loc, c_loc, t[tok], b_loc, group=dist.group.WORLD, vocab_start=start, vocab_size=vocab,
                                sequence_parallel=sp, class_weights=w, impl="torch", **kw)
    de, dc, db = torch.autograd.grad((loss * (up if reduction == "none" else 1.0)).sum(), (e_loc, c_loc, b_loc))
    problems = []
    _close(problems, "loss", loss, ref, 1e-11)
    _close(problems, "dE", de, ref_grads[0][tok], 1e-10)
    _close(problems, "dC", dc, ref_grads[1][start:start + size], 1e-10)
    _close(problems, "dbias", db, ref_grads[2][start:start + size], 1e-10)
    return problems


def _accuracy_case(seed, grank, world, sizes, order, impl="torch", dtype=torch.float64, sp=False, lead=(12,)):
    """Rows 1, v−2 and the first row of the last rank's block are copies: exact ties on
    different ranks, resolved to the smallest global id. Logits are exact in every dtype and
    summation order (e: integers, c: multiples of 1/8), so the copies' logits are bit-equal in the
    kernels and in the float64 reference, whatever BLAS computes it; two of every three tokens are
    aligned with row 1 (their maximum is the tie)."""
    from vocab_parallel_cce import linear_cross_entropy
    from vocab_parallel_cce.distributed import clear_layout_cache

    clear_layout_cache()
    v = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(-4, 5, (*lead, 8), generator=g).double()
    c = torch.randint(-1, 2, (v, 8), generator=g).double() / 8
    t = torch.randint(0, v, lead, generator=g)
    t.view(-1)[::4] = -100
    c[1] = (torch.randint(0, 2, (8,), generator=g) * 2 - 1).double() / 8  # no zeros
    tie = [1, v - 2, v - sizes[order[-1]]]
    c[tie[1:]] = c[1].clone()
    e.view(-1, 8)[torch.arange(e.numel() // 8) % 3 != 2] = 4 * torch.sign(c[1])  # z = 4, the largest
    e, c = e.to(dtype), c.to(dtype)
    t.view(-1)[1::3] = 1
    start, size = _shard(sizes, order, grank)
    tok = _tokens(sp, lead, grank, world)
    counter = _Count()
    try:
        out = linear_cross_entropy(e[tok], c[start:start + size], t[tok], group=dist.group.WORLD, vocab_start=start,
                                   sequence_parallel=sp, impl=impl, reduction="none", z_loss=1e-2, return_z_loss=True,
                                   return_token_accuracy=True, return_predicted_tokens=True)
    finally:
        counter.close()
    pred = reference_argmax(e, c)
    valid = t != -100
    _, lse = reference_loss(e, c, t, reduction="none", return_lse=True)
    problems = []
    if counter.n != 1:
        problems.append(f"{counter.n} statistics all-gathers, expected 1")
    if not torch.equal(out.predicted_tokens, torch.where(valid, pred, -1)):
        problems.append(f"predicted tokens {out.predicted_tokens.tolist()} != {torch.where(valid, pred, -1).tolist()}")
    if not (pred[valid] == 1).any():
        problems.append("the tie did not happen (test set-up)")
    if not torch.equal(out.token_accuracy, ((pred == t) & valid).float()):
        problems.append("token accuracy")
    _close(problems, "z_loss", out.z_loss, torch.where(valid, 1e-2 * lse**2, 0.0), 1e-10 if dtype == torch.float64 else 1e-5)
    return problems


def _fast_case(seed, grank, world, sizes, order, reduction, vocab=None, sp=False, lead=(12,), chunk=None,
               impl="torch", dtype=torch.float64, tol=(1e-11, 1e-10)):
    """grad_in_forward=True with class-weighted label smoothing and a z-loss (returned too; "mean":
    two divisors), token accuracy and predicted tokens, on uneven shards: equal to the same call in
    one process on the full classifier, and to the float64 references; one statistics all-gather per
    token chunk. Logits are exact in every dtype (e: integers, c and bias: multiples of 1/8), so the
    ties between row 1 and its copies (on other ranks) are exact however each rank sums."""
    from vocab_parallel_cce import Tuning, linear_cross_entropy
    from vocab_parallel_cce.distributed import clear_layout_cache

    clear_layout_cache()
    v = sum(sizes)
    vocab = vocab or v
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(-3, 4, (*lead, 8), generator=g).double()
    c = torch.randint(-1, 2, (v, 8), generator=g).double() / 8
    b = torch.randint(-4, 5, (v,), generator=g).double() / 8
    t = torch.randint(0, vocab, lead, generator=g)
    t.view(-1)[::4] = -100
    w = torch.rand(v, generator=g, dtype=torch.float64) + 0.2
    c[1] = (torch.randint(0, 2, (8,), generator=g) * 2 - 1).double() / 8  # no zeros
    b[1] = 0.5  # the largest bias: for the aligned tokens below, row 1 (and its copies) is the maximum
    last_block = v - sizes[order[-1]]
    tie = [r for r in (vocab - 2, last_block) if 1 < r < vocab]
    c[tie], b[tie] = c[1].clone(), b[1].clone()
    e.view(-1, 8)[1::3] = 3 * torch.sign(c[1])
    t.view(-1)[4::6] = 1
    e, c, b = e.to(dtype), c.to(dtype), b.to(dtype)
    weights = w.to(torch.float64 if dtype == torch.float64 else torch.float32)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2, class_weights=weights, softcap=None, impl=impl,
              grad_in_forward=True, return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True,
              tuning=Tuning(fast_chunk_tokens=chunk), vocab_size=vocab)
    valid = t != -100
    up = torch.where(valid, 0.37, 0.0).double() if reduction == "none" else 0.37  # uniform: the fast mode's condition

    def grads_of(out, leaves):
        return torch.autograd.grad((out.loss.double() * up).sum(), leaves)

    single_leaves = [x.clone().requires_grad_() for x in (e, c, b)]
    single = linear_cross_entropy(*single_leaves[:2], t, single_leaves[2], **kw)  # one process, the full classifier
    single_grads = grads_of(single, single_leaves)

    start, size, tok, e_loc, c_loc, b_loc = _local_leaves(e, c, b, sizes, order, grank, sp, lead, world)
    counter = _Count()
    try:
        out = linear_cross_entropy(e_loc, c_loc, t[tok], b_loc, group=dist.group.WORLD, vocab_start=start,
                                   sequence_parallel=sp, **kw)
    finally:
        counter.close()
    de, dc, db = grads_of(out, (e_loc, c_loc, b_loc))
    problems = []
    n_tokens = t.numel()
    chunks = 1 if chunk is None else -(-n_tokens // chunk)
    if counter.n != chunks:
        problems.append(f"{counter.n} statistics all-gathers, expected {chunks} (one per chunk)")
    for name in ("loss", "z_loss", "token_accuracy"):
        _close(problems, f"{name} vs one process", getattr(out, name), getattr(single, name), tol[0])
    if not torch.equal(out.predicted_tokens, single.predicted_tokens):
        problems.append(f"predicted tokens {out.predicted_tokens.tolist()} != one process's "
                        f"{single.predicted_tokens.tolist()}")
    _close(problems, "dE vs one process", de, single_grads[0][tok], tol[1])
    _close(problems, "dC vs one process", dc, single_grads[1][start:start + size], tol[1])
    _close(problems, "dbias vs one process", db, single_grads[2][start:start + size], tol[1])
    # and the float64 references
    ref_leaves = [x.double().requires_grad_() for x in (e, c, b)]
    ref, lse = reference_loss(*ref_leaves[:2], t, ref_leaves[2], vocab_size=vocab, reduction=reduction,
                              label_smoothing=0.1, z_loss=1e-2, class_weights=w, return_lse=True)
    _close(problems, "loss vs float64", out.loss, ref, tol[0])
    zl = torch.where(valid, 1e-2 * lse.detach() ** 2, 0.0)
    _close(problems, "z_loss vs float64", out.z_loss,
           {"mean": zl.sum() / valid.sum(), "sum": zl.sum(), "none": zl}[reduction], tol[0])
    pred = reference_argmax(e, c, bias=b, vocab_size=vocab)
    if not torch.equal(out.predicted_tokens, torch.where(valid, pred, -1)):
        problems.append("predicted tokens differ from the float64 argmax")
    if not (pred[valid] == 1).any() or (valid & (pred == t)).sum() == 0:
        problems.append("the tie / the hits did not happen (test set-up)")
    ref_grads = torch.autograd.grad((ref * up).sum(), ref_leaves)
    _close(problems, "dC vs float64", dc, ref_grads[1][start:start + size], tol[1])
    if vocab < v and (dc[max(0, vocab - start):] != 0).any():
        problems.append("padding rows got a gradient")
    return problems


def _apple_case(seed, grank, world):
    """Apple CCE's VocabParallelOptions(start, stop) leaves group=None: the default group."""
    from vocab_parallel_cce import VocabParallelOptions, linear_cross_entropy
    from vocab_parallel_cce.distributed import clear_layout_cache

    clear_layout_cache()
    v = 23
    opts = VocabParallelOptions.from_vocab(v)
    sizes = [v // world + (r < v % world) for r in range(world)]
    problems = []
    if (opts.start, opts.stop) != (sum(sizes[:grank]), sum(sizes[:grank + 1])):
        problems.append(f"from_vocab gave [{opts.start}, {opts.stop})")
    e, c, b, t, _, _ = _full_inputs(seed, (3, 5), 8, v, v)
    e = e.requires_grad_()
    for options in (opts, VocabParallelOptions(opts.start, opts.stop)):
        c_loc = c[options.start:options.stop].clone().requires_grad_()
        loss = linear_cross_entropy(e, c_loc, t, None, -100, None, "mean", 1, False, "auto", False, False, True, True,
                                    "torch_compile", options)  # Apple's positional order
        de, dc = torch.autograd.grad(loss, (e, c_loc))
        _close(problems, "loss", loss, reference_loss(e, c, t, shift=1), 1e-10)
        e64, c64 = e.detach().clone().requires_grad_(), c.clone().requires_grad_()
        rde, rdc = torch.autograd.grad(reference_loss(e64, c64, t, shift=1), (e64, c64))
        _close(problems, "dE", de, rde, 1e-10)
        _close(problems, "dC", dc, rdc[options.start:options.stop], 1e-10)
    return problems


def _dtensor_case(seed, grank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from vocab_parallel_cce import linear_cross_entropy, linear_log_probs
    from vocab_parallel_cce.distributed import clear_layout_cache

    clear_layout_cache()
    mesh = init_device_mesh("cpu", (world,))
    v = 4 * world + 3  # uneven torch.chunk shards
    e, c, b, t, w, (up, _) = _full_inputs(seed, (10,), 8, v, v)
    problems = []
    c_dt = torch.nn.Parameter(distribute_tensor(c.clone(), mesh, [Shard(0)]))
    b_dt = torch.nn.Parameter(distribute_tensor(b.clone(), mesh, [Replicate()]))
    e_loc = e.clone().requires_grad_()
    loss = linear_cross_entropy(e_loc, c_dt, t, b_dt, label_smoothing=0.1, class_weights=w, impl="torch")
    lp, ent = linear_log_probs(e_loc, c_dt, t, bias=b_dt, impl="torch")
    (loss + (lp * up).sum() + ent.sum()).backward()
    leaves = [x.clone().requires_grad_() for x in (e, c, b)]
    ref = reference_loss(*leaves[:2], t, leaves[2], label_smoothing=0.1, class_weights=w)
    rlp, rent = reference_log_probs(*leaves[:2], t, leaves[2])
    (ref + (rlp * up).sum() + rent.sum()).backward()
    _close(problems, "loss", loss, ref, 1e-11)
    _close(problems, "log_probs", lp, rlp, 1e-11)
    _close(problems, "dE", e_loc.grad, leaves[0].grad, 1e-10)
    _close(problems, "dC (DTensor)", c_dt.grad.full_tensor(), leaves[1].grad, 1e-10)
    _close(problems, "dbias (DTensor)", b_dt.grad.full_tensor(), leaves[2].grad, 1e-10)
    try:
        linear_cross_entropy(e, c_dt.detach(), t, group=dist.group.WORLD, impl="torch")
        problems.append("a sharded DTensor with group= did not raise")
    except ValueError as err:
        if not str(err).startswith("c: "):
            problems.append(f"unexpected message {err}")
    return problems


def _worker(rank: int, world: int, base: int):
    results = []
    uneven = [5, 9, 3][:world]
    rev = list(reversed(range(world)))
    even = list(range(world))
    cases = {
        "rl/uneven/reversed": lambda s: _rl_case(s, rank, world, uneven, rev),
        "rl/padded/shift/3d": lambda s: _rl_case(s, rank, world, [6] * world, even, vocab=6 * world - 4,
                                                  lead=(2, 7), shift=1),
        "rl/sp/reduce_grad_e ignored": lambda s: _rl_case(s, rank, world, uneven, even, sp=True, lead=(4 * world,)),
        "rl/reduce_grad_e=False": lambda s: _rl_case(s, rank, world, uneven, rev, reduce_grad_e=False),
        "rl/last shard all padding": lambda s: _rl_case(s, rank, world, [4] * world, even, vocab=4 * (world - 1) - 1),
        "weights/mean/padded/reversed": lambda s: _weights_case(s, rank, world, uneven, rev, "mean",
                                                               vocab=sum(uneven) - 2),
        "weights/none/sp": lambda s: _weights_case(s, rank, world, uneven, even, "none", sp=True, lead=(3 * world,)),
        "weights/sum/padded weights": lambda s: _weights_case(s, rank, world, [5] * world, even, "sum",
                                                             vocab=5 * world - 3, padded_weights=True),
        "weights/mean/no smoothing": lambda s: _weights_case(s, rank, world, uneven, even, "mean", ls=0.0),
        "accuracy/ties across ranks": lambda s: _accuracy_case(s, rank, world, uneven, even),
        "accuracy/reversed/sp": lambda s: _accuracy_case(s, rank, world, uneven, rev, sp=True, lead=(3 * world,)),
        "apple/group=None": lambda s: _apple_case(s, rank, world),
        "fast/none/chunks/uneven/reversed": lambda s: _fast_case(s, rank, world, uneven, rev, "none", chunk=5),
        "fast/mean (two divisors)/padded": lambda s: _fast_case(s, rank, world, uneven, even, "mean",
                                                               vocab=sum(uneven) - 2),
        "fast/sum/sp/reversed": lambda s: _fast_case(s, rank, world, uneven, rev, "sum", sp=True, lead=(4 * world,),
                                                     chunk=7),
    }
    if importlib.util.find_spec("torch.distributed.tensor") is not None:
        cases["dtensor classifier"] = lambda s: _dtensor_case(s, rank, world)
    if world == 2 and os.environ.get("TRITON_INTERPRET") == "1":  # the kernels, in the interpreter (CPU runs)
        from support import interpreter

        interpreter.patch_bf16_dot()  # test set-up: the interpreter's bf16 tl.dot gap (the bf16
        # fast mode's float32 dE partial under a group is a Triton product on CPU)
        cases["triton/rl/uneven/padded/sp"] = lambda s: _rl_case(
            s, rank, world, [5, 11], [1, 0], vocab=14, sp=True, lead=(8,), impl="triton", dtype=torch.float32,
            tol=(2e-5, 2e-5))
        cases["triton/accuracy/ties"] = lambda s: _accuracy_case(s, rank, world, [7, 10], [0, 1], impl="triton",
                                                                dtype=torch.float32)
        cases["triton/fast/mean/padded/reversed"] = lambda s: _fast_case(
            s, rank, world, [7, 12], [1, 0], "mean", vocab=17, impl="triton", dtype=torch.float32, chunk=5,
            tol=(2e-5, 2e-5))
        cases["triton/fast/none/bf16"] = lambda s: _fast_case(
            s, rank, world, [9, 6], [0, 1], "none", impl="triton", dtype=torch.bfloat16, tol=(1e-5, 2e-2))
    for i, (name, fn) in enumerate(cases.items()):
        record(results, name, lambda: fn(base + i))
    return results


@pytest.mark.parametrize("world", [pytest.param(2, marks=pytest.mark.exact), 3])  # exact ties across ranks
def test_features_vocab_parallel(world):
    results = run_group(_worker, world, 7000 + world, timeout_s=300)
    bad = failures(results)
    assert not bad, "\n".join(bad)
    assert all(len(r) >= 12 for r in results.values())
