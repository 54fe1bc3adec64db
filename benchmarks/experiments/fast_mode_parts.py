"""Experiment (GPU): where the fast mode's time can still go down, measured part by part.

A. the three logits-shaped products under each cuBLAS path PyTorch offers: the default (cublas),
   cublasLt (`torch.backends.cuda.preferred_blas_library("cublaslt")`) and TunableOp (every
   algorithm of both libraries timed per shape, the fastest kept);
B. the statistics pass over stored bf16 logits: the library's kernel (a cross-thread max and sum
   per 4096-column block) against a variant with per-lane running (max, Σexp) and no reduction in
   the loop (one exp per element: d = z − m, e = exp(−|d|), s ← d > 0 ? s·e + 1 : s + e), reduced
   across lanes once per row at the end; and the gradient pass's block shapes;
C. overlap: a memory-bound pass on a second stream while a product runs (does the pass hide?).

Run:  python3 benchmarks/experiments/fast_mode_parts.py   (writes $OUT/fast_mode_parts.json)
"""
import json, os, sys, time, traceback

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from vocab_parallel_cce.backends.triton import logits_bf16 as TG  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
RES: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}


def save():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "fast_mode_parts.json"), "w") as f:
        json.dump(RES, f, indent=1)


def bench(fn, rep=20):
    return do_bench(fn, warmup=5, rep=rep, return_mode="median")


@triton.jit
def lane_stats_kernel(Z, TGT, OUT, N, V, stride_z, BLOCK_C: tl.constexpr):
    """One row per program: per lane running max m and Σ exp(z − m), merged once at the end."""
    row = tl.program_id(0)
    ptr = Z + row.to(tl.int64) * stride_z
    tgt = tl.load(TGT + row)
    m = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_C,), tl.float32)
    x = tl.zeros((BLOCK_C,), tl.float32)
    for c0 in range(0, V, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = cols < V
        z = tl.load(ptr + cols, mask=ok, other=0.0).to(tl.float32)
        d = z - m
        e = tl.exp(-tl.abs(d))
        s_new = tl.where(d > 0, s * e + 1.0, s + e)
        s = tl.where(ok, s_new, s)
        m = tl.where(ok, tl.maximum(m, z), m)
        x += tl.where(cols == tgt, z, 0.0)
    mm = tl.max(m, axis=0)
    tot = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - mm)), axis=0)
    tl.store(OUT + row, mm + tl.log(tot))
    tl.store(OUT + N + row, tl.sum(x, axis=0))


def part_a(shapes):
    """Products under each cuBLAS path."""
    res = {}
    for (n, d, v) in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        e = torch.randn(n, d, device="cuda", generator=g).bfloat16()
        c = torch.randn(v, d, device="cuda", generator=g).bfloat16()
        grad = (torch.randn(n, v, device="cuda", generator=g) * 1e-3).bfloat16()
        z = torch.empty(n, v, device="cuda", dtype=torch.bfloat16)
        de = torch.empty(n, d, device="cuda", dtype=torch.bfloat16)
        dc = torch.empty(v, d, device="cuda", dtype=torch.bfloat16)
        prods = {"E@C.T": lambda: torch.mm(e, c.T, out=z), "G@C": lambda: torch.mm(grad, c, out=de),
                 "G.T@E": lambda: torch.mm(grad.T, e, out=dc)}
        key = f"{n}x{d}x{v}"
        res[key] = {}
        for lib in ("cublas", "cublaslt"):
            try:
                torch.backends.cuda.preferred_blas_library(lib)
                res[key][lib] = {k: bench(f) for k, f in prods.items()}
            except Exception as err:  # noqa: BLE001
                res[key][lib] = {"error": repr(err)[:300]}
        torch.backends.cuda.preferred_blas_library("cublas")
        try:
            tun = torch.cuda.tunable
            tun.enable(True)
            tun.tuning_enable(True)
            tun.set_max_tuning_iterations(30)
            tun.set_filename(os.path.join(OUT, "tunableop_results.csv"))
            t0 = time.time()
            for f in prods.values():
                f()
            torch.cuda.synchronize()
            tuned_s = time.time() - t0
            tun.tuning_enable(False)
            res[key]["tunableop"] = {k: bench(f) for k, f in prods.items()}
            res[key]["tunableop"]["tuning_s"] = tuned_s
            try:
                res[key]["tunableop"]["picked"] = {str(k): str(vv) for k, vv in tun.get_results().items()} \
                    if hasattr(tun, "get_results") else None
            except Exception as err:  # noqa: BLE001
                res[key]["tunableop"]["picked"] = repr(err)[:200]
            tun.enable(False)
        except Exception as err:  # noqa: BLE001
            res[key]["tunableop"] = {"error": repr(err)[:300]}
        # kernel names of the default path
        try:
            from torch.profiler import profile, ProfilerActivity
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for f in prods.values():
                    f()
                torch.cuda.synchronize()
            res[key]["kernels"] = [ev.key[:120] for ev in prof.key_averages()]
        except Exception as err:  # noqa: BLE001
            res[key]["kernels"] = repr(err)[:200]
        del e, c, grad, z, de, dc
        torch.cuda.empty_cache()
        RES["A_products"] = res
        save()


