"""Shared pieces of the benchmarks: inputs, timing, errors, references, the method registry.

Import as `from benchmarks.common import ...` (run the scripts from the repository root with
PYTHONPATH=.) or `import common` from inside benchmarks/.

Inputs (`make_inputs`):
  random  untrained-like: e ~ N(0,1), c ~ N(0, (σ/√D)²) → logits ~ N(0, σ²), σ = 2, uniform targets;
          the softmax is dense (every 128×128 tile matters), loss ≈ log V + σ²/2.
  random1 the same with σ = 1: few p_ij reach 2^-12 (≈48% of 128×128 tiles at V = 128256, ≈3% at
          V = 256000), so tile-skipping kernels skip most of the backward.
  zipf    trained-like: a Zipf prior p_j ∝ 1/rank^1.1 over the vocabulary, targets drawn from it,
          and logits  z_ij ≈ a·log p_j + B_i·[j = t_i] + noise_ij  built from vectors:
              c_j = a·log p_j · u + W_j              (u a unit vector, W_j ⟂ u, |W_j| ≈ 1)
              e_i = u + B_i·W_{t_i} + ξ_i            (ξ_i ⟂ u; off-target noise ~ N(0, σ_n²))
          then e and c are rescaled (e/k, c·k, same logits) so e has unit-rms entries.
          Defaults give, at V = 128256, mean loss ≈ 1.75–1.8 nats and ≈ 34% of the 128×128 tiles
          holding some p ≥ 2^-12 once the columns are sorted by mean logit; at V = 256000 ≈ 1.9 nats
          and ≈ 17% (check with `softmax_stats`). The statistics do not depend on D.
          Token ids are not shuffled by default (frequent tokens get low ids, as in BPE vocabularies).
  zipf_shuffled  the same with the token ids permuted (frequent tokens anywhere in the vocabulary):
          make_inputs(kind="zipf", shuffle=True).
"""

from __future__ import annotations

import math
import os
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}

# Zipf input defaults (see module docstring); tuned with softmax_stats at V = 128256.
ZIPF_DEFAULTS = dict(exponent=1.1, a=0.9, boost=9.5, boost_std=4.0, noise=1.6, shuffle=False)
RANDOM_LOGIT_STD = 2.0
KINDS = ("random", "random1", "zipf", "zipf_shuffled")


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def parse_shape(s: str) -> tuple[int, int, int]:
    """'8192x2304x256000' → (N, D, V)."""
    parts = s.lower().replace("×", "x").split("x")
    if len(parts) != 3:
        raise ValueError(f"shape {s!r}: expected NxDxV")
    n, d, v = (int(p) for p in parts)
    return n, d, v


