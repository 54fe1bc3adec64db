"""The autograd Functions of the two modes; both take the call's `Plan` whole.

`ShardStats` (default) returns the GLOBAL per-token (lse, x, s) (see backend.py; and the optional
statistics of stats.py where the plan asks for them), already combined across the
vocabulary-parallel group. Everything built on them (label smoothing, z-loss, ignore_index,
reductions, return_lse) is ordinary PyTorch on [N] vectors, so its gradient reaches the backward
below as three per-token coefficients:
    ∂L/∂z_ij = (∂L/∂lse_i)·p_ij + (∂L/∂x_i)·[j = t_i] + (∂L/∂s_i).

The fast mode (grad_in_forward) materialises the logits once and has two Functions:
`LossWithHeldLogits` when all tokens fit one chunk (`holds_logits`): Z is held to the backward and
G is formed there, with the upstream gradient inside it (any upstream gradient); else
`LossWithGradInForward`: token chunks, G formed in the forward for an upstream gradient of 1 and
the products scaled in the backward (a uniform upstream gradient only).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from . import distributed as vp
from .plan import Plan


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def _gather_tokens(e, plan: Plan):
    """Sequence parallel: every rank's e [N_local, D] along dim 0 → [N, D] (else e itself)."""
    if not plan.sequence_parallel:
        return e
    return vp.all_gather_along_dim0(e, plan.group, "all-gather sequence-parallel hidden states")


def _grad_e_fp32(e, plan: Plan, need_de: bool) -> bool:
    """Whether dE is produced in float32: 16-bit inputs whose partial dE the group sums next, so
    that it is rounded once, after the sum (at tp=1's error), not once per rank before it."""
    return need_de and plan.sums_grad_e and e.dtype in _SIXTEEN_BIT


def _sum_grad_e(de, dtype, plan: Plan):
    """dE for e: the ranks' partial sums summed over the group (all-reduce; reduce-scatter to this
    rank's tokens under sequence parallelism), in `dtype`; with reduce_grad_e=False, this rank's
    partial sum in `dtype` as it is (the caller's own reduction decides that sum's precision)."""
    if de is None or not plan.sums_grad_e:
        return de
    return vp.sum_grad_e(de, dtype, plan.group, scatter=plan.sequence_parallel)


def _save_plan(ctx, plan: Plan) -> None:
    """Keep `plan` on ctx for the backward with its process group held WEAKLY.

    The graph (alive while any output is) must not keep the group alive: `destroy_process_group()`
    frees a group only when nothing else refers to it, and a group that outlives it keeps gloo's
    worker threads running into interpreter shutdown, where one that drops a finished collective's
    last reference needs the GIL and aborts the process ("terminate called without an active
    exception"; torch, see DESIGN.md "Process-group lifetime"). A group that cannot be referenced
    weakly is kept as before."""
    group, ref = plan.group, None
    if group is not None:
        try:
            ref = weakref.ref(group)
        except TypeError:
            ref = lambda: group  # noqa: E731  (a strong reference)
        plan = dataclasses.replace(plan, group=None)
    ctx.plan, ctx.group_ref = plan, ref


def _saved_plan(ctx) -> Plan:
    """The plan `_save_plan` kept, with its process group."""
    plan, ref = ctx.plan, ctx.group_ref
    if ref is None:
        return plan
    group = ref()
    if group is None:
        raise RuntimeError(
            "vocab_parallel_cce: the process group of this loss was destroyed before its backward "
            "(destroy_process_group / new groups must come after the backward)"
        )
    return dataclasses.replace(plan, group=group)


