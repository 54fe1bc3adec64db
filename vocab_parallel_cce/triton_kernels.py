"""Triton kernels of the fused linear cross-entropy (launchers live in triton_backend.py).

Notation: E [N, D] hidden states, C [V, D] classifier (rows = vocabulary), z = E·Cᵀ (+ b),
optionally softcapped z ← cap·tanh(z/cap). All accumulation is float32.

- `forward_kernel`: per (vocabulary split, token tile) the partial LSE, correct logit and logit
  sum over the split's vocabulary tiles (online log-sum-exp, no N×V writes).
- `logit_grad_kernel`: recomputes one chunk of logit tiles and writes the logit gradient
  G = a·p + b·[j = t] + u  (× (1 − tanh²) when softcapped) plus a flag per tile saying whether
  any softmax value in it reaches `filter_eps` (or it holds a target).
- `sparse_matmul_kernel`: OUT (+)= A·B visiting, for each row tile of A, only the K tiles listed
  as non-negligible (or all of them).
- `row_stats_kernel`, `row_logit_grad_kernel`: the gradient-in-forward mode's passes over a
  materialised float32 chunk of logits Z [n_c, V] (one program per token row): the row's
  (lse, correct logit, Σ logits; optionally Σ_j w_j z_j and max / argmax), then G written over
  Z's own storage.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh(x) = 1 − 2 / (exp(2x) + 1): saturates to ±1 without overflow.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _grouped_tile(pid, grid_m, grid_n, GROUP: tl.constexpr):
    """(m, n) tile of program `pid` over a grid_m × grid_n grid, in groups of GROUP m-tiles: inside a
    group m varies fastest, then n; the groups follow each other along m."""
    group = pid // (GROUP * grid_n)
    first_m = group * GROUP
    size_m = tl.minimum(grid_m - first_m, GROUP)
    return first_m + (pid % (GROUP * grid_n)) % size_m, (pid % (GROUP * grid_n)) // size_m


@triton.jit
def _logit_tile(E, C, BIAS, n0, v0, offs_n, rows, mask_n, mask_v, D,
                stride_en, stride_ed, stride_cv, stride_cd,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                USE_TMA: tl.constexpr):
    """float32 [BLOCK_N, BLOCK_V] tile of E[offs_n] · C[rows]ᵀ (+ bias[rows]).

    USE_TMA: E and C are tensor descriptors (blocks [BLOCK_N, BLOCK_D] and [BLOCK_V, BLOCK_D]),
    reading rows [n0, n0 + BLOCK_N) of E and [v0, v0 + BLOCK_V) of C (out of range: zeros).
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if USE_TMA:
        for d0 in range(0, D, BLOCK_D):
            e = E.load([n0, d0])
            c = C.load([v0, d0])
            acc = tl.dot(e, c.T, acc, input_precision=DOT_PRECISION)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        e_ptrs = E + offs_n[:, None].to(tl.int64) * stride_en + offs_d[None, :] * stride_ed
        c_ptrs = C + rows[None, :].to(tl.int64) * stride_cv + offs_d[:, None] * stride_cd
        for d0 in range(0, D, BLOCK_D):
            if EVEN_D:
                e = tl.load(e_ptrs, mask=mask_n[:, None], other=0.0)
                c = tl.load(c_ptrs, mask=mask_v[None, :], other=0.0)
            else:
                mask_d = (d0 + offs_d) < D
                e = tl.load(e_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                c = tl.load(c_ptrs, mask=mask_d[:, None] & mask_v[None, :], other=0.0)
            acc = tl.dot(e, c, acc, input_precision=DOT_PRECISION)
            e_ptrs += BLOCK_D * stride_ed
            c_ptrs += BLOCK_D * stride_cd
    if HAS_BIAS:
        acc += tl.load(BIAS + rows, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def forward_kernel(E, C, BIAS, TGT, OUT, N, D, V, tiles_per_split,
                   stride_en, stride_ed, stride_cv, stride_cd, stride_oq, stride_os, softcap,
                   SUMW, inv_temp,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_SUM: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                   EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
                   HAS_SUMW: tl.constexpr = False, HAS_TEMP: tl.constexpr = False,
                   NEED_PZ: tl.constexpr = False, NEED_ARGMAX: tl.constexpr = False):
    """OUT[0|1|2, split, n] = partial (lse, correct logit, Σ logits) over the split's V tiles.

    Optional (stats.py), each only when its switch is on: HAS_SUMW: row 2 is Σ_j w_j z_j
    (SUMW [V] float32 class weights); HAS_TEMP: z ← z·inv_temp after the softcap; NEED_PZ:
    OUT[3] = Σ_j p_j z_j under the split's own softmax; NEED_ARGMAX: OUT[4] = max_j z_j,
    OUT[5] = its smallest column (as a float).
    """
    pid_s = tl.program_id(0)  # fastest: concurrent programs share token tiles (E stays in L2)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(TGT + offs_n, mask=mask_n, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    x = tl.zeros((BLOCK_N,), tl.float32)
    zsum = tl.zeros((BLOCK_N,), tl.float32)
    pz = tl.zeros((BLOCK_N,), tl.float32)  # Σ_j exp(z_j − m)·z_j (NEED_PZ)
    arg = tl.zeros((BLOCK_N,), tl.int32)  # column of the running max (NEED_ARGMAX)
    first = pid_s * tiles_per_split
    for vt in range(first, first + tiles_per_split):
        offs_v = vt * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logit_tile(E, C, BIAS, pid_n * BLOCK_N, vt * BLOCK_V, offs_n, offs_v, mask_n, mask_v, D,
                        stride_en, stride_ed, stride_cv, stride_cd,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION, USE_TMA)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        if HAS_TEMP:
            z = z * inv_temp
        is_target = (offs_v[None, :] == tgt[:, None]) & mask_v[None, :]
        x += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        if NEED_SUM:
            if HAS_SUMW:
                w = tl.load(SUMW + offs_v, mask=mask_v, other=0.0)
                zsum += tl.sum(tl.where(mask_v[None, :], z * w[None, :], 0.0), axis=1)
            else:
                zsum += tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1)
        z_finite = z  # before the −inf masking: ez·z_finite is never 0·(−inf)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        if NEED_ARGMAX:  # tiles in increasing id order: only a strictly larger max moves the argmax
            tile_arg = tl.min(tl.where(z == tile_max[:, None], offs_v[None, :], 2147483647), axis=1)
            arg = tl.where(tile_max > m, tile_arg, arg)
        # online LSE: s ← s·exp(m − m') + Σ_j exp(z_j − m'), guarded for m' = −inf
        m_new = tl.maximum(m, tile_max)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        if NEED_PZ:
            ez = tl.exp(z - m_ref[:, None])
            rescale = tl.exp(m - m_ref)
            s = s * rescale + tl.sum(ez, axis=1)
            pz = pz * rescale + tl.sum(tl.where(mask_v[None, :], ez * z_finite, 0.0), axis=1)
        else:
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), axis=1)
        m = m_new
    out = OUT + pid_s * stride_os + offs_n
    tl.store(out, m + tl.log(s), mask=mask_n)
    tl.store(out + stride_oq, x, mask=mask_n)
    tl.store(out + 2 * stride_oq, zsum, mask=mask_n)
    if NEED_PZ:
        tl.store(out + 3 * stride_oq, pz / s, mask=mask_n)
    if NEED_ARGMAX:
        tl.store(out + 4 * stride_oq, m, mask=mask_n)
        tl.store(out + 5 * stride_oq, arg.to(tl.float32), mask=mask_n)


