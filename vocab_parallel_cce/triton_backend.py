"""Triton backend: launches the kernels of triton_kernels.py (contract: backend.py).

Forward: one launch over (vocabulary split, token tile) → [3, splits, N] partials, reduced with a
logsumexp over the splits (a few floats per token).

Operands reach the kernels through TMA tensor descriptors on Hopper and newer (and in the
interpreter) when their rows are 16-byte aligned, through masked pointer loads otherwise
(`Tuning(use_tma=False)` forces pointers). Measured on an H200: forward 18.4 → 14.6 ms,
logit-gradient kernel 20.4 → 18.4 ms at (8192, 4096, 128256) bf16.

Backward, per chunk of vocabulary rows (G lives in dC's not-yet-written rows while it fits there,
`_g_inside_dc`; then in a workspace of `width` columns from `_chunk_bytes`, at least
`tuning.min_chunk_columns`):
  1. `logit_grad_kernel` recomputes the chunk's logits and writes G and a per-tile keep flag;
  2. dE += G · C_chunk into a float32 accumulator, always dense (cuBLAS `addmm(out_dtype=float32)`
     on CUDA, the Triton kernel elsewhere); at the end it is narrowed to the input dtype IN PLACE
     (or handed over in float32 when a cross-rank sum follows: `de_fp32`, autograd.py);
  3. dC_chunk = Gᵀ · E, complete over all tokens, stored straight in c's dtype (no fp32 dC): one
     cuBLAS GEMM, or, when skipping, `sparse_matmul_kernel` visiting only the kept token tiles.
Skipping (dC only; dE is never filtered, DESIGN.md) is adaptive under filter_eps "auto"
(`skip_policy`). The vocabulary is visited in id order.

The gradient-in-forward mode (autograd.LossWithGradInForward) uses `logits_and_stats`,
`grad_from_logits`, `product_fp32` and `scale_in_place`.

Both entry points of the default path are registered as torch custom ops, opaque to torch.compile
and free of host synchronisation (no .item()/.nonzero()), so they also run under CUDA-graph
capture. Custom ops take scalars only: the plan's fields cross as scalars, its Tuning as a string (`Tuning.encode`).
`counters` counts the paths taken (TMA or pointer loads, where G lived, block-sparse dC products,
skip measurements), for tests and benchmarks; `counters.clear()` resets it.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Optional

import torch
import triton

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4
    TensorDescriptor = None

from . import triton_gemm as G
from . import stats
from .distributed import narrow_in_place as _narrow_in_place
from . import triton_kernels as K
from .plan import Plan
from .tuning import Tuning

# The backward's working memory beyond dE and dC is held to tuning.workspace_fraction (9%) of
# their size: the float32 dE surplus (N·D·2 bytes for 16-bit inputs), the logit-gradient chunk,
# and small buffers. Wider chunks = fewer float32 dE read-modify-writes (N·D·8 bytes each); chunks
# narrower than tuning.min_chunk_columns make the backward launch-bound (measured on an H200: 501
# chunks of 256 columns at N=16384 took 208 ms, chunks of 1024 took 136 ms).
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 8 << 20, 512 << 20

counters: Counter = Counter()  # paths taken; see the module docstring


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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _forward_config(dtype: torch.dtype, tuning: Tuning) -> tuple:
    """(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages); tuning.forward_block overrides."""
    if tuning.forward_block is not None:
        return tuning.forward_block
    if _interpreting():
        return (16, 16, 16, 1, 1)
    return (128, 64, 32, 8, 3) if dtype == torch.float32 else (128, 256, 64, 8, 3)


def _grad_config(dtype: torch.dtype, tuning: Tuning) -> tuple:
    """Logit-gradient tile = keep-flag granularity: (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages)."""
    if tuning.grad_block is not None:
        return tuning.grad_block
    if _interpreting():
        return (16, 16, 16, 1, 1)
    return (128, 128, 32, 8, 3) if dtype == torch.float32 else (128, 128, 64, 8, 4)


def _matmul_config(dtype: torch.dtype, listed: bool, tuning: Tuning) -> tuple:
    """(BLOCK_M, BLOCK_NN, BLOCK_K, GROUP_M, warps, stages); BLOCK_M, BLOCK_K must divide 128.

    The block-sparse (listed) product uses BLOCK_K = 128 (one list entry per step) and wider
    tiles: on an H200 at 20% kept tiles 0.13 ms against 0.17 ms for the dense config (D = 4096).
    tuning.matmul_block overrides both.
    """
    if tuning.matmul_block is not None:
        return tuning.matmul_block
    if _interpreting():
        return (16, 16, 16, 4, 1, 1)
    if dtype == torch.float32:
        return (128, 128, 32, 8, 8, 3)
    return (128, 256, 128, 8, 8, 2) if listed else (128, 128, 64, 8, 8, 3)


def _dot_precision(dtype: torch.dtype, exact: bool) -> str:
    """float32 dots use TF32 only where torch's own float32 matmuls would (and never when exact)."""
    tf32 = dtype == torch.float32 and not exact and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tma_enabled(device: torch.device, tuning: Tuning) -> bool:
    """TMA descriptors: Hopper or newer (or the interpreter, which emulates them), unless
    tuning.use_tma is off."""
    if TensorDescriptor is None or not tuning.use_tma:
        return False
    if _interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _descriptor(t: torch.Tensor, shape, strides, block):
    """A TMA descriptor of the row-major 2-D view (shape, strides) of t's storage, or None when
    the layout does not allow one (unit last stride, 16-byte aligned base and row stride)."""
    if strides[1] != 1 or (strides[0] * t.element_size()) % 16 or t.data_ptr() % 16 or min(shape) <= 0:
        return None
    return TensorDescriptor(t, list(shape), list(strides), list(block))


