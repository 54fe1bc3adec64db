"""The runner's `loss` suite (one GPU): every method per shape, one process per input kind.

For each input kind a child process builds the inputs of each shape and times every method on
them, so our adaptive tile-skipping policy (`filter_eps="auto"`), which learns from earlier calls,
never sees two kinds. Per method and shape:
  fwd ms       forward without autograd (inputs detached, torch.no_grad); --no-fwd skips it
  fwd+bwd ms   loss, then torch.autograd.grad(loss, (e, c)); gradients are part of the peak
  peak MiB     max allocated during the timed calls − allocated before (inputs excluded)
  errors       vs float64: loss over all tokens, dE on --check-rows tokens, dC with --check-dc
  TFLOP/s      6·N·D·V / fwd+bwd time, and % of a measured 8192³ bf16 matmul
  × compile    fwd+bwd time / torch.compile's, same process; × 4×cuBLAS: / the cublas_4x row
The reference rows cublas_3x / cublas_4x are the measured products E·Cᵀ [N,V] + G·C [N,D] + Gᵀ·E
[V,D] on the same e, c (G random), and that plus one more E·Cᵀ (what a recomputing kernel does).
Methods are timed one after another: for close races use the `race` suite (interleaved rounds).
A method that is missing, fails or runs out of memory is recorded and the run goes on; past the
time budget the remaining cases are recorded as not run.
"""

from __future__ import annotations

import os
import time

import charts
import methods as M
import tables as R
from children import run_child
from inputs import DTYPES, KINDS, check_kinds, make_inputs, parse_shapes
from references import Reference, case_checks, error_text, fraction_of_peak, fwd_bwd_flops, tflops
from tables import fmt, short_error, shape_label
from timing import CublasProducts, free_memory, measure_matmul_peak, setup_device, sync, time_calls

# Shapes (N×D×V): Llama-3 8B, Gemma-2 2B, Qwen-2 7B heads, fewer tokens, one rank of tp=4 / tp=8.
ALL_SHAPES = ["8192x4096x128256", "8192x2304x256000", "8192x4096x151936", "4096x4096x128256",
              "16384x4096x32064", "16384x4096x16032"]
DEFAULT_SHAPES = ["8192x4096x128256", "8192x2304x256000", "16384x4096x32064"]
DEFAULT_KINDS = ["random", "zipf", "zipf_shuffled"]
DEFAULT_METHODS = ["vpcce_triton", "vpcce_triton_memory", "torch_compile", "torch_eager", "liger", "apple_cce",
                   "megatron_fused", "torch_linear_ce", "cublas_3x", "cublas_4x"]
BUDGET_SKIP = "not run: time budget (--budget-s)"


def add_args(p):
    M.add_selection_args(p, DEFAULT_SHAPES, ALL_SHAPES, DEFAULT_KINDS, DEFAULT_METHODS,
                         "also run each selected vpcce method under this vocab_parallel_cce.Tuning (repeatable), "
                         "e.g. --tuning 'group_v=8' --tuning 'grad_block=128,256,64,8,3 use_tma=0'")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=4.0,
                   help="cap the timed reps of one measurement to about this long (≥ 3 reps)")
    p.add_argument("--check-rows", type=int, default=256, help="tokens whose dE is checked (0: skip)")
    p.add_argument("--check-dc", action="store_true", help="also check dC against float64 (slower)")
    p.add_argument("--no-check", action="store_true", help="skip all correctness checks")
    p.add_argument("--no-fwd", action="store_true", help="skip the forward-only timing")
    p.add_argument("--stats-tokens", type=int, default=1024, help="tokens for the input statistics (0: skip)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 matmul peak for the %% column (default: measure an 8192³ matmul per process)")
    p.add_argument("--max-nv", type=float, default=None, help="raise the N·V cap of the slow torch path")
    p.add_argument("--budget-s", type=float, default=510.0,
                   help="start no new case after this many seconds (all kinds together); a process still "
                        "running 40 s later is stopped")
    p.add_argument("--in-process", action="store_true",
                   help="run every kind in this process (debugging: the skip policy then sees mixed kinds)")


def shapes_of(args) -> list[tuple[int, int, int]]:
    try:
        return parse_shapes(args.shapes, ALL_SHAPES)
    except ValueError as err:
        raise SystemExit(f"--shapes: {err}") from None


