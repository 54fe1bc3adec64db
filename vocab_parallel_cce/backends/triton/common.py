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


def float32_sum_weights(plan: Plan) -> torch.Tensor | None:
    """This shard's class weights as the kernels read them (float32, contiguous), or None."""
    w = plan.sum_weights
    return None if w is None else w.float().contiguous()


@triton.jit
def tanh(x):
    # tanh(x) = 1 − 2 / (exp(2x) + 1): saturates to ±1 without overflow.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def grouped_tile(pid, grid_m, grid_n, GROUP: tl.constexpr):
    """(m, n) tile of program `pid` over a grid_m × grid_n grid, in groups of GROUP m-tiles: inside a
    group m varies fastest, then n; the groups follow each other along m."""
    group = pid // (GROUP * grid_n)
    first_m = group * GROUP
    size_m = tl.minimum(grid_m - first_m, GROUP)
    return first_m + (pid % (GROUP * grid_n)) % size_m, (pid % (GROUP * grid_n)) // size_m