def part_b(shapes):
    """Statistics and gradient passes over stored bf16 logits."""
    res = {}
    for (n, d, v) in shapes:
        key = f"{n}x{d}x{v}"
        res[key] = {}
        g = torch.Generator(device="cuda").manual_seed(1)
        z = (torch.randn(n, v, device="cuda", generator=g) * 3).bfloat16()
        t = torch.randint(0, v, (n,), device="cuda", generator=g)
        zf = z.float()
        lse_ref = torch.logsumexp(zf, 1)
        x_ref = zf.gather(1, t[:, None])[:, 0]
        del zf
        gbytes = z.numel() * 2
        out = torch.empty(3, n, device="cuda", dtype=torch.float32)

        def lib(rows, cols, warps):
            return lambda: TG.stored_logits_stats_kernel[(triton.cdiv(n, rows),)](
                z, z, t, out, n, v, z.stride(0), 1.0, out, HAS_BIAS=False, HAS_SOFTCAP=False, NEED_SUM=False,
                WRITE_BACK=False, BLOCK_R=rows, BLOCK_C=cols, num_warps=warps)

        def lane(cols, warps):
            return lambda: lane_stats_kernel[(n,)](z, t, out, n, v, z.stride(0), BLOCK_C=cols, num_warps=warps)

        variants = {f"library R{r} C{cc} w{w}": lib(r, cc, w) for (r, cc, w) in
                    [(1, 4096, 8), (1, 2048, 4), (2, 2048, 8), (4, 1024, 4)]}
        variants.update({f"lane C{cc} w{w}": lane(cc, w) for (cc, w) in
                         [(2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)]})
        for name, f in variants.items():
            try:
                out.zero_()
                f()
                torch.cuda.synchronize()
                err_lse = ((out[0] - lse_ref).abs().max() / lse_ref.abs().max()).item()
                err_x = ((out[1] - x_ref).abs().max()).item()
                ms = bench(f)
                res[key][name] = {"ms": ms, "TB/s": gbytes / ms / 1e9, "max_rel_err_lse": err_lse, "max_err_x": err_x}
            except Exception as err:  # noqa: BLE001
                res[key][name] = {"error": repr(err)[:300]}
            RES["B_passes"] = res
            save()
        coef = torch.stack([torch.full((n,), 1.0 / n, device="cuda"), torch.full((n,), -1.0 / n, device="cuda"),
                            torch.zeros(n, device="cuda")]).contiguous()
        for (r, cc, w) in [(4, 1024, 4), (1, 4096, 8), (8, 1024, 8), (2, 2048, 8)]:
            zz = z.clone()
            f = lambda: TG.grad_from_stored_kernel[(triton.cdiv(n, r), triton.cdiv(v, cc))](  # noqa: E731
                zz, t, lse_ref, coef, zz, n, v, zz.stride(0), 0, 1.0, 0.0, lse_ref,
                HAS_SOFTCAP=False, FILTER=False, BLOCK_R=r, BLOCK_C=cc, num_warps=w)
            try:
                ms = bench(f)  # repeated in place: the values change, the traffic does not
                res[key][f"grad R{r} C{cc} w{w}"] = {"ms": ms, "TB/s": 2 * gbytes / ms / 1e9}
            except Exception as err:  # noqa: BLE001
                res[key][f"grad R{r} C{cc} w{w}"] = {"error": repr(err)[:300]}
            del zz
        del z
        torch.cuda.empty_cache()
        RES["B_passes"] = res
        save()


def part_c(shapes):
    """A memory-bound pass on a second stream during a product: hidden or not."""
    res = {}
    for (n, d, v) in shapes:
        key = f"{n}x{d}x{v}"
        g = torch.Generator(device="cuda").manual_seed(2)
        e = torch.randn(n, d, device="cuda", generator=g).bfloat16()
        c = torch.randn(v, d, device="cuda", generator=g).bfloat16()
        z1 = torch.empty(n, v, device="cuda", dtype=torch.bfloat16)
        z2 = (torch.randn(n, v, device="cuda", generator=g)).bfloat16()
        t = torch.randint(0, v, (n,), device="cuda", generator=g)
        out = torch.empty(3, n, device="cuda", dtype=torch.float32)
        side = torch.cuda.Stream()

        def gemm():
            torch.mm(e, c.T, out=z1)

        def stats():
            TG.stored_logits_stats_kernel[(n,)](z2, z2, t, out, n, v, z2.stride(0), 1.0, out, HAS_BIAS=False,
                                                HAS_SOFTCAP=False, NEED_SUM=False, WRITE_BACK=False,
                                                BLOCK_R=1, BLOCK_C=4096, num_warps=8)

        def both():
            cur = torch.cuda.current_stream()
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                stats()
            gemm()
            cur.wait_stream(side)

        res[key] = {"gemm": bench(gemm), "stats": bench(stats), "both_two_streams": bench(both),
                    "both_serial": bench(lambda: (gemm(), stats()))}
        for carve in (8, 16):
            try:
                torch._C._set_sm_carveout_experimental(carve)
                res[key][f"gemm carveout {carve}"] = bench(gemm)
                res[key][f"both_two_streams carveout {carve}"] = bench(both)
            except Exception as err:  # noqa: BLE001
                res[key][f"carveout {carve}"] = repr(err)[:200]
            finally:
                try:
                    torch._C._set_sm_carveout_experimental(None)
                except Exception:  # noqa: BLE001
                    pass
        del e, c, z1, z2
        torch.cuda.empty_cache()
        RES["C_overlap"] = res
        save()


if __name__ == "__main__":
    shapes = [(8192, 4096, 128256), (16384, 4096, 32064)]
    for part in (part_b, part_c, part_a):
        t0 = time.time()
        try:
            part(shapes)
        except Exception:  # noqa: BLE001
            RES[part.__name__ + "_error"] = traceback.format_exc()[-2000:]
        RES[part.__name__ + "_s"] = time.time() - t0
        save()
    print(json.dumps({k: v for k, v in RES.items() if not k.endswith("error")}, indent=1)[:6000])