# ----------------------------------------------------------------------------------------------
# measuring (child process)
# ----------------------------------------------------------------------------------------------
def skip_policy_state(v: int, d: int, tuning=None) -> dict:
    """What the adaptive skip policy (triton_backend.skip_policy) measured for this classifier
    shape, read only; a library whose policy moved reads as unavailable."""
    try:
        from vocab_parallel_cce import triton_backend as tb

        policy = getattr(tb, "skip_policy", None) or getattr(tb, "_SKIP_POLICY")
        for key, st in policy.state.items():
            if tuple(key[-2:]) == (v, d):
                frac = st.get("fraction")
                if frac is None and st.get("pinned") is not None:
                    frac = float(st["pinned"])
                if tuning is None:
                    cls, _ = M.tuning_type()
                    tuning = cls.from_env() if cls is not None else None
                thr = getattr(tuning, "skip_keep_threshold", None)
                return {"kept_fraction": frac, "skips": None if frac is None or thr is None else frac < thr}
        return {"unavailable": "no policy state for this shape"}
    except Exception as err:  # noqa: BLE001
        return {"unavailable": f"library internals moved ({short_error(err, 120)})"}


def run_method(m, e, c, t, ref: Reference | None, args, device) -> dict:
    import torch

    n, d = e.shape
    v = c.shape[0]
    rec: dict = {"method": m.name, "note": m.note, "errors": {}}
    ok, why = m.usable(device, n, v)
    if not ok and args.max_nv is not None and why.startswith("N·V") and n * v <= args.max_nv:
        ok, why = True, ""
    if not ok:
        rec["skipped"] = why
        return rec

    def record_error(phase, err):
        rec["errors"][phase] = error_text(err)
        print(f"    {m.name} {phase}: {rec['errors'][phase]}", flush=True)

    if not args.no_fwd:
        e_d, c_d = e.detach(), c.detach()

        def fwd():
            with torch.no_grad():
                return m(e_d, c_d, t)

        try:
            ms, mb = time_calls(fwd, args.warmup, args.reps, args.max_seconds)
            rec.update(fwd_ms=ms, fwd_peak_mb=mb)
        except Exception as err:  # noqa: BLE001
            record_error("fwd", err)
        free_memory()

    e_g = e.detach().requires_grad_(True)
    c_g = c.detach().requires_grad_(True)

    def fwd_bwd():
        return m.fwd_bwd(e_g, c_g, t)

    try:
        ms, mb = time_calls(fwd_bwd, args.warmup, args.reps, args.max_seconds)
        flops = fwd_bwd_flops(n, d, v)
        rec.update(fwd_bwd_ms=ms, fwd_bwd_peak_mb=mb, fwd_bwd_tflops=tflops(flops, ms),
                   frac_peak=fraction_of_peak(flops, ms, args.peak_tflops))
    except Exception as err:  # noqa: BLE001
        record_error("fwd_bwd", err)
    free_memory()
    if m.extra.get("adaptive") and device.type == "cuda":
        rec["skip_policy"] = skip_policy_state(v, d, m.extra.get("tuning"))
    if ref is not None:
        try:
            rec.update(ref.check(m, e, c, t))
        except Exception as err:  # noqa: BLE001
            record_error("check", err)
        free_memory()
    return rec


def measure_peak(args, device) -> str:
    """Fills args.peak_tflops (measured unless given); returns where it came from."""
    if args.peak_tflops is not None:
        return "given"
    if device.type != "cuda":
        return "none on CPU"
    args.peak_tflops = measure_matmul_peak(device)
    free_memory()
    return "measured 8192³ bf16 matmul, median of 10"


def reference_rows(e, c, args, specs) -> list[dict]:
    """The cublas_3x / cublas_4x rows selected, from one timing of each product on e, c."""
    wanted = [name for name, spec in specs if spec is None and name in M.REFERENCE_ROWS]
    if not wanted:
        return []
    n, d, v = e.shape[0], e.shape[1], c.shape[0]
    try:
        each = CublasProducts(e, c, args.seed).each_ms(args.warmup, args.reps, args.max_seconds)
    except Exception as err:  # noqa: BLE001
        return [{"method": w, "errors": {"products": error_text(err)}} for w in wanted]
    finally:
        free_memory()
    out = []
    for w in wanted:
        ms = sum(each.values()) + (each["E@C.T [N,V]"] if w == "cublas_4x" else 0.0)
        flops = fwd_bwd_flops(n, d, v)
        out.append({"method": w, "errors": {}, "fwd_bwd_ms": ms, "products_ms": each,
                    "fwd_bwd_tflops": tflops(flops, ms), "frac_peak": fraction_of_peak(flops, ms, args.peak_tflops),
                    "note": "E·Cᵀ + G·C + Gᵀ·E" + (" + E·Cᵀ" if w == "cublas_4x" else "") + f" ({args.dtype})"})
    return out