def zipf_prior(v: int, exponent: float = 1.1, device="cpu") -> torch.Tensor:
    """p_r ∝ 1/r^exponent for r = 1..v, float64, sums to 1 (index = rank − 1)."""
    r = torch.arange(1, v + 1, dtype=torch.float64, device=device)
    p = r.pow(-exponent)
    return p / p.sum()


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def make_inputs(n: int, d: int, v: int, dtype=torch.bfloat16, kind: str = "random", device="cuda",
                seed: int = 0, **zipf_kw):
    """(e [N, D], c [V, D], targets [N] int64) on `device`; e and c in `dtype`, no grad.

    Deterministic for a given (n, d, v, kind, device type, seed): every rank of a distributed
    benchmark gets the same tensors and can slice its own shard of c.
    """
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    g = _generator(device, seed)
    if kind in ("random", "random1"):
        std = RANDOM_LOGIT_STD if kind == "random" else 1.0
        e = torch.randn(n, d, device=device, generator=g)
        c = torch.randn(v, d, device=device, generator=g) * (std / math.sqrt(d))
        t = torch.randint(0, v, (n,), device=device, generator=g)
        return e.to(dtype), c.to(dtype), t
    if kind not in ("zipf", "zipf_shuffled"):
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    kw = {**ZIPF_DEFAULTS, **zipf_kw}
    if kind == "zipf_shuffled":
        kw["shuffle"] = True
    unknown = set(kw) - set(ZIPF_DEFAULTS)
    if unknown:
        raise TypeError(f"make_inputs: unknown zipf options {sorted(unknown)}")
    prior = zipf_prior(v, kw["exponent"], device)  # by rank
    logp = prior.log()
    if kw["shuffle"]:
        perm = torch.randperm(v, device=device, generator=g)  # token id of rank r = perm[r]
        logp = torch.empty_like(logp).scatter_(0, perm, logp)
        prior = logp.exp()
    logp = (logp - logp.mean()).float()  # centring changes no softmax, keeps |c| small
    t = torch.multinomial(prior.float(), n, replacement=True, generator=g)

    u = torch.randn(d, device=device, generator=g)
    u = u / u.norm()

    def perp(x):  # remove the u component of each row
        return x - (x @ u)[:, None] * u[None, :]

    # c in chunks of rows to bound float32 temporaries at big V.
    c = torch.empty(v, d, device=device, dtype=torch.float32)
    w = torch.empty(v, d, device=device, dtype=torch.float32)
    step = max(1, (1 << 26) // d)
    for v0 in range(0, v, step):
        v1 = min(v, v0 + step)
        wi = perp(torch.randn(v1 - v0, d, device=device, generator=g) / math.sqrt(d))
        w[v0:v1] = wi
        c[v0:v1] = kw["a"] * logp[v0:v1, None] * u[None, :] + wi
    boost = (kw["boost"] + kw["boost_std"] * torch.randn(n, device=device, generator=g)).clamp_min(0.0)
    # Off-target logit noise: B_i·W_t·W_j ~ N(0, B_i²/d) plus ξ_i·W_j ~ N(0, σ_i²) (ξ has entries of
    # variance σ_i², W_j of 1/d); σ_i² = noise² − B_i²/d keeps the total at noise² for any D.
    sigma = (kw["noise"] ** 2 - boost.pow(2) / d).clamp_min(0.0).sqrt()
    xi = perp(torch.randn(n, d, device=device, generator=g)) * sigma[:, None]
    e = u[None, :] + boost[:, None] * w[t] + xi
    del w
    k = e.pow(2).mean().sqrt()  # rescale: unit-rms hidden states, same logits
    e, c = e / k, c * k
    return e.to(dtype), c.to(dtype), t


@torch.no_grad()
def softmax_stats(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, n_sub: int = 1024,
                  tile: int = 128, eps: float = 2.0 ** -12, chunk: int = 16384) -> dict:
    """Statistics of the softmax on the first `n_sub` tokens, in float32 (float64 for fp64 inputs).

    mean_loss: mean cross-entropy (nats); tile_frac: fraction of tile×tile (tokens × vocabulary)
    tiles holding some p ≥ eps after sorting the columns by their mean logit (descending);
    tile_frac_unsorted: the same in the original column order; mean_max_p, mean_entropy.
    """
    n = min(n_sub, e.shape[0])
    cdt = torch.float64 if e.dtype == torch.float64 else torch.float32
    es, ts = e[:n].to(cdt), targets[:n]
    v = c.shape[0]
    z = torch.empty(n, v, dtype=cdt, device=e.device)
    for v0 in range(0, v, chunk):
        z[:, v0:v0 + chunk] = es @ c[v0:v0 + chunk].to(cdt).T
    lse = torch.logsumexp(z, dim=1)
    loss = (lse - z.gather(1, ts[:, None]).squeeze(1)).mean().item()
    order = torch.argsort(z.mean(dim=0), descending=True)
    p = torch.exp(z - lse[:, None])  # in place would save memory; n_sub is small
    del z
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1).mean().item()
    max_p = p.max(dim=1).values.mean().item()

    def frac(pm):
        nb, vb = -(-n // tile), -(-v // tile)
        pad = torch.zeros(nb * tile, vb * tile, dtype=pm.dtype, device=pm.device)
        pad[:n, :v] = pm
        tmax = pad.view(nb, tile, vb, tile).amax(dim=(1, 3))
        return (tmax >= eps).float().mean().item()

    out = dict(n_tokens=n, mean_loss=loss, tile_frac=frac(p[:, order]), tile_frac_unsorted=frac(p),
               mean_max_p=max_p, mean_entropy=entropy, tile=tile, eps=eps)
    return out


# ----------------------------------------------------------------------------------------------
# timing and errors
# ----------------------------------------------------------------------------------------------
def time_cuda(fn: Callable[[], object], warmup: int = 3, rep: int = 10, max_seconds: float | None = None):
    """(median ms, peak added MB) of `fn()`; CUDA events on GPU, perf_counter on CPU.

    Peak added memory = max_memory_allocated during the timed calls − memory allocated before
    them (so it counts the call's temporaries and outputs, e.g. gradients, not the inputs).
    With `max_seconds`, the number of timed reps is cut (to ≥ 3) so they fit in about that time.
    NaN for memory on CPU.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    per = None
    for _ in range(warmup):  # the last warm-up call (past any compilation) estimates the cost
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        per = time.perf_counter() - t0
    if max_seconds is not None and per is not None:
        rep = max(3, min(rep, int(max_seconds / max(per, 1e-9))))
    times = []
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for i in range(rep):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(en) for s, en in zip(starts, ends)]
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        for _ in range(rep):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        peak = float("nan")
    return statistics.median(times), peak


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


def measure_matmul_peak(device="cuda", n: int = 8192, dtype=torch.bfloat16, warmup: int = 5, rep: int = 10) -> float:
    """TFLOP/s of an n³ matmul (median of `rep` after `warmup`)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms, _ = time_cuda(lambda: torch.mm(a, b, out=out), warmup=warmup, rep=rep)
    del a, b, out
    return tflops(2.0 * n ** 3, ms)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def short_error(err: BaseException, limit: int = 300) -> str:
    s = f"{type(err).__name__}: {err}".replace("\n", " ")
    return s if len(s) <= limit else s[:limit] + "…"


def free_memory():
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# float64 references (chunked over the vocabulary; fine on an H200 at the benchmark sizes)
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
@dataclass
class Method:
    """A loss implementation: `fn(e [N, D], c [V, D], targets [N]) → mean loss` (float scalar)."""

    name: str
    fn: Callable | None
    needs_cuda: bool = False
    max_nv: float | None = None  # skip when N·V is larger (slow reference paths)
    skip_reason: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)

    def usable(self, device: torch.device, n: int, v: int) -> tuple[bool, str]:
        if self.fn is None:
            return False, self.skip_reason or "unavailable"
        if self.needs_cuda and torch.device(device).type != "cuda":
            return False, "needs CUDA"
        if self.max_nv is not None and n * v > self.max_nv:
            return False, f"N·V = {n * v:.3g} > {self.max_nv:.3g} (slow path; raise with --max-nv)"
        return True, ""

    def __call__(self, e, c, t):
        return self.fn(e, c, t)