class ShardStats(torch.autograd.Function):
    """The global per-token statistics `plan.stat_names` (stats.py): (lse, x, s), then the
    entropy's pz = Σ_j p_j z_j and the (max, argmax) when the plan asks for them. The argmax is a
    global id (float) and, with max, not differentiable. With pz, ∂pz/∂z_j = p_j·(1 + z_j − pz),
    so the backward's coefficient of p becomes ∂L/∂lse + ∂L/∂pz and G gains
    (∂L/∂pz)·p_j·(z_j − pz) (kept as z − pz: no cancellation between two large terms)."""

    @staticmethod
    def forward(ctx, e, c, bias, t_local, plan: Plan):
        """e [N, D] (sequence parallel: this rank's [N/W, D], gathered here), c [V_local, D], bias
        [V_local] or None, t_local [N] int64 → k × float32 [N] (float64 for float64 inputs)."""
        e = _gather_tokens(e, plan)  # saved gathered, as the gather's output was before
        names = plan.stat_names
        stats = list(plan.backend.forward_stats(e, c, bias, t_local, plan))
        if plan.need_argmax:
            stats[names.index("argmax")] = stats[names.index("argmax")] + plan.vocab_start  # global ids
        if plan.world > 1:
            stats = list(vp.combine_stats(stats, names, plan.group))  # one collective for all of them
        stats = [q.clone() if q._base is not None else q for q in stats]  # no views as outputs
        ctx.save_for_backward(e, c, bias, t_local, stats[0], stats[3] if plan.need_entropy else None)
        _save_plan(ctx, plan)
        frozen = ([] if plan.need_sum else [stats[2]]) + [stats[names.index(k)] for k in ("max", "argmax")
                                                          if k in names]
        ctx.mark_non_differentiable(*frozen)
        return tuple(stats)

    @staticmethod
    def backward(ctx, *grads):
        e, c, bias, t_local, lse, pz = ctx.saved_tensors
        plan = _saved_plan(ctx)
        need_de, need_dc, need_db = ctx.needs_input_grad[:3]
        zeros = torch.zeros_like(lse)
        coef = [zeros if g is None else g.to(lse.dtype) for g in grads[:3]]
        if not plan.need_sum:
            coef[2] = zeros
        extra = {}
        if plan.need_entropy:
            q = zeros if grads[3] is None else grads[3].to(lse.dtype)
            coef[0] = coef[0] + q
            extra = dict(coef_q=q, mean_z=pz)
        de, dc, db = plan.backend.backward(
            e, c, bias, t_local, lse, *coef, plan, need_de, need_dc, need_db and bias is not None, **extra,
            de_fp32=_grad_e_fp32(e, plan, need_de),
        )
        return _sum_grad_e(de, e.dtype, plan), dc, db, None, None


_ONE_BACKWARD = ("linear_cross_entropy: the fast mode (grad_in_forward=True, or the default 'auto') can run "
                 "its backward only once (no retain_graph); pass grad_in_forward=False for a graph that "
                 "is differentiated more than once")
_NO_DOUBLE_BACKWARD = ("linear_cross_entropy: the fast mode (grad_in_forward=True, or the default 'auto') has no "
                       "double backward: it forms the gradients from the logits outside autograd, so with "
                       "create_graph=True they could not be differentiated again; for gradients that are "
                       "differentiated again pass impl='torch', grad_in_forward=False")


def _take_once(ctx, attr: str):
    """The fast mode's state for its one backward (ctx.<attr>, then cleared). Raises under
    create_graph=True (grad mode on inside a backward: the gradients would carry no graph, so a
    penalty on them would silently be 0) and on a second backward (the state is used up)."""
    if torch.is_grad_enabled():
        raise RuntimeError(_NO_DOUBLE_BACKWARD)
    value = getattr(ctx, attr)
    if value is None:
        raise RuntimeError(_ONE_BACKWARD)
    setattr(ctx, attr, None)
    return value


def _fast_outputs(ctx, loss, z_part, argmax, acc_dtype):
    """The fast-mode Functions' outputs: (loss, [z-loss part if ctx.want_z], [argmax if any]), the
    float ones in float32 unless the accumulation is float64; the argmax is not differentiable."""
    outs = [loss] + ([z_part] if ctx.want_z else []) + ([argmax] if argmax is not None else [])
    if argmax is not None:
        ctx.mark_non_differentiable(argmax)
    return tuple(q.float() if acc_dtype == torch.float32 else q for q in outs)


