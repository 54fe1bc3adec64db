"""Float64 oracle for the fused linear cross-entropy: it MATERIALISES the logits.

Written from the definition only (no library code), so the tests compare against something
independent:

    z_ij = e_i · c_j (+ b_j),   softcap: z ← cap · tanh(z / cap)
    rows j >= vocab_size are padding: left out of the softmax and of label smoothing's mean
    loss_i = (1 − ε)(lse_i − z_{i,y_i}) + ε (lse_i − mean_j z_ij) + λ lse_i²
    ignored tokens (y_i == ignore_index) have loss 0; "mean" divides by the number of
    non-ignored tokens (0 when there are none); shift k: e[..., :-k, :] predicts targets[..., k:].
"""

from __future__ import annotations

import torch


def _shifted(e: torch.Tensor, targets: torch.Tensor, shift: int):
    if shift:
        return e[..., :-shift, :], targets[..., shift:]
    return e, targets


def reference_loss(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: int | bool = 0,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    vocab_size: int | None = None,
    return_lse: bool = False,
):
    """Loss (and optionally the per-token log-sum-exp) in float64, differentiable w.r.t. e, c, bias.

    The inputs are upcast to float64 (the graph goes through the upcast, so `.grad` of a float32
    leaf is the float64 gradient cast back). For "none" the result has the shape of
    targets[..., shift:]; lse has that shape too.
    """
    shift = int(shift)
    e64 = e.double()
    c64 = c.double()
    b64 = None if bias is None else bias.double()
    vocab = c.shape[0] if vocab_size is None else int(vocab_size)

    e_used, y = _shifted(e64, targets, shift)
    out_shape = y.shape
    d = e_used.shape[-1]
    e_flat = e_used.reshape(-1, d)
    y_flat = y.reshape(-1).long()

    z = e_flat @ c64.t()  # [N, V_total] -- materialised on purpose
    if b64 is not None:
        z = z + b64
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z[:, :vocab]  # padding rows take no part at all

    lse = torch.logsumexp(z, dim=-1)
    ignored = y_flat == ignore_index
    in_range = (y_flat >= 0) & (y_flat < vocab)
    safe_y = torch.where(in_range, y_flat, torch.zeros_like(y_flat))
    z_y = z.gather(1, safe_y[:, None]).squeeze(1)
    nll = lse - z_y
    # an out-of-range target that is not ignored has no correct logit: NaN, never a silent number
    nll = torch.where(in_range | ignored, nll, torch.full_like(nll, float("nan")))
    loss = (1.0 - label_smoothing) * nll
    if label_smoothing:
        loss = loss + label_smoothing * (lse - z.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(ignored, torch.zeros_like(loss), loss)

    if reduction == "mean":
        count = int((~ignored).sum())
        out = loss.sum() / count if count > 0 else loss.sum() * 0.0
    elif reduction == "sum":
        out = loss.sum()
    elif reduction == "none":
        out = loss.reshape(out_shape)
    else:
        raise ValueError(reduction)
    if return_lse:
        return out, lse.reshape(out_shape)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a − b|| / ||b|| in float64 (absolute error ||a − b|| when ||b|| == 0)."""
    a = a.detach().double()
    b = b.detach().double()
    diff = torch.linalg.vector_norm(a - b).item()
    ref = torch.linalg.vector_norm(b).item()
    return diff / ref if ref > 0 else diff
