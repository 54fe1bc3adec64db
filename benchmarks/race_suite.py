"""The runner's `race` suite (one GPU): the product's table. Every method against the same inputs,
timed in interleaved rounds, next to the cuBLAS products of the same shape.

Per shape and input kind, in one process (compilations are reused across kinds):
1. inputs (`inputs.make_inputs`), and the float64 reference: loss over all tokens, dE on
   --check-rows tokens, dC over every token (unless --no-check-dc);
2. per method: --warmup calls (the first, which compiles, is timed on its own: "first call s"),
   then one checked call: its loss, dE and dC errors against float64;
3. the rounds: each round times a block of --block back-to-back calls of every method and of the
   reference rows "3 cuBLAS products" (E·Cᵀ [N,V], G·C [N,D], Gᵀ·E [V,D] on the same e, c) and
   "4 cuBLAS products" (one more E·Cᵀ: what a recomputing method must do), in an order shuffled
   every round, each block after --settle-ms of bf16 products (the same loaded start for every
   block: on a power-capped GPU a block that follows a light method runs faster). fwd+bwd ms is
   the median over rounds; a ratio "× X" is the median over rounds of (method / X) within the
   round (paired: both ran within the same minute), so a GPU that warms up or throttles moves both
   alike. Peak MiB: max allocated during a method's blocks − allocated
   before (inputs excluded, gradients included).
The rounds of a case are cut (to --min-rounds) when the time left would not hold them: the
budget is shared among the cases still to run. A method that is missing, fails or runs out of
memory is recorded and the race goes on; a process that dies is restarted for the cases left.
"""

from __future__ import annotations

import os
import time

import charts
import methods as M
import tables as R
from children import run_child
from inputs import DTYPES, check_kinds, make_inputs, parse_shapes
from machine import gpu_state
from references import Reference, case_checks, error_text, fwd_bwd_flops, tflops
from tables import fmt, label, md_table, num, shape_label, status
from timing import (CublasProducts, free_memory, interleaved_rounds, median_ms, paired_ratio, settling_load,
                    setup_device, sync)

# Llama-3 8B, Gemma-2 2B, one rank of tp=8 (V = 128256 / 8), long context, few tokens; `all` adds
# Qwen-2 7B's vocabulary, half the tokens, one rank of tp=4 of a 128256 vocabulary.
DEFAULT_SHAPES = ["8192x4096x128256", "8192x2304x256000", "16384x4096x16032", "32768x4096x128256",
                  "1024x4096x128256"]
ALL_SHAPES = DEFAULT_SHAPES + ["8192x4096x151936", "4096x4096x128256", "16384x4096x32064"]
SHAPE_NOTES = {(16384, 4096, 16032): "tp=8 rank", (16384, 4096, 32064): "tp=4 rank",
               (32768, 4096, 128256): "long context"}
DEFAULT_KINDS = ["random", "zipf_shuffled"]
DEFAULT_METHODS = ["vpcce_triton", "vpcce_triton_memory", "torch_compile", "megatron_fused", "liger", "apple_cce",
                   "cublas_3x", "cublas_4x"]
RATIO_BASES = ("torch_compile", "cublas_3x", "cublas_4x")
BUDGET_SKIP = "not run: time budget (--budget-s)"
MAX_RESTARTS = 2


