"""The runner's suites that drive other programs: vocab_parallel (torchrun bench_vocab_parallel.py),
gpt and fidelity (torchrun launch/train_gpt.py, through its command line only), hf
(bench_transformers.py) and tests (pytest tests/gpu/test_gpu.py). Each class is one suite:
add_args, run(args, out) → document, markdown(document), chart(document, png) or None.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import time

import charts
import tables as R
from children import run_logged
from machine import header

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRAIN_GPT = os.path.join(REPO, "launch", "train_gpt.py")
# NVLink multicast off (the lent machines' NCCL NVLS set-up fails), unbuffered children.
DIST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
            "PYTHONUNBUFFERED": "1"}


def child_env() -> dict:
    env = {**os.environ, **DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([p for p in (env.get("PYTHONPATH"), REPO) if p])
    return env


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]


def int_list(s: str) -> list[int]:
    return [int(x) for x in str(s).split(",") if x.strip()]


class Budget:
    """Seconds left of --budget-s; `fits(estimate)` says whether a job of that length still fits."""

    def __init__(self, seconds: float):
        self.end = time.time() + seconds
        self.longest = 0.0

    def fits(self) -> bool:
        return time.time() + self.longest < self.end

    def left(self) -> float:
        return max(0.0, self.end - time.time())

    def done(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)


def outcome(failures: list[dict], **doc) -> dict:
    """A suite's document: its fields, the failures, and the runner's exit status (1 if any)."""
    return {**doc, "failures": failures, "exit_status": 1 if failures else 0}


# ----------------------------------------------------------------------------------------------
class VocabParallel:
    """torchrun, tp = world size: ours (default, grad_in_forward) vs Megatron-core's vocab-parallel
    cross-entropy (unfused, fused) on materialised logits; one torchrun per --tp value."""

    INTRO = ("Per rank, max over ranks; dE all-reduced over the group for every method; comm ms = the method's "
             "collectives timed alone at the same sizes. × Megatron fused: fwd+bwd time over Megatron fused's, "
             "same tp, kind and run.")

    @staticmethod
    def add_args(p):
        p.add_argument("--tp", default="1", help="comma list of tensor-parallel sizes (one torchrun each)")
        p.add_argument("-n", "--tokens", type=int, default=None, help="tokens N (bench default 16384)")
        p.add_argument("-d", "--hidden", type=int, default=None, help="hidden D (default 4096)")
        p.add_argument("-v", "--vocab", type=int, default=None, help="vocabulary V (default 128256)")
        p.add_argument("--kinds", default="random,zipf")
        p.add_argument("--methods", default="vpcce,vpcce_gif,megatron,megatron_fused")
        p.add_argument("--reps", type=int, default=None)
        p.add_argument("--warmup", type=int, default=None)
        p.add_argument("--no-fwd", action="store_true")
        p.add_argument("--no-check", action="store_true")
        p.add_argument("--check-dc", action="store_true")
        p.add_argument("--extra", default="", help="more bench_vocab_parallel.py arguments, one string")
        p.add_argument("--timeout-s", type=float, default=300.0, help="per torchrun")
        p.add_argument("--budget-s", type=float, default=510.0, help="start no torchrun expected to end past this")

    @staticmethod
    def run(args, out) -> dict:
        results, failures = [], []
        raw = out.raw()
        budget = Budget(args.budget_s)
        for tp in int_list(args.tp):
            if not budget.fits():
                failures.append({"tp": tp, "returncode": None, "log_tail": "not run: time budget (--budget-s)"})
                continue
            t0 = time.time()
            cmd = torchrun(tp) + [os.path.join(HERE, "bench_vocab_parallel.py"), "--out", raw,
                                  "--device", args.device, "--kinds", args.kinds, "--methods", args.methods]
            for flag, val in (("--tokens", args.tokens), ("--hidden", args.hidden), ("--vocab", args.vocab),
                              ("--reps", args.reps), ("--warmup", args.warmup)):
                if val is not None:
                    cmd += [flag, str(val)]
            cmd += [f for f, on in (("--no-fwd", args.no_fwd), ("--no-check", args.no_check),
                                    ("--check-dc", args.check_dc)) if on]
            cmd += shlex.split(args.extra)
            rc, tail = run_logged(cmd, out.raw(f"tp{tp}.log"), timeout=min(args.timeout_s, budget.left() + 40),
                                    env=child_env(), cwd=REPO)
            budget.done(time.time() - t0)
            path = os.path.join(raw, f"bench_vp_tp{tp}.json")
            if os.path.exists(path):
                with open(path) as f:
                    part = json.load(f)
                for r in part.get("results", []):
                    results.append({**r, "tp": tp, "shape": [part["meta"]["n"], part["meta"]["d"], part["meta"]["v"]]})
            if rc != 0 or not os.path.exists(path):
                failures.append({"tp": tp, "returncode": rc, "log_tail": tail})
        R.add_ratio(results, "fwd_bwd_ms", "ratio_megatron_fused", "megatron_fused", lambda r: (r["tp"], r["kind"]))
        return outcome(failures, results=results)

    @staticmethod
    def markdown(doc: dict) -> str:
        lines = header(doc, "vocab_parallel suite", VocabParallel.INTRO)
        rows = []
        for r in doc.get("results", []):
            rows.append([str(r["tp"]), "×".join(map(str, r.get("shape", []))), r["kind"],
                         r["method"] + (f" ({r['note']})" if r.get("note") else ""),
                         R.fmt(R.num(r.get("fwd_ms")), ".2f"), R.fmt(R.num(r.get("fwd_bwd_ms")), ".2f"),
                         R.fmt(r.get("ratio_megatron_fused"), ".2f"), R.fmt(R.num(r.get("fwd_bwd_peak_mb")), ".0f"),
                         R.fmt(R.num(r.get("comm_ms")), ".2f"), R.fmt(R.num(r.get("loss_rel_err")), ".1e"),
                         R.fmt(R.num(r.get("de_rel_err")), ".1e"), R.fmt(R.num(r.get("dc_rel_err")), ".1e"),
                         R.status(r)])
        lines += R.md_table(["tp", "N×D×V", "kind", "method", "fwd ms", "fwd+bwd ms", "× Megatron fused", "peak MiB",
                             "comm ms", "loss err", "dE err", "dC err", "status"], rows)
        lines += failure_lines(doc)
        return "\n".join(lines) + "\n"

    @staticmethod
    def merge(docs: list[dict]) -> dict:  # e.g. tp 1 on one machine, tp 2 and 4 on another
        return R.concat_docs(docs, ("results", "failures"))

    @staticmethod
    def chart(doc: dict, path: str):
        rows = [{"group": f"tp={r['tp']}", "panel": r["kind"], "method": r["method"], "value": r.get("fwd_bwd_ms"),
                 "mem": r.get("fwd_bwd_peak_mb"), "ratio": r.get("ratio_megatron_fused"), "status": R.status(r)}
                for r in doc.get("results", [])]
        if not rows:
            return None
        return charts.bar_chart(rows, path, value_label="forward+backward ms per rank", mem_label="peak MiB per rank",
                           ratio_label="time / Megatron fused's", title="Vocabulary-parallel loss, "
                           f"{doc.get('machine', {}).get('device_name', '')} {doc.get('date', '')}")


def failure_lines(doc: dict) -> list[str]:
    lines = []
    for f in doc.get("failures", []):
        what = ", ".join(f"{k} {v}" for k, v in f.items() if k not in ("log_tail", "returncode"))
        lines += ["", f"**Failed: {what}** (return code {f.get('returncode')})", "```", f.get("log_tail", ""), "```"]
    return lines


# ----------------------------------------------------------------------------------------------
def read_log(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def mode_args(mode: str) -> list[str]:
    """train_gpt.py flags of a fused mode: 'default' (the adapter's defaults), 'gif' (the fast mode,
    grad_in_forward=True), 'memory' (the memory-first mode, grad_in_forward=False), 'impl=NAME', or
    combinations joined by '+' (e.g. 'gif+impl=torch')."""
    out = []
    for part in mode.split("+"):
        if part == "default":
            continue
        if part == "gif":
            out.append("--fused-grad-in-forward")
        elif part == "memory":
            out.append("--fused-memory-first")
        elif part.startswith("impl="):
            out += ["--fused-impl", part[5:]]
        else:
            raise SystemExit(f"--modes: unknown fused mode {part!r} (default, gif, memory, impl=NAME, joined by '+')")
    return out


def mode_of(config: dict) -> str:
    parts = (["gif"] if config.get("fused_grad_in_forward") else []) + (
        ["memory"] if config.get("fused_memory_first") else []) + (
        [f"impl={config['fused_impl']}"] if config.get("fused_impl") else [])
    return "+".join(parts) or "default"


class Gpt:
    """Megatron GPT training steps (launch/train_gpt.py --loss both --native-fused-ce): our fused loss
    per mode vs Megatron's fused cross-entropy, same weights and batches, per tp and tokens per step."""

    INTRO = ("`launch/train_gpt.py --loss both --native-fused-ce`: each run trains with our fused loss, then with "
             "Megatron's fused cross-entropy from the same initial weights and batches. tokens/s: median over the "
             "steps after the first; peak MiB: max over ranks (whole step; forward+backward alone).")

    MODEL = ("--layers 2 --hidden 4096 --heads 32 --ffn-hidden 14336 --vocab-size 128256 --lexicon 32000 "
             "--corpus-tokens 300000")

    @staticmethod
    def add_args(p):
        p.add_argument("--tp", default="1", help="comma list of tensor-parallel sizes (processes)")
        p.add_argument("--configs", default="4096x1,1024x16", help="comma list of SEQxMICROBATCH")
        p.add_argument("--modes", default="default,memory",
                       help="fused modes: default (the adapter's defaults), gif (the fast mode), "
                            "memory (the memory-first mode), impl=NAME ('+' joins)")
        p.add_argument("--steps", type=int, default=10)
        p.add_argument("--model", default=Gpt.MODEL, help="model and data flags of train_gpt.py")
        p.add_argument("--extra", default="", help="more train_gpt.py flags")
        p.add_argument("--run-timeout", type=float, default=240.0, help="seconds per training run")
        p.add_argument("--budget-s", type=float, default=510.0, help="start no run expected to end past this many seconds")

    @staticmethod
    def run(args, out) -> dict:
        budget = Budget(args.budget_s)
        results, failures, runs = [], [], []
        for tp in int_list(args.tp):
            for cfg in [c for c in args.configs.split(",") if c]:
                seq, mb = (int(x) for x in cfg.lower().split("x"))
                for mode in [m for m in args.modes.split(",") if m]:
                    name = f"tp{tp}_{seq}x{mb}_{mode}"
                    run = {"name": name, "tp": tp, "config": f"{seq}×{mb}", "mode": mode}
                    runs.append(run)
                    if not budget.fits():
                        run["skipped"] = "not run: time budget (--budget-s)"
                        continue
                    rundir = out.raw(name)
                    cmd = torchrun(tp) + [TRAIN_GPT] + shlex.split(args.model) + [
                        "--seq-len", str(seq), "--micro-batch", str(mb), "--steps", str(args.steps), "--loss", "both",
                        "--native-fused-ce", "--out", rundir, "--overwrite"] + mode_args(mode) + shlex.split(args.extra)
                    if args.device == "cpu":
                        cmd += ["--device", "cpu"]
                    t0 = time.time()
                    rc, tail = run_logged(cmd, out.raw(f"{name}.log"), timeout=min(args.run_timeout, budget.left() + 40),
                                            env=child_env(), cwd=REPO)
                    budget.done(time.time() - t0)
                    log = read_log(os.path.join(rundir, "log.json"))
                    if rc != 0 or log is None:
                        run["error"] = f"return code {rc}"
                        failures.append({"run": name, "returncode": rc, "log_tail": tail})
                        continue
                    results += Gpt.rows(log, run)
        return outcome(failures, runs=runs, results=results)

    @staticmethod
    def rows(log: dict, run: dict) -> list[dict]:
        out = []
        native = log["runs"].get("native", {}).get("summary", {})
        for loss in ("fused", "native"):
            sm = log["runs"].get(loss, {}).get("summary")
            if not sm:
                continue
            tps = sm["median_tokens_per_s"]
            out.append({**{k: run[k] for k in ("tp", "config", "mode")}, "loss": loss,
                        "method": f"{loss}:{run['mode']}", "tokens_per_s": tps,
                        "peak_mb": max(sm["peak_mem_mb_per_rank"]),
                        "fwd_bwd_peak_mb": max(sm.get("fwd_bwd_peak_mem_mb_per_rank") or sm["peak_mem_mb_per_rank"]),
                        "first_loss": sm["first_loss"], "final_loss": sm["final_loss"],
                        "ratio_native": tps / native["median_tokens_per_s"] if native else None,
                        "max_abs_diff_first_5": log.get("comparison", {}).get("max_abs_diff_first_5"),
                        "steps": len(log["runs"][loss]["steps"]), "config_used": log.get("config", {})})
        return out

    @staticmethod
    def label(method: str) -> str:
        loss, _, mode = method.partition(":")
        return f"ours {mode}" if loss == "fused" else f"Megatron fused CE ({mode} run)"

    @staticmethod
    def markdown(doc: dict) -> str:
        lines = header(doc, "gpt suite", Gpt.INTRO)
        rows = [[str(r["tp"]), r["config"], Gpt.label(r["method"]), f"{r['tokens_per_s']:,.0f}",
                 R.fmt(r.get("ratio_native"), ".3f"), f"{r['peak_mb']:,.0f}", f"{r['fwd_bwd_peak_mb']:,.0f}",
                 f"{r['first_loss']:.3f} → {r['final_loss']:.3f} ({r['steps']})",
                 R.fmt(r.get("max_abs_diff_first_5"), ".1e")] for r in doc.get("results", [])]
        lines += R.md_table(["tp", "seq×micro-batch", "loss", "tokens/s", "× native (same run)", "peak MiB",
                             "fwd+bwd peak MiB", "loss first → last (steps)", "max |fused−native| first 5"], rows)
        for r in doc.get("runs", []):
            if r.get("skipped"):
                lines.append(f"\n{r['name']}: {r['skipped']}")
        lines += failure_lines(doc)
        return "\n".join(lines) + "\n"

    @staticmethod
    def merge(docs: list[dict]) -> dict:
        return R.concat_docs(docs, ("runs", "results", "failures"))

    @staticmethod
    def chart(doc: dict, path: str):
        rows = [{"group": f"tp={r['tp']} {r['config']}", "panel": "", "method": r["method"],
                 "value": r["tokens_per_s"], "mem": r["peak_mb"], "ratio": r.get("ratio_native"), "status": ""}
                for r in doc.get("results", [])]
        if not rows:
            return None
        return charts.bar_chart(rows, path, value_label="tokens/s (median)", mem_label="peak MiB per rank (whole step)",
                           ratio_label="tokens/s / native's, same run", higher_is_better=True,
                           labels={r["method"]: Gpt.label(r["method"]) for r in rows},
                           title=f"Megatron GPT step, {doc.get('machine', {}).get('device_name', '')} "
                                 f"{doc.get('date', '')}")


