"""The fast mode's token-chunked path (grad_in_forward, where the logits do not fit one chunk of
`Tuning.fast_logits_bytes`; planning.py decides, and sets the chunk size): the gradients formed
during the forward, chunk by chunk, for an upstream gradient that is the same for every scored
token; the backward only scales them."""

from __future__ import annotations

import torch

from ..plan import Plan
from .shared import fast_outputs, gather_tokens, global_stats, grad_e_fp32, grad_e_product
from .shared import save_plan, saved_plan, sum_grad_e, take_once


class LossWithGradInForward(torch.autograd.Function):
    """The fast mode's token-chunked path (taken when the logits do not fit one chunk; one chunk
    takes `LossWithHeldLogits`): the loss with its gradients computed during the forward, for an
    upstream gradient that is the same for every non-ignored token: a scalar ("mean"/"sum"), or,
    for "none", checked to be so.

    Chunks of `plan.chunk_tokens` tokens (planning.py: as many as `tuning.fast_logits_bytes` holds
    logits of, or `tuning.fast_chunk_tokens`): Z = E_c·C_rᵀ is materialised once ([n_c, V_r] in the
    backend's `logits_dtype`: bf16 for bf16 inputs on Triton, as the unfused layer's logits, else
    float32);
    its rows give the statistics `plan.stat_names` (lse, x, s; max and argmax when the plan asks;
    combined across ranks: one all-gather per chunk), `plan.token_loss_parts` gives the chunk's
    per-token loss, autograd on those [n_c] vectors gives the coefficients (a, b, u) of
    G = a·p + b·[j = t] + u·w_j, and G is written over Z. Then dE_c = G·C_r (complete over the shard:
    written once), dC_r += Gᵀ·E_c in float32. 6·N·D·V FLOPs instead of the recomputing path's 8.
    "mean" divides the cross-entropy part by `dens[0]` and the z-loss part by `dens[1]` (device
    scalars: with class weights they differ), both folded into the coefficients.
    The backward only scales the stored gradients by the upstream gradient, in place (once). For
    "none" the per-token upstream gradient g must be one value s on every token whose G row is not
    zero (non-ignored, in-range target); the backward uses s and checks max|g_i − s| ≤ 1e-6·max|g_i|
    on the device: otherwise every gradient is NaN (no host sync, never silently wrong).

    Extra outputs: with `want_z` the per-token z-loss part λ·lse² [N] (0 where ignored), a value
    whose gradient is already inside the loss's: its upstream gradient must be 0 (else NaN
    gradients); with `plan.need_argmax` the argmax [N] (global ids as floats, ties to the smallest
    id), not differentiable.
    """

    @staticmethod
    def forward(ctx, e, c, bias, t, plan: Plan, dens=None, loss_mask=None, want_z=False):
        """e [N, D] (sequence parallel: this rank's [N/W, D], gathered here), c [V_r, D], bias [V_r]
        or None, t [N] global ids, dens: "mean"'s two divisors (`plan.mean_denominators(t)`: of the
        cross-entropy part, of the z-loss part; device scalars) or None, loss_mask [N] bool or None
        ("none" only: tokens where it is False keep their loss but get no gradient; their upstream
        gradient must be 0), want_z: also return the z-loss part → (loss, [z-loss part [N] if
        want_z], [argmax [N] if plan.need_argmax]): the loss a scalar ("mean", "sum") or per token
        [N] ("none"), float32 (float64 for float64 e)."""
        e = gather_tokens(e, plan)  # used during this forward only
        n, chunk, backend = e.shape[0], plan.chunk_tokens, plan.backend
        need_de, need_dc, need_db = ctx.needs_input_grad[:3]
        acc_dtype = torch.float64 if e.dtype == torch.float64 else torch.float32
        want_z = want_z and plan.z_loss > 0
        grads = _GradSums(e, c, plan, need_de, need_dc, need_db and bias is not None, acc_dtype)
        loss = _LossSums(n, plan, loss_mask is not None, want_z, acc_dtype, e.device)
        k_ce, k_z, post = _mean_factors(dens, e.dtype, acc_dtype) if plan.reduction == "mean" else (None,) * 3
        for n0 in range(0, n, chunk):
            rows = slice(n0, min(n, n0 + chunk))
            t_local = t[rows] - plan.vocab_start
            z, *st = backend.logits_and_stats(e[rows], c, bias, t_local, plan)
            st = global_stats(st, plan)  # global argmax ids; one collective for all of them
            coef = loss.add_chunk(rows, st, t[rows], plan, k_ce, k_z, loss_mask)
            g = backend.grad_from_logits(z, bias, t_local, plan.stored_lse(st), *coef, plan, e.dtype)
            grads.add_chunk(rows, g, e[rows], c, plan, post)
            del z, g
        ctx.grads = grads.finish(post, c, bias)
        save_plan(ctx, plan)
        ctx.active, ctx.held, ctx.e_dtype, ctx.want_z = loss.active, loss.held, e.dtype, want_z
        ctx.any_scored = loss.any_scored
        total = loss.total if post is None else loss.total * post
        return fast_outputs(ctx, total if loss.per_token is None else loss.per_token, loss.z_part, loss.argmax,
                            acc_dtype)

    @staticmethod
    def backward(ctx, g_loss, *g_extra):
        grads = take_once(ctx, "grads")
        plan = saved_plan(ctx)
        k = g_loss if ctx.active is None else _uniform_upstream(g_loss, ctx.active, ctx.held)
        if ctx.any_scored is not None:  # no token with a gradient: zeros whatever g is (even inf, a 0/0 loss)
            k = torch.where(ctx.any_scored, k, 0.0)
        if ctx.want_z and g_extra and g_extra[0] is not None:
            # the z-loss output's gradient is inside the loss's: one of its own cannot be honoured
            k = torch.where((g_extra[0] != 0).any(), torch.full_like(k, float("nan")), k)
        for q in grads:
            if q is not None:
                plan.backend.scale_in_place(q, k)  # dE before the cross-rank sum, in its dtype
        grads[0] = sum_grad_e(grads[0], ctx.e_dtype, plan)
        return (*grads, None, None, None, None, None)


