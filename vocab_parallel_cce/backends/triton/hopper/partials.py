"""Per-row statistics from the logits kernel's per-tile partials, and the correct logit.

`logits.logits_kernel` writes, for each row i and column tile k, m_ik = max_j z_ij and
s_ik = Σ_j exp(z_ij − m_ik) (and s̃_ik of the rounded logits, Σ_j z_ij and q_ik = Σ_j exp(z_ij − m_ik)·z_ij
when asked). Per row:

    M_i = max_k m_ik,   lse_i = M_i + log Σ_k s_ik·exp(m_ik − M_i)   (lsẽ_i likewise from s̃),
    Σ_j z_ij = Σ_k Σz_ik,   pz_i = Σ_j p_ij z_ij = Σ_k q_ik·exp(m_ik − M_i) / Σ_k s_ik·exp(m_ik − M_i),
    x_i = (e_i·c_{t_i})·inv_temp in float32 (0 unless 0 ≤ t_i < n_cols).

The correct logit is a dot product of two rows (D products, float32 sums) rather than a pick from
the tiles: one gathered row of C per token instead of a compare and select on every logit.
A plain Triton kernel: it runs anywhere Triton does, the interpreter included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import gathered_row_dots


@triton.jit
def merge_partials_kernel(PART, n_tiles, N, E, C, TGT, OUT, D, n_cols, stride_e, stride_c, inv_temp,
                          HAS_ROUNDED: tl.constexpr, NEED_SUM: tl.constexpr, NEED_PZ: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT [5, N]: lse, x, Σz (0 without NEED_SUM), lsẽ (HAS_ROUNDED), pz (NEED_PZ) of rows
    [pid·BLOCK_R, ...); PART [k, n_tiles, N] float32: m, s, then s̃ (HAS_ROUNDED), then Σz
    (NEED_SUM), then q (NEED_PZ)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok_r = rows < N
    plane = n_tiles * N
    big_m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_R,), tl.float32)
    s_rounded = tl.zeros((BLOCK_R,), tl.float32)
    total = tl.zeros((BLOCK_R,), tl.float32)
    q = tl.zeros((BLOCK_R,), tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        ok = (tiles[:, None] < n_tiles) & ok_r[None, :]
        offs = tiles[:, None] * N + rows[None, :]
        m = tl.load(PART + offs, mask=ok, other=float("-inf"))
        new_m = tl.maximum(big_m, tl.max(m, axis=0))
        safe_m = tl.where(new_m > float("-inf"), new_m, 0.0)  # rows past N: every m is −inf
        scale = tl.exp(big_m - safe_m)
        weight = tl.exp(m - safe_m[None, :])
        s = s * scale + tl.sum(tl.load(PART + plane + offs, mask=ok, other=0.0) * weight, axis=0)
        k = 2
        if HAS_ROUNDED:
            part = tl.load(PART + k * plane + offs, mask=ok, other=0.0)
            s_rounded = s_rounded * scale + tl.sum(part * weight, axis=0)
            k += 1
        if NEED_SUM:
            total += tl.sum(tl.load(PART + k * plane + offs, mask=ok, other=0.0), axis=0)
            k += 1
        if NEED_PZ:
            q = q * scale + tl.sum(tl.load(PART + k * plane + offs, mask=ok, other=0.0) * weight, axis=0)
        big_m = new_m
    tl.store(OUT + rows, big_m + tl.log(tl.where(ok_r, s, 1.0)), mask=ok_r)
    if HAS_ROUNDED:
        tl.store(OUT + 3 * N + rows, big_m + tl.log(tl.where(ok_r, s_rounded, 1.0)), mask=ok_r)
    tl.store(OUT + 2 * N + rows, total, mask=ok_r)
    if NEED_PZ:
        tl.store(OUT + 4 * N + rows, q / tl.where(ok_r, s, 1.0), mask=ok_r)

    tgt = tl.load(TGT + rows, mask=ok_r, other=-1)
    has_t = ok_r & (tgt >= 0) & (tgt < n_cols)
    x = tl.sum(gathered_row_dots(E, C, rows, tgt[:, None], has_t[:, None], D, stride_e, stride_c, BLOCK_R, 1, BLOCK_D),
               axis=1)
    tl.store(OUT + N + rows, x * inv_temp, mask=ok_r)


def merge(partials: torch.Tensor, e: torch.Tensor, c: torch.Tensor, t_local: torch.Tensor, n_cols: int,
          has_rounded: bool, need_sum: bool, need_pz: bool = False, inv_temp: float = 1.0) -> torch.Tensor:
    """float32 [5, N]: (lse, x, Σz, lsẽ, pz) from partials [k, T, N] (module docstring); e [N, D],
    c [≥ n_cols, D] with unit last stride, t_local [N] int64 in c's row numbering. Row 2 is 0 unless
    need_sum; rows 3 and 4 are unset unless has_rounded / need_pz."""
    n, d = e.shape
    out = torch.empty(5, n, dtype=torch.float32, device=e.device)
    if n == 0:
        return out
    interpreting = e.device.type == "cpu"
    # 16 rows a program: N/16 programs fill the GPU (64-row programs ran 0.4 ms at N = 8192, V = 128256)
    block_r, block_t, block_d = (16, 4, 16) if interpreting else (16, 64, 128)
    merge_partials_kernel[(triton.cdiv(n, block_r),)](
        partials, partials.shape[1], n, e, c, t_local, out, d, n_cols, e.stride(0), c.stride(0), float(inv_temp),
        HAS_ROUNDED=has_rounded, NEED_SUM=need_sum, NEED_PZ=need_pz, BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=4,
    )
    return out
