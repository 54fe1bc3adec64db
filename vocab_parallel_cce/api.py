"""Public API: `linear_cross_entropy` and the `LinearCrossEntropy` module."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from . import distributed as vp
from . import torch_backend
from .autograd import LossWithGradInForward, ShardStats, grad_in_forward_chunk
from .backend import ShardSpec

Reduction = Literal["mean", "sum", "none"]
IMPLS = ("auto", "triton", "triton_exact", "torch")
# Apple CCE's names, so `impl=` values written for it keep working.
IMPL_ALIASES = {"cce": "triton", "cce_exact": "triton_exact", "torch_compile": "torch"}


@dataclass
class VocabParallelOptions:
    """Apple CCE's vocabulary-parallel options: this rank holds classifier rows [start, stop)."""

    start: int
    stop: int
    group: Any = None
    reduce_e_grad: bool = True


def _triton_usable_on(device: torch.device) -> tuple[bool, str]:
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, ""
        return False, "impl='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
    if device.type != "cuda":
        return False, f"impl='triton' does not support device type '{device.type}'"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, "impl='triton' needs an Ampere or newer GPU (compute capability >= 8.0)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "impl='triton' needs the `triton` package"
    return True, ""


def _resolve_impl(impl: str, e: torch.Tensor):
    impl = IMPL_ALIASES.get(impl, impl)
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS + tuple(IMPL_ALIASES)}, got {impl!r}")
    if impl == "auto":
        ok, _ = _triton_usable_on(e.device)
        impl = "triton" if ok and e.device.type == "cuda" and e.dtype != torch.float64 else "torch"
    if impl == "torch":
        return torch_backend, False
    ok, why = _triton_usable_on(e.device)
    if not ok:
        raise ValueError(why)
    if e.dtype == torch.float64:
        raise TypeError("impl='triton' supports float32/float16/bfloat16 inputs; use impl='torch' for float64")
    from . import triton_backend

    return triton_backend, impl == "triton_exact"


