"""Vocabulary-parallel loss benchmark: one process per GPU (torchrun), tp = world size.

Every rank holds the same hidden states e [N, D] and targets, and its shard c_r [V/tp, D] of the
classifier (rows [r·V/tp, (r+1)·V/tp)). Methods, all giving the mean loss over the N tokens:
  vpcce            ours: linear_cross_entropy(e, c_r, t, group=tp, vocab_start=r·V/tp,
                   reduce_grad_e=True), impl triton on GPU (--impl), torch on CPU
  vpcce_gif        the same with grad_in_forward=True (gradients computed during the forward)
  megatron         Megatron-core tensor_parallel.vocab_parallel_cross_entropy on materialised bf16
                   logits e @ c_r.T; e passes through an identity whose backward all-reduces dE over
                   the group (what ColumnParallelLinear does without sequence parallelism)
  megatron_fused   the same with megatron.core.fusions.fused_cross_entropy.fused_vocab_parallel_cross_entropy
Measured per rank (rank 0 reports the max over ranks): forward-only and forward+backward median
time, peak added memory (gradients included), and the time of each method's collectives run alone
(same sizes, CUDA events). Correctness vs a float64 reference computed shard by shard: loss over
all tokens, dE on --check-rows tokens, dC of every shard with --check-dc.

    torchrun --nproc-per-node 2 benchmarks/bench_vocab_parallel.py --out runs/bench_vp
    torchrun --nproc-per-node 2 benchmarks/bench_vocab_parallel.py --device cpu -n 64 -d 32 -v 1000
(under torchrun write -n/-d/-v or --tokens/--hidden/--vocab, or put `--` before --n/--d/--v: torchrun's
own argument parser takes '--n', '--d', '--v' for abbreviations of its options).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # the repository root: vocab_parallel_cce
sys.path.insert(0, _HERE)  # inputs.py, timing.py, ... (plain modules: no clash with any installed `benchmarks` package)

from inputs import DTYPES, make_inputs, softmax_stats  # noqa: E402
from machine import machine_info  # noqa: E402
from methods import tuning_type  # noqa: E402
from references import fwd_bwd_flops, reference_grads, reference_lse, rel_err, tflops  # noqa: E402
from tables import fmt, jsonable, short_error  # noqa: E402
from timing import free_memory, is_oom, time_calls  # noqa: E402

METHODS = ("vpcce", "vpcce_gif", "megatron", "megatron_fused")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # torchrun's own parser swallows or rejects '--n', '--d', '--v' placed after the script
    # (prefix matching of its options): under torchrun use -n/-d/-v or --tokens/--hidden/--vocab.
    p.add_argument("-n", "--tokens", "--n", dest="n", type=int, default=16384, help="tokens N")
    p.add_argument("-d", "--hidden", "--d", dest="d", type=int, default=4096, help="hidden size D")
    p.add_argument("-v", "--vocab", "--v", dest="v", type=int, default=128256, help="vocabulary size V")
    p.add_argument("--kinds", default="random,zipf")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--impl", default=None, help="our impl (default: triton on cuda, torch on cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--check-rows", type=int, default=256, help="tokens whose dE is checked (0: skip)")
    p.add_argument("--check-dc", action="store_true", help="also check each shard's dC (float64 reference)")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--no-fwd", action="store_true", help="skip the forward-only timing")
    p.add_argument("--stats-tokens", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=600, help="process-group timeout in seconds")
    p.add_argument("--out", default="runs/bench_vp")
    return p.parse_args(argv)


class CopyToTP(torch.autograd.Function):
    """ColumnParallelLinear's input region: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        if dist.get_world_size(ctx.group) > 1:
            dist.all_reduce(g, group=ctx.group)
        return g, None


def setup(args):
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    timeout = datetime.timedelta(seconds=args.timeout)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda but no GPU is visible (use --device cpu for a smoke test)")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    # Megatron's tensor-parallel group (tp = world size); fall back to the world group.
    group, note = None, ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core import parallel_state

            parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
            group = parallel_state.get_tensor_model_parallel_group()
            note = "megatron parallel_state tp group"
    except Exception as err:  # noqa: BLE001
        note = f"world group (megatron parallel_state unavailable: {short_error(err, 160)})"
    if group is None:
        group = dist.new_group(list(range(world)))
    return rank, world, device, group, note


