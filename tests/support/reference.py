"""Float64 oracle for the fused linear cross-entropy: it MATERIALISES the logits.

Written from the definition only (no library code), so the tests compare against something
independent:

    z_ij = e_i · c_j (+ b_j),   softcap: z ← cap · tanh(z / cap)
    rows j >= vocab_size are padding: left out of the softmax and of label smoothing's mean
    loss_i = (1 − ε)(lse_i − z_{i,y_i}) + ε (lse_i − mean_j z_ij) + λ lse_i²
    ignored tokens (y_i == ignore_index) have loss 0; "mean" divides by the number of
    non-ignored tokens (0 when there are none); shift k: e[..., :-k, :] predicts targets[..., k:].
    class weights w: the cross-entropy is (1 − ε) w_y (lse − z_y) + (ε/V) Σ_j w_j (lse − z_j)
    (F.cross_entropy's), "mean" divides it by Σ w_y over non-ignored tokens; λ lse² unweighted.

RL: log_prob_i = z_{i,y_i} − lse_i and entropy_i = −Σ_j p_ij log p_ij of z / T (0 when ignored).
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
    class_weights: torch.Tensor | None = None,
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
    # class weights w (F.cross_entropy's `weight`): w_y·nll, smoothing term (1/V)·Σ_j w_j·(lse − z_j)
    w = torch.ones(vocab, dtype=torch.float64) if class_weights is None else class_weights[:vocab].double()
    w_y = w[safe_y]
    loss = (1.0 - label_smoothing) * w_y * nll
    if label_smoothing:
        loss = loss + label_smoothing * ((lse[:, None] - z) * w).sum(dim=-1) / vocab
    zl = torch.zeros_like(loss)
    if z_loss:
        zl = z_loss * lse * lse  # never class-weighted
    loss = torch.where(ignored, torch.zeros_like(loss), loss)
    zl = torch.where(ignored, torch.zeros_like(zl), zl)

    if reduction == "mean":
        count = int((~ignored).sum())
        weight_sum = w_y[~ignored].sum()
        weight_sum = weight_sum if weight_sum != 0 else torch.ones_like(weight_sum)  # all weights 0: loss 0
        # the weighted cross-entropy over the summed weights, the z-loss over the count
        out = (loss.sum() / weight_sum + zl.sum() / count) if count > 0 else (loss + zl).sum() * 0.0
        loss = loss + zl
    elif reduction == "sum":
        out = (loss + zl).sum()
    elif reduction == "none":
        out = (loss + zl).reshape(out_shape)
    else:
        raise ValueError(reduction)
    if return_lse:
        return out, lse.reshape(out_shape)
    return out


def reference_log_probs(e, c, targets, bias=None, softcap=None, temperature=1.0, ignore_index=-100, shift=0,
                        vocab_size=None):
    """(log_probs, entropy) in float64 from materialised logits z = (e·cᵀ + b, softcapped) / T,
    differentiable; shaped like targets[..., shift:]."""
    e_used, y = _shifted(e.double(), targets, int(shift))
    z = e_used.reshape(-1, e.shape[-1]) @ c.double().t()
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z[:, : c.shape[0] if vocab_size is None else vocab_size] / temperature
    logp = torch.log_softmax(z, dim=-1)
    y_flat = y.reshape(-1).long()
    ignored = y_flat == ignore_index
    in_range = (y_flat >= 0) & (y_flat < z.shape[1])
    lp = logp.gather(1, torch.where(in_range, y_flat, 0)[:, None]).squeeze(1)
    lp = torch.where(in_range | ignored, lp, torch.full_like(lp, float("nan")))
    ent = -(logp.exp() * logp).sum(dim=-1)
    zero = torch.zeros_like(lp)
    return torch.where(ignored, zero, lp).reshape(y.shape), torch.where(ignored, zero, ent).reshape(y.shape)


def reference_argmax(e, c, targets=None, bias=None, softcap=None, shift=0, vocab_size=None):
    """Smallest id of the maximal logit per token (float64), shaped like targets[..., shift:]."""
    e_used = e[..., :-shift, :] if shift else e
    z = e_used.double().reshape(-1, e.shape[-1]) @ c.double().t()
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z[:, : c.shape[0] if vocab_size is None else vocab_size]
    top = z.amax(dim=1, keepdim=True)
    ids = torch.arange(z.shape[1]).expand_as(z)
    return torch.where(z == top, ids, z.shape[1]).amin(dim=1).reshape(e_used.shape[:-1])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a − b|| / ||b|| in float64 (absolute error ||a − b|| when ||b|| == 0)."""
    a = a.detach().double()
    b = b.detach().double()
    diff = torch.linalg.vector_norm(a - b).item()
    ref = torch.linalg.vector_norm(b).item()
    return diff / ref if ref > 0 else diff