def _tma_operands(e: torch.Tensor, c: torch.Tensor, block_n: int, block_v: int, block_d: int,
                  tuning: Tuning):
    """(E, C, True) as TMA descriptors (blocks [block_n, block_d], [block_v, block_d]) where
    possible, else (e, c, False). Counted in `counters` ("tma" / "pointers")."""
    e_desc = c_desc = None
    if _tma_enabled(e.device, tuning):
        e_desc = _descriptor(e, e.shape, e.stride(), (block_n, block_d))
        c_desc = _descriptor(c, c.shape, c.stride(), (block_v, block_d))
    tma = e_desc is not None and c_desc is not None
    counters["tma" if tma else "pointers"] += 1
    return (e_desc, c_desc, True) if tma else (e, c, False)


@torch.library.custom_op("vocab_parallel_cce::triton_forward_stats", mutates_args=())
def _forward_stats_op(e: torch.Tensor, c: torch.Tensor, bias: Optional[torch.Tensor], t: torch.Tensor,
                      n_valid: int, softcap: float, need_sum: bool, exact: bool, tuning_code: str,
                      sum_weights: Optional[torch.Tensor], inv_temp: float, need_pz: bool, need_argmax: bool
                      ) -> list[torch.Tensor]:
    """The shard's statistics, k float32 [N], `stats.names(need_pz, need_argmax)` (lse, x, s,
    then pz, then max, argmax); softcap 0 = none; sum_weights [n_valid] float32: s = Σ_j w_j z_j;
    inv_temp 1 = no temperature; tuning_code: Tuning.encode()."""
    tuning = Tuning.decode(tuning_code)
    n, d = e.shape
    names = stats.names(need_pz, need_argmax)
    block_n, block_v, block_d, warps, stages = _forward_config(e.dtype, tuning)
    n_tiles, v_tiles = triton.cdiv(n, block_n), triton.cdiv(n_valid, block_v)
    if n == 0 or n_valid == 0:
        return stats.of_no_rows(names, n, e, torch.float32)
    e_arg, c_arg, tma = _tma_operands(e, c, block_n, block_v, block_d, tuning)
    # Enough programs for ~4 waves; each walks `tiles_per_split` consecutive vocabulary tiles.
    splits = tuning.forward_splits or max(1, min(v_tiles, triton.cdiv(4 * _num_sms(e.device), n_tiles), 128))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)
    # rows 0-2 always; the kernel writes rows 3 (pz) and 4, 5 (max, argmax) only when asked
    out = torch.empty(3 if len(names) == 3 else 6, splits, n, dtype=torch.float32, device=e.device)
    K.forward_kernel[(splits, n_tiles)](
        e_arg, c_arg, c if bias is None else bias, t, out, n, d, n_valid, tiles_per_split,
        e.stride(0), e.stride(1), c.stride(0), c.stride(1), out.stride(0), out.stride(1),
        softcap if softcap > 0 else 1.0, out if sum_weights is None else sum_weights, inv_temp,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, NEED_SUM=need_sum,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, EVEN_D=d % block_d == 0,
        DOT_PRECISION=_dot_precision(e.dtype, exact), USE_TMA=tma,
        HAS_SUMW=sum_weights is not None, HAS_TEMP=inv_temp != 1.0, NEED_PZ=need_pz, NEED_ARGMAX=need_argmax,
        num_warps=warps, num_stages=stages,
    )
    if len(names) == 3:
        return [torch.logsumexp(out[0], dim=0), out[1].sum(0), out[2].sum(0)]
    # rows of `out` in use, by slices (a list index would copy an index tensor from the host)
    parts = [out[0:3]] + ([out[3:4]] if need_pz else []) + ([out[4:6]] if need_argmax else [])
    return list(stats.merge(torch.cat(parts).transpose(0, 1), names))  # the splits are disjoint vocabulary parts


