"""What the fast mode's float32 logits cost end to end: forward + backward, same process.

Three settings of the portable fast mode (bf16, `impl="triton"`, the library's other defaults):
the loss over the stored bf16 logits alone ("stored"), with the float32 correct logit (K=0), and
with the correct and the row's largest logit in float32 (K=1, FLOAT32_TOP_K), next to
torch.compile of the unfused loss and the three cuBLAS products of the shape. Each setting's mean
loss is compared with float64's.

Run:  python benchmarks/experiments/float32_logits_race.py [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository

from inputs import make_inputs  # noqa: E402
from machine import describe, machine_info, today, write_experiment  # noqa: E402
from methods import build_method  # noqa: E402
from timing import CublasProducts, interleaved_rounds, median_ms, paired_ratio, settling_load  # noqa: E402

import vocab_parallel_cce.api as api  # noqa: E402
from vocab_parallel_cce import linear_cross_entropy  # noqa: E402
from vocab_parallel_cce.backends.triton import logits_bf16  # noqa: E402

SHAPES = [(16384, 4096, 16032), (8192, 4096, 128256), (4096, 8192, 152064)]
SETTINGS = {"stored": None, "K=0": 0, "K=1": 1}  # name: FLOAT32_TOP_K, None: no float32 logits
_planned = api.plan_cross_entropy
_setting = {"top_k": None}


def _plan(*args, **kwargs):
    """The library's plan, without the float32 logits where the setting has none."""
    plan, call = _planned(*args, **kwargs)
    if _setting["top_k"] is None:
        plan = dataclasses.replace(plan, bf16_logits=False)
    return plan, call


def loss_fn(top_k: int | None):
    def fn(e, c, t):
        _setting["top_k"] = top_k
        if top_k is not None:
            logits_bf16.FLOAT32_TOP_K = top_k  # read by the launcher at each call
        return linear_cross_entropy(e, c, t, impl="triton")
    return fn


def race(rounds: int = 9, block: int = 4) -> list[dict]:
    compiled = build_method("torch_compile")
    settle = settling_load(2.0)
    rows = []
    for n, d, v in SHAPES:
        for kind in ("random", "zipf"):
            e, c, t = make_inputs(n, d, v, kind=kind, seed=0)
            eg, cg = e.clone().requires_grad_(), c.clone().requires_grad_()
            ref = torch.nn.functional.cross_entropy(e.double() @ c.double().T, t).item()
            losses = {name: loss_fn(k) for name, k in SETTINGS.items()}
            err = {name: abs(f(eg, cg, t).item() - ref) / abs(ref) for name, f in losses.items()}
            fns = {name: (lambda f=f: torch.autograd.grad(f(eg, cg, t), (eg, cg))) for name, f in losses.items()}
            fns["torch_compile"] = lambda: torch.autograd.grad(compiled(eg, cg, t), (eg, cg))
            fns["cublas_3x"] = CublasProducts(e, c).three
            for f in fns.values():
                f()
                f()
            torch.cuda.synchronize()
            res = interleaved_rounds(fns, rounds=rounds, block=block, settle=settle)
            rows.append(dict(
                shape=[n, d, v], kind=kind, ms={k: median_ms(r["round_ms"]) for k, r in res.items()},
                peak_mb={k: r["peak_mb"] for k, r in res.items()},
                vs_compile={k: paired_ratio(res[k]["round_ms"], res["torch_compile"]["round_ms"]) for k in SETTINGS},
                vs_stored={k: paired_ratio(res[k]["round_ms"], res["stored"]["round_ms"]) for k in SETTINGS},
                loss_rel_err=err))
            print(rows[-1], flush=True)
            del eg, cg, e, c, t, fns
            torch.cuda.empty_cache()
    return rows


def markdown(doc: dict) -> str:
    names = list(SETTINGS)
    lines = [f"# float32_logits_race: {doc['machine'].get('device_name', 'cpu')}, {doc['date']}", "", doc["about"], "",
             describe(doc["machine"]), "",
             "| N×D×V | inputs | " + " | ".join(f"{k} ms (× compile)" for k in names)
             + " | torch.compile ms | cuBLAS 3 products ms | K=1 / stored | loss error: " + " / ".join(names) + " |",
             "|---|---|" + "---|" * (len(names) + 4)]
    for r in doc["rows"]:
        lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['kind']} | "
                     + " | ".join(f"{r['ms'][k]:.2f} ({r['vs_compile'][k]:.3f})" for k in names)
                     + f" | {r['ms']['torch_compile']:.2f} | {r['ms']['cublas_3x']:.2f} | {r['vs_stored']['K=1']:.3f} | "
                     + " / ".join(f"{r['loss_rel_err'][k]:.1e}" for k in names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    api.plan_cross_entropy = _plan
    default_k = logits_bf16.FLOAT32_TOP_K
    try:
        rows = race()
    finally:
        api.plan_cross_entropy = _planned
        logits_bf16.FLOAT32_TOP_K = default_k
    doc = dict(kind="experiment", name="float32_logits_race", date=today(), machine=machine_info(),
               float32_block_d=logits_bf16.FLOAT32_BLOCK_D, rows=rows,
               about=("bf16 forward + backward (grads of e and c), mean loss, the portable fast mode: \"stored\" "
                      "takes the loss from the stored bf16 logits, K=0 adds the float32 correct logit, K=1 also "
                      "the row's largest (the default). Medians of 9 interleaved rounds of 4 calls, each block "
                      "after 2 ms of bf16 products; ratios paired within rounds. Loss error: |loss − float64| / "
                      f"|float64|. The float32 dot products step {logits_bf16.FLOAT32_BLOCK_D} columns of D."))
    write_experiment(args.out, doc, markdown(doc))


if __name__ == "__main__":
    main()
