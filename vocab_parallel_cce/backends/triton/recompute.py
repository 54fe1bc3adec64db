"""The memory-first path's kernels and their launchers (paths/recompute.py's `ShardStats`).

Notation: E [N, D] hidden states, C [V, D] classifier (rows = vocabulary), z = E·Cᵀ (+ b),
optionally softcapped z ← cap·tanh(z/cap). All accumulation is float32.

Forward (`forward_stats`, custom op `triton_forward_stats`): `forward_kernel`, one launch over
(vocabulary split, token tile), each program the partial lse, correct logit and logit sum over its
split's vocabulary tiles (online log-sum-exp, no N×V writes) → [3, splits, N] partials, merged
over the splits (a few floats per token).

Backward (`backward`, custom op `triton_backward`, or `triton_backward_into` for a float32
`dc_accumulate_into` target), per chunk of vocabulary rows (G lives in dC's not-yet-written rows
while it fits there, `_g_inside_dc`; then, and always when there is no dC, in a workspace of
`width` columns from `_chunk_bytes`, at least `tuning.min_chunk_columns`):
  1. `logit_grad_kernel` recomputes the chunk's logits and writes G = a·p + b·[j = t] + u
     (× (1 − tanh²) when softcapped) and a per-tile keep flag (some softmax value reaches
     `filter_eps`, or the tile holds a target);
  2. dE += G · C_chunk into a float32 accumulator, always dense (products.float32_product); at the
     end it is narrowed to the input dtype IN PLACE (or handed over in float32 when a cross-rank
     sum follows: `de_fp32`);
  3. dC_chunk = Gᵀ · E, complete over all tokens, stored straight in c's dtype (no fp32 dC): one
     cuBLAS GEMM, or, when skipping, `products.sparse_matmul_kernel` visiting only the kept token
     tiles. With a float32 target (Megatron's main_grad) the chunk is added into the target's rows
     instead, by one float32-output product with beta = 1 (`float32_product`; the block-sparse
     kernel accumulating when skipping): no dC tensor exists and nothing is rounded to 16 bits
     before the add.
Skipping (dC only; dE is never filtered, DESIGN.md) is adaptive under filter_eps "auto"
(`skip_policy`). The vocabulary is visited in id order.

The custom ops are opaque to torch.compile and free of host synchronisation (no .item() /
.nonzero()), so they also run under CUDA-graph capture. Custom ops take scalars only: the plan's
fields cross as scalars, its Tuning as a string (`Tuning.encode`).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ... import stats
from ...distributed import narrow_in_place
from ...plan import Plan
from ...tuning import Tuning
from .common import counters, float32_sum_weights, grouped_tile, interpreting, tanh
from .products import dot_precision, float32_product, num_sms, sparse_matmul, tile_lists, tma_operands
from .skip_policy import skip_policy


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
            z = softcap * tanh(z / softcap)
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
    pid_v, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(width, BLOCK_V), tl.cdiv(N, BLOCK_N), GROUP_V)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pos = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = (pos < width) & (v_begin + pos < V)
    rows = v_begin + pos
    z = _logit_tile(E, C, BIAS, pid_n * BLOCK_N, v_begin + pid_v * BLOCK_V, offs_n, rows, mask_n, mask_v, D,
                    stride_en, stride_ed, stride_cv, stride_cd,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION, USE_TMA)
    if HAS_SOFTCAP:
        th = tanh(z / softcap)
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



# The backward's working memory beyond dE and dC is held to tuning.workspace_fraction (9%) of
# their size: the float32 dE surplus (N·D·2 bytes for 16-bit inputs), the logit-gradient chunk,
# and small buffers. Wider chunks = fewer float32 dE read-modify-writes (N·D·8 bytes each); chunks
# narrower than tuning.min_chunk_columns make the backward launch-bound (measured on an H200: 501
# chunks of 256 columns at N=16384 took 208 ms, chunks of 1024 took 136 ms).
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 8 << 20, 512 << 20


def _chunk_bytes(n: int, d: int, v: int, elt: int, tuning: Tuning) -> int:
    """Bytes for the workspace chunk of logit gradients (tuning.chunk_bytes if set)."""
    if tuning.chunk_bytes is not None:
        return tuning.chunk_bytes
    grads = (n * d + v * d) * elt
    surplus = n * d * 2 if elt == 2 else 0
    return int(min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, tuning.workspace_fraction * grads - surplus)))


def _round_width(columns: int, n_valid: int, multiple: int, min_columns: int) -> int:
    """Chunk width: at least `min_columns`, a multiple of `multiple`, no wider than needed."""
    width = max(multiple, max(min_columns, columns) // multiple * multiple)
    return min(width, triton.cdiv(max(n_valid, 1), multiple) * multiple)


def _forward_config(dtype: torch.dtype, tuning: Tuning) -> tuple:
    """(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages); tuning.forward_block overrides."""
    if tuning.forward_block is not None:
        return tuning.forward_block
    if interpreting():
        return (16, 16, 16, 1, 1)
    return (128, 64, 32, 8, 3) if dtype == torch.float32 else (128, 256, 64, 8, 3)


def _grad_config(dtype: torch.dtype, tuning: Tuning) -> tuple:
    """Logit-gradient tile = keep-flag granularity: (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages)."""
    if tuning.grad_block is not None:
        return tuning.grad_block
    if interpreting():
        return (16, 16, 16, 1, 1)
    return (128, 128, 32, 8, 3) if dtype == torch.float32 else (128, 128, 64, 8, 4)


@torch.library.custom_op("vocab_parallel_cce::triton_forward_stats", mutates_args=())
def _forward_stats_op(e: torch.Tensor, c: torch.Tensor, bias: Optional[torch.Tensor], t: torch.Tensor,
                      n_valid: int, softcap: float, need_sum: bool, exact: bool, tuning_code: str,
                      sum_weights: Optional[torch.Tensor], inv_temp: float, need_pz: bool, need_argmax: bool,
                      hopper: bool = False) -> list[torch.Tensor]:
    """The shard's statistics, k float32 [N], `stats.names(need_pz, need_argmax)` (lse, x, s,
    then pz, then max, argmax); softcap 0 = none; sum_weights [n_valid] float32: s = Σ_j w_j z_j;
    inv_temp 1 = no temperature; tuning_code: Tuning.encode(); hopper: the Hopper kernels may
    compute them (`Plan.hopper`: none of the options above but need_sum, need_pz, inv_temp)."""
    tuning = Tuning.decode(tuning_code)
    n, d = e.shape
    names = stats.names(need_pz, need_argmax)
    block_n, block_v, block_d, warps, stages = _forward_config(e.dtype, tuning)
    n_tiles, v_tiles = triton.cdiv(n, block_n), triton.cdiv(n_valid, block_v)
    if n == 0 or n_valid == 0:
        return stats.of_no_rows(names, n, e, torch.float32)
    if hopper:
        from . import hopper as hopper_kernels

        out = hopper_kernels.shard_stats(e, c, t, n_valid, need_sum, need_pz, inv_temp, tuning.stats_k_slice)
        if out is not None:
            counters["hopper_forward"] += 1
            return [out[k].clone() for k in ((0, 1, 2, 4) if need_pz else (0, 1, 2))]
    e_arg, c_arg, tma = tma_operands(e, c, block_n, block_v, block_d, tuning)
    # Enough programs for ~4 waves; each walks `tiles_per_split` consecutive vocabulary tiles.
    splits = tuning.forward_splits or max(1, min(v_tiles, triton.cdiv(4 * num_sms(e.device), n_tiles), 128))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)
    # rows 0-2 always; the kernel writes rows 3 (pz) and 4, 5 (max, argmax) only when asked
    out = torch.empty(3 if len(names) == 3 else 6, splits, n, dtype=torch.float32, device=e.device)
    forward_kernel[(splits, n_tiles)](
        e_arg, c_arg, c if bias is None else bias, t, out, n, d, n_valid, tiles_per_split,
        e.stride(0), e.stride(1), c.stride(0), c.stride(1), out.stride(0), out.stride(1),
        softcap if softcap > 0 else 1.0, out if sum_weights is None else sum_weights, inv_temp,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, NEED_SUM=need_sum,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, EVEN_D=d % block_d == 0,
        DOT_PRECISION=dot_precision(e.dtype, exact), USE_TMA=tma,
        HAS_SUMW=sum_weights is not None, HAS_TEMP=inv_temp != 1.0, NEED_PZ=need_pz, NEED_ARGMAX=need_argmax,
        num_warps=warps, num_stages=stages,
    )
    if len(names) == 3:
        return [torch.logsumexp(out[0], dim=0), out[1].sum(0), out[2].sum(0)]
    # rows of `out` in use, by slices (a list index would copy an index tensor from the host)
    parts = [out[0:3]] + ([out[3:4]] if need_pz else []) + ([out[4:6]] if need_argmax else [])
    return list(stats.merge(torch.cat(parts).transpose(0, 1), names))  # the splits are disjoint vocabulary parts


@_forward_stats_op.register_fake
def _(e, c, bias, t, n_valid, softcap, need_sum, exact, tuning_code, sum_weights, inv_temp, need_pz, need_argmax,
      hopper=False):
    return [e.new_empty(e.shape[0], dtype=torch.float32) for _ in stats.names(need_pz, need_argmax)]


def _g_inside_dc(dc_bytes: torch.Tensor, v_begin: int, n_valid: int, n: int, dc_row_bytes: int,
                 g_dtype: torch.dtype, multiple: int, min_width: int):
    """(G [n, w] view, w) placed at the end of dC's storage, beyond the rows [v_begin, v_begin + w)
    this chunk writes, for the widest w (a multiple of `multiple`, or the rest of the vocabulary)
    that fits there; (None, 0) when that is narrower than `min_width` (the workspace's width).

    Bytes [(v_begin + w)·row, end) of dC are unwritten while chunk [v_begin, v_begin + w) is
    computed, so G [n, w_alloc] fits there when  n·w_alloc·elt ≤ end − (v_begin + w)·row − 256.
    """
    g_elt = torch.finfo(g_dtype).bits // 8
    total = dc_bytes.numel()
    free = total - v_begin * dc_row_bytes - 256  # 256: room to align G's start
    w = free // (n * g_elt + dc_row_bytes) // multiple * multiple
    rest = n_valid - v_begin
    if w < min(min_width, rest):
        return None, 0
    w = min(w, rest)
    w_alloc = triton.cdiv(w, multiple) * multiple  # row stride: 16-byte aligned rows for TMA
    start = (total - n * w_alloc * g_elt) // 256 * 256
    if start < (v_begin + w) * dc_row_bytes:
        return None, 0
    g = dc_bytes[start:start + n * w_alloc * g_elt].view(g_dtype).view(n, w_alloc)
    return g, w


def _g_chunks(n: int, n_valid: int, c: torch.Tensor, dc: torch.Tensor | None, g_dtype: torch.dtype,
              block_v: int, tuning: Tuning):
    """(v_begin, G, w) for each chunk [v_begin, v_begin + w) of the vocabulary, in id order: G
    [n, ≥ w] a view in dC's unwritten rows while a chunk at least as wide as the workspace fits
    there (dc given, `tuning.g_inside_dc`), else the workspace of `width` columns (`_chunk_bytes`),
    allocated once. Counted in `counters` ("g_in_dc" / "g_in_workspace")."""
    g_elt = torch.finfo(g_dtype).bits // 8
    budget = _chunk_bytes(n, c.shape[1], c.shape[0], c.element_size(), tuning)
    width = _round_width(budget // max(n * g_elt, 1), n_valid, block_v, tuning.min_chunk_columns)
    # dC rows not yet written are free memory: while they can hold a chunk of G wider than the
    # workspace, G lives there (fewer chunks = fewer float32 dE read-modify-writes).
    use_dc = dc is not None and n > 0 and dc.is_contiguous() and tuning.g_inside_dc
    dc_bytes = dc.view(-1).view(torch.uint8) if use_dc else None
    workspace = None  # allocated once a chunk no longer fits inside dC
    v_begin = 0
    while v_begin < (n_valid if n > 0 else 0):
        g = None
        if dc_bytes is not None:
            g, w = _g_inside_dc(dc_bytes, v_begin, n_valid, n, c.shape[1] * c.element_size(), g_dtype, block_v,
                                width)
        counters["g_in_dc" if g is not None else "g_in_workspace"] += 1
        if g is None:
            if workspace is None:
                workspace = torch.empty(n, width, dtype=g_dtype, device=c.device)
            g, w = workspace, min(width, n_valid - v_begin)
        yield v_begin, g, w
        v_begin += w


def _backward(e, c, bias, t, lse, coef, n_valid: int, softcap: float, filter_eps: float, adaptive: bool,
              exact: bool, need_de: bool, need_dc: bool, need_db: bool, tuning: Tuning, sum_weights,
              inv_temp: float, de_fp32: bool, hopper: bool, dc_into: Optional[torch.Tensor]):
    """What both backward custom ops compute: (dE, dC, dbias), empty where not needed; with dc_into
    (float32, c's shape) each chunk's Gᵀ·E is added into its rows [v_begin, v_begin + w) by one
    float32-output product and dC is empty (no [V, D] tensor: G takes the workspace), or, with
    `tuning.dc_into_by_tokens` and no dC skipping, the chunks go over tokens
    (`_backward_by_tokens`)."""
    if dc_into is not None and need_dc and tuning.dc_into_by_tokens and not filter_eps > 0:
        de, db = _backward_by_tokens(e, c, bias, t, lse, coef, n_valid, softcap, exact, need_de, need_db, tuning,
                                     sum_weights, inv_temp, de_fp32, hopper, dc_into)
        return de, c.new_empty(0), db
    n, d = e.shape
    dev = e.device
    de_acc = torch.empty(n, d, dtype=torch.float32, device=dev) if need_de else None
    de_written = False  # the first chunk's product overwrites the accumulator (no zero fill, no read)
    into = need_dc and dc_into is not None
    dc = torch.empty_like(c) if need_dc and not into else c.new_empty(0)
    dc_out = dc_into if into else dc  # where each chunk's Gᵀ·E goes (accumulated into dc_into)
    if into:
        counters["dc_into_direct"] += 1
    db = torch.zeros(c.shape[0], dtype=torch.float32, device=dev) if need_db else None
    # flags are computed whenever filter_eps > 0 (the adaptive policy measures them even when it
    # runs dense); tiles are skipped when `filtering`.
    flagging = filter_eps > 0 and need_dc and n > 0 and n_valid > 0
    policy_key = (dev, n_valid, d)  # one classifier (shard): the token count may vary per call
    filtering = flagging
    if flagging and adaptive:
        filtering, flagging = skip_policy.decide(policy_key, tuning)

    g_dtype = _g_dtype(e.dtype)
    block_n, block_v, block_d = _grad_config(e.dtype, tuning)[:3]
    flags = torch.ones(triton.cdiv(n, block_n), triton.cdiv(n_valid, block_v) if flagging else 1, dtype=torch.int8,
                       device=dev)
    hopper_grad = hopper and not flagging and sum_weights is None
    operands = tma_operands(e, c, block_n, block_v, block_d, tuning)  # once for every chunk

    for v_begin, g, w in _g_chunks(n, n_valid, c, dc if need_dc and not into else None, g_dtype, block_v, tuning):
        chunk_flags = flags[:, v_begin // block_v:] if flagging else flags
        _logit_grad(g, e, c, bias, t, lse, coef, n_valid, v_begin, w, chunk_flags, softcap, filter_eps, flagging,
                    exact, tuning, sum_weights, inv_temp, hopper_grad, operands)
        g_chunk = g[:, :w]
        if need_de:  # dE (+)= G · C_chunk, dense (skipping tiles here would bias dE coherently)
            float32_product(de_acc, g_chunk, c[v_begin:v_begin + w], exact, de_written, tuning)
            de_written = True
        if need_dc and filtering:  # dC_chunk (+)= Gᵀ · E, skipping tiles whose softmax is negligible
            counters["sparse_dc"] += 1
            list_v, count_v = tile_lists(chunk_flags[:, : triton.cdiv(w, block_v)].T)
            sparse_matmul(g, (1, g.stride(0)), e, e.stride(), dc_out[v_begin:], dc_out.stride(), w, d, n, tuning,
                          list_v, count_v, block_v, block_n, accumulate=into, exact=exact)
        elif into:  # dc_into[chunk] += Gᵀ · E: one float32-output product, beta = 1
            float32_product(dc_into[v_begin:v_begin + w], g_chunk.T, e, exact, True, tuning)
        elif need_dc:  # dC_chunk = Gᵀ · E, complete over tokens: one GEMM straight into dC
            if dev.type == "cuda" and g_dtype == e.dtype:
                torch.mm(g_chunk.T, e, out=dc[v_begin:v_begin + w])
            else:
                sparse_matmul(g, (1, g.stride(0)), e, e.stride(), dc[v_begin:], dc.stride(), w, d, n, tuning,
                              exact=exact)
        if need_db:
            db[v_begin:v_begin + w] += g_chunk.sum(dim=0, dtype=torch.float32)

    if need_dc and not into:  # padding rows (after the loop: G may have lived in them); all rows without tokens
        dc[n_valid if n > 0 else 0:].zero_()
    if flagging and adaptive:
        skip_policy.record(policy_key, flags.sum(dtype=torch.int32), flags.numel())
    if need_de:
        if not de_written:  # no vocabulary chunk: dE is 0
            de_acc.zero_()
        de = de_acc if e.dtype == torch.float32 or de_fp32 else narrow_in_place(de_acc, e.dtype)
    else:
        de = e.new_empty(0)
    return de, dc, (db.to(bias.dtype) if need_db else e.new_empty(0))


def _g_dtype(dtype: torch.dtype) -> torch.dtype:
    """G's dtype: the input dtype, as the unfused layer's logit gradient would be, except for
    float16, where G_ij ≈ p_ij / N is often below float16's range (6e-8) and would flush to zero."""
    return torch.float32 if dtype == torch.float16 else dtype


def _logit_grad(g, e, c, bias, t, lse, coef, n_valid: int, v_begin: int, w: int, flags, softcap: float,
                filter_eps: float, flagging: bool, exact: bool, tuning: Tuning, sum_weights, inv_temp: float,
                hopper_grad: bool, operands=None) -> None:
    """g[:, :w] = G of e's rows [N, D] over vocabulary columns [v_begin, v_begin + w) (lse, coef, t
    of those rows; coef contiguous [3 or 5, N]): the Hopper kernel where `hopper_grad` and it runs,
    else `logit_grad_kernel` (flags [N tiles, ≥ w / BLOCK_V] written with `flagging`; operands:
    `tma_operands(e, c, ...)` if already made)."""
    if hopper_grad:
        from . import hopper as hopper_kernels

        if hopper_kernels.logit_grad_chunk(e, c[v_begin:v_begin + w], w, g, lse, coef, t, v_begin, inv_temp):
            counters["hopper_grad"] += 1
            return
    n, d = e.shape
    block_n, block_v, block_d, warps, stages = _grad_config(e.dtype, tuning)
    e_arg, c_arg, tma = operands or tma_operands(e, c, block_n, block_v, block_d, tuning)
    logit_grad_kernel[(triton.cdiv(w, block_v) * triton.cdiv(n, block_n),)](
        e_arg, c_arg, c if bias is None else bias, t, lse, coef, g, flags,
        n, d, n_valid, v_begin, w,
        e.stride(0), e.stride(1), c.stride(0), c.stride(1), g.stride(0), flags.stride(0),
        softcap if softcap > 0 else 1.0, filter_eps, lse if sum_weights is None else sum_weights, inv_temp,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0,
        FILTER=flagging, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        EVEN_D=d % block_d == 0, DOT_PRECISION=dot_precision(e.dtype, exact), USE_TMA=tma, GROUP_V=tuning.group_v,
        HAS_SUMW=sum_weights is not None, HAS_TEMP=inv_temp != 1.0, HAS_PZ=coef.shape[0] == 5,
        num_warps=warps, num_stages=stages,
    )


def _token_chunks(n: int, width: int, g_dtype: torch.dtype, de: torch.Tensor | None, workspace_rows: int,
                  multiple: int, device: torch.device):
    """(r0, r1, G [r1 − r0, width] view) for each token chunk, in order. While dE (given, contiguous)
    has room past the chunk's rows for a chunk at least `workspace_rows` tall, G lives there: chunk
    [r0, r0 + m) writes dE rows [r0, r0 + m), so its bytes from (r0 + m)·row on are free, and G
    fits for m·(width·g + row) ≤ end − r0·row − 256 (g, row: bytes of a G element and a dE row).
    Then the workspace of `workspace_rows` rows takes the rest. Counted in `counters`
    ("g_in_de" / "g_in_workspace")."""
    g_elt = torch.finfo(g_dtype).bits // 8
    storage = de.view(-1).view(torch.uint8) if de is not None and de.numel() else None
    row = de.shape[1] * de.element_size() if storage is not None else 0
    workspace = None
    r0 = 0
    while r0 < n:
        g, m = None, 0
        if storage is not None:
            total = storage.numel()
            m = min(n - r0, (total - r0 * row - 256) // (width * g_elt + row) // multiple * multiple)
            start = (total - m * width * g_elt) // 256 * 256
            if m >= min(workspace_rows, n - r0) and m > 0 and start >= (r0 + m) * row:
                g = storage[start:start + m * width * g_elt].view(g_dtype).view(m, width)
        counters["g_in_de" if g is not None else "g_in_workspace"] += 1
        if g is None:
            if workspace is None:
                workspace = torch.empty(workspace_rows, width, dtype=g_dtype, device=device)
            m = min(workspace_rows, n - r0)
            g = workspace[:m]
        yield r0, r0 + m, g
        r0 += m


def _backward_by_tokens(e, c, bias, t, lse, coef, n_valid: int, softcap: float, exact: bool, need_de: bool,
                        need_db: bool, tuning: Tuning, sum_weights, inv_temp: float, de_fp32: bool, hopper: bool,
                        dc_into: torch.Tensor):
    """(dE, dbias) of `_backward` with dc_into, in token chunks [r0, r1): each forms G [r1 − r0,
    n_valid] over the whole vocabulary, so dE[r0:r1] = G·C_valid is complete (one product, rounded
    once; no float32 [N, D] accumulator) and dc_into[:n_valid] += Gᵀ·E[r0:r1] (float32, beta = 1).
    G lives in dE's unwritten rows while it fits there (`_token_chunks`), then in a workspace of as
    many rows as `_chunk_bytes` holds, at least the G elements of a `tuning.min_chunk_columns`-wide
    vocabulary chunk."""
    n, d = e.shape
    dev = e.device
    de_dtype = torch.float32 if de_fp32 else e.dtype
    de = torch.empty(n, d, dtype=de_dtype, device=dev) if need_de else e.new_empty(0)
    db = torch.zeros(c.shape[0], dtype=torch.float32, device=dev) if need_db else None
    if n == 0 or n_valid == 0:
        return (de.zero_() if need_de else de), (db.to(bias.dtype) if need_db else e.new_empty(0))
    g_dtype = _g_dtype(e.dtype)
    block_n = _grad_config(e.dtype, tuning)[0]
    width = triton.cdiv(n_valid, 8) * 8  # 16-byte aligned rows of G for TMA
    budget = _chunk_bytes(n, d, c.shape[0], c.element_size(), tuning)
    floor = triton.cdiv(n * min(tuning.min_chunk_columns, n_valid), n_valid)  # a minimum chunk's G elements
    rows = _round_width(budget // (width * torch.finfo(g_dtype).bits // 8), n, block_n, floor)
    flags = torch.ones(1, 1, dtype=torch.int8, device=dev)
    c_valid = c[:n_valid]
    counters["dc_into_by_tokens"] += 1
    for r0, r1, g in _token_chunks(n, width, g_dtype, de if need_de and tuning.g_inside_dc else None, rows,
                                   block_n, dev):
        _logit_grad(g, e[r0:r1], c, bias, t[r0:r1], lse[r0:r1], coef[:, r0:r1].contiguous(), n_valid, 0, n_valid,
                    flags, softcap, 0.0, False, exact, tuning, sum_weights, inv_temp,
                    hopper and sum_weights is None)
        g_valid = g[:, :n_valid]
        if need_de and de_dtype == torch.float32:
            float32_product(de[r0:r1], g_valid, c_valid, exact, False, tuning)
        elif need_de and g_dtype == e.dtype and dev.type == "cuda":  # cuBLAS: float32 inside, rounded once
            torch.mm(g_valid, c_valid, out=de[r0:r1])
        elif need_de:  # a float32 product, then rounded
            rows_fp32 = torch.empty(r1 - r0, d, device=dev)
            float32_product(rows_fp32, g_valid, c_valid, exact, False, tuning)
            de[r0:r1].copy_(rows_fp32)
        float32_product(dc_into[:n_valid], g_valid.T, e[r0:r1], exact, True, tuning)
        if need_db:
            db[:n_valid] += g_valid.sum(dim=0, dtype=torch.float32)
    return de, (db.to(bias.dtype) if need_db else e.new_empty(0))


@torch.library.custom_op("vocab_parallel_cce::triton_backward", mutates_args=())
def _backward_op(e: torch.Tensor, c: torch.Tensor, bias: Optional[torch.Tensor], t: torch.Tensor,
                 lse: torch.Tensor, coef: torch.Tensor, n_valid: int, softcap: float, filter_eps: float,
                 adaptive: bool, exact: bool, need_de: bool, need_dc: bool, need_db: bool, tuning_code: str,
                 sum_weights: Optional[torch.Tensor], inv_temp: float, de_fp32: bool = False,
                 hopper: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dE, dC, dbias) (empty where not needed); coef [3, N] = (a, b, u), or [5, N] with the
    entropy's (q, pz); softcap 0 = none; filter_eps 0 = no skipping; tuning_code: Tuning.encode();
    sum_weights [n_valid] float32: the u term is u·w_j; inv_temp 1 = no temperature; de_fp32: dE
    is the float32 accumulator itself, not narrowed (a cross-rank sum follows); hopper: the
    Hopper kernel may recompute the chunks of G (`Plan.hopper`), where no tile is flagged."""
    return _backward(e, c, bias, t, lse, coef, n_valid, softcap, filter_eps, adaptive, exact, need_de, need_dc,
                     need_db, Tuning.decode(tuning_code), sum_weights, inv_temp, de_fp32, hopper, None)


@_backward_op.register_fake
def _(e, c, bias, t, lse, coef, n_valid, softcap, filter_eps, adaptive, exact, need_de, need_dc, need_db,
      tuning_code, sum_weights, inv_temp, de_fp32=False, hopper=False):
    return (torch.empty_like(e, dtype=torch.float32 if de_fp32 else e.dtype) if need_de else e.new_empty(0),
            torch.empty_like(c) if need_dc else c.new_empty(0),
            bias.new_empty(bias.shape) if need_db else e.new_empty(0))


@torch.library.custom_op("vocab_parallel_cce::triton_backward_into", mutates_args=("dc_into",))
def _backward_into_op(e: torch.Tensor, c: torch.Tensor, bias: Optional[torch.Tensor], t: torch.Tensor,
                      lse: torch.Tensor, coef: torch.Tensor, dc_into: torch.Tensor, n_valid: int, softcap: float,
                      filter_eps: float, adaptive: bool, exact: bool, need_de: bool, need_db: bool,
                      tuning_code: str, sum_weights: Optional[torch.Tensor], inv_temp: float, de_fp32: bool = False,
                      hopper: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`triton_backward` with c's gradient ADDED into dc_into (float32, c's shape, contiguous):
    rows [0, n_valid) each get their chunk's Gᵀ·E from one float32-output product (beta = 1), rows
    ≥ n_valid nothing; no dC tensor is formed. Returns (dE, dbias), empty where not needed."""
    de, _, db = _backward(e, c, bias, t, lse, coef, n_valid, softcap, filter_eps, adaptive, exact, need_de, True,
                          need_db, Tuning.decode(tuning_code), sum_weights, inv_temp, de_fp32, hopper, dc_into)
    return de, db


@_backward_into_op.register_fake
def _(e, c, bias, t, lse, coef, dc_into, n_valid, softcap, filter_eps, adaptive, exact, need_de, need_db,
      tuning_code, sum_weights, inv_temp, de_fp32=False, hopper=False):
    return (torch.empty_like(e, dtype=torch.float32 if de_fp32 else e.dtype) if need_de else e.new_empty(0),
            bias.new_empty(bias.shape) if need_db else e.new_empty(0))


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "linear_cross_entropy: the Triton backend's gradients cannot be differentiated again (no double "
        "backward through its kernels); for gradients that are differentiated again pass impl='torch', "
        "grad_in_forward=False")


# What a second differentiation through the memory-first backward meets: this error, not PyTorch's
# "no autograd formula" (the first backward under create_graph=True still runs). A custom op that
# mutates an argument takes no autograd formula, so `backward` calls `triton_backward_into` only
# with grad mode off.
_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def forward_stats(e, c, bias, t_local, plan: Plan):
    """See protocol.py. Returns this shard's float32 statistics `plan.stat_names`, [N] each."""
    out = _forward_stats_op(e, c, bias, t_local, plan.n_valid, plan.softcap or 0.0, plan.need_sum,
                            plan.exact, plan.tuning.encode(), float32_sum_weights(plan),
                            1.0 / plan.temperature, plan.need_entropy, plan.need_argmax, plan.hopper)
    return tuple(out)


def backward(e, c, bias, t_local, lse, coef_p, coef_t, coef_u, plan: Plan,
             need_de: bool, need_dc: bool, need_db: bool, coef_q=None, mean_z=None, de_fp32: bool = False,
             dc_into=None):
    """See protocol.py. Skips dC tiles per plan.filter_eps (None, e.g. with label smoothing, whose
    u ≠ 0 makes every tile matter: never). de_fp32: dE is the float32 accumulator, not narrowed.
    dc_into: c's gradient is added into it and None returned for dC; a float32 target takes each
    chunk's product straight (`triton_backward_into`), any other target, or grad mode on (a
    backward with create_graph=True: the op that mutates has no double-backward error), gets dC
    formed and added."""
    rows = [coef_p, coef_t, coef_u] + ([] if coef_q is None else [coef_q, mean_z])
    coef = torch.stack(rows).float().contiguous()
    args = (plan.softcap or 0.0, plan.filter_eps or 0.0, plan.adaptive_filter, plan.exact)
    more = (plan.tuning.encode(), float32_sum_weights(plan), 1.0 / plan.temperature, de_fp32, plan.hopper)
    lse = lse.float().contiguous()
    into = dc_into if need_dc else None
    if into is not None and into.dtype == torch.float32 and not torch.is_grad_enabled():
        de, db = _backward_into_op(e, c, bias, t_local, lse, coef, into, plan.n_valid, *args, need_de, need_db,
                                   *more)
        return (de if need_de else None, None, db if need_db else None)
    de, dc, db = _backward_op(e, c, bias, t_local, lse, coef, plan.n_valid, *args, need_de, need_dc, need_db, *more)
    if into is not None:
        into.add_(dc)
    return (de if need_de else None, dc if need_dc and into is None else None, db if need_db else None)