@_forward_stats_op.register_fake
def _(e, c, bias, t, n_valid, softcap, need_sum, exact, tuning_code, sum_weights, inv_temp, need_pz, need_argmax):
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


def _tile_lists(flags: torch.Tensor):
    """Per row of `flags` [R, T]: the indices of its non-zero tiles first, and their count."""
    order = torch.argsort((flags == 0).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return order.contiguous(), flags.sum(dim=1, dtype=torch.int32)


def _sparse_matmul(a, a_strides, b, b_strides, out, out_strides, m, nn, k, tuning: Tuning, lists=None,
                   counts=None, list_tile_m=1, list_tile_k=1, accumulate=False, exact=False):
    """OUT (+)= A·B with the Triton kernel; dense when `lists` is None."""
    block_m, block_nn, block_k, group_m, warps, stages = _matmul_config(a.dtype, lists is not None, tuning)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(nn, block_nn),)
    dense = lists is None
    a_arg, b_arg, tma, a_k_major = a, b, False, a_strides[0] == 1 and a_strides[1] != 1
    if _tma_enabled(a.device, tuning):
        if a_k_major:  # A = Gᵀ: describe G [k, m]
            a_desc = _descriptor(a, (k, m), (a_strides[1], 1), (block_k, block_m))
        else:
            a_desc = _descriptor(a, (m, k), a_strides, (block_m, block_k))
        b_desc = _descriptor(b, (k, nn), b_strides, (block_k, block_nn))
        if a_desc is not None and b_desc is not None:
            a_arg, b_arg, tma = a_desc, b_desc, True
    K.sparse_matmul_kernel[grid](
        a_arg, b_arg, out, out if dense else lists, out if dense else counts, m, nn, k, list_tile_m, list_tile_k,
        *a_strides, *b_strides, *out_strides, 0 if dense else lists.stride(0), ACCUMULATE=accumulate,
        DENSE=dense, BLOCK_M=block_m, BLOCK_NN=block_nn, BLOCK_K=block_k, GROUP_M=group_m,
        DOT_PRECISION=_dot_precision(a.dtype, exact), USE_TMA=tma, A_K_MAJOR=a_k_major,
        num_warps=warps, num_stages=stages,
    )


_CUBLAS_FP32_OUT: dict = {}  # device → whether torch.addmm(..., out_dtype=float32) runs there


def _product_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, exact: bool, accumulate: bool,
                  tuning: Tuning) -> None:
    """out [M, NN] float32 (+)= a [M, K] · b [K, NN], in float32 without a temporary.

    cuBLAS where it computes exactly that: `addmm(..., out_dtype=float32)` for 16-bit inputs where
    torch provides it (CUDA), SGEMM for float32 inputs (unless exact mode meets user-enabled TF32);
    the Triton kernel otherwise. `accumulate=False` overwrites `out` (beta = 0: its old contents,
    even NaN, are ignored).
    """
    beta = 1 if accumulate else 0
    if a.dtype == b.dtype == torch.float32:
        if out.device.type == "cuda" and (not exact or torch.get_float32_matmul_precision() == "highest"):
            torch.addmm(out, a, b, beta=beta, out=out)
            return
    elif a.dtype == b.dtype and _CUBLAS_FP32_OUT.get(out.device, True):
        try:
            torch.addmm(out, a, b, beta=beta, out_dtype=torch.float32, out=out)
            _CUBLAS_FP32_OUT[out.device] = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _CUBLAS_FP32_OUT[out.device] = False
    _sparse_matmul(a, a.stride(), b, b.stride(), out, out.stride(), a.shape[0], b.shape[1], a.shape[1], tuning,
                   accumulate=accumulate, exact=exact)


def product_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, plan: Plan, accumulate: bool) -> None:
    """See backend.py: out float32 (+)= a · b (IEEE float32 dots in exact mode)."""
    _product_fp32(out, a, b, plan.exact, accumulate, plan.tuning)


