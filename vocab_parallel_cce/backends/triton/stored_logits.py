"""The fast mode's side of the Triton backend (paths/held.py, paths/chunked.py): a chunk of logits
Z materialised once by a product, then passes over it (contract: backends/protocol.py).

Z's storage (`logits_dtype`): bf16 inputs outside exact mode keep their logits in bf16, as the
unfused layer's would be, and `logits_bf16` passes over the stored FINAL logits (bias and softcap
written back); everything else keeps the raw float32 product and `logits_fp32` passes apply bias
and softcap on the fly. `scale_in_place` multiplies the gradients by the upstream gradient.
"""

import torch
import triton
import triton.language as tl

from ... import stats
from ...plan import Plan
from . import hopper, logits_bf16, logits_fp32
from .common import counters, interpreting
from .logits_bf16 import plain_ce  # noqa: F401  (the contract's plain_ce: the plain route's kernel)
from .products import float32_product


def logits_dtype(dtype: torch.dtype, exact: bool) -> torch.dtype:
    """Z's dtype for inputs of `dtype` (protocol.py): bf16 for bf16 inputs, as the unfused layer's
    logits would be (the statistics are computed from the float32 values before rounding);
    float16 (whose range the gradient p/N would underflow), float32 and exact mode: float32."""
    return torch.bfloat16 if dtype == torch.bfloat16 and not exact else torch.float32


def fuses_plain(e: torch.Tensor, plan: Plan) -> bool:
    """Whether the held-logits path may take the plain cross-entropy's fused route (protocol.py):
    plain coefficients over bf16 stored logits (`grad_from_stored_kernel`'s PLAIN mode)."""
    return plan.plain_coefficients and logits_dtype(e.dtype, plan.exact) == torch.bfloat16


def logits_and_stats(e, c, bias, t_local, plan: Plan, with_ce: bool = False):
    """(Z, *stats): Z [n, ≥ n_valid] the chunk's logits, and this shard's float32 statistics
    `plan.stat_names` [n] each (lse, x, s; then max, argmax with `plan.need_argmax`; s is
    Σ_j w_j z_j with `plan.sum_weights`), see protocol.py. with_ce (bf16 stored logits of one
    rank, plain cross-entropy: `fuses_plain` and plan.world == 1): then also the per-token plain
    cross-entropy, written by the statistics pass.

    bf16 with `plan.hopper`: one Hopper kernel stores Z and the statistics of its float32 tiles,
    and the statistics end with "glse", the lse of the stored bf16 logits, for their gradient.
    Other bf16: Z = cuBLAS e·cᵀ in bf16, then one pass computes the statistics and, with bias or
    softcap, writes the final logits z = cap·tanh((r + b)/cap) back into Z. The statistics, max
    and argmax included, are those of the stored values, except that x is the float32 correct
    logit and lse takes it and the row's largest logit in float32 in place of the stored ones
    ("glse" is the stored values' own lse).
    Otherwise Z is the raw float32 product and the statistics apply bias and softcap on the fly.
    """
    if plan.need_entropy:
        raise NotImplementedError("the gradient-in-forward mode has no entropy statistic")
    n, v = e.shape[0], plan.n_valid
    z_dtype = logits_dtype(e.dtype, plan.exact)
    z = torch.empty(n, triton.cdiv(max(v, 1), 8) * 8, dtype=z_dtype, device=e.device)
    if v == 0 or n == 0:
        return (z, *stats.of_no_rows(plan.stat_names, n, e, torch.float32))
    sixteen = z_dtype == torch.bfloat16
    if with_ce and not (sixteen and plan.world == 1 and plan.plain_coefficients):
        raise ValueError("logits_and_stats: with_ce needs plain cross-entropy over one rank's bf16 logits")
    if sixteen and plan.hopper:
        # lse, x, s, glse
        out = hopper.stored_logits_and_stats(e, c, z, t_local, v, plan.need_sum, plan.tuning.stats_k_slice)
        if out is not None:
            counters["hopper_forward"] += 1
            return (z, *out.unbind(0)) + ((plain_ce(out[0], out[1], t_local, plan),) if with_ce else ())
    out = torch.empty(len(plan.stat_names), n, dtype=torch.float32, device=e.device)
    if sixteen:
        torch.mm(e, c[:v].T, out=z[:, :v])
        ce = logits_bf16.stats_pass(z, bias, t_local, out, plan, with_ce, e, c[:v])
        if with_ce:
            return (z, *out.unbind(0), ce)
    else:
        float32_product(z[:, :v], e, c[:v].T, plan.exact, False, plan.tuning)
        logits_fp32.stats_pass(z, bias, t_local, out, plan)
    return (z, *out.unbind(0))


def grad_from_logits(z, bias, t_local, lse, coef_p, coef_t, coef_u, plan: Plan, dtype):
    """G [n, n_valid] over Z's storage: in place for bf16 Z (the final logits), else in `dtype`
    (float32 for float32) inside the float32 rows of the raw logits. With `plan.sum_weights` the
    u term is u·w_j."""
    coef = torch.stack([coef_p, coef_t, coef_u]).float().contiguous()
    lse = lse.float().contiguous()
    if z.dtype != torch.float32:  # the stored final logits: 1 − tanh² = 1 − (z/cap)²
        return logits_bf16.grad_pass(z, t_local, lse, plan, coef=coef)
    return logits_fp32.grad_pass(z, bias, t_local, lse, coef, plan, dtype)


def grad_from_logits_plain(z: torch.Tensor, bias: torch.Tensor | None, t_local: torch.Tensor, lse: torch.Tensor,
                           up: torch.Tensor, scale: torch.Tensor | None, plan: Plan, dtype: torch.dtype
                           ) -> torch.Tensor:
    """G [n, n_valid] over the bf16 stored logits Z (`fuses_plain`: bias and softcap are in them
    already), in place, for plain cross-entropy with the upstream gradient `up` (float32, 0-d or
    [n], any stride) times `scale` (0-d float32, "mean"'s 1/count) or None: `grad_from_logits`
    with the coefficients k·(1, −1, 0), k = where(scored, up·scale, 0), formed inside the kernel
    (logits_bf16.py)."""
    if logits_dtype(z.dtype, plan.exact) != torch.bfloat16:
        raise ValueError("grad_from_logits_plain: needs the bf16 stored logits (fuses_plain)")
    return logits_bf16.grad_pass(z, t_local, lse, plan, up=up, scale=scale)


@triton.jit
def scale_kernel(X, K, numel, BLOCK: tl.constexpr):
    """X *= K[0] in float32 (one rounding to X's dtype; K is never rounded to it). K = 1 (the
    upstream gradient of a plain `loss.backward()`) touches no memory."""
    k = tl.load(K).to(tl.float32)
    if k != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(X + offs, (x * k).to(X.dtype.element_ty), mask=mask)


def scale_in_place(t: torch.Tensor, k: torch.Tensor) -> None:
    """t (contiguous) *= k (0-d float32 tensor), computed in float32, no host sync."""
    block = 16 if interpreting() else 4096
    scale_kernel[(triton.cdiv(t.numel(), block),)](t, k.float().reshape(1), t.numel(), BLOCK=block)
