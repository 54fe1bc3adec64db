"""Pure-PyTorch backend: exact, any device, bounded memory (contract: backends/protocol.py).

Works on blocks of `block_n` tokens × `block_v` vocabulary rows in float32 (float64 for float64
inputs), so it never holds the N×V logits. Slow compared with the Triton kernels; it is the
reference path on CPU and the fallback where Triton cannot run.
"""

from __future__ import annotations

import torch

from .. import stats
from ..plan import Plan

# Elements of one logits block; 2**22 float32 = 16 MiB.
_BLOCK_ELEMENTS = 1 << 22


def logits_dtype(dtype: torch.dtype, exact: bool) -> torch.dtype:
    """The compute dtype, float32 (float64 for float64 inputs) whatever `exact`: every block's
    arithmetic, and the fast mode's stored Z (`logits_and_stats`; protocol.py)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compute_dtype(e: torch.Tensor) -> torch.dtype:
    return logits_dtype(e.dtype, exact=False)


def _blocks(n: int, v: int, plan: Plan) -> tuple[int, int]:
    """(tokens, vocabulary rows) per block: plan.tuning.torch_block, else 4096 rows × 2**22 elements."""
    if plan.tuning.torch_block is not None:
        block_n, block_v = plan.tuning.torch_block
        return max(1, min(n, block_n)), max(1, min(v, block_v))
    block_v = max(1, min(v, 4096))
    block_n = max(1, min(n, _BLOCK_ELEMENTS // block_v))
    return block_n, block_v


def _logits(raw, b_blk, softcap, temperature: float = 1.0):
    """Logits z of a block of raw logits e·cᵀ (bias added, softcapped, divided by the temperature),
    and dz/d(raw + bias) when softcapped or tempered (None otherwise)."""
    z = raw if b_blk is None else raw + b_blk
    dz = None
    if softcap is not None:
        th = torch.tanh(z / softcap)
        z, dz = softcap * th, 1.0 - th * th
    if temperature != 1.0:
        z = z / temperature
        dz = (1.0 / temperature) if dz is None else dz / temperature
    return z, dz


def _logit_grad(z, dcap, lse, coef_p, coef_t, coef_u, t_local, v0: int, w_blk=None, coef_q=None, mean_z=None):
    """G of a block of logits z [n, w] (columns v0.. of the shard): a·p + b·[j = t] + u·w_j
    (+ q·p·(z − pz) for the entropy), × dcap (w_j = 1 without class weights)."""
    p = torch.exp(z - lse[:, None])
    g = coef_p[:, None] * p + (coef_u[:, None] if w_blk is None else coef_u[:, None] * w_blk)
    if coef_q is not None:
        g = g + coef_q[:, None] * p * (z - mean_z[:, None])
    cols = torch.arange(v0, v0 + z.shape[1], device=z.device)
    g = g + torch.where(cols[None, :] == t_local[:, None], coef_t[:, None], 0.0)
    return g if dcap is None else g * dcap


def forward_stats(e, c, bias, t_local, plan: Plan):
    """This shard's statistics `plan.stat_names` (lse, x, s, then pz / max, argmax when asked),
    float32 [N] each (float64 for float64 inputs; see protocol.py and stats.py)."""
    n, v = e.shape[0], plan.n_valid
    cdt = _compute_dtype(e)
    names = plan.stat_names
    out = torch.zeros(len(names), n, dtype=cdt, device=e.device)
    lse, x, s = out[0], out[1], out[2]
    lse.fill_(float("-inf"))
    pz = out[names.index("pz")] if plan.need_entropy else None
    vmax, amax = (out[names.index("max")], out[names.index("argmax")]) if plan.need_argmax else (None, None)
    if vmax is not None:
        vmax.fill_(float("-inf"))
    w_all = plan.sum_weights
    block_n, block_v = _blocks(n, max(v, 1), plan)
    for n0 in range(0, n, block_n):
        n1 = min(n, n0 + block_n)
        e_blk = e[n0:n1].to(cdt)
        t_blk = t_local[n0:n1]
        m = torch.full((n1 - n0,), float("-inf"), dtype=cdt, device=e.device)
        acc = torch.zeros(n1 - n0, dtype=cdt, device=e.device)
        acc_z = torch.zeros(n1 - n0, dtype=cdt, device=e.device)  # Σ exp(z − m)·z (entropy)
        for v0 in range(0, v, block_v):
            v1 = min(v, v0 + block_v)
            b_blk = None if bias is None else bias[v0:v1].to(cdt)
            z, _ = _logits(e_blk @ c[v0:v1].to(cdt).T, b_blk, plan.softcap, plan.temperature)
            # online log-sum-exp: S ← S·exp(m − m') + Σ exp(z − m')
            blk_max, blk_arg = z.max(dim=1)  # first maximal column: ties go to the smallest id
            if vmax is not None:
                better = blk_max > vmax[n0:n1]
                amax[n0:n1] = torch.where(better, (blk_arg + v0).to(cdt), amax[n0:n1])
                vmax[n0:n1] = torch.maximum(vmax[n0:n1], blk_max)
            m_new = torch.maximum(m, blk_max)
            scale, ez = torch.exp(m - m_new), torch.exp(z - m_new[:, None])
            acc = acc * scale + ez.sum(dim=1)
            if pz is not None:
                acc_z = acc_z * scale + (ez * z).sum(dim=1)
            m = m_new
            in_blk = (t_blk >= v0) & (t_blk < v1)
            idx = (t_blk - v0).clamp(0, v1 - v0 - 1)
            x[n0:n1] += torch.where(in_blk, z.gather(1, idx[:, None]).squeeze(1), 0.0)
            if plan.need_sum:
                s[n0:n1] += z.sum(dim=1) if w_all is None else z @ w_all[v0:v1].to(cdt)
        if v > 0:
            lse[n0:n1] = m + torch.log(acc)
            if pz is not None:
                pz[n0:n1] = acc_z / acc
    return tuple(out.float() if cdt == torch.float32 else out)


def backward(e, c, bias, t_local, lse, coef_p, coef_t, coef_u, plan: Plan,
             need_de: bool, need_dc: bool, need_db: bool, coef_q=None, mean_z=None, de_fp32: bool = False,
             dc_into=None):
    """dE [N, D], dC [V_local, D], dbias [V_local] in the inputs' dtypes (see protocol.py); de_fp32:
    dE in the compute dtype (float32 for 16-bit inputs), not rounded. dc_into: each block of dC
    rows, in the compute dtype, is added into its rows (rounded once, to the target's dtype), and
    None is returned for dC."""
    n, d = e.shape
    v, v_all = plan.n_valid, c.shape[0]
    cdt = _compute_dtype(e)
    into = dc_into if need_dc else None
    de = torch.zeros(n, d, dtype=cdt, device=e.device) if need_de else None
    dc = torch.zeros_like(c) if need_dc and into is None else None
    db = torch.zeros(v_all, dtype=cdt, device=e.device) if need_db else None
    lse, coef_p, coef_t, coef_u = (t.to(cdt) for t in (lse, coef_p, coef_t, coef_u))
    if coef_q is not None:
        coef_q, mean_z = coef_q.to(cdt), mean_z.to(cdt)
    w_all = plan.sum_weights
    block_n, block_v = _blocks(n, max(v, 1), plan)
    for v0 in range(0, v, block_v):
        v1 = min(v, v0 + block_v)
        c_blk = c[v0:v1].to(cdt)
        b_blk = None if bias is None else bias[v0:v1].to(cdt)
        w_blk = None if w_all is None else w_all[v0:v1].to(cdt)
        dc_blk = torch.zeros(v1 - v0, d, dtype=cdt, device=e.device) if need_dc else None
        for n0 in range(0, n, block_n):
            n1 = min(n, n0 + block_n)
            e_blk = e[n0:n1].to(cdt)
            z, dcap = _logits(e_blk @ c_blk.T, b_blk, plan.softcap, plan.temperature)
            tok = slice(n0, n1)
            g = _logit_grad(z, dcap, lse[tok], coef_p[tok], coef_t[tok], coef_u[tok], t_local[tok], v0, w_blk,
                            None if coef_q is None else coef_q[tok], None if mean_z is None else mean_z[tok])
            if need_de:
                de[n0:n1] += g @ c_blk
            if need_dc:
                dc_blk += g.T @ e_blk
            if need_db:
                db[v0:v1] += g.sum(dim=0)
        if into is not None:
            into[v0:v1] += dc_blk
        elif need_dc:
            dc[v0:v1] = dc_blk.to(c.dtype)
    return (
        None if de is None else de if de_fp32 else de.to(e.dtype),
        dc,
        None if db is None else db.to(bias.dtype),
    )


# ---- the fast mode (paths/held.py, paths/chunked.py) ----

def fuses_plain(e, plan: Plan) -> bool:
    """No fused route for plain cross-entropy here (protocol.py): the held-logits path forms its
    coefficients by autograd."""
    return False


def logits_and_stats(e, c, bias, t_local, plan: Plan, with_ce: bool = False):
    """Z: the chunk's raw logits e·c[:n_valid]ᵀ (no bias) in `logits_dtype`, the compute dtype,
    and its rows' statistics `plan.stat_names` (lse, x, s, then max, argmax when asked;
    s = Σ_j w_j z_j with `plan.sum_weights`), see protocol.py. with_ce: not here (`fuses_plain` is
    False)."""
    if with_ce:
        raise NotImplementedError("the torch backend has no fused plain cross-entropy")
    if plan.need_entropy:
        raise NotImplementedError("the gradient-in-forward mode has no entropy statistic")
    cdt = logits_dtype(e.dtype, plan.exact)
    v = plan.n_valid
    n = e.shape[0]
    z = e.to(cdt) @ c[:v].to(cdt).T
    zc, _ = _logits(z, None if bias is None else bias[:v].to(cdt), plan.softcap)
    if v == 0:
        return (z, *stats.of_no_rows(plan.stat_names, n, zc, zc.dtype))
    lse = torch.logsumexp(zc, dim=1)
    in_shard = (t_local >= 0) & (t_local < v)
    x = torch.where(in_shard, zc.gather(1, t_local.clamp(0, v - 1)[:, None]).squeeze(1), 0.0)
    w = plan.sum_weights
    if not plan.need_sum:
        s = torch.zeros_like(lse)
    else:
        s = zc.sum(dim=1) if w is None else zc @ w.to(cdt)
    if not plan.need_argmax:
        return z, lse, x, s
    top, arg = zc.max(dim=1)  # the first maximal column: ties go to the smallest id
    return z, lse, x, s, top, arg.to(cdt)


def grad_from_logits(z, bias, t_local, lse, coef_p, coef_t, coef_u, plan: Plan, dtype):
    """G [n, n_valid] from the chunk's raw logits Z, in Z's (compute) dtype: wider than or equal
    to `dtype`, as the contract allows (exact). With `plan.sum_weights` the u term is u·w_j."""
    v = plan.n_valid
    zc, dcap = _logits(z[:, :v], None if bias is None else bias[:v].to(z.dtype), plan.softcap)
    w = plan.sum_weights
    return _logit_grad(zc, dcap, lse, coef_p, coef_t, coef_u, t_local, 0, None if w is None else w.to(z.dtype))


def plain_ce(lse, x, t, plan: Plan):
    """The plain per-token cross-entropy (protocol.py): `Plan.token_loss_parts`' first part."""
    return plan.token_loss_parts(lse, x, torch.zeros_like(lse), t)[0]


