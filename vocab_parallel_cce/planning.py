"""Planning: one call's arguments checked, then decided into a `Plan` and the call's inputs.

In order: DTensor arguments unwrapped (`from_dtensors`), every argument checked (a TypeError or
ValueError naming it, before any work), the vocabulary layout of this rank's shard
(`vocab_layout`: a collective the first time a multi-rank layout is seen), the backend
(`choose_backend`), the path (`choose_path`: the memory-first recompute, the held logits or the
token chunks, with the chunk size) and dC's tile skipping (`choose_filter`). `plan_cross_entropy`
serves `linear_cross_entropy` (and, through it, the adapters), `plan_log_probs` serves
`linear_log_probs`; `check_loss_options` is the adapters' early check of the loss options.
"""

from __future__ import annotations

import enum
import operator
import os
import warnings
from typing import Any, NamedTuple

import torch

from . import distributed as vp
from . import stats
from .backends import torch_backend
from .backends.protocol import Backend
from .plan import Path, Plan
from .tuning import Tuning

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
# dC tiles whose softmax stays below 2^-12 hold nothing a 16-bit gradient resolves.
AUTO_FILTER_EPS = 2.0**-12


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


def impl_name(impl: str | LinearCrossEntropyImpl) -> str:
    return impl.name.lower() if isinstance(impl, LinearCrossEntropyImpl) else impl


class Call(NamedTuple):
    """A planned call's inputs as its path takes them (DTensors unwrapped, shift an int) and the
    outputs it asked for besides the loss (run.run_cross_entropy)."""

    e: torch.Tensor  # [..., D]
    c: torch.Tensor  # [V_local, D]
    targets: torch.Tensor  # e.shape[:-1], global ids
    bias: torch.Tensor | None  # [V_local]
    shift: int
    loss_mask: torch.Tensor | None = None  # targets' shape
    dc_into: torch.Tensor | None = None  # c's gradient is added into it (only where it is needed)
    return_lse: bool = False
    return_z_loss: bool = False  # also: the fast paths hand their z-loss part out
    return_token_accuracy: bool = False
    return_predicted_tokens: bool = False


# ---------------------------------------------------------------------------------------- checks


def check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled, False for device types autocast does not know."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def check_inputs(e, c, targets, bias) -> None:
    """TypeError/ValueError naming the first of e [..., D], c [V, D], targets e.shape[:-1] and
    bias [V] that is not what the loss takes (their device: `check_device`)."""
    check_float("e", e)
    check_float("c", c)
    if e.dim() < 1:
        raise ValueError("e: expected shape [..., D], got a 0-d tensor")
    if c.dim() != 2:
        raise ValueError(f"c: expected a 2-D classifier [V, D], got shape {tuple(c.shape)}")
    if c.shape[1] != e.shape[-1]:
        raise ValueError(f"c: hidden size D={c.shape[1]} does not match e's last dimension {e.shape[-1]}")
    if e.shape[-1] == 0:
        raise ValueError(f"e/c: the hidden size D must be > 0, got e of shape {tuple(e.shape)} and c of shape "
                         f"{tuple(c.shape)}")
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
        check_float("bias", bias)
        if bias.shape != (c.shape[0],):
            raise ValueError(f"bias: expected shape ({c.shape[0]},) (one per row of c), got {tuple(bias.shape)}")
    for name, t in (("c", c), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != e.device:
            raise ValueError(f"{name}: is on {t.device} but e is on {e.device}; all tensors must share a device")
    if not autocast_enabled(e.device.type):
        if c.dtype != e.dtype or (bias is not None and bias.dtype != e.dtype):
            raise TypeError(
                f"c/bias: dtype must match e's ({e.dtype}), got c {c.dtype}"
                + ("" if bias is None else f", bias {bias.dtype}")
            )


def check_device(e, impl: str) -> None:
    """ValueError unless e (and so every tensor of the call) is on a device `impl` runs on: Triton
    on cpu and cuda, the torch backend on any device with data (not meta). Checked last, once
    the layout and the vocabulary checks, which need no data, have run."""
    if IMPL_ALIASES.get(impl, impl) in ("triton", "triton_exact") and e.device.type not in ("cpu", "cuda"):
        raise ValueError(f"impl={impl!r} does not support device type '{e.device.type}'")
    if e.device.type == "meta":
        raise ValueError("e: is on the meta device, which holds no values; expected a tensor on a device "
                         "with data (cpu or cuda; impl='torch' also runs on others)")


def check_ignore_index(ignore_index) -> int:
    """ignore_index as an int: an int or an integer-like (a numpy integer, a 0-d integer tensor);
    a TypeError for anything else (a bool, a float)."""
    if not isinstance(ignore_index, bool):
        try:
            return operator.index(ignore_index)
        except TypeError:
            pass
    raise TypeError(f"ignore_index: expected an int (the target id of tokens to skip), got {ignore_index!r}")


def check_shift(shift, targets) -> int:
    """shift as an int (True = 1), checked against the targets' sequence length."""
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
    impl = impl_name(impl)
    if IMPL_ALIASES.get(impl, impl) not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS + tuple(IMPL_ALIASES)}, got {impl!r}")