class TileSkipPolicy:
    """Adaptive dC tile skipping (filter_eps "auto"): skip when it pays, judged from the fraction
    of kept 128×128 tiles measured in an earlier backward with the same classifier shape (device,
    vocabulary rows, D; not the token count, which varies from batch to batch).

    Skipping pays on trained-like logits (few tiles kept) and loses on dense ones (a nearly
    untrained model), where the block-sparse kernel is slower than cuBLAS. The fraction travels
    to the host through a pinned buffer and is read once its CUDA event has completed, so no
    call ever waits for the GPU. The first call of a classifier shape runs dense and measures;
    while dense, the (cheap but not free) measurement is repeated every
    `tuning.skip_remeasure_every` calls. Skips while the fraction is below
    `tuning.skip_keep_threshold` (H200: faster at 34% kept at (8192, 4096, 128256), slower at 54%).
    """

    def __init__(self):
        self.state: dict = {}  # key → {"fraction", "pinned", "event", "since"}

    def reset(self) -> None:
        """Forget every measurement: the next backward of each classifier shape runs dense."""
        self.state.clear()

    def decide(self, key, tuning: Tuning) -> tuple[bool, bool]:
        """(skip, measure) for the next backward of `key`."""
        st = self.state.get(key)
        if st is None:
            return False, True
        capturing = st["event"] is not None and torch.cuda.is_current_stream_capturing()
        if st["event"] is not None and not capturing and st["event"].query():  # no query while captured
            st["fraction"], st["event"] = float(st["pinned"]), None
        st["since"] += 1
        skip = st["fraction"] is not None and st["fraction"] < tuning.skip_keep_threshold
        return skip, skip or st["since"] >= tuning.skip_remeasure_every

    def record(self, key, kept: torch.Tensor, total: int) -> None:
        """kept: device scalar, number of kept tiles out of `total`."""
        counters["skip_measurements"] += 1
        st = self.state.setdefault(key, {"fraction": None, "pinned": None, "event": None, "since": 0})
        if kept.device.type != "cuda":
            st["fraction"], st["since"] = float(kept) / max(total, 1), 0
            return
        if st["event"] is not None or torch.cuda.is_current_stream_capturing():
            return  # the previous measurement is still in flight (or we are being captured)
        if st["pinned"] is None:
            st["pinned"] = torch.empty((), dtype=torch.float32, pin_memory=True)
        st["pinned"].copy_(kept.float() / max(total, 1), non_blocking=True)
        st["event"] = torch.cuda.Event()
        st["event"].record()
        st["since"] = 0


skip_policy = TileSkipPolicy()  # process-wide: measurements carry over from call to call


