"""`Plan`: everything one call of `linear_cross_entropy` decided, after validation.

Made once by planning.py and passed whole to the path that runs (paths/) and the backend, so
that a call's settings reach the kernels by one route. Frozen: nothing downstream changes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from . import stats
from .tuning import Tuning

# The paths a call can take (paths/): "recompute" the memory-first mode (statistics forward,
# logits recomputed in the backward), "held" the fast mode with all logits held to the backward,
# "chunked" the fast mode in token chunks with the gradients formed in the forward.
Path = Literal["recompute", "held", "chunked"]
PATHS = ("recompute", "held", "chunked")

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
    # e and targets are this rank's slices along dim 0: the targets are gathered by run.prepare,
    # e by the paths' autograd Functions, which reduce-scatter dE
    sequence_parallel: bool
    # the mode
    backend: Any  # a backends.protocol.Backend: backends.torch_backend or backends.triton (the module)
    exact: bool  # triton: no tile skipping, IEEE float32 dots
    filter_eps: float | None  # triton default path: skip dC tiles whose softmax stays below it
    adaptive_filter: bool  # ... only while the measured kept-tile fraction is low
    path: Path  # the path that runs (PATHS; the fast mode's two need some input to require grad)
    # performance knobs
    tuning: Tuning
    # optional options and statistics (the plain loss asks for none of them; the kernels compute
    # each only when asked: stats.py lists the statistics)
    temperature: float = 1.0  # z ← z / T after the softcap (linear_log_probs)
    # F.cross_entropy's `weight`: [≥ vocab_size] of the GLOBAL vocabulary (on every rank), float32
    # (float64 for float64 inputs); a constant (no gradient)
    class_weights: torch.Tensor | None = None
    need_entropy: bool = False  # statistic pz = Σ_j p_j z_j (the entropy lse − pz and its gradient)
    need_argmax: bool = False  # statistics max, argmax (token accuracy, predicted tokens)
    chunk_tokens: int | None = None  # path "chunked": tokens per chunk of logits (else None)
    # the Hopper kernels compute the logits products (planning.uses_hopper): the loss's statistics
    # come from the float32 products, and the fast mode's gradient takes the lse of the stored bf16
    # logits ("glse")
    hopper: bool = False
    # the fast mode's stored logits are bf16 (the Triton backend, bf16 outside exact mode): its loss
    # takes the correct logit and the row's largest as float32 dot products e_i·c_j and puts them in
    # lse in place of the stored ones, and the gradient takes the stored logits' own lse ("glse")
    bf16_logits: bool = False

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"Plan.path: expected one of {PATHS}, got {self.path!r}")
        if (self.path == "chunked") != (self.chunk_tokens is not None and self.chunk_tokens > 0):
            raise ValueError(f"Plan.chunk_tokens: a number > 0 on the chunked path only, got {self.chunk_tokens!r} "
                             f"on path {self.path!r}")

    @property
    def sums_grad_e(self) -> bool:
        """Whether the autograd Functions sum dE's per-rank partial sums over the group (all-reduce,
        or the sequence-parallel reduce-scatter). For 16-bit inputs the partials then stay in
        float32 until that sum and are rounded once, after it (distributed.sum_grad_e)."""
        return self.world > 1 and (self.reduce_grad_e or self.sequence_parallel)

    @property
    def need_sum(self) -> bool:
        """Whether the statistics include s = Σ_j z_ij (Σ_j w_j z_ij with class weights): label
        smoothing needs it."""
        return self.label_smoothing > 0

    @property
    def stat_names(self) -> tuple[str, ...]:
        """The per-token statistics this call computes, in order (stats.py)."""
        rounded = (self.hopper or self.bf16_logits) and self.path != "recompute"
        return stats.names(self.need_entropy, self.need_argmax, rounded=rounded)

    def stored_lse(self, st) -> torch.Tensor:
        """The lse that the fast mode's gradient p = exp(z − lse) pairs with its stored logits z:
        "glse" where the statistics have it (the loss's lse then takes float32 logits: the correct
        and the largest, or all of them from the float32 products), else lse."""
        names = self.stat_names
        return st[names.index("glse")] if "glse" in names else st[0]

    @property
    def sum_weights(self) -> torch.Tensor | None:
        """This shard's class weights [n_valid] when s is the weighted sum Σ_j w_j z_ij, else None."""
        if self.class_weights is None or not self.need_sum:
            return None
        return self.class_weights[self.vocab_start:self.vocab_start + self.n_valid].contiguous()

    def token_loss(self, lse: torch.Tensor, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-token loss [N] from the global statistics (lse, x = correct logit, s = Σ logits) and
        the global targets t [N]: (1−ε)(lse − x) + ε(lse − s/V) + λ·lse², 0 at ignored tokens,
        NaN at targets outside [0, vocab_size). With class weights w (F.cross_entropy's):
        (1−ε)·w_t·(lse − x) + (ε/V)·(Σ_j w_j·lse − s) + λ·lse², s = Σ_j w_j z_j (`token_loss_parts`)."""
        ce, zl = self.token_loss_parts(lse, x, s, t)
        return ce if zl is None else ce + zl

    def token_loss_parts(self, lse, x, s, t) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cross-entropy part, z-loss part λ·lse² or None when λ = 0) of `token_loss`, [N] each,
        0 at ignored tokens, NaN at out-of-range targets. "mean" divides the first by the summed
        class weights of the non-ignored targets (their count without weights), the second by
        their count (`mean_denominators`)."""
        valid = t != self.ignore_index
        nll = lse - x
        eps, weights = self.label_smoothing, self.class_weights
        if weights is not None:
            nll = self.target_weights(t) * nll
        if eps > 0:
            if weights is None:
                smooth = lse - s / self.vocab_size
            else:
                smooth = (weights[:self.vocab_size].sum() * lse - s) / self.vocab_size
            nll = (1.0 - eps) * nll + eps * smooth
        bad_target = valid & ((t < 0) | (t >= self.vocab_size))

        def masked(q):
            return torch.where(valid, torch.where(bad_target, float("nan"), q), 0.0)

        return masked(nll), (masked(self.z_loss * lse * lse) if self.z_loss > 0 else None)

    def target_weights(self, t: torch.Tensor) -> torch.Tensor:
        """class_weights[t] [N] (any value at ignored or out-of-range targets)."""
        return self.class_weights[t.clamp(0, self.vocab_size - 1)]

    def mean_denominators(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """("mean"'s divisor of the cross-entropy part, of the z-loss part) as device scalars: the
        summed class weights of the non-ignored targets (their count without weights), and their
        count; each replaced by 1 where it is 0 (all ignored: loss 0, zero gradients). Without
        class weights both are the same tensor, max(count, 1)."""
        valid = t != self.ignore_index
        count = valid.sum()
        den_count = count.clamp(min=1)
        if self.class_weights is None:
            return den_count, den_count
        ce = torch.where(valid, self.target_weights(t), 0).sum()
        return torch.where(ce == 0, torch.ones_like(ce), ce), den_count

    @property
    def plain_coefficients(self) -> bool:
        """Whether the loss is plain cross-entropy (no label smoothing, z-loss, class weights or
        entropy), whose per-token coefficients of G = a·p + b·[j = t] + u do not depend on the
        statistics: ce = lse − x gives a = 1, b = −1, u = 0 on scored tokens (0 ≤ t <
        vocab_size, t ≠ ignore_index) and 0 elsewhere, so the fast mode can form them inside its
        kernels (paths/held.py) instead of by autograd on [N] vectors."""
        return (self.label_smoothing == 0 and self.z_loss == 0 and self.class_weights is None
                and not self.need_entropy)
