"""Triton passes of the fast mode over a chunk of stored 16-bit logits Z [N, V] (cuBLAS wrote them).

- `stored_logits_stats_kernel`: per row, lse, correct logit and Σ logits (bias and softcap applied
  on the fly; with them, the final logits written back so the gradient pass can use them), and
  optionally the class-weighted Σ_j w_j z_j and the max / argmax (stats.py).
- `grad_from_stored_kernel`: G = a·p + b·[j = t] + u (u·w_j with class weights) in place
  (× 1 − (z/cap)² = 1 − tanh² of the raw logit when softcapped), with optional per-tile keep flags.
"""

import triton
import triton.language as tl

from .triton_kernels import _tanh


@triton.jit
def grad_from_stored_kernel(Z, TGT, LSE, COEF, FLAGS, N, V, stride_z, stride_f, inv_softcap, filter_eps, SUMW,
                            HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SUMW: tl.constexpr = False):
    """In place over stored logits Z [N, V] (bias and softcap applied):
    Z ← (a·exp(z − lse) + b·[j = t] + u) · (1 − (z/cap)²  when softcapped).
    HAS_SUMW: u·w_j instead of u (SUMW [V] float32 class weights: s was Σ_j w_j z_j).
    FILTER: FLAGS[row tile, column tile] = 1 where some a·p ≥ filter_eps or a target lies inside."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = rows < N
    mask = mask_r[:, None] & (cols < V)[None, :]
    lse = tl.load(LSE + rows, mask=mask_r, other=0.0)
    a = tl.load(COEF + rows, mask=mask_r, other=0.0)
    b = tl.load(COEF + N + rows, mask=mask_r, other=0.0)
    u = tl.load(COEF + 2 * N + rows, mask=mask_r, other=0.0)
    tgt = tl.load(TGT + rows, mask=mask_r, other=-1)
    ptrs = Z + rows[:, None].to(tl.int64) * stride_z + cols[None, :]
    z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    p = tl.exp(z - lse[:, None])
    is_target = (cols[None, :] == tgt[:, None]) & mask
    if HAS_SUMW:
        w = tl.load(SUMW + cols, mask=cols < V, other=0.0)
        g = a[:, None] * p + tl.where(is_target, b[:, None], 0.0) + u[:, None] * w[None, :]
    else:
        g = a[:, None] * p + tl.where(is_target, b[:, None], 0.0) + u[:, None]
    if HAS_SOFTCAP:
        zc = z * inv_softcap
        g = g * (1.0 - zc * zc)
    tl.store(ptrs, g.to(Z.dtype.element_ty), mask=mask)
    if FILTER:
        weighted = tl.where(mask & (a[:, None] != 0.0), p, 0.0)
        keep = (tl.max(tl.max(weighted, axis=1), axis=0) >= filter_eps) | \
               (tl.max(tl.max(is_target.to(tl.int32), axis=1), axis=0) > 0)
        tl.store(FLAGS + tl.program_id(0) * stride_f + tl.program_id(1), keep.to(tl.int8))


@triton.jit
def stored_logits_stats_kernel(Z, BIAS, TGT, OUT, N, V, stride_z, softcap, SUMW,
                               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_SUM: tl.constexpr,
                               WRITE_BACK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                               HAS_SUMW: tl.constexpr = False, NEED_ARGMAX: tl.constexpr = False):
    """OUT[0|1|2, row] = (lse, correct logit, Σ logits) of rows of stored raw logits Z [N, V]
    (16-bit), bias and softcap applied on the fly; WRITE_BACK stores the capped logits (bias
    included) into Z in place, so that `grad_from_stored_kernel` can follow, and takes the
    statistics of those stored values (an lse of unrounded logits with p of rounded ones would
    miss Σ_j p_j = 1 by ~|z|·2^-9: for a confident token, more than 1 − p_t itself).

    Optional (stats.py), each only when its switch is on, of the same (stored) values:
    HAS_SUMW: OUT[2] = Σ_j w_j z_j (SUMW [V] float32 class weights); NEED_ARGMAX:
    OUT[3] = max_j z_j, OUT[4] = its smallest column (as a float)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < N
    tgt = tl.load(TGT + rows, mask=mask_r, other=-1)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_R,), tl.float32)
    x = tl.zeros((BLOCK_R,), tl.float32)
    zsum = tl.zeros((BLOCK_R,), tl.float32)
    arg = tl.zeros((BLOCK_R,), tl.int32)  # column of the running max (NEED_ARGMAX)
    row_ptr = Z + rows[:, None].to(tl.int64) * stride_z
    for c0 in range(0, V, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask_c = cols < V
        mask = mask_r[:, None] & mask_c[None, :]
        z = tl.load(row_ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(BIAS + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        if WRITE_BACK:  # the statistics use the stored (rounded) logits, as the gradient pass will:
            zq = z.to(Z.dtype.element_ty)  # Σ_j p_j = 1 exactly for the p it computes
            tl.store(row_ptr + cols[None, :], zq, mask=mask)
            z = zq.to(tl.float32)
        x += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        if NEED_SUM:
            if HAS_SUMW:
                w = tl.load(SUMW + cols, mask=mask_c, other=0.0)
                zsum += tl.sum(tl.where(mask, z * w[None, :], 0.0), axis=1)
            else:
                zsum += tl.sum(tl.where(mask, z, 0.0), axis=1)
        z = tl.where(mask_c[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        if NEED_ARGMAX:  # blocks in increasing column order: only a strictly larger max moves the argmax
            tile_arg = tl.min(tl.where(z == tile_max[:, None], cols[None, :], 2147483647), axis=1)
            arg = tl.where(tile_max > m, tile_arg, arg)
        # online log-sum-exp per row: s ← s·exp(m − m') + Σ_j exp(z_j − m')
        m_new = tl.maximum(m, tile_max)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), axis=1)
        m = m_new
    tl.store(OUT + rows, m + tl.log(s), mask=mask_r)
    tl.store(OUT + N + rows, x, mask=mask_r)
    tl.store(OUT + 2 * N + rows, zsum, mask=mask_r)
    if NEED_ARGMAX:
        tl.store(OUT + 3 * N + rows, m, mask=mask_r)
        tl.store(OUT + 4 * N + rows, arg.to(tl.float32), mask=mask_r)
