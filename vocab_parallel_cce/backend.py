"""The contract between the autograd layer and the two compute backends (torch, triton).

A backend works on ONE vocabulary shard: rows [0, V_local) of `c`, of which only the first
`n_valid` take part in the softmax (the rest are padding). Targets arrive already shifted into
the shard's local numbering (`t_local = target - vocab_start`); a target outside [0, n_valid)
simply has no correct logit in this shard.

Forward, per token i (z_ij = e_i·c_j + b_j, then z ← cap·tanh(z/cap) when softcapped):
    lse_i = log Σ_{j<n_valid} exp(z_ij)      (-inf when n_valid == 0)
    x_i   = z_{i,t_i} if 0 ≤ t_i < n_valid else 0
    s_i   = Σ_{j<n_valid} z_ij               (only when `need_sum`)

Backward, given the global lse_i and per-token coefficients (a_i, b_i, u_i) the logit gradient is
    G_ij = a_i·p_ij + b_i·[j = t_i] + u_i      for j < n_valid (0 for padded rows),
    p_ij = exp(z_ij − lse_i),   and × (1 − tanh²(z_raw/cap)) when softcapped,
and the backend returns dE = G·C [N, D], dC = Gᵀ·E [V_local, D], dbias = Σ_i G_ij [V_local].
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardSpec:
    """Static description of one call, shared by both backends."""

    n_valid: int  # local rows [0, n_valid) are real vocabulary; the rest are padding
    softcap: float | None = None
    need_sum: bool = False  # compute Σ_j z_ij (label smoothing)
    filter_eps: float | None = None  # skip gradient tiles whose softmax is below this (triton)
    adaptive_filter: bool = False  # skip only while the measured kept-tile fraction is low (triton)
    exact: bool = False  # no filtering; float32 inputs use IEEE (not TF32) dot products (triton)
