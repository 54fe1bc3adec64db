"""Per-token log-probabilities and entropy of the policy `softmax((e·cᵀ + b) / T)`, for RL trainers.

`linear_log_probs` gives both without materialising the logits, with gradients for any upstream
gradient (policy-gradient losses weight every token differently), also under vocabulary
(tensor) parallelism and sequence parallelism. It runs the loss's recompute path: the forward
computes per token lse, the target's logit and pz = Σ_j p_j z_j (one more statistic, in the same
single all-gather across ranks), and the backward recomputes the logit tiles (autograd.ShardStats).
"""

from __future__ import annotations

from typing import Any

import torch

from .api import _backend, _from_dtensors, _impl_name, _layout, _per_token, _prepare, _validate
from .autograd import ShardStats
from .plan import Plan
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
    impl = _impl_name(impl)
    e, c, targets, bias, group, vocab_start = _from_dtensors(e, c, targets, bias, group, vocab_start, None)
    shift = _validate(e, c, targets, bias, "none", softcap, 0.0, 0.0, shift, None, impl, False, False)
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    layout = _layout(c, group, vocab_start, vocab_size, reduce_grad_e, sequence_parallel, None)
    backend, exact = _backend(impl, e)
    # No dC tile skipping: the entropy's term q·p·(z − pz) is not bounded by p alone.
    plan = Plan(
        reduction="none", ignore_index=ignore_index, label_smoothing=0.0, z_loss=0.0,
        softcap=None if softcap is None else float(softcap), **layout, backend=backend, exact=exact,
        filter_eps=None, adaptive_filter=False, grad_in_forward=False,
        tuning=Tuning.from_env() if tuning is None else tuning, temperature=float(temperature), need_entropy=True,
    )
    e2, c, bias, t, out_shape, _ = _prepare(plan, e, c, targets, bias, shift)
    with torch.autocast(e.device.type, enabled=False):
        lse, x, _, pz = ShardStats.apply(e2, c, bias, t - plan.vocab_start, plan)
    valid = t != ignore_index
    bad_target = valid & ((t < 0) | (t >= plan.vocab_size))
    log_probs = torch.where(valid, torch.where(bad_target, float("nan"), x - lse), 0.0)
    entropy = torch.where(valid, lse - pz, 0.0)
    return _per_token(log_probs, out_shape, shift), _per_token(entropy, out_shape, shift)