@torch.library.custom_op("vocab_parallel_cce::triton_backward", mutates_args=())
def _backward_op(e: torch.Tensor, c: torch.Tensor, bias: Optional[torch.Tensor], t: torch.Tensor,
                 lse: torch.Tensor, coef: torch.Tensor, n_valid: int, softcap: float, filter_eps: float,
                 adaptive: bool, exact: bool, need_de: bool, need_dc: bool, need_db: bool, tuning_code: str,
                 sum_weights: Optional[torch.Tensor], inv_temp: float, de_fp32: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dE, dC, dbias) (empty where not needed); coef [3, N] = (a, b, u), or [5, N] with the
    entropy's (q, pz); softcap 0 = none; filter_eps 0 = no skipping; tuning_code: Tuning.encode();
    sum_weights [n_valid] float32: the u term is u·w_j; inv_temp 1 = no temperature; de_fp32: dE
    is the float32 accumulator itself, not narrowed (a cross-rank sum follows)."""
    tuning = Tuning.decode(tuning_code)
    n, d = e.shape
    v_all = c.shape[0]
    dev = e.device
    de_acc = torch.zeros(n, d, dtype=torch.float32, device=dev) if need_de else None
    dc = torch.empty_like(c) if need_dc else c.new_empty(0)
    db = torch.zeros(v_all, dtype=torch.float32, device=dev) if need_db else None
    # flags are computed whenever filter_eps > 0 (the adaptive policy measures them even when it
    # runs dense); tiles are skipped when `filtering`.
    flagging = filter_eps > 0 and need_dc and n > 0 and n_valid > 0
    policy_key = (dev, n_valid, d)  # one classifier (shard): the token count may vary per call
    filtering = flagging
    if flagging and adaptive:
        filtering, flagging = skip_policy.decide(policy_key, tuning)

    # G is stored in the input dtype, as the unfused layer's logit gradient would be, except for
    # float16: G_ij ≈ p_ij / N is often below float16's range (6e-8) and would flush to zero.
    g_dtype = torch.float32 if e.dtype == torch.float16 else e.dtype
    g_elt = torch.finfo(g_dtype).bits // 8
    block_n, block_v, block_d, warps, stages = _grad_config(e.dtype, tuning)
    budget = _chunk_bytes(n, d, v_all, c.element_size(), tuning)
    width = _round_width(budget // max(n * g_elt, 1), n_valid, block_v, tuning.min_chunk_columns)
    g_buffer = None  # the workspace chunk, allocated once a chunk no longer fits inside dC
    # dC rows not yet written are free memory: while they can hold a chunk of G wider than the
    # workspace, G lives there (fewer chunks = fewer float32 dE read-modify-writes).
    use_dc = need_dc and n > 0 and dc.is_contiguous() and tuning.g_inside_dc
    dc_bytes = dc.view(-1).view(torch.uint8) if use_dc else None
    n_tiles = triton.cdiv(n, block_n)
    flags = torch.ones(n_tiles, triton.cdiv(n_valid, block_v) if flagging else 1, dtype=torch.int8, device=dev)
    e_arg, c_arg, tma = _tma_operands(e, c, block_n, block_v, block_d, tuning)
    precision = _dot_precision(e.dtype, exact)

    v_begin = 0
    while v_begin < (n_valid if n > 0 else 0):
        g = None
        if dc_bytes is not None:
            g, w = _g_inside_dc(dc_bytes, v_begin, n_valid, n, d * c.element_size(), g_dtype, block_v, width)
        counters["g_in_dc" if g is not None else "g_in_workspace"] += 1
        if g is None:
            if g_buffer is None:
                g_buffer = torch.empty(n, width, dtype=g_dtype, device=dev)
            g, w = g_buffer, min(width, n_valid - v_begin)
        chunk_flags = flags[:, v_begin // block_v:] if flagging else flags
        K.logit_grad_kernel[(triton.cdiv(w, block_v) * n_tiles,)](
            e_arg, c_arg, c if bias is None else bias, t, lse, coef, g, chunk_flags,
            n, d, n_valid, v_begin, w,
            e.stride(0), e.stride(1), c.stride(0), c.stride(1), g.stride(0), flags.stride(0),
            softcap if softcap > 0 else 1.0, filter_eps, lse if sum_weights is None else sum_weights, inv_temp,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0,
            FILTER=flagging, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
            EVEN_D=d % block_d == 0, DOT_PRECISION=precision, USE_TMA=tma, GROUP_V=tuning.group_v,
            HAS_SUMW=sum_weights is not None, HAS_TEMP=inv_temp != 1.0, HAS_PZ=coef.shape[0] == 5,
            num_warps=warps, num_stages=stages,
        )
        g_chunk = g[:, :w]
        if need_de:  # dE += G · C_chunk, dense (skipping tiles here would bias dE coherently)
            _product_fp32(de_acc, g_chunk, c[v_begin:v_begin + w], exact, True, tuning)
        if need_dc and filtering:  # dC_chunk = Gᵀ · E, skipping tiles whose softmax is negligible
            counters["sparse_dc"] += 1
            list_v, count_v = _tile_lists(chunk_flags[:, : triton.cdiv(w, block_v)].T)
            _sparse_matmul(g, (1, g.stride(0)), e, e.stride(), dc[v_begin:], dc.stride(), w, d, n, tuning,
                           list_v, count_v, block_v, block_n, exact=exact)
        elif need_dc:  # dC_chunk = Gᵀ · E, complete over tokens: one GEMM straight into dC
            if dev.type == "cuda" and g_dtype == e.dtype:
                torch.mm(g_chunk.T, e, out=dc[v_begin:v_begin + w])
            else:
                _sparse_matmul(g, (1, g.stride(0)), e, e.stride(), dc[v_begin:], dc.stride(), w, d, n, tuning,
                               exact=exact)
        if need_db:
            db[v_begin:v_begin + w] += g_chunk.sum(dim=0, dtype=torch.float32)
        v_begin += w

    if need_dc:  # padding rows (after the loop: G may have lived in them); all rows without tokens
        dc[n_valid if n > 0 else 0:].zero_()
    if flagging and adaptive:
        skip_policy.record(policy_key, flags.sum(dtype=torch.int32), flags.numel())
    if need_de:
        de = de_acc if e.dtype == torch.float32 or de_fp32 else _narrow_in_place(de_acc, e.dtype)
    else:
        de = e.new_empty(0)
    return de, dc, (db.to(bias.dtype) if need_db else e.new_empty(0))


@_backward_op.register_fake
def _(e, c, bias, t, lse, coef, n_valid, softcap, filter_eps, adaptive, exact, need_de, need_dc, need_db,
      tuning_code, sum_weights, inv_temp, de_fp32=False):
    return (torch.empty_like(e, dtype=torch.float32 if de_fp32 else e.dtype) if need_de else e.new_empty(0),
            torch.empty_like(c) if need_dc else c.new_empty(0),
            bias.new_empty(bias.shape) if need_db else e.new_empty(0))


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "linear_cross_entropy: the Triton backend's gradients cannot be differentiated again (no double "
        "backward through its kernels); for gradients that are differentiated again pass impl='torch', "
        "grad_in_forward=False")


# What a second differentiation through the memory-first backward meets: this error, not PyTorch's
# "no autograd formula" (the first backward under create_graph=True still runs).
_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _sum_weights(plan: Plan):
    w = plan.sum_weights
    return None if w is None else w.float().contiguous()


def forward_stats(e, c, bias, t_local, plan: Plan):
    """See backend.py. Returns this shard's float32 statistics `plan.stat_names`, [N] each."""
    out = _forward_stats_op(e, c, bias, t_local, plan.n_valid, plan.softcap or 0.0, plan.need_sum,
                            plan.exact, plan.tuning.encode(), _sum_weights(plan), 1.0 / plan.temperature,
                            plan.need_entropy, plan.need_argmax)
    return tuple(out)


