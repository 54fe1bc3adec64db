"""Drop-ins for code written against other fused linear cross-entropy APIs.

* PyTorch 2.13's `torch.nn.functional.linear_cross_entropy`: `torch_linear_cross_entropy` has its
  signature and its values (class weights, label smoothing, every reduction, ignore_index), computed
  by this library's fused kernels: `from vocab_parallel_cce import torch_linear_cross_entropy as
  linear_cross_entropy`.
* Apple's `cut_cross_entropy`: change the import to `vocab_parallel_cce`;
  `linear_cross_entropy` (same positional order and keywords), `LinearCrossEntropy` (same
  positional constructor), `LinearCrossEntropyImpl`, `VocabParallelOptions` (with `from_vocab`;
  group None = the default process group) are this package's own (api.py).
"""

from __future__ import annotations

from typing import Any

import torch

from ..api import linear_cross_entropy


def torch_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: Any = None,
) -> torch.Tensor:
    """`torch.nn.functional.linear_cross_entropy` (PyTorch 2.13) on the fused kernels:
    `cross_entropy(linear(input, linear_weight, linear_bias), target, weight=weight,
    reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing)` without the
    logits.

    Args:
        input: [N, in_features] or [in_features] (any leading shape [..., in_features] works too).
        linear_weight: [C, in_features] (K-dimensional losses, [C, d_1, ..., in_features], are not
            supported: NotImplementedError).
        target: class indices shaped like input's leading dimensions (int64; int32 works too).
            Class-probability targets are not supported (NotImplementedError).
        linear_bias: optional [C].
        weight: optional class weights [C] (F.cross_entropy's; no gradient).
        reduction: "mean" (divided by the summed weights of the non-ignored targets, as
            F.cross_entropy: NaN when every target is ignored), "sum" or "none".
        ignore_index: None means -100, as in PyTorch.
        label_smoothing: in [0, 1).
        options: a `torch.nn.LinearCrossEntropyOptions` or None; accepted and unused: the mode is
            `linear_cross_entropy`'s default ("auto": the fast mode, the logits held in chunks of
            at most `Tuning.fast_logits_bytes`), not PyTorch's chunking strategy.

    Returns:
        The loss in input's dtype (as F.cross_entropy of input-dtype logits), per element for
        "none". Differences: the loss is computed in float32 before that rounding, and a target
        outside [0, C) that is not ignore_index gives NaN where PyTorch raises.
    """
    if not isinstance(linear_weight, torch.Tensor) or linear_weight.dim() != 2:
        shape = tuple(linear_weight.shape) if isinstance(linear_weight, torch.Tensor) else type(linear_weight).__name__
        raise NotImplementedError(
            f"linear_weight: only [C, in_features] classifiers are supported (no K-dimensional loss), got {shape}")
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        raise NotImplementedError("target: class-probability targets are not supported; pass class indices")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    ignore_index = -100 if ignore_index is None else ignore_index
    unbatched = isinstance(input, torch.Tensor) and input.dim() == 1
    if unbatched:
        input, target = input[None], target[None] if isinstance(target, torch.Tensor) else target
    loss = linear_cross_entropy(
        input, linear_weight, target, linear_bias, ignore_index=ignore_index,
        reduction="sum" if reduction == "mean" else reduction, label_smoothing=label_smoothing,
        class_weights=weight,
    )
    if reduction == "mean":  # F.cross_entropy's divisor, without our "all ignored → 0"
        valid = target != ignore_index
        if weight is None:
            divisor = valid.sum()
        else:
            divisor = torch.where(valid, weight[target.clamp(0, weight.shape[0] - 1)], 0).sum()
        loss = loss / divisor.to(loss.dtype)
    elif unbatched and reduction == "none":
        loss = loss[0]
    return loss.to(input.dtype)
