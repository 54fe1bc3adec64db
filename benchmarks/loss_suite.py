"""The runner's `loss` suite (one GPU): every method per shape, one process per input kind.

For each input kind a child process (`run.py _child CONFIG.json`) builds the inputs of each shape
and times every method on them, so our adaptive tile-skipping policy, which learns from earlier
calls, never sees two kinds. Per method and shape:
  fwd ms       forward without autograd (inputs detached, torch.no_grad); --no-fwd skips it
  fwd+bwd ms   loss, then torch.autograd.grad(loss, (e, c)); gradients are part of the peak
  peak MiB     max allocated during the timed calls − allocated before (inputs excluded)
  errors       vs float64: loss over all tokens, dE on --check-rows tokens, dC with --check-dc
  TFLOP/s      6·N·D·V / fwd+bwd time, and % of a measured 8192³ bf16 matmul
  × compile    fwd+bwd time / torch.compile's, same process; × 4×cuBLAS: / the cublas_4x row
The reference rows cublas_3x / cublas_4x are the measured bf16 products E·Cᵀ [N,V] + G·C [N,D]
+ Gᵀ·E [V,D] (G random), and that plus one more E·Cᵀ (what a recomputing kernel must do).
A method that is missing, fails or runs out of memory is recorded and the run goes on; past the
time budget the remaining cases are recorded as not run.
"""

from __future__ import annotations

import json
import os
import sys
import time

import common as C
import report as R

# Shapes (N×D×V): Llama-3 8B, Gemma-2 2B, Qwen-2 7B heads, fewer tokens, one rank of tp=4 / tp=8.
ALL_SHAPES = ["8192x4096x128256", "8192x2304x256000", "8192x4096x151936", "4096x4096x128256",
              "16384x4096x32064", "16384x4096x16032"]
DEFAULT_SHAPES = ["8192x4096x128256", "8192x2304x256000", "16384x4096x32064"]
DEFAULT_KINDS = ["random", "zipf", "zipf_shuffled"]
HARD_GRACE_S = 40.0  # a process still running this long past the budget is killed (its saved rows kept)


def add_args(p):
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                   help=f"comma list of NxDxV, or 'all' ({','.join(ALL_SHAPES)})")
    p.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help=f"comma list of {C.KINDS}")
    p.add_argument("--methods", default=",".join(C.DEFAULT_METHODS),
                   help=f"comma list of {sorted(C.METHOD_FACTORIES) + list(C.REFERENCE_ROWS)}")
    p.add_argument("--tuning", action="append", default=[], metavar="'FIELD=VALUE ...'",
                   help="also run each selected vpcce method under this vocab_parallel_cce.Tuning (repeatable), "
                        "e.g. --tuning 'group_v=8' --tuning 'grad_block=128,256,64,8,3 use_tma=0'")
    p.add_argument("--dtype", default="bf16", choices=sorted(C.DTYPES))
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
    spec = ",".join(ALL_SHAPES) if args.shapes == "all" else args.shapes
    return [C.parse_shape(s) for s in spec.split(",") if s]


def method_specs(args) -> list[tuple[str, str | None]]:
    """(registry name, tuning spec or None) for every row to run, in order."""
    names = [m for m in args.methods.split(",") if m]
    out = [(n, None) for n in names]
    for spec in args.tuning:
        out += [(n, spec) for n in names if n in C.TUNABLE]
    return out


# ----------------------------------------------------------------------------------------------
# measuring (child process)
# ----------------------------------------------------------------------------------------------
def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


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
                    cls, _ = C.tuning_type()
                    tuning = cls.from_env() if cls is not None else None
                thr = getattr(tuning, "skip_keep_threshold", None)
                return {"kept_fraction": frac, "skips": None if frac is None or thr is None else frac < thr}
        return {"unavailable": "no policy state for this shape"}
    except Exception as err:  # noqa: BLE001
        return {"unavailable": f"library internals moved ({C.short_error(err, 120)})"}