def backward(e, c, bias, t_local, lse, coef_p, coef_t, coef_u, plan: Plan,
             need_de: bool, need_dc: bool, need_db: bool, coef_q=None, mean_z=None, de_fp32: bool = False):
    """See backend.py. Skips dC tiles per plan.filter_eps (None, e.g. with label smoothing, whose
    u ≠ 0 makes every tile matter: never). de_fp32: dE is the float32 accumulator, not narrowed."""
    rows = [coef_p, coef_t, coef_u] + ([] if coef_q is None else [coef_q, mean_z])
    coef = torch.stack(rows).float().contiguous()
    de, dc, db = _backward_op(e, c, bias, t_local, lse.float().contiguous(), coef, plan.n_valid,
                              plan.softcap or 0.0, plan.filter_eps or 0.0, plan.adaptive_filter, plan.exact,
                              need_de, need_dc, need_db, plan.tuning.encode(), _sum_weights(plan),
                              1.0 / plan.temperature, de_fp32)
    return (de if need_de else None, dc if need_dc else None, db if need_db else None)


# ---- gradient-in-forward mode (autograd.LossWithGradInForward): passes over a chunk of logits ----

ROW_BLOCK, ROW_WARPS = 2048, 8
# Stored-logits passes (bf16 chunks): the statistics stream one row per program in BLOCK_C columns
# (per-lane running statistics, merged once per row), the gradient pass in tiles. Measured on an
# H200 at (8192, 4096, 128256) (benchmarks/experiments/fast_mode_parts.py): a per-lane prototype
# 0.85 ms at 2048 columns × 8 warps (2.5 TB/s; 0.88–1.00 at the other shapes tried) against the
# earlier cross-thread kernel's 0.93; gradient in place 1.09 ms (3.9 TB/s read + write, any shape).
STATS_ROWS, STATS_COLS, STATS_WARPS = 1, 2048, 8
GRAD_ROWS, GRAD_COLS, GRAD_WARPS = 4, 1024, 4


def _stores_logits_16bit(e: torch.Tensor, plan: Plan) -> bool:
    """bf16 inputs keep the chunk's logits in bf16, as the unfused layer's logits would be (its
    statistics are computed from the float32 values before rounding); float16 (whose range the
    gradient p/N would underflow), float32 and exact mode keep them in float32."""
    return e.dtype == torch.bfloat16 and not plan.exact


def fuses_plain(e: torch.Tensor, plan: Plan) -> bool:
    """Whether the held-logits path may take the plain cross-entropy's fused route (backend.py):
    plain coefficients over bf16 stored logits (`grad_from_stored_kernel`'s PLAIN mode)."""
    return plan.plain_coefficients and _stores_logits_16bit(e, plan)


def _scored_bounds(plan: Plan, local: bool) -> tuple[int, int, int]:
    """(ignore_t, lo_t, hi_t) of the plain loss's kernels: t is scored where lo_t ≤ t < hi_t and
    t ≠ ignore_t, in the shard's local numbering (t − vocab_start) or the global one."""
    shift = plan.vocab_start if local else 0
    return plan.ignore_index - shift, -shift, plan.vocab_size - shift