def measure(args, kinds: list[str], deadline: float, save_part) -> None:
    """Every shape × method for `kinds`, in this process; `save_part(part)` after each row."""
    device = setup_device(args.device)
    dtype = DTYPES[args.dtype]
    specs = M.method_specs(args.methods, args.tuning)
    peak_source = measure_peak(args, device)
    print(f"bf16 matmul peak: {fmt(args.peak_tflops, '.0f')} TFLOP/s ({peak_source})", flush=True)
    methods = {}
    for name, spec in specs:
        if name in M.REFERENCE_ROWS:
            continue
        m = M.build_method(name, spec)
        methods[m.name] = m
        if m.fn is None:
            print(f"  {m.name}: unavailable ({m.skip_reason})", flush=True)
    from machine import machine_info

    part = {"meta": {"env": machine_info(), "device": str(device), "peak_tflops": args.peak_tflops,
                     "peak_source": peak_source, "kinds": kinds, "pid": os.getpid()},
            "inputs": [], "results": []}
    ref_names = [name for name, spec in specs if spec is None and name in M.REFERENCE_ROWS]
    t_start = time.perf_counter()
    for kind in kinds:
        for n, d, v in shapes_of(args):
            print(f"== {n}x{d}x{v} {kind}  ({time.perf_counter() - t_start:.0f}s)", flush=True)
            base = {"shape": [n, d, v], "kind": kind}
            if time.time() > deadline:
                part["results"] += [{**base, "method": row, "skipped": BUDGET_SKIP} for row in ref_names + list(methods)]
                save_part(part)
                continue
            entry = dict(base)
            try:
                e, c, t = make_inputs(n, d, v, dtype, kind, device, args.seed)
            except Exception as err:  # noqa: BLE001
                entry["error"] = error_text(err)
                part["inputs"].append(entry)
                part["results"] += [{**base, "method": name, "errors": {"inputs": entry["error"]}}
                                    for name in ref_names + list(methods)]
                save_part(part)
                free_memory()
                continue
            rows = reference_rows(e, c, args, specs)
            ref = case_checks(entry, e, c, t, args, args.check_dc)
            part["inputs"].append(entry)
            part["results"] += [{**base, **r} for r in rows]
            for r in rows:
                print(f"  {r['method']:20s} {fmt(r.get('fwd_bwd_ms'), '.2f')} ms", flush=True)
            for name, m in methods.items():
                t0 = time.perf_counter()
                if time.time() > deadline:
                    rec = {"method": name, "skipped": BUDGET_SKIP}
                else:
                    rec = run_method(m, e, c, t, ref, args, device)
                rec.update(base, seconds=time.perf_counter() - t0)
                part["results"].append(rec)
                print(f"  {name:20s} " + (R.status(rec) or
                      f"fwd {fmt(rec.get('fwd_ms'), '.2f')} ms  fwd+bwd {fmt(rec.get('fwd_bwd_ms'), '.2f')} ms  "
                      f"peak {fmt(rec.get('fwd_bwd_peak_mb'), '.0f')} MiB  loss err {fmt(rec.get('loss_rel_err'), '.1e')}  "
                      f"dE err {fmt(rec.get('de_rel_err'), '.1e')}  dC err {fmt(rec.get('dc_rel_err'), '.1e')}")
                      + f"  ({rec['seconds']:.1f}s)", flush=True)
                save_part(part)
            del e, c, t, ref
            free_memory()
    sync()
    part["meta"]["seconds"] = time.perf_counter() - t_start
    save_part(part)


# ----------------------------------------------------------------------------------------------
# the suite (parent process): one child per kind, merge, table, chart
# ----------------------------------------------------------------------------------------------
def merge_parts(parts: list[dict]) -> dict:
    """One document from the children's parts, with the same-run ratios filled in."""
    results = [r for p in parts for r in p.get("results", [])]
    add_ratios(results)
    return {"processes": [p.get("meta", {}) for p in parts], "inputs": [i for p in parts for i in p.get("inputs", [])],
            "results": results}


