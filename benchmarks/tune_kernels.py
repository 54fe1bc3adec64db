"""Kernel tuning run for one GPU: correctness at real sizes, config sweep, backward breakdown.

    PYTHONPATH=. python3 benchmarks/tune_kernels.py --out $OUT [--quick]

Prints a table last; writes tune.json to --out. Configs are passed through the env variables
VPCCE_FWD_CONFIG / VPCCE_GRAD_CONFIG / VPCCE_MM_CONFIG read by triton_backend at each call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from vocab_parallel_cce import linear_cross_entropy
from vocab_parallel_cce import triton_backend as TB

ROWS: list[dict] = []

# Kernel paths of triton_backend, chosen through its env switches (read at each call).
PATHS = {"tma": {"VPCCE_TMA": "1"}, "pointers": {"VPCCE_TMA": "0"}}


class env_vars:
    """Context manager: set env variables, restore them after."""

    def __init__(self, env):
        self.env, self.saved = env, {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench(fn, warmup=3, rep=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def peak_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def zipf_inputs(n, d, v, dtype, seed, boost=8.0):
    """Trained-like inputs: logit_ij ≈ log prior_j + boost·[j = t_i] + small noise."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    ranks = torch.arange(1, v + 1, device="cuda", dtype=torch.float32)
    logp = -1.1 * torch.log(ranks)
    logp -= torch.logsumexp(logp, 0)
    t = torch.multinomial(logp.exp(), n, replacement=True, generator=g)
    u = torch.randn(d, device="cuda", generator=g)
    u /= u.norm()
    w = torch.randn(v, d, device="cuda", generator=g) / d**0.5
    w -= (w @ u)[:, None] * u[None, :]
    c = logp[:, None] * u[None, :] + w
    e = u[None, :] + boost * w[t]
    return e.to(dtype), c.to(dtype), t


