"""Persistent, TMA-fed Triton products of the logits Z = E·Cᵀ with the loss work in their epilogue.

One program per multiprocessor walks the output tiles (BLOCK_M tokens × BLOCK_N vocabulary rows)
in grouped order; for each it runs the D loop into a float32 accumulator (TMA loads, software
pipelined, the loops flattened so the next tile's loads overlap this tile's epilogue), then:

- `stats` epilogue: bias and softcap applied, the tile's per-row partial statistics written to
  PART[q, vocabulary tile, row] (q: 0 = log Σ_j exp z_ij over the tile's columns, 1 = correct
  logit or 0, 2 = Σ_j z_ij), and optionally the (capped) logits stored once in 16 bits (STORE_Z).
  The global statistics are a logsumexp / sum over the vocabulary tiles (a few floats per token).
- `grad` epilogue: the logit gradient G = a·p + b·[j = t] + u (× (1 − tanh²) when softcapped),
  p = exp(z − lse), stored in 16 bits, with one keep flag per tile (some a·p ≥ filter_eps, or a
  target inside) when FILTER.

`grad_from_stored_kernel` turns stored capped logits into G in place (fast mode), using
1 − tanh²(z_raw/cap) = 1 − (z_capped/cap)².
"""

import triton
import triton.language as tl

from .triton_kernels import _grouped_tile, _tanh


@triton.jit
def _tile_logits(E, C, m0, n0, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        a = E.load([m0, k0])
        b = C.load([n0, k0])
        acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def logits_epilogue_kernel(
    E, C, Z, BIAS, TGT, PART, LSE, COEF, FLAGS,
    N, V, D, v_begin, width, stride_pq, stride_pv, stride_fn, softcap, filter_eps,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_SUM: tl.constexpr,
    STORE_Z: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """E [N, D], C [V, D], Z [N, width] (descriptors); columns [v_begin, v_begin + width) of the
    vocabulary (rows of C), of which those < V are real.

    EPILOGUE "stats": PART[q, j, n] for vocabulary tile j of the chunk (see module docstring);
    Z ← logits (STORE_Z). "grad": Z ← G, FLAGS[m tile, n tile] (FILTER).
    """
    pid = tl.program_id(0)
    grid_m = tl.cdiv(N, BLOCK_M)
    grid_n = tl.cdiv(width, BLOCK_N)
    for tile in tl.range(pid, grid_m * grid_n, NUM_PROGRAMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
        # vocabulary tiles grouped: GROUP of them (GROUP·BLOCK_N rows of C) stay in L2 while E streams
        pid_n, pid_m = _grouped_tile(tile, grid_n, grid_m, GROUP)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        z = _tile_logits(E, C, m0, v_begin + n0, D, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        cols = v_begin + n0 + tl.arange(0, BLOCK_N)
        mask_m = offs_m < N
        mask_n = (cols < V) & (n0 + tl.arange(0, BLOCK_N) < width)
        if HAS_BIAS:
            z += tl.load(BIAS + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            th = _tanh(z / softcap)
            z = softcap * th
        tgt = tl.load(TGT + offs_m, mask=mask_m, other=-1)
        is_target = (cols[None, :] == tgt[:, None]) & mask_n[None, :]
        if EPILOGUE == "store":  # plain product (benchmark reference)
            Z.store([m0, n0], z.to(Z.dtype))
        elif EPILOGUE == "stats":
            if STORE_Z:
                Z.store([m0, n0], z.to(Z.dtype))
            part = PART + pid_n * stride_pv + offs_m
            tl.store(part + stride_pq, tl.sum(tl.where(is_target, z, 0.0), axis=1), mask=mask_m)
            if NEED_SUM:
                tl.store(part + 2 * stride_pq, tl.sum(tl.where(mask_n[None, :], z, 0.0), axis=1), mask=mask_m)
            zm = tl.where(mask_n[None, :], z, float("-inf"))
            row_max = tl.max(zm, axis=1)
            row_sum = tl.sum(tl.exp(zm - row_max[:, None]), axis=1)
            tl.store(part, row_max + tl.log(row_sum), mask=mask_m)
        else:
            lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
            a = tl.load(COEF + offs_m, mask=mask_m, other=0.0)
            b = tl.load(COEF + N + offs_m, mask=mask_m, other=0.0)
            u = tl.load(COEF + 2 * N + offs_m, mask=mask_m, other=0.0)
            p = tl.exp(z - lse[:, None])
            g = a[:, None] * p + tl.where(is_target, b[:, None], 0.0) + u[:, None]
            if HAS_SOFTCAP:
                g = g * (1.0 - th * th)
            valid = mask_m[:, None] & mask_n[None, :]
            Z.store([m0, n0], tl.where(valid, g, 0.0).to(Z.dtype))
            if FILTER:
                weighted = tl.where(valid & (a[:, None] != 0.0), p, 0.0)
                keep = (tl.max(tl.max(weighted, axis=1), axis=0) >= filter_eps) | \
                       (tl.max(tl.max(is_target.to(tl.int32), axis=1), axis=0) > 0)
                tl.store(FLAGS + pid_m * stride_fn + pid_n, keep.to(tl.int8))


@triton.jit
def grad_from_stored_kernel(Z, TGT, LSE, COEF, FLAGS, N, V, stride_z, stride_f, inv_softcap, filter_eps,
                            HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """In place over stored logits Z [N, V] (bias and softcap applied):
    Z ← (a·exp(z − lse) + b·[j = t] + u) · (1 − (z/cap)²  when softcapped).
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
def stored_logits_stats_kernel(Z, BIAS, TGT, OUT, N, V, stride_z, softcap,
                               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_SUM: tl.constexpr,
                               WRITE_BACK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[0|1|2, row] = (lse, correct logit, Σ logits) of rows of stored raw logits Z [N, V]
    (16-bit), bias and softcap applied on the fly; WRITE_BACK stores the capped logits (bias
    included) into Z in place, so that `grad_from_stored_kernel` can follow, and takes the
    statistics of those stored values (an lse of unrounded logits with p of rounded ones would
    miss Σ_j p_j = 1 by ~|z|·2^-9: for a confident token, more than 1 − p_t itself)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < N
    tgt = tl.load(TGT + rows, mask=mask_r, other=-1)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_R,), tl.float32)
    x = tl.zeros((BLOCK_R,), tl.float32)
    zsum = tl.zeros((BLOCK_R,), tl.float32)
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
            zsum += tl.sum(tl.where(mask, z, 0.0), axis=1)
        z = tl.where(mask_c[None, :], z, float("-inf"))
        # online log-sum-exp per row: s ← s·exp(m − m') + Σ_j exp(z_j − m')
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), axis=1)
        m = m_new
    tl.store(OUT + rows, m + tl.log(s), mask=mask_r)
    tl.store(OUT + N + rows, x, mask=mask_r)
    tl.store(OUT + 2 * N + rows, zsum, mask=mask_r)
