"""The fast mode's held-logits path (grad_in_forward, where all tokens' logits fit one chunk of
`Tuning.fast_logits_bytes`; planning.py decides): the logits are held from the forward to the
backward and the gradients formed there, once the upstream gradient is known, so any upstream
gradient is exact (per token for "none"; the z-loss output's own too)."""

from __future__ import annotations

import torch

from ..plan import Plan
from .shared import fast_outputs, gather_tokens, global_stats, grad_e_fp32, grad_e_product
from .shared import save_plan, saved_plan, sum_grad_e, take_once


class LossWithHeldLogits(torch.autograd.Function):
    """The fast mode when all tokens go in one chunk: the logits are held from the forward to the
    backward, and the gradients are formed in the backward, once the upstream gradient is known.

    Forward: Z = E·C_rᵀ materialised once ([N, V_r]: bf16 for bf16 inputs, else float32; the same
    `backend.logits_and_stats` as `LossWithGradInForward`), the statistics `plan.stat_names`
    (combined across ranks: one all-gather), the per-token loss by `plan.token_loss_parts`, and,
    by autograd on those [N] vectors, the per-token coefficients (a, b, u) of the cross-entropy part
    and a_z of the z-loss part (unscaled: "mean"'s divisors are kept as device scalars). Z, the
    coefficients and lse are kept; no gradient is computed yet.

    Backward, with the upstream gradient g (a scalar for "mean"/"sum", per token [N] for "none"):
    the coefficients × g (× "mean"'s divisors; + the z-loss output's own upstream gradient × a_z),
    G = a·p + b·[j = t] + u·w_j written over Z (`backend.grad_from_logits`: one pass, the ×g costs
    nothing there), dE = G·C_r (one rounding: bf16 output; float32 when the group sums it next),
    dC = Gᵀ·E (bf16, or with `dc_into` accumulated straight into that float32 tensor by one
    `product_fp32(accumulate=True)`: no dC is allocated and none is returned), dbias = Σ_i G.
    So any upstream gradient is exact, per token too, and the z-loss output's gradient is honoured.
    Peak memory: Z + dE + dC during the backward, what `LossWithGradInForward` peaks at during its
    forward; between forward and backward Z (2·N·V_r bytes for bf16) is held instead of dE + dC
    (under sequence parallelism also the gathered e, 2·N·D bytes: dC needs it, without a second
    gather). G overwrites Z, so the backward runs once (no retain_graph); no double backward.

    float16: G is stored in float16, whose range g·p could underflow (g ≈ 1/N); the coefficients
    are divided by a power of two near their largest magnitude and the products multiplied back by
    it (exact scalings, no host sync).

    `loss_mask` ("none"): tokens where it is False keep their loss and get no gradient; a non-zero
    upstream gradient there breaks that promise and gives NaN gradients (checked on the device).
    """

    @staticmethod
    def forward(ctx, e, c, bias, t, plan: Plan, dens=None, loss_mask=None, want_z=False, dc_into=None):
        """Arguments and outputs as `LossWithGradInForward.forward`; dc_into: None, or a tensor of
        c's shape into which c's gradient is added in the backward instead of being returned."""
        e = gather_tokens(e, plan)  # kept for dC = Gᵀ·E (no second gather in the backward)
        backend, names = plan.backend, plan.stat_names
        acc_dtype = torch.float64 if e.dtype == torch.float64 else torch.float32
        # plain cross-entropy over bf16 logits: ce and the coefficients formed inside the kernels
        fused = loss_mask is None and backend.fuses_plain(e, plan)
        t_local = t - plan.vocab_start if plan.vocab_start else t
        with_ce = fused and plan.world == 1  # one rank: the statistics pass writes ce
        z, *st = backend.logits_and_stats(e, c, bias, t_local, plan, with_ce=with_ce)
        ce = st.pop() if with_ce else None
        st = global_stats(st, plan)  # global argmax ids; one collective for all of them
        lse = st[0].contiguous()
        stored_lse = plan.stored_lse(st).contiguous()  # the gradient's: p = exp(z − lse) over the stored z
        argmax = st[names.index("argmax")].clone() if plan.need_argmax else None
        if fused:
            out, zl, coef, k = _plain_loss(ce, lse, st[1], t, plan, dens)
            ctx.k = (k, k)
        else:
            out, zl, coef, ctx.k = _general_loss(st[:3], t, plan, dens, acc_dtype, stored_lse)
        # Z as a saved tensor: saved-tensor hooks (save_on_cpu, non-reentrant checkpointing) see it
        ctx.save_for_backward(e, c, bias, t_local, stored_lse, z, coef)
        ctx.unused = True  # the backward overwrites Z with G: it may run once
        save_plan(ctx, plan)
        ctx.loss_mask, ctx.dc_into, ctx.e_dtype = loss_mask, dc_into, e.dtype
        ctx.want_z = want_z and zl is not None
        return fast_outputs(ctx, out, zl, argmax, acc_dtype)

    @staticmethod
    def backward(ctx, g_loss, *g_extra):
        take_once(ctx, "unused")
        e, c, bias, t_local, lse, z, coef = ctx.saved_tensors
        plan = saved_plan(ctx)
        backend, v = plan.backend, plan.n_valid
        need_de, need_dc, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        acc = torch.float64 if e.dtype == torch.float64 else torch.float32
        if coef is None:  # plain cross-entropy: the coefficients k·(1, −1, 0) formed inside the kernel
            up = torch.zeros((), dtype=acc, device=e.device) if g_loss is None else g_loss.to(acc)
            grad = backend.grad_from_logits_plain(z, bias, t_local, lse, up, ctx.k[0], plan, e.dtype)  # over Z
            scale = None
        else:
            grad, scale = _held_grad_general(ctx, plan, z, bias, t_local, lse, coef, g_loss, g_extra, acc)
        n = e.shape[0]
        de = dc = db = None
        if need_de:  # float32 partial sums when the group sums them next: rounded once, after
            de = torch.empty(e.shape, dtype=torch.float32 if grad_e_fp32(e, plan, need_de) else e.dtype,
                             device=e.device)
            grad_e_product(de, grad, c[:v], plan)
            if scale is not None:
                backend.scale_in_place(de, scale)
        into = ctx.dc_into if need_dc else None
        if into is not None and into.dtype == acc and scale is None:
            # straight into the float32 target (Megatron's main_grad): one product, beta = 1
            backend.product_fp32(into[:v], grad.T, e if grad.dtype == e.dtype else e.to(grad.dtype), plan,
                                 accumulate=True)
        elif need_dc:
            dc = torch.empty_like(c)
            dc[v:].zero_()
            if n == 0:
                dc.zero_()
            elif grad.dtype == c.dtype == e.dtype:
                torch.mm(grad.T, e, out=dc[:v])
            else:
                dc[:v] = (grad.T @ e.to(grad.dtype)).to(c.dtype)
            if scale is not None:
                backend.scale_in_place(dc, scale)
            if into is not None:
                into.add_(dc)
                dc = None
        if need_db:
            db = torch.zeros(c.shape[0], dtype=acc, device=c.device)
            db[:v] = grad.sum(dim=0, dtype=acc)
            if scale is not None:
                db.mul_(scale)
            db = db.to(bias.dtype)
        return sum_grad_e(de, e.dtype, plan), dc, db, None, None, None, None, None, None


