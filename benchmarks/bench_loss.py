"""Single-GPU benchmark of fused linear cross-entropy implementations.

For each shape (N tokens, D hidden, V vocabulary) × input kind (random, zipf) × method:
  fwd        forward only, no autograd (inputs detached, torch.no_grad)
  fwd+bwd    loss, then torch.autograd.grad(loss, (e, c)); the gradients are part of the peak
  peak MB    max_memory_allocated during the timed calls − allocated before (inputs excluded)
  errors     vs a float64 reference: loss over all tokens, dE on a subset of tokens (--check-rows),
             dC over the full classifier (--check-dc; float64 in vocabulary chunks)
Prints a markdown table and writes bench_loss.md / bench_loss.json to --out.

    PYTHONPATH=. python3 benchmarks/bench_loss.py --out runs/bench_loss
    PYTHONPATH=. python3 benchmarks/bench_loss.py --device cpu --shapes 256x64x1000 --dtype fp32 \
        --methods vpcce_torch,torch_eager --out /tmp/bl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # the repository root: vocab_parallel_cce
sys.path.insert(0, _HERE)  # common.py (a plain module: no clash with any installed `benchmarks` package)

from common import (  # noqa: E402
    jsonable,
    DEFAULT_METHODS,
    DTYPES,
    build_method,
    env_info,
    fmt,
    free_memory,
    fraction_of_peak,
    fwd_bwd_flops,
    fwd_flops,
    is_oom,
    make_inputs,
    measure_matmul_peak,
    parse_shape,
    reference_grads,
    reference_lse,
    rel_err,
    short_error,
    softmax_stats,
    tflops,
    time_cuda,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="8192x2304x256000,8192x4096x128256", help="comma list of NxDxV")
    p.add_argument("--kinds", default="random,random1,zipf")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=6.0,
                   help="cap the timed reps of one measurement to about this long (≥ 3 reps)")
    p.add_argument("--check-rows", type=int, default=256, help="tokens whose dE is checked (0: skip)")
    p.add_argument("--check-dc", action="store_true", help="also check dC against a float64 reference")
    p.add_argument("--no-check", action="store_true", help="skip all correctness checks")
    p.add_argument("--no-fwd", action="store_true", help="skip the forward-only timing")
    p.add_argument("--stats-tokens", type=int, default=1024, help="tokens for softmax_stats (0: skip)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 matmul peak to compare with (default: measure an 8192³ matmul)")
    p.add_argument("--max-nv", type=float, default=None, help="override the N·V cap of slow methods")
    p.add_argument("--out", default="runs/bench_loss")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_method(m, e, c, t, ref, args, device) -> dict:
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
        rec["errors"][phase] = short_error(err)
        if is_oom(err):
            rec["errors"][phase] = "OOM: " + rec["errors"][phase]
        print(f"    {m.name} {phase}: {rec['errors'][phase]}", flush=True)

    # forward only
    if not args.no_fwd:
        e_d, c_d = e.detach(), c.detach()

        def fwd():
            with torch.no_grad():
                return m(e_d, c_d, t)

        try:
            ms, mb = time_cuda(fwd, args.warmup, args.reps, args.max_seconds)
            rec.update(fwd_ms=ms, fwd_peak_mb=mb, fwd_tflops=tflops(fwd_flops(n, d, v), ms))
        except Exception as err:  # noqa: BLE001
            record_error("fwd", err)
        free_memory()

    # forward + backward
    e_g = e.detach().requires_grad_(True)
    c_g = c.detach().requires_grad_(True)

    def fwd_bwd():
        loss = m(e_g, c_g, t)
        return torch.autograd.grad(loss, (e_g, c_g))

    try:
        ms, mb = time_cuda(fwd_bwd, args.warmup, args.reps, args.max_seconds)
        rec.update(fwd_bwd_ms=ms, fwd_bwd_peak_mb=mb, fwd_bwd_tflops=tflops(fwd_bwd_flops(n, d, v), ms),
                   frac_peak=fraction_of_peak(fwd_bwd_flops(n, d, v), ms, args.peak_tflops))
    except Exception as err:  # noqa: BLE001
        record_error("fwd_bwd", err)
    free_memory()

    # correctness
    if ref is not None:
        try:
            loss = m(e_g, c_g, t)
            de, dc = torch.autograd.grad(loss, (e_g, c_g))
            _sync(device)
            rec["loss"] = float(loss.detach())
            rec["loss_rel_err"] = abs(rec["loss"] - ref["loss"]) / abs(ref["loss"])
            if ref.get("de") is not None:
                rec["de_rel_err"] = rel_err(de[ref["rows"]], ref["de"])
            if ref.get("dc") is not None:
                rec["dc_rel_err"] = rel_err(dc, ref["dc"])
            del loss, de, dc
        except Exception as err:  # noqa: BLE001
            record_error("check", err)
    del e_g, c_g
    free_memory()
    return rec


def build_reference(e, c, t, args, device) -> dict | None:
    if args.no_check:
        return None
    t0 = time.perf_counter()
    lse, x = reference_lse(e, c, t)
    ref = {"loss": float((lse - x).mean())}
    rows = None
    if args.check_rows > 0 or args.check_dc:
        g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
        k = min(args.check_rows, e.shape[0]) if args.check_rows > 0 else e.shape[0]
        rows = torch.randperm(e.shape[0], generator=g)[:k].sort().values.to(device)
        de, dc = reference_grads(e, c, t, lse, rows=rows, need_dc=args.check_dc)
        ref.update(rows=rows, de=de, dc=dc)
    _sync(device)
    ref["seconds"] = time.perf_counter() - t0
    del lse, x
    return ref


COLUMNS = ["shape", "kind", "method", "fwd ms", "fwd+bwd ms", "peak MB fwd", "peak MB fwd+bwd",
           "TFLOP/s (6NDV)", "% bf16 peak", "loss rel err", "dE rel err", "dC rel err"]


def table_rows(results) -> list[list[str]]:
    rows = []
    for r in results:
        shape = "×".join(str(x) for x in r["shape"])
        if "skipped" in r:
            rows.append([shape, r["kind"], r["method"], f"skipped: {r['skipped']}"] + [""] * (len(COLUMNS) - 4))
            continue
        err = "; ".join(f"{k}: {v}" for k, v in r.get("errors", {}).items())
        row = [
            shape, r["kind"], r["method"],
            fmt(r.get("fwd_ms"), ".2f"), fmt(r.get("fwd_bwd_ms"), ".2f"),
            fmt(r.get("fwd_peak_mb"), ".0f"), fmt(r.get("fwd_bwd_peak_mb"), ".0f"),
            fmt(r.get("fwd_bwd_tflops"), ".0f"),
            fmt(None if r.get("frac_peak") is None else 100 * r["frac_peak"], ".1f"),
            fmt(r.get("loss_rel_err"), ".1e"), fmt(r.get("de_rel_err"), ".1e"), fmt(r.get("dc_rel_err"), ".1e"),
        ]
        if err:
            row[-1] = (row[-1] + " " if row[-1] != "–" else "") + f"ERROR {err}"
        rows.append(row)
    return rows


def markdown(results, stats, meta) -> str:
    lines = [f"# bench_loss ({meta['env'].get('device_name', meta['device'])}, {meta['dtype']}, "
             f"median of {meta['reps']} after {meta['warmup']} warm-up)", ""]
    lines.append(f"bf16 matmul peak used for %: {fmt(meta['peak_tflops'], '.0f')} TFLOP/s "
                 f"({meta['peak_source']}). TFLOP/s counts 6·N·D·V for fwd+bwd.")
    lines.append("")
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for row in table_rows(results):
        lines.append("| " + " | ".join(row) + " |")
    if stats:
        lines += ["", "Inputs (softmax_stats on a token subsample; tile frac = 128×128 tiles with some "
                  "p ≥ 2^-12 after sorting columns by mean logit; ref loss = float64 over all tokens):", "",
                  "| shape | kind | mean loss | tile frac | tile frac (unsorted) | mean max p | ref loss | ref s |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in stats:
            st = s.get("stats") or {}
            lines.append(f"| {'×'.join(map(str, s['shape']))} | {s['kind']} | {fmt(st.get('mean_loss'), '.3f')} | "
                         f"{fmt(st.get('tile_frac'), '.3f')} | {fmt(st.get('tile_frac_unsorted'), '.3f')} | "
                         f"{fmt(st.get('mean_max_p'), '.3f')} | {fmt(s.get('ref_loss'), '.4f')} | "
                         f"{fmt(s.get('ref_seconds'), '.1f')} |")
    notes = sorted({f"{r['method']}: {r['note']}" for r in results if r.get("note")})
    if notes:
        lines += ["", "Methods: " + "; ".join(notes)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda but no GPU is visible (use --device cpu for a smoke test)")
        torch.cuda.set_device(device.index or 0)
        torch.cuda.init()
        torch.backends.cuda.matmul.allow_tf32 = False
    dtype = DTYPES[args.dtype]
    shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
    kinds = [k for k in args.kinds.split(",") if k]
    names = [m for m in args.methods.split(",") if m]
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    methods = {name: build_method(name) for name in names}
    for name, m in methods.items():
        if m.fn is None:
            print(f"  {name}: unavailable ({m.skip_reason})", flush=True)
    peak_source = "given"
    if args.peak_tflops is None:
        if device.type == "cuda":
            args.peak_tflops = measure_matmul_peak(device)
            peak_source = "measured 8192³ bf16 matmul, median of 10"
        else:
            peak_source = "none on CPU"
        free_memory()
    print(f"bf16 matmul peak: {fmt(args.peak_tflops, '.0f')} TFLOP/s ({peak_source})", flush=True)

    meta = dict(args=vars(args), env=env_info(), device=str(device), dtype=args.dtype, reps=args.reps,
                warmup=args.warmup, peak_tflops=args.peak_tflops, peak_source=peak_source)
    results, stats = [], []

    def save():
        meta["seconds"] = time.perf_counter() - t_start
        md = markdown(results, stats, meta)
        with open(os.path.join(args.out, "bench_loss.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, "bench_loss.json"), "w") as f:
            json.dump(jsonable({"meta": meta, "inputs": stats, "results": results}), f, indent=1)
        return md

    for n, d, v in shapes:
        for kind in kinds:
            print(f"== {n}x{d}x{v} {kind}  ({time.perf_counter() - t_start:.0f}s)", flush=True)
            entry = {"shape": [n, d, v], "kind": kind}
            try:
                e, c, t = make_inputs(n, d, v, dtype, kind, device, args.seed)
            except Exception as err:  # noqa: BLE001
                entry["error"] = short_error(err)
                stats.append(entry)
                print(f"  make_inputs failed: {entry['error']}", flush=True)
                free_memory()
                continue
            if args.stats_tokens > 0:
                try:
                    entry["stats"] = softmax_stats(e, c, t, n_sub=args.stats_tokens)
                except Exception as err:  # noqa: BLE001
                    entry["stats_error"] = short_error(err)
                free_memory()
            ref = None
            try:
                ref = build_reference(e, c, t, args, device)
                if ref is not None:
                    entry["ref_loss"], entry["ref_seconds"] = ref["loss"], ref["seconds"]
            except Exception as err:  # noqa: BLE001
                entry["ref_error"] = short_error(err)
                print(f"  reference failed: {entry['ref_error']}", flush=True)
            free_memory()
            stats.append(entry)
            st = entry.get("stats", {})
            print(f"  inputs: mean loss {fmt(st.get('mean_loss'), '.3f')}, tile frac {fmt(st.get('tile_frac'), '.3f')}, "
                  f"ref loss {fmt(entry.get('ref_loss'), '.4f')}", flush=True)
            for name, m in methods.items():
                t0 = time.perf_counter()
                try:
                    rec = run_method(m, e, c, t, ref, args, device)
                except Exception as err:  # noqa: BLE001  (should not happen: run_method catches)
                    rec = {"method": name, "errors": {"run": short_error(err)}}
                rec.update(shape=[n, d, v], kind=kind, seconds=time.perf_counter() - t0)
                results.append(rec)
                if "skipped" in rec:
                    print(f"  {name:20s} skipped: {rec['skipped']}", flush=True)
                else:
                    print(f"  {name:20s} fwd {fmt(rec.get('fwd_ms'), '.2f')} ms  fwd+bwd {fmt(rec.get('fwd_bwd_ms'), '.2f')} ms  "
                          f"peak {fmt(rec.get('fwd_bwd_peak_mb'), '.0f')} MB  loss err {fmt(rec.get('loss_rel_err'), '.1e')}  "
                          f"dE err {fmt(rec.get('de_rel_err'), '.1e')}  dC err {fmt(rec.get('dc_rel_err'), '.1e')}  "
                          f"({rec['seconds']:.1f}s)", flush=True)
                free_memory()
                save()
            del e, c, t, ref
            free_memory()
    md = save()
    print()
    print(md)
    print(f"wrote {args.out}/bench_loss.md and bench_loss.json in {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
