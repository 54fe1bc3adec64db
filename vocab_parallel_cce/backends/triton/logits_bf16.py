"""The fast mode's passes over a chunk of stored 16-bit logits Z [N, V] (cuBLAS wrote them), and
their launchers (stored_logits.py picks them for bf16 inputs outside exact mode).

- `stored_logits_stats_kernel` (`stats_pass`): per row, lse, correct logit and Σ logits (bias and
  softcap applied on the fly; with them, the final logits written back so the gradient pass can
  use them), and optionally the class-weighted Σ_j w_j z_j and the max / argmax (stats.py). No
  cross-thread reduction in its loop: every lane of a [BLOCK_R, BLOCK_C] block keeps its own
  running max m and s = Σ exp(z − m) (one exp per element: d = z − m, e = exp(−|d|),
  s ← d > 0 ? s·e + 1 : s + e), target logit, logit sum and argmax; the lanes are merged once per
  row at the end (lse = M + log Σ_k s_k·exp(m_k − M), M = max_k m_k).
- `grad_from_stored_kernel` (`grad_pass`): G = a·p + b·[j = t] + u (u·w_j with class weights) in
  place (× 1 − (z/cap)² = 1 − tanh² of the raw logit when softcapped), with optional per-tile keep
  flags; for plain cross-entropy (PLAIN) the coefficients are formed inside from the upstream
  gradient.
- `plain_ce_kernel` (`plain_ce`): the plain per-token cross-entropy from combined statistics
  (several ranks; on one rank the statistics kernel writes it itself, NEED_CE).

Plain cross-entropy (`Plan.plain_coefficients`): ce = lse − x on scored tokens (0 ≤ t <
vocab_size, t ≠ ignore_index), NaN at other non-ignored targets, 0 at ignored ones (what
`Plan.token_loss_parts` computes), and autograd's coefficients are a = 1, b = −1, u = 0 on scored
tokens, 0 (b = −0) elsewhere. With the upstream gradient g (× k, "mean"'s 1/count) the scaled
coefficients the general path forms with torch ops, k_i·(a, b, u) with k_i = where(scored, g·k, 0),
are exactly (k_i, −k_i, k_i·0): the kernel forms those, bit for bit the same float32 values.

Block shapes: the statistics stream one row per program in BLOCK_C columns (per-lane running
statistics, merged once per row), the gradient pass works in tiles. Measured on an H200 at (8192,
4096, 128256) (benchmarks/experiments/fast_mode_parts.py): a per-lane prototype 0.85 ms at 2048
columns × 8 warps (2.5 TB/s; 0.88–1.00 at the other shapes tried) against the earlier
cross-thread kernel's 0.93; gradient in place 1.09 ms (3.9 TB/s read + write, any shape).
"""

import torch
import triton
import triton.language as tl

from ...plan import Plan
from .common import counters, float32_sum_weights, gathered_row_dots, interpreting, tanh

STATS_ROWS, STATS_COLS, STATS_WARPS = 1, 2048, 8
# Logits besides the target's that the loss's lse takes in float32 (`stored_logits_stats_kernel`'s
# TOP_K): the row's largest. On a peaked softmax whose target is not the largest, lse ≈ z_max and
# bf16's rounding of z_max (up to |z_max|·2^-9) would enter the loss whole; the next largest carry
# far less weight, and each gathered row of C costs the statistics pass N·D·2 bytes of reads.
FLOAT32_TOP_K = 1
FLOAT32_BLOCK_D = 2048  # D per step of their dot products (`gathered_row_dots`)


def float32_slots() -> int:
    """Gathered rows per token of the float32 logits: the target and FLOAT32_TOP_K, a power of 2."""
    return triton.next_power_of_2(FLOAT32_TOP_K + 1)

GRAD_ROWS, GRAD_COLS, GRAD_WARPS = 4, 1024, 4


@triton.jit
def _plain_ce(lse, x, tgt, ignore_t, lo_t, hi_t):
    """Plain per-token cross-entropy (module docstring): lse − x where lo_t ≤ t < hi_t, NaN at
    other targets ≠ ignore_t, 0 at ignore_t (t, and the three bounds, in one numbering)."""
    in_range = (tgt >= lo_t) & (tgt < hi_t)
    return tl.where(tgt != ignore_t, tl.where(in_range, lse - x, float("nan")), 0.0)