def check_outputs(reduction, grad_in_forward, return_lse, return_z_loss=False, return_token_accuracy=False,
                  return_predicted_tokens=False) -> None:
    """TypeError/ValueError naming the first of the reduction, the mode and the output flags that
    is not one of their values, or that they do not go together."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    if not (grad_in_forward == "auto" or isinstance(grad_in_forward, bool)):
        raise TypeError(f"grad_in_forward: expected True, False or 'auto', got {grad_in_forward!r}")
    if grad_in_forward is True and return_lse:
        raise ValueError("grad_in_forward: needs return_lse=False (lse's gradient would be per token)")
    for name, flag in (("return_z_loss", return_z_loss), ("return_token_accuracy", return_token_accuracy),
                       ("return_predicted_tokens", return_predicted_tokens)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected True or False, got {flag!r}")


def check_loss_mask(loss_mask, targets, reduction) -> None:
    if not isinstance(loss_mask, torch.Tensor) or tuple(loss_mask.shape) != tuple(targets.shape):
        got = tuple(loss_mask.shape) if isinstance(loss_mask, torch.Tensor) else type(loss_mask).__name__
        raise ValueError(f"loss_mask: expected a tensor of targets' shape {tuple(targets.shape)}, got {got}")
    if loss_mask.device != targets.device:
        raise ValueError(f"loss_mask: is on {loss_mask.device} but targets are on {targets.device}")
    if reduction != "none":
        raise ValueError(f"loss_mask: needs reduction='none' (it describes what multiplies the per-token loss), "
                         f"got {reduction!r}")


def check_accumulate_into(target, c) -> None:
    if not isinstance(target, torch.Tensor) or not target.is_floating_point():
        got = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise TypeError(f"dc_accumulate_into: expected a floating-point tensor, got {got}")
    if tuple(target.shape) != tuple(c.shape) or target.device != c.device:
        raise ValueError(f"dc_accumulate_into: expected a tensor of c's shape {tuple(c.shape)} on {c.device}, "
                         f"got {tuple(target.shape)} on {target.device}")
    if not target.is_contiguous() or target.requires_grad:
        raise ValueError("dc_accumulate_into: expected a contiguous tensor that does not require grad")


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    return float(temperature)


def check_class_weights(w, e, c, layout: dict) -> torch.Tensor | None:
    """The checked class weights in the statistics' dtype (float32, float64 for float64 e), or None."""
    if w is None:
        return None
    check_float("class_weights", w)
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


def check_argmax_vocab(need: bool, layout: dict, what: str) -> None:
    if need and layout["vocab_size"] > stats.MAX_ARGMAX_VOCAB:
        raise ValueError(f"{what}: the argmax travels as a float32 id, exact up to 2**24 = {stats.MAX_ARGMAX_VOCAB}; "
                         f"vocab_size is {layout['vocab_size']}")


# ------------------------------------------------------------------------------- the vocabulary


def default_group(group):
    """Apple CCE's reading of group=None: the default process group where one is initialised."""
    if group is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.group.WORLD
    return group