def add_args(p):
    M.add_selection_args(p, DEFAULT_SHAPES, ALL_SHAPES, DEFAULT_KINDS, DEFAULT_METHODS,
                         "also race each selected method of ours under vocab_parallel_cce.Tuning(FIELD=VALUE, ...) "
                         "(repeatable), e.g. --tuning 'group_v=8' --tuning 'use_tma=0'")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per case (at most)")
    p.add_argument("--min-rounds", type=int, default=3, help="rounds kept when time is short")
    p.add_argument("--block", type=int, default=3, help="back-to-back calls of a method per round")
    p.add_argument("--settle-ms", type=float, default=100.0,
                   help="untimed bf16 products before every block, ms (0: none; never on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per method before the check (≥ 1)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-rows", type=int, default=256, help="tokens whose dE is checked against float64")
    p.add_argument("--no-check-dc", action="store_true", help="skip dC's check (it needs a float64 pass over "
                                                               "every token)")
    p.add_argument("--no-check", action="store_true", help="skip every check against float64")
    p.add_argument("--stats-tokens", type=int, default=1024, help="tokens for the input statistics (0: skip)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="start no new case after this many seconds; a process still running 40 s later is stopped")
    p.add_argument("--in-process", action="store_true", help="measure in this process (debugging)")


def cases_of(args) -> list[list]:
    """[[N, D, V, kind], ...], shape by shape (compilations are per shape), kinds within."""
    try:
        shapes = parse_shapes(args.shapes, ALL_SHAPES)
    except ValueError as err:
        raise SystemExit(f"--shapes: {err}") from None
    kinds = check_kinds(args.kinds)
    return [[n, d, v, k] for n, d, v in shapes for k in kinds]


def check_args(args) -> None:
    for name in ("rounds", "min_rounds", "block", "warmup"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: expected an integer ≥ 1, got {getattr(args, name)}")
    if args.min_rounds > args.rounds:
        raise SystemExit(f"--min-rounds ({args.min_rounds}) exceeds --rounds ({args.rounds})")
    cases_of(args)
    M.method_specs(args.methods, args.tuning)


def shape_name(shape) -> str:
    note = SHAPE_NOTES.get(tuple(shape))
    return shape_label(shape) + (f" ({note})" if note else "")


# ----------------------------------------------------------------------------------------------
# measuring (child process)
# ----------------------------------------------------------------------------------------------
def prepare(m, e, c, t, ref: Reference | None, args, rec: dict):
    """Warm `m` up, check it against `ref`; its forward+backward closure (None if it failed) and
    the estimated seconds of one call."""
    import torch

    e_g = e.detach().requires_grad_(True)
    c_g = c.detach().requires_grad_(True)

    def fwd_bwd():
        return m.fwd_bwd(e_g, c_g, t)

    seconds = None
    try:
        for i in range(args.warmup):
            t0 = time.perf_counter()
            fwd_bwd()
            sync()
            seconds = time.perf_counter() - t0
            if i == 0:
                rec["first_call_s"] = seconds
    except Exception as err:  # noqa: BLE001
        rec["errors"]["warmup"] = error_text(err)
        free_memory()
        return None, None
    if ref is not None:
        try:
            rec.update(ref.check(m, e, c, t))
        except Exception as err:  # noqa: BLE001  (still raced: the timing does not depend on the check)
            rec["errors"]["check"] = error_text(err)
    free_memory()
    return fwd_bwd, seconds


def race_case(n, d, v, kind, methods, product_rows, args, device, deadline, cases_left) -> tuple[dict, list[dict]]:
    """One shape and kind: (the inputs' entry, one row per method and reference row)."""
    base = {"shape": [n, d, v], "kind": kind}
    entry = dict(base)
    rows = {m.name: {**base, "method": m.name, "note": m.note, "errors": {}} for m in methods}
    rows.update({p: {**base, "method": p, "errors": {}, "note": "E·Cᵀ + G·C + Gᵀ·E" + (" + E·Cᵀ" if p == "cublas_4x"
                                                                                       else "") + f" ({args.dtype})"}
                 for p in product_rows})
    try:
        e, c, t = make_inputs(n, d, v, DTYPES[args.dtype], kind, device, args.seed)
    except Exception as err:  # noqa: BLE001
        entry["error"] = error_text(err)
        for r in rows.values():
            r["errors"]["inputs"] = entry["error"]
        return entry, list(rows.values())
    ref = case_checks(entry, e, c, t, args, not args.no_check_dc)

    fns, call_s = {}, {}
    for m in methods:
        rec = rows[m.name]
        ok, why = m.usable(device, n, v)
        if not ok:
            rec["skipped"] = why
            continue
        fn, seconds = prepare(m, e, c, t, ref, args, rec)
        if fn is not None:
            fns[m.name], call_s[m.name] = fn, seconds
        print(f"  {m.name:24s} " + (status(rec) or f"first call {rec['first_call_s']:.1f}s, "
              f"loss err {fmt(rec.get('loss_rel_err'), '.1e')}, dE err {fmt(rec.get('de_rel_err'), '.1e')}, "
              f"dC err {fmt(rec.get('dc_rel_err'), '.1e')}"), flush=True)
    del ref
    free_memory()
    if product_rows:
        try:
            products = CublasProducts(e, c, args.seed)
            for p in product_rows:
                fn = products.three if p == "cublas_3x" else products.four
                t0 = time.perf_counter()
                for _ in range(2):
                    fn()
                sync()
                fns[p], call_s[p] = fn, (time.perf_counter() - t0) / 2
        except Exception as err:  # noqa: BLE001
            for p in product_rows:
                rows[p]["errors"]["products"] = error_text(err)
            free_memory()

    round_s = args.block * sum(call_s.values()) + len(fns) * max(0.0, args.settle_ms) / 1e3
    share = max(0.0, deadline - time.time()) / max(1, cases_left)
    rounds = args.rounds if round_s <= 0 else max(args.min_rounds, min(args.rounds, int(share / round_s)))
    entry.update(rounds=rounds, block=args.block, round_s_estimate=round_s)

    def on_error(name, err):
        rows[name]["errors"]["rounds"] = error_text(err)
        print(f"  {name}: {rows[name]['errors']['rounds']}", flush=True)

    settle = settling_load(args.settle_ms) if fns else None
    timed = interleaved_rounds(fns, rounds, args.block, on_error, settle=settle) if fns else {}
    del settle
    entry["gpu_after_rounds"] = gpu_state()  # the clock the rounds ran at (a power cap lowers it)
    flops = fwd_bwd_flops(n, d, v)
    for name, got in timed.items():
        ms = median_ms(got["round_ms"])
        rows[name].update(round_ms=got["round_ms"], fwd_bwd_ms=ms, fwd_bwd_tflops=tflops(flops, ms) if ms else None)
        if name not in product_rows:
            rows[name]["fwd_bwd_peak_mb"] = got["peak_mb"]
    del fns, e, c, t
    free_memory()
    return entry, list(rows.values())


def measure(args, cases: list[list], deadline: float, save_part) -> None:
    """Race every case in this process; `save_part(part)` after each (with the case in progress)."""
    from machine import machine_info

    device = setup_device(args.device)
    specs = M.method_specs(args.methods, args.tuning)
    methods = [M.build_method(name, spec) for name, spec in specs if name not in M.REFERENCE_ROWS]
    product_rows = [name for name, spec in specs if name in M.REFERENCE_ROWS]
    for m in methods:
        if m.fn is None:
            print(f"  {m.name}: unavailable ({m.skip_reason})", flush=True)
    part = {"meta": {"env": machine_info(), "device": str(device), "pid": os.getpid()}, "inputs": [], "results": [],
            "current": None}
    t_start = time.time()
    for i, (n, d, v, kind) in enumerate(cases):
        print(f"== {n}x{d}x{v} {kind}  ({time.time() - t_start:.0f}s)", flush=True)
        part["current"] = [n, d, v, kind]
        save_part(part)
        if time.time() > deadline:
            part["results"] += [{"shape": [n, d, v], "kind": kind, "method": name, "skipped": BUDGET_SKIP}
                                for name in [m.name for m in methods] + product_rows]
            continue
        entry, rows = race_case(n, d, v, kind, methods, product_rows, args, device, deadline, len(cases) - i)
        part["inputs"].append(entry)
        part["results"] += rows
        add_ratios(rows)
        print("  " + "  ".join(f"{r['method']} {fmt(r.get('fwd_bwd_ms'), '.2f')}" for r in rows
                               if r.get("fwd_bwd_ms")) + f"  ({entry.get('rounds')} rounds)", flush=True)
    part["current"] = None
    part["meta"]["seconds"] = time.time() - t_start
    save_part(part)


# ----------------------------------------------------------------------------------------------
# the suite (parent process)
# ----------------------------------------------------------------------------------------------
def add_ratios(results: list[dict]) -> None:
    """ratio_X for X in RATIO_BASES: the median over rounds of (row / X) within the round, same
    shape and kind (paired); from the medians where per-round times are missing (older results)."""
    by_case: dict = {}
    for r in results:
        by_case.setdefault((tuple(r["shape"]), r["kind"]), {})[r["method"]] = r
    for rows in by_case.values():
        for r in rows.values():
            for base in RATIO_BASES:
                b = rows.get(base)
                ratio = None
                if b is not None and r.get("round_ms") and b.get("round_ms"):
                    ratio = paired_ratio(r["round_ms"], b["round_ms"])
                elif b is not None and num(r.get("fwd_bwd_ms")) and num(b.get("fwd_bwd_ms")):
                    ratio = r["fwd_bwd_ms"] / b["fwd_bwd_ms"]
                r[f"ratio_{base}"] = ratio


def run(args, out) -> dict:
    """One child process for every case (restarted, at most MAX_RESTARTS times, for the cases left
    when it dies); the parts merged."""
    check_args(args)
    cases = cases_of(args)
    t0 = time.time()
    deadline = t0 + args.budget_s
    parts, failures = [], []
    left = cases
    for attempt in range(MAX_RESTARTS + 1):
        if not left:
            break
        if args.in_process:
            holder = {}
            measure(args, left, deadline, lambda part: holder.update(part=part))
            parts.append(holder["part"])
            break
        part, failure = run_child("race", args, left, deadline, out.raw(f"part_{attempt}.json"),
                                  out.raw(f"race_{attempt}.log"), out.raw(f"config_{attempt}.json"))
        done = set()
        if part is not None:
            parts.append(part)
            done = {(tuple(r["shape"]), r["kind"]) for r in part["results"]}
        if failure is None:
            break
        failures.append(failure)
        current = part.get("current") if part else None
        if current:  # the case the process died in: recorded as failed, not retried
            key = (tuple(current[:3]), current[3])
            done.add(key)
            parts.append({"results": [{"shape": current[:3], "kind": current[3], "method": "(process)",
                                       "errors": {"process": f"return code {failure['returncode']}: "
                                                             + failure["log_tail"][-300:]}}]})
        left = [x for x in left if (tuple(x[:3]), x[3]) not in done]
        if time.time() > deadline:
            break
    results = [r for p in parts for r in p.get("results", [])]
    add_ratios(results)
    return {"processes": [p["meta"] for p in parts if "meta" in p], "inputs": [i for p in parts for i in p.get("inputs", [])],
            "results": results, "failures": failures, "seconds": time.time() - t0,
            "exit_status": 1 if failures else 0}


def merge(docs: list[dict]) -> dict:
    out = R.concat_docs(docs, ("processes", "inputs", "results", "failures"))
    add_ratios(out["results"])
    return out


# ----------------------------------------------------------------------------------------------
# tables and chart
# ----------------------------------------------------------------------------------------------
def _methods(results: list[dict]) -> list[str]:
    return [m for m in dict.fromkeys(r["method"] for r in results) if m != "(process)"]


def _cases(results: list[dict]) -> list[tuple]:
    return list(dict.fromkeys((tuple(r["shape"]), r["kind"]) for r in results))


def summary_table(doc: dict) -> list[str]:
    """Shape × kind rows: every method's fwd+bwd ms, then the first method's paired ratios to
    torch.compile and to the products (and the memory-first mode's to the four products)."""
    results = doc.get("results", [])
    names = _methods(results)
    by = {(tuple(r["shape"]), r["kind"], r["method"]): r for r in results}
    lead = next((m for m in names if m not in M.REFERENCE_ROWS), None)
    extra = [("torch_compile", lead), ("cublas_3x", lead), ("cublas_4x", "vpcce_triton_memory")]
    extra = [(b, m) for b, m in extra if m in names and b in names and b != m]
    rows = []
    for shape, kind in _cases(results):
        cells = [shape_name(shape), kind]
        for m in names:
            r = by.get((shape, kind, m), {})
            cells.append(fmt(num(r.get("fwd_bwd_ms")), ".2f") if num(r.get("fwd_bwd_ms")) else
                         ("skip" if "skipped" in r else ("error" if r.get("errors") else "–")))
        for b, m in extra:
            cells.append(fmt(by.get((shape, kind, m), {}).get(f"ratio_{b}"), ".3f"))
        rows.append(cells)
    columns = ["shape", "kind"] + [label(m) for m in names] + [f"{label(m)} / {label(b)}" for b, m in extra]
    return md_table(columns, rows)


COLUMNS = ["shape", "kind", "method", "fwd+bwd ms", "× torch.compile", "× 3 cuBLAS", "× 4 cuBLAS", "peak MiB",
           "TFLOP/s (6NDV)", "loss err", "dE err", "dC err", "first call s", "notes"]


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        head = [shape_name(r["shape"]), r["kind"], label(r["method"])]
        st = status(r)
        if num(r.get("fwd_bwd_ms")) is None:
            rows.append(head + [""] * (len(COLUMNS) - 4) + [st])
            continue
        rows.append(head + [
            fmt(r.get("fwd_bwd_ms"), ".2f"), fmt(r.get("ratio_torch_compile"), ".3f"), fmt(r.get("ratio_cublas_3x"), ".3f"),
            fmt(r.get("ratio_cublas_4x"), ".3f"), fmt(r.get("fwd_bwd_peak_mb"), ".0f"), fmt(r.get("fwd_bwd_tflops"), ".0f"),
            fmt(r.get("loss_rel_err"), ".1e"), fmt(r.get("de_rel_err"), ".1e"), fmt(r.get("dc_rel_err"), ".1e"),
            fmt(r.get("first_call_s"), ".1f"), st])
    return rows


def settings_line(doc: dict) -> str:
    a = doc.get("args", {})
    rounds = sorted({i["rounds"] for i in doc.get("inputs", []) if i.get("rounds")})
    got = "–".join(str(x) for x in (rounds[:1] + rounds[-1:] if len(rounds) > 1 else rounds)) or str(a.get("rounds"))
    if a.get("no_check"):
        checks = "No checks against float64 in this run."
    else:
        checks = ("Errors: ‖x − x₆₄‖/‖x₆₄‖ against float64: loss over all tokens, dE on "
                  f"{a.get('check_rows')} tokens" + (", dC not checked." if a.get("no_check_dc") else ", dC over all."))
    return (f"{a.get('dtype', 'bf16')}; {got} interleaved rounds of {a.get('block')} back-to-back calls per method, "
            + _order_text(a) + "; fwd+bwd ms = median over rounds; × X = median over rounds of the "
            "within-round ratio to X. Peak MiB: forward+backward, inputs excluded, gradients included. " + checks)


def _order_text(args: dict) -> str:
    """How the rounds ordered the blocks (results stored before --settle-ms ran in a rotated order)."""
    if "settle_ms" not in args:
        return "order rotated every round"
    settle = args["settle_ms"]
    return "order shuffled every round" + (f", each block after {settle:g} ms of bf16 products" if settle > 0 else "")


def _gpu_state_text(state: dict | None) -> str:
    if not state:
        return "–"
    try:
        capped = " (power cap)" if int(state.get("throttle") or "0", 16) & 0x4 else ""
    except ValueError:
        capped = ""
    return f"{state['sm_mhz']:.0f} / {state['power_w']:.0f} of {state['power_limit_w']:.0f}{capped}"


def markdown(doc: dict) -> str:
    from machine import header

    doc = {**doc, "results": [dict(r) for r in doc.get("results", [])]}
    add_ratios(doc["results"])  # from the stored per-round times
    results = doc["results"]
    lines = header(doc, "race", settings_line(doc))
    lines += summary_table(doc) + ["", "Every method:", ""] + md_table(COLUMNS, table_rows(results))
    inputs = [i for i in doc.get("inputs", []) if i.get("stats") or i.get("ref_loss") is not None]
    if inputs:
        lines += ["", "Inputs (statistics of the first tokens; tile frac = 128×128 tiles holding some p ≥ 2^-12, "
                  "columns sorted by mean logit; ref loss = float64 over all tokens):", ""]
        lines += md_table(["shape", "kind", "mean loss", "tile frac", "ref loss", "reference s",
                           "SM MHz / W after the rounds"],
                          [[shape_name(i["shape"]), i["kind"], fmt((i.get("stats") or {}).get("mean_loss"), ".3f"),
                            fmt((i.get("stats") or {}).get("tile_frac"), ".3f"), fmt(i.get("ref_loss"), ".4f"),
                            fmt(i.get("ref_seconds"), ".1f"), _gpu_state_text(i.get("gpu_after_rounds"))]
                           for i in inputs])
    notes = sorted({f"{label(r['method'])}: {r['note']}" for r in results if r.get("note")})
    if notes:
        lines += ["", "Methods: " + "; ".join(notes) + "."]
    for f in doc.get("failures", []):
        lines += ["", f"**A process failed** (return code {f.get('returncode')}): {f.get('error', '')}", "```",
                  f.get("log_tail", ""), "```"]
    return "\n".join(lines) + "\n"


def summary(doc: dict) -> str:
    """The short table printed at the end of a run."""
    doc = {**doc, "results": [dict(r) for r in doc.get("results", [])]}
    add_ratios(doc["results"])
    return "\n".join([f"race, {doc.get('machine', {}).get('device_name', 'CPU')}: fwd+bwd ms (median of the "
                      "interleaved rounds) and paired ratios", ""] + summary_table(doc)) + "\n"


def chart(doc: dict, path: str):
    def group(shape):
        note = SHAPE_NOTES.get(tuple(shape))
        return shape_label(shape) + (f"\n{note}" if note else "")

    rows = [{"group": group(r["shape"]), "panel": r["kind"], "method": r["method"], "value": r.get("fwd_bwd_ms"),
             "mem": r.get("fwd_bwd_peak_mb"), "ratio": r.get("ratio_torch_compile"), "status": status(r)}
            for r in doc.get("results", []) if r["method"] != "(process)"]
    if not rows:
        return None
    return charts.bar_chart(rows, path, value_label="forward+backward ms", mem_label="peak MiB added",
                            ratio_label="time / torch.compile's (paired)", refs=M.REFERENCE_ROWS,
                            title=f"Fused linear cross-entropy, {doc.get('machine', {}).get('device_name', '')} "
                                  f"{doc.get('date', '')}".strip())