class LossWithGradInForward(torch.autograd.Function):
    """The fast mode's token-chunked path (taken when the logits do not fit one chunk; one chunk
    takes `LossWithHeldLogits`): the loss with its gradients computed during the forward, for an
    upstream gradient that is the same for every non-ignored token: a scalar ("mean"/"sum"), or,
    for "none", checked to be so.

    Chunks of `plan.tuning.grad_in_forward_chunk(...)` tokens (all of them while their logits fit
    in `tuning.fast_logits_bytes`): Z = E_c·C_rᵀ is materialised once ([n_c, V_r]: bf16 for bf16
    inputs, as the unfused layer's logits, else float32);
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
        e = _gather_tokens(e, plan)  # used during this forward only
        n, d = e.shape
        v, reduction, backend = plan.n_valid, plan.reduction, plan.backend
        names = plan.stat_names
        need_de, need_dc, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        acc_dtype = torch.float64 if e.dtype == torch.float64 else torch.float32
        # dE's partial sum in float32 when the group sums it in the backward (rounded once, after)
        de_dtype = torch.float32 if _grad_e_fp32(e, plan, need_de) else e.dtype
        de = torch.empty(e.shape, dtype=de_dtype, device=e.device) if need_de else None
        chunk = plan.tuning.grad_in_forward_chunk(n, v, logits_element_size(e.dtype, plan))
        # One chunk: dC = Gᵀ·E is one product, written once in c's dtype; several: accumulated over
        # the chunks in float32, rounded once at the end.
        dc_dtype = c.dtype if chunk >= n else acc_dtype
        dc_acc = torch.empty(c.shape, dtype=dc_dtype, device=c.device) if need_dc else None
        if need_dc:
            dc_acc[v:].zero_()  # padding rows; the first chunk writes rows [0, v) (no zero-fill pass)
            if n == 0:
                dc_acc.zero_()
        db = torch.zeros(c.shape[0], dtype=acc_dtype, device=c.device) if need_db else None
        total = torch.zeros((), dtype=acc_dtype, device=e.device)
        per_token = torch.empty(n, dtype=acc_dtype, device=e.device) if reduction == "none" else None
        active = torch.empty(n, dtype=torch.bool, device=e.device) if reduction == "none" else None
        held = torch.zeros(n, dtype=torch.bool, device=e.device) if loss_mask is not None else None
        want_z = want_z and plan.z_loss > 0
        z_part = torch.empty(n, dtype=acc_dtype, device=e.device) if want_z else None
        argmax = torch.empty(n, dtype=acc_dtype, device=e.device) if plan.need_argmax else None
        # "mean"/"sum": whether any token has a gradient (with none, the backward's g is unused, even inf)
        any_scored = torch.zeros((), dtype=torch.bool, device=e.device) if reduction != "none" else None
        # The chunk's objective is k_ce·Σ ce + k_z·Σ zl, then × post: "mean" = Σ ce/dens[0] + Σ zl/dens[1].
        # Its divisors go into G (k_ce = 1/dens[0], k_z = 1/dens[1]), except in float16, whose range
        # p/count would underflow: there G gets k_z = dens[0]/dens[1] (≈ a mean class weight) and the
        # products are multiplied by post = 1/dens[0] afterwards.
        k_ce = k_z = post = None
        if reduction == "mean":
            den_ce, den_z = (q.to(acc_dtype) for q in dens)
            if e.dtype != torch.float16:
                k_ce, k_z = 1.0 / den_ce, 1.0 / den_z
            else:
                k_z, post = den_ce / den_z, 1.0 / den_ce
        for n0 in range(0, n, chunk):
            n1 = min(n, n0 + chunk)
            e_c, t_c = e[n0:n1], t[n0:n1]
            t_local = t_c - plan.vocab_start
            z, *st = backend.logits_and_stats(e_c, c, bias, t_local, plan)
            if plan.need_argmax:
                st[names.index("argmax")] = st[names.index("argmax")] + plan.vocab_start  # global ids
            if plan.world > 1:
                st = vp.combine_stats(st, names, plan.group)  # one collective for all of them
            lse = st[0]
            if plan.need_argmax:
                argmax[n0:n1] = st[names.index("argmax")]
            with torch.enable_grad():
                leaves = [q.detach().requires_grad_() for q in st[:3]]
                ce, zl = plan.token_loss_parts(*leaves, t_c)
                objective = ce.sum() if k_ce is None else ce.sum() * k_ce
                if zl is not None:
                    objective = objective + (zl.sum() if k_z is None else zl.sum() * k_z)
                coef = torch.autograd.grad(objective, leaves, allow_unused=True, materialize_grads=True)
            if z_part is not None:
                z_part[n0:n1] = zl.detach()
            if per_token is None:
                total += objective.detach().to(acc_dtype)
                any_scored |= ((coef[0] != 0) | (coef[1] != 0) | (coef[2] != 0)).any()
            else:
                per_token[n0:n1] = (ce if zl is None else ce + zl).detach()
                scored = (coef[0] != 0) | (coef[1] != 0) | (coef[2] != 0)
                if loss_mask is not None:
                    m = loss_mask[n0:n1]
                    coef = [torch.where(m, q, 0.0) for q in coef]
                    held[n0:n1] = scored & ~m
                    scored = scored & m
                active[n0:n1] = scored
            g = backend.grad_from_logits(z, bias, t_local, lse, *coef, plan, e.dtype)
            if need_de:  # complete over this shard's vocabulary: written once, no accumulation
                if de.dtype != e.dtype:  # float32 partial sum (16-bit inputs, a cross-rank sum follows)
                    backend.product_fp32(de[n0:n1], g, c[:v], plan, accumulate=False)
                elif g.dtype == c.dtype:
                    torch.mm(g, c[:v], out=de[n0:n1])
                else:
                    de[n0:n1] = (g @ c[:v].to(g.dtype)).to(de.dtype)
                if post is not None:
                    backend.scale_in_place(de[n0:n1], post)
            if need_dc and dc_acc.dtype == acc_dtype:
                backend.product_fp32(dc_acc[:v], g.T, e_c.to(g.dtype), plan, accumulate=n0 > 0)
            elif need_dc and g.dtype == dc_acc.dtype == e_c.dtype:  # the only chunk, 16-bit G
                torch.mm(g.T, e_c, out=dc_acc[:v])
            elif need_dc:  # the only chunk, G wider than c (torch backend)
                dc_acc[:v] = (g.T @ e_c.to(g.dtype)).to(dc_acc.dtype)
            if need_db:
                db[:v] += g.sum(dim=0, dtype=acc_dtype)
            del z, g
        if post is not None:
            total = total * post
            for q in (dc_acc, db):
                if q is not None:
                    q.mul_(post)
        dc = dc_acc
        if need_dc and dc_acc.dtype != c.dtype:
            dc = dc_acc.to(c.dtype)
            del dc_acc
        ctx.grads = [de, dc, None if db is None else db.to(bias.dtype)]
        _save_plan(ctx, plan)
        ctx.active, ctx.held, ctx.e_dtype, ctx.want_z = active, held, e.dtype, want_z
        ctx.any_scored = any_scored
        out = total if per_token is None else per_token
        return _fast_outputs(ctx, out, z_part, argmax, acc_dtype)

    @staticmethod
    def backward(ctx, g_loss, *g_extra):
        grads = _take_once(ctx, "grads")
        plan = _saved_plan(ctx)
        k = g_loss if ctx.active is None else _uniform_upstream(g_loss, ctx.active, ctx.held)
        if ctx.any_scored is not None:  # no token with a gradient: zeros whatever g is (even inf, a 0/0 loss)
            k = torch.where(ctx.any_scored, k, 0.0)
        if ctx.want_z and g_extra and g_extra[0] is not None:
            # the z-loss output's gradient is inside the loss's: one of its own cannot be honoured
            k = torch.where((g_extra[0] != 0).any(), torch.full_like(k, float("nan")), k)
        for q in grads:
            if q is not None:
                plan.backend.scale_in_place(q, k)  # dE before the cross-rank sum, in its dtype
        grads[0] = _sum_grad_e(grads[0], ctx.e_dtype, plan)
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


def logits_element_size(dtype: torch.dtype, plan: Plan) -> int:
    """Bytes per stored logit in the fast mode: bf16 logits for bf16 inputs (not in exact mode),
    else float32 (float64 for float64 inputs)."""
    return 2 if dtype == torch.bfloat16 and not plan.exact else max(4, torch.finfo(dtype).bits // 8)


def holds_logits(plan: Plan, n: int, dtype: torch.dtype) -> bool:
    """Whether the fast mode takes the held-logits path (`LossWithHeldLogits`): all n tokens (the
    gathered ones under sequence parallelism) in ONE chunk of `plan.tuning.grad_in_forward_chunk`,
    i.e. their logits fit in `Tuning.fast_logits_bytes` (and `fast_chunk_tokens` is unset or ≥ n).
    Otherwise the fast mode is `LossWithGradInForward` (token chunks, gradients in the forward)."""
    return plan.tuning.grad_in_forward_chunk(n, plan.n_valid, logits_element_size(dtype, plan)) >= n


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
        e = _gather_tokens(e, plan)  # kept for dC = Gᵀ·E (no second gather in the backward)
        backend, names = plan.backend, plan.stat_names
        acc_dtype = torch.float64 if e.dtype == torch.float64 else torch.float32
        # plain cross-entropy over bf16 logits: ce and the coefficients formed inside the kernels
        fused = loss_mask is None and backend.fuses_plain(e, plan)
        t_local = t - plan.vocab_start if plan.vocab_start else t
        with_ce = fused and plan.world == 1  # one rank: the statistics pass writes ce
        z, *st = backend.logits_and_stats(e, c, bias, t_local, plan, with_ce=with_ce)
        ce = st.pop() if with_ce else None
        if plan.need_argmax and plan.vocab_start:
            st[names.index("argmax")] = st[names.index("argmax")] + plan.vocab_start  # global ids
        if plan.world > 1:
            st = list(vp.combine_stats(st, names, plan.group))  # one collective for all of them
        lse = st[0].contiguous()
        argmax = st[names.index("argmax")].clone() if plan.need_argmax else None
        if fused:
            out, zl, coef, k = _plain_loss(ce, lse, st[1], t, plan, dens)
            ctx.k = (k, k)
        else:
            out, zl, coef, ctx.k = _general_loss(st[:3], t, plan, dens, acc_dtype)
        # Z as a saved tensor: saved-tensor hooks (save_on_cpu, non-reentrant checkpointing) see it
        ctx.save_for_backward(e, c, bias, t_local, lse, z, coef)
        ctx.unused = True  # the backward overwrites Z with G: it may run once
        _save_plan(ctx, plan)
        ctx.loss_mask, ctx.dc_into, ctx.e_dtype = loss_mask, dc_into, e.dtype
        ctx.want_z = want_z and zl is not None
        return _fast_outputs(ctx, out, zl, argmax, acc_dtype)

    @staticmethod
    def backward(ctx, g_loss, *g_extra):
        _take_once(ctx, "unused")
        e, c, bias, t_local, lse, z, coef = ctx.saved_tensors
        plan = _saved_plan(ctx)
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
        if need_de:
            if _grad_e_fp32(e, plan, need_de):  # float32 partial sum: the group sums it, rounds once
                de = torch.empty(e.shape, dtype=torch.float32, device=e.device)
                backend.product_fp32(de, grad, c[:v], plan, accumulate=False)
            elif grad.dtype == c.dtype:
                de = torch.mm(grad, c[:v])
            else:
                de = (grad @ c[:v].to(grad.dtype)).to(e.dtype)
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
        return _sum_grad_e(de, e.dtype, plan), dc, db, None, None, None, None, None, None


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


def _general_loss(stats, t, plan: Plan, dens, acc_dtype):
    """The held path's loss for any plan: (loss, z-loss part or None, coefficients [3 or 4, N],
    (k_ce, k_z)) with the per-token coefficients (a, b, u[, a_z]) by autograd on the [N] vectors
    (`LossWithHeldLogits`) and "mean"'s divisors as device scalars k = 1/den (else None)."""
    with torch.enable_grad():
        leaves = [q.detach().requires_grad_() for q in stats]
        ce, zl = plan.token_loss_parts(*leaves, t)
        coef = list(torch.autograd.grad(ce.sum(), leaves, allow_unused=True, materialize_grads=True))
        if zl is not None:  # ∂zl_i/∂lse_i, on its own: the z-loss output may get a gradient of its own
            coef += list(torch.autograd.grad(zl.sum(), leaves[:1], allow_unused=True, materialize_grads=True))
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


class _AccumulateGradInto(torch.autograd.Function):
    """Identity on c whose backward adds c's gradient into `target` and hands none on (the
    `dc_accumulate_into` option on the paths that form dC as a tensor: memory-first, and the fast
    mode's token chunks)."""

    @staticmethod
    def forward(ctx, c, target):
        ctx.target = target
        ctx.set_materialize_grads(False)
        return c.view_as(c)

    @staticmethod
    def backward(ctx, grad):
        if grad is not None:
            ctx.target.add_(grad)
        return None, None
