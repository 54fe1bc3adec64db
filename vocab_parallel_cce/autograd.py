"""The autograd Function: per-token statistics of the (sharded) classifier, differentiable.

`ShardStats` returns the GLOBAL per-token (lse, x, s) (see backend.py), already combined across
the vocabulary-parallel group. Everything built on them (label smoothing, z-loss, ignore_index,
reductions, return_lse) is ordinary PyTorch on [N] vectors, so its gradient reaches the backward
below as three per-token coefficients:
    ∂L/∂z_ij = (∂L/∂lse_i)·p_ij + (∂L/∂x_i)·[j = t_i] + (∂L/∂s_i).
"""

from __future__ import annotations

import torch

from . import distributed as vp
from .backend import ShardSpec


class ShardStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e, c, bias, t_local, backend, spec: ShardSpec, group, reduce_grad_e: bool):
        """e [N, D], c [V_local, D], bias [V_local] or None, t_local [N] int64 → 3 × float32 [N]."""
        lse, x, s = backend.forward_stats(e, c, bias, t_local, spec)
        if vp.group_size(group) > 1:
            lse, x, s = vp.combine_shard_stats(lse, x, s, group)
        ctx.save_for_backward(e, c, bias, t_local, lse)
        ctx.backend, ctx.spec, ctx.group, ctx.reduce_grad_e = backend, spec, group, reduce_grad_e
        ctx.mark_non_differentiable(*(() if spec.need_sum else (s,)))
        return lse, x, s

    @staticmethod
    def backward(ctx, g_lse, g_x, g_s):
        e, c, bias, t_local, lse = ctx.saved_tensors
        need_de, need_dc, need_db = ctx.needs_input_grad[:3]
        zeros = torch.zeros_like(lse)
        coef = [zeros if g is None else g.to(lse.dtype) for g in (g_lse, g_x, g_s)]
        if not ctx.spec.need_sum:
            coef[2] = zeros
        de, dc, db = ctx.backend.backward(
            e, c, bias, t_local, lse, *coef, ctx.spec, need_de, need_dc, need_db and bias is not None
        )
        if de is not None and ctx.reduce_grad_e and vp.group_size(ctx.group) > 1:
            vp.all_reduce_sum(de, ctx.group, "all-reduce the hidden-state gradient")
        return de, dc, db, None, None, None, None, None