def build_methods(names, args, group, rank, world, v_local, v_total):
    """name → (fn(e, c_shard, t) → loss, collectives [(kind, shape, dtype)]) or (None, reason)."""
    out = {}
    impl = args.impl or ("triton" if args.device == "cuda" else "torch")
    start = rank * v_local
    n, d = args.n, args.d
    dt = DTYPES[args.dtype]
    for name in names:
        try:
            if name in ("vpcce", "vpcce_gif"):
                from vocab_parallel_cce import linear_cross_entropy

                if impl.startswith("triton"):
                    import triton  # noqa: F401
                gif = name == "vpcce_gif"

                def fn(e, c, t, _impl=impl, _gif=gif):
                    return linear_cross_entropy(e, c, t, impl=_impl, group=group, vocab_start=start,
                                                vocab_size=v_total, reduce_grad_e=True, grad_in_forward=_gif)

                if gif:  # one all-gather per token chunk (the Tuning's, ≈ D tokens by default)
                    tuning_cls, _ = tuning_type()
                    nc = min(n, tuning_cls.from_env().grad_in_forward_chunk(n, v_local, 2 if dt == torch.bfloat16 else 4))
                    comm = [("all_gather", (1, 3, nc), torch.float32)] * -(-n // nc) + grad_e_comm(n, d, dt, world)
                else:
                    comm = [("all_gather", (1, 3, n), torch.float32)] + grad_e_comm(n, d, dt, world)
                out[name] = (fn, comm, f"impl={impl}" + (" grad_in_forward" if gif else ""))
            elif name in ("megatron", "megatron_fused"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if name == "megatron":
                        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as ce

                        def loss_fn(logits, t, _ce=ce):
                            return _ce(logits, t, 0.0, group)

                        comm = [("all_reduce_max", (n,), torch.float32), ("all_reduce", (n,), torch.float32),
                                ("all_reduce", (n,), torch.float32), ("all_reduce", (n, d), dt)]
                    else:
                        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy as ce

                        def loss_fn(logits, t, _ce=ce):
                            return _ce(logits, t, group)

                        comm = [("all_reduce_max", (n,), torch.float32), ("all_reduce", (2 * n,), torch.float32),
                                ("all_reduce", (n, d), dt)]

                def fn(e, c, t, _loss=loss_fn):
                    x = CopyToTP.apply(e, group)
                    logits = x @ c.T  # [N, V/tp] in the input dtype, as the output layer gives
                    # Megatron's layout: logits [s, b, V/tp], targets [s, b] (here b = 1).
                    return _loss(logits[:, None, :], t[:, None]).mean()

                out[name] = (fn, comm, "")
            else:
                out[name] = (None, f"unknown method {name!r}", "")
        except Exception as err:  # noqa: BLE001
            out[name] = (None, short_error(err), "")
    return out


def grad_e_comm(n, d, dt, world):
    """Our dE sum with reduce_grad_e=True (distributed.sum_grad_e): 16-bit inputs reduce-scatter
    in float32 and all-gather the rounded blocks in `dt` (a float32 all-reduce when n % world ≠ 0);
    float32 inputs all-reduce in float32."""
    if dt not in (torch.float16, torch.bfloat16) or world == 1:
        return [("all_reduce", (n, d), dt)]
    if n % world:
        return [("all_reduce", (n, d), torch.float32)]
    return [("reduce_scatter", (n, d), torch.float32), ("all_gather", (n // world, d), dt)]


def time_collectives(comm, group, device, world, warmup, reps) -> dict:
    """Median ms of each collective alone (same sizes as the method's), and their sum."""
    res, total = {}, 0.0
    if world == 1:
        return {"total": 0.0}
    for i, (kind, shape, dtype) in enumerate(comm):
        x = torch.randn(shape, device=device).to(dtype)
        if kind == "all_gather":
            out = x.new_empty((world * shape[0],) + tuple(shape[1:]))

            def fn():
                dist.all_gather_into_tensor(out, x, group=group)
        elif kind == "reduce_scatter":  # in place, as ours: this rank's block of the input
            rows = shape[0] // world
            block = x[dist.get_rank(group) * rows:(dist.get_rank(group) + 1) * rows]

            def fn():
                dist.reduce_scatter_tensor(block, x, group=group)
        elif kind == "all_reduce_max":
            def fn():
                dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
        else:
            def fn():
                dist.all_reduce(x, group=group)
        dist.barrier(group=group)
        ms, _ = time_calls(fn, warmup, reps)
        res[f"{i}:{kind}{list(shape)}:{str(dtype).replace('torch.', '')}"] = ms
        total += ms
    res["total"] = total
    return res


def agree_ok(ok: bool, device, group) -> bool:
    """True only if every rank says ok (all ranks then take the same branch)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag.item() == 0.0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_reference(e, c_shard, t_local, n_valid, args, device, group):
    """float64 reference from the shards: global loss, dE on sampled rows, dC of this shard.

    Only the shard's first n_valid rows are vocabulary (the rest pad V to a multiple of tp).
    """
    n = e.shape[0]
    c_valid = c_shard[:n_valid]
    if n_valid > 0:
        lse_r, x_r = reference_lse(e, c_valid, t_local)
    else:
        lse_r = torch.full((n,), float("-inf"), dtype=torch.float64, device=device)
        x_r = torch.zeros(n, dtype=torch.float64, device=device)
    stacked = torch.stack([lse_r, x_r])[None]
    world = dist.get_world_size(group)
    if world > 1:
        gathered = stacked.new_empty((world,) + tuple(stacked.shape[1:]))
        dist.all_gather_into_tensor(gathered, stacked, group=group)
    else:
        gathered = stacked
    lse = torch.logsumexp(gathered[:, 0], dim=0)
    x = gathered[:, 1].sum(0)
    ref = {"loss": float((lse - x).mean())}
    rows = None
    if args.check_rows > 0 or args.check_dc:
        g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
        k = min(args.check_rows, n) if args.check_rows > 0 else n
        rows = torch.randperm(n, generator=g)[:k].sort().values.to(device)
        de, dc = reference_grads(e, c_valid, t_local, lse, rows=rows, need_dc=args.check_dc)
        if dc is not None and n_valid < c_shard.shape[0]:
            dc = torch.cat([dc, dc.new_zeros(c_shard.shape[0] - n_valid, dc.shape[1])])
        if world > 1:
            dist.all_reduce(de, group=group)  # dE = Σ_r G_r C_r
        ref.update(rows=rows, de=de, dc=dc)
    return ref


def run_method(name, fn, e, c_shard, t, ref, args, device, group, world) -> dict:
    rec: dict = {"method": name, "errors": {}}

    def phase(label, body):
        err_s = None
        try:
            body()
            sync(device)
        except Exception as err:  # noqa: BLE001
            err_s = ("OOM: " if is_oom(err) else "") + short_error(err)
        ok = agree_ok(err_s is None, device, group)
        if err_s is not None:
            rec["errors"][label] = err_s
        elif not ok:
            rec["errors"][label] = "failed on another rank"
        free_memory()
        return ok

    if not args.no_fwd:
        e_d, c_d = e.detach(), c_shard.detach()

        def fwd():
            with torch.no_grad():
                return fn(e_d, c_d, t)

        def do_fwd():
            dist.barrier(group=group)
            rec["fwd_ms"], rec["fwd_peak_mb"] = time_calls(fwd, args.warmup, args.reps)

        phase("fwd", do_fwd)

    e_g = e.detach().requires_grad_(True)
    c_g = c_shard.detach().requires_grad_(True)

    def fwd_bwd():
        loss = fn(e_g, c_g, t)
        return torch.autograd.grad(loss, (e_g, c_g))

    def do_fwd_bwd():
        dist.barrier(group=group)
        rec["fwd_bwd_ms"], rec["fwd_bwd_peak_mb"] = time_calls(fwd_bwd, args.warmup, args.reps)

    phase("fwd_bwd", do_fwd_bwd)

    if ref is not None:
        def check():
            loss = fn(e_g, c_g, t)
            de, dc = torch.autograd.grad(loss, (e_g, c_g))
            rec["loss"] = float(loss.detach())
            rec["loss_rel_err"] = abs(rec["loss"] - ref["loss"]) / abs(ref["loss"])
            if ref.get("de") is not None:
                rec["de_rel_err"] = rel_err(de[ref["rows"]], ref["de"])
            if ref.get("dc") is not None:
                rec["dc_rel_err"] = rel_err(dc, ref["dc"])

        phase("check", check)
    del e_g, c_g
    return rec


def reduce_records(per_rank: list[dict]) -> dict:
    """Max over ranks of times and memory (errors: rank 0's, else the first found)."""
    out = dict(per_rank[0])
    for key in ("fwd_ms", "fwd_bwd_ms", "fwd_peak_mb", "fwd_bwd_peak_mb", "de_rel_err", "dc_rel_err", "comm_ms"):
        vals = [r[key] for r in per_rank if r.get(key) is not None]
        if vals:
            out[key] = max(vals)
            out[key + "_per_rank"] = vals
    if not out.get("errors"):
        for r in per_rank:
            if r.get("errors"):
                out["errors"] = r["errors"]
                break
    return out


COLUMNS = ["tp", "kind", "method", "fwd ms", "fwd+bwd ms", "peak MB fwd+bwd", "comm ms (alone)",
           "TFLOP/s per GPU (6NDV/tp)", "loss rel err", "dE rel err", "dC rel err"]


def markdown(results, inputs, meta) -> str:
    lines = [f"# bench_vocab_parallel (N={meta['n']}, D={meta['d']}, V={meta['v']}, tp={meta['tp']}, "
             f"{meta['dtype']}, {meta['env'].get('device_name', meta['device'])}; per rank, max over ranks; "
             f"median of {meta['reps']} after {meta['warmup']} warm-up)", "",
             f"Group: {meta['group']}. comm ms = the method's collectives timed alone at the same sizes.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {meta['tp']} | {r['kind']} | {r['method']} | skipped: {r['skipped']} |" + " |" * (len(COLUMNS) - 4))
            continue
        err = "; ".join(f"{k}: {v}" for k, v in (r.get("errors") or {}).items())
        per_gpu = fwd_bwd_flops(meta["n"], meta["d"], meta["v"]) / meta["tp"]
        cells = [str(meta["tp"]), r["kind"], r["method"] + (f" ({r['note']})" if r.get("note") else ""),
                 fmt(r.get("fwd_ms"), ".2f"), fmt(r.get("fwd_bwd_ms"), ".2f"), fmt(r.get("fwd_bwd_peak_mb"), ".0f"),
                 fmt(r.get("comm_ms"), ".2f"),
                 fmt(tflops(per_gpu, r["fwd_bwd_ms"]) if r.get("fwd_bwd_ms") else None, ".0f"),
                 fmt(r.get("loss_rel_err"), ".1e"), fmt(r.get("de_rel_err"), ".1e"), fmt(r.get("dc_rel_err"), ".1e")]
        if err:
            cells[-1] = (cells[-1] + " " if cells[-1] != "–" else "") + f"ERROR {err}"
        lines.append("| " + " | ".join(cells) + " |")
    if inputs:
        lines += ["", "| kind | mean loss (subsample) | tile frac (sorted) | ref loss |", "|---|---|---|---|"]
        for i in inputs:
            st = i.get("stats") or {}
            lines.append(f"| {i['kind']} | {fmt(st.get('mean_loss'), '.3f')} | {fmt(st.get('tile_frac'), '.3f')} | "
                         f"{fmt(i.get('ref_loss'), '.4f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).*is deprecated")
    if argv is None:
        argv = [a for a in sys.argv[1:] if a != "--"]  # allow `torchrun ... script.py -- --n 64 ...`
    args = parse_args(argv)
    rank, world, device, group, group_note = setup(args)
    dtype = DTYPES[args.dtype]
    n, d, v = args.n, args.d, args.v
    v_local = -(-v // world)
    v_pad = v_local * world  # zero rows pad the last shard (ours leaves them out via vocab_size)
    start = rank * v_local
    names = [m for m in args.methods.split(",") if m]
    methods = build_methods(names, args, group, rank, world, v_local, v)
    t_start = time.perf_counter()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"tp={world} device={device} group: {group_note}")
    results, inputs = [], []
    meta = dict(args=vars(args), env=machine_info() if rank == 0 else {}, n=n, d=d, v=v, tp=world, dtype=args.dtype,
                device=str(device), reps=args.reps, warmup=args.warmup, group=group_note, v_padded=v_pad)

    def save():
        if rank != 0:
            return None
        os.makedirs(args.out, exist_ok=True)
        meta["seconds"] = time.perf_counter() - t_start
        md = markdown(results, inputs, meta)
        base = os.path.join(args.out, f"bench_vp_tp{world}")
        with open(base + ".md", "w") as f:
            f.write(md)
        with open(base + ".json", "w") as f:
            json.dump(jsonable({"meta": meta, "inputs": inputs, "results": results}), f, indent=1)
        return md

    for kind in [k for k in args.kinds.split(",") if k]:
        log(f"== {kind}  ({time.perf_counter() - t_start:.0f}s)")
        entry = {"kind": kind}
        e, c, t = make_inputs(n, d, v, dtype, kind, device, args.seed)
        if rank == 0 and args.stats_tokens > 0:
            try:
                entry["stats"] = softmax_stats(e, c, t, n_sub=args.stats_tokens)
            except Exception as err:  # noqa: BLE001
                entry["stats_error"] = short_error(err)
        if v_pad > v:
            c = torch.cat([c, c.new_zeros(v_pad - v, d)])
        c_shard = c[start:start + v_local].contiguous()
        del c
        free_memory()
        ref = None
        if not args.no_check:
            try:
                n_valid = max(0, min(v_local, v - start))
                ref = build_reference(e, c_shard, t - start, n_valid, args, device, group)
                entry["ref_loss"] = ref["loss"]
            except Exception as err:  # noqa: BLE001
                entry["ref_error"] = short_error(err)
                log(f"  reference failed: {entry['ref_error']}")
            if not agree_ok(ref is not None, device, group):
                ref = None
            free_memory()
        inputs.append(entry)
        st = entry.get("stats", {})
        log(f"  inputs: mean loss {fmt(st.get('mean_loss'), '.3f')}, tile frac {fmt(st.get('tile_frac'), '.3f')}, "
            f"ref loss {fmt(entry.get('ref_loss'), '.4f')}")
        for name in names:
            fn, comm, note = methods[name]
            t0 = time.perf_counter()
            if fn is None:
                rec = {"method": name, "kind": kind, "skipped": comm}
                log(f"  {name:16s} skipped: {comm}")
                results.append(rec)
                continue
            rec = run_method(name, fn, e, c_shard, t, ref, args, device, group, world)
            rec["note"] = note
            try:
                ct = time_collectives(comm, group, device, world, args.warmup, args.reps)
                rec["comm"] = ct
                rec["comm_ms"] = ct["total"]
            except Exception as err:  # noqa: BLE001
                rec["errors"]["comm"] = short_error(err)
            free_memory()
            per_rank = [None] * world
            dist.all_gather_object(per_rank, rec, group=group)
            rec = reduce_records(per_rank)
            rec.update(kind=kind, seconds=time.perf_counter() - t0)
            results.append(rec)
            log(f"  {name:16s} fwd {fmt(rec.get('fwd_ms'), '.2f')} ms  fwd+bwd {fmt(rec.get('fwd_bwd_ms'), '.2f')} ms  "
                f"peak {fmt(rec.get('fwd_bwd_peak_mb'), '.0f')} MB  comm {fmt(rec.get('comm_ms'), '.2f')} ms  "
                f"loss err {fmt(rec.get('loss_rel_err'), '.1e')}  dE err {fmt(rec.get('de_rel_err'), '.1e')}  "
                f"dC err {fmt(rec.get('dc_rel_err'), '.1e')}  {rec.get('errors') or ''} ({rec['seconds']:.1f}s)")
            save()
        del e, c_shard, t, ref
        free_memory()
    md = save()
    if rank == 0:
        print()
        print(md)
        print(f"wrote {args.out}/bench_vp_tp{world}.md/.json in {time.perf_counter() - t_start:.0f}s")
    dist.barrier(group=group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