def run_method(m, e, c, t, ref, args, device) -> dict:
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
        rec["errors"][phase] = ("OOM: " if C.is_oom(err) else "") + C.short_error(err)
        print(f"    {m.name} {phase}: {rec['errors'][phase]}", flush=True)

    if not args.no_fwd:
        e_d, c_d = e.detach(), c.detach()

        def fwd():
            with torch.no_grad():
                return m(e_d, c_d, t)

        try:
            ms, mb = C.time_cuda(fwd, args.warmup, args.reps, args.max_seconds)
            rec.update(fwd_ms=ms, fwd_peak_mb=mb)
        except Exception as err:  # noqa: BLE001
            record_error("fwd", err)
        C.free_memory()

    e_g = e.detach().requires_grad_(True)
    c_g = c.detach().requires_grad_(True)

    def fwd_bwd():
        loss = m(e_g, c_g, t)
        return torch.autograd.grad(loss, (e_g, c_g))

    try:
        ms, mb = C.time_cuda(fwd_bwd, args.warmup, args.reps, args.max_seconds)
        flops = C.fwd_bwd_flops(n, d, v)
        rec.update(fwd_bwd_ms=ms, fwd_bwd_peak_mb=mb, fwd_bwd_tflops=C.tflops(flops, ms),
                   frac_peak=C.fraction_of_peak(flops, ms, args.peak_tflops))
    except Exception as err:  # noqa: BLE001
        record_error("fwd_bwd", err)
    C.free_memory()
    if m.extra.get("adaptive") and device.type == "cuda":
        rec["skip_policy"] = skip_policy_state(v, d, m.extra.get("tuning"))

    if ref is not None:
        try:
            loss = m(e_g, c_g, t)
            de, dc = torch.autograd.grad(loss, (e_g, c_g))
            _sync(device)
            rec["loss"] = float(loss.detach())
            rec["loss_rel_err"] = abs(rec["loss"] - ref["loss"]) / abs(ref["loss"])
            if ref.get("de") is not None:
                rec["de_rel_err"] = C.rel_err(de[ref["rows"]], ref["de"])
            if ref.get("dc") is not None:
                rec["dc_rel_err"] = C.rel_err(dc, ref["dc"])
            del loss, de, dc
        except Exception as err:  # noqa: BLE001
            record_error("check", err)
    del e_g, c_g
    C.free_memory()
    return rec


def build_reference(e, c, t, args, device) -> dict | None:
    import torch

    if args.no_check:
        return None
    t0 = time.perf_counter()
    lse, x = C.reference_lse(e, c, t)
    ref = {"loss": float((lse - x).mean())}
    if args.check_rows > 0 or args.check_dc:
        g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
        k = min(args.check_rows, e.shape[0]) if args.check_rows > 0 else e.shape[0]
        rows = torch.randperm(e.shape[0], generator=g)[:k].sort().values.to(device)
        de, dc = C.reference_grads(e, c, t, lse, rows=rows, need_dc=args.check_dc)
        ref.update(rows=rows, de=de, dc=dc)
    _sync(device)
    ref["seconds"] = time.perf_counter() - t0
    return ref


def setup_device(args):
    import torch

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda but no GPU is visible (use --device cpu for a smoke test)")
        torch.cuda.set_device(device.index or 0)
        torch.cuda.init()
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def measure_peak(args, device) -> str:
    if args.peak_tflops is not None:
        return "given"
    if device.type != "cuda":
        return "none on CPU"
    args.peak_tflops = C.measure_matmul_peak(device)
    C.free_memory()
    return "measured 8192³ bf16 matmul, median of 10"


def reference_rows(n, d, v, args, device, specs) -> list[dict]:
    """The cublas_3x / cublas_4x rows selected, from one timing of the three products."""
    wanted = [name for name, spec in specs if spec is None and name in C.REFERENCE_ROWS]
    if not wanted:
        return []
    try:
        prod = C.time_products(n, d, v, C.DTYPES[args.dtype], device, args.warmup, args.reps, args.max_seconds)
    except Exception as err:  # noqa: BLE001
        return [{"method": w, "errors": {"products": C.short_error(err)}} for w in wanted]
    finally:
        C.free_memory()
    out = []
    for w in wanted:
        ms = prod[w]
        out.append({"method": w, "errors": {}, "fwd_bwd_ms": ms, "products_ms": prod["products_ms"],
                    "fwd_bwd_tflops": C.tflops(C.fwd_bwd_flops(n, d, v), ms),
                    "frac_peak": C.fraction_of_peak(C.fwd_bwd_flops(n, d, v), ms, args.peak_tflops),
                    "note": "E·Cᵀ + G·C + Gᵀ·E" + (" + E·Cᵀ" if w == "cublas_4x" else "") + f" ({args.dtype})"})
    return out