def add_ratios(results: list[dict]) -> None:
    """ratio_torch_compile / ratio_cublas_4x: fwd+bwd time over that row's, same shape and kind."""
    for base, key in (("torch_compile", "ratio_torch_compile"), ("cublas_4x", "ratio_cublas_4x")):
        R.add_ratio(results, "fwd_bwd_ms", key, base, lambda r: (tuple(r["shape"]), r["kind"]))


def run_per_kind(suite: str, measure_fn):
    """The suite's `run(args, out)`: one child process per kind (or all in this one with
    --in-process), each given its share of the time budget; the parts merged."""

    def run_suite(args, out) -> dict:
        kinds = check_kinds(args.kinds)
        shapes_of(args)  # argument errors now, not in a child
        M.method_specs(args.methods, args.tuning)
        t0 = time.time()
        deadline = t0 + args.budget_s
        parts, failures = [], []
        groups = [kinds] if args.in_process else [[k] for k in kinds]
        for i, group in enumerate(groups):
            name = "_".join(group)
            if args.in_process:
                holder = {}
                measure_fn(args, group, deadline, lambda part: holder.update(part=part))
                parts.append(holder["part"])
                continue
            share = (deadline - time.time()) / (len(groups) - i)  # with what earlier kinds left
            part, failure = run_child(suite, args, group, time.time() + share, out.raw(f"part_{name}.json"),
                                      out.raw(f"{name}.log"), out.raw(f"config_{name}.json"))
            if part is not None:
                parts.append(part)
            if failure is not None:
                failures.append(failure)
        doc = merge_parts(parts)
        doc["failures"] = failures
        doc["seconds"] = time.time() - t0
        doc["exit_status"] = 1 if failures else 0
        return doc

    return run_suite


# ----------------------------------------------------------------------------------------------
# table and chart
# ----------------------------------------------------------------------------------------------
COLUMNS = ["shape", "kind", "method", "fwd ms", "fwd+bwd ms", "× torch.compile", "× 4×cuBLAS", "peak MiB",
           "TFLOP/s (6NDV)", "% peak", "loss err", "dE err", "dC err", "notes"]


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        head = [shape_label(r["shape"]), r["kind"], R.label(r["method"])]
        st = R.status(r)
        if "skipped" in r:
            rows.append(head + [""] * (len(COLUMNS) - 4) + [st])
            continue
        notes = []
        pol = r.get("skip_policy") or {}
        if pol.get("kept_fraction") is not None:
            notes.append(f"{100 * pol['kept_fraction']:.0f}% tiles kept: {'skips' if pol.get('skips') else 'dense'}")
        if r.get("products_ms"):
            notes.append(", ".join(f"{k} {v:.2f}" for k, v in r["products_ms"].items()))
        if st:
            notes.append(st)
        frac = R.num(r.get("frac_peak"))
        rows.append(head + [
            R.fmt(R.num(r.get("fwd_ms")), ".2f"), R.fmt(R.num(r.get("fwd_bwd_ms")), ".2f"),
            R.fmt(r.get("ratio_torch_compile"), ".2f"), R.fmt(r.get("ratio_cublas_4x"), ".2f"),
            R.fmt(R.num(r.get("fwd_bwd_peak_mb")), ".0f"), R.fmt(R.num(r.get("fwd_bwd_tflops")), ".0f"),
            R.fmt(None if frac is None else 100 * frac, ".1f"),
            R.fmt(R.num(r.get("loss_rel_err")), ".1e"), R.fmt(R.num(r.get("de_rel_err")), ".1e"),
            R.fmt(R.num(r.get("dc_rel_err")), ".1e"), "; ".join(notes)])
    return rows


