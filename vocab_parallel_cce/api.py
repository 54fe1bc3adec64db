"""Public API: `linear_cross_entropy` and the `LinearCrossEntropy` module."""

from __future__ import annotations

import enum
import os
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

from . import distributed as vp
from .backends import torch_backend
from .autograd import LossWithGradInForward, LossWithHeldLogits, ShardStats, _AccumulateGradInto, holds_logits
from .backends.protocol import Backend
from .distributed import clear_layout_cache  # noqa: F401  (documented as vocab_parallel_cce.api.clear_layout_cache)
from . import stats
from .plan import Plan
from .tuning import Tuning

Reduction = Literal["mean", "sum", "none"]
IMPLS = ("auto", "triton", "triton_exact", "torch")
# Apple CCE's names, so `impl=` values written for it keep working, each mapped to our equivalent.
# Our dE is never filtered and always accumulates in float32, and dC is one float32-accumulated
# product per vocabulary chunk, so the Kahan variants differ from "cce" only in dC filtering.
IMPL_ALIASES = {
    "cce": "triton", "cce_exact": "triton_exact", "torch_compile": "torch",
    "cce_kahan_full_c": "triton",  # dC unfiltered (below), dE filtered in Apple's: never in ours
    "cce_kahan_full_e": "triton",  # dC filtered per filter_eps, dE unfiltered: as ours always is
    "cce_kahan_full": "triton_exact", "cce_kahan_full_c_full_e": "triton_exact",  # = cce_exact
}  # fmt: skip
_DC_UNFILTERED_IMPLS = {"cce_kahan_full_c"}


class LinearCrossEntropyImpl(enum.IntEnum):
    """`impl=` as an enum, as Apple CCE's (same members and values; ours after them). A member
    given as `impl` stands for its lower-case name."""

    CCE = enum.auto()
    TORCH_COMPILE = enum.auto()
    CCE_KAHAN_FULL_C = enum.auto()
    CCE_KAHAN_FULL_E = enum.auto()
    CCE_EXACT = enum.auto()
    CCE_KAHAN_FULL_C_FULL_E = enum.auto()
    CCE_KAHAN_FULL = enum.auto()
    AUTO = enum.auto()
    TRITON = enum.auto()
    TRITON_EXACT = enum.auto()
    TORCH = enum.auto()


def _impl_name(impl: str | LinearCrossEntropyImpl) -> str:
    return impl.name.lower() if isinstance(impl, LinearCrossEntropyImpl) else impl


@dataclass
class VocabParallelOptions:
    """Apple CCE's vocabulary-parallel options: this rank holds classifier rows [start, stop).

    `group=None` is the default process group (torch.distributed's WORLD), as in Apple CCE's
    collectives; without an initialised process group, one rank holding [0, V).
    """

    start: int
    stop: int
    group: Any = None
    reduce_e_grad: bool = True

    @classmethod
    def from_vocab(cls, vocab_size: int, group: Any = None, reduce_e_grad: bool = True) -> "VocabParallelOptions":
        """This rank's part of `vocab_size` rows split over `group` (None: the default group) in
        contiguous ranges by rank, the first `vocab_size % world` ranks holding one row more."""
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size: expected an int > 0, got {vocab_size!r}")
        world = vp.group_size(_default_group(group))
        rank = vp.group_rank(_default_group(group)) if world > 1 else 0
        base, extra = divmod(vocab_size, world)
        start = rank * base + min(rank, extra)
        return cls(start, start + base + (rank < extra), group, reduce_e_grad)


def _default_group(group):
    """Apple CCE's reading of group=None: the default process group where one is initialised."""
    if group is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.group.WORLD
    return group


@dataclass
class CrossEntropyOutput:
    """What `linear_cross_entropy` returns when asked for more than the loss (as Liger-Kernel's
    fused linear cross-entropy does): each field None unless asked for. Per-token fields are
    shaped like the loss with reduction="none" (`targets[..., shift:]`)."""

    loss: torch.Tensor
    # the z-loss part of `loss`, reduced the same way (grad_in_forward=True: no gradient of its own)
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None  # float32: mean over non-ignored tokens, or per token
    predicted_tokens: torch.Tensor | None = None  # int64 argmax over the global vocabulary, −1 where ignored
    lse: torch.Tensor | None = None  # return_lse


