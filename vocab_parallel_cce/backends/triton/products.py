"""The Triton backend's matrix products and operand access.

- TMA tensor descriptors (Hopper and newer, and the interpreter, which emulates them) where the
  operands' rows are 16-byte aligned; masked pointer loads otherwise (`Tuning(use_tma=False)`
  forces pointers). Counted in `counters` ("tma" / "pointers").
- `sparse_matmul_kernel`: OUT (+)= A·B visiting, for each row tile of A, only the K tiles listed as
  non-negligible (the memory-first backward's block-sparse dC), or all of them (dense).
- `float32_product`: out float32 (+)= a·b without a temporary: cuBLAS where it computes exactly
  that, the Triton kernel otherwise; `product_fp32` is the backend contract's form of it.
"""

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4
    TensorDescriptor = None

from ...plan import Plan
from ...tuning import Tuning
from .common import counters, grouped_tile, interpreting


def dot_precision(dtype: torch.dtype, exact: bool) -> str:
    """float32 dots use TF32 only where torch's own float32 matmuls would (and never when exact)."""
    tf32 = dtype == torch.float32 and not exact and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def tma_enabled(device: torch.device, tuning: Tuning) -> bool:
    """TMA descriptors: Hopper or newer (or the interpreter, which emulates them), unless
    tuning.use_tma is off."""
    if TensorDescriptor is None or not tuning.use_tma:
        return False
    if interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def descriptor(t: torch.Tensor, shape, strides, block):
    """A TMA descriptor of the row-major 2-D view (shape, strides) of t's storage, or None when
    the layout does not allow one (unit last stride, 16-byte aligned base and row stride)."""
    if strides[1] != 1 or (strides[0] * t.element_size()) % 16 or t.data_ptr() % 16 or min(shape) <= 0:
        return None
    return TensorDescriptor(t, list(shape), list(strides), list(block))


def tma_operands(e: torch.Tensor, c: torch.Tensor, block_n: int, block_v: int, block_d: int, tuning: Tuning):
    """(E, C, True) as TMA descriptors (blocks [block_n, block_d], [block_v, block_d]) where
    possible, else (e, c, False). Counted in `counters` ("tma" / "pointers")."""
    e_desc = c_desc = None
    if tma_enabled(e.device, tuning):
        e_desc = descriptor(e, e.shape, e.stride(), (block_n, block_d))
        c_desc = descriptor(c, c.shape, c.stride(), (block_v, block_d))
    tma = e_desc is not None and c_desc is not None
    counters["tma" if tma else "pointers"] += 1
    return (e_desc, c_desc, True) if tma else (e, c, False)


def _matmul_config(dtype: torch.dtype, listed: bool, tuning: Tuning) -> tuple:
    """(BLOCK_M, BLOCK_NN, BLOCK_K, GROUP_M, warps, stages); BLOCK_M, BLOCK_K must divide 128.

    The block-sparse (listed) product uses BLOCK_K = 128 (one list entry per step) and wider
    tiles: on an H200 at 20% kept tiles 0.13 ms against 0.17 ms for the dense config (D = 4096).
    tuning.matmul_block overrides both.
    """
    if tuning.matmul_block is not None:
        return tuning.matmul_block
    if interpreting():
        return (16, 16, 16, 4, 1, 1)
    if dtype == torch.float32:
        return (128, 128, 32, 8, 8, 3)
    return (128, 256, 128, 8, 8, 2) if listed else (128, 128, 64, 8, 8, 3)


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
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(NN, BLOCK_NN), GROUP_M)

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


def tile_lists(flags: torch.Tensor):
    """Per row of `flags` [R, T]: the indices of its non-zero tiles first, and their count."""
    order = torch.argsort((flags == 0).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return order.contiguous(), flags.sum(dim=1, dtype=torch.int32)


def sparse_matmul(a, a_strides, b, b_strides, out, out_strides, m, nn, k, tuning: Tuning, lists=None,
                  counts=None, list_tile_m=1, list_tile_k=1, accumulate=False, exact=False):
    """OUT (+)= A·B with the Triton kernel; dense when `lists` is None."""
    block_m, block_nn, block_k, group_m, warps, stages = _matmul_config(a.dtype, lists is not None, tuning)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(nn, block_nn),)
    dense = lists is None
    a_arg, b_arg, tma, a_k_major = a, b, False, a_strides[0] == 1 and a_strides[1] != 1
    if tma_enabled(a.device, tuning):
        if a_k_major:  # A = Gᵀ: describe G [k, m]
            a_desc = descriptor(a, (k, m), (a_strides[1], 1), (block_k, block_m))
        else:
            a_desc = descriptor(a, (m, k), a_strides, (block_m, block_k))
        b_desc = descriptor(b, (k, nn), b_strides, (block_k, block_nn))
        if a_desc is not None and b_desc is not None:
            a_arg, b_arg, tma = a_desc, b_desc, True
    sparse_matmul_kernel[grid](
        a_arg, b_arg, out, out if dense else lists, out if dense else counts, m, nn, k, list_tile_m, list_tile_k,
        *a_strides, *b_strides, *out_strides, 0 if dense else lists.stride(0), ACCUMULATE=accumulate,
        DENSE=dense, BLOCK_M=block_m, BLOCK_NN=block_nn, BLOCK_K=block_k, GROUP_M=group_m,
        DOT_PRECISION=dot_precision(a.dtype, exact), USE_TMA=tma, A_K_MAJOR=a_k_major,
        num_warps=warps, num_stages=stages,
    )


_CUBLAS_FP32_OUT: dict = {}  # device → whether torch.addmm(..., out_dtype=float32) runs there


def float32_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, exact: bool, accumulate: bool,
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
    sparse_matmul(a, a.stride(), b, b.stride(), out, out.stride(), a.shape[0], b.shape[1], a.shape[1], tuning,
                  accumulate=accumulate, exact=exact)


def product_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, plan: Plan, accumulate: bool) -> None:
    """See protocol.py: out float32 (+)= a · b (IEEE float32 dots in exact mode)."""
    float32_product(out, a, b, plan.exact, accumulate, plan.tuning)
