#!/usr/bin/env python3
"""The benchmark runner: named suites, each writing its results as JSON, a markdown table and a chart.

    python benchmarks/run.py SUITE [options]          (from the repository root)
    python benchmarks/run.py SUITE --help

Suites:
  race            one GPU, the product's table: ours vs torch.compile, Megatron, Liger, Apple CCE and the
                  cuBLAS products, interleaved rounds, errors against float64
  loss            one GPU: every loss implementation per shape and input kind, methods one after another
  components      one GPU: GPU time per kernel of our forward+backward (torch.profiler) + cuBLAS products
  hopper          one sm_90 GPU: the Gluon kernels alone against cuBLAS and the portable kernels, and float64
  rl              one GPU: fwd+bwd of per-token log-probs and entropy (linear_log_probs) vs our loss, verl,
                  torch.compile, eager
  vocab_parallel  torchrun, tp = 1, 2, 4...: ours vs Megatron on materialised logits (bench_vocab_parallel.py)
  gpt             Megatron GPT training steps, our loss vs Megatron's fused CE (launch/train_gpt.py)
  fidelity        training curves, each fused mode vs native over seeds and corpora (launch/train_gpt.py)
  hf              Hugging Face Llama-shaped training step (bench_transformers.py)
  tests           pytest tests/gpu/test_gpu.py, output saved
  chart FILE.json...   redraw the chart of saved results (several files of one suite: merged)
  merge FILE.json...   merge saved results of one suite (e.g. the loss suite run kind by kind)

Output: OUT/SUITE[_TAG].json (every number, the machine, the arguments, the command), .md (the
table), .png (the chart, where the suite has one), and OUT/SUITE[_TAG]_raw/ (logs, per-process
parts, training runs; not kept in git). OUT defaults to benchmarks/results/<machine>/, the machine
being the GPU model ("h100", "h200", "h100x8" with several GPUs, "cpu"): one file per suite and
machine, the latest run; `benchmarks/report.py` builds benchmarks/RESULTS.md from them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)  # vocab_parallel_cce from the checkout
sys.path.insert(0, HERE)  # the benchmarks' plain modules

import hopper_suite  # noqa: E402
import loss_suite  # noqa: E402
import race_suite  # noqa: E402
import rl_suite  # noqa: E402
import train_suites  # noqa: E402
from children import child_main  # noqa: E402
from machine import machine_info, machine_key  # noqa: E402
from tables import save_json  # noqa: E402

SUITES = {
    "race": race_suite,
    "loss": loss_suite,
    "components": loss_suite.Components,
    "hopper": hopper_suite,
    "rl": rl_suite,
    "vocab_parallel": train_suites.VocabParallel,
    "gpt": train_suites.Gpt,
    "fidelity": train_suites.Fidelity,
    "hf": train_suites.HF,
    "tests": train_suites.Tests,
}
MEASURE = {"race": race_suite.measure, "loss": loss_suite.measure, "components": loss_suite.Components.measure}
RESULTS = os.path.join(HERE, "results")
DIGITS = 7  # significant digits of the floats in saved results


class Output:
    """Where one suite run writes: DIR/STEM.json/.md/.png and DIR/STEM_raw/."""

    def __init__(self, directory: str, suite: str, tag: str | None):
        self.dir = os.path.abspath(directory)
        self.stem = suite + (f"_{tag}" if tag else "")
        os.makedirs(self.dir, exist_ok=True)

    def path(self, ext: str) -> str:
        return os.path.join(self.dir, f"{self.stem}.{ext}")

    def raw(self, name: str = "") -> str:
        d = os.path.join(self.dir, f"{self.stem}_raw")
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, name) if name else d


def default_out(device: str, machine: dict) -> str:
    return os.path.join(RESULTS, "cpu" if device == "cpu" else machine_key(machine))


def write_outputs(suite: str, doc: dict, out: Output) -> list[str]:
    """JSON, markdown and chart of `doc`; returns the paths written."""
    mod = SUITES[suite]
    save_json(doc, out.path("json"), DIGITS)
    with open(out.path("md"), "w") as f:
        f.write(mod.markdown(doc))
    written = [out.path("json"), out.path("md")]
    if getattr(mod, "chart", None) is not None:
        try:
            if mod.chart(doc, out.path("png")):
                written.append(out.path("png"))
        except Exception as err:  # noqa: BLE001  (a chart failure must not lose the numbers)
            print(f"chart failed: {type(err).__name__}: {err}", flush=True)
    return written


def load_docs(paths: list[str]) -> tuple[str, list[dict]]:
    docs = []
    for p in paths:
        with open(p) as f:
            docs.append(json.load(f))
    suites = {d.get("suite") for d in docs}
    if len(suites) != 1 or None in suites:
        raise SystemExit(f"expected result files of one suite, got suites {sorted(map(str, suites))}")
    return suites.pop(), docs


def merged(suite: str, docs: list[dict]) -> dict:
    if len(docs) == 1:
        return docs[0]
    mod = SUITES[suite]
    if getattr(mod, "merge", None) is None:
        raise SystemExit(f"suite {suite}: results cannot be merged")
    return mod.merge(docs)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<machine>/)")
    common.add_argument("--tag", default=None, help="suffix of the output names: SUITE_TAG.json")
    common.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of the code path")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="suite", required=True)
    for name, mod in SUITES.items():
        sp = sub.add_parser(name, parents=[common], help=(mod.__doc__ or "").strip().splitlines()[0],
                            description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(sp)
    for name, what in (("chart", "redraw the chart"), ("merge", "merge results of one suite, write json/md/png")):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("files", nargs="+")
        sp.add_argument("--out", default=None, help="chart: the PNG path; merge: the output folder")
        if name == "merge":
            sp.add_argument("--tag", default="merged")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:  # a measuring process of the race / loss / components suites
        return child_main(argv[1], MEASURE.__getitem__)
    args = parser().parse_args(argv)

    if args.suite == "chart":
        suite, docs = load_docs(args.files)
        png = args.out or os.path.splitext(args.files[0])[0] + ("_merged" if len(docs) > 1 else "") + ".png"
        SUITES[suite].chart(merged(suite, docs), png)
        print(f"wrote {png}")
        return 0
    if args.suite == "merge":
        suite, docs = load_docs(args.files)
        out = Output(args.out or os.path.dirname(os.path.abspath(args.files[0])), suite, args.tag)
        for path in write_outputs(suite, merged(suite, docs), out):
            print(f"wrote {path}")
        return 0

    machine = machine_info()
    out = Output(args.out or default_out(args.device, machine), args.suite, args.tag)
    started = datetime.datetime.now()
    mod = SUITES[args.suite]
    doc = mod.run(args, out)
    doc.update(suite=args.suite, date=started.date().isoformat(), started=started.isoformat(timespec="seconds"),
               args=vars(args), command="python benchmarks/run.py " + shlex.join(argv))
    doc.setdefault("machine", machine)
    paths = write_outputs(args.suite, doc, out)
    print()
    for path in paths:
        print(f"wrote {path}")
    print()
    if getattr(mod, "summary", None) is not None:
        print(mod.summary(doc))
    else:
        with open(out.path("md")) as f:
            print(f.read())
    return int(doc.get("exit_status", 0))


if __name__ == "__main__":
    sys.exit(main())