def random_inputs(n, d, v, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    e = torch.randn(n, d, device="cuda", generator=g)
    c = torch.randn(v, d, device="cuda", generator=g) / d**0.5
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    return e.to(dtype), c.to(dtype), t


def reference(e, c, t, bias=None, softcap=None, ls=0.0, zl=0.0):
    ed = e.detach().double().requires_grad_()
    cd = c.detach().double().requires_grad_()
    bd = None if bias is None else bias.detach().double().requires_grad_()
    z = ed @ cd.T
    if bd is not None:
        z = z + bd
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    loss = torch.nn.functional.cross_entropy(z, t, label_smoothing=ls, reduction="none")
    loss = loss + zl * torch.logsumexp(z, -1) ** 2
    loss = loss.mean()
    grads = torch.autograd.grad(loss, [x for x in (ed, cd, bd) if x is not None])
    return loss.detach(), grads


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def correctness(quick):
    cases = [
        # n, d, v, dtype, impl, bias, softcap, ls, zl, kind
        (1000, 1000, 30011, torch.bfloat16, "triton", False, None, 0.0, 0.0, "random"),
        (1000, 1000, 30011, torch.bfloat16, "triton", True, 30.0, 0.1, 1e-4, "random"),
        (2048, 1024, 32000, torch.bfloat16, "triton", False, None, 0.0, 0.0, "zipf"),
        (2048, 1024, 32000, torch.bfloat16, "triton_exact", False, None, 0.0, 0.0, "zipf"),
        (777, 520, 9999, torch.float32, "triton", True, None, 0.0, 0.0, "random"),
        (777, 520, 9999, torch.float32, "triton_exact", True, 20.0, 0.0, 0.0, "random"),
        (1, 256, 5000, torch.float16, "triton", False, None, 0.0, 0.0, "random"),
    ]
    for (n, d, v, dt, impl, has_b, sc, ls, zl, kind), path in [
            (case, path) for case in cases[: 3 if quick else None] for path in PATHS]:
        with env_vars(PATHS[path]):
            check_case(n, d, v, dt, impl, has_b, sc, ls, zl, kind, path)


def check_case(n, d, v, dt, impl, has_b, sc, ls, zl, kind, path):
    e, c, t = (zipf_inputs if kind == "zipf" else random_inputs)(n, d, v, dt, seed=n + v)
    bias = (torch.randn(v, device="cuda") * 0.5).to(dt) if has_b else None
    if n > 1:
        t[::17] = -100
    ins = [x.clone().requires_grad_() for x in (e, c)] + ([bias.clone().requires_grad_()] if has_b else [])
    loss = linear_cross_entropy(ins[0], ins[1], t, ins[2] if has_b else None, softcap=sc,
                                label_smoothing=ls, z_loss=zl, impl=impl)
    grads = torch.autograd.grad(loss, ins)
    keep = t != -100
    r_loss, r_grads = reference(e[keep], c, t[keep], bias, sc, ls, zl)
    # the reference saw only kept tokens: its dE rows are for those tokens
    errs = [rel(loss, r_loss), rel(grads[0][keep], r_grads[0])] + [rel(a, b) for a, b in zip(grads[1:], r_grads[1:])]
    ROWS.append(dict(part="check", case=f"{path} {n}x{d}x{v} {str(dt)[6:]} {impl} b={has_b} sc={sc} ls={ls} zl={zl} {kind}",
                     loss_err=errs[0], de_err=errs[1], dc_err=errs[2], db_err=errs[3] if has_b else None))
    print(ROWS[-1], flush=True)


def time_loss(e, c, t, impl="triton", **kw):
    ei, ci = e.clone().requires_grad_(), c.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            linear_cross_entropy(ei, ci, t, impl=impl, **kw)

    def fwd_bwd():
        loss = linear_cross_entropy(ei, ci, t, impl=impl, **kw)
        ge, gc = torch.autograd.grad(loss, (ei, ci))
        return ge, gc

    return bench(fwd), bench(fwd_bwd, warmup=2, rep=6), peak_mb(fwd_bwd)


def torch_eager(e, c, t):
    ei, ci = e.clone().requires_grad_(), c.clone().requires_grad_()

    def fwd_bwd():
        loss = torch.nn.functional.cross_entropy((ei @ ci.T).float(), t)
        return torch.autograd.grad(loss, (ei, ci))

    return bench(fwd_bwd, 2, 5), peak_mb(fwd_bwd)


def timings(quick):
    shapes = [(8192, 4096, 128256)] + ([] if quick else [(8192, 2304, 256000)])
    for n, d, v in shapes:
        flops = 2 * n * d * v
        a = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(v, d, device="cuda", dtype=torch.bfloat16)
        mm = bench(lambda: a @ b.T)
        ROWS.append(dict(part="time", shape=f"{n}x{d}x{v}", method="cuBLAS e@c.T bf16", fwd_ms=mm,
                         tflops=flops / mm / 1e9))
        print(ROWS[-1], flush=True)
        del a, b
        for kind in ("random", "zipf"):
            e, c, t = (zipf_inputs if kind == "zipf" else random_inputs)(n, d, v, torch.bfloat16, seed=1)
            with torch.no_grad():
                z = (e[:2048].float() @ c.float().T)
                loss = torch.nn.functional.cross_entropy(z, t[:2048])
                p = torch.softmax(z, -1)
                order = torch.argsort(z.mean(0), descending=True)
                pk = p[:, order][:, : (v // 128) * 128].view(16, 128, v // 128, 128).amax(dim=(1, 3))
                keep = float((pk >= 2**-12).float().mean())
                del z, p
            variants = [(path, env) for path, env in PATHS.items()]
            if kind == "random" and not quick:
                tma = PATHS["tma"]
                variants += [(f"tma fwd {cfg}", {**tma, "VPCCE_FWD_CONFIG": cfg}) for cfg in
                             ("128,256,64,8,4", "128,128,64,8,4", "256,128,64,8,3", "128,256,128,8,2")]
                variants += [(f"tma grad {cfg}", {**tma, "VPCCE_GRAD_CONFIG": cfg}) for cfg in
                             ("128,256,64,8,3", "128,128,64,8,4", "128,256,64,8,4", "256,128,64,8,3")]
            for name, env in variants:
                try:
                    with env_vars(env):
                        f, fb, pk_mb = time_loss(e, c, t)
                    ROWS.append(dict(part="time", shape=f"{n}x{d}x{v}", kind=kind, method=f"ours {name}",
                                     fwd_ms=f, fwd_bwd_ms=fb, peak_mb=pk_mb, loss=float(loss), keep=keep,
                                     frac_6ndv=3 * flops / fb / 1e9 / 790e3))
                except Exception as err:  # record and go on
                    ROWS.append(dict(part="time", shape=f"{n}x{d}x{v}", kind=kind, method=f"ours {name}", error=repr(err)[:300]))
                print(ROWS[-1], flush=True)
            if kind == "random":
                fb, pk_mb = torch_eager(e, c, t)
                ROWS.append(dict(part="time", shape=f"{n}x{d}x{v}", kind=kind, method="torch eager", fwd_bwd_ms=fb, peak_mb=pk_mb))
                print(ROWS[-1], flush=True)
            del e, c, t
            torch.cuda.empty_cache()
        for path, env in PATHS.items():
            with env_vars(env):
                components(n, d, v, path)


def components(n, d, v, path):
    """Backward pieces through the op itself: grad kernel only, + dE, + dC (dense / filtered)."""
    e, c, t = random_inputs(n, d, v, torch.bfloat16, seed=3)
    with torch.no_grad():
        lse, _, _ = TB._forward_stats_op(e, c, None, t, v, 0.0, False, False)
    coef = torch.stack([torch.full_like(lse, 1.0 / n), torch.full_like(lse, -1.0 / n), torch.zeros_like(lse)])
    flops = 2 * n * d * v
    ms = bench(lambda: TB._forward_stats_op(e, c, None, t, v, 0.0, False, False), 1, 5)
    ROWS.append(dict(part="fwd", shape=f"{n}x{d}x{v}", method=f"{path} forward op", ms=ms, gemm_tflops=flops / ms / 1e9))
    print(ROWS[-1], flush=True)
    for name, de, dc, fe in (("grad kernel only", False, False, 0.0), ("+dE", True, False, 0.0),
                             ("+dC dense", False, True, 0.0), ("+dC filtered", False, True, 2.0**-12),
                             ("all dense", True, True, 0.0)):
        ms = bench(lambda: TB._backward_op(e, c, None, t, lse, coef, v, 0.0, fe, False, False, de, dc, False), 1, 5)
        mb = peak_mb(lambda: TB._backward_op(e, c, None, t, lse, coef, v, 0.0, fe, False, False, de, dc, False))
        ROWS.append(dict(part="bwd", shape=f"{n}x{d}x{v}", method=f"{path} {name}", ms=ms, peak_mb=mb,
                         gemm_tflops=flops / ms / 1e9))
        print(ROWS[-1], flush=True)
    ROWS.append(dict(part="bwd", shape=f"{n}x{d}x{v}", method="cublas fp32-out addmm", ok=TB._CUBLAS_FP32_OUT.get(e.device)))
    del e, c, t
    torch.cuda.empty_cache()


def sparse_bench():
    """dC = Gᵀ·E for one chunk (N=8192, w=2048): cuBLAS vs the Triton kernel dense and with a
    random fraction f of 128×128 (token, vocabulary) tiles kept, per MM config."""
    n, w = 8192, 2048
    for d in (4096, 2304):
        g0 = torch.Generator(device="cuda").manual_seed(d)
        e = torch.randn(n, d, device="cuda", generator=g0).to(torch.bfloat16)
        g = (torch.randn(n, w, device="cuda", generator=g0) * 1e-3).to(torch.bfloat16)
        dc = torch.empty(w, d, device="cuda", dtype=torch.bfloat16)
        flops = 2 * n * d * w
        ms = bench(lambda: torch.mm(g.T, e, out=dc))
        ROWS.append(dict(part="sparse", shape=f"N{n} w{w} D{d}", method="cuBLAS mm", ms=ms, tflops=flops / ms / 1e9))
        print(ROWS[-1], flush=True)
        ref = torch.mm(g.T.float(), e.float())
        for cfg in os.environ.get("SPARSE_CONFIGS", "128,128,64,8,8,3;128,128,128,8,8,3;128,256,128,8,8,2").split(";"):
            with env_vars({"VPCCE_MM_CONFIG": cfg}):
                ms = bench(lambda: TB._sparse_matmul(g, (1, g.stride(0)), e, e.stride(), dc, dc.stride(), w, d, n))
                err = rel(dc, ref)
                ROWS.append(dict(part="sparse", shape=f"N{n} w{w} D{d}", method=f"triton dense {cfg}", ms=ms,
                                 tflops=flops / ms / 1e9, err=err))
                print(ROWS[-1], flush=True)
                for f in (0.0, 0.05, 0.2, 0.5, 1.0):
                    flags = (torch.rand(n // 128, w // 128, device="cuda", generator=g0) < f).to(torch.int8)
                    lists, counts = TB._tile_lists(flags.T.contiguous())

                    def run():
                        TB._sparse_matmul(g, (1, g.stride(0)), e, e.stride(), dc, dc.stride(), w, d, n,
                                          lists, counts, 128, 128)
                    ms = bench(run)
                    mask = flags.repeat_interleave(128, 0).repeat_interleave(128, 1).bool()
                    err = rel(dc, torch.mm((g * mask).T.float(), e.float())) if f > 0 else float(dc.abs().max())
                    ROWS.append(dict(part="sparse", shape=f"N{n} w{w} D{d}", method=f"triton f={f} {cfg}", ms=ms,
                                     kept_tflops=f * flops / ms / 1e9, err=err))
                    print(ROWS[-1], flush=True)
        del e, g, dc, ref
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--sparse-only", action="store_true", help="only the dC sparse-kernel micro-benchmark")
    ap.add_argument("--components-only", action="store_true", help="only the per-piece breakdown (TMA path)")
    args = ap.parse_args()
    print(torch.__version__, __import__("triton").__version__, torch.cuda.get_device_name(), flush=True)
    t0 = time.time()
    if args.sparse_only:
        sparse_bench()
    elif args.components_only:
        for n, d, v in ((8192, 4096, 128256), (8192, 2304, 256000)):
            a = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(v, d, device="cuda", dtype=torch.bfloat16)
            ms = bench(lambda: a @ b.T)
            ROWS.append(dict(part="fwd", shape=f"{n}x{d}x{v}", method="cuBLAS e@c.T bf16", ms=ms,
                             gemm_tflops=2 * n * d * v / ms / 1e9))
            del a, b
            components(n, d, v, "tma")
    else:
        if not args.skip_check:
            correctness(args.quick)
        print(f"checks done {time.time() - t0:.0f}s", flush=True)
        timings(args.quick)
    with open(os.path.join(args.out, "tune.json"), "w") as f:
        json.dump(ROWS, f, indent=1)
    print("\n| part | case/shape | method | numbers |\n|---|---|---|---|")
    for r in ROWS:
        nums = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("part", "case", "shape", "method")}
        print(f"| {r['part']} | {r.get('case', r.get('shape'))} | {r.get('method', '')} | {nums} |")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