def markdown(doc: dict) -> str:
    from machine import header

    a = doc.get("args", {})
    peaks = [p.get("peak_tflops") for p in doc.get("processes", []) if R.num(p.get("peak_tflops"))]
    lines = header(doc, "loss suite", (
        f"{a.get('dtype')}, median of {a.get('reps')} after {a.get('warmup')} warm-up (CUDA events); one process "
        "per input kind, methods one after another. bf16 matmul peak (8192³, per process): "
        + (", ".join(f"{p:.0f}" for p in peaks) if peaks else "–") + " TFLOP/s. TFLOP/s counts 6·N·D·V; "
        "× columns: fwd+bwd time over torch.compile's / over 4× cuBLAS's, same process and inputs. "
        "Peak MiB: forward+backward, inputs excluded, gradients included."))
    lines += R.md_table(COLUMNS, table_rows(doc.get("results", [])))
    inputs = doc.get("inputs", [])
    if inputs:
        lines += ["", "Inputs (first tokens, float32; tile frac = 128×128 tiles with some p ≥ 2^-12, columns sorted "
                  "by mean logit / unsorted; ref loss = float64 over all tokens):", ""]
        rows = []
        for i in inputs:
            st = i.get("stats") or {}
            rows.append([shape_label(i["shape"]), i["kind"], R.fmt(st.get("mean_loss"), ".3f"),
                         R.fmt(st.get("tile_frac"), ".3f"), R.fmt(st.get("tile_frac_unsorted"), ".3f"),
                         R.fmt(i.get("ref_loss"), ".4f"), i.get("error") or i.get("ref_error") or ""])
        lines += R.md_table(["shape", "kind", "mean loss", "tile frac", "tile frac (unsorted)", "ref loss", "error"], rows)
    notes = sorted({f"{R.label(r['method'])}: {r['note']}" for r in doc.get("results", []) if r.get("note")})
    if notes:
        lines += ["", "Methods: " + "; ".join(notes) + "."]
    for f in doc.get("failures", []):
        lines += ["", f"**Process for {f.get('kinds')} failed** (return code {f.get('returncode')}): "
                  f"{f.get('error', '')}", "```", f.get("log_tail", ""), "```"]
    return "\n".join(lines) + "\n"


def chart_rows(doc: dict) -> list[dict]:
    return [{"group": shape_label(r["shape"]), "panel": r["kind"], "method": r["method"],
             "value": r.get("fwd_bwd_ms"), "mem": r.get("fwd_bwd_peak_mb"), "ratio": r.get("ratio_torch_compile"),
             "status": R.status(r)} for r in doc.get("results", [])]


def chart(doc: dict, path: str) -> str:
    gpu = (doc.get("machine") or {}).get("device_name", "")
    return charts.bar_chart(chart_rows(doc), path, value_label="forward+backward ms", mem_label="peak MiB added",
                            ratio_label="time / torch.compile's", refs=M.REFERENCE_ROWS,
                            title=f"Fused linear cross-entropy (loss suite), {gpu} {doc.get('date', '')}".strip())


def merge(docs: list[dict]) -> dict:
    """Several loss-suite documents (e.g. one call per kind) as one; ratios recomputed."""
    out = R.concat_docs(docs, ("processes", "inputs", "results", "failures"))
    add_ratios(out["results"])
    return out


