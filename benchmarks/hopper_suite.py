"""The runner's `hopper` suite (one sm_90 GPU): the Hopper (Gluon) kernels against cuBLAS and the
portable kernels they replace, each kernel alone, same process.

1. checks: at odd sizes, every mode's outputs against float64 (z, the statistics lse, x, Σz and
   the stored logits' glse on the first and last 128 rows, the logit gradient G of a chunk), with
   NaN-poisoned outputs (an unwritten element fails), and the per-token loss lse − x against the
   portable fast mode's (cuBLAS bf16 logits + statistics pass);
2. timings, interleaved rounds (`timing.interleaved_rounds`) per shape, ×cuBLAS = the cuBLAS
   product E·Cᵀ's ms over the row's (paired within rounds):
     cuBLAS E·Cᵀ, G·C, Gᵀ·E (bf16 out);
     fast mode forward: portable (cuBLAS + statistics pass) vs Hopper (logits kernel + merge), and
       the logits kernel alone;
     memory-first forward: portable (`tl` statistics kernel) vs Hopper (statistics kernel + merge);
     memory-first logit gradient over the full vocabulary: Hopper (grad kernel).
   `--config 'NAME=BM,BN,BK,STAGES,SPLIT,GROUP_M,WARPS[,CONSUMERS]'` adds rows for a kernel
   configuration (`logits.CONFIGS`): the fast forward, and each mode's kernel alone.
"""

from __future__ import annotations

import math

import torch

from tables import fmt, md_table
from timing import interleaved_rounds, median_ms, paired_ratio, setup_device

DEFAULT_SHAPES = "8192x4096x128256,16384x4096x16032,8192x2304x256000"
CHECK_SHAPES = [(1, 256, 1, False), (1000, 1000, 5003, False), (300, 2304, 50001, True), (4096, 4096, 32064, True)]


def add_args(p):
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of NxDxV")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--config", action="append", default=[],
                   metavar="'NAME=BM,BN,BK,STAGES,SPLIT,GROUP_M,WARPS[,CONSUMERS]'",
                   help="also time the fast forward and each mode's kernel in this configuration")
    p.add_argument("--no-check", action="store_true")


def _kernels():
    from vocab_parallel_cce.backends.triton import logits_bf16, recompute
    from vocab_parallel_cce.backends.triton.hopper import logits as L
    from vocab_parallel_cce.backends.triton.hopper import partials as P

    return L, P, logits_bf16, recompute


def inputs(n, d, v, confident=False, seed=0, device="cuda"):
    """bf16 e [n, d], c [v, d] (logits ~ N(0, 2²)), targets; `confident`: each target's logit
    raised by ~12 (p_t near 1, the case where the gradient needs the stored logits' lse)."""
    g = torch.Generator(device=device).manual_seed(seed)
    e = torch.randn(n, d, device=device, generator=g)
    c = torch.randn(v, d, device=device, generator=g) * (2.0 / math.sqrt(d))
    t = torch.randint(0, v, (n,), device=device, generator=g)
    if confident:
        ct = c[t]
        e = e + 12.0 * ct / (ct * ct).sum(1, keepdim=True)
    return e.bfloat16().contiguous(), c.bfloat16().contiguous(), t


