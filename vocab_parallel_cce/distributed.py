"""Cross-rank pieces of the vocabulary-parallel loss (torch.distributed).

Each rank holds vocabulary rows [s_r, s_r + V_r). Its kernel gives per-token partial statistics
(lse_r, x_r, s_r); they combine as
    lse = log Σ_r exp(lse_r)   (max first),   x = Σ_r x_r,   s = Σ_r s_r
(and the optional statistics of stats.py: entropy's pz, max / argmax) in ONE all-gather of a
[k, N] float32 block per rank (k = 3 for the plain loss; never logits). Also: the check that the
ranks' shards tile the vocabulary (cached per group), and the sum of the ranks' partial
hidden-state gradients (all-reduce, or reduce-scatter under sequence parallelism; in float32 for
16-bit inputs, rounded once after the sum: `sum_grad_e`).
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from . import stats


# torch >= 2.13 deprecates the *_tensor names in favour of *_single; older torch lacks the latter.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_SHAPE_HEADER = 9  # ndim + up to 8 sizes


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return dist.get_rank(group)


def _wait(work, what: str) -> None:
    try:
        work.wait()
    except RuntimeError as err:  # timeouts and peer failures surface here
        raise RuntimeError(
            f"vocab_parallel_cce: collective '{what}' failed (a rank did not join in time, "
            f"or ranks passed different token counts): {err}"
        ) from err


def _check_same_shape(t: torch.Tensor, group, what: str) -> None:
    """CPU tensors only: raise on every rank if the ranks' shapes differ.

    gloo aborts the whole process (SIGABRT, "Received data size doesn't match expected size") on a
    size mismatch, so check first with one tiny fixed-size all-gather. Skipped for accelerator
    tensors, where reading the result back would cost a host sync.
    """
    if t.device.type != "cpu" or t.dim() >= _SHAPE_HEADER:
        return
    world = group_size(group)
    header = torch.full((_SHAPE_HEADER,), -1, dtype=torch.int64)
    header[0] = t.dim()
    header[1 : 1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    out = header.new_empty((world * _SHAPE_HEADER,))
    _wait(_all_gather_single(out, header, group=group, async_op=True), what + " (shape check)")
    shapes = [tuple(h[1 : 1 + int(h[0])].tolist()) for h in out.view(world, _SHAPE_HEADER)]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(
            f"e/targets: the ranks passed tensors of different shapes to collective '{what}' "
            f"(by group rank: {shapes}); every rank must pass the same number of tokens"
        )


def all_gather_along_dim0(t: torch.Tensor, group, what: str) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0 (equal shapes on every rank)."""
    world = group_size(group)
    _check_same_shape(t, group, what)
    out = t.new_empty((world * t.shape[0],) + tuple(t.shape[1:]))
    _wait(_all_gather_single(out, t.contiguous(), group=group, async_op=True), what)
    return out


def combine_shard_stats(lse: torch.Tensor, x: torch.Tensor, s: torch.Tensor, group):
    """Global (lse, x, s) from each rank's partial values, [N] each (float32, or float64)."""
    return combine_stats((lse, x, s), stats.BASE, group)


def combine_stats(partial, names: tuple[str, ...], group) -> tuple[torch.Tensor, ...]:
    """The global statistics `names` (stats.py) from this rank's partial ones, [N] each (float32,
    or float64), in ONE all-gather of the stacked [k, N] block (argmax as global ids)."""
    stacked = torch.stack(tuple(partial))  # [k, N]
    gathered = all_gather_along_dim0(stacked[None], group, "combine per-token LSE")  # [world, k, N]
    return stats.merge(gathered, names)