def tuning_type():
    """The library's `Tuning` class (None, with the reason, when this version has none)."""
    try:
        import vocab_parallel_cce as lib

        cls = getattr(lib, "Tuning", None)
        if cls is None:
            from vocab_parallel_cce.tuning import Tuning as cls
        return cls, ""
    except Exception as err:  # noqa: BLE001
        return None, short_error(err)


def parse_tuning(spec: str):
    """'group_v=8 g_inside_dc=0' (fields separated by spaces or ';') → `Tuning(group_v=8, ...)`.

    Values: block configs as comma-separated ints ('grad_block=128,256,64,8,3'), booleans as
    0/1/true/false, 'none' for None; other fields take the type of their default (int or float).
    """
    from dataclasses import fields as dc_fields

    cls, why = tuning_type()
    if cls is None:
        raise ValueError(f"--tuning: the installed vocab_parallel_cce has no Tuning ({why})")
    known = {f.name: f for f in dc_fields(cls)}
    kw = {}
    for item in spec.replace(";", " ").split():
        name, sep, raw = item.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--tuning {spec!r}: expected FIELD=VALUE with FIELD one of {sorted(known)}, got {item!r}")
        default = known[name].default
        if raw.lower() == "none":
            kw[name] = None
        elif name.endswith("_block"):
            kw[name] = tuple(int(x) for x in raw.split(","))
        elif isinstance(default, bool):
            if raw.lower() not in ("0", "1", "true", "false"):
                raise ValueError(f"--tuning {item!r}: expected 0/1/true/false")
            kw[name] = raw.lower() in ("1", "true")
        elif isinstance(default, float):
            kw[name] = float(raw)
        else:
            kw[name] = int(raw)
    return cls(**kw)


