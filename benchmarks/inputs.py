"""The benchmarks' inputs: shapes, dtypes, and (e, c, targets) of four kinds (`make_inputs`):
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

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}

# Zipf input defaults (see module docstring); tuned with softmax_stats at V = 128256.
ZIPF_DEFAULTS = dict(exponent=1.1, a=0.9, boost=9.5, boost_std=4.0, noise=1.6, shuffle=False)
RANDOM_LOGIT_STD = 2.0
KINDS = ("random", "random1", "zipf", "zipf_shuffled")


def parse_shape(s: str) -> tuple[int, int, int]:
    """'8192x2304x256000' → (N, D, V)."""
    parts = s.lower().replace("×", "x").split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape {s!r}: expected NxDxV, three positive integers")
    n, d, v = (int(p) for p in parts)
    return n, d, v


def parse_shapes(spec: str, all_shapes: list[str]) -> list[tuple[int, int, int]]:
    """'NxDxV,NxDxV' (or 'all': `all_shapes`) → [(N, D, V), ...]; a malformed item raises ValueError."""
    items = all_shapes if spec == "all" else [s for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError("--shapes: expected a comma list of NxDxV or 'all'")
    return [parse_shape(s.strip()) for s in items]


def check_kinds(spec: str) -> list[str]:
    """'random,zipf' → ['random', 'zipf'], each one of KINDS (else SystemExit naming the bad one)."""
    kinds = [k for k in spec.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            raise SystemExit(f"--kinds: unknown kind {k!r}; known: {KINDS}")
    return kinds


def zipf_prior(v: int, exponent: float = 1.1, device="cpu") -> torch.Tensor:
    """p_r ∝ 1/r^exponent for r = 1..v, float64, sums to 1 (index = rank − 1)."""
    r = torch.arange(1, v + 1, dtype=torch.float64, device=device)
    p = r.pow(-exponent)
    return p / p.sum()


def generator(device: torch.device, seed: int) -> torch.Generator:
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
    g = generator(device, seed)
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