def _autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled, False for device types autocast does not know (e.g. 'meta')."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def _validate(e, c, targets, bias, reduction, softcap, label_smoothing, z_loss, shift, filter_eps):
    _check_float("e", e)
    _check_float("c", c)
    if e.dim() < 1:
        raise ValueError("e: expected shape [..., D], got a 0-d tensor")
    if c.dim() != 2:
        raise ValueError(f"c: expected a 2-D classifier [V, D], got shape {tuple(c.shape)}")
    if c.shape[1] != e.shape[-1]:
        raise ValueError(f"c: hidden size D={c.shape[1]} does not match e's last dimension {e.shape[-1]}")
    if c.shape[0] == 0:
        raise ValueError("c: the classifier has no rows (V = 0)")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int32, torch.int64):
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"targets: expected an int32 or int64 tensor of token ids, got {got}")
    if tuple(targets.shape) != tuple(e.shape[:-1]):
        raise ValueError(
            f"targets: expected shape {tuple(e.shape[:-1])} (e's leading dimensions), got {tuple(targets.shape)}"
        )
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (c.shape[0],):
            raise ValueError(f"bias: expected shape ({c.shape[0]},) (one per row of c), got {tuple(bias.shape)}")
    for name, t in (("c", c), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != e.device:
            raise ValueError(f"{name}: is on {t.device} but e is on {e.device}; all tensors must share a device")
    if not _autocast_enabled(e.device.type):
        if c.dtype != e.dtype or (bias is not None and bias.dtype != e.dtype):
            raise TypeError(
                f"c/bias: dtype must match e's ({e.dtype}), got c {c.dtype}"
                + ("" if bias is None else f", bias {bias.dtype}")
            )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    check_loss_options(softcap, label_smoothing, z_loss, filter_eps)
    shift = int(shift) if isinstance(shift, bool) else shift
    if not isinstance(shift, int):
        raise TypeError(f"shift: expected an int or bool, got {type(shift).__name__}")
    if shift != 0:
        if targets.dim() < 1:
            raise ValueError("shift: needs targets with a sequence dimension, got a 0-d target")
        if not 0 <= shift < targets.shape[-1]:
            raise ValueError(f"shift: expected 0 <= shift < sequence length {targets.shape[-1]}, got {shift}")
    elif shift < 0:
        raise ValueError(f"shift: expected >= 0, got {shift}")
    return shift


def check_loss_options(softcap, label_smoothing, z_loss, filter_eps="auto", impl="auto") -> None:
    """ValueError naming the first loss option out of range (shared with the adapters)."""
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap: expected None or a number > 0, got {softcap!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing: expected a number in [0, 1), got {label_smoothing!r}")
    if not (isinstance(z_loss, (int, float)) and z_loss >= 0.0):
        raise ValueError(f"z_loss: expected a number >= 0, got {z_loss!r}")
    if not (filter_eps is None or filter_eps == "auto" or (isinstance(filter_eps, (int, float)) and filter_eps >= 0)):
        raise ValueError(f"filter_eps: expected 'auto', None or a number >= 0, got {filter_eps!r}")
    if IMPL_ALIASES.get(impl, impl) not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS + tuple(IMPL_ALIASES)}, got {impl!r}")


# dC tiles whose softmax stays below 2^-12 hold nothing a 16-bit gradient resolves.
AUTO_FILTER_EPS = 2.0**-12


def _resolve_filter_eps(filter_eps, exact: bool, dtype: torch.dtype) -> tuple[float | None, bool]:
    """(eps, adaptive). "auto": adaptive skipping at AUTO_FILTER_EPS for 16-bit inputs, where it
    measured faster on trained-like logits and is turned off while logits are dense (triton_backend
    `_TileSkipPolicy`); none for float32 or exact mode. A number: always skip below it."""
    if exact or filter_eps is None:
        return None, False
    if filter_eps == "auto":
        if dtype in (torch.float16, torch.bfloat16):
            return AUTO_FILTER_EPS, True
        return None, False
    return (float(filter_eps), False) if filter_eps > 0 else (None, False)


_LAYOUT_CACHE: dict = {}


def clear_layout_cache() -> None:
    """Forget the checked vocabulary layouts (call on every rank after re-sharding a group)."""
    _LAYOUT_CACHE.clear()


def _shard_layout(group, vocab_start: int, v_local: int, device: torch.device) -> int:
    """Check that the ranks' [start, start + V_r) shards tile [0, V_total); return V_total.

    Needs one small collective (and a host sync) the first time a (group, shard) is seen; cached after,
    keyed on what this rank sees: if the shards of OTHER ranks change while this rank's stays the
    same, call `clear_layout_cache()` on every rank.
    """
    key = (id(group), vp.group_rank(group), vocab_start, v_local)
    if key in _LAYOUT_CACHE:
        return _LAYOUT_CACHE[key]
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    mine = torch.tensor([[vocab_start, v_local]], dtype=torch.int64, device=device)
    shards = vp.all_gather_along_dim0(mine, group, "check the vocabulary shards").cpu().tolist()
    expected = 0
    for start, size in sorted(shards):
        if start != expected:
            raise ValueError(
                f"vocab_start: the shards [start, start+V_local) of the ranks, {shards}, do not tile the "
                f"vocabulary: expected a shard starting at {expected}, found one at {start}"
            )
        expected = start + size
    _LAYOUT_CACHE[key] = expected
    return expected


def linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: Reduction = "mean",
    shift: int | bool = 0,
    return_lse: bool = False,
    filter_eps: float | str | None = "auto",
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    impl: str = "auto",
    group: Any = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    reduce_grad_e: bool = True,
    sequence_parallel: bool = False,
    vocab_parallel_options: VocabParallelOptions | None = None,
    accum_e_fp32: bool = True,
    accum_c_fp32: bool = True,
    grad_in_forward: bool = False,
):
    """Cross-entropy of the logits `e @ c.T (+ bias)` without materialising them.

    Args:
        e: hidden states [..., D] (float32/float16/bfloat16; float64 with impl="torch").
        c: classifier [V, D]; under vocabulary parallelism this rank's shard [V_local, D].
        targets: int32/int64 token ids, shape e.shape[:-1]; `ignore_index` marks tokens to skip.
        bias: optional [V] (or [V_local]) added to the logits.
        ignore_index: target value whose token contributes no loss and no gradient.
        softcap: if set, logits z ← softcap·tanh(z / softcap).
        reduction: "mean" over non-ignored tokens (0 when all are ignored), "sum", or "none"
            (per-token loss shaped like `targets[..., shift:]`, 0 at ignored tokens).
        shift: k (or True for 1): e[..., :-k, :] predicts targets[..., k:]; e is not copied.
        return_lse: also return the per-token log-sum-exp (same shape and dtype as the "none" loss).
        filter_eps: the triton backward may skip, in the product for c's gradient only, 128×128
            logit tiles whose softmax is below it everywhere. "auto": 2**-12 for bf16/fp16 inputs,
            applied only while the kept-tile fraction measured in an earlier call with the same
            classifier is below 40% (it pays on trained-like logits, not on dense ones); a number:
            always; None (and float32 inputs under "auto", and impl="triton_exact"): never.
            Under "auto" the call at which skipping starts depends on when the measurement
            reaches the host; pass None or a number for run-to-run identical gradients.
        label_smoothing: ε: loss = (1−ε)·nll + ε·(lse − mean_j z_j), mean over the (global) vocabulary.
        z_loss: λ: adds λ·lse² per token.
        impl: "auto" (triton on a supported CUDA GPU, else torch), "triton", "triton_exact"
            (no gradient filtering; float32 inputs use full-precision instead of TF32 dot products),
            or "torch" (exact, chunked, any device). Apple CCE's "cce", "cce_exact", "torch_compile" are aliases.
        group: torch.distributed group over which `c` is sharded along the vocabulary.
        vocab_start: first global id of this rank's shard (default rank × V_local).
        vocab_size: true vocabulary size; rows with global id >= vocab_size (padding) are left out
            of the softmax and of label smoothing's mean. Default: every row takes part.
        reduce_grad_e: sum e's gradient over `group` (False: leave each rank's partial sum).
        sequence_parallel: e and targets hold this rank's slice of the tokens along dim 0; they are
            all-gathered in forward (e's gradient reduce-scattered in backward) and every rank
            returns the loss of ALL tokens (shift and "none" shapes refer to the gathered tensors).
        vocab_parallel_options: Apple CCE's VocabParallelOptions (start, stop, group, reduce_e_grad).
        accum_e_fp32, accum_c_fp32: accepted for Apple CCE compatibility; gradients are always
            accumulated in float32.
        grad_in_forward: compute the gradients during the forward from materialised chunks of
            ≈D tokens' logits (6·N·D·V FLOPs instead of 8; filter_eps is not used), for an upstream
            gradient that is the same for every non-ignored token: "mean"/"sum", or "none" followed
            by such a reduction (checked on the device: otherwise the gradients are NaN). Needs
            return_lse=False; the backward may run only once (no retain_graph). More memory: a
            float32 chunk of logits [≈D, V_local] and a float32 dC, together ≈ 4× dC's 16-bit
            size. Without autograd (no input requires grad) it is the default path.

    Returns:
        The loss (a scalar, or per token for "none"), float32 (float64 for float64 inputs); with
        return_lse, (loss, lse).
        A target outside [0, vocab_size) that is not ignore_index gives a NaN loss for its token.
    """
    shift = _validate(e, c, targets, bias, reduction, softcap, label_smoothing, z_loss, shift, filter_eps)
    if grad_in_forward and return_lse:
        raise ValueError("grad_in_forward: needs return_lse=False (lse's gradient would be per token)")

    if vocab_parallel_options is not None:
        if group is not None or vocab_start is not None:
            raise ValueError("vocab_parallel_options: give it, or group/vocab_start, not both")
        o = vocab_parallel_options
        if o.stop - o.start != c.shape[0]:
            raise ValueError(
                f"vocab_parallel_options: stop - start = {o.stop - o.start} but c has {c.shape[0]} rows"
            )
        group, vocab_start, reduce_grad_e = o.group, o.start, o.reduce_e_grad

    v_local = c.shape[0]
    world = 1
    if group is not None:
        vp.check_group_membership(group)
        world = vp.group_size(group)
    if world > 1:
        rank = vp.group_rank(group)
        if vocab_start is None:
            vocab_start = rank * v_local
        if not isinstance(vocab_start, int) or vocab_start < 0:
            raise ValueError(f"vocab_start: expected an int >= 0, got {vocab_start!r}")
        v_total = _shard_layout(group, vocab_start, v_local, e.device)
    else:
        if vocab_start not in (None, 0):
            raise ValueError(f"vocab_start: without a multi-rank group the shard must start at 0, got {vocab_start}")
        if sequence_parallel and group is None:
            raise ValueError("sequence_parallel: needs a process group")
        vocab_start, v_total = 0, v_local
    if vocab_size is None:
        vocab_size = v_total
    if not isinstance(vocab_size, int) or not 0 < vocab_size <= v_total:
        raise ValueError(f"vocab_size: expected an int in [1, {v_total}] (the classifier's rows), got {vocab_size!r}")

    backend, exact = _resolve_impl(impl, e)

    # Autocast: the classifier matmul runs in the autocast dtype, as nn.Linear would.
    device_type = e.device.type
    if _autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        e, c = e.to(dt), c.to(dt)
        bias = None if bias is None else bias.to(dt)

    if sequence_parallel and world > 1:
        e = vp.GatherTokens.apply(e, group)
        targets = vp.all_gather_along_dim0(targets, group, "all-gather sequence-parallel targets")
        reduce_grad_e = False  # the gather's backward reduce-scatters the partial sums

    if shift:
        # targets[..., k:] padded with ignore_index: e[..., t, :] predicts targets[..., t + k].
        pad = targets.new_full(targets.shape[:-1] + (shift,), ignore_index)
        targets = torch.cat([targets[..., shift:], pad], dim=-1)
    out_shape = targets.shape
    e2 = e.reshape(-1, e.shape[-1])
    t = targets.reshape(-1).long()

    n_valid = max(0, min(v_local, vocab_size - vocab_start))
    eps, adaptive = (None, False) if backend is torch_backend else _resolve_filter_eps(filter_eps, exact, e2.dtype)
    spec = ShardSpec(
        n_valid=n_valid,
        softcap=None if softcap is None else float(softcap),
        need_sum=label_smoothing > 0,
        filter_eps=eps,
        adaptive_filter=adaptive,
        exact=exact,
    )

    def compose(lse, x, s, t):
        return token_loss(lse, x, s, t, ignore_index, vocab_size, label_smoothing, z_loss)

    needs_grad = torch.is_grad_enabled() and any(q is not None and q.requires_grad for q in (e2, c, bias))
    if grad_in_forward and needs_grad:
        count = (t != ignore_index).sum() if reduction == "mean" else None
        with torch.autocast(device_type, enabled=False):
            loss = _loss_with_grad_in_forward(e2, c, bias, t, vocab_start, backend, spec, group, reduce_grad_e,
                                              compose, reduction, count, grad_in_forward_chunk(e2.shape[1]))
        if reduction != "none":
            return loss
    else:
        with torch.autocast(device_type, enabled=False):
            lse, x, s = ShardStats.apply(e2, c, bias, t - vocab_start, backend, spec, group, reduce_grad_e)
        loss = compose(lse, x, s, t)
    valid = t != ignore_index

    if reduction == "mean":
        loss = loss.sum() / valid.sum().clamp(min=1)
    elif reduction == "sum":
        loss = loss.sum()
    else:
        loss = loss.view(out_shape)
        if shift:
            loss = loss[..., : out_shape[-1] - shift]
    if return_lse:
        lse = lse.view(out_shape)
        if shift:
            lse = lse[..., : out_shape[-1] - shift]
        return loss, lse
    return loss