def _accepts_tuning(fn) -> bool:
    import inspect

    try:
        return "tuning" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _ours(impl: str, filter_eps="auto", name: str | None = None, grad_in_forward: bool | None = None,
          tuning=None, tuning_spec: str = "") -> Method:
    """Our function with `filter_eps` ("auto": adaptive dC tile skipping, None: dense, a number:
    always skip), the mode `grad_in_forward` (None: the library's default; True: fast; False:
    memory-first, where filter_eps applies) and a `Tuning` (passed as `tuning=`)."""
    name = name or f"vpcce_{impl}"
    try:
        from vocab_parallel_cce import linear_cross_entropy
    except Exception as err:  # noqa: BLE001
        return Method(name, None, skip_reason=short_error(err))
    kw = {} if filter_eps == "auto" else {"filter_eps": filter_eps}
    if grad_in_forward is not None:
        kw["grad_in_forward"] = grad_in_forward
    if tuning is not None:
        if not _accepts_tuning(linear_cross_entropy):
            return Method(name, None, skip_reason="this vocab_parallel_cce's linear_cross_entropy takes no tuning=")
        kw["tuning"] = tuning

    def fn(e, c, t):
        return linear_cross_entropy(e, c, t, impl=impl, **kw)

    notes = [] if filter_eps == "auto" else [f"filter_eps={filter_eps if filter_eps is None else format(filter_eps, 'g')}"]
    if grad_in_forward:
        notes.append("grad_in_forward=True")
    if tuning_spec:
        notes.append(f"Tuning({tuning_spec})")
    if impl.startswith("triton"):
        try:
            import triton  # noqa: F401
        except Exception as err:  # noqa: BLE001
            return Method(name, None, skip_reason=f"triton missing ({short_error(err)})")
        return Method(name, fn, needs_cuda=True, note=" ".join(notes),
                      extra={"adaptive": filter_eps == "auto" and not grad_in_forward, "tuning": tuning})
    return Method(name, fn, max_nv=2.0**28, note=" ".join(["impl=torch (chunked reference path)"] + notes))


def _torch_eager() -> Method:
    def fn(e, c, t):
        logits = e @ c.T
        return F.cross_entropy(logits.float(), t)

    return Method("torch_eager", fn, note="logits = e @ c.T; F.cross_entropy(logits.float(), t)")


def _torch_compile() -> Method:
    def loss(e, c, t):
        logits = e @ c.T
        return F.cross_entropy(logits.float(), t)

    # dynamic=False specialises (recompiles) per shape and per grad mode: 2 per shape. Past dynamo's
    # recompile limit (8) it would silently run eager, so raise it for the suites' 6 shapes.
    import torch._dynamo

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(64, getattr(torch._dynamo.config, key)))
    compiled = torch.compile(loss, dynamic=False)
    return Method("torch_compile", compiled, note="torch.compile of torch_eager, dynamic=False")