def run_kinds(args, kinds: list[str], deadline: float, save_part) -> None:
    """Measure every shape × method for `kinds` in this process; `save_part(part)` after each row."""
    device = setup_device(args)
    dtype = C.DTYPES[args.dtype]
    specs = method_specs(args)
    peak_source = measure_peak(args, device)
    print(f"bf16 matmul peak: {C.fmt(args.peak_tflops, '.0f')} TFLOP/s ({peak_source})", flush=True)
    methods = {}
    for name, spec in specs:
        if name in C.REFERENCE_ROWS:
            continue
        m = C.build_method(name, spec)
        methods[m.name] = m
        if m.fn is None:
            print(f"  {m.name}: unavailable ({m.skip_reason})", flush=True)
    part = {"meta": {"env": C.env_info(), "device": str(device), "peak_tflops": args.peak_tflops,
                     "peak_source": peak_source, "kinds": kinds, "pid": os.getpid()},
            "inputs": [], "results": []}
    t_start = time.perf_counter()
    for kind in kinds:
        for n, d, v in shapes_of(args):
            label = f"{n}x{d}x{v} {kind}"
            print(f"== {label}  ({time.perf_counter() - t_start:.0f}s)", flush=True)
            base = {"shape": [n, d, v], "kind": kind}
            if time.time() > deadline:
                for row in [name for name, _ in specs if name in C.REFERENCE_ROWS] + list(methods):
                    part["results"].append({**base, "method": row, "skipped": "not run: time budget (--budget-s)"})
                save_part(part)
                continue
            entry = dict(base)
            rows = reference_rows(n, d, v, args, device, specs)
            try:
                e, c, t = C.make_inputs(n, d, v, dtype, kind, device, args.seed)
            except Exception as err:  # noqa: BLE001
                entry["error"] = C.short_error(err)
                part["inputs"].append(entry)
                part["results"] += [{**base, **r} for r in rows]
                part["results"] += [{**base, "method": name, "errors": {"inputs": entry["error"]}} for name in methods]
                save_part(part)
                C.free_memory()
                continue
            if args.stats_tokens > 0:
                try:
                    entry["stats"] = C.softmax_stats(e, c, t, n_sub=args.stats_tokens)
                except Exception as err:  # noqa: BLE001
                    entry["stats_error"] = C.short_error(err)
                C.free_memory()
            ref = None
            try:
                ref = build_reference(e, c, t, args, device)
                if ref is not None:
                    entry["ref_loss"], entry["ref_seconds"] = ref["loss"], ref["seconds"]
            except Exception as err:  # noqa: BLE001
                entry["ref_error"] = C.short_error(err)
            C.free_memory()
            part["inputs"].append(entry)
            part["results"] += [{**base, **r} for r in rows]
            for r in rows:
                print(f"  {r['method']:20s} {C.fmt(r.get('fwd_bwd_ms'), '.2f')} ms", flush=True)
            for name, m in methods.items():
                t0 = time.perf_counter()
                if time.time() > deadline:
                    rec = {"method": name, "skipped": "not run: time budget (--budget-s)"}
                else:
                    rec = run_method(m, e, c, t, ref, args, device)
                rec.update(base, seconds=time.perf_counter() - t0)
                part["results"].append(rec)
                print(f"  {name:20s} " + (R.status(rec) or
                      f"fwd {C.fmt(rec.get('fwd_ms'), '.2f')} ms  fwd+bwd {C.fmt(rec.get('fwd_bwd_ms'), '.2f')} ms  "
                      f"peak {C.fmt(rec.get('fwd_bwd_peak_mb'), '.0f')} MiB  loss err {C.fmt(rec.get('loss_rel_err'), '.1e')}  "
                      f"dE err {C.fmt(rec.get('de_rel_err'), '.1e')}  dC err {C.fmt(rec.get('dc_rel_err'), '.1e')}")
                      + f"  ({rec['seconds']:.1f}s)", flush=True)
                save_part(part)
            del e, c, t, ref
            C.free_memory()
    part["meta"]["seconds"] = time.perf_counter() - t_start
    save_part(part)


def child_main(cfg_path: str) -> int:
    """Entry of a per-kind child: CONFIG.json holds the suite, parsed arguments, kinds, deadline."""
    import argparse

    with open(cfg_path) as f:
        cfg = json.load(f)
    MEASURE[cfg["suite"]](argparse.Namespace(**cfg["args"]), cfg["kinds"], cfg["deadline"],
                          lambda part: _save_json(part, cfg["part"]))
    return 0


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


