"""What the three paths' autograd Functions share: the plan kept for the backward (its process
group held weakly), sequence parallelism's gather of e and the group's sum of dE, this shard's
statistics made global, the fast paths' one-backward guard and outputs, and the
`dc_accumulate_into` Function."""

from __future__ import annotations

import dataclasses
import weakref

import torch

from .. import distributed as vp
from ..plan import Plan

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def gather_tokens(e, plan: Plan):
    """Sequence parallel: every rank's e [N_local, D] along dim 0 → [N, D] (else e itself)."""
    if not plan.sequence_parallel:
        return e
    return vp.all_gather_along_dim0(e, plan.group, "all-gather sequence-parallel hidden states")


def grad_e_fp32(e, plan: Plan, need_de: bool) -> bool:
    """Whether dE is produced in float32: 16-bit inputs whose partial dE the group sums next, so
    that it is rounded once, after the sum (at tp=1's error), not once per rank before it."""
    return need_de and plan.sums_grad_e and e.dtype in _SIXTEEN_BIT


def sum_grad_e(de, dtype, plan: Plan):
    """dE for e: the ranks' partial sums summed over the group (all-reduce; reduce-scatter to this
    rank's tokens under sequence parallelism), in `dtype`; with reduce_grad_e=False, this rank's
    partial sum in `dtype` as it is (the caller's own reduction decides that sum's precision)."""
    if de is None or not plan.sums_grad_e:
        return de
    return vp.sum_grad_e(de, dtype, plan.group, scatter=plan.sequence_parallel)


def global_stats(shard_stats, plan: Plan) -> list:
    """The global statistics `plan.stat_names` from this shard's ([N] each): the argmax moved from
    the shard's columns to global ids, then all of them combined across the group in one
    collective (`distributed.combine_stats`; one rank: as they are)."""
    names, out = plan.stat_names, list(shard_stats)
    if plan.need_argmax and plan.vocab_start:
        out[names.index("argmax")] = out[names.index("argmax")] + plan.vocab_start
    if plan.world > 1:
        out = list(vp.combine_stats(out, names, plan.group))
    return out


def save_plan(ctx, plan: Plan) -> None:
    """Keep `plan` on ctx for the backward with its process group held WEAKLY.

    The graph (alive while any output is) must not keep the group alive: `destroy_process_group()`
    frees a group only when nothing else refers to it, and a group that outlives it keeps gloo's
    worker threads running into interpreter shutdown, where one that drops a finished collective's
    last reference needs the GIL and aborts the process ("terminate called without an active
    exception"; torch, see DESIGN.md "Process-group lifetime"). A group that cannot be referenced
    weakly is kept as before."""
    group, ref = plan.group, None
    if group is not None:
        try:
            ref = weakref.ref(group)
        except TypeError:
            ref = lambda: group  # noqa: E731  (a strong reference)
        plan = dataclasses.replace(plan, group=None)
    ctx.plan, ctx.group_ref = plan, ref


def saved_plan(ctx) -> Plan:
    """The plan `save_plan` kept, with its process group."""
    plan, ref = ctx.plan, ctx.group_ref
    if ref is None:
        return plan
    group = ref()
    if group is None:
        raise RuntimeError(
            "vocab_parallel_cce: the process group of this loss was destroyed before its backward "
            "(destroy_process_group / new groups must come after the backward)"
        )
    return dataclasses.replace(plan, group=group)


_ONE_BACKWARD = ("linear_cross_entropy: the fast mode (grad_in_forward=True, or the default 'auto') can run "
                 "its backward only once (no retain_graph); pass grad_in_forward=False for a graph that "
                 "is differentiated more than once")
_NO_DOUBLE_BACKWARD = ("linear_cross_entropy: the fast mode (grad_in_forward=True, or the default 'auto') has no "
                       "double backward: it forms the gradients from the logits outside autograd, so with "
                       "create_graph=True they could not be differentiated again; for gradients that are "
                       "differentiated again pass impl='torch', grad_in_forward=False")


def take_once(ctx, attr: str):
    """The fast mode's state for its one backward (ctx.<attr>, then cleared). Raises under
    create_graph=True (grad mode on inside a backward: the gradients would carry no graph, so a
    penalty on them would silently be 0) and on a second backward (the state is used up)."""
    if torch.is_grad_enabled():
        raise RuntimeError(_NO_DOUBLE_BACKWARD)
    value = getattr(ctx, attr)
    if value is None:
        raise RuntimeError(_ONE_BACKWARD)
    setattr(ctx, attr, None)
    return value


def fast_outputs(ctx, loss, z_part, argmax, acc_dtype):
    """The fast-mode Functions' outputs: (loss, [z-loss part if ctx.want_z], [argmax if any]), the
    float ones in float32 unless the accumulation is float64; the argmax is not differentiable."""
    outs = [loss] + ([z_part] if ctx.want_z else []) + ([argmax] if argmax is not None else [])
    if argmax is not None:
        ctx.mark_non_differentiable(argmax)
    return tuple(q.float() if acc_dtype == torch.float32 else q for q in outs)


class AccumulateGradInto(torch.autograd.Function):
    """Identity on c whose backward adds c's gradient into `target` and hands none on (the
    `dc_accumulate_into` option on the one path that forms dC as a tensor: the fast mode's token
    chunks; the memory-first and held-logits paths add into the target themselves)."""

    @staticmethod
    def forward(ctx, c, target):
        ctx.target = target
        ctx.set_materialize_grads(False)
        return c.view_as(c)

    @staticmethod
    def backward(ctx, grad):
        if grad is not None:
            ctx.target.add_(grad)
        return None, None


@torch.compiler.disable  # its backward writes into a tensor that is not a graph input
def accumulate_grad_into(c, target):
    """c, with its gradient added into `target` in the backward (`AccumulateGradInto`)."""
    return AccumulateGradInto.apply(c, target)


def grad_e_product(out, g, c_valid, plan: Plan) -> None:
    """out ← G·C_r, e's gradient over this shard, rounded once: a float32 product when out is the
    float32 partial sum of 16-bit inputs (`grad_e_fp32`: the group sums it next), one matmul where
    G is in c's dtype, else computed in G's wider dtype and rounded into out's."""
    if out.dtype != c_valid.dtype:
        plan.backend.product_fp32(out, g, c_valid, plan, accumulate=False)
    elif g.dtype == c_valid.dtype:
        torch.mm(g, c_valid, out=out)
    else:
        out.copy_((g @ c_valid.to(g.dtype)).to(out.dtype))
