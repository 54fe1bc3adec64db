"""Running a planned call (planning.py): its inputs prepared, the plan's path (paths/), the loss
reduced, the outputs it asked for assembled. `run_cross_entropy` serves `linear_cross_entropy`;
`prepare` and `per_token` also `linear_log_probs`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import distributed as vp
from .paths import chunked, held
from .paths.recompute import shard_stats
from .paths.shared import accumulate_grad_into
from .plan import Plan
from .planning import Call, autocast_enabled


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


class Prepared(NamedTuple):
    """A call's inputs as the paths take them: e [N, D] (sequence parallel: this rank's slice,
    flattened [N/W, D]), c, bias, t [N] int64 global ids (shifted; gathered), the per-token shape
    (targets' after the shift's padding), mask [N] bool or None."""

    e: torch.Tensor
    c: torch.Tensor
    bias: torch.Tensor | None
    t: torch.Tensor
    out_shape: torch.Size
    mask: torch.Tensor | None


class Result(NamedTuple):
    """What a path gives back: the loss (reduced, or per token shaped like targets[..., shift:]),
    and, [N] each or None, the lse (the memory-first path), the z-loss part and the argmax (global
    ids as floats), with the prepared targets t [N] and their per-token shape."""

    loss: torch.Tensor
    lse: torch.Tensor | None
    z_part: torch.Tensor | None
    argmax: torch.Tensor | None
    t: torch.Tensor
    out_shape: torch.Size


def prepare(plan: Plan, e, c, targets, bias, shift: int, loss_mask=None) -> Prepared:
    """Autocast, sequence-parallel gather of the targets and the mask, shift (targets padded with
    ignore_index, the mask with False), flattening. Under sequence parallelism e stays this rank's
    slice: the autograd Functions gather it and reduce-scatter its gradient (in float32 for 16-bit
    inputs, before rounding)."""
    device_type = e.device.type
    if autocast_enabled(device_type):  # the classifier matmul runs in the autocast dtype, as nn.Linear would
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
    return Prepared(e.reshape(-1, e.shape[-1]), c, bias, targets.reshape(-1).long(), targets.shape, mask)


def per_token(q: torch.Tensor, out_shape, shift: int) -> torch.Tensor:
    """A per-token [N] vector shaped like targets[..., shift:]."""
    q = q.view(out_shape)
    return q[..., : out_shape[-1] - shift] if shift else q


def run_cross_entropy(plan: Plan, call: Call):
    """`linear_cross_entropy`'s return value (see there) for a planned call: the loss; with
    call.return_lse (loss, lse); with any of the other outputs a CrossEntropyOutput."""
    result = run_loss(plan, call)
    if not (call.return_z_loss or call.return_token_accuracy or call.return_predicted_tokens):
        return (result.loss, per_token(result.lse, result.out_shape, call.shift)) if call.return_lse else result.loss
    return _output(plan, call, result)


def _output(plan: Plan, call: Call, result: Result) -> CrossEntropyOutput:
    """The CrossEntropyOutput of a call that asked for more than the loss (and lse)."""
    loss, t, out_shape, shift = result.loss, result.t, result.out_shape, call.shift
    out = CrossEntropyOutput(loss, lse=per_token(result.lse, out_shape, shift) if call.return_lse else None)
    if call.return_z_loss:
        zl = torch.zeros(t.shape, dtype=loss.dtype, device=t.device) if result.z_part is None else result.z_part
        out.z_loss = {"mean": lambda: zl.sum() / plan.mean_denominators(t)[1], "sum": zl.sum,
                      "none": lambda: per_token(zl, out_shape, shift)}[plan.reduction]()
    if call.return_token_accuracy or call.return_predicted_tokens:
        valid = t != plan.ignore_index
        predicted = result.argmax.long()
        hit = (valid & (predicted == t)).float()
        if call.return_token_accuracy:
            out.token_accuracy = (per_token(hit, out_shape, shift) if plan.reduction == "none"
                                  else hit.sum() / valid.sum().clamp(min=1))
        if call.return_predicted_tokens:
            out.predicted_tokens = per_token(torch.where(valid, predicted, -1), out_shape, shift)
    return out


def run_loss(plan: Plan, call: Call) -> Result:
    """The loss of a planned call on its path: the memory-first statistics and their reduction
    ("recompute"), or one of the fast mode's Functions, which reduce themselves ("held",
    "chunked"). call.dc_into: c's gradient is added into it (none is returned)."""
    c = call.c
    if call.dc_into is not None and plan.path == "chunked":  # c's gradient formed as a tensor: added into dc_into
        c = accumulate_grad_into(c, call.dc_into)
    p = prepare(plan, call.e, c, call.targets, call.bias, call.shift, call.loss_mask)
    with torch.autocast(p.e.device.type, enabled=False):
        if plan.path == "recompute":
            return _recompute(plan, p, call.shift, call.dc_into)
        # the Function reduces (both of "mean"'s divisors known here, as device scalars) and hands
        # back the z-loss part and the argmax when asked for
        dens = plan.mean_denominators(p.t) if plan.reduction == "mean" else None
        want_z = call.return_z_loss and plan.z_loss > 0
        if plan.path == "held":  # one chunk: the logits are held to the backward, any upstream gradient
            outs = held.loss_with_held_logits(p.e, p.c, p.bias, p.t, plan, dens, p.mask, want_z, call.dc_into)
        else:  # token chunks: the gradients formed in the forward, a uniform upstream gradient
            outs = chunked.loss_with_grad_in_forward(p.e, p.c, p.bias, p.t, plan, dens, p.mask, want_z)
    loss = outs[0] if plan.reduction != "none" else per_token(outs[0], p.out_shape, call.shift)
    return Result(loss, None, outs[1] if want_z else None, outs[-1] if plan.need_argmax else None, p.t, p.out_shape)


def _recompute(plan: Plan, p: Prepared, shift: int, dc_into=None) -> Result:
    """The memory-first path: the global statistics (`ShardStats`, whose backward adds c's
    gradient into dc_into when given), the per-token loss from them (`Plan.token_loss_parts`),
    reduced."""
    stats = shard_stats(p.e, p.c, p.bias, p.t - plan.vocab_start, plan, dc_into)
    lse, x, s = stats[:3]
    ce, zl = plan.token_loss_parts(lse, x, s, p.t)
    argmax = stats[plan.stat_names.index("argmax")] if plan.need_argmax else None
    return Result(reduce_loss(plan, ce, zl, p.t, p.out_shape, shift), lse, zl, argmax, p.t, p.out_shape)


def reduce_loss(plan: Plan, ce, zl, t, out_shape, shift: int) -> torch.Tensor:
    """The loss from the per-token cross-entropy part ce [N] and z-loss part zl [N] (or None)."""
    tokens = ce if zl is None else ce + zl
    if plan.reduction == "mean":
        den_ce, den_count = plan.mean_denominators(t)
        if plan.class_weights is None or zl is None:
            return tokens.sum() / den_ce
        return ce.sum() / den_ce + zl.sum() / den_count  # the z-loss is not class-weighted: its own count
    if plan.reduction == "sum":
        return tokens.sum()
    return per_token(tokens, out_shape, shift)