def _uniform_upstream(g: torch.Tensor, active: torch.Tensor, held: torch.Tensor | None = None) -> torch.Tensor:
    """The common value s of g [N] over the active tokens (0 when there are none), or NaN when
    max|g_i − s| > 1e-6·max|g_i| there, or when g is not exactly 0 on a `held` token (a loss kept
    without gradient: the loss mask promised it). A device scalar: no host sync."""
    if g.numel() == 0:
        return g.new_zeros(())
    g = g if g.dtype == torch.float64 else g.float()
    broken = torch.where(held, g != 0, False).any() if held is not None else None
    g = torch.where(active, g, 0.0)  # whatever the inactive tokens received (even inf/NaN) is unused
    s = g.sum() / active.sum().clamp(min=1)
    deviation = torch.where(active, (g - s).abs(), 0.0).amax()
    bound = 1e-6 * g.abs().amax()
    ok = deviation <= bound if broken is None else (deviation <= bound) & ~broken
    return torch.where(ok, s, torch.full_like(s, float("nan")))


def _mean_factors(dens, e_dtype: torch.dtype, acc_dtype: torch.dtype):
    """(k_ce, k_z, post) of "mean": the chunk's objective is k_ce·Σ ce + k_z·Σ zl, then × post, so
    that "mean" = Σ ce/dens[0] + Σ zl/dens[1]. The divisors go into G (k_ce = 1/dens[0],
    k_z = 1/dens[1]), except in float16, whose range p/count would underflow: there G gets
    k_z = dens[0]/dens[1] (≈ a mean class weight) and the products are multiplied by
    post = 1/dens[0] afterwards (k_ce None: 1)."""
    den_ce, den_z = (q.to(acc_dtype) for q in dens)
    if e_dtype != torch.float16:
        return 1.0 / den_ce, 1.0 / den_z, None
    return None, den_ce / den_z, 1.0 / den_ce


def _chunk_objective(st, t_c, plan: Plan, k_ce, k_z):
    """(ce, zl, objective, (a, b, u)) of one chunk from its global statistics st: the per-token
    parts of `plan.token_loss_parts`, their weighted sum, and by autograd on the [n_c] vectors the
    per-token coefficients of G = a·p + b·[j = t] + u·w_j."""
    with torch.enable_grad():
        leaves = [q.detach().requires_grad_() for q in st[:3]]
        ce, zl = plan.token_loss_parts(*leaves, t_c)
        objective = ce.sum() if k_ce is None else ce.sum() * k_ce
        if zl is not None:
            objective = objective + (zl.sum() if k_z is None else zl.sum() * k_z)
        coef = torch.autograd.grad(objective, leaves, allow_unused=True, materialize_grads=True)
    return ce, zl, objective, coef