@triton.jit
def logit_grad_kernel(E, C, BIAS, TGT, LSE, COEF, G, FLAGS,
                      N, D, V, v_begin, width,
                      stride_en, stride_ed, stride_cv, stride_cd, stride_gn, stride_fn,
                      softcap, filter_eps, SUMW, inv_temp,
                      HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      FILTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      USE_TMA: tl.constexpr, GROUP_V: tl.constexpr,
                      HAS_SUMW: tl.constexpr = False, HAS_TEMP: tl.constexpr = False,
                      HAS_PZ: tl.constexpr = False):
    """G[n, j] for chunk positions j in [0, width) (vocabulary row v_begin + j).

    Optional terms, each only when its switch is on: HAS_SUMW: u·w_j instead of u (SUMW [V]
    float32 class weights); HAS_PZ: + q·p·(z − pz) with q = COEF[3], pz = COEF[4] (the entropy);
    HAS_TEMP: z = (softcapped logit)·inv_temp, and G gets the factor inv_temp.
    """
    # Grouped order over (vocabulary tile, token tile): GROUP_V vocabulary tiles (GROUP_V·BLOCK_V
    # rows of C) stay in L2 while E streams through them once; inside a group the vocabulary tile
    # varies fastest, so concurrent programs also share token tiles.
    pid_v, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(width, BLOCK_V), tl.cdiv(N, BLOCK_N), GROUP_V)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pos = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = (pos < width) & (v_begin + pos < V)
    rows = v_begin + pos
    z = _logit_tile(E, C, BIAS, pid_n * BLOCK_N, v_begin + pid_v * BLOCK_V, offs_n, rows, mask_n, mask_v, D,
                    stride_en, stride_ed, stride_cv, stride_cd,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION, USE_TMA)
    if HAS_SOFTCAP:
        th = _tanh(z / softcap)
        z = softcap * th
    if HAS_TEMP:
        z = z * inv_temp
    tgt = tl.load(TGT + offs_n, mask=mask_n, other=-1)
    lse = tl.load(LSE + offs_n, mask=mask_n, other=0.0)
    a = tl.load(COEF + offs_n, mask=mask_n, other=0.0)
    b = tl.load(COEF + N + offs_n, mask=mask_n, other=0.0)
    u = tl.load(COEF + 2 * N + offs_n, mask=mask_n, other=0.0)
    p = tl.exp(z - lse[:, None])
    valid = mask_n[:, None] & mask_v[None, :]
    is_target = (rows[None, :] == tgt[:, None]) & valid
    if HAS_SUMW:
        w = tl.load(SUMW + rows, mask=mask_v, other=0.0)
        g = a[:, None] * p + tl.where(is_target, b[:, None], 0.0) + u[:, None] * w[None, :]
    else:
        g = a[:, None] * p + tl.where(is_target, b[:, None], 0.0) + u[:, None]
    if HAS_PZ:
        q = tl.load(COEF + 3 * N + offs_n, mask=mask_n, other=0.0)
        mean_z = tl.load(COEF + 4 * N + offs_n, mask=mask_n, other=0.0)
        g += q[:, None] * p * (z - mean_z[:, None])
    if HAS_TEMP:
        g = g * inv_temp
    if HAS_SOFTCAP:
        g = g * (1.0 - th * th)
    g = tl.where(valid, g, 0.0)
    g_ptrs = G + offs_n[:, None].to(tl.int64) * stride_gn + pos[None, :]
    tl.store(g_ptrs, g.to(G.dtype.element_ty), mask=mask_n[:, None] & (pos < width)[None, :])
    if FILTER:
        weighted = tl.where(valid & (a[:, None] != 0.0), p, 0.0)
        keep = (tl.max(tl.max(weighted, axis=1), axis=0) >= filter_eps) | \
               (tl.max(tl.max(is_target.to(tl.int32), axis=1), axis=0) > 0)
        tl.store(FLAGS + pid_n * stride_fn + pid_v, keep.to(tl.int8))


