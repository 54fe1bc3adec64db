"""The contract between the paths (paths/) and the two compute backends (torch, triton).

A backend works on ONE vocabulary shard: rows [0, V_local) of `c`, of which only the first
`plan.n_valid` take part in the softmax (the rest are padding). Targets arrive already shifted
into the shard's local numbering (`t_local = target - vocab_start`, int64 [N]); a target outside
[0, n_valid) simply has no correct logit in this shard. `e` [N, D], `c` [V_local, D] and `bias`
[V_local] (or None) share a dtype; `e` and `c` may be strided views. The statistics and coefficients are float32, float64 for float64 inputs (torch only).

Logits, per token i and local row j < n_valid:
    raw      r_ij = e_i·c_j                      (what float32 `logits_and_stats` Z holds: NO bias)
    logit    z_ij = cap·tanh((r_ij + b_j)/cap)   (just r_ij + b_j without softcap)
                    / T                          (plan.temperature; default path only)

Statistics (`forward_stats`, `logits_and_stats`):
    lse_i = log Σ_{j<n_valid} exp(z_ij)      (-inf when n_valid == 0)
    x_i   = z_{i,t_i} if 0 ≤ t_i < n_valid else 0
    s_i   = Σ_{j<n_valid} z_ij               (only when `plan.need_sum`; else 0;
                                              Σ_j w_j z_ij with w = `plan.sum_weights`)
`forward_stats` then returns, in `plan.stat_names` order, the optional ones the plan asks for
(stats.py): pz_i = Σ_j p_ij z_ij under the shard's own softmax, max_i, argmax_i (shard-local
column, as a float; smallest on ties).

Logit gradient, given the GLOBAL lse_i and per-token coefficients (a_i, b_i, u_i):
    G_ij = (a_i·p_ij + b_i·[j = t_i] + u_i·w_j + q_i·p_ij·(z_ij − pz_i))
           · (1 − tanh²((r_ij + b_j)/cap) when softcapped) · (1/T)
    p_ij = exp(z_ij − lse_i),  G_ij = 0 for padded rows j ≥ n_valid,
    (w_j = 1 without `plan.sum_weights`; the q term only when `backward` gets coef_q and the
    GLOBAL pz as mean_z)
and `backward` returns dE = G·C [N, D], dC = Gᵀ·E [V_local, D], dbias = Σ_i G_ij [V_local] in the
inputs' dtypes (None where not asked for; dE in float32 when asked for with `de_fp32`). The
triton backend may skip dC tiles (never dE's) per `plan.filter_eps` / `plan.adaptive_filter`;
the torch backend is always exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from ..plan import Plan

Tensor = torch.Tensor


@runtime_checkable
class Backend(Protocol):
    """What `backends.torch_backend` (a module) and `backends.triton` (a package) both implement."""

    # ---- the memory-first path (paths/recompute.py): statistics forward, recomputed logits backward

    def forward_stats(self, e: Tensor, c: Tensor, bias: Optional[Tensor], t_local: Tensor,
                      plan: Plan) -> tuple[Tensor, ...]:
        """This shard's statistics `plan.stat_names` ((lse, x, s) for the plain loss), [N] each,
        float32 (float64 for float64 inputs)."""

    def backward(self, e: Tensor, c: Tensor, bias: Optional[Tensor], t_local: Tensor, lse: Tensor,
                 coef_p: Tensor, coef_t: Tensor, coef_u: Tensor, plan: Plan,
                 need_de: bool, need_dc: bool, need_db: bool,
                 coef_q: Optional[Tensor] = None, mean_z: Optional[Tensor] = None, de_fp32: bool = False,
                 dc_into: Optional[Tensor] = None) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """(dE [N, D], dC [V_local, D], dbias [V_local]) from the global lse [N] and the
        coefficients (a, b, u) [N] (and the entropy's q with the global pz, [N] each); rows ≥
        n_valid of dC and dbias are 0. de_fp32 (16-bit inputs, when dE's partial sums are summed
        across ranks next): dE is returned in float32, contiguous, not rounded to e's dtype.
        dc_into (a contiguous floating-point tensor of c's shape; used when need_dc): dC is ADDED
        into it instead of being returned (dC comes back None), rows ≥ n_valid untouched. dC is
        added chunk by chunk as computed in float32 (float64 for float64 inputs), with no
        [V_local, D] dC tensor formed: by the torch backend always, by the triton backend for a
        float32 target outside grad mode (otherwise it forms dC and adds it)."""

    # ---- the fast mode's paths (paths/held.py, paths/chunked.py), per token chunk [n, D]

    def logits_dtype(self, dtype: torch.dtype, exact: bool) -> torch.dtype:
        """The dtype of the Z that `logits_and_stats` stores for inputs of `dtype` (the autocast
        dtype under autocast) in `exact` mode or not: its itemsize is what the fast mode's chunk
        budget (`Tuning.fast_logits_bytes`) counts per logit (planning.py)."""

    def logits_and_stats(self, e: Tensor, c: Tensor, bias: Optional[Tensor], t_local: Tensor,
                         plan: Plan, with_ce: bool = False) -> tuple[Tensor, ...]:
        """(Z, *stats): Z [n, ≥ n_valid] the chunk's logits in the backend's storage format
        (`logits_dtype`), read only by `grad_from_logits` (float32 raw logits e·c[:n_valid]ᵀ, no bias, for float32 storage
        (float64 on torch); the triton backend's bf16 storage holds the final logits, bias and softcap
        applied, rounded to bf16 as the unfused layer's), and this shard's statistics
        `plan.stat_names` [n] each: (lse, x, s), then (max, argmax) with `plan.need_argmax`
        (bias and softcap applied; s = Σ_j w_j z_j with `plan.sum_weights`; all of the stored
        values where they are the final logits). No entropy's pz (`plan.need_entropy` is never
        set with this mode). with_ce (only where `fuses_plain`, on one rank): the per-token plain
        cross-entropy [n] float32 (see `plain_ce`) follows as a last output."""

    def grad_from_logits(self, z: Tensor, bias: Optional[Tensor], t_local: Tensor, lse: Tensor,
                         coef_p: Tensor, coef_t: Tensor, coef_u: Tensor, plan: Plan,
                         dtype: torch.dtype) -> Tensor:
        """G [n, n_valid] = a·p + b·[j = t] + u·w_j (× the softcap's factor; w_j = 1 without
        `plan.sum_weights`) from `logits_and_stats`' Z (which it may overwrite), in `dtype` (the
        inputs' dtype) or a wider float dtype."""

    # ---- the held-logits path's fused route for plain cross-entropy (`Plan.plain_coefficients`)

    def fuses_plain(self, e: Tensor, plan: Plan) -> bool:
        """Whether `LossWithHeldLogits` (paths/held.py) takes the route below (no loss_mask, plain coefficients):
        its per-token loss from `logits_and_stats(with_ce=True)` (one rank) or `plain_ce`, its G
        from `grad_from_logits_plain`; no coefficients by autograd, none saved. Every number
        as the general route's (bit for bit)."""

    def plain_ce(self, lse: Tensor, x: Tensor, t: Tensor, plan: Plan) -> Tensor:
        """[N] float32: lse − x where 0 ≤ t < vocab_size and t ≠ ignore_index, NaN at the other
        targets ≠ ignore_index, 0 at ignore_index (t global ids; lse, x combined over the ranks)."""

    def grad_from_logits_plain(self, z: Tensor, bias: Optional[Tensor], t_local: Tensor, lse: Tensor,
                               up: Tensor, scale: Optional[Tensor], plan: Plan, dtype: torch.dtype) -> Tensor:
        """`grad_from_logits` with the coefficients (k, −k, k·0), k = where(scored, up·scale, 0)
        per token (scored as in `plain_ce`; t_local in the shard's numbering): up the upstream
        gradient (0-d or [n] float32, any stride), scale a 0-d float32 or None. The triton
        backend forms them inside its kernel (bf16 stored logits, `fuses_plain`); the torch
        backend with torch ops (its twin, not used by the paths)."""

    def product_fp32(self, out: Tensor, a: Tensor, b: Tensor, plan: Plan, accumulate: bool) -> None:
        """out [M, K'] (float32, float64 for torch's float64) (+)= a [M, K] · b [K, K'], computed in
        out's dtype; accumulate=False overwrites out (its old contents, even NaN, ignored)."""

    def scale_in_place(self, t: Tensor, k: Tensor) -> None:
        """t (contiguous) *= k (0-d tensor) in float32 at least: neither k nor the product is
        rounded to a 16-bit dtype before the single final rounding."""
