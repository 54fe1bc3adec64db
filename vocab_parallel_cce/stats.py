"""Per-token statistics of a vocabulary range, and how partial ones merge.

A kernel (or a rank) that saw only part of the vocabulary produces PARTIAL statistics of each
token; partials of disjoint parts merge into those of their union. The same rules merge the
Triton forward's vocabulary splits on one GPU and the ranks' shards across a process group (one
all-gather of the stacked block, `distributed.combine_stats`). Which statistics a call needs is
`Plan.stat_names`; the first three are always there:

    lse     log Σ_j exp z_j                        merge: logsumexp
    x       z_t (the target's logit) or 0           merge: sum
    s       Σ_j z_j, or Σ_j w_j z_j with class      merge: sum
            weights (only with label smoothing)
    pz      Σ_j p_j z_j with p the part's OWN       merge: Σ_r exp(lse_r − lse)·pz_r
            softmax (entropy = lse − pz globally)
    max     max_j z_j                               merge: max
    argmax  smallest id j with z_j = max (as a      merge: smallest argmax_r among the parts
            float: exact below 2**24; GLOBAL ids    whose max_r is the maximum
            before a cross-rank merge)
    glse    log Σ_j exp bf16(z_j): the lse of the   merge: logsumexp
            stored bf16 logits, which their
            gradient p = exp(bf16(z) − glse) needs
            where lse comes from the float32 products

z is the final logit (bias, softcap and temperature applied) over the valid (non-padding) rows.
"""

from __future__ import annotations

import torch

BASE = ("lse", "x", "s")
# Float ids are exact below 2**24 (float32's significand): the argmax statistic needs vocab_size <= it.
MAX_ARGMAX_VOCAB = 1 << 24


def names(entropy: bool, argmax: bool, rounded: bool = False) -> tuple[str, ...]:
    """The statistics, in order, of a call that needs the entropy's pz, the argmax and/or the lse
    of the rounded logits."""
    return BASE + (("pz",) if entropy else ()) + (("max", "argmax") if argmax else ()) + (("glse",) if rounded else ())


def of_no_rows(names: tuple[str, ...], n: int, like: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """The statistics `names` of n tokens over an empty vocabulary part (a shard with no valid
    rows): lse and max −inf (the merge's identities), the others 0; [n] each, on like's device."""
    return [like.new_full((n,), float("-inf") if k in ("lse", "max", "glse") else 0.0, dtype=dtype) for k in names]


def merge(parts: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """Statistics of the union of R disjoint vocabulary parts, k separate tensors [N] (none a view
    of another), from their partial statistics `parts` [R, k, N] (rows named by `names`)."""
    if parts.shape[0] == 1:
        return tuple(q.clone() for q in parts[0])
    lse_r = parts[:, 0]
    lse = torch.logsumexp(lse_r, dim=0)
    out = []
    for i, name in enumerate(names):
        col = parts[:, i]
        if name == "lse":
            out.append(lse)
        elif name == "glse":
            out.append(torch.logsumexp(col, dim=0))
        elif name in ("x", "s"):
            out.append(col.sum(0))
        elif name == "pz":
            # A part without valid rows has lse_r = −inf and pz_r = 0: weight 0. (lse is finite:
            # some part has a valid row.)
            out.append((torch.exp(lse_r - lse) * col).sum(0))
        elif name == "max":
            out.append(col.amax(0))
        elif name == "argmax":
            best = parts[:, names.index("max")]
            top = best.amax(0)
            out.append(torch.where(best == top, col, float("inf")).amin(0))
        else:
            raise ValueError(f"unknown statistic {name!r}")
    return tuple(out)