def _plain_loss(ce, lse, x, t, plan: Plan, dens):
    """The held path's loss for plain cross-entropy (`fuses_plain`): (loss, None, None, k) with
    ce [N] the per-token cross-entropy (None: formed here from the combined lse, x), k = "mean"'s
    1/count (a device scalar; else None): no z-loss part, no saved coefficients (the backward
    forms them). The same float32 values as `_general_loss`'s: ce as `Plan.token_loss_parts`,
    k = 1/count (there 1.0/count, i.e. reciprocal·1), loss = Σ ce · k ("mean"), Σ ce ("sum"), ce
    ("none"). Its "+ 0.0" is left out: it would change only a sum of −0, and no ce_i is −0
    (0 where ignored; lse − x = −0 would need lse = −0, and lse = max + log Σ ≥ max + 0 is not)."""
    if ce is None:
        ce = plan.backend.plain_ce(lse, x, t, plan)
    k = None
    if plan.reduction == "mean":
        k = torch.reciprocal(dens[0].to(torch.float32))
        return ce.sum() * k, None, None, k
    return (ce.sum() if plan.reduction == "sum" else ce), None, None, k


def _general_loss(stats, t, plan: Plan, dens, acc_dtype, stored_lse):
    """The held path's loss for any plan: (loss, z-loss part or None, coefficients [3 or 4, N],
    (k_ce, k_z)) with the per-token coefficients (a, b, u[, a_z]) by autograd on the [N] vectors
    (`LossWithHeldLogits`) and "mean"'s divisors as device scalars k = 1/den (else None).
    a_z = ∂zl_i/∂lse_i = 2λ·lse_i is taken at stored_lse [N], the lse the gradient's p pairs with."""
    with torch.enable_grad():
        leaves = [q.detach().requires_grad_() for q in stats]
        ce, zl = plan.token_loss_parts(*leaves, t)
        coef = list(torch.autograd.grad(ce.sum(), leaves, allow_unused=True, materialize_grads=True))
        if zl is not None:  # on its own: the z-loss output may get a gradient of its own
            at = stored_lse.detach().requires_grad_()
            zl_at = plan.token_loss_parts(at, *leaves[1:], t)[1]
            coef += list(torch.autograd.grad(zl_at.sum(), [at], allow_unused=True, materialize_grads=True))
    ce = ce.detach().to(acc_dtype)
    zl = None if zl is None else zl.detach().to(acc_dtype)
    k_ce = k_z = None
    if plan.reduction == "mean":
        k_ce, k_z = (1.0 / q.to(acc_dtype) for q in dens)
        out = ce.sum() * k_ce + (0.0 if zl is None else zl.sum() * k_z)
    elif plan.reduction == "sum":
        out = ce.sum() + (0.0 if zl is None else zl.sum())
    else:
        out = ce if zl is None else ce + zl
    return out, zl, torch.stack([q.to(acc_dtype) for q in coef]), (k_ce, k_z)