def logits_and_stats(e, c, bias, t_local, plan: Plan, with_ce: bool = False):
    """(Z, *stats): Z [n, ≥ n_valid] the chunk's logits, and this shard's float32 statistics
    `plan.stat_names` [n] each (lse, x, s; then max, argmax with `plan.need_argmax`; s is
    Σ_j w_j z_j with `plan.sum_weights`), see backend.py. with_ce (bf16 stored logits of one
    rank, plain cross-entropy: `fuses_plain` and plan.world == 1): then also the per-token plain
    cross-entropy, written by the statistics pass.

    bf16 (`_stores_logits_16bit`): Z = cuBLAS e·cᵀ in bf16, then one pass computes the statistics
    and, with bias or softcap, writes the final logits z = cap·tanh((r + b)/cap) back into Z (the
    statistics, max and argmax included, are those of the stored values). Otherwise Z is the raw
    float32 product and the statistics apply bias and softcap on the fly.
    """
    if plan.need_entropy:
        raise NotImplementedError("the gradient-in-forward mode has no entropy statistic")
    n, v = e.shape[0], plan.n_valid
    names = plan.stat_names
    sixteen = _stores_logits_16bit(e, plan)
    z = torch.empty(n, triton.cdiv(max(v, 1), 8) * 8, dtype=e.dtype if sixteen else torch.float32,
                    device=e.device)
    if v == 0 or n == 0:
        return (z, *stats.of_no_rows(names, n, e, torch.float32))
    out = torch.empty(len(names), n, dtype=torch.float32, device=e.device)
    bias_arg = c if bias is None else bias
    cap = plan.softcap or 1.0
    sum_w = _sum_weights(plan)
    sumw_arg = out if sum_w is None else sum_w
    if with_ce and not (sixteen and plan.world == 1 and plan.plain_coefficients):
        raise ValueError("logits_and_stats: with_ce needs plain cross-entropy over one rank's bf16 logits")
    if sixteen:
        torch.mm(e, c[:v].T, out=z[:, :v])
        rows, cols, warps = (4, 16, 1) if _interpreting() else (STATS_ROWS, STATS_COLS, STATS_WARPS)
        ce = torch.empty(n, dtype=torch.float32, device=e.device) if with_ce else None
        ignore_t, lo_t, hi_t = _scored_bounds(plan, local=True)
        G.stored_logits_stats_kernel[(triton.cdiv(n, rows),)](
            z, bias_arg, t_local, out, n, v, z.stride(0), cap, sumw_arg,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=plan.softcap is not None, NEED_SUM=plan.need_sum,
            WRITE_BACK=bias is not None or plan.softcap is not None, BLOCK_R=rows, BLOCK_C=cols,
            HAS_SUMW=sum_w is not None, NEED_ARGMAX=plan.need_argmax, num_warps=warps,
            CE=ce, ignore_t=ignore_t, lo_t=lo_t, hi_t=hi_t, NEED_CE=with_ce,
        )
        counters["fast_bf16_logits"] += 1
        if with_ce:
            return (z, *out.unbind(0), ce)
    else:
        _product_fp32(z[:, :v], e, c[:v].T, plan.exact, False, plan.tuning)
        block = 16 if _interpreting() else ROW_BLOCK
        K.row_stats_kernel[(n,)](
            z, bias_arg, t_local, out, v, z.stride(0), n, cap, sumw_arg,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=plan.softcap is not None,
            NEED_SUM=plan.need_sum, BLOCK=block, HAS_SUMW=sum_w is not None, NEED_ARGMAX=plan.need_argmax,
            num_warps=ROW_WARPS,
        )
    return (z, *out.unbind(0))