# ----------------------------------------------------------------------------------------------
# table and chart
# ----------------------------------------------------------------------------------------------
def shape_label(shape) -> str:
    return "×".join(str(x) for x in shape)


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
        frac = R._num(r.get("frac_peak"))
        rows.append(head + [
            R.fmt(R._num(r.get("fwd_ms")), ".2f"), R.fmt(R._num(r.get("fwd_bwd_ms")), ".2f"),
            R.fmt(r.get("ratio_torch_compile"), ".2f"), R.fmt(r.get("ratio_cublas_4x"), ".2f"),
            R.fmt(R._num(r.get("fwd_bwd_peak_mb")), ".0f"), R.fmt(R._num(r.get("fwd_bwd_tflops")), ".0f"),
            R.fmt(None if frac is None else 100 * frac, ".1f"),
            R.fmt(R._num(r.get("loss_rel_err")), ".1e"), R.fmt(R._num(r.get("de_rel_err")), ".1e"),
            R.fmt(R._num(r.get("dc_rel_err")), ".1e"), "; ".join(notes)])
    return rows


def markdown(doc: dict) -> str:
    env = (doc.get("processes") or [{}])[0].get("env", {}) if doc.get("processes") else {}
    a = doc.get("args", {})
    peaks = [p.get("peak_tflops") for p in doc.get("processes", []) if R._num(p.get("peak_tflops"))]
    lines = [f"# loss suite: {env.get('device_name', a.get('device', '?'))}, {doc.get('date', '')}", "",
             f"{a.get('dtype')}, median of {a.get('reps')} after {a.get('warmup')} warm-up (CUDA events); one process "
             f"per input kind; torch {env.get('torch')}, triton {env.get('triton')}, driver {env.get('driver')}, "
             f"host {env.get('host')}. bf16 matmul peak (8192³, per process): "
             + (", ".join(f"{p:.0f}" for p in peaks) if peaks else "–") + " TFLOP/s. TFLOP/s counts 6·N·D·V; "
             "× columns: fwd+bwd time over torch.compile's / over 4× cuBLAS's, same process and inputs. "
             "Peak MiB: forward+backward, inputs excluded, gradients included.", ""]
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
    env = (doc.get("processes") or [{}])[0].get("env", {})
    return R.bar_chart(chart_rows(doc), path, value_label="forward+backward ms", mem_label="peak MiB added",
                       ratio_label="time / torch.compile's", refs=C.REFERENCE_ROWS,
                       title=f"Fused linear cross-entropy, {env.get('device_name', '')} {doc.get('date', '')}".strip())


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
        p.add_argument("--kinds", default="zipf", help=f"comma list of {C.KINDS}")
        p.add_argument("--methods", default=Components.DEFAULT_METHODS,
                       help="comma list of methods (any of the loss suite's, references excluded)")
        p.add_argument("--tuning", action="append", default=[], metavar="'FIELD=VALUE ...'",
                       help="also profile each selected vpcce method under this Tuning (repeatable)")
        p.add_argument("--dtype", default="bf16", choices=sorted(C.DTYPES))
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
            _sync(device)
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
    def run_kinds(args, kinds, deadline, save_part):
        import torch

        device = setup_device(args)
        dtype = C.DTYPES[args.dtype]
        specs = [(n, s) for n, s in method_specs(args) if n not in C.REFERENCE_ROWS]
        methods = [C.build_method(n, s) for n, s in specs]
        part = {"meta": {"env": C.env_info(), "device": str(device), "kinds": kinds}, "results": []}
        for kind in kinds:
            for n, d, v in shapes_of(args):
                base = {"shape": [n, d, v], "kind": kind}
                print(f"== {n}x{d}x{v} {kind}", flush=True)
                try:
                    prod = C.time_products(n, d, v, dtype, device, args.warmup, args.reps)
                    part["results"].append({**base, "method": "cublas products", "products_ms": prod["products_ms"],
                                            "wall_ms": prod["cublas_3x"]})
                except Exception as err:  # noqa: BLE001
                    part["results"].append({**base, "method": "cublas products", "errors": {"run": C.short_error(err)}})
                C.free_memory()
                e, c, t = C.make_inputs(n, d, v, dtype, kind, device, args.seed)
                e, c = e.requires_grad_(True), c.requires_grad_(True)
                for m in methods:
                    rec = {**base, "method": m.name, "note": m.note, "errors": {}}
                    ok, why = m.usable(device, n, v)
                    if time.time() > deadline:
                        ok, why = False, "not run: time budget (--budget-s)"
                    if not ok:
                        rec["skipped"] = why
                    else:
                        def fwd_bwd(_m=m):
                            return torch.autograd.grad(_m(e, c, t), (e, c))

                        try:
                            rec["wall_ms"], rec["peak_mb"] = C.time_cuda(fwd_bwd, args.warmup, args.reps)
                            kernels, total = Components.profile(fwd_bwd, args.reps, device)
                            rec.update(kernels=kernels[:args.top], kernel_ms_total=total,
                                       other_ms=total - sum(k["ms"] for k in kernels[:args.top]))
                        except Exception as err:  # noqa: BLE001
                            rec["errors"]["run"] = ("OOM: " if C.is_oom(err) else "") + C.short_error(err)
                    part["results"].append(rec)
                    print(f"  {m.name:24s} " + (R.status(rec) or f"{rec['wall_ms']:.2f} ms, kernels "
                                                 f"{rec['kernel_ms_total']:.2f} ms"), flush=True)
                    save_part(part)
                    C.free_memory()
                del e, c, t
                C.free_memory()
        save_part(part)

    @staticmethod
    def markdown(doc: dict) -> str:
        env = (doc.get("processes") or [{}])[0].get("env", {})
        lines = [f"# components: {env.get('device_name', '?')}, {doc.get('date', '')}", "",
                 "GPU time per kernel of one forward+backward (torch.profiler, self time, mean over the profiled "
                 "iterations); wall = CUDA-event median of the same call.", ""]
        summary = []
        for r in doc.get("results", []):
            head = [shape_label(r["shape"]), r["kind"], R.label(r["method"])]
            if r.get("products_ms"):
                summary.append(head + [R.fmt(r.get("wall_ms"), ".2f"), "", ", ".join(
                    f"{k} {v:.2f}" for k, v in r["products_ms"].items())])
            else:
                top = ", ".join(f"{k['name'][:40]} {k['ms']:.2f}" for k in (r.get("kernels") or [])[:4])
                summary.append(head + [R.fmt(R._num(r.get("wall_ms")), ".2f"), R.fmt(R._num(r.get("kernel_ms_total")), ".2f"),
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


def run_per_kind(suite: str, measure):
    """The suite's `run(args, out)`: one child process per kind (or all in this one with
    --in-process), each given its share of the time budget; the parts merged."""

    def run_suite(args, out) -> dict:
        kinds = [k for k in args.kinds.split(",") if k]
        for k in kinds:
            if k not in C.KINDS:
                raise SystemExit(f"--kinds: unknown kind {k!r}; known: {C.KINDS}")
        shapes_of(args)  # parse errors now, not in a child
        for name, _ in method_specs(args):
            if name not in C.METHOD_FACTORIES and name not in C.REFERENCE_ROWS:
                raise SystemExit(f"--methods: unknown method {name!r}; known: "
                                 f"{sorted(C.METHOD_FACTORIES) + list(C.REFERENCE_ROWS)}")
        for spec in args.tuning:
            try:
                C.parse_tuning(spec)
            except (ValueError, TypeError) as err:
                raise SystemExit(str(err)) from None
        t0 = time.time()
        deadline = t0 + args.budget_s
        parts, failures = [], []
        groups = [kinds] if args.in_process else [[k] for k in kinds]
        for i, group in enumerate(groups):
            name = "_".join(group)
            part_path = out.raw(f"part_{name}.json")
            if args.in_process:
                measure(args, group, deadline, lambda part, _p=part_path: _save_json(part, _p))
            else:
                share = (deadline - time.time()) / (len(groups) - i)  # with what earlier kinds left
                cfg = {"suite": suite, "args": vars(args), "kinds": group, "deadline": time.time() + share,
                       "part": part_path}
                cfg_path = out.raw(f"config_{name}.json")
                _save_json(cfg, cfg_path)
                rc, tail = C.run_logged([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                      "run.py"), "_child", cfg_path],
                                        out.raw(f"{name}.log"), timeout=max(30.0, deadline + HARD_GRACE_S - time.time()))
                if rc != 0:
                    failures.append({"kinds": group, "returncode": rc, "log_tail": tail})
            if os.path.exists(part_path):
                with open(part_path) as f:
                    parts.append(json.load(f))
            else:
                failures.append({"kinds": group, "error": "the process wrote no results"})
        doc = merge_parts(parts)
        doc["failures"] = failures
        doc["seconds"] = time.time() - t0
        doc["exit_status"] = 1 if failures else 0
        return doc

    return run_suite


def _save_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(C.jsonable(obj), f, indent=1)
    os.replace(tmp, path)


MEASURE = {"loss": run_kinds, "components": Components.run_kinds}
run = run_per_kind("loss", run_kinds)
Components.run = staticmethod(run_per_kind("components", Components.run_kinds))