@torch.compiler.disable  # runs eagerly under torch.compile (a graph break): Python loop, collectives
def _loss_with_grad_in_forward(*args):
    return LossWithGradInForward.apply(*args)


def token_loss(lse, x, s, t, ignore_index: int, vocab_size: int, label_smoothing: float, z_loss: float):
    """Per-token loss [N] from the global statistics (lse, x = correct logit, s = Σ logits):
    (1−ε)(lse − x) + ε(lse − s/V) + λ·lse², 0 at ignored tokens, NaN at targets outside [0, V)."""
    valid = t != ignore_index
    nll = lse - x
    if label_smoothing > 0:
        nll = (1.0 - label_smoothing) * nll + label_smoothing * (lse - s / vocab_size)
    if z_loss > 0:
        nll = nll + z_loss * lse * lse
    bad_target = valid & ((t < 0) | (t >= vocab_size))
    return torch.where(valid, torch.where(bad_target, float("nan"), nll), 0.0)


class LinearCrossEntropy(torch.nn.Module):
    """Module form of `linear_cross_entropy`; keyword options are fixed at construction.

    forward(e [..., D], c [V, D], targets [...], bias=None) → loss (see linear_cross_entropy).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = options

    def forward(self, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None):
        return linear_cross_entropy(e, c, targets, bias, **self.options)