def grad_from_logits(z, bias, t_local, lse, coef_p, coef_t, coef_u, plan: Plan, dtype):
    """G [n, n_valid] over Z's storage: in place for bf16 Z (the final logits), else in `dtype`
    (float32 for float32) inside the float32 rows of the raw logits. With `plan.sum_weights` the
    u term is u·w_j."""
    n, v = z.shape[0], plan.n_valid
    coef = torch.stack([coef_p, coef_t, coef_u]).float().contiguous()
    lse = lse.float().contiguous()
    sum_w = _sum_weights(plan)
    sumw_arg = lse if sum_w is None else sum_w
    if z.dtype != torch.float32:  # the stored final logits: 1 − tanh² = 1 − (z/cap)²
        if v > 0 and n > 0:
            rows, cols, warps = (4, 16, 1) if _interpreting() else (GRAD_ROWS, GRAD_COLS, GRAD_WARPS)
            G.grad_from_stored_kernel[(triton.cdiv(n, rows), triton.cdiv(v, cols))](
                z, t_local, lse, coef, z, n, v, z.stride(0), 0, 1.0 / (plan.softcap or 1.0), 0.0, sumw_arg,
                HAS_SOFTCAP=plan.softcap is not None, FILTER=False, BLOCK_R=rows, BLOCK_C=cols,
                HAS_SUMW=sum_w is not None, num_warps=warps,
            )
        # torch 2.13's CPU bf16 GEMM reads past K when A's rows are strided (the padding columns
        # enter the product): on CPU (the interpreter's tests) hand out a contiguous copy.
        return z[:, :v].contiguous() if z.device.type == "cpu" else z[:, :v]
    g = z if dtype == torch.float32 else z.view(dtype)
    if v == 0 or n == 0:
        return g[:, :v]
    block = 16 if _interpreting() else ROW_BLOCK
    K.row_logit_grad_kernel[(n,)](
        z, g, z if bias is None else bias, t_local, lse, coef, v, z.stride(0), g.stride(0), n,
        plan.softcap or 1.0, sumw_arg, HAS_BIAS=bias is not None, HAS_SOFTCAP=plan.softcap is not None,
        BLOCK=block, HAS_SUMW=sum_w is not None, num_warps=ROW_WARPS,
    )
    return g[:, :v]


def plain_ce(lse: torch.Tensor, x: torch.Tensor, t: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The plain per-token cross-entropy [N] float32 from the combined statistics (lse, x) and the
    global targets t (several ranks; one rank's statistics pass writes it itself: with_ce)."""
    n = t.shape[0]
    ce = torch.empty(n, dtype=torch.float32, device=t.device)
    if n > 0:
        block = 16 if _interpreting() else 1024
        G.plain_ce_kernel[(triton.cdiv(n, block),)](
            lse.contiguous(), x.contiguous(), t, ce, n, *_scored_bounds(plan, local=False), BLOCK=block)
    return ce


def grad_from_logits_plain(z: torch.Tensor, bias: torch.Tensor | None, t_local: torch.Tensor, lse: torch.Tensor,
                           up: torch.Tensor, scale: torch.Tensor | None, plan: Plan, dtype: torch.dtype
                           ) -> torch.Tensor:
    """G [n, n_valid] over the bf16 stored logits Z (`fuses_plain`: bias and softcap are in them
    already), in place, for plain cross-entropy with the upstream gradient `up` (float32, 0-d or
    [n], any stride) times `scale` (0-d float32, "mean"'s 1/count) or None: `grad_from_logits`
    with the coefficients k·(1, −1, 0), k = where(scored, up·scale, 0), formed inside the kernel
    (triton_gemm.py)."""
    if not _stores_logits_16bit(z, plan):
        raise ValueError("grad_from_logits_plain: needs the bf16 stored logits (fuses_plain)")
    n, v = z.shape[0], plan.n_valid
    if v > 0 and n > 0:
        rows, cols, warps = (4, 16, 1) if _interpreting() else (GRAD_ROWS, GRAD_COLS, GRAD_WARPS)
        ignore_t, lo_t, hi_t = _scored_bounds(plan, local=True)
        G.grad_from_stored_kernel[(triton.cdiv(n, rows), triton.cdiv(v, cols))](
            z, t_local, lse, lse, z, n, v, z.stride(0), 0, 1.0 / (plan.softcap or 1.0), 0.0, lse,
            HAS_SOFTCAP=plan.softcap is not None, FILTER=False, BLOCK_R=rows, BLOCK_C=cols,
            UP=up, stride_up=up.stride(0) if up.dim() else 0, SCALE=scale,
            ignore_t=ignore_t, lo_t=lo_t, hi_t=hi_t, PLAIN=True, HAS_SCALE=scale is not None, num_warps=warps,
        )
    # as grad_from_logits: a contiguous copy for torch 2.13's CPU bf16 GEMM
    return z[:, :v].contiguous() if z.device.type == "cpu" else z[:, :v]


def scale_in_place(t: torch.Tensor, k: torch.Tensor) -> None:
    """t (contiguous) *= k (0-d float32 tensor), computed in float32, no host sync."""
    block = 16 if _interpreting() else 4096
    K.scale_kernel[(triton.cdiv(t.numel(), block),)](t, k.float().reshape(1), t.numel(), BLOCK=block)
