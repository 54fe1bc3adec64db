"""The memory-first forward's statistics kernel with its accumulator restarted every k_slice columns of D.

The tensor cores' float32 accumulation pulls every logit toward 0 by a factor that grows with
the K it accumulates over (loss_bias.md), which leaves lse ≈ 1.6e-5 nats low at D = 4096. Splitting
the running sum every k_slice columns into a bf16 part and the float32 remainder the accumulation
goes on from bounds that pull by the slice width. This
times each kernel configuration (the statistics launch alone, and with the merge) against the
bf16 cuBLAS product of the same shape, in interleaved rounds in one process, and gives the lse's
bias and spread against float64 and the mean loss's relative error.

Run:  python benchmarks/experiments/k_slices.py [--out DIR] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository

from inputs import make_inputs  # noqa: E402
from machine import describe, machine_info, today, write_experiment  # noqa: E402

from vocab_parallel_cce import Tuning, linear_cross_entropy  # noqa: E402
from vocab_parallel_cce.backends.triton.hopper import logits as L  # noqa: E402

# (label, config (BM, BN, BK, NUM_STAGES, SPLIT, GROUP_M, num_warps[, CONSUMERS]) or None = the default, k_slice)
VARIANTS = [
    ("statistics kernel, one slice", None, 0),
    ("statistics kernel, slices of 2048", None, 2048),
    ("statistics kernel, slices of 1024", None, 1024),
    ("statistics kernel, slices of 512", None, 512),
]
# the memory-first mode's forward + backward with Tuning(stats_k_slice=...)
END_TO_END = [("memory-first fwd+bwd, one slice", 0), ("memory-first fwd+bwd, slices of 2048", 2048)]
SHAPES = [(8192, 4096, 128256), (16384, 4096, 16032), (8192, 2304, 256000), (4096, 8192, 128256)]


def stats(e, c, t, v, config, k_slice, num_sms):
    """float32 lse [N] and x [N] of the Gluon statistics kernel with one configuration."""
    from vocab_parallel_cce.backends.triton.hopper import partials as P

    bn = (config or L.CONFIGS[L.MODE_STATS.value])[1]
    part = torch.empty(2, -(-v // bn), e.shape[0], dtype=torch.float32, device=e.device)
    L.launch(e, c, v, L.MODE_STATS.value, partials=part, config=config, k_slice=k_slice, num_sms=num_sms)
    out = P.merge(part, e, c, t, v, False, False)
    return out[0], out[1]


def one_shape(n, d, v, rounds):
    e, c, t = make_inputs(n, d, v, kind="random", device="cuda", seed=0)[:3]
    lse64 = torch.empty(n, dtype=torch.float64, device="cuda")
    x64 = torch.empty(n, dtype=torch.float64, device="cuda")
    for r0 in range(0, n, 1024):
        z64 = e[r0:r0 + 1024].double() @ c.double().T
        lse64[r0:r0 + 1024] = torch.logsumexp(z64, -1)
        x64[r0:r0 + 1024] = z64.gather(1, t[r0:r0 + 1024, None]).squeeze(1)
        del z64
    loss64 = (lse64 - x64).mean()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    variants = [(lbl, cfg, ks) for lbl, cfg, ks in VARIANTS if ks < d]
    rows = {}
    for label, cfg, ks in variants:
        lse, x = stats(e, c, t, v, cfg, ks, sms)
        d_lse = lse.double() - lse64
        loss_err = abs(((lse.double() - x.double()).mean() - loss64) / loss64).item()
        rows[label] = dict(method=label, lse_bias=d_lse.mean().item(), lse_sd=d_lse.std().item(),
                           loss_rel=loss_err, ratios=[], ms=[])
    runs = {lbl: (lambda cfg=cfg, ks=ks: stats(e, c, t, v, cfg, ks, sms)) for lbl, cfg, ks in variants}
    runs["cuBLAS bf16 product"] = lambda: e @ c.T
    rows["cuBLAS bf16 product"] = dict(method="cuBLAS bf16 product", ratios=[], ms=[])
    ew, cw = e.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    for label, ks in END_TO_END:
        def step(ks=ks):
            loss = linear_cross_entropy(ew, cw, t, grad_in_forward=False, tuning=Tuning(stats_k_slice=ks))
            loss.backward()
            ew.grad = cw.grad = None
            return loss
        loss = step().double()
        rows[label] = dict(method=label, loss_rel=abs((loss - loss64) / loss64).item(), ratios=[], ms=[])
        runs[label] = step
    warm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(rounds):
        order = list(runs)
        random.shuffle(order)
        times = {}
        for name in order:
            for _ in range(20):  # ~100 ms of products: every block starts at the loaded clock
                warm @ warm
            runs[name]()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                runs[name]()
            end.record()
            torch.cuda.synchronize()
            times[name] = start.elapsed_time(end) / 3
        for name, ms in times.items():
            rows[name]["ms"].append(ms)
            rows[name]["ratios"].append(ms / times["cuBLAS bf16 product"])
    out = []
    for r in rows.values():
        r["round_ms"] = r.pop("ms")
        r["ms_median"] = sorted(r["round_ms"])[rounds // 2]
        r["x_cublas"] = sorted(r.pop("ratios"))[rounds // 2]
        r["shape"] = f"{n}×{d}×{v}"
        out.append(r)
    return out


def markdown(doc: dict) -> str:
    title = f"# {doc.get('name', 'k_slices')}: {doc['machine'].get('device_name', 'cpu')}, {doc['date']}"
    lines = [title, "", doc["about"], "", describe(doc["machine"]), "",
             "| shape | kernel | ms | × cuBLAS product | lse − lse₆₄ mean | sd | mean loss rel. error |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        f = lambda k, fmt: format(r[k], fmt) if k in r else "–"  # noqa: E731
        lines.append(f"| {r['shape']} | {r['method']} | {r['ms_median']:.3f} | {r['x_cublas']:.3f} | "
                     f"{f('lse_bias', '.2e')} | {f('lse_sd', '.1e')} | {f('loss_rel', '.2e')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES))
    args = ap.parse_args()
    results = []
    for shape in args.shapes.split(","):
        n, d, v = (int(x) for x in shape.split("x"))
        results += one_shape(n, d, v, args.rounds)
        torch.cuda.empty_cache()
        progress = markdown(dict(machine=machine_info(), date=today(), about="", results=results))
        print(progress.splitlines()[-1], flush=True)
    doc = dict(kind="experiment", name="k_slices", date=today(), machine=machine_info(), results=results,
               about=("Random inputs (logits ~ N(0, 4)), bf16 e and c; the Gluon statistics kernel (MODE_STATS) plus "
                      "the partials' merge, against float64 of the same bf16 values. ms: median over "
                      f"{args.rounds} shuffled rounds of 3 back-to-back calls, each block after ~100 ms of bf16 "
                      "products; × cuBLAS: median of the within-round ratio to e @ c.T (bf16 out)."))
    write_experiment(args.out, doc, markdown(doc))


if __name__ == "__main__":
    main()
