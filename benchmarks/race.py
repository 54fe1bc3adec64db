#!/usr/bin/env python3
"""Close races, interleaved: forward+backward ms of a few methods, timed in alternating rounds.

The loss suite times each method's reps back to back, one method after another; on an H200 the
three logits-shaped products are power-limited, so a method timed later in a warmer GPU (or on
data that draws more power) can lose 2-3% that is not its own. Here every round times a block of
`--block` calls of each method (the first named is the one compared with each other), in an order rotated every round, and the figures are medians over
`--rounds` rounds; the ratios are medians of the per-round ratios (paired: both methods ran in the
same minute). Methods are the loss suite's (benchmarks/common.py), gradients of e and c as there.

    python3 benchmarks/race.py --shapes all --kinds random,zipf_shuffled \
        --methods vpcce_triton,torch_compile,megatron_fused --out DIR --tag T

Writes DIR/race_T.json (every round's times) and DIR/race_T.md (the table). --device cpu runs the
code path with the CPU methods (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import common as C  # noqa: E402

ALL_SHAPES = ("8192x4096x128256,8192x2304x256000,8192x4096x151936,4096x4096x128256,"
              "16384x4096x32064,16384x4096x16032")


def block_ms(fn, calls: int, cuda: bool) -> float:
    """ms per call of `calls` back-to-back calls (CUDA events around the block)."""
    if cuda:
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def race(methods, e, c, t, rounds: int, block: int, cuda: bool) -> dict:
    """{name: [ms per call, one per round]} with the order rotated every round."""
    e_g, c_g = e.detach().requires_grad_(True), c.detach().requires_grad_(True)
    fns = {}
    for m in methods:
        def fn(m=m):
            return torch.autograd.grad(m(e_g, c_g, t), (e_g, c_g))
        for _ in range(3):  # warm-up: compilation, autotuning, the allocator's cache
            fn()
        fns[m.name] = fn
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(block_ms(fns[name], block, cuda))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="all")
    p.add_argument("--kinds", default="random")
    p.add_argument("--methods", default="vpcce_triton,torch_compile,megatron_fused")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(C.DTYPES))
    p.add_argument("--out", default=os.path.join(HERE, "results", time.strftime("%Y-%m-%d")))
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = [C.parse_shape(s) for s in (ALL_SHAPES if args.shapes == "all" else args.shapes).split(",") if s]
    methods = [C.build_method(n) for n in args.methods.split(",") if n]
    results = []
    for kind in args.kinds.split(","):
        for n, d, v in shapes:
            usable = [m for m in methods if m.usable(device, n, v)[0]]
            e, c, t = C.make_inputs(n, d, v, dtype=C.DTYPES[args.dtype], kind=kind, device=device)
            try:
                times = race(usable, e, c, t, args.rounds, args.block, cuda)
            except Exception as err:  # noqa: BLE001
                results.append({"shape": [n, d, v], "kind": kind, "error": C.short_error(err)})
                print(f"{n}x{d}x{v} {kind}: {C.short_error(err)}", flush=True)
                continue
            finally:
                del e, c, t
                C.free_memory()
            med = {name: statistics.median(ts) for name, ts in times.items()}
            ratios = {}
            for name in times:
                for other in times:
                    if other != name:
                        ratios[f"{name}/{other}"] = statistics.median(a / b for a, b in zip(times[name], times[other]))
            results.append({"shape": [n, d, v], "kind": kind, "ms": med, "rounds": times, "ratios": ratios})
            print(f"{n}x{d}x{v} {kind}: " + "  ".join(f"{k} {x:.2f}" for k, x in med.items()), flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "race" + (f"_{args.tag}" if args.tag else ""))
    doc = {"suite": "race", "args": vars(args), "machine": C.env_info() if cuda else {"device": "cpu"},
           "results": results}
    with open(stem + ".json", "w") as f:
        json.dump(C.jsonable(doc), f, indent=1)
    names = [m.name for m in methods]
    lines = [f"# race: {args.rounds} interleaved rounds of {args.block} calls, medians ({args.dtype})", "",
             "| shape | kind | " + " | ".join(f"{x} ms" for x in names) + " | "
             + " | ".join(f"{names[0]} / {x}" for x in names[1:]) + " |",
             "|---|---|" + "---|" * (2 * len(names) - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['kind']} | {r['error']} |")
            continue
        cells = [C.fmt(r["ms"].get(x), ".2f") for x in names]
        cells += [C.fmt(r["ratios"].get(f"{names[0]}/{x}"), ".3f") for x in names[1:]]
        lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['kind']} | " + " | ".join(cells) + " |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