# ----------------------------------------------------------------------------------------------
# components: where the GPU time of one forward+backward goes
# ----------------------------------------------------------------------------------------------
class Components:
    """one GPU: GPU time per kernel of a forward+backward (torch.profiler, public API only) for
    our methods, next to the cuBLAS products it is made of; one process per input kind."""

    DEFAULT_METHODS = "vpcce_triton,vpcce_triton_dense,vpcce_triton_gif"

    @staticmethod
    def add_args(p):
        p.add_argument("--shapes", default="8192x4096x128256,8192x2304x256000", help="comma list of NxDxV or 'all'")
        p.add_argument("--kinds", default="zipf", help=f"comma list of {KINDS}")
        p.add_argument("--methods", default=Components.DEFAULT_METHODS,
                       help="comma list of methods (any of the loss suite's, references excluded)")
        p.add_argument("--tuning", action="append", default=[], metavar="'FIELD=VALUE ...'",
                       help="also profile each selected vpcce method under this Tuning (repeatable)")
        p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--reps", type=int, default=5, help="timed and profiled iterations")
        p.add_argument("--top", type=int, default=10, help="kernels listed per method")
        p.add_argument("--budget-s", type=float, default=480.0, help="as for the loss suite")
        p.add_argument("--in-process", action="store_true")

    @staticmethod
    def profile(fn, reps: int, device) -> tuple[list[dict], float]:
        """[{name, calls, ms}] per iteration, largest first, and the total, of `fn`'s kernels
        (CPU operators when not on CUDA)."""
        from torch.profiler import ProfilerActivity, profile

        cuda = device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(reps):
                fn()
            sync()
        rows = []
        for ev in prof.key_averages():
            if cuda:  # kernels only: an operator's device time is its kernels' again
                if not str(getattr(ev, "device_type", "")).endswith("CUDA"):
                    continue
                us = getattr(ev, "self_device_time_total", None)
                if us is None:
                    us = getattr(ev, "self_cuda_time_total", 0)
            else:
                us = ev.self_cpu_time_total
            if us and us > 0:
                rows.append({"name": ev.key, "calls": ev.count / reps, "ms": us / 1e3 / reps})
        rows.sort(key=lambda r: -r["ms"])
        return rows, sum(r["ms"] for r in rows)

    @staticmethod
    def measure(args, kinds, deadline, save_part):
        import torch

        from machine import machine_info

        device = setup_device(args.device)
        dtype = DTYPES[args.dtype]
        specs = [(n, s) for n, s in M.method_specs(args.methods, args.tuning) if n not in M.REFERENCE_ROWS]
        methods = [M.build_method(n, s) for n, s in specs]
        part = {"meta": {"env": machine_info(), "device": str(device), "kinds": kinds}, "results": []}
        for kind in kinds:
            for n, d, v in shapes_of(args):
                base = {"shape": [n, d, v], "kind": kind}
                print(f"== {n}x{d}x{v} {kind}", flush=True)
                e, c, t = make_inputs(n, d, v, dtype, kind, device, args.seed)
                try:
                    each = CublasProducts(e, c, args.seed).each_ms(args.warmup, args.reps)
                    part["results"].append({**base, "method": "cublas products", "products_ms": each,
                                            "wall_ms": sum(each.values())})
                except Exception as err:  # noqa: BLE001
                    part["results"].append({**base, "method": "cublas products", "errors": {"run": error_text(err)}})
                free_memory()
                e, c = e.requires_grad_(True), c.requires_grad_(True)
                for m in methods:
                    rec = {**base, "method": m.name, "note": m.note, "errors": {}}
                    ok, why = m.usable(device, n, v)
                    if time.time() > deadline:
                        ok, why = False, BUDGET_SKIP
                    if not ok:
                        rec["skipped"] = why
                    else:
                        def fwd_bwd(_m=m):
                            return _m.fwd_bwd(e, c, t)

                        try:
                            rec["wall_ms"], rec["peak_mb"] = time_calls(fwd_bwd, args.warmup, args.reps)
                            kernels, total = Components.profile(fwd_bwd, args.reps, device)
                            rec.update(kernels=kernels[:args.top], kernel_ms_total=total,
                                       other_ms=total - sum(k["ms"] for k in kernels[:args.top]))
                        except Exception as err:  # noqa: BLE001
                            rec["errors"]["run"] = error_text(err)
                    part["results"].append(rec)
                    print(f"  {m.name:24s} " + (R.status(rec) or f"{rec['wall_ms']:.2f} ms, kernels "
                                                 f"{rec['kernel_ms_total']:.2f} ms"), flush=True)
                    save_part(part)
                    free_memory()
                del e, c, t
                free_memory()
        save_part(part)

    @staticmethod
    def markdown(doc: dict) -> str:
        from machine import header

        lines = header(doc, "components", "GPU time per kernel of one forward+backward (torch.profiler, self time, "
                       "mean over the profiled iterations); wall = CUDA-event median of the same call.")
        summary = []
        for r in doc.get("results", []):
            head = [shape_label(r["shape"]), r["kind"], R.label(r["method"])]
            if r.get("products_ms"):
                summary.append(head + [R.fmt(r.get("wall_ms"), ".2f"), "", ", ".join(
                    f"{k} {v:.2f}" for k, v in r["products_ms"].items())])
            else:
                top = ", ".join(f"{k['name'][:40]} {k['ms']:.2f}" for k in (r.get("kernels") or [])[:4])
                summary.append(head + [R.fmt(R.num(r.get("wall_ms")), ".2f"), R.fmt(R.num(r.get("kernel_ms_total")), ".2f"),
                                       R.status(r) or top])
        lines += R.md_table(["shape", "kind", "method", "wall ms", "kernel ms", "largest kernels (ms) / products"], summary)
        for r in doc.get("results", []):
            if not r.get("kernels"):
                continue
            lines += ["", f"### {shape_label(r['shape'])} {r['kind']} {R.label(r['method'])}", ""]
            total = r.get("kernel_ms_total") or 1.0
            rows = [[k["name"][:90], f"{k['calls']:.1f}", f"{k['ms']:.3f}", f"{100 * k['ms'] / total:.1f}"]
                    for k in r["kernels"]]
            rows.append(["(other)", "", R.fmt(r.get("other_ms"), ".3f"), ""])
            lines += R.md_table(["kernel", "calls/iter", "ms/iter", "% of kernel time"], rows)
        return "\n".join(lines) + "\n"

    chart = None
    merge = staticmethod(merge)



run = run_per_kind("loss", measure)
Components.run = staticmethod(run_per_kind("components", Components.measure))
