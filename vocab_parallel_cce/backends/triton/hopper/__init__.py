"""Hopper kernels in Gluon, and the one gate that decides where they run.

They can run on compute capability 9.0 GPUs (H100, H200) with a Triton that has Gluon, for bf16
operands laid out for TMA; everywhere else (Ampere, the interpreter) the library's `tl` kernels
and cuBLAS products run. `Tuning(use_gluon=...)`: None (default) = the memory-first mode's
products on the Triton releases of `DEFAULT_TRITON` (planning.uses_hopper); True = both modes' on
any release with Gluon; False = never. A kernel that fails to build is
not used again in the process: one warning, and the `tl` path takes over (never a wrong result).
"""

from __future__ import annotations

import os
import warnings

import torch

# Triton releases on which calls use these kernels by default: those the GPU tests
# (tests/gpu/test_gpu_hopper.py) and the benchmarks passed on (H100, Triton 3.6). Elsewhere they run
# only when asked (`Tuning(use_gluon=True)`, VPCCE_USE_GLUON=1); the test suite compiles them for
# sm_90a with the Triton it installs.
DEFAULT_TRITON: tuple[str, ...] = ("3.6.",)

_failed: set = set()  # kernel configurations whose build failed in this process
_built: set = set()  # ... and those that built


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:  # pragma: no cover
        return ""


def _has_gluon() -> bool:
    try:
        from triton.experimental.gluon.language.nvidia import hopper  # noqa: F401
    except ImportError:
        return False
    return True


def available(device: torch.device, use_gluon: bool | None) -> bool:
    """Whether the Gluon kernels may run on `device` (module docstring)."""
    if (use_gluon is not None and not use_gluon) or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    if use_gluon is None and not _triton_version().startswith(DEFAULT_TRITON):
        return False
    return _has_gluon()


def aligned_for_tma(*tensors: torch.Tensor) -> bool:
    """bf16 (the kernels' operand and output type), unit last stride, 16-byte aligned base and row
    stride (what a TMA descriptor needs)."""
    for t in tensors:
        if t.dtype != torch.bfloat16 or t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            return False
    return True


def build_ok(key, build) -> bool:
    """Whether the kernel configuration `key` builds; `build()` compiles it (no launch) the first
    time. A failure warns once and marks it unusable for the rest of the process."""
    if key in _built:
        return True
    if key in _failed:
        return False
    try:
        build()
    except Exception as ex:  # a compiler error of any kind: fall back, never run half-built code
        _failed.add(key)
        warnings.warn(f"vocab_parallel_cce: the Hopper kernel {key[0]!r} failed to build on Triton "
                      f"{_triton_version()} ({type(ex).__name__}: {str(ex).strip()[:300]}); "
                      "using the portable Triton kernels instead", RuntimeWarning, stacklevel=3)
        return False
    _built.add(key)
    return True


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _run(mode: int, e, c, n_cols: int, **kw) -> bool:
    """Launch the logits kernel in `mode` unless its configuration failed to build."""
    from . import logits

    key = ("logits", mode, bool(kw.get("need_sum")), bool(kw.get("need_pz")), kw.get("inv_temp", 1.0) != 1.0,
           kw.get("k_slice"))
    args = dict(kw, num_sms=_num_sms(e.device))
    if not build_ok(key, lambda: logits.launch(e, c, n_cols, mode, warmup=True, **args)):
        return False
    logits.launch(e, c, n_cols, mode, **args)
    return True


def _partials(e, n_cols: int, mode: int, need_sum: bool, need_pz: bool = False) -> torch.Tensor:
    from . import logits

    block_n = logits.CONFIGS[mode][1]
    rows = logits.partial_rows(mode, need_sum, need_pz)
    return torch.empty(rows, -(-n_cols // block_n), e.shape[0], dtype=torch.float32, device=e.device)


def stored_logits_and_stats(e, c, z, t_local, n_valid: int, need_sum: bool,
                            k_slice: int | None = None) -> torch.Tensor | None:
    """The fast mode's forward: z[:, :n_valid] = bf16(e·c[:n_valid]ᵀ) and float32 [4, N] rows
    (lse, x, Σz, lsẽ) — lse, x, Σz of the float32 products, lsẽ of the stored bf16 logits (for
    the gradient) — or None where the kernel cannot run (then nothing was written). k_slice:
    columns of D per accumulator slice (`logits.launch`; None: its default)."""
    from . import logits, partials

    if e.shape[0] == 0 or not aligned_for_tma(e, c, z):
        return None
    part = _partials(e, n_valid, logits.MODE_LOGITS.value, need_sum)
    if not _run(logits.MODE_LOGITS.value, e, c, n_valid, out=z, partials=part, need_sum=need_sum, k_slice=k_slice):
        return None
    return partials.merge(part, e, c, t_local, n_valid, True, need_sum)[:4]


def shard_stats(e, c, t_local, n_valid: int, need_sum: bool, need_pz: bool = False,
                inv_temp: float = 1.0, k_slice: int | None = None) -> torch.Tensor | None:
    """The memory-first forward: float32 [5, N] rows (lse, x, Σz, -, pz) of z = (e·c[:n_valid]ᵀ)·inv_temp,
    nothing stored (pz = Σ_j p_j z_j, the entropy's, with need_pz); None where the kernel cannot run.
    k_slice: columns of D per accumulator slice (`logits.launch`; None: its default)."""
    from . import logits, partials

    if e.shape[0] == 0 or not aligned_for_tma(e, c):
        return None
    mode = logits.MODE_STATS.value
    part = _partials(e, n_valid, mode, need_sum, need_pz)
    if not _run(mode, e, c, n_valid, partials=part, need_sum=need_sum, need_pz=need_pz, inv_temp=inv_temp,
                k_slice=k_slice):
        return None
    return partials.merge(part, e, c, t_local, n_valid, False, need_sum, need_pz, inv_temp)


def logit_grad_chunk(e, c_chunk, width: int, g, lse, coef, t_local, col_base: int, inv_temp: float = 1.0) -> bool:
    """The memory-first backward's chunk: g[:, :width] = bf16((a·p + b·[j = t] + u [+ q·p·(z − pz)])·inv_temp)
    with p = exp(z − lse), z = (e·c_chunk[:width]ᵀ)·inv_temp, columns numbered from col_base
    (t_local's numbering); lse [N], coef [3, N] float32 contiguous (a, b, u), or [5, N] with the
    entropy's (q, pz). False where the kernel cannot run (then nothing was written)."""
    from . import logits

    if e.shape[0] == 0 or width == 0 or not aligned_for_tma(e, c_chunk, g):
        return False
    return _run(logits.MODE_GRAD.value, e, c_chunk, width, out=g, lse=lse, coef=coef, t=t_local, col_base=col_base,
                need_pz=coef.shape[0] == 5, inv_temp=inv_temp)