def grad_from_logits_plain(z, bias, t_local, lse, up, scale, plan: Plan, dtype):
    """`grad_from_logits` with the plain coefficients (k, −k, k·0), k = where(scored, up·scale, 0)
    (protocol.py), formed with torch ops."""
    g = up if scale is None else up * scale
    t = t_local + plan.vocab_start
    k = torch.where((t != plan.ignore_index) & (t >= 0) & (t < plan.vocab_size), g, 0.0)
    return grad_from_logits(z, bias, t_local, lse, k, -k, k * 0.0, plan, dtype)


def product_fp32(out, a, b, plan: Plan, accumulate: bool) -> None:
    """out (float32/float64) (+)= a · b, computed in out's dtype."""
    if accumulate:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def scale_in_place(t: torch.Tensor, k: torch.Tensor) -> None:
    """t (contiguous) *= k (a 0-d tensor), computed in float32 at least, in blocks of 2**22
    elements, so that neither k nor the product is rounded to a 16-bit dtype before the single
    final rounding."""
    if t.dtype in (torch.float32, torch.float64):
        t.mul_(k.to(t.dtype))
        return
    flat = t.view(-1)
    for i in range(0, flat.numel(), _BLOCK_ELEMENTS):
        blk = flat[i:i + _BLOCK_ELEMENTS]
        blk.copy_(blk.float() * k)
