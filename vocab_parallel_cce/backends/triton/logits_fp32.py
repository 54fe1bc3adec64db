"""The fast mode's passes over a chunk of stored float32 raw logits Z [N, V] (no bias: the float32
product e·cᵀ), and their launchers (stored_logits.py picks them for float32 and float16 inputs and
exact mode): one program per token row.

- `row_stats_kernel` (`stats_pass`): the row's (lse, correct logit, Σ logits; optionally
  Σ_j w_j z_j and max / argmax), bias and softcap applied on the fly;
- `row_logit_grad_kernel` (`grad_pass`): G written over Z's own storage.
"""

import torch
import triton
import triton.language as tl

from ...plan import Plan
from .common import float32_sum_weights, interpreting, tanh

ROW_BLOCK, ROW_WARPS = 2048, 8


@triton.jit
def row_stats_kernel(Z, BIAS, TGT, OUT, V, stride_z, n_rows, softcap, SUMW,
                     HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_SUM: tl.constexpr,
                     BLOCK: tl.constexpr, HAS_SUMW: tl.constexpr = False, NEED_ARGMAX: tl.constexpr = False):
    """OUT[0|1|2, row] = (lse, correct logit, Σ logits) of row `row` of Z (float32 [n_rows, V]),
    bias and softcap applied on the fly. Optional (stats.py), each only when its switch is on:
    HAS_SUMW: OUT[2] = Σ_j w_j z_j (SUMW [V] float32 class weights); NEED_ARGMAX: OUT[3] = max_j z_j,
    OUT[4] = its smallest column (as a float)."""
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    tgt = tl.load(TGT + row)
    # per-lane online log-sum-exp, merged across lanes at the end (no reduction inside the loop)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    x = tl.zeros((BLOCK,), tl.float32)
    zsum = tl.zeros((BLOCK,), tl.float32)
    arg = tl.full((BLOCK,), 2147483647, tl.int32)  # per lane: column of the lane's max (NEED_ARGMAX)
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            z += tl.load(BIAS + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * tanh(z / softcap)
        x += tl.where(offs == tgt, z, 0.0)
        if NEED_SUM:
            if HAS_SUMW:
                zsum += tl.where(mask, z * tl.load(SUMW + offs, mask=mask, other=0.0), 0.0)
            else:
                zsum += tl.where(mask, z, 0.0)
        z = tl.where(mask, z, float("-inf"))
        if NEED_ARGMAX:  # a lane's columns increase: only a strictly larger value moves its argmax
            arg = tl.where(z > m, offs, arg)
        m_new = tl.maximum(m, z)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.exp(z - m_ref)
        m = m_new
    m_max = tl.max(m, axis=0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    lse = m_ref + tl.log(tl.sum(s * tl.exp(m - m_ref), axis=0))
    tl.store(OUT + row, lse)
    tl.store(OUT + n_rows + row, tl.sum(x, axis=0))
    tl.store(OUT + 2 * n_rows + row, tl.sum(zsum, axis=0))
    if NEED_ARGMAX:  # the smallest column among the lanes holding the row's max
        tl.store(OUT + 3 * n_rows + row, m_max)
        tl.store(OUT + 4 * n_rows + row, tl.min(tl.where(m == m_max, arg, 2147483647), axis=0).to(tl.float32))


@triton.jit
def row_logit_grad_kernel(Z, G, BIAS, TGT, LSE, COEF, V, stride_z, stride_g, n_rows, softcap, SUMW,
                          HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
                          HAS_SUMW: tl.constexpr = False):
    """G[row, j] = a·p + b·[j = t] + u (× (1 − tanh²) when softcapped), p = exp(z − lse), from Z;
    HAS_SUMW: u·w_j instead of u (SUMW [V] float32 class weights).

    G may occupy Z's own storage (row r of G inside row r of Z, narrower elements): block k of
    G overwrites Z columns below (k + 1)·BLOCK / 2, all loaded by iteration k; the barrier makes
    every thread finish its loads of iteration k before any thread stores.
    """
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    g_row = G + row.to(tl.int64) * stride_g
    tgt = tl.load(TGT + row)
    lse = tl.load(LSE + row)
    a = tl.load(COEF + row)
    b = tl.load(COEF + n_rows + row)
    u = tl.load(COEF + 2 * n_rows + row)
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            z += tl.load(BIAS + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            th = tanh(z / softcap)
            z = softcap * th
        if HAS_SUMW:
            g = a * tl.exp(z - lse) + tl.where(offs == tgt, b, 0.0) + u * tl.load(SUMW + offs, mask=mask, other=0.0)
        else:
            g = a * tl.exp(z - lse) + tl.where(offs == tgt, b, 0.0) + u
        if HAS_SOFTCAP:
            g = g * (1.0 - th * th)
        tl.debug_barrier()
        tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)


def stats_pass(z: torch.Tensor, bias: torch.Tensor | None, t_local: torch.Tensor, out: torch.Tensor,
               plan: Plan) -> None:
    """The statistics `plan.stat_names` of the raw float32 logits Z [n, ≥ n_valid] (n, n_valid > 0)
    into out [k, n] float32, bias and softcap applied on the fly."""
    n, v = z.shape[0], plan.n_valid
    sum_w = float32_sum_weights(plan)
    block = 16 if interpreting() else ROW_BLOCK
    row_stats_kernel[(n,)](
        z, z if bias is None else bias, t_local, out, v, z.stride(0), n, plan.softcap or 1.0,
        out if sum_w is None else sum_w, HAS_BIAS=bias is not None, HAS_SOFTCAP=plan.softcap is not None,
        NEED_SUM=plan.need_sum, BLOCK=block, HAS_SUMW=sum_w is not None, NEED_ARGMAX=plan.need_argmax,
        num_warps=ROW_WARPS,
    )


def grad_pass(z: torch.Tensor, bias: torch.Tensor | None, t_local: torch.Tensor, lse: torch.Tensor,
              coef: torch.Tensor, plan: Plan, dtype: torch.dtype) -> torch.Tensor:
    """G [n, n_valid] = a·p + b·[j = t] + u (u·w_j with `plan.sum_weights`; × the softcap's factor)
    from the raw float32 logits Z, written in `dtype` (float32 for float32) inside Z's own rows;
    coef [3, n] float32, lse [n] float32 contiguous."""
    n, v = z.shape[0], plan.n_valid
    g = z if dtype == torch.float32 else z.view(dtype)
    if v == 0 or n == 0:
        return g[:, :v]
    sum_w = float32_sum_weights(plan)
    block = 16 if interpreting() else ROW_BLOCK
    row_logit_grad_kernel[(n,)](
        z, g, z if bias is None else bias, t_local, lse, coef, v, z.stride(0), g.stride(0), n,
        plan.softcap or 1.0, lse if sum_w is None else sum_w, HAS_BIAS=bias is not None,
        HAS_SOFTCAP=plan.softcap is not None, BLOCK=block, HAS_SUMW=sum_w is not None, num_warps=ROW_WARPS,
    )
    return g[:, :v]