def _held_grad_general(ctx, plan: Plan, z, bias, t_local, lse, coef, g_loss, g_extra, acc):
    """The held path's G over Z for the saved coefficients coef [3 or 4, N] (`_general_loss`) and
    the upstream gradients: (G, scale) with scale the float16 power of two the products are to be
    multiplied by (else None)."""
    backend, e_dtype = plan.backend, ctx.e_dtype
    a, b, u = coef[0], coef[1], coef[2]
    a_z = coef[3] if coef.shape[0] > 3 else None
    g = torch.zeros((), dtype=acc, device=z.device) if g_loss is None else g_loss.to(acc)
    broken = None
    # what unscored tokens (ignored: coefficients 0) received is unused, even inf (e.g. a loss divided
    # by a count of 0): their gradient is 0, as the memory-first mode's
    scored = (a != 0) | (b != 0) | (u != 0)
    if a_z is not None:
        scored = scored | (a_z != 0)
    if plan.reduction == "none":
        if ctx.loss_mask is not None:  # the promise: g = 0 where the mask is False
            broken = (scored & ~ctx.loss_mask & (g != 0)).any()
            scored = scored & ctx.loss_mask
        k_ce = k_z = torch.where(scored, g, 0.0)
    else:
        k_ce, k_z = ctx.k
        k_ce, k_z = (torch.where(scored, g if k is None else g * k, 0.0) for k in (k_ce, k_z))
    a_tot = k_ce * a
    if a_z is not None:
        a_tot = a_tot + k_z * a_z
        g_z = g_extra[0] if ctx.want_z and g_extra and g_extra[0] is not None else None
        if g_z is not None:  # the z-loss output's own gradient: ∂zl_i/∂lse_i = a_z
            zmask = a_z != 0 if ctx.loss_mask is None else (a_z != 0) & ctx.loss_mask
            a_tot = a_tot + torch.where(zmask, g_z.to(acc), 0.0) * a_z
    b_tot, u_tot = k_ce * b, k_ce * u
    n = z.shape[0]
    a_tot, b_tot, u_tot = (q.expand(n).contiguous() for q in (a_tot, b_tot, u_tot))
    if broken is not None:
        a_tot = torch.where(broken, float("nan"), a_tot)
    scale = None
    if e_dtype == torch.float16 and n > 0:  # G in float16: bring the coefficients near 1 by 2^k
        top = torch.stack([a_tot.abs().amax(), b_tot.abs().amax(), u_tot.abs().amax()]).amax()
        exp = torch.frexp(top.float()).exponent
        scale = torch.where((top > 0) & torch.isfinite(top), torch.ldexp(torch.ones_like(top), exp),
                            torch.ones_like(top))
        a_tot, b_tot, u_tot = (q / scale for q in (a_tot, b_tot, u_tot))
    return backend.grad_from_logits(z, bias, t_local, lse, a_tot, b_tot, u_tot, plan, e_dtype), scale


@torch.compiler.disable  # eagerly under torch.compile (a graph break), as the token-chunked path
def loss_with_held_logits(*args):
    """`LossWithHeldLogits.apply(*args)`."""
    return LossWithHeldLogits.apply(*args)