def _no_triton_reason(device: torch.device, impl: str) -> str | None:
    """Why Triton cannot run on `device` (None: it can); ValueError for device types it never supports."""
    if device.type == "cpu":
        return None if os.environ.get("TRITON_INTERPRET") == "1" else "needs a CUDA tensor (or TRITON_INTERPRET=1)"
    if device.type != "cuda":
        raise ValueError(f"impl={impl!r} does not support device type '{device.type}'")
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "needs an Ampere or newer GPU (compute capability >= 8.0)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs the `triton` package"
    return None


def _backend(impl: str, e: torch.Tensor) -> tuple[Backend, bool]:
    """(backend module, exact) for `impl` and e's device and dtype. Triton asked for where it cannot
    run falls back to the exact torch path with a UserWarning naming the value given."""
    name = IMPL_ALIASES.get(impl, impl)
    if name == "auto":
        usable = e.device.type == "cuda" and e.dtype != torch.float64 and _no_triton_reason(e.device, impl) is None
        name = "triton" if usable else "torch"
    if name == "torch":
        return torch_backend, False
    why = _no_triton_reason(e.device, impl)
    if why is not None:
        warnings.warn(f"impl={impl!r}: Triton {why}; using the exact torch path (impl='torch') instead",
                      UserWarning, stacklevel=3)
        return torch_backend, False
    if e.dtype == torch.float64:
        raise TypeError(f"impl={impl!r} supports float32/float16/bfloat16 inputs; use impl='torch' for float64")
    from .backends import triton as triton_backend

    return triton_backend, name == "triton_exact"


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


def _validate(e, c, targets, bias, reduction, softcap, label_smoothing, z_loss, shift, filter_eps, impl,
              return_lse, grad_in_forward) -> int:
    """TypeError/ValueError naming the first bad argument; returns shift as an int."""
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
    check_loss_options(softcap, label_smoothing, z_loss, filter_eps, impl)
    if not (grad_in_forward == "auto" or isinstance(grad_in_forward, bool)):
        raise TypeError(f"grad_in_forward: expected True, False or 'auto', got {grad_in_forward!r}")
    if grad_in_forward is True and return_lse:
        raise ValueError("grad_in_forward: needs return_lse=False (lse's gradient would be per token)")
    shift = int(shift) if isinstance(shift, bool) else shift
    if not isinstance(shift, int):
        raise TypeError(f"shift: expected an int or bool, got {type(shift).__name__}")
    if shift != 0:
        if targets.dim() < 1:
            raise ValueError("shift: needs targets with a sequence dimension, got a 0-d target")
        if not 0 <= shift < targets.shape[-1]:
            raise ValueError(f"shift: expected 0 <= shift < sequence length {targets.shape[-1]}, got {shift}")
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
    impl = _impl_name(impl)
    if IMPL_ALIASES.get(impl, impl) not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS + tuple(IMPL_ALIASES)}, got {impl!r}")


# dC tiles whose softmax stays below 2^-12 hold nothing a 16-bit gradient resolves.
AUTO_FILTER_EPS = 2.0**-12


def _filter(filter_eps, backend: Backend, exact: bool, dtype: torch.dtype, label_smoothing: float,
            grad_in_forward: bool) -> tuple[float | None, bool]:
    """The plan's (filter_eps, adaptive_filter) for the triton default path's dC tile skipping.
    "auto": adaptive skipping at AUTO_FILTER_EPS for 16-bit inputs, where it measured faster on
    trained-like logits and is turned off while logits are dense (triton_backend.skip_policy). A
    number: always skip below it. Never on the torch backend, in exact mode, with grad_in_forward,
    or with label smoothing (its u = ∂L/∂s ≠ 0 puts weight on every tile)."""
    if filter_eps is None or exact or backend is torch_backend or grad_in_forward or label_smoothing > 0:
        return None, False
    if filter_eps == "auto":
        return (AUTO_FILTER_EPS, True) if dtype in (torch.float16, torch.bfloat16) else (None, False)
    return (float(filter_eps), False) if filter_eps > 0 else (None, False)