def _round_rows_into(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst ← src (float32 [n, d]) in dst's narrower (16-bit) dtype, front to back. dst may overlap
    src's storage as long as each dst row starts at or before the same src row's bytes, so no
    second [n, d] buffer is needed: the first ~1M elements go through a copy (`tmp`), then blocks
    [r0, 2·r0) convert directly, since such a block's dst bytes end where src row r0 starts
    (2·2·r0·d ≤ 4·r0·d bytes past the starts) and cover only src rows < r0, already read. That is
    ~log2(n·d / 2^20) conversions instead of one copy and one conversion per 1M elements."""
    n = src.shape[0]
    r1 = min(n, max(1, (1 << 20) // max(src.shape[1], 1)))
    dst[:r1].copy_(src[:r1].to(dst.dtype))
    while r1 < n:
        r0, r1 = r1, min(n, 2 * r1)
        dst[r0:r1].copy_(src[r0:r1])


def narrow_in_place(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Convert a contiguous float32 [n, d] tensor to `dtype` inside its own storage (the result
    views its first bytes)."""
    n, d = acc.shape
    out = acc.view(-1).view(dtype)[: n * d].view(n, d)
    _round_rows_into(acc, out)
    return out


def _rows_of(t: torch.Tensor, group) -> tuple[int, int]:
    """(first row, rows) of this rank's block of t [N, ...] split evenly over the group."""
    rows = t.shape[0] // group_size(group)
    return group_rank(group) * rows, rows


def sum_grad_e(de: torch.Tensor, dtype: torch.dtype, group, scatter: bool) -> torch.Tensor:
    """The sum over `group` of the ranks' partial hidden-state gradients de [N, D], in `dtype`.

    `scatter` (sequence parallel): this rank's rows [r·N/W, (r+1)·N/W) of the sum (N = W·N_local);
    else all N rows, the same on every rank.

    de in `dtype` (float32/float64 inputs): one all-reduce in place, or one reduce-scatter into a
    new [N/W, D] tensor. de float32 for 16-bit `dtype` (each rank's G_r·C_r, unrounded): summed in
    float32 and rounded once, after the sum; `de` is consumed (its storage is reused):
      scatter: reduce-scatter in float32 (in place), the block rounded into a new [N/W, D] tensor;
      N % W == 0: reduce-scatter in float32 (in place), the block rounded, all-gather in `dtype`
        into de's own storage (the result views it): (W−1)/W·N·D·(4 + 2) bytes sent per rank,
        against 2·(W−1)/W·N·D·4 for a float32 all-reduce (2·(W−1)/W·N·D·2 for a 16-bit one);
      otherwise: all-reduce in float32 (in place), then rounded in place (`narrow_in_place`).
    """
    what = "reduce-scatter the hidden-state gradient" if scatter else "all-reduce the hidden-state gradient"
    _check_same_shape(de, group, what)
    if de.dtype == dtype:  # nothing to round
        if not scatter:
            _wait(dist.all_reduce(de, group=group, async_op=True), what)
            return de
        out = de.new_empty((de.shape[0] // group_size(group),) + tuple(de.shape[1:]))
        _wait(_reduce_scatter_single(out, de.contiguous(), group=group, async_op=True), what)
        return out
    assert de.dtype == torch.float32 and de.is_contiguous() and de.dim() == 2, (de.dtype, de.shape)
    world = group_size(group)
    if not scatter and de.shape[0] % world:
        _wait(dist.all_reduce(de, group=group, async_op=True), what)
        return narrow_in_place(de, dtype)
    first, rows = _rows_of(de, group)
    block = de[first:first + rows]  # in-place reduce-scatter: this rank's block of the input
    if de.numel():
        _wait(_reduce_scatter_single(block, de, group=group, async_op=True), what)
    if scatter:
        return block.to(dtype)
    out = de.view(-1).view(dtype)[: de.numel()].view(de.shape)  # de's storage, read no more
    mine = out[first:first + rows]
    _round_rows_into(block, mine)  # mine's rows start at or before the block's own bytes
    if de.numel():  # in-place all-gather: this rank's block is already in place
        _wait(_all_gather_single(out, mine, group=group, async_op=True), what + " (all-gather)")
    return out


# group → {(vocab_start, V_local): V_total}. Weak keys: a destroyed group's entries go with it, and a
# new group is a new object, so it cannot inherit them (id() could be reused; a live object's cannot).
_LAYOUT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_layout_cache() -> None:
    """Forget the checked vocabulary layouts (call on every rank after re-sharding a group)."""
    _LAYOUT_CACHE.clear()


def shard_layout(group, vocab_start: int, v_local: int) -> int:
    """Check that the ranks' [start, start + V_r) shards tile [0, V_total); return V_total.

    Needs one small collective (and a host sync) the first time a (group, shard) is seen; cached after,
    keyed on the group object and what this rank sees: if the shards of OTHER ranks change while this
    rank's stays the same, call `clear_layout_cache()` on every rank.
    """
    try:
        known = _LAYOUT_CACHE.setdefault(group, {})
    except TypeError:  # not weakly referenceable: check at every call
        known = {}
    if (vocab_start, v_local) in known:
        return known[vocab_start, v_local]
    on_gpu = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    mine = torch.tensor([[vocab_start, v_local]], dtype=torch.int64, device=device)
    shards = all_gather_along_dim0(mine, group, "check the vocabulary shards").cpu().tolist()
    expected = 0
    for start, size in sorted(shards):
        if start != expected:
            raise ValueError(
                f"vocab_start: the shards [start, start+V_local) of the ranks, {shards}, do not tile the "
                f"vocabulary: expected a shard starting at {expected}, found one at {start}"
            )
        expected = start + size
    known[vocab_start, v_local] = expected
    return expected


def check_group_membership(group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialised, but a process group was given")
    if dist.get_rank(group) < 0:
        raise ValueError("group: this process is not a member of the given process group")


# --------------------------------------------------------------------------- DTensor classifiers


def dtensor_type():
    """torch.distributed.tensor.DTensor, or None where torch has no DTensor."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return None
    return DTensor


def is_dtensor(t) -> bool:
    DTensor = dtensor_type()
    return DTensor is not None and isinstance(t, DTensor)


def _dtensor_row_offset(w, mesh_dim: int) -> int:
    """Global index of this rank's first row of a DTensor sharded on dim 0 along mesh_dim."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
        return int(offset[0])
    except ImportError:  # torch.chunk layout, the one DTensor's Shard uses
        n = w.device_mesh.size(mesh_dim)
        rank = w.device_mesh.get_local_rank(mesh_dim)
        return min(rank * -(-w.shape[0] // n), w.shape[0])


def dtensor_vocab_shard(w, bias=None, name: str = "c"):
    """(w_local, bias_local, group, vocab_start) of a classifier `w` [V, D] that may be a DTensor.

    Sharded along the vocabulary (Shard(0) on one mesh dimension, Replicate() on any other, even or
    uneven shards): this rank's rows, the group of that mesh dimension and the global id of its
    first row; `bias` may be sharded the same way, replicated, or a plain [V] tensor (sliced).
    Replicated or not a DTensor: (local w, bias, None, None). The local tensors stay differentiable
    (their gradients flow back into the DTensors). NotImplementedError for other placements."""
    if not is_dtensor(w):
        return w, (bias.full_tensor() if is_dtensor(bias) else bias), None, None
    placements = tuple(w.placements)
    shard_dims = [i for i, p in enumerate(placements) if p.is_shard()]
    others_ok = all(p.is_replicate() for i, p in enumerate(placements) if i not in shard_dims)
    if not others_ok or len(shard_dims) > 1 or any(not placements[i].is_shard(0) for i in shard_dims):
        raise NotImplementedError(
            f"{name}: a DTensor with placements {placements}; supported: Shard(0) (vocabulary) on one mesh "
            "dimension and Replicate() on the others, or fully replicated"
        )
    if not shard_dims:  # replicated: an ordinary classifier
        return w.to_local(), (bias.to_local() if is_dtensor(bias) else bias), None, None
    mesh_dim = shard_dims[0]
    start = _dtensor_row_offset(w, mesh_dim)
    w_local = w.to_local()
    if bias is not None:
        rows = slice(start, start + w_local.shape[0])
        if is_dtensor(bias):
            bp = tuple(bias.placements)
            if bp == placements:
                bias = bias.to_local()
            elif all(p.is_replicate() for p in bp):
                # each rank's gradient covers its own rows only: a partial sum over the shard dimension
                from torch.distributed.tensor import Partial, Replicate

                grad_placements = [Partial() if i == mesh_dim else Replicate() for i in range(len(bp))]
                bias = bias.to_local(grad_placements=grad_placements)[rows]
            else:
                raise NotImplementedError(f"{name}: the bias's DTensor placements {bp} do not match the weight's")
        else:
            bias = bias[rows]
    return w_local, bias, w.device_mesh.get_group(mesh_dim), start
