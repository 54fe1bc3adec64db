"""The memory-first path (the mode with grad_in_forward=False): statistics in the forward,
logits recomputed tile by tile in the backward; the backward's memory stays within ~10% of the
gradients.

`ShardStats` returns the GLOBAL per-token (lse, x, s) (see backends/protocol.py; and the optional
statistics of stats.py where the plan asks for them), already combined across the
vocabulary-parallel group. Everything built on them (label smoothing, z-loss, ignore_index,
reductions, return_lse) is ordinary PyTorch on [N] vectors, so its gradient reaches the backward
below as three per-token coefficients:
    ∂L/∂z_ij = (∂L/∂lse_i)·p_ij + (∂L/∂x_i)·[j = t_i] + (∂L/∂s_i).

With `dc_accumulate_into` (Megatron's float32 main_grad) the backward adds c's gradient into that
tensor chunk by chunk as the backend computes it (the triton backend, for a float32 target: each
vocabulary chunk's Gᵀ·E by one float32-output product with beta = 1), so no dC tensor is formed,
nothing is rounded to c's dtype before the add, the padding rows get nothing, and c gets no
gradient.
"""

from __future__ import annotations

import torch

from ..plan import Plan
from .shared import gather_tokens, global_stats, grad_e_fp32, save_plan, saved_plan, sum_grad_e


class ShardStats(torch.autograd.Function):
    """The global per-token statistics `plan.stat_names` (stats.py): (lse, x, s), then the
    entropy's pz = Σ_j p_j z_j and the (max, argmax) when the plan asks for them. The argmax is a
    global id (float) and, with max, not differentiable. With pz, ∂pz/∂z_j = p_j·(1 + z_j − pz),
    so the backward's coefficient of p becomes ∂L/∂lse + ∂L/∂pz and G gains
    (∂L/∂pz)·p_j·(z_j − pz) (kept as z − pz: no cancellation between two large terms)."""

    @staticmethod
    def forward(ctx, e, c, bias, t_local, plan: Plan, dc_into=None):
        """e [N, D] (sequence parallel: this rank's [N/W, D], gathered here), c [V_local, D], bias
        [V_local] or None, t_local [N] int64 → k × float32 [N] (float64 for float64 inputs).
        dc_into: None, or a tensor of c's shape into which c's gradient is added in the backward
        (rows ≥ n_valid untouched) instead of being returned."""
        e = gather_tokens(e, plan)  # saved gathered, as the gather's output was before
        names = plan.stat_names
        stats = global_stats(plan.backend.forward_stats(e, c, bias, t_local, plan), plan)
        stats = [q.clone() if q._base is not None else q for q in stats]  # no views as outputs
        ctx.save_for_backward(e, c, bias, t_local, stats[0], stats[3] if plan.need_entropy else None)
        save_plan(ctx, plan)
        ctx.dc_into = dc_into
        frozen = ([] if plan.need_sum else [stats[2]]) + [stats[names.index(k)] for k in ("max", "argmax")
                                                          if k in names]
        ctx.mark_non_differentiable(*frozen)
        return tuple(stats)

    @staticmethod
    def backward(ctx, *grads):
        e, c, bias, t_local, lse, pz = ctx.saved_tensors
        plan = saved_plan(ctx)
        need_de, need_dc, need_db = ctx.needs_input_grad[:3]
        zeros = torch.zeros_like(lse)
        coef = [zeros if g is None else g.to(lse.dtype) for g in grads[:3]]
        if not plan.need_sum:
            coef[2] = zeros
        extra = {}
        if plan.need_entropy:
            q = zeros if grads[3] is None else grads[3].to(lse.dtype)
            coef[0] = coef[0] + q
            extra = dict(coef_q=q, mean_z=pz)
        de, dc, db = plan.backend.backward(
            e, c, bias, t_local, lse, *coef, plan, need_de, need_dc, need_db and bias is not None, **extra,
            de_fp32=grad_e_fp32(e, plan, need_de), dc_into=ctx.dc_into if need_dc else None,
        )
        return sum_grad_e(de, e.dtype, plan), dc, db, None, None, None


def shard_stats(e, c, bias, t_local, plan: Plan, dc_into=None) -> tuple:
    """`ShardStats.apply`; with dc_into, eagerly under torch.compile (a graph break, as the held
    path's): its backward writes into a tensor that is not a graph input."""
    if dc_into is None:
        return ShardStats.apply(e, c, bias, t_local, plan)
    return _shard_stats_into(e, c, bias, t_local, plan, dc_into)


@torch.compiler.disable
def _shard_stats_into(e, c, bias, t_local, plan: Plan, dc_into) -> tuple:
    return ShardStats.apply(e, c, bias, t_local, plan, dc_into)
