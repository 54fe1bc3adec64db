"""`Plan`: everything one call of `linear_cross_entropy` decided, after validation.

Made once by `api` and passed whole to the autograd Functions and the backends, so that a
call's settings reach the kernels by one route. Frozen: nothing downstream changes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .tuning import Tuning

if TYPE_CHECKING:
    from .backend import Backend


@dataclass(frozen=True)
class Plan:
    # the loss (global semantics)
    reduction: str  # "mean" | "sum" | "none"
    ignore_index: int
    vocab_size: int  # global ids >= vocab_size are padding: out of the softmax and the smoothing mean
    label_smoothing: float
    z_loss: float
    softcap: float | None
    # this rank's shard and the parallel layout
    vocab_start: int  # global id of local row 0
    n_valid: int  # local rows [0, n_valid) take part; the rest of c's rows are padding
    group: Any  # torch.distributed group over which c is split (None: one rank)
    world: int  # ranks in `group` (1 without one)
    reduce_grad_e: bool  # all-reduce dE over the group (False: partial sums, or sequence parallel)
    sequence_parallel: bool  # e/targets were gathered along dim 0; dE is reduce-scattered
    # the mode
    backend: Backend  # torch_backend or triton_backend (the module)
    exact: bool  # triton: no tile skipping, IEEE float32 dots
    filter_eps: float | None  # triton default path: skip dC tiles whose softmax stays below it
    adaptive_filter: bool  # ... only while the measured kept-tile fraction is low
    grad_in_forward: bool  # gradients computed in the forward (and needed: some input requires grad)
    # performance knobs
    tuning: Tuning

    @property
    def need_sum(self) -> bool:
        """Whether the statistics include s = Σ_j z_ij (label smoothing needs the logit mean)."""
        return self.label_smoothing > 0

    def token_loss(self, lse: torch.Tensor, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-token loss [N] from the global statistics (lse, x = correct logit, s = Σ logits) and
        the global targets t [N]: (1−ε)(lse − x) + ε(lse − s/V) + λ·lse², 0 at ignored tokens,
        NaN at targets outside [0, vocab_size)."""
        valid = t != self.ignore_index
        nll = lse - x
        if self.label_smoothing > 0:
            nll = (1.0 - self.label_smoothing) * nll + self.label_smoothing * (lse - s / self.vocab_size)
        if self.z_loss > 0:
            nll = nll + self.z_loss * lse * lse
        bad_target = valid & ((t < 0) | (t >= self.vocab_size))
        return torch.where(valid, torch.where(bad_target, float("nan"), nll), 0.0)
