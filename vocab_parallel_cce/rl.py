"""Per-token log-probabilities and entropy of the policy `softmax((e·cᵀ + b) / T)`, for RL trainers.

`linear_log_probs` gives both without materialising the logits, with gradients for any upstream
gradient (policy-gradient losses weight every token differently), also under vocabulary
(tensor) parallelism and sequence parallelism. It runs the loss's recompute path: the forward
computes per token lse, the target's logit and pz = Σ_j p_j z_j (one more statistic, in the same
single all-gather across ranks), and the backward recomputes the logit tiles (paths/recompute.py).
"""

from __future__ import annotations

from typing import Any

import torch

from .paths.recompute import ShardStats
from .planning import plan_log_probs
from .run import per_token, prepare
from .tuning import Tuning


def linear_log_probs(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: int | bool = 0,
    impl: str = "auto",
    group: Any = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    reduce_grad_e: bool = True,
    sequence_parallel: bool = False,
    tuning: Tuning | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_probs, entropy) of each token under the logits z = (e·cᵀ + bias, softcapped) / T.

    Over the valid vocabulary (ids < vocab_size, across all ranks of `group`):
        log_probs_i = z_{i, t_i} − logsumexp_j z_ij,      entropy_i = −Σ_j p_ij log p_ij
    with p_i = softmax(z_i). Both are differentiable with respect to e, c and bias for any
    upstream gradient (∂H/∂z_j = p_j·(Σ_k p_k z_k − z_j)); the temperature scales the logits
    inside the kernels (e is not divided).

    Args:
        e: hidden states [..., D] (float32/float16/bfloat16; float64 with impl="torch").
        c: classifier [V, D] (this rank's shard [V_local, D] under vocabulary parallelism, or a
            DTensor sharded along the vocabulary).
        targets: int32/int64 token ids shaped e.shape[:-1] (global ids).
        temperature: T > 0: the policy's sampling temperature (z ← z / T after the softcap).
        bias: optional [V] (or [V_local]).
        softcap: logits z ← softcap·tanh(z / softcap) before the temperature.
        ignore_index: tokens with this target get log_prob 0 and entropy 0, with zero gradient.
        shift: k (or True = 1): e[..., :-k, :] scores targets[..., k:] (e is not copied).
        impl: "auto", "triton", "triton_exact", "torch" (as linear_cross_entropy).
        group, vocab_start, vocab_size, reduce_grad_e, sequence_parallel: vocabulary and sequence
            parallelism, exactly as in linear_cross_entropy (under sequence parallelism the
            outputs cover ALL gathered tokens on every rank).
        tuning: performance knobs (`Tuning`); None reads VPCCE_* environment variables.

    Returns:
        (log_probs, entropy), each shaped like targets[..., shift:], float32 (float64 for float64
        inputs). A target outside [0, vocab_size) that is not ignore_index gives a NaN log_prob.
    """
    plan, call = plan_log_probs(
        e, c, targets, temperature=temperature, bias=bias, softcap=softcap, ignore_index=ignore_index, shift=shift,
        impl=impl, group=group, vocab_start=vocab_start, vocab_size=vocab_size, reduce_grad_e=reduce_grad_e,
        sequence_parallel=sequence_parallel, tuning=tuning,
    )
    p = prepare(plan, call.e, call.c, call.targets, call.bias, call.shift)
    with torch.autocast(p.e.device.type, enabled=False):
        lse, x, _, pz = ShardStats.apply(p.e, p.c, p.bias, p.t - plan.vocab_start, plan)
    valid = p.t != plan.ignore_index
    bad_target = valid & ((p.t < 0) | (p.t >= plan.vocab_size))
    log_probs = torch.where(valid, torch.where(bad_target, float("nan"), x - lse), 0.0)
    entropy = torch.where(valid, lse - pz, 0.0)
    return per_token(log_probs, p.out_shape, call.shift), per_token(entropy, p.out_shape, call.shift)