# ----------------------------------------------------------------------------------------------
def build_text_corpus(path: str, max_bytes: int) -> dict:
    """Real English text already on any machine with Python: the docstrings of the standard library,
    then of the installed packages (files in sorted order), up to `max_bytes`. Written to `path`."""
    import ast
    import sysconfig

    roots = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}
    size, files = 0, 0
    with open(path, "w", encoding="utf-8") as out:
        for root in dict.fromkeys(roots):
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d not in skip)
                for fn in sorted(filenames):
                    if not fn.endswith(".py") or size >= max_bytes:
                        continue
                    try:
                        with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                            tree = ast.parse(f.read())
                    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                        continue
                    files += 1
                    for node in ast.walk(tree):
                        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                            doc = ast.get_docstring(node)
                            if doc and size < max_bytes:
                                out.write(doc + "\n\n")
                                size += len(doc.encode()) + 2
    return {"files": files, "source": "docstrings of the Python standard library, then of the installed packages"}


class Fidelity:
    """Training curves: each fused mode vs native (launch/train_gpt.py --loss fused / native, the
    launcher's GPU preset) from the same weights and batches, over seeds and corpora; per mode the mean over seeds of
    (fused − native) over the last steps against native's own seed-to-seed spread. Runs found
    already done (OUT/…_raw/runs/*/log.json) are kept, so a call per seed resumes a folder;
    --aggregate PATH... only tabulates saved logs."""

    INTRO = ("Per corpus and seed: one `launch/train_gpt.py --loss native` run and one `--loss fused` run per "
             "mode, all from the seed's initial weights and batches. Δ = mean over the last steps of (fused − native) "
             "training loss; per mode: mean and standard deviation of Δ over seeds, against the seed-to-seed "
             "standard deviation of native's own last-steps loss (|mean Δ| / that spread ≪ 1: the fused loss "
             "trains as native does).")

    @staticmethod
    def add_args(p):
        p.add_argument("--seeds", default="0,1,2", help="comma list of --seed values (weights and batches)")
        p.add_argument("--modes", default="default,memory",
                       help="fused modes: default (the adapter's defaults), gif (the fast mode), "
                            "memory (the memory-first mode), impl=NAME ('+' joins)")
        p.add_argument("--corpora", default="generated,text",
                       help="'generated' (launch's corpus), 'text' (--text-corpus), or paths of text files")
        p.add_argument("--text-corpus", default=None,
                       help="the real text file for 'text' (default: built from the installed Python's docstrings)")
        p.add_argument("--text-mb", type=float, default=8.0, help="size of the built text corpus")
        p.add_argument("--steps", type=int, default=1000)
        p.add_argument("--last", type=int, default=100, help="steps averaged at the end of each curve")
        p.add_argument("--preset", default=None, help="train_gpt.py --preset (default: its own: small on a GPU)")
        p.add_argument("--extra", default="", help="more train_gpt.py flags")
        p.add_argument("--run-timeout", type=float, default=550.0, help="seconds per training run")
        p.add_argument("--budget-s", type=float, default=510.0, help="start no run expected to end past this many seconds")
        p.add_argument("--parallel", type=int, default=1,
                       help="training processes at once (they share the GPU; > 1 also silences their output)")
        p.add_argument("--aggregate", nargs="+", default=None, metavar="PATH",
                       help="only tabulate saved runs: the log.json files under these folders whose path has "
                            "a folder named fidelity* (this suite's OUT/fidelity*_raw/runs/), no training")

    @staticmethod
    def corpus_file(name: str, args, out) -> tuple[str | None, dict]:
        """(path for --corpus or None, its description); a text corpus's checksum is also saved
        as OUT/…_raw/text_corpus.json, so aggregated calls can show they trained on one text."""
        if name == "generated":
            return None, {"name": "generated", "source": "launch/ generated corpus (train_gpt defaults)"}
        info = {}
        if name != "text":
            path = os.path.abspath(name)
        elif args.text_corpus:
            path = os.path.abspath(args.text_corpus)
        else:  # built outside OUT: megabytes of text do not belong with the results
            import tempfile

            path = os.path.join(tempfile.gettempdir(), f"vpcce_docstrings_{args.text_mb:g}mb.txt")
            if not os.path.exists(path):
                info = build_text_corpus(path, int(args.text_mb * 2**20))
        with open(path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        info.update(name=os.path.basename(path), path=path, bytes=os.path.getsize(path), sha256=sha)
        with open(out.raw("text_corpus.json"), "w") as f:
            json.dump(info, f, indent=1)
        return path, info

    @staticmethod
    def run(args, out) -> dict:
        if args.aggregate:
            return Fidelity.aggregate(args.aggregate, args.last)
        budget = Budget(args.budget_s)
        corpora, jobs = [], []
        runs_dir = out.raw("runs")
        os.makedirs(runs_dir, exist_ok=True)
        modes = [m for m in args.modes.split(",") if m]
        for cname in [c for c in args.corpora.split(",") if c]:
            path, info = Fidelity.corpus_file(cname, args, out)
            corpora.append(info)
            label = cname if cname in ("generated", "text") else info["name"]
            for seed in int_list(args.seeds):
                # One native run per (corpus, seed): every fused mode of that seed starts from its weights
                # and batches (a standalone --loss fused/native run builds the same ones as --loss both).
                for mode in ["native"] + modes:
                    jobs.append({"name": f"{label}_seed{seed}_{mode}", "corpus": info["name"], "seed": seed,
                                 "mode": mode, "path": path})
        failures = []

        def launch(run: dict) -> None:
            rundir = os.path.join(runs_dir, run["name"])
            if read_log(os.path.join(rundir, "log.json")) is not None:
                run["status"] = "done earlier"
                return
            if not budget.fits():
                run["status"] = "not run: time budget (--budget-s)"
                return
            loss = ["--loss", "native"] if run["mode"] == "native" else ["--loss", "fused"] + mode_args(run["mode"])
            cmd = torchrun(1) + [TRAIN_GPT, *loss, "--steps", str(args.steps), "--seed", str(run["seed"]),
                                 "--out", rundir, "--overwrite"]
            cmd += (["--preset", args.preset] if args.preset else []) + (["--corpus", run["path"]] if run["path"] else [])
            cmd += (["--device", "cpu"] if args.device == "cpu" else []) + shlex.split(args.extra)
            t0 = time.time()
            rc, tail = run_logged(cmd, os.path.join(runs_dir, f"{run['name']}.log"),
                                    timeout=min(args.run_timeout, budget.left() + 40), env=child_env(), cwd=REPO,
                                    echo=args.parallel == 1)
            budget.done(time.time() - t0)
            run["seconds"] = time.time() - t0
            run["status"] = "ok" if rc == 0 else f"return code {rc}"
            print(f"fidelity: {run['name']}: {run['status']} in {run['seconds']:.0f} s", flush=True)
            if rc != 0:
                failures.append({"run": run["name"], "returncode": rc, "log_tail": tail})

        # --parallel K: K training processes share the GPU (each small-preset run leaves it partly idle)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            list(pool.map(launch, jobs))
        runs = [{k: v for k, v in j.items() if k != "path"} for j in jobs]
        doc = Fidelity.aggregate([runs_dir], args.last)
        doc.update(corpora=corpora, runs=runs, parallel=args.parallel)
        return outcome(failures, **doc)

    @staticmethod
    def aggregate(paths: list[str], last: int) -> dict:
        """Per-run differences and the per (corpus, mode) summary from every log.json under `paths`:
        a fused run is compared with the native run of its log (--loss both) or else with the
        native run of the same corpus and seed (--loss native)."""
        logs = []
        for root in paths:
            for p in sorted(glob.glob(os.path.join(root, "**", "log.json"), recursive=True)):
                if not any(part.startswith("fidelity") for part in os.path.abspath(p).split(os.sep)):
                    continue  # e.g. the gpt suite's runs beside them
                log = read_log(p)
                if log and log.get("runs"):
                    cfg = log.get("config", {})
                    corpus = os.path.basename(cfg["corpus"]) if cfg.get("corpus") else "generated"
                    logs.append((p, log, cfg, corpus))
        natives = {}  # (corpus, seed) → [native per-step losses], one per run that trained native
        for _, log, cfg, corpus in logs:
            if "native" in log["runs"]:
                natives.setdefault((corpus, cfg.get("seed")), []).append(
                    (log, [s["loss"] for s in log["runs"]["native"]["steps"]]))
        per_run = []
        for p, log, cfg, corpus in logs:
            if "fused" not in log["runs"]:
                continue
            own = log if "native" in log["runs"] else None
            pair = next(((lg, n) for lg, n in natives.get((corpus, cfg.get("seed")), []) if own is None or lg is own),
                        None)
            if pair is None:
                continue
            native_log, native = pair
            fused = [s["loss"] for s in log["runs"]["fused"]["steps"]]
            k = min(last, len(fused), len(native))
            diff = [a - b for a, b in zip(fused, native)]
            per_run.append({"log": os.path.abspath(p), "corpus": corpus, "seed": cfg.get("seed"), "mode": mode_of(cfg),
                            "steps": len(fused), "last": k, "fused_last": statistics.fmean(fused[-k:]),
                            "native_last": statistics.fmean(native[-k:]), "diff_last": statistics.fmean(diff[-k:]),
                            "max_abs_diff_first_5": max(abs(d) for d in diff[:5]), "diff_per_step": diff,
                            "native_per_step": native, "preset": cfg.get("preset"), "layers": cfg.get("layers"),
                            "hidden": cfg.get("hidden"), "vocab_size": cfg.get("vocab_size"),
                            "tokens_per_s": log["runs"]["fused"]["summary"].get("median_tokens_per_s"),
                            "native_tokens_per_s": native_log["runs"]["native"]["summary"].get("median_tokens_per_s")})
        summary = []
        for corpus in dict.fromkeys(r["corpus"] for r in per_run):
            # native per seed: one value per seed (every mode of a seed shares its weights and batches)
            nat = {seed: [statistics.fmean(n[-last:]) for _, n in v] for (c, seed), v in natives.items()
                   if c == corpus}
            native_seed = [statistics.fmean(v) for v in nat.values()]
            native_std = statistics.stdev(native_seed) if len(native_seed) > 1 else None
            rerun = [max(v) - min(v) for v in nat.values() if len(v) > 1]
            for mode in dict.fromkeys(r["mode"] for r in per_run if r["corpus"] == corpus):
                rs = [r for r in per_run if r["corpus"] == corpus and r["mode"] == mode]
                d = [r["diff_last"] for r in rs]
                mean_d = statistics.fmean(d)
                sd = statistics.stdev(d) if len(d) > 1 else None
                summary.append({"corpus": corpus, "mode": mode, "seeds": sorted(r["seed"] for r in rs),
                                "steps": min(r["steps"] for r in rs), "last": min(r["last"] for r in rs),
                                "mean_diff": mean_d, "std_diff": sd,
                                "sem_diff": sd / math.sqrt(len(d)) if sd is not None else None,
                                "native_seed_std": native_std,
                                "native_rerun_max_abs": max(rerun) if rerun else None,
                                "ratio_to_native_spread": abs(mean_d) / native_std if native_std else None,
                                "fused_last_mean": statistics.fmean(r["fused_last"] for r in rs),
                                "native_last_mean": statistics.fmean(r["native_last"] for r in rs),
                                "vocab_size": rs[0]["vocab_size"]})
        corpora = []  # the built text corpora found beside the runs: one checksum means one text
        for root in paths:
            for p in sorted(glob.glob(os.path.join(root, "**", "text_corpus.json"), recursive=True)):
                info = read_log(p)
                if info:
                    corpora.append(info)
        # where the runs trained (the header names the machine that aggregates)
        trained_on = sorted({f"{cfg.get('device')}/{cfg.get('backend')}, torch {cfg.get('torch')}"
                             for _, _, cfg, _ in logs})
        return {"per_run": per_run, "summary": summary, "corpora": corpora, "trained_on": trained_on,
                "aggregated_from": [os.path.abspath(p) for p in paths]}

    @staticmethod
    def markdown(doc: dict) -> str:
        lines = header(doc, "fidelity suite", Fidelity.INTRO)
        if doc.get("trained_on"):
            lines += ["", "Runs trained on: " + "; ".join(doc["trained_on"]) + " (the header above names the "
                      "machine that tabulated them).", ""]
        rows = [[s["corpus"], s["mode"], ",".join(map(str, s["seeds"])), f"{s['steps']} (last {s['last']})",
                 R.fmt(s["native_last_mean"], ".4f"), R.fmt(s["mean_diff"], "+.2e"), R.fmt(s["std_diff"], ".1e"),
                 R.fmt(s["native_seed_std"], ".1e"), R.fmt(s["ratio_to_native_spread"], ".3f"),
                 R.fmt(s["native_rerun_max_abs"], ".1e")] for s in doc.get("summary", [])]
        lines += R.md_table(["corpus", "mode", "seeds", "steps", "native loss (last)", "mean Δ", "std Δ over seeds",
                             "native seed std", "|mean Δ| / native std", "native rerun |Δ| (same seed)"], rows)
        lines += ["", "Per run:", ""]
        rows = [[r["corpus"], r["mode"], str(r["seed"]), str(r["steps"]), f"{r['fused_last']:.4f}",
                 f"{r['native_last']:.4f}", f"{r['diff_last']:+.2e}", f"{r['max_abs_diff_first_5']:.1e}",
                 R.fmt(r.get("tokens_per_s"), ",.0f"), R.fmt(r.get("native_tokens_per_s"), ",.0f")]
                for r in doc.get("per_run", [])]
        lines += R.md_table(["corpus", "mode", "seed", "steps", "fused (last)", "native (last)", "Δ",
                             "max |Δ| first 5 steps", "fused tokens/s", "native tokens/s"], rows)
        shas = {c["sha256"] for c in doc.get("corpora", []) if c.get("sha256")}
        if len(shas) > 1:
            lines.append(f"\n**Warning: the runs used {len(shas)} different text corpora (checksums differ).**")
        for c in doc.get("corpora", []):
            lines.append(f"\ncorpus {c.get('name')}: " + ", ".join(f"{k} {v}" for k, v in c.items() if k != "name"))
        for r in doc.get("runs", []):
            if r.get("status") not in (None, "ok", "done earlier"):
                lines.append(f"\n{r['name']}: {r['status']}")
        lines += failure_lines(doc)
        return "\n".join(lines) + "\n"

    @staticmethod
    def chart(doc: dict, path: str):
        per_run = doc.get("per_run", [])
        if not per_run:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        corpora = list(dict.fromkeys(r["corpus"] for r in per_run))
        fig, axes = plt.subplots(2, len(corpora), figsize=(6.5 * len(corpora), 7.5), squeeze=False)
        spread = {(s["corpus"], s["mode"]): s for s in doc.get("summary", [])}
        for ci, corpus in enumerate(corpora):
            top, bottom = axes[0, ci], axes[1, ci]
            seen_native = set()
            for mi, mode in enumerate(dict.fromkeys(r["mode"] for r in per_run if r["corpus"] == corpus)):
                rs = [r for r in per_run if r["corpus"] == corpus and r["mode"] == mode]
                n = min(len(r["diff_per_step"]) for r in rs)
                mean = [statistics.fmean(r["diff_per_step"][i] for r in rs) for i in range(n)]
                w = max(1, n // 50)
                smooth = [statistics.fmean(mean[max(0, i - w + 1): i + 1]) for i in range(n)]
                bottom.plot(range(1, n + 1), smooth, lw=1.4, color=f"C{mi}",
                            label=f"{mode}: fused − native, mean of {len(rs)} seeds ({w}-step mean)")
                for r in rs:
                    if r["seed"] not in seen_native:
                        seen_native.add(r["seed"])
                        top.plot(range(1, len(r["native_per_step"]) + 1), r["native_per_step"], lw=0.8,
                                 label=f"native, seed {r['seed']}")
            std = next((s["native_seed_std"] for (c, _), s in spread.items() if c == corpus and s["native_seed_std"]),
                       None)
            if std:
                bottom.axhspan(-std, std, color="gray", alpha=0.2, label="± native seed-to-seed std (last steps)")
            bottom.axhline(0, color="black", lw=0.6)
            text = [f"{s['mode']}: mean Δ {s['mean_diff']:+.1e} over the last {s['last']} steps"
                    for (c, _), s in spread.items() if c == corpus]
            if std:
                text.append(f"native seed-to-seed std {std:.1e}")
            bottom.text(0.01, 0.02, "\n".join(text), transform=bottom.transAxes, fontsize=7, va="bottom")
            top.set_title(f"{corpus}: native training loss per seed", fontsize=10)
            top.set_ylabel("loss (nats/token)")
            top.set_yscale("log")
            top.legend(fontsize=7)
            bottom.set_title(f"{corpus}: fused − native training loss", fontsize=10)
            bottom.set_xlabel("step")
            bottom.legend(fontsize=7)
            for ax in (top, bottom):
                ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# ----------------------------------------------------------------------------------------------
class HF:
    """one GPU: a Hugging Face Llama-shaped training step, unpatched vs our patch (default and
    grad_in_forward) vs Liger's (bench_transformers.py)."""

    @staticmethod
    def add_args(p):
        p.add_argument("--layers", type=int, default=2)
        p.add_argument("--seq", type=int, default=8192)
        p.add_argument("--reps", type=int, default=5)
        p.add_argument("--timeout-s", type=float, default=400.0)

    @staticmethod
    def run(args, out) -> dict:
        raw = out.raw()
        cmd = [sys.executable, os.path.join(HERE, "bench_transformers.py"), "--out", raw, "--layers", str(args.layers),
               "--seq", str(args.seq), "--reps", str(args.reps)]
        rc, tail = run_logged(cmd, out.raw("bench_transformers.log"), timeout=args.timeout_s, env=child_env(), cwd=REPO)
        part = read_log(os.path.join(raw, "bench_transformers.json")) or {}
        rows = part.get("rows", [])
        R.add_ratio(rows, "step_ms", "ratio_unpatched", "unpatched", lambda r: 0)
        failures = [] if rc == 0 and rows else [{"returncode": rc, "log_tail": tail}]
        return outcome(failures, results=rows, bench_args=part.get("args"))

    @staticmethod
    def markdown(doc: dict) -> str:
        a = doc.get("bench_args") or {}
        lines = header(doc, "hf suite", (
            f"Llama-3-8B-shaped, {a.get('layers')} layers, random weights, bf16, batch {a.get('batch')} × seq "
            f"{a.get('seq')}; step = forward with labels + backward; median of {a.get('reps')}."))
        rows = [[r["method"], R.fmt(r.get("step_ms"), ".1f"), R.fmt(r.get("ratio_unpatched"), ".3f"),
                 R.fmt(r.get("peak_mb"), ".0f"), R.fmt(r.get("loss"), ".6f"), r.get("error", "")]
                for r in doc.get("results", [])]
        lines += R.md_table(["method", "step ms", "× unpatched", "peak MiB added", "loss", "error"], rows)
        lines += failure_lines(doc)
        return "\n".join(lines) + "\n"

    @staticmethod
    def chart(doc: dict, path: str):
        rows = [{"group": "Llama-shaped step", "panel": "", "method": r["method"], "value": r.get("step_ms"),
                 "mem": r.get("peak_mb"), "ratio": r.get("ratio_unpatched"), "status": r.get("error", "")}
                for r in doc.get("results", [])]
        if not rows:
            return None
        return charts.bar_chart(rows, path, value_label="training step ms", ratio_label="time / unpatched",
                           title=f"Hugging Face step, {doc.get('machine', {}).get('device_name', '')}")


# ----------------------------------------------------------------------------------------------
class Tests:
    """pytest tests/gpu/test_gpu.py (or --pytest-args), its output saved and its counts tabulated."""

    @staticmethod
    def add_args(p):
        p.add_argument("--pytest-args", default="tests/gpu/test_gpu.py -q", help="arguments of pytest, one string")
        p.add_argument("--timeout-s", type=float, default=480.0)

    @staticmethod
    def run(args, out) -> dict:
        import xml.etree.ElementTree as ET

        junit = out.raw("junit.xml")
        cmd = [sys.executable, "-m", "pytest", *shlex.split(args.pytest_args), f"--junitxml={junit}",
               "-p", "no:cacheprovider"]
        t0 = time.time()
        rc, tail = run_logged(cmd, out.raw("pytest.log"), timeout=args.timeout_s, env=child_env(), cwd=REPO)
        counts, failed = {}, []
        try:
            root = ET.parse(junit).getroot()
            suites = [root] if root.tag == "testsuite" else list(root)
            for key in ("tests", "failures", "errors", "skipped"):
                counts[key] = sum(int(s.get(key, 0)) for s in suites)
            for case in root.iter("testcase"):
                for kind in ("failure", "error"):
                    el = case.find(kind)
                    if el is not None:
                        failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                                       "message": (el.get("message") or "")[:400]})
        except (OSError, ET.ParseError) as err:
            counts["junit_error"] = str(err)
        counts["passed"] = (counts.get("tests", 0) - counts.get("failures", 0) - counts.get("errors", 0)
                            - counts.get("skipped", 0)) if "tests" in counts else None
        return {"returncode": rc, "counts": counts, "failed": failed, "log_tail": tail, "seconds": time.time() - t0,
                "exit_status": 0 if rc == 0 else 1}

    @staticmethod
    def markdown(doc: dict) -> str:
        c = doc.get("counts", {})
        lines = header(doc, "tests suite", (
            f"`pytest {doc.get('args', {}).get('pytest_args')}`: **{c.get('passed')} passed**, "
            f"{c.get('failures')} failed, {c.get('errors')} errors, {c.get('skipped')} skipped "
            f"(return code {doc.get('returncode')}, {doc.get('seconds', 0):.0f} s)."))
        if doc.get("failed"):
            lines += R.md_table(["test", "kind", "message"], [[f["test"], f["kind"], f["message"].replace("\n", " ")]
                                                              for f in doc["failed"]])
        lines += ["", "```", doc.get("log_tail", ""), "```"]
        return "\n".join(lines) + "\n"

    chart = None