@triton.jit
def _plain_coefficients(UP, stride_up, SCALE, rows, mask_r, tgt, ignore_t, lo_t, hi_t, HAS_SCALE: tl.constexpr):
    """(a, b, u) = (k, −k, k·0), k = where(scored, g·s, 0) per row (module docstring): g = UP[row ·
    stride_up] (stride 0: one upstream gradient for all rows), s = SCALE[0] when HAS_SCALE."""
    up = tl.load(UP + rows * stride_up, mask=mask_r, other=0.0)
    if HAS_SCALE:
        up = up * tl.load(SCALE)
    scored = (tgt != ignore_t) & (tgt >= lo_t) & (tgt < hi_t)
    k = tl.where(scored, up, 0.0)
    return k, -k, k * 0.0


@triton.jit
def grad_from_stored_kernel(Z, TGT, LSE, COEF, FLAGS, N, V, stride_z, stride_f, inv_softcap, filter_eps, SUMW,
                            HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SUMW: tl.constexpr = False,
                            UP=None, stride_up=0, SCALE=None, ignore_t=0, lo_t=0, hi_t=0,
                            PLAIN: tl.constexpr = False, HAS_SCALE: tl.constexpr = False):
    """In place over stored logits Z [N, V] (bias and softcap applied):
    Z ← (a·exp(z − lse) + b·[j = t] + u) · (1 − (z/cap)²  when softcapped),
    (a, b, u) per row from COEF [3, N] float32, or with PLAIN formed here for plain cross-entropy
    (`_plain_coefficients`: upstream gradient UP, "mean"'s SCALE; scored targets lo_t ≤ t < hi_t,
    t ≠ ignore_t in TGT's local numbering; COEF unused).
    HAS_SUMW: u·w_j instead of u (SUMW [V] float32 class weights: s was Σ_j w_j z_j).
    FILTER: FLAGS[row tile, column tile] = 1 where some a·p ≥ filter_eps or a target lies inside."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = rows < N
    mask = mask_r[:, None] & (cols < V)[None, :]
    lse = tl.load(LSE + rows, mask=mask_r, other=0.0)
    tgt = tl.load(TGT + rows, mask=mask_r, other=-1)
    if PLAIN:
        a, b, u = _plain_coefficients(UP, stride_up, SCALE, rows, mask_r, tgt, ignore_t, lo_t, hi_t, HAS_SCALE)
    else:
        a = tl.load(COEF + rows, mask=mask_r, other=0.0)
        b = tl.load(COEF + N + rows, mask=mask_r, other=0.0)
        u = tl.load(COEF + 2 * N + rows, mask=mask_r, other=0.0)
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


# Lowest float32: the per-lane running max starts here rather than at −inf, so that d = z − m is
# never −inf − (−inf) = NaN: a −inf logit (a −inf bias masking a token out) or a masked column
# (−inf) gives d = −inf and leaves the lane as it was. No bf16 logit reaches it (bf16's lowest is
# −3.3895e38), so a lane whose m is still there has seen no finite logit.
_LOWEST = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _lane_stats_block(Z, BIAS, SUMW, row_ptr, c0, V, tgt, mask_r, softcap, m, s, x, zsum, arg,
                      HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_SUM: tl.constexpr,
                      WRITE_BACK: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SUMW: tl.constexpr,
                      NEED_ARGMAX: tl.constexpr, PARTIAL: tl.constexpr):
    """One BLOCK_C-column block into the per-lane statistics [BLOCK_R, BLOCK_C] (m, s, x, zsum, arg),
    element-wise only. PARTIAL: the last block, columns ≥ V masked; otherwise every column is < V
    and only the rows are masked (a mask constant along the row: the loads vectorise whatever V
    is)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    if PARTIAL:
        mask_c = cols < V
        mask = mask_r[:, None] & mask_c[None, :]
    else:
        mask = mask_r[:, None]  # rows only, broadcast along the block
    # masked elements load 0, and bias (0), softcap (cap·tanh(0) = 0) and rounding keep them 0:
    # they add nothing to x (a target ≥ V may name a masked column) nor to zsum.
    z = tl.load(row_ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        if PARTIAL:
            z += tl.load(BIAS + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        else:
            z += tl.load(BIAS + cols).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    if WRITE_BACK:  # the statistics use the stored (rounded) logits, as the gradient pass will:
        zq = z.to(Z.dtype.element_ty)  # Σ_j p_j = 1 exactly for the p it computes
        tl.store(row_ptr + cols[None, :], zq, mask=mask)
        z = zq.to(tl.float32)
    if HAS_BIAS or HAS_SOFTCAP or WRITE_BACK:  # else the kernel loads the stored z_t after the loop
        x += tl.where(cols[None, :] == tgt[:, None], z, 0.0)
    if NEED_SUM:
        if HAS_SUMW:
            if PARTIAL:
                w = tl.load(SUMW + cols, mask=mask_c, other=0.0)
            else:
                w = tl.load(SUMW + cols)
            zsum += z * w[None, :]
        else:
            zsum += z
    if PARTIAL:
        z = tl.where(mask_c[None, :], z, float("-inf"))
    # one exp per element: d = z − m, e = exp(−|d|); a new lane max (d > 0) rescales s: s·e + 1,
    # otherwise s + e. m > −inf always, so d is never NaN (unless z is NaN or z = m = +inf).
    d = z - m
    e = tl.exp(-tl.abs(d))
    up = d > 0
    s = tl.where(up, s * e + 1.0, s + e)
    if NEED_ARGMAX:  # a lane's columns increase: only a strictly larger value moves its argmax
        arg = tl.where(up, cols[None, :], arg)
    m = tl.where(up, z, m)
    return m, s, x, zsum, arg


@triton.jit
def _float32_logits(E, C, BIAS, rows, cols, ok, D, stride_e, stride_c, softcap, HAS_BIAS: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_R, K] float32: the final logits z_{i, cols[i, k]} = cap·tanh((e_i·c_col + b_col)/cap)
    from the inputs (dot products in float32), where ok; 0 elsewhere."""
    z = gathered_row_dots(E, C, rows, cols, ok, D, stride_e, stride_c, BLOCK_R, K, BLOCK_D)
    if HAS_BIAS:
        z += tl.load(BIAS + tl.where(ok, cols, 0), mask=ok, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.jit
def stored_logits_stats_kernel(Z, BIAS, TGT, OUT, N, V, stride_z, softcap, SUMW,
                               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_SUM: tl.constexpr,
                               WRITE_BACK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                               HAS_SUMW: tl.constexpr = False, NEED_ARGMAX: tl.constexpr = False,
                               CE=None, ignore_t=0, lo_t=0, hi_t=0, NEED_CE: tl.constexpr = False,
                               E=None, C=None, D=0, stride_e=0, stride_c=0, GLSE_ROW=0,
                               TARGET_DOT: tl.constexpr = False, BLOCK_D: tl.constexpr = 128,
                               TOP_K: tl.constexpr = 0, SLOTS: tl.constexpr = 1):
    """OUT[0|1|2, row] = (lse, correct logit, Σ logits) of rows of stored raw logits Z [N, V]
    (16-bit), bias and softcap applied on the fly; WRITE_BACK stores the capped logits (bias
    included) into Z in place, so that `grad_from_stored_kernel` can follow, and takes the
    statistics of those stored values (an lse of unrounded logits with p of rounded ones would
    miss Σ_j p_j = 1 by ~|z|·2^-9: for a confident token, more than 1 − p_t itself).

    Optional (stats.py), each only when its switch is on, of the same (stored) values:
    HAS_SUMW: OUT[2] = Σ_j w_j z_j (SUMW [V] float32 class weights); NEED_ARGMAX:
    OUT[3] = max_j z_j, OUT[4] = its smallest column (as a float). A correct logit is the z_t
    of a target t in [0, V), else 0. A row whose logits are all −inf gets lse = max = −inf and
    argmax 0. Grid: cdiv(N, BLOCK_R) programs of BLOCK_R rows; V ≥ 1.

    Per-lane running statistics, no cross-thread reduction inside the loop: each lane (r, k) of
    the [BLOCK_R, BLOCK_C] block sees the columns j ≡ k (mod BLOCK_C) of row r in increasing
    order and keeps its own running max m, s = Σ exp(z_j − m), Σ z_j (or Σ w_j z_j), the column of
    its max, and Σ [j = t]·z_j with bias, softcap or WRITE_BACK (otherwise the stored logit is the
    final one and z_t is loaded once per row after the loop), updated with one exp per element:
        d = z − m,  e = exp(−|d|),  s ← (d > 0) ? s·e + 1 : s + e,  m ← max(m, z)
    (m starts at the lowest float32 rather than −inf, so masked columns, loaded as −inf, and −inf
    logits give d = −inf, e = 0 and change nothing). Once per row, after the loop:
        M = max_k m_k,  lse = M + log Σ_k s_k·exp(m_k − M),  x, Σz: Σ_k,
        max = M,  argmax = min{arg_k : m_k = M}  (the smallest column reaching the row max).
    NEED_CE (one rank: these are the global statistics): CE[row] = the plain cross-entropy
    `_plain_ce` of (lse, x) (scored targets lo_t ≤ t < hi_t, t ≠ ignore_t).

    TARGET_DOT (E [N, D], C [V, D], the product's inputs): the correct logit from float32 instead,
    x = cap·tanh((e_i·c_t + b_t)/cap), and the loss's lse with float32 values in place of the stored
    z̃_j of the target and of the TOP_K largest lane maxima (the row's largest logits, but for one
    of two that share a lane), their dot products in one pass along D over SLOTS ≥ TOP_K + 1
    gathered rows of C,
        lse = M + log(S + Σ_{j corrected} (exp(z_j − M) − exp(z̃_j − M))),  S = Σ_k s_k·exp(m_k − M),
    so that a token's loss lse − x carries no rounding of its own logit nor of the logits that
    dominate its softmax (only the rest's through lse, weighted by their small p); OUT[GLSE_ROW] =
    the stored logits' lse, for their gradient."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < N
    tgt = tl.load(TGT + rows, mask=mask_r, other=-1)
    m = tl.full((BLOCK_R, BLOCK_C), _LOWEST, tl.float32)
    s = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    x = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    zsum = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    arg = tl.zeros((BLOCK_R, BLOCK_C), tl.int32)  # column of the lane's max (NEED_ARGMAX or TOP_K)
    row_ptr = Z + rows[:, None].to(tl.int64) * stride_z
    v_full = (V // BLOCK_C) * BLOCK_C
    for c0 in range(0, v_full, BLOCK_C):
        m, s, x, zsum, arg = _lane_stats_block(
            Z, BIAS, SUMW, row_ptr, c0, V, tgt, mask_r, softcap, m, s, x, zsum, arg, HAS_BIAS, HAS_SOFTCAP,
            NEED_SUM, WRITE_BACK, BLOCK_C, HAS_SUMW, NEED_ARGMAX or TOP_K > 0, False)
    if v_full < V:
        m, s, x, zsum, arg = _lane_stats_block(
            Z, BIAS, SUMW, row_ptr, v_full, V, tgt, mask_r, softcap, m, s, x, zsum, arg, HAS_BIAS, HAS_SOFTCAP,
            NEED_SUM, WRITE_BACK, BLOCK_C, HAS_SUMW, NEED_ARGMAX or TOP_K > 0, True)
    # the merge of the lanes: a lane that saw no finite logit has s = 0 and adds 0 (m − M is finite
    # or 0 there, never NaN); a row of −inf logits has M = lowest and Σ = 0, so lse = −inf.
    row_max = tl.max(m, axis=1)
    total = tl.sum(s * tl.exp(m - row_max[:, None]), axis=1)
    lse = row_max + tl.log(total)
    has_t = mask_r & (tgt >= 0) & (tgt < V)
    if HAS_BIAS or HAS_SOFTCAP or WRITE_BACK:  # the biased / capped z_t was formed in the loop
        x_row = tl.sum(x, axis=1)
    else:  # the stored logit itself: one load per row instead of a compare-select-add per element
        x_row = tl.load(Z + rows.to(tl.int64) * stride_z + tl.where(has_t, tgt, 0), mask=has_t,
                        other=0.0).to(tl.float32)
    if TARGET_DOT:
        tl.store(OUT + GLSE_ROW * N + rows, lse, mask=mask_r)
        # slot 0 the target, slots 1..TOP_K the largest lane maxima (their columns and stored values)
        slot = tl.arange(0, SLOTS)[None, :]
        cols = tl.where(slot == 0, tgt[:, None], 0)
        fix = (slot == 0) & has_t[:, None]
        stored = tl.where(slot == 0, x_row[:, None], 0.0)
        lane_max = m
        for k in tl.static_range(TOP_K):
            best = tl.max(lane_max, axis=1)
            col = tl.min(tl.where(lane_max == best[:, None], arg, 2147483647), axis=1)
            here = slot == k + 1
            cols = tl.where(here, col[:, None], cols)
            fix = fix | (here & (mask_r & (best > _LOWEST) & (col != tgt))[:, None])
            stored = tl.where(here, best[:, None], stored)
            lane_max = tl.where(arg == col[:, None], _LOWEST, lane_max)
        z32 = _float32_logits(E, C, BIAS, rows, cols, fix, D, stride_e, stride_c, softcap, HAS_BIAS, HAS_SOFTCAP,
                              BLOCK_R, SLOTS, BLOCK_D)
        corr = tl.sum(tl.where(fix, tl.exp(z32 - row_max[:, None]) - tl.exp(stored - row_max[:, None]), 0.0), axis=1)
        lse = tl.where(mask_r & (row_max > _LOWEST), row_max + tl.log(tl.maximum(total + corr, 0.0)), lse)
        x_row = tl.where(has_t, tl.sum(tl.where(slot == 0, z32, 0.0), axis=1), x_row)
    tl.store(OUT + rows, lse, mask=mask_r)
    tl.store(OUT + N + rows, x_row, mask=mask_r)
    if NEED_CE:
        tl.store(CE + rows, _plain_ce(lse, x_row, tgt, ignore_t, lo_t, hi_t), mask=mask_r)
    tl.store(OUT + 2 * N + rows, tl.sum(zsum, axis=1), mask=mask_r)
    if NEED_ARGMAX:
        row_arg = tl.min(tl.where(m == row_max[:, None], arg, 2147483647), axis=1)
        tl.store(OUT + 3 * N + rows, tl.where(row_max > _LOWEST, row_max, float("-inf")), mask=mask_r)
        tl.store(OUT + 4 * N + rows, row_arg.to(tl.float32), mask=mask_r)


@triton.jit
def plain_ce_kernel(LSE, X, TGT, CE, N, ignore_t, lo_t, hi_t, BLOCK: tl.constexpr):
    """CE[i] = `_plain_ce`(LSE[i], X[i], TGT[i]) for i < N (the combined statistics of several
    ranks; global targets)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    lse = tl.load(LSE + offs, mask=mask, other=0.0)
    x = tl.load(X + offs, mask=mask, other=0.0)
    tgt = tl.load(TGT + offs, mask=mask, other=0)
    tl.store(CE + offs, _plain_ce(lse, x, tgt, ignore_t, lo_t, hi_t), mask=mask)


def scored_bounds(plan: Plan, local: bool) -> tuple[int, int, int]:
    """(ignore_t, lo_t, hi_t) of the plain loss's kernels: t is scored where lo_t ≤ t < hi_t and
    t ≠ ignore_t, in the shard's local numbering (t − vocab_start) or the global one."""
    shift = plan.vocab_start if local else 0
    return plan.ignore_index - shift, -shift, plan.vocab_size - shift


def stats_pass(z: torch.Tensor, bias: torch.Tensor | None, t_local: torch.Tensor, out: torch.Tensor, plan: Plan,
               with_ce: bool, e: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor | None:
    """One pass over the raw bf16 logits Z [n, ≥ n_valid] (n, n_valid > 0): the statistics
    `plan.stat_names` into out [k, n] float32, those of the stored values; with bias or softcap the
    final logits cap·tanh((r + b)/cap) are written back into Z first. Where the names end with
    "glse" (e [n, D] and c [≥ n_valid, D], Z's product inputs, given): glse is the stored values'
    lse, x the float32 correct logit and lse the stored values' with float32 values for the
    target's and the FLOAT32_TOP_K largest (`stored_logits_stats_kernel`'s TARGET_DOT).
    with_ce (one rank, plain cross-entropy): the per-token plain cross-entropy [n] float32 is
    returned (else None)."""
    n, v = z.shape[0], plan.n_valid
    sum_w = float32_sum_weights(plan)
    rows, cols, warps = (4, 16, 1) if interpreting() else (STATS_ROWS, STATS_COLS, STATS_WARPS)
    ce = torch.empty(n, dtype=torch.float32, device=z.device) if with_ce else None
    ignore_t, lo_t, hi_t = scored_bounds(plan, local=True)
    names = plan.stat_names
    dot = {}
    if "glse" in names:
        dot = dict(E=e, C=c, D=e.shape[1], stride_e=e.stride(0), stride_c=c.stride(0), GLSE_ROW=names.index("glse"),
                   TARGET_DOT=True, BLOCK_D=16 if interpreting() else FLOAT32_BLOCK_D, TOP_K=FLOAT32_TOP_K,
                   SLOTS=float32_slots())
    stored_logits_stats_kernel[(triton.cdiv(n, rows),)](
        z, z if bias is None else bias, t_local, out, n, v, z.stride(0), plan.softcap or 1.0,
        out if sum_w is None else sum_w,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=plan.softcap is not None, NEED_SUM=plan.need_sum,
        WRITE_BACK=bias is not None or plan.softcap is not None, BLOCK_R=rows, BLOCK_C=cols,
        HAS_SUMW=sum_w is not None, NEED_ARGMAX=plan.need_argmax, num_warps=warps,
        CE=ce, ignore_t=ignore_t, lo_t=lo_t, hi_t=hi_t, NEED_CE=with_ce, **dot,
    )
    counters["fast_bf16_logits"] += 1
    return ce


def grad_pass(z: torch.Tensor, t_local: torch.Tensor, lse: torch.Tensor, plan: Plan, coef: torch.Tensor | None = None,
              up: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """G [n, n_valid] written over the stored final logits Z (bias and softcap are in them), in
    place: from the per-token coefficients coef [3, n] float32 (a, b, u; u·w_j with
    `plan.sum_weights`), or, with coef None, for plain cross-entropy from the upstream gradient
    `up` (float32, 0-d or [n], any stride) times `scale` (0-d float32 or None), the coefficients
    k·(1, −1, 0), k = where(scored, up·scale, 0), formed inside the kernel (PLAIN)."""
    n, v = z.shape[0], plan.n_valid
    if v > 0 and n > 0:
        rows, cols, warps = (4, 16, 1) if interpreting() else (GRAD_ROWS, GRAD_COLS, GRAD_WARPS)
        if coef is None:
            ignore_t, lo_t, hi_t = scored_bounds(plan, local=True)
            coef_arg, sumw_arg = lse, lse
            route = dict(UP=up, stride_up=up.stride(0) if up.dim() else 0, SCALE=scale, ignore_t=ignore_t,
                         lo_t=lo_t, hi_t=hi_t, PLAIN=True, HAS_SCALE=scale is not None)
        else:
            sum_w = float32_sum_weights(plan)
            coef_arg, sumw_arg = coef, (lse if sum_w is None else sum_w)
            route = dict(HAS_SUMW=sum_w is not None)
        grad_from_stored_kernel[(triton.cdiv(n, rows), triton.cdiv(v, cols))](
            z, t_local, lse, coef_arg, z, n, v, z.stride(0), 0, 1.0 / (plan.softcap or 1.0), 0.0, sumw_arg,
            HAS_SOFTCAP=plan.softcap is not None, FILTER=False, BLOCK_R=rows, BLOCK_C=cols, num_warps=warps,
            **route,
        )
    # torch 2.13's CPU bf16 GEMM reads past K when A's rows are strided (the padding columns
    # enter the product): on CPU (the interpreter's tests) hand out a contiguous copy.
    return z[:, :v].contiguous() if z.device.type == "cpu" else z[:, :v]


def plain_ce(lse: torch.Tensor, x: torch.Tensor, t: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The plain per-token cross-entropy [N] float32 from the combined statistics (lse, x) and the
    global targets t (several ranks; one rank's statistics pass writes it itself: with_ce)."""
    n = t.shape[0]
    ce = torch.empty(n, dtype=torch.float32, device=t.device)
    if n > 0:
        block = 16 if interpreting() else 1024
        plain_ce_kernel[(triton.cdiv(n, block),)](
            lse.contiguous(), x.contiguous(), t, ce, n, *scored_bounds(plan, local=False), BLOCK=block)
    return ce
