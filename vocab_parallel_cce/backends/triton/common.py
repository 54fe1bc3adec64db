"""What the Triton backend's modules share: the path counters, the interpreter switch, the class
weights as the kernels read them, and two jit helpers (tanh, the grouped tile order)."""

import os
from collections import Counter

import torch
import triton
import triton.language as tl

from ...plan import Plan

counters: Counter = Counter()  # paths taken (the package docstring lists them); counters.clear() resets it


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1: small blocks)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _bf16_dot_probe_kernel(A, OUT):
    i = tl.arange(0, 16)
    a = tl.load(A + i[:, None] * 16 + i[None, :])
    tl.store(OUT + i[:, None] * 16 + i[None, :], tl.dot(a, a))


_bf16_dot_probes: dict = {}


def interpreter_computes_bf16_dot() -> bool:
    """Whether Triton's interpreter multiplies bfloat16 `tl.dot` operands as values: it keeps
    bfloat16 as raw uint16 bits, and releases that hand those bits to np.matmul return ~1e10 for
    O(1) inputs. Probed once per interpreter dot implementation: (2·I)·(2·I) = 4·I in [16, 16]."""
    from triton.runtime import interpreter

    key = getattr(getattr(interpreter, "InterpreterBuilder", None), "create_dot", None)
    if key not in _bf16_dot_probes:
        a = (2 * torch.eye(16)).to(torch.bfloat16)
        out = torch.zeros(16, 16)
        _bf16_dot_probe_kernel[(1,)](a, out)
        _bf16_dot_probes[key] = bool(torch.equal(out, 4 * torch.eye(16)))
    return _bf16_dot_probes[key]


def float32_sum_weights(plan: Plan) -> torch.Tensor | None:
    """This shard's class weights as the kernels read them (float32, contiguous), or None."""
    w = plan.sum_weights
    return None if w is None else w.float().contiguous()


@triton.jit
def tanh(x):
    # tanh(x) = 1 − 2 / (exp(2x) + 1): saturates to ±1 without overflow.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def gathered_row_dots(E, C, rows, cols, ok, D, stride_e, stride_c, BLOCK_R: tl.constexpr, K: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """[BLOCK_R, K] float32: e_i·c_{cols[i, k]} (D products, float32 sums) where ok [BLOCK_R, K],
    else 0: K gathered rows of C per token, all K at each step along D (one loop of D / BLOCK_D
    steps, not K)."""
    c_off = tl.where(ok, cols, 0).to(tl.int64) * stride_c
    e_off = rows.to(tl.int64) * stride_e
    any_ok = tl.max(ok.to(tl.int32), axis=1) > 0
    acc = tl.zeros((BLOCK_R, K, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        in_d = dd < D
        ev = tl.load(E + e_off[:, None] + dd[None, :], mask=any_ok[:, None] & in_d[None, :], other=0.0)
        cv = tl.load(C + c_off[:, :, None] + dd[None, None, :], mask=ok[:, :, None] & in_d[None, None, :],
                     other=0.0)
        acc += ev.to(tl.float32)[:, None, :] * cv.to(tl.float32)
    return tl.sum(acc, axis=2)


@triton.jit
def grouped_tile(pid, grid_m, grid_n, GROUP: tl.constexpr):
    """(m, n) tile of program `pid` over a grid_m × grid_n grid, in groups of GROUP m-tiles: inside a
    group m varies fastest, then n; the groups follow each other along m."""
    group = pid // (GROUP * grid_n)
    first_m = group * GROUP
    size_m = tl.minimum(grid_m - first_m, GROUP)
    return first_m + (pid % (GROUP * grid_n)) % size_m, (pid % (GROUP * grid_n)) // size_m
