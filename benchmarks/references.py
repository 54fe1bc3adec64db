"""float64 references of the mean cross-entropy and its gradients, errors against them, FLOP counts.

`Reference.build` computes, once per shape and input kind, the float64 loss over all tokens, dE on
a random subset of `rows` tokens and, where asked, dC (which needs every token); `check` runs a
method once and gives its errors ‖x − ref‖/‖ref‖. Chunked over the vocabulary (~1 GiB of float64
logits at a time), so it runs at the benchmark sizes on one GPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from inputs import softmax_stats
from tables import short_error
from timing import free_memory, is_oom, sync


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius, float64); |a − b| / |b| for scalars. NaN/inf propagate."""
    a = torch.as_tensor(a).detach()
    b = torch.as_tensor(b).detach()
    if a.shape != b.shape:
        raise ValueError(f"rel_err: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.device != b.device:
        a = a.to(b.device)
    num = den = 0.0
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    step = 1 << 26  # bound float64 temporaries
    for i in range(0, max(1, flat_b.numel()), step):
        x, y = flat_a[i:i + step].double(), flat_b[i:i + step].double()
        num += (x - y).pow(2).sum().item()
        den += y.pow(2).sum().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return math.sqrt(num / den)


def fwd_flops(n: int, d: int, v: int) -> float:
    return 2.0 * n * d * v


def fwd_bwd_flops(n: int, d: int, v: int) -> float:
    """The no-recompute floor 6·N·D·V (CCE-style methods recompute the logits: 8·N·D·V)."""
    return 6.0 * n * d * v


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms and ms > 0 else float("nan")


def fraction_of_peak(flops: float, ms: float, peak_tflops: float) -> float:
    """Achieved rate (flops / time) as a fraction of `peak_tflops`."""
    return tflops(flops, ms) / peak_tflops if peak_tflops else float("nan")


def _vocab_chunk(n: int, budget_bytes: int = 1 << 30) -> int:
    return max(128, budget_bytes // (8 * max(n, 1)))


@torch.no_grad()
def reference_lse(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor):
    """float64 (lse [N], correct logit [N]) of all tokens, chunked over the vocabulary."""
    n, v = e.shape[0], c.shape[0]
    e64 = e.double()
    m = torch.full((n,), float("-inf"), dtype=torch.float64, device=e.device)
    acc = torch.zeros(n, dtype=torch.float64, device=e.device)
    x = torch.zeros(n, dtype=torch.float64, device=e.device)
    step = _vocab_chunk(n)
    for v0 in range(0, v, step):
        v1 = min(v, v0 + step)
        z = e64 @ c[v0:v1].double().T
        m_new = torch.maximum(m, z.amax(1))
        acc = acc * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(1)
        m = m_new
        inb = (targets >= v0) & (targets < v1)
        idx = (targets - v0).clamp(0, v1 - v0 - 1)
        x += torch.where(inb, z.gather(1, idx[:, None]).squeeze(1), 0.0)
        del z
    return m + acc.log(), x


@torch.no_grad()
def reference_grads(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                    rows: torch.Tensor | None = None, need_dc: bool = False, out_dtype=torch.float32):
    """Gradients of the MEAN loss over all N tokens, computed in float64.

    dE is returned for `rows` only (all tokens when None); dC (needs every token) when need_dc.
    Results are stored in `out_dtype` (float32 keeps ~1e-7 precision at half the memory).
    """
    n, v = e.shape[0], c.shape[0]
    all_idx = torch.arange(n, device=e.device)
    src_idx = all_idx if (need_dc or rows is None) else rows
    e64 = e[src_idx].double()
    t = targets[src_idx]
    l = lse[src_idx]
    de = torch.zeros(len(src_idx), e.shape[1], dtype=torch.float64, device=e.device)
    dc = torch.empty(v, e.shape[1], dtype=out_dtype, device=e.device) if need_dc else None
    step = _vocab_chunk(len(src_idx))
    for v0 in range(0, v, step):
        v1 = min(v, v0 + step)
        c64 = c[v0:v1].double()
        g = torch.exp(e64 @ c64.T - l[:, None])
        inb = (t >= v0) & (t < v1)
        r = torch.nonzero(inb).squeeze(1)
        g[r, t[r] - v0] -= 1.0
        g /= n
        de += g @ c64
        if need_dc:
            dc[v0:v1] = (g.T @ e64).to(out_dtype)
        del g, c64
    if need_dc and rows is not None:
        de = de[rows]
    return de.to(out_dtype), dc



@dataclass
class Reference:
    """The float64 mean loss, dE on `rows` (float32 [k, D]) and dC (float32 [V, D], or None)."""

    loss: float
    rows: torch.Tensor | None
    de: torch.Tensor | None
    dc: torch.Tensor | None
    seconds: float

    @staticmethod
    def build(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, check_rows: int = 256,
              check_dc: bool = False, seed: int = 0) -> "Reference":
        t0 = time.perf_counter()
        lse, x = reference_lse(e, c, targets)
        loss = float((lse - x).mean())
        rows = de = dc = None
        if check_rows > 0 or check_dc:
            g = torch.Generator(device="cpu").manual_seed(seed + 1)
            k = min(check_rows, e.shape[0]) if check_rows > 0 else e.shape[0]
            rows = torch.randperm(e.shape[0], generator=g)[:k].sort().values.to(e.device)
            de, dc = reference_grads(e, c, targets, lse, rows=rows, need_dc=check_dc)
        sync()
        return Reference(loss, rows, de, dc, time.perf_counter() - t0)

    def check(self, loss_fn, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> dict:
        """One call of `loss_fn(e, c, targets)` (a mean loss) and its gradients against this
        reference: {loss, loss_rel_err, de_rel_err (on rows), dc_rel_err (where dC was built)}."""
        e_g = e.detach().requires_grad_(True)
        c_g = c.detach().requires_grad_(True)
        if hasattr(loss_fn, "loss_and_grads"):  # a Method (its dC may go into a main_grad)
            loss, de, dc = loss_fn.loss_and_grads(e_g, c_g, targets)
        else:
            loss = loss_fn(e_g, c_g, targets)
            de, dc = torch.autograd.grad(loss, (e_g, c_g))
        sync()
        out = {"loss": float(loss.detach())}
        out["loss_rel_err"] = abs(out["loss"] - self.loss) / abs(self.loss)
        if self.de is not None:
            out["de_rel_err"] = rel_err(de[self.rows], self.de)
        if self.dc is not None:
            out["dc_rel_err"] = rel_err(dc, self.dc)
        return out


def error_text(err: BaseException) -> str:
    """An exception as one table cell, "OOM: " first when it was one."""
    return ("OOM: " if is_oom(err) else "") + short_error(err)


def case_checks(entry: dict, e, c, t, args, check_dc: bool) -> "Reference | None":
    """A case's input statistics (entry["stats"], --stats-tokens) and its float64 reference
    (entry's ref_loss, ref_seconds; None with --no-check); a failure of either is recorded in the
    entry ("stats_error", "ref_error") and the case goes on."""
    if args.stats_tokens > 0:
        try:
            entry["stats"] = softmax_stats(e, c, t, n_sub=args.stats_tokens)
        except Exception as err:  # noqa: BLE001
            entry["stats_error"] = error_text(err)
        free_memory()
    if args.no_check:
        return None
    try:
        ref = Reference.build(e, c, t, args.check_rows, check_dc, args.seed)
        entry.update(ref_loss=ref.loss, ref_seconds=ref.seconds)
    except Exception as err:  # noqa: BLE001
        entry["ref_error"] = error_text(err)
        ref = None
    free_memory()
    return ref