class _LossSums:
    """The loss side of `LossWithGradInForward` over its chunks: the loss (summed, or per token for
    "none"), the z-loss part and argmax outputs, and which tokens take a gradient (the backward's
    checks of the upstream gradient)."""

    def __init__(self, n: int, plan: Plan, masked: bool, want_z: bool, acc_dtype: torch.dtype, device):
        per_token = plan.reduction == "none"
        self.total = torch.zeros((), dtype=acc_dtype, device=device)
        self.per_token = torch.empty(n, dtype=acc_dtype, device=device) if per_token else None
        self.active = torch.empty(n, dtype=torch.bool, device=device) if per_token else None
        self.held = torch.zeros(n, dtype=torch.bool, device=device) if masked else None
        self.z_part = torch.empty(n, dtype=acc_dtype, device=device) if want_z else None
        self.argmax = torch.empty(n, dtype=acc_dtype, device=device) if plan.need_argmax else None
        # "mean"/"sum": whether any token has a gradient (with none, the backward's g is unused, even inf)
        self.any_scored = None if per_token else torch.zeros((), dtype=torch.bool, device=device)

    def add_chunk(self, rows: slice, st, t_c, plan: Plan, k_ce, k_z, loss_mask):
        """Records the chunk `rows`' loss from its global statistics st; returns the coefficients
        (a, b, u) of its G (0 where the loss mask holds a token's loss without gradient)."""
        if self.argmax is not None:
            self.argmax[rows] = st[plan.stat_names.index("argmax")]
        ce, zl, objective, coef = _chunk_objective(st, t_c, plan, k_ce, k_z)
        if self.z_part is not None:
            self.z_part[rows] = zl.detach()
        scored = (coef[0] != 0) | (coef[1] != 0) | (coef[2] != 0)
        if self.per_token is None:
            self.total += objective.detach().to(self.total.dtype)
            self.any_scored |= scored.any()
            return coef
        self.per_token[rows] = (ce if zl is None else ce + zl).detach()
        if loss_mask is not None:
            m = loss_mask[rows]
            coef = [torch.where(m, q, 0.0) for q in coef]
            self.held[rows] = scored & ~m
            scored = scored & m
        self.active[rows] = scored
        return coef


class _GradSums:
    """The gradients of `LossWithGradInForward` over its chunks: dE's rows, complete over the
    shard, written once per chunk (float32 partial sums when the group sums them in the
    backward); dC and dbias summed over the chunks (dC in float32 over several chunks, rounded
    once at the end; one chunk: one product written in c's dtype)."""

    def __init__(self, e, c, plan: Plan, need_de: bool, need_dc: bool, need_db: bool, acc_dtype: torch.dtype):
        n, v = e.shape[0], plan.n_valid
        self.acc_dtype = acc_dtype
        de_dtype = torch.float32 if grad_e_fp32(e, plan, need_de) else e.dtype
        self.de = torch.empty(e.shape, dtype=de_dtype, device=e.device) if need_de else None
        dc_dtype = c.dtype if plan.chunk_tokens >= n else acc_dtype
        self.dc = torch.empty(c.shape, dtype=dc_dtype, device=c.device) if need_dc else None
        if need_dc:
            self.dc[v:].zero_()  # padding rows; the first chunk writes rows [0, v) (no zero-fill pass)
            if n == 0:
                self.dc.zero_()
        self.db = torch.zeros(c.shape[0], dtype=acc_dtype, device=c.device) if need_db else None

    def add_chunk(self, rows: slice, g, e_c, c, plan: Plan, post) -> None:
        """dE_c = G·C_r, dC_r += Gᵀ·E_c, dbias += Σ_i G of the chunk `rows` (G [n_c, V_r])."""
        v, backend, dc = plan.n_valid, plan.backend, self.dc
        if self.de is not None:  # complete over this shard's vocabulary: written once, no accumulation
            grad_e_product(self.de[rows], g, c[:v], plan)
            if post is not None:
                backend.scale_in_place(self.de[rows], post)
        if dc is not None and dc.dtype == self.acc_dtype:
            backend.product_fp32(dc[:v], g.T, e_c.to(g.dtype), plan, accumulate=rows.start > 0)
        elif dc is not None and g.dtype == dc.dtype == e_c.dtype:  # the only chunk, 16-bit G
            torch.mm(g.T, e_c, out=dc[:v])
        elif dc is not None:  # the only chunk, G wider than c (torch backend)
            dc[:v] = (g.T @ e_c.to(g.dtype)).to(dc.dtype)
        if self.db is not None:
            self.db[:v] += g.sum(dim=0, dtype=self.acc_dtype)

    def finish(self, post, c, bias) -> list:
        """[dE, dC, dbias] for the backward: × post (float16's "mean"), dC and dbias in their
        parameters' dtypes."""
        if post is not None:
            for q in (self.dc, self.db):
                if q is not None:
                    q.mul_(post)
        dc, self.dc = self.dc, None
        if dc is not None and dc.dtype != c.dtype:
            dc = dc.to(c.dtype)
        return [self.de, dc, None if self.db is None else self.db.to(bias.dtype)]


@torch.compiler.disable  # runs eagerly under torch.compile (a graph break): Python loop, collectives
def loss_with_grad_in_forward(*args):
    """`LossWithGradInForward.apply(*args)`."""
    return LossWithGradInForward.apply(*args)