@triton.jit
def _pointer_product(A, B, acc, k0, offs_m, offs_nn, mask_m, mask_nn, K,
                     stride_am, stride_ak, stride_bk, stride_bn,
                     BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + A[offs_m, k0:k0+BLOCK_K] · B[k0:k0+BLOCK_K, offs_nn] with masked pointer loads."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    a = tl.load(A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    b = tl.load(B + offs_k[:, None].to(tl.int64) * stride_bk + offs_nn[None, :] * stride_bn,
                mask=mask_k[:, None] & mask_nn[None, :], other=0.0)
    acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def sparse_matmul_kernel(A, B, OUT, K_LIST, K_COUNT,
                         M, NN, K, list_tile_m, list_tile_k,
                         stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on, stride_list,
                         ACCUMULATE: tl.constexpr, DENSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NN: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         USE_TMA: tl.constexpr, A_K_MAJOR: tl.constexpr):
    """OUT (+)= A · B over all K (DENSE) or the listed K tiles.

    K_LIST[r, :K_COUNT[r]] are the indices of the non-negligible K tiles (of size list_tile_k) of
    row tile r (of size list_tile_m, a multiple of BLOCK_M); list_tile_k is a multiple of BLOCK_K.
    USE_TMA: A and B are tensor descriptors: B over [K, NN], A over [M, K], or over
    [K, M] when A_K_MAJOR (A = Gᵀ of a row-major G).
    """
    # grouped ordering: GROUP_M row tiles share each B column tile while it is in L2
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(NN, BLOCK_NN), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_nn = pid_n * BLOCK_NN + tl.arange(0, BLOCK_NN)
    mask_m = offs_m < M
    mask_nn = offs_nn < NN
    acc = tl.zeros((BLOCK_M, BLOCK_NN), dtype=tl.float32)
    if DENSE:  # every K tile: a plain loop the compiler can software-pipeline
        n_iter = tl.cdiv(K, BLOCK_K)
    else:
        row_tile = (pid_m * BLOCK_M) // list_tile_m
        sub = list_tile_k // BLOCK_K
        n_iter = tl.load(K_COUNT + row_tile) * sub
    for i in range(0, n_iter):
        if DENSE:
            k0 = i * BLOCK_K
        else:
            k_tile = tl.load(K_LIST + row_tile * stride_list + i // sub)
            k0 = k_tile * list_tile_k + (i % sub) * BLOCK_K
        if USE_TMA:
            if A_K_MAJOR:
                a = A.load([k0, pid_m * BLOCK_M]).T
            else:
                a = A.load([pid_m * BLOCK_M, k0])
            b = B.load([k0, pid_n * BLOCK_NN])
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION)
        else:
            acc = _pointer_product(A, B, acc, k0, offs_m, offs_nn, mask_m, mask_nn, K,
                                   stride_am, stride_ak, stride_bk, stride_bn,
                                   BLOCK_K, DOT_PRECISION)
    out_ptrs = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_nn[None, :] * stride_on
    mask = mask_m[:, None] & mask_nn[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)



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
            z = softcap * _tanh(z / softcap)
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
            th = _tanh(z / softcap)
            z = softcap * th
        if HAS_SUMW:
            g = a * tl.exp(z - lse) + tl.where(offs == tgt, b, 0.0) + u * tl.load(SUMW + offs, mask=mask, other=0.0)
        else:
            g = a * tl.exp(z - lse) + tl.where(offs == tgt, b, 0.0) + u
        if HAS_SOFTCAP:
            g = g * (1.0 - th * th)
        tl.debug_barrier()
        tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def scale_kernel(X, K, numel, BLOCK: tl.constexpr):
    """X *= K[0] in float32 (one rounding to X's dtype; K is never rounded to it). K = 1 (the
    upstream gradient of a plain `loss.backward()`) touches no memory."""
    k = tl.load(K).to(tl.float32)
    if k != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(X + offs, (x * k).to(X.dtype.element_ty), mask=mask)
