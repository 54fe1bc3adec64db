"""How many float32 logits the fast mode's loss takes over bf16 logits: accuracy and cost.

The portable fast mode stores bf16 logits; its loss replaces the target's and the row's
FLOAT32_TOP_K largest stored logits with float32 dot products e·c. For each K this gives the loss
error against float64 on several input kinds (and Megatron-core's per-token tolerance), and the
time the dot products add to the statistics pass, next to one cuBLAS product E·Cᵀ of the shape.

Run:  python benchmarks/experiments/float32_logits.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository

from float32_tolerances import over_tolerance  # noqa: E402
from inputs import make_inputs  # noqa: E402
from machine import describe, machine_info, today, write_experiment  # noqa: E402

from vocab_parallel_cce import Tuning, linear_cross_entropy  # noqa: E402
from vocab_parallel_cce.backends.triton import logits_bf16  # noqa: E402

TOP_KS = [0, 1, 3, 4, 7]  # 0: the target's logit only
TIMED_SHAPES = [(16384, 4096, 16032), (8192, 4096, 128256)]
nll = torch.nn.functional.cross_entropy


def fast_loss(e, c, t, top_k: int) -> torch.Tensor:
    logits_bf16.FLOAT32_TOP_K = top_k  # read by the launcher at each call
    e, c = (x.detach().requires_grad_() for x in (e, c))  # the fast mode runs where gradients are asked for
    return linear_cross_entropy(e, c, t, reduction="none", grad_in_forward=True,
                                tuning=Tuning(use_gluon=False)).detach().double()


def exact_nll(e, c, t, rounded=False, chunk=2048) -> torch.Tensor:
    """Per-token loss over float64 logits of the bf16 inputs; rounded: over those logits rounded to
    bf16, as the unfused layer stores them."""
    out = []
    for i in range(0, e.shape[0], chunk):
        z = e[i:i + chunk].double() @ c.double().T
        out.append(nll(z.bfloat16().double() if rounded else z, t[i:i + chunk], reduction="none"))
    return torch.cat(out)


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def peaked_inputs(n, d, v, seed=5):
    """One logit of ~10 per row, the target half the time (a trained model's softmax)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    c = torch.randn(v, d, device="cuda", generator=g) / d**0.5
    top = torch.randint(0, v, (n,), device="cuda", generator=g)
    e = 10.0 * c[top] / (c[top] * c[top]).sum(1, keepdim=True) + 0.3 * torch.randn(n, d, device="cuda", generator=g)
    t = torch.where(torch.arange(n, device="cuda") % 2 == 0, top, torch.randint(0, v, (n,), device="cuda", generator=g))
    return e.bfloat16(), c.bfloat16(), t


def megatron_inputs(n, v, d):
    g = torch.Generator(device="cuda").manual_seed(v + d)
    e = (torch.rand(n, d, device="cuda", generator=g) * 0.2 - 0.1).bfloat16()
    c = (torch.rand(v, d, device="cuda", generator=g) * 0.2 - 0.1).bfloat16()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    return e, c, t


def accuracy() -> list[dict]:
    rows = []
    for n, v, d in [(80, 125, 64), (80, 152064, 64), (1024, 152064, 4096), (4096, 152063, 8192)]:
        e, c, t = megatron_inputs(n, v, d)
        ref = nll(e.float() @ c.float().T, t, reduction="none")
        rows.append(dict(case=f"uniform ±0.1 {n}×{v}×{d}", metric="worst token / Megatron tolerance",
                         unfused=over_tolerance(exact_nll(e, c, t, rounded=True), ref),
                         by_k={k: over_tolerance(fast_loss(e, c, t, k), ref) for k in TOP_KS}))
        print(rows[-1], flush=True)
    n, d, v = 4096, 4096, 128256
    for kind, (e, c, t) in [("random", make_inputs(n, d, v, kind="random", seed=1)),
                            ("zipf", make_inputs(n, d, v, kind="zipf", seed=1)),
                            ("peaked", peaked_inputs(n, d, v))]:
        ref = exact_nll(e, c, t)
        rows.append(dict(case=f"{kind} {n}×{v}×{d}", metric="‖loss − float64‖/‖float64‖",
                         unfused=rel_err(exact_nll(e, c, t, rounded=True), ref),
                         by_k={k: rel_err(fast_loss(e, c, t, k), ref) for k in TOP_KS}))
        print(rows[-1], flush=True)
    return rows


def _ms(fn, reps=10) -> float:
    a, b = torch.cuda.Event(True), torch.cuda.Event(True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def cost(rounds=6) -> list[dict]:
    """The statistics pass with the float32 logits of each K against the pass without them,
    launched as the fast mode launches it, interleaved in random order."""
    rows = []
    for n, d, v in TIMED_SHAPES:
        e, c, t = make_inputs(n, d, v, seed=0)
        z = e @ c.T
        out = torch.empty(4, n, device="cuda")
        ce = torch.empty(n, device="cuda")

        def stats(top_k):
            kw = {} if top_k is None else dict(
                E=e, C=c, D=d, stride_e=d, stride_c=d, GLSE_ROW=3, TARGET_DOT=True, BLOCK_D=logits_bf16.FLOAT32_BLOCK_D,
                TOP_K=top_k, SLOTS=triton.next_power_of_2(top_k + 1))
            return lambda: logits_bf16.stored_logits_stats_kernel[(triton.cdiv(n, logits_bf16.STATS_ROWS),)](
                z, z, t, out, n, v, v, 1.0, out, HAS_BIAS=False, HAS_SOFTCAP=False, NEED_SUM=False, WRITE_BACK=False,
                BLOCK_R=logits_bf16.STATS_ROWS, BLOCK_C=logits_bf16.STATS_COLS, num_warps=logits_bf16.STATS_WARPS,
                CE=ce, ignore_t=-100, lo_t=0, hi_t=v, NEED_CE=True, **kw)

        zz = torch.empty_like(z)
        variants = {"none": stats(None), **{k: stats(k) for k in TOP_KS},
                    "cublas": lambda: torch.mm(e, c.T, out=zz)}
        for f in variants.values():
            f()
        torch.cuda.synchronize()
        ms = {k: [] for k in variants}
        for _ in range(rounds):
            order = list(variants)
            random.shuffle(order)
            for k in order:
                ms[k].append(_ms(variants[k]))
        med = {k: statistics.median(x) for k, x in ms.items()}
        rows.append(dict(shape=[n, d, v], stats_ms=med["none"], cublas_ms=med["cublas"],
                         added_ms={k: med[k] - med["none"] for k in TOP_KS}))
        print(rows[-1], flush=True)
        del z, zz
    return rows


def markdown(doc: dict) -> str:
    ks = " | ".join(f"K={k}" for k in TOP_KS)
    lines = [f"# float32_logits: {doc['machine'].get('device_name', 'cpu')}, {doc['date']}", "", doc["about"], "",
             describe(doc["machine"]), "", f"| inputs N×V×D | measure | unfused (bf16 logits) | {ks} |",
             "|---|---|---|" + "---|" * len(TOP_KS)]
    for r in doc["accuracy"]:
        lines.append(f"| {r['case']} | {r['metric']} | {r['unfused']:.3g} | "
                     + " | ".join(f"{r['by_k'][k]:.3g}" for k in TOP_KS) + " |")
    lines += ["", f"| N×D×V | statistics pass ms | one cuBLAS E·Cᵀ ms | ms added: {ks} |",
              "|---|---|---|" + "---|" * len(TOP_KS)]
    for r in doc["cost"]:
        lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['stats_ms']:.3f} | {r['cublas_ms']:.3f} | "
                     + " | ".join(f"{r['added_ms'][k]:.3f}" for k in TOP_KS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    default_k = logits_bf16.FLOAT32_TOP_K
    doc = dict(kind="experiment", name="float32_logits", date=today(), machine=machine_info(),
               default_top_k=default_k, cost=cost(), accuracy=accuracy(),
               about=(f"bf16, the portable fast mode (Tuning(use_gluon=False)), reduction=\"none\". K = "
                      f"FLOAT32_TOP_K (the default is {default_k}): the loss takes float32 dot products for the "
                      "target and the row's K largest logits. Unfused: the loss over the float64 logits rounded "
                      "to bf16. Megatron tolerance: |ours − ref| / (1e-5 + 1.3e-6·|ref|) against float32 logits, "
                      "≤ 1 passes. Times: medians of 6 interleaved rounds of 10 launches."))
    logits_bf16.FLOAT32_TOP_K = default_k
    write_experiment(args.out, doc, markdown(doc))


if __name__ == "__main__":
    main()