def _torch_linear_ce() -> Method:
    """torch.nn.functional.linear_cross_entropy (torch ≥ 2.12), with its chunked path
    (`options=torch.nn.LinearCrossEntropyOptions()`) where the installed torch has it."""
    flce = getattr(F, "linear_cross_entropy", None)
    if flce is None:
        return Method("torch_linear_ce", None,
                      skip_reason=f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    kw = {} if options_cls is None else {"options": options_cls()}

    def fn(e, c, t):
        return flce(e, c, t, **kw)

    how = "options=LinearCrossEntropyOptions() (chunked)" if kw else "reference path"
    return Method("torch_linear_ce", fn, note=f"torch {torch.__version__} F.linear_cross_entropy, {how}")


_SINGLE_GROUP: dict = {}


def single_process_group(device: torch.device):
    """A process group of this process alone (NCCL on CUDA, gloo on CPU), made once; the world
    group when torch.distributed is already initialised with one process."""
    import socket

    import torch.distributed as dist

    key = torch.device(device).type
    if key in _SINGLE_GROUP:
        return _SINGLE_GROUP[key]
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        backend = "nccl" if key == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        group = dist.group.WORLD
    elif dist.get_world_size() == 1:
        group = dist.group.WORLD
    else:
        raise RuntimeError("torch.distributed already has several ranks; run this method in a single process")
    _SINGLE_GROUP[key] = group
    return group


def _megatron_fused() -> Method:
    """Megatron-core's fused vocab-parallel cross-entropy on materialised logits e @ c.T (the
    input dtype, as Megatron's output layer gives), with a group of one process."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy as ce
        from importlib.metadata import version as _v

        version = _v("megatron-core")
    except Exception as err:  # noqa: BLE001
        return Method("megatron_fused", None, skip_reason=short_error(err))

    def fn(e, c, t):
        group = single_process_group(e.device)
        logits = e @ c.T
        # Megatron's layout: logits [s, b, V], targets [s, b] (here b = 1).
        return ce(logits[:, None, :], t[:, None], group).mean()

    return Method("megatron_fused", fn, note=f"megatron-core {version} fused_vocab_parallel_cross_entropy "
                                               "on bf16 logits e @ c.T, 1-process group")


def _liger() -> Method:
    try:
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as flce
        except Exception:  # noqa: BLE001  (older/newer layouts: use the autograd Function directly)
            flce = None
        if flce is None:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            def flce(input, weight, target):  # noqa: A002
                return LigerFusedLinearCrossEntropyFunction.apply(input, weight, target)[0]
        import liger_kernel

        version = getattr(liger_kernel, "__version__", None)
        if version is None:
            from importlib.metadata import version as _v

            version = _v("liger-kernel")
    except Exception as err:  # noqa: BLE001
        return Method("liger", None, skip_reason=short_error(err))

    def fn(e, c, t):
        out = flce(e, c, t)
        return out[0] if isinstance(out, tuple) else out

    return Method("liger", fn, needs_cuda=True, note=f"liger-kernel {version} FLCE (defaults)")


def _apple(exact: bool) -> Method:
    name = "apple_cce_exact" if exact else "apple_cce"
    try:
        import cut_cross_entropy as cce
    except Exception as err:  # noqa: BLE001
        return Method(name, None, skip_reason=short_error(err))
    version = getattr(cce, "__version__", "?")
    impls = {m.name.lower() for m in getattr(cce, "LinearCrossEntropyImpl", [])}
    if not exact:
        def fn(e, c, t):
            return cce.linear_cross_entropy(e, c, t, impl="cce")
        note = f"cut-cross-entropy {version} impl=cce"
    elif "cce_exact" in impls:
        def fn(e, c, t):
            return cce.linear_cross_entropy(e, c, t, impl="cce_exact")
        note = f"cut-cross-entropy {version} impl=cce_exact"
    else:
        def fn(e, c, t):
            return cce.linear_cross_entropy(e, c, t, impl="cce", filter_eps=None)
        note = f"cut-cross-entropy {version} has no cce_exact: impl=cce, filter_eps=None"
    return Method(name, fn, needs_cuda=True, note=note)


METHOD_FACTORIES: dict[str, Callable[[], Method]] = {
    "vpcce_triton": lambda: _ours("triton"),
    "vpcce_triton_gif": lambda: _ours("triton", name="vpcce_triton_gif", grad_in_forward=True),
    "vpcce_triton_memory": lambda: _ours("triton", name="vpcce_triton_memory", grad_in_forward=False),
    "vpcce_triton_exact": lambda: _ours("triton_exact"),
    "vpcce_triton_dense": lambda: _ours("triton", None, "vpcce_triton_dense", grad_in_forward=False),
    "vpcce_triton_filter": lambda: _ours("triton", 2.0**-12, "vpcce_triton_filter", grad_in_forward=False),
    "vpcce_triton_filter14": lambda: _ours("triton", 2.0**-14, "vpcce_triton_filter14", grad_in_forward=False),
    "vpcce_torch": lambda: _ours("torch"),
    "vpcce_torch_gif": lambda: _ours("torch", name="vpcce_torch_gif", grad_in_forward=True),
    "torch_eager": _torch_eager,
    "torch_compile": _torch_compile,
    "torch_linear_ce": _torch_linear_ce,
    "liger": _liger,
    "apple_cce": lambda: _apple(False),
    "apple_cce_exact": lambda: _apple(True),
    "megatron_fused": _megatron_fused,
}
# Our methods that take a `Tuning` (run.py --tuning makes a variant of each one selected).
TUNABLE = {"vpcce_triton": dict(impl="triton"),
           "vpcce_triton_gif": dict(impl="triton", grad_in_forward=True),
           "vpcce_triton_memory": dict(impl="triton", grad_in_forward=False),
           "vpcce_triton_exact": dict(impl="triton_exact"),
           "vpcce_triton_dense": dict(impl="triton", filter_eps=None, grad_in_forward=False),
           "vpcce_triton_filter": dict(impl="triton", filter_eps=2.0**-12, grad_in_forward=False),
           "vpcce_triton_filter14": dict(impl="triton", filter_eps=2.0**-14, grad_in_forward=False),
           "vpcce_torch": dict(impl="torch"),
           "vpcce_torch_gif": dict(impl="torch", grad_in_forward=True)}
# Reference rows of run.py's loss suite: timed cuBLAS products, not losses.
REFERENCE_ROWS = ("cublas_3x", "cublas_4x")
DEFAULT_METHODS = ["vpcce_triton", "vpcce_triton_memory", "torch_compile", "torch_eager", "liger", "apple_cce",
                   "megatron_fused", "torch_linear_ce", "cublas_3x", "cublas_4x"]


def build_method(name: str, tuning_spec: str | None = None) -> Method:
    """The method `name`; with `tuning_spec` ('field=value ...'), our method under that Tuning,
    named 'name[spec]'."""
    if tuning_spec:
        label = f"{name}[{tuning_spec}]"
        if name not in TUNABLE:
            raise ValueError(f"--tuning applies to {sorted(TUNABLE)}, not {name!r}")
        try:
            tuning = parse_tuning(tuning_spec)
        except ValueError as err:
            return Method(label, None, skip_reason=str(err))
        return _ours(name=label, tuning=tuning, tuning_spec=tuning_spec, **TUNABLE[name])
    if name not in METHOD_FACTORIES:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHOD_FACTORIES) + list(REFERENCE_ROWS)}")
    try:
        return METHOD_FACTORIES[name]()
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        return Method(name, None, skip_reason=short_error(err))


def time_products(n: int, d: int, v: int, dtype=torch.bfloat16, device="cuda", warmup: int = 3, rep: int = 10,
                  max_seconds: float | None = None, seed: int = 0) -> dict:
    """Median ms of the three logits-shaped products of a loss's forward+backward, in `dtype`:
    E·Cᵀ [N, V] (logits), G·C [N, D] (dE), Gᵀ·E [V, D] (dC), with G a random [N, V] tensor.
    cublas_3x = their sum (the no-recompute floor), cublas_4x = that + one more E·Cᵀ (recompute)."""
    g = _generator(torch.device(device), seed)
    e = torch.randn(n, d, device=device, generator=g).to(dtype)
    c = torch.randn(v, d, device=device, generator=g).to(dtype)
    grad = (torch.randn(n, v, device=device, generator=g) * 1e-3).to(dtype)
    z = torch.empty(n, v, device=device, dtype=dtype)
    de = torch.empty(n, d, device=device, dtype=dtype)
    dc = torch.empty(v, d, device=device, dtype=dtype)
    out = {}
    for label, fn in (("E@C.T [N,V]", lambda: torch.mm(e, c.T, out=z)),
                      ("G@C [N,D]", lambda: torch.mm(grad, c, out=de)),
                      ("G.T@E [V,D]", lambda: torch.mm(grad.T, e, out=dc))):
        out[label], _ = time_cuda(fn, warmup, rep, max_seconds)
    del e, c, grad, z, de, dc
    three = sum(out.values())
    return {"products_ms": out, "cublas_3x": three, "cublas_4x": three + out["E@C.T [N,V]"]}


def env_info() -> dict:
    """Software and machine: versions, host, GPU name, count and driver."""
    import platform
    import subprocess

    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "python": platform.python_version(), "host": platform.node()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if torch.cuda.is_available():  # names from nvidia-smi: no CUDA context in a process that needs none
        info["device_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
        try:
            first = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.split("\n")[0]
            info["device_name"], info["driver"] = (x.strip() for x in first.split(",", 1))
        except Exception:  # noqa: BLE001
            info["driver"] = None
        if torch.cuda.is_initialized() or not info.get("device_name"):
            info["device_name"] = torch.cuda.get_device_name()
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("liger-kernel", "cut-cross-entropy", "megatron-core", "vocab_parallel_cce"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    return info


def fmt(x, spec: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, str):
        return x
    return format(x, spec)


def jsonable(x):
    """`x` with tensors dropped and non-finite floats as strings, for json.dump."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items() if not isinstance(v, torch.Tensor)}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return str(x)
    return x


def run_logged(cmd: list[str], log_path: str, timeout: float | None = None, env: dict | None = None,
               cwd: str | None = None, echo: bool = True) -> tuple[int, str]:
    """Run `cmd`, echoing its output (unless `echo` is False) and saving it to `log_path`; (return
    code, its last lines).
    Past `timeout` seconds its process group is killed and the return code is 124."""
    import signal
    import subprocess
    import sys
    import threading

    tail: list[str] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env, cwd=cwd, start_new_session=True)

        def pump():
            for line in proc.stdout:
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                log.write(line)
                tail.append(line.rstrip("\n"))
                del tail[:-30]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
        reader.join(timeout=10)
    return rc, "\n".join(tail)