def from_dtensors(e, c, targets, bias, group, vocab_start, options):
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


def vocab_layout(c, group, vocab_start, vocab_size, reduce_grad_e, sequence_parallel, options=None) -> dict[str, Any]:
    """The plan's shard fields (vocab_start, n_valid, vocab_size, group, world, reduce_grad_e,
    sequence_parallel), checked. `options`: Apple CCE's VocabParallelOptions (start, stop, group,
    reduce_e_grad) instead of group / vocab_start. With a multi-rank group the layout check is a
    collective (once per layout: distributed.shard_layout)."""
    if options is not None:
        if group is not None or vocab_start is not None:
            raise ValueError("vocab_parallel_options: give it, or group/vocab_start, not both")
        if options.stop - options.start != c.shape[0]:
            raise ValueError(
                f"vocab_parallel_options: stop - start = {options.stop - options.start} but c has {c.shape[0]} rows"
            )
        group = default_group(options.group)  # Apple CCE's None: the default process group
        return vocab_layout(c, group, options.start, vocab_size, options.reduce_e_grad, sequence_parallel)
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


# ------------------------------------------------------------------------- backend, path, filter


def _no_triton_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why Triton cannot run on `device`, a cpu or cuda one (`check_inputs`), for inputs of `dtype`;
    None: it can."""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "needs a CUDA tensor (or TRITON_INTERPRET=1)"
        if dtype == torch.bfloat16:
            from .backends.triton.common import interpreter_computes_bf16_dot

            if not interpreter_computes_bf16_dot():
                return "runs bfloat16 products (tl.dot) wrongly in this release's interpreter (TRITON_INTERPRET=1)"
        return None
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "needs an Ampere or newer GPU (compute capability >= 8.0)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs the `triton` package"
    return None


def choose_backend(impl: str, e: torch.Tensor) -> tuple[Backend, bool]:
    """(backend module, exact) for `impl` and e's device and dtype (`check_device` first). Triton
    asked for where it cannot run falls back to the exact torch path with a UserWarning naming the
    value given."""
    check_device(e, impl)
    name = IMPL_ALIASES.get(impl, impl)
    if name == "auto":
        usable = e.device.type == "cuda" and e.dtype != torch.float64 and _no_triton_reason(e.device) is None
        name = "triton" if usable else "torch"
    if name == "torch":
        return torch_backend, False
    why = _no_triton_reason(e.device, e.dtype)
    if why is not None:
        warnings.warn(f"impl={impl!r}: Triton {why}; using the exact torch path (impl='torch') instead",
                      UserWarning, stacklevel=4)
        return torch_backend, False
    if e.dtype == torch.float64:
        raise TypeError(f"impl={impl!r} supports float32/float16/bfloat16 inputs; use impl='torch' for float64")
    from .backends import triton as triton_backend

    return triton_backend, name == "triton_exact"


def choose_path(grad_in_forward, backend: Backend, exact: bool, dtype: torch.dtype, n_tokens: int, n_valid: int,
                tuning: Tuning, needs_grad: bool, uniform_upstream: bool, return_lse: bool) -> tuple[Path, int | None]:
    """(path, chunk_tokens) of a call whose loss Function sees n_tokens tokens (under sequence
    parallelism all ranks') of logits over n_valid rows stored in the backend's `logits_dtype`:
    the fast mode holds them ("held") where they fit one chunk of `tuning.grad_in_forward_chunk`,
    else goes through token chunks of that many tokens ("chunked"). `uniform_upstream`: the
    upstream gradient is one value on every scored token ("mean"/"sum" without a z-loss output of
    its own), which the token chunks need. "auto" takes the fast mode on the Triton backend
    without return_lse, not while torch.compile traces (where the memory-first mode's custom ops
    avoid a graph break), where the logits fit one chunk or the upstream is uniform. Without
    autograd (`needs_grad` False) the memory-first forward runs: "recompute"."""
    element = backend.logits_dtype(dtype, exact).itemsize
    chunk = tuning.grad_in_forward_chunk(n_tokens, n_valid, element)
    one_chunk = chunk >= n_tokens
    if grad_in_forward == "auto":
        grad_in_forward = (backend is not torch_backend and not return_lse and not torch.compiler.is_compiling()
                           and (one_chunk or uniform_upstream))
    if not (grad_in_forward and needs_grad):
        return "recompute", None
    return ("held", None) if one_chunk else ("chunked", chunk)


def choose_filter(filter_eps, backend: Backend, exact: bool, dtype: torch.dtype, label_smoothing: float,
                  path: Path) -> tuple[float | None, bool]:
    """The plan's (filter_eps, adaptive_filter) for the Triton memory-first backward's dC tile
    skipping. "auto": adaptive skipping at AUTO_FILTER_EPS for 16-bit inputs, where it measured
    faster on trained-like logits and is turned off while logits are dense (backends/triton/
    skip_policy.py). A number: always skip below it. Never on the torch backend, in exact mode,
    on the fast paths, or with label smoothing (its u = ∂L/∂s ≠ 0 puts weight on every tile)."""
    if filter_eps is None or exact or backend is torch_backend or path != "recompute" or label_smoothing > 0:
        return None, False
    if filter_eps == "auto":
        return (AUTO_FILTER_EPS, True) if dtype in (torch.float16, torch.bfloat16) else (None, False)
    return (float(filter_eps), False) if filter_eps > 0 else (None, False)


def uses_hopper(backend: Backend, exact: bool, dtype: torch.dtype, device: torch.device, tuning: Tuning, path: Path,
                *, has_bias: bool, softcap, weighted_sum: bool, need_argmax: bool) -> bool:
    """Whether the Hopper kernels compute the call's logits products (backends/triton/hopper/):
    the Triton backend on an sm_90 GPU with a Triton they are tested on (`hopper.available`,
    `tuning.use_gluon`), bf16 logits outside exact mode, and none of the options whose arithmetic
    their epilogues leave to the portable kernels: bias, softcap, class-weighted label smoothing,
    the argmax outputs. By default (use_gluon None) the memory-first path ("recompute") only: the
    fast mode's forward measured faster as cuBLAS plus the statistics pass (DESIGN.md);
    use_gluon=True takes them there too, for the loss from the float32 products."""
    if backend is torch_backend or exact or dtype != torch.bfloat16:
        return False
    if has_bias or softcap is not None or weighted_sum or need_argmax:
        return False
    if path != "recompute" and tuning.use_gluon is not True:
        return False
    from .backends.triton import hopper

    return hopper.available(device, tuning.use_gluon)


# ------------------------------------------------------------------------------------ the plans


def plan_cross_entropy(
    e, c, targets, bias=None, ignore_index=-100, softcap=None, reduction="mean", shift=0, return_lse=False,
    filter_eps=None, filter_c_grad=True, impl="auto", label_smoothing=0.0, z_loss=0.0, class_weights=None,
    return_z_loss=False, return_token_accuracy=False, return_predicted_tokens=False, group=None,
    vocab_start=None, vocab_size=None, reduce_grad_e=True, sequence_parallel=False,
    vocab_parallel_options=None, grad_in_forward="auto", loss_mask=None, tuning=None, dc_accumulate_into=None,
) -> tuple[Plan, Call]:
    """(the Plan, the Call) of `linear_cross_entropy`'s arguments (see there), checked: a
    TypeError or ValueError naming the first bad one, before any work."""
    impl = impl_name(impl)
    e, c, targets, bias, group, vocab_start = from_dtensors(e, c, targets, bias, group, vocab_start,
                                                            vocab_parallel_options)
    check_inputs(e, c, targets, bias)
    ignore_index = check_ignore_index(ignore_index)
    check_outputs(reduction, grad_in_forward, return_lse, return_z_loss, return_token_accuracy,
                  return_predicted_tokens)
    check_loss_options(softcap, label_smoothing, z_loss, filter_eps, impl)
    shift = check_shift(shift, targets)
    if loss_mask is not None:
        check_loss_mask(loss_mask, targets, reduction)
    if dc_accumulate_into is not None:
        check_accumulate_into(dc_accumulate_into, c)
    layout = vocab_layout(c, group, vocab_start, vocab_size, reduce_grad_e, sequence_parallel, vocab_parallel_options)
    need_argmax = return_token_accuracy or return_predicted_tokens
    check_argmax_vocab(need_argmax, layout, "return_token_accuracy/return_predicted_tokens")
    weights = check_class_weights(class_weights, e, c, layout)
    backend, exact = choose_backend(impl, e)
    tuning = Tuning.from_env() if tuning is None else tuning
    needs_grad = torch.is_grad_enabled() and any(q is not None and q.requires_grad for q in (e, c, bias))
    # the logits' dtype (autocast's where it is on); the tokens the loss Function sees (sequence
    # parallel: all ranks')
    dtype = torch.get_autocast_dtype(e.device.type) if autocast_enabled(e.device.type) else e.dtype
    n_tokens = (e.numel() // e.shape[-1]) * (layout["world"] if layout["sequence_parallel"] else 1)
    path, chunk = choose_path(grad_in_forward, backend, exact, dtype, n_tokens, layout["n_valid"], tuning, needs_grad,
                              reduction in ("mean", "sum") and not return_z_loss, return_lse)
    if impl in _DC_UNFILTERED_IMPLS or not filter_c_grad:
        filter_eps = None
    eps, adaptive = choose_filter(filter_eps, backend, exact, dtype, label_smoothing, path)
    hopper = uses_hopper(backend, exact, dtype, e.device, tuning, path, has_bias=bias is not None, softcap=softcap,
                         weighted_sum=weights is not None and label_smoothing > 0, need_argmax=need_argmax)
    plan = Plan(
        reduction=reduction, ignore_index=ignore_index, label_smoothing=float(label_smoothing),
        z_loss=float(z_loss), softcap=None if softcap is None else float(softcap),
        **layout, backend=backend, exact=exact, filter_eps=eps, adaptive_filter=adaptive, path=path,
        tuning=tuning, class_weights=weights, need_argmax=need_argmax, chunk_tokens=chunk, hopper=hopper,
        bf16_logits=backend is not torch_backend and not exact and dtype == torch.bfloat16 and path != "recompute",
    )
    dc_into = dc_accumulate_into if needs_grad and c.requires_grad else None
    return plan, Call(e, c, targets, bias, shift, loss_mask, dc_into, return_lse, return_z_loss,
                      return_token_accuracy, return_predicted_tokens)


def plan_log_probs(e, c, targets, temperature=1.0, bias=None, softcap=None, ignore_index=-100, shift=0,
                   impl="auto", group=None, vocab_start=None, vocab_size=None, reduce_grad_e=True,
                   sequence_parallel=False, tuning=None) -> tuple[Plan, Call]:
    """(the Plan, the Call) of `linear_log_probs`' arguments (see there), checked as
    `plan_cross_entropy` checks them: the memory-first path with the entropy's statistic, per
    token. No dC tile skipping: the entropy's term q·p·(z − pz) is not bounded by p alone."""
    impl = impl_name(impl)
    e, c, targets, bias, group, vocab_start = from_dtensors(e, c, targets, bias, group, vocab_start, None)
    check_inputs(e, c, targets, bias)
    ignore_index = check_ignore_index(ignore_index)
    check_loss_options(softcap, 0.0, 0.0, None, impl)
    shift = check_shift(shift, targets)
    temperature = check_temperature(temperature)
    layout = vocab_layout(c, group, vocab_start, vocab_size, reduce_grad_e, sequence_parallel)
    backend, exact = choose_backend(impl, e)
    tuning = Tuning.from_env() if tuning is None else tuning
    hopper = uses_hopper(backend, exact, e.dtype, e.device, tuning, "recompute", has_bias=bias is not None,
                         softcap=softcap, weighted_sum=False, need_argmax=False)
    plan = Plan(
        reduction="none", ignore_index=ignore_index, label_smoothing=0.0, z_loss=0.0,
        softcap=None if softcap is None else float(softcap), **layout, backend=backend, exact=exact,
        filter_eps=None, adaptive_filter=False, path="recompute", tuning=tuning, temperature=temperature,
        need_entropy=True, hopper=hopper,
    )
    return plan, Call(e, c, targets, bias, shift)