class Runner:
    """The kernels under test, launched on given tensors (configurations as `logits.CONFIGS`)."""

    def __init__(self):
        self.L, self.P, self.bf16, self.recompute = _kernels()
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count

    def logits(self, e, c, v, mode, config=None, need_sum=False, **kw):
        bn = (config or self.L.CONFIGS[mode])[1]
        part = None
        if mode != self.L.MODE_GRAD.value:
            part = torch.empty(self.L.partial_rows(mode, need_sum), -(-v // bn), e.shape[0], device=e.device)
        self.L.launch(e, c, v, mode, partials=part, need_sum=need_sum, num_sms=self.sms, config=config, **kw)
        return part

    def fast_forward(self, e, c, t, v, config=None, need_sum=False):
        z = torch.empty(e.shape[0], -(-v // 8) * 8, device=e.device, dtype=torch.bfloat16)
        part = self.logits(e, c, v, self.L.MODE_LOGITS.value, config, need_sum, out=z)
        return z, self.P.merge(part, e, c, t, v, True, need_sum)

    def memory_forward(self, e, c, t, v, config=None, need_sum=False):
        part = self.logits(e, c, v, self.L.MODE_STATS.value, config, need_sum)
        return self.P.merge(part, e, c, t, v, False, need_sum)

    def portable_fast_forward(self, e, c, t, v):
        """cuBLAS bf16 logits, then the statistics pass (the fast mode's portable forward)."""
        from vocab_parallel_cce.backends.triton.logits_bf16 import stored_logits_stats_kernel

        n = e.shape[0]
        z = torch.empty(n, -(-v // 8) * 8, device=e.device, dtype=torch.bfloat16)
        torch.mm(e, c[:v].T, out=z[:, :v])
        out = torch.empty(3, n, device=e.device)
        stored_logits_stats_kernel[(n,)](z, c, t, out, n, v, z.stride(0), 1.0, out, HAS_BIAS=False,
                                         HAS_SOFTCAP=False, NEED_SUM=False, WRITE_BACK=False, BLOCK_R=1,
                                         BLOCK_C=2048, num_warps=8)
        return z, out

    def portable_memory_forward(self, e, c, t, v):
        from vocab_parallel_cce.tuning import Tuning

        return self.recompute._forward_stats_op(e, c, None, t, v, 0.0, False, False, Tuning().encode(), None, 1.0,
                                                False, False)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check(k: Runner, n, d, v, confident) -> dict:
    """Errors against float64 of every mode at (n, d, v) (module docstring)."""
    e, c, t = inputs(n, d, v, confident, seed=n + d + v)
    rows = torch.unique(torch.cat([torch.arange(min(n, 128)), torch.arange(max(0, n - 128), n)])).to(e.device)
    z64 = e[rows].double() @ c.double().T
    lse64, x64 = torch.logsumexp(z64, 1), z64.gather(1, t[rows, None])[:, 0]
    z, st = k.fast_forward(e, c, t, v, need_sum=True)
    zr = z[rows, :v].double()
    mem = k.memory_forward(e, c, t, v, need_sum=True)
    v0 = (v // 3) // 8 * 8
    w = v - v0
    coef = torch.randn(3, n, device=e.device)
    g = torch.full((n, -(-w // 8) * 8), float("nan"), device=e.device, dtype=torch.bfloat16)
    k.logits(e, c[v0:], w, k.L.MODE_GRAD.value, out=g, lse=st[0].contiguous(), coef=coef, t=t, col_base=v0)
    p = torch.exp(z64[:, v0:] - st[0, rows, None].double())
    hit = (torch.arange(v0, v, device=e.device)[None, :] == t[rows, None]).double()
    cr = coef[:, rows].double()
    g64 = cr[0, :, None] * p + cr[1, :, None] * hit + cr[2, :, None]
    _, st_portable = k.portable_fast_forward(e, c, t, v)
    ce64 = lse64 - x64
    return dict(shape=[n, d, v], confident=confident, z=rel(zr, z64), lse=rel(st[0, rows], lse64),
                x=rel(st[1, rows], x64), sum=rel(st[2, rows], z64.sum(1)), glse=rel(st[3, rows], torch.logsumexp(zr, 1)),
                memory_lse=rel(mem[0, rows], lse64), memory_x=rel(mem[1, rows], x64), grad=rel(g[rows, :w], g64),
                loss_hopper=rel(st[0, rows] - st[1, rows], ce64), loss_portable=rel(st_portable[0, rows] - st_portable[1, rows], ce64),
                unwritten=bool(torch.isnan(z[:, :v]).any() or torch.isnan(st).any() or torch.isnan(g[:, :w]).any()))


def timings(k: Runner, n, d, v, rounds: int, configs: dict) -> list[dict]:
    e, c, t = inputs(n, d, v)
    z = torch.empty(n, -(-v // 8) * 8, device=e.device, dtype=torch.bfloat16)
    g = torch.empty(n, v, device=e.device, dtype=torch.bfloat16)
    lse, coef = torch.zeros(n, device=e.device), torch.randn(3, n, device=e.device)
    L = k.L
    fns = {
        "cuBLAS E·Cᵀ": lambda: torch.mm(e, c.T, out=z[:, :v]),
        "cuBLAS G·C": lambda: torch.mm(g, c),
        "cuBLAS Gᵀ·E": lambda: torch.mm(g.T, e),
        "fast forward, portable": lambda: k.portable_fast_forward(e, c, t, v),
        "fast forward, Hopper": lambda: k.fast_forward(e, c, t, v),
        "logits kernel alone": lambda: k.logits(e, c, v, L.MODE_LOGITS.value, out=z),
        "memory-first forward, portable": lambda: k.portable_memory_forward(e, c, t, v),
        "memory-first forward, Hopper": lambda: k.memory_forward(e, c, t, v),
        "memory-first G, Hopper": lambda: k.logits(e, c, v, L.MODE_GRAD.value, out=g, lse=lse, coef=coef, t=t),
    }
    for name, cfg in configs.items():
        if cfg[4] == 1:  # the statistics modes take whole tiles (no column slices)
            fns[f"fast forward, Hopper [{name}]"] = lambda cfg=cfg: k.fast_forward(e, c, t, v, config=cfg)
            fns[f"logits kernel alone [{name}]"] = lambda cfg=cfg: k.logits(e, c, v, L.MODE_LOGITS.value, cfg, out=z)
            fns[f"statistics kernel [{name}]"] = lambda cfg=cfg: k.logits(e, c, v, L.MODE_STATS.value, cfg)
        fns[f"G kernel [{name}]"] = lambda cfg=cfg: k.logits(e, c, v, L.MODE_GRAD.value, cfg, out=g, lse=lse,
                                                             coef=coef, t=t)
    for f in fns.values():  # compile and warm up
        f()
        f()
    res = interleaved_rounds(fns, rounds, 1)
    base = res["cuBLAS E·Cᵀ"]["round_ms"]
    return [dict(shape=[n, d, v], what=name, ms=median_ms(r["round_ms"]), x_cublas=paired_ratio(base, r["round_ms"]),
                 tflops=2 * n * d * v / median_ms(r["round_ms"]) / 1e9 if median_ms(r["round_ms"]) else None)
            for name, r in res.items()]


def _configs(items: list[str]) -> dict:
    out = {}
    for item in items:
        name, _, spec = item.partition("=")
        vals = [int(x) for x in spec.split(",")]
        if not name or len(vals) not in (7, 8):
            raise SystemExit(f"--config: expected NAME=BM,BN,BK,STAGES,SPLIT,GROUP_M,WARPS[,CONSUMERS], got {item!r}")
        out[name] = tuple(vals)
    return out


def run(args, out) -> dict:
    setup_device("cuda")
    from vocab_parallel_cce.backends.triton import hopper

    if not hopper.available(torch.device("cuda"), True):
        raise SystemExit("hopper: needs an sm_90 GPU and a Triton with Gluon")
    k, configs = Runner(), _configs(args.config)
    doc = {"checks": [], "timings": [], "failures": []}
    for shape in ([] if args.no_check else CHECK_SHAPES):
        doc["checks"].append(check(k, *shape))
    for spec in args.shapes.split(","):
        n, d, v = (int(x) for x in spec.lower().split("x"))
        doc["timings"] += timings(k, n, d, v, args.rounds, configs)
        torch.cuda.empty_cache()
    return doc


def markdown(doc: dict) -> str:
    m = doc.get("machine", {})
    lines = [f"# hopper: {m.get('device_name', '?')}, {doc.get('date', '?')}", "",
             f"The Gluon kernels alone; torch {m.get('torch', '?')}, triton {m.get('triton', '?')}.", ""]
    if doc.get("note"):
        lines += [doc["note"], ""]
    lines += ["Errors against float64 (‖x − ref‖/‖ref‖; first and last 128 rows; loss = lse − x per token):", ""]
    cols = ["shape", "z", "lse", "x", "Σz", "glse", "memory-first lse", "G", "loss Hopper", "loss portable",
            "unwritten"]
    rows = [[("×".join(map(str, r["shape"])) + (" confident" if r.get("confident") else "")),
             *(fmt(r.get(k), ".1e") for k in ("z", "lse", "x", "sum", "glse", "memory_lse", "grad", "loss_hopper",
                                             "loss_portable")), str(r.get("unwritten"))] for r in doc.get("checks", [])]
    lines += md_table(cols, rows) + ["", "Time per call, interleaved rounds; ×cuBLAS = cuBLAS E·Cᵀ ms / ms:", ""]
    rows = [["×".join(map(str, r["shape"])), r["what"], fmt(r.get("ms"), ".3f"), fmt(r.get("x_cublas"), ".3f"),
             fmt(r.get("tflops"), ".0f")] for r in doc.get("timings", [])]
    lines += md_table(["shape", "kernel", "ms", "×cuBLAS", "TFLOP/s (2·N·D·V)"], rows)
    if doc.get("command"):
        lines += ["", f"Command: `{doc['command']}`"]
    return "\n".join(lines) + "\n"