def _layout(c, group, vocab_start, vocab_size, reduce_grad_e, sequence_parallel,
            options: VocabParallelOptions | None) -> dict[str, Any]:
    """The plan's shard fields (vocab_start, n_valid, vocab_size, group, world, reduce_grad_e,
    sequence_parallel), checked. With a multi-rank group the layout check is a collective (once
    per layout: distributed.shard_layout)."""
    if options is not None:
        if group is not None or vocab_start is not None:
            raise ValueError("vocab_parallel_options: give it, or group/vocab_start, not both")
        if options.stop - options.start != c.shape[0]:
            raise ValueError(
                f"vocab_parallel_options: stop - start = {options.stop - options.start} but c has {c.shape[0]} rows"
            )
        group = _default_group(options.group)  # Apple CCE's None: the default process group
        return _layout(c, group, options.start, vocab_size, options.reduce_e_grad, sequence_parallel, None)
    v_local = c.shape[0]
    world = 1
    if group is not None:
        vp.check_group_membership(group)
        world = vp.group_size(group)
    if world > 1:
        start = vp.group_rank(group) * v_local if vocab_start is None else vocab_start
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"vocab_start: expected an int >= 0, got {start!r}")
        v_total = vp.shard_layout(group, start, v_local)
    else:
        if vocab_start not in (None, 0):
            raise ValueError(f"vocab_start: without a multi-rank group the shard must start at 0, got {vocab_start}")
        if sequence_parallel and group is None:
            raise ValueError("sequence_parallel: needs a process group")
        start, v_total = 0, v_local
    size = v_total if vocab_size is None else vocab_size
    if not isinstance(size, int) or not 0 < size <= v_total:
        raise ValueError(f"vocab_size: expected an int in [1, {v_total}] (the classifier's rows), got {vocab_size!r}")
    sp = sequence_parallel and world > 1  # the loss Functions gather e and reduce-scatter dE's partial sums
    return dict(vocab_start=start, n_valid=max(0, min(v_local, size - start)), vocab_size=size, group=group,
                world=world, reduce_grad_e=reduce_grad_e and not sp, sequence_parallel=sp)


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
    filter_eps: float | str | None = None,
    accum_e_fp32: bool = False,
    accum_c_fp32: bool = False,
    filter_e_grad: bool = True,
    filter_c_grad: bool = True,
    impl: str | LinearCrossEntropyImpl = "auto",
    vocab_parallel_options: VocabParallelOptions | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    class_weights: torch.Tensor | None = None,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    group: Any = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    reduce_grad_e: bool = True,
    sequence_parallel: bool = False,
    grad_in_forward: bool | str = "auto",
    loss_mask: torch.Tensor | None = None,
    tuning: Tuning | None = None,
    dc_accumulate_into: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | CrossEntropyOutput:
    """Cross-entropy of the logits `e @ c.T (+ bias)` without materialising them.

    The positional arguments are Apple CCE's, in its order (accum_e_fp32, accum_c_fp32 and
    filter_e_grad are accepted and change nothing: dE and dC always accumulate in float32 and dE
    is never filtered; filter_c_grad=False turns dC's tile skipping off).

    Args:
        e: hidden states [..., D] (float32/float16/bfloat16; float64 with impl="torch").
        c: classifier [V, D]; under vocabulary parallelism this rank's shard [V_local, D], or a
            DTensor sharded along the vocabulary (Shard(0) on one mesh dimension), from which the
            group and this rank's shard offset are read (then give no group/vocab_start/
            vocab_parallel_options).
        targets: int32/int64 token ids, shape e.shape[:-1]; `ignore_index` marks tokens to skip.
        bias: optional [V] (or [V_local]) added to the logits.
        ignore_index: target value whose token contributes no loss and no gradient.
        softcap: if set, logits z ← softcap·tanh(z / softcap).
        reduction: "mean" over non-ignored tokens (0 when all are ignored), "sum", or "none"
            (per-token loss shaped like `targets[..., shift:]`, 0 at ignored tokens).
        shift: k (or True for 1): e[..., :-k, :] predicts targets[..., k:]; e is not copied.
        return_lse: also return the per-token log-sum-exp (same shape and dtype as the "none" loss).
        filter_eps: the triton backward may skip, in the product for c's gradient only, 128×128
            logit tiles whose softmax is below it everywhere. None (the default): never (every
            tile is computed). "auto": 2**-12 for bf16/fp16 inputs, applied only while the
            kept-tile fraction measured in an earlier call with the same classifier is below 40%
            (Tuning.skip_keep_threshold; it pays on trained-like logits, not on dense ones; the call
            at which skipping starts depends on when the measurement reaches the host); a number:
            always. Off by default because the training-curve benchmark showed it slows early
            training (fused − native loss +0.04–0.05 nats, 20-step mean, around steps 10–30 in
            each of 3 seeds, while the softmax is still flat: many tiles each below eps carry most
            of the mass); never with float32 inputs under "auto", label smoothing or
            impl="triton_exact".
        label_smoothing: ε: loss = (1−ε)·nll + ε·(lse − mean_j z_j), mean over the (global) vocabulary.
        z_loss: λ: adds λ·lse² per token.
        class_weights: F.cross_entropy's `weight`: a [vocab_size] (or padded [V_total]) float
            tensor of the GLOBAL vocabulary, the same on every rank (no gradient). Token i's
            cross-entropy is w[t_i]·nll_i (with label smoothing (1−ε)·w[t_i]·nll_i +
            (ε/V)·Σ_j w_j·(lse_i − z_ij)); "mean" divides it by the summed weights of the
            non-ignored targets (0 → loss 0). The z-loss is not weighted and "mean" divides it by
            the non-ignored count (Liger-Kernel's convention). Both modes, every option (with label
            smoothing the statistics carry the weighted logit sum Σ_j w_j z_j; the fast mode folds
            "mean"'s two divisors into its gradients).
        return_z_loss, return_token_accuracy, return_predicted_tokens: return a
            `CrossEntropyOutput` with, besides the loss, its z-loss part (reduced as the loss,
            "mean" over the non-ignored count; differentiable), the accuracy of the argmax over the
            global vocabulary (float32: the mean over non-ignored tokens for "mean"/"sum", per
            token 0/1 for "none"; 0 where ignored), and the argmax itself (int64 per token, ties
            to the smallest id, −1 where ignored), computed in the forward's pass and combined
            across ranks in its one collective (per token chunk in the fast mode); no host sync.
            The argmax needs vocab_size <= 2**24. Both modes. The fast mode takes the argmax of the
            logits it holds (bf16 for bf16 inputs, as the unfused layer's, where near-ties may
            round to ties), and its z-loss output is a value: its gradient is already inside the
            loss's, so a gradient through the z-loss output itself (e.g. of loss + z_loss) gives
            NaN gradients, never silently wrong ones; differentiate it in the memory-first mode.
        impl: "auto" (triton on a supported CUDA GPU, else torch), "triton", "triton_exact"
            (no gradient filtering; float32 inputs use full-precision instead of TF32 dot products),
            or "torch" (exact, chunked, any device). Apple CCE's "cce", "cce_exact", "torch_compile"
            are aliases. A triton value where Triton cannot run (a CPU tensor without
            TRITON_INTERPRET=1, a GPU older than Ampere, no triton package) falls back to "torch"
            with a UserWarning.
        group: torch.distributed group over which `c` is sharded along the vocabulary.
        vocab_start: first global id of this rank's shard (default rank × V_local).
        vocab_size: true vocabulary size; rows with global id >= vocab_size (padding) are left out
            of the softmax and of label smoothing's mean. Default: every row takes part.
        reduce_grad_e: sum e's gradient over `group` (16-bit inputs: the partial sums in float32,
            rounded once after the sum). False: leave each rank's partial sum, in e's dtype.
        sequence_parallel: e and targets hold this rank's slice of the tokens along dim 0; they are
            all-gathered in forward (e's gradient reduce-scattered in backward, in float32 for
            16-bit inputs) and every rank returns the loss of ALL tokens (shift and "none" shapes
            refer to the gathered tensors).
        vocab_parallel_options: Apple CCE's VocabParallelOptions (start, stop, group, reduce_e_grad);
            its group None is the default process group, as in Apple CCE.
        grad_in_forward: the mode. True (the fast mode): the gradients from materialised logits
            (6·N·D·V FLOPs instead of 8, no recompute; filter_eps is not used; the logits of all
            tokens in the input dtype for bf16, float32 for other dtypes, as the unfused layer holds
            them). Two paths (DESIGN.md): where all tokens' logits fit one chunk of
            Tuning.fast_logits_bytes (4 GiB), the held-logits path keeps them to the backward and
            forms the gradients there, with the upstream gradient known: ANY upstream gradient is
            exact (per token for "none"; the z-loss output's own too), dE and dC rounded once.
            Beyond that, token chunks with the gradients computed during the forward, for an
            upstream gradient that is the same for every non-ignored token: "mean"/"sum", or "none"
            followed by such a reduction (checked on the device: otherwise the gradients are NaN;
            dC accumulates over the chunks in float32). Needs return_lse=False; the backward may
            run only once (no retain_graph) and has no double backward (create_graph=True raises;
            impl="torch" with grad_in_forward=False differentiates twice).
            False (the memory-first mode): statistics in the forward, logits recomputed tile by
            tile in the backward; the backward's memory stays within ~10% of the gradients.
            "auto" (the default): the fast mode where it is exact and cheap to be in — the triton backend, no
            return_lse, not while torch.compile traces (where the memory-first mode's custom ops
            avoid a graph break); "mean"/"sum" always, "none" and return_z_loss where the logits
            fit one chunk (the held-logits path); with any of the other options (class weights,
            label smoothing, z-loss, the accuracy / predicted-token outputs) — else the
            memory-first mode. The default since a multi-seed training-curve comparison against
            the unfused loss showed the fast mode's bf16 logits harmless (benchmarks/RESULTS.md);
            pass False for CCE's memory. Without autograd (no input requires grad) the
            memory-first forward runs in every case.
        loss_mask: with reduction="none", the 0/1 mask that will multiply the per-token loss
            (Megatron's `sum(loss · loss_mask) / n`), shaped like targets (sequence parallel: this
            rank's slice). A promise that positions where it is 0 get upstream gradient 0: the
            fast mode then keeps their loss values but computes no gradient for them, so on its
            token-chunked path the upstream gradient stays uniform over the rest (a non-zero
            upstream gradient there gives NaN gradients, never silently wrong ones, on both paths).
            The memory-first mode needs no promise.
        tuning: performance knobs (block shapes, chunk sizes, TMA, skip-policy thresholds; see
            `Tuning`); None reads them from the VPCCE_* environment variables (`Tuning.from_env`).
        dc_accumulate_into: None, or a contiguous floating-point tensor of c's shape (Megatron's
            float32 `weight.main_grad`; a float32 master gradient under autocast) into which c's
            gradient is ADDED in the backward; c then gets no gradient (c.grad stays None). On the
            fast mode's held-logits path with a float32 target (float64 for float64 inputs) dC =
            Gᵀ·E is accumulated straight into it by one float32-output product: no dC tensor is
            formed. Elsewhere dC is formed as before and added into it.

    Returns:
        The loss (a scalar, or per token for "none"), float32 (float64 for float64 inputs); with
        return_lse, (loss, lse); with any return_z_loss / return_token_accuracy /
        return_predicted_tokens, a CrossEntropyOutput (lse in it when return_lse).
        A target outside [0, vocab_size) that is not ignore_index gives a NaN loss for its token.
    """
    impl = _impl_name(impl)
    e, c, targets, bias, group, vocab_start = _from_dtensors(e, c, targets, bias, group, vocab_start,
                                                             vocab_parallel_options)
    shift = _validate(e, c, targets, bias, reduction, softcap, label_smoothing, z_loss, shift, filter_eps, impl,
                      return_lse, grad_in_forward)
    for name, flag in (("return_z_loss", return_z_loss), ("return_token_accuracy", return_token_accuracy),
                       ("return_predicted_tokens", return_predicted_tokens)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected True or False, got {flag!r}")
    layout = _layout(c, group, vocab_start, vocab_size, reduce_grad_e, sequence_parallel, vocab_parallel_options)
    need_argmax = return_token_accuracy or return_predicted_tokens
    _check_argmax_vocab(need_argmax, layout, "return_token_accuracy/return_predicted_tokens")
    weights = _class_weights(class_weights, e, c, layout)
    backend, exact = _backend(impl, e)
    needs_grad = torch.is_grad_enabled() and any(q is not None and q.requires_grad for q in (e, c, bias))
    if impl in _DC_UNFILTERED_IMPLS or not filter_c_grad:
        filter_eps = None
    device_type = e.device.type
    dtype = torch.get_autocast_dtype(device_type) if _autocast_enabled(device_type) else e.dtype
    tuning = Tuning.from_env() if tuning is None else tuning
    # tokens the loss Function sees (sequence parallel: all ranks'), whether their logits fit one chunk
    n_tokens = (e.numel() // max(1, e.shape[-1])) * (layout["world"] if layout["sequence_parallel"] else 1)
    one_chunk = holds_logits(_ChunkView(tuning, layout["n_valid"], exact), n_tokens, dtype)
    if grad_in_forward == "auto":
        # "none" (per-token upstream gradients) and return_z_loss (an output with a gradient of its
        # own) only where the held-logits path runs: the token-chunked one needs a uniform upstream
        grad_in_forward = (backend is not torch_backend and not return_lse and not torch.compiler.is_compiling()
                           and (one_chunk or (reduction in ("mean", "sum") and not return_z_loss)))
    gif = grad_in_forward and needs_grad  # without autograd the default path runs
    eps, adaptive = _filter(filter_eps, backend, exact, dtype, label_smoothing, gif)
    plan = Plan(
        reduction=reduction, ignore_index=ignore_index, label_smoothing=float(label_smoothing),
        z_loss=float(z_loss), softcap=None if softcap is None else float(softcap),
        **layout, backend=backend, exact=exact, filter_eps=eps, adaptive_filter=adaptive, grad_in_forward=gif,
        tuning=tuning, class_weights=weights, need_argmax=need_argmax,
    )
    if loss_mask is not None:
        _check_loss_mask(loss_mask, targets, reduction)
    if dc_accumulate_into is not None:
        _check_accumulate_into(dc_accumulate_into, c)
    return _run(plan, e, c, targets, bias, shift, return_lse, return_z_loss, return_token_accuracy,
                return_predicted_tokens, loss_mask,
                dc_accumulate_into if needs_grad and c.requires_grad else None, one_chunk)


@dataclass(frozen=True)
class _ChunkView:
    """The three fields of a Plan that `holds_logits` reads, before the Plan exists."""

    tuning: Tuning
    n_valid: int
    exact: bool


def _check_accumulate_into(target, c) -> None:
    if not isinstance(target, torch.Tensor) or not target.is_floating_point():
        got = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise TypeError(f"dc_accumulate_into: expected a floating-point tensor, got {got}")
    if tuple(target.shape) != tuple(c.shape) or target.device != c.device:
        raise ValueError(f"dc_accumulate_into: expected a tensor of c's shape {tuple(c.shape)} on {c.device}, "
                         f"got {tuple(target.shape)} on {target.device}")
    if not target.is_contiguous() or target.requires_grad:
        raise ValueError("dc_accumulate_into: expected a contiguous tensor that does not require grad")


def _check_loss_mask(loss_mask, targets, reduction) -> None:
    if not isinstance(loss_mask, torch.Tensor) or tuple(loss_mask.shape) != tuple(targets.shape):
        got = tuple(loss_mask.shape) if isinstance(loss_mask, torch.Tensor) else type(loss_mask).__name__
        raise ValueError(f"loss_mask: expected a tensor of targets' shape {tuple(targets.shape)}, got {got}")
    if loss_mask.device != targets.device:
        raise ValueError(f"loss_mask: is on {loss_mask.device} but targets are on {targets.device}")
    if reduction != "none":
        raise ValueError(f"loss_mask: needs reduction='none' (it describes what multiplies the per-token loss), "
                         f"got {reduction!r}")


def _prepare(plan: Plan, e, c, targets, bias, shift: int, loss_mask=None):
    """(e [N, D], c, bias, t [N] int64 global ids, the per-token shape, mask [N] bool or None) of
    a validated call: autocast, sequence-parallel gather of the targets and the mask, shift
    (targets padded with ignore_index, the mask with False), flattening. Under sequence
    parallelism e stays this rank's slice, flattened [N/W, D]: the autograd Functions gather it
    and reduce-scatter its gradient (in float32 for 16-bit inputs, before rounding)."""
    device_type = e.device.type
    if _autocast_enabled(device_type):  # the classifier matmul runs in the autocast dtype, as nn.Linear would
        dt = torch.get_autocast_dtype(device_type)
        e, c = e.to(dt), c.to(dt)
        bias = None if bias is None else bias.to(dt)
    if plan.sequence_parallel:
        targets = vp.all_gather_along_dim0(targets, plan.group, "all-gather sequence-parallel targets")
        if loss_mask is not None:
            loss_mask = vp.all_gather_along_dim0(loss_mask, plan.group, "all-gather sequence-parallel loss mask")
    if shift:
        # targets[..., k:] padded with ignore_index: e[..., t, :] predicts targets[..., t + k].
        pad = targets.new_full(targets.shape[:-1] + (shift,), plan.ignore_index)
        targets = torch.cat([targets[..., shift:], pad], dim=-1)
        if loss_mask is not None:
            loss_mask = torch.cat([loss_mask[..., shift:], torch.zeros_like(loss_mask[..., :shift])], dim=-1)
    mask = None if loss_mask is None else (loss_mask.reshape(-1) != 0)
    return e.reshape(-1, e.shape[-1]), c, bias, targets.reshape(-1).long(), targets.shape, mask


def _per_token(q: torch.Tensor, out_shape, shift: int) -> torch.Tensor:
    """A per-token [N] vector shaped like targets[..., shift:]."""
    q = q.view(out_shape)
    return q[..., : out_shape[-1] - shift] if shift else q


def _run(plan: Plan, e, c, targets, bias, shift: int, return_lse: bool, return_z_loss: bool = False,
         return_token_accuracy: bool = False, return_predicted_tokens: bool = False, loss_mask=None,
         dc_into=None, one_chunk: bool = False):
    """The loss (and lse, or a CrossEntropyOutput) of a validated call: `_prepare`, the autograd
    Function of the plan's mode, reductions. dc_into: c's gradient is added into it (none is
    returned); one_chunk: the fast mode holds the logits (`LossWithHeldLogits`)."""
    held = plan.grad_in_forward and one_chunk
    if dc_into is not None and not held:  # c's gradient formed as a tensor: added into dc_into
        c = _accumulate_grad_into(c, dc_into)
    e2, c, bias, t, out_shape, mask = _prepare(plan, e, c, targets, bias, shift, loss_mask)

    with torch.autocast(e.device.type, enabled=False):
        if plan.grad_in_forward:
            # the Function reduces (both of "mean"'s divisors known here, as device scalars) and
            # hands back the z-loss part and the argmax when asked for
            dens = plan.mean_denominators(t) if plan.reduction == "mean" else None
            want_z = return_z_loss and plan.z_loss > 0
            if held:  # one chunk: the logits are held to the backward, any upstream gradient
                outs = _loss_with_held_logits(e2, c, bias, t, plan, dens, mask, want_z, dc_into)
            else:  # token chunks: the gradients formed in the forward, a uniform upstream gradient
                outs = _loss_with_grad_in_forward(e2, c, bias, t, plan, dens, mask, want_z)
            loss = outs[0] if plan.reduction != "none" else _per_token(outs[0], out_shape, shift)
            zl = outs[1] if want_z else None
            argmax = outs[-1] if plan.need_argmax else None
        else:
            stats = ShardStats.apply(e2, c, bias, t - plan.vocab_start, plan)
            lse, x, s = stats[:3]
            ce, zl = plan.token_loss_parts(lse, x, s, t)
            argmax = stats[plan.stat_names.index("argmax")] if plan.need_argmax else None
            loss = _reduce(plan, ce, zl, t, out_shape, shift)
    if not (return_z_loss or return_token_accuracy or return_predicted_tokens):
        return (loss, _per_token(lse, out_shape, shift)) if return_lse else loss

    out = CrossEntropyOutput(loss, lse=_per_token(lse, out_shape, shift) if return_lse else None)
    if return_z_loss:
        zl = torch.zeros(t.shape, dtype=loss.dtype, device=t.device) if zl is None else zl
        out.z_loss = {"mean": lambda: zl.sum() / plan.mean_denominators(t)[1], "sum": zl.sum,
                      "none": lambda: _per_token(zl, out_shape, shift)}[plan.reduction]()
    if return_token_accuracy or return_predicted_tokens:
        valid = t != plan.ignore_index
        predicted = argmax.long()
        hit = (valid & (predicted == t)).float()
        if return_token_accuracy:
            out.token_accuracy = (_per_token(hit, out_shape, shift) if plan.reduction == "none"
                                  else hit.sum() / valid.sum().clamp(min=1))
        if return_predicted_tokens:
            out.predicted_tokens = _per_token(torch.where(valid, predicted, -1), out_shape, shift)
    return out


def _reduce(plan: Plan, ce, zl, t, out_shape, shift: int) -> torch.Tensor:
    """The loss from the per-token cross-entropy part ce [N] and z-loss part zl [N] (or None)."""
    per_token = ce if zl is None else ce + zl
    if plan.reduction == "mean":
        den_ce, den_count = plan.mean_denominators(t)
        if plan.class_weights is None or zl is None:
            return per_token.sum() / den_ce
        return ce.sum() / den_ce + zl.sum() / den_count  # the z-loss is not class-weighted: its own count
    if plan.reduction == "sum":
        return per_token.sum()
    return _per_token(per_token, out_shape, shift)


def _from_dtensors(e, c, targets, bias, group, vocab_start, options):
    """Plain tensors for DTensor arguments: c sharded along the vocabulary gives its local rows,
    the group and the shard offset (`distributed.dtensor_vocab_shard`); replicated DTensors
    (e, targets, c, bias) their full values. Returns (e, c, targets, bias, group, vocab_start)."""
    if vp.is_dtensor(c):
        c, bias, dt_group, dt_start = vp.dtensor_vocab_shard(c, bias, "c")
        if dt_group is not None:
            if group is not None or vocab_start is not None or options is not None:
                raise ValueError("c: a DTensor sharded along the vocabulary gives the group and the shard "
                                 "offset; pass no group, vocab_start or vocab_parallel_options with it")
            group, vocab_start = dt_group, dt_start
    elif vp.is_dtensor(bias):
        bias = bias.full_tensor()
    e = e.full_tensor() if vp.is_dtensor(e) else e
    targets = targets.full_tensor() if vp.is_dtensor(targets) else targets
    return e, c, targets, bias, group, vocab_start


def _check_argmax_vocab(need: bool, layout: dict, what: str) -> None:
    if need and layout["vocab_size"] > stats.MAX_ARGMAX_VOCAB:
        raise ValueError(f"{what}: the argmax travels as a float32 id, exact up to 2**24 = {stats.MAX_ARGMAX_VOCAB}; "
                         f"vocab_size is {layout['vocab_size']}")


def _class_weights(w, e, c, layout: dict) -> torch.Tensor | None:
    """The checked class weights in the statistics' dtype (float32, float64 for float64 e), or None."""
    if w is None:
        return None
    _check_float("class_weights", w)
    if w.device != e.device:
        raise ValueError(f"class_weights: is on {w.device} but e is on {e.device}; all tensors must share a device")
    size = layout["vocab_size"]
    total = vp.shard_layout(layout["group"], layout["vocab_start"], c.shape[0]) if layout["world"] > 1 else c.shape[0]
    if w.dim() != 1 or w.shape[0] not in (size, total):
        allowed = f"({size},)" + ("" if total == size else f" or ({total},)")
        raise ValueError(f"class_weights: expected shape {allowed} (one weight per id of the global vocabulary), "
                         f"got {tuple(w.shape)}")
    if w.requires_grad and torch.is_grad_enabled():
        raise ValueError("class_weights: gradients with respect to the class weights are not supported; "
                         "pass a tensor that does not require grad (e.g. weights.detach())")
    return w.to(torch.float64 if e.dtype == torch.float64 else torch.float32)


@torch.compiler.disable  # runs eagerly under torch.compile (a graph break): Python loop, collectives
def _loss_with_grad_in_forward(*args):
    return LossWithGradInForward.apply(*args)


@torch.compiler.disable  # eagerly under torch.compile (a graph break), as the token-chunked path
def _loss_with_held_logits(*args):
    return LossWithHeldLogits.apply(*args)


@torch.compiler.disable  # its backward writes into a tensor that is not a graph input
def _accumulate_grad_into(c, target):
    return _AccumulateGradInto.apply(c, target)


# LinearCrossEntropy's positional parameters: Apple CCE's module, in its order.
_MODULE_POSITIONAL = ("ignore_index", "softcap", "reduction", "shift", "filter_eps", "accum_e_fp32", "accum_c_fp32",
                      "filter_e_grad", "filter_c_grad", "impl", "return_lse")


class LinearCrossEntropy(torch.nn.Module):
    """Module form of `linear_cross_entropy`; options are fixed at construction (`self.options`).

    LinearCrossEntropy(ignore_index, softcap, reduction, shift, filter_eps, accum_e_fp32,
    accum_c_fp32, filter_e_grad, filter_c_grad, impl, return_lse, **keyword options): the
    positional order is Apple CCE's module's; any of linear_cross_entropy's keywords may follow.
    forward(e [..., D], c [V, D], targets [...], bias=None) → loss (see linear_cross_entropy).
    """

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__()
        if len(args) > len(_MODULE_POSITIONAL):
            raise TypeError(f"LinearCrossEntropy: at most {len(_MODULE_POSITIONAL)} positional options "
                            f"({', '.join(_MODULE_POSITIONAL)}), got {len(args)}")
        for name, value in zip(_MODULE_POSITIONAL, args):
            if name in options:
                raise TypeError(f"LinearCrossEntropy: {name} given both positionally and by keyword")
            options[name] = value
        self.options = options

    def forward(self, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None):
        return linear_cross_entropy(e, c, targets, bias, **self.options)
