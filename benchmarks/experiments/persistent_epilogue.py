"""Experiment (not used by the library): a persistent, TMA-fed Triton product of the logits with the
loss work in its epilogue, against cuBLAS. Measured on an H200 on 2026-12-01
(benchmarks/RESULTS.md §0, results/2026-12-01/kernel_prototypes_call*.json): with a plain store it
matches cuBLAS; the softmax-statistics epilogue costs 0.8–1.3 ms more at (8192, 4096, 128256),
more than cuBLAS plus the library's separate statistics pass, so the library does not use it.

Kernel: one program per SM walks output tiles (BLOCK_M tokens × BLOCK_N vocabulary rows) in
grouped order, runs the D loop (TMA loads, pipelined, loops flattened), then:
  "store": Z ← the product (reference); "stats": per-row partial (log Σ exp z, correct logit, Σ z)
  per vocabulary tile into PART[q, tile, row], Z ← logits when STORE_Z; "grad": Z ← G.
Run on a GPU:  python3 benchmarks/experiments/persistent_epilogue.py  (writes $OUT or /tmp/out).
"""
import json, math, os, sys, traceback

import torch
import triton
import triton.language as tl
import torch.nn.functional as F
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from vocab_parallel_cce.backends.triton import logits_bf16 as TG  # noqa: E402
from vocab_parallel_cce.backends.triton import logits_fp32 as K  # noqa: E402
from vocab_parallel_cce.backends.triton.common import grouped_tile as _grouped_tile, tanh as _tanh  # noqa: E402


@triton.jit
def _tile_logits(E, C, m0, n0, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        a = E.load([m0, k0])
        b = C.load([n0, k0])
        acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def logits_epilogue_kernel(
    E, C, Z, BIAS, TGT, PART, LSE, COEF, FLAGS,
    N, V, D, v_begin, width, stride_pq, stride_pv, stride_fn, softcap, filter_eps,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_SUM: tl.constexpr,
    STORE_Z: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """E [N, D], C [V, D], Z [N, width] (descriptors); columns [v_begin, v_begin + width) of the
    vocabulary (rows of C), of which those < V are real.

    EPILOGUE "stats": PART[q, j, n] for vocabulary tile j of the chunk (see module docstring);
    Z ← logits (STORE_Z). "grad": Z ← G, FLAGS[m tile, n tile] (FILTER).
    """
    pid = tl.program_id(0)
    grid_m = tl.cdiv(N, BLOCK_M)
    grid_n = tl.cdiv(width, BLOCK_N)
    for tile in tl.range(pid, grid_m * grid_n, NUM_PROGRAMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
        # vocabulary tiles grouped: GROUP of them (GROUP·BLOCK_N rows of C) stay in L2 while E streams
        pid_n, pid_m = _grouped_tile(tile, grid_n, grid_m, GROUP)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        z = _tile_logits(E, C, m0, v_begin + n0, D, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        cols = v_begin + n0 + tl.arange(0, BLOCK_N)
        mask_m = offs_m < N
        mask_n = (cols < V) & (n0 + tl.arange(0, BLOCK_N) < width)
        if HAS_BIAS:
            z += tl.load(BIAS + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            th = _tanh(z / softcap)
            z = softcap * th
        tgt = tl.load(TGT + offs_m, mask=mask_m, other=-1)
        is_target = (cols[None, :] == tgt[:, None]) & mask_n[None, :]
        if EPILOGUE == "store":  # plain product (benchmark reference)
            Z.store([m0, n0], z.to(Z.dtype))
        elif EPILOGUE == "stats":
            if STORE_Z:
                Z.store([m0, n0], z.to(Z.dtype))
            part = PART + pid_n * stride_pv + offs_m
            tl.store(part + stride_pq, tl.sum(tl.where(is_target, z, 0.0), axis=1), mask=mask_m)
            if NEED_SUM:
                tl.store(part + 2 * stride_pq, tl.sum(tl.where(mask_n[None, :], z, 0.0), axis=1), mask=mask_m)
            zm = tl.where(mask_n[None, :], z, float("-inf"))
            row_max = tl.max(zm, axis=1)
            row_sum = tl.sum(tl.exp(zm - row_max[:, None]), axis=1)
            tl.store(part, row_max + tl.log(row_sum), mask=mask_m)
        else:
            lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
            a = tl.load(COEF + offs_m, mask=mask_m, other=0.0)
            b = tl.load(COEF + N + offs_m, mask=mask_m, other=0.0)
            u = tl.load(COEF + 2 * N + offs_m, mask=mask_m, other=0.0)
            p = tl.exp(z - lse[:, None])
            g = a[:, None] * p + tl.where(is_target, b[:, None], 0.0) + u[:, None]
            if HAS_SOFTCAP:
                g = g * (1.0 - th * th)
            valid = mask_m[:, None] & mask_n[None, :]
            Z.store([m0, n0], tl.where(valid, g, 0.0).to(Z.dtype))
            if FILTER:
                weighted = tl.where(valid & (a[:, None] != 0.0), p, 0.0)
                keep = (tl.max(tl.max(weighted, axis=1), axis=0) >= filter_eps) | \
                       (tl.max(tl.max(is_target.to(tl.int32), axis=1), axis=0) > 0)
                tl.store(FLAGS + pid_m * stride_fn + pid_n, keep.to(tl.int8))



OUT = os.environ.get("OUT", "/tmp/out")
dev = "cuda"
NSM = torch.cuda.get_device_properties(0).multi_processor_count
rows = []
log = open(f"{OUT}/log.txt", "w")


def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    log.write(s + "\n"); log.flush()


def t_ms(fn, rep=200):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def rec(shape, what, ms, extra=""):
    n, d, v = shape
    tf = 2 * n * d * v / ms / 1e9
    rows.append((shape, what, ms, tf, extra))
    say(f"{shape} {what:48s} {ms:8.3f} ms  {tf:6.0f} TF/s(2NDV) {extra}")


def inputs(n, d, v, seed=0):
    g = torch.Generator(device=dev); g.manual_seed(seed)
    e = torch.randn(n, d, device=dev, generator=g).bfloat16()
    c = (torch.randn(v, d, device=dev, generator=g) * (2 / math.sqrt(d))).bfloat16()
    t = torch.randint(0, v, (n,), device=dev, generator=g)
    return e, c, t


def stats_launch(e, c, t, z, part, cfg, store_z=True):
    bm, bn, bk, group, warps, stages, ws = cfg
    n, d = e.shape; v = c.shape[0]
    ed = TensorDescriptor(e, [n, d], [d, 1], [bm, bk])
    cd = TensorDescriptor(c, [v, d], [d, 1], [bn, bk])
    zd = TensorDescriptor(z, [n, v], [z.stride(0), 1], [bm, bn]) if store_z else z
    tiles = triton.cdiv(n, bm) * triton.cdiv(v, bn)
    progs = min(NSM, tiles)
    logits_epilogue_kernel[(progs,)](
        ed, cd, zd, c, t, part, part, part, part, n, v, d, 0, v, part.stride(0), part.stride(1), 0, 1.0, 0.0,
        EPILOGUE="stats", HAS_BIAS=False, HAS_SOFTCAP=False, NEED_SUM=False, STORE_Z=store_z, FILTER=False,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=group, NUM_PROGRAMS=progs, DOT_PRECISION="ieee",
        WARP_SPECIALIZE=ws, num_warps=warps, num_stages=stages)


def grad_launch(e, c, t, g, lse, coef, cfg, v_begin=0, width=None):
    bm, bn, bk, group, warps, stages, ws = cfg
    n, d = e.shape; v = c.shape[0]
    width = width or v
    ed = TensorDescriptor(e, [n, d], [d, 1], [bm, bk])
    cd = TensorDescriptor(c, [v, d], [d, 1], [bn, bk])
    gd = TensorDescriptor(g, [n, width], [g.stride(0), 1], [bm, bn])
    tiles = triton.cdiv(n, bm) * triton.cdiv(width, bn)
    progs = min(NSM, tiles)
    logits_epilogue_kernel[(progs,)](
        ed, cd, gd, c, t, lse, lse, coef, lse, n, v, d, v_begin, width, 0, 0, 0, 1.0, 0.0,
        EPILOGUE="grad", HAS_BIAS=False, HAS_SOFTCAP=False, NEED_SUM=False, STORE_Z=False, FILTER=False,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=group, NUM_PROGRAMS=progs, DOT_PRECISION="ieee",
        WARP_SPECIALIZE=ws, num_warps=warps, num_stages=stages)


def gpass_launch(z, t, lse, coef, br=4, bc=1024, warps=4):
    n, v = z.shape[0], z.shape[1]
    TG.grad_from_stored_kernel[(triton.cdiv(n, br), triton.cdiv(v, bc))](
        z, t, lse, coef, z, n, v, z.stride(0), 0, 1.0, 0.0, lse, HAS_SOFTCAP=False, FILTER=False,
        BLOCK_R=br, BLOCK_C=bc, num_warps=warps)


def rowstats_launch(z, t, out, v):
    n = z.shape[0]
    K.row_stats_kernel[(n,)](z, z, t, out, v, z.stride(0), n, 1.0, out, HAS_BIAS=False, HAS_SOFTCAP=False,
                             NEED_SUM=False, BLOCK=2048, num_warps=8)


class FastProto(torch.autograd.Function):
    """Scalar mean CE with gradients in forward. variant 'B': Triton stats-epilogue GEMM storing bf16 Z;
    'A': cuBLAS bf16 Z + row-stats pass."""
    @staticmethod
    def forward(ctx, e, c, t, variant, cfg):
        n, d = e.shape; v = c.shape[0]
        vp = triton.cdiv(v, 8) * 8
        z = torch.empty(n, vp, dtype=e.dtype, device=dev)
        if variant == "B":
            bn = cfg[1]
            part = torch.empty(2, triton.cdiv(v, bn), n, dtype=torch.float32, device=dev)
            stats_launch(e, c, t, z, part, cfg)
            lse = torch.logsumexp(part[0], 0); x = part[1].sum(0)
        else:
            torch.mm(e, c.T, out=z[:, :v])
            out = torch.empty(3, n, dtype=torch.float32, device=dev)
            rowstats_launch(z, t, out, v)
            lse, x = out[0], out[1]
        loss = (lse - x).mean()
        coef = torch.empty(3, n, dtype=torch.float32, device=dev)
        coef[0] = 1.0 / n; coef[1] = -1.0 / n; coef[2] = 0.0
        gpass_launch(z, t, lse, coef)
        g = z[:, :v]
        de = g @ c
        dc = g.T @ e
        del z, g
        ctx.save_for_backward(de, dc)
        return loss

    @staticmethod
    def backward(ctx, gl):
        de, dc = ctx.saved_tensors
        return de * gl, dc * gl, None, None, None


def ref_grads(e, c, t):
    e64, c64 = e.double().requires_grad_(), c.double().requires_grad_()
    loss = F.cross_entropy(e64 @ c64.T, t)
    de, dc = torch.autograd.grad(loss, (e64, c64))
    return loss.detach(), de, dc


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def measure_method(shape, name, fn, e, c, t, ref=None):
    ee = e.clone().requires_grad_(); cc = c.clone().requires_grad_()
    def step():
        loss = fn(ee, cc, t)
        return torch.autograd.grad(loss, (ee, cc))
    try:
        step(); torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        step(); torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = t_ms(step, rep=400)
        extra = f"peak {peak:.0f} MiB"
        if ref is not None:
            loss = fn(ee, cc, t); de, dc = torch.autograd.grad(loss, (ee, cc))
            extra += f" errs loss {abs(loss.item()-ref[0].item())/abs(ref[0].item()):.1e} dE {rel(de, ref[1]):.2e} dC {rel(dc, ref[2]):.2e}"
        n, d, v = shape
        rec(shape, "fwd+bwd " + name, ms, extra + f" [{6*n*d*v/ms/1e9:.0f} TF/s at 6NDV]")
    except Exception as ex:
        say(f"{shape} {name} FAILED: {type(ex).__name__}: {str(ex)[:400]}")
        traceback.print_exc(file=log)


def main():
    say("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    a = torch.randn(8192, 8192, device=dev).bfloat16(); b = torch.randn(8192, 8192, device=dev).bfloat16()
    ms = t_ms(lambda: a @ b); say(f"peak bf16 8192^3: {2*8192**3/ms/1e9:.0f} TF/s"); del a, b
    cfgs = [
        (128, 256, 64, 8, 8, 3, False),
        (128, 256, 64, 8, 8, 4, False),
        (128, 256, 64, 8, 8, 3, True),
        (128, 128, 64, 8, 8, 4, False),
        (128, 128, 64, 8, 4, 4, False),
        (128, 256, 64, 16, 8, 3, False),
    ]
    shapes = [(8192, 4096, 128256), (16384, 4096, 32064), (8192, 2304, 256000), (4096, 4096, 128256)]
    for si, shape in enumerate(shapes):
        n, d, v = shape
        e, c, t = inputs(n, d, v)
        zf = torch.randn(n, v, device=dev).bfloat16()
        rec(shape, "cublas E@C.T", t_ms(lambda: e @ c.T))
        rec(shape, "cublas G@C (dE)", t_ms(lambda: zf @ c))
        rec(shape, "cublas G.T@E (dC)", t_ms(lambda: zf.T @ e))
        del zf
        vp = triton.cdiv(v, 8) * 8
        z = torch.empty(n, vp, dtype=torch.bfloat16, device=dev)
        # reference stats from cuBLAS fp32 logits on 512 rows
        zr = (e[:512].float() @ c.float().T)
        lse_ref = torch.logsumexp(zr, 1); x_ref = zr.gather(1, t[:512, None]).squeeze(1)
        best = None
        for cfg in (cfgs if si < 2 else cfgs[:3]):
            for store in (False, True):
                try:
                    part = torch.empty(2, triton.cdiv(v, cfg[1]), n, dtype=torch.float32, device=dev)
                    z.fill_(float("nan"))
                    stats_launch(e, c, t, z, part, cfg, store)
                    lse = torch.logsumexp(part[0], 0); x = part[1].sum(0)
                    err = (lse[:512] - lse_ref).abs().max().item(), (x[:512] - x_ref).abs().max().item()
                    zerr = rel(z[:512, :v].float(), zr.double()) if store else 0.0
                    ms = t_ms(lambda: stats_launch(e, c, t, z, part, cfg, store))
                    rec(shape, f"stats{'+Z' if store else ''} {cfg}", ms, f"lse err {err[0]:.1e} x err {err[1]:.1e} Z rel {zerr:.1e}")
                    if store and (best is None or ms < best[0]):
                        best = (ms, cfg)
                except Exception as ex:
                    say(f"{shape} stats {cfg} store={store} FAILED: {type(ex).__name__}: {str(ex)[:300]}")
                    traceback.print_exc(file=log)
        # grad epilogue (recompute-mode logit gradient), full width
        lse_full = torch.full((n,), math.log(v) + 2.0, device=dev)
        coef = torch.empty(3, n, device=dev); coef[0] = 1.0 / n; coef[1] = -1.0 / n; coef[2] = 0
        for cfg in (cfgs[:3] if si < 2 else cfgs[:1]):
            try:
                ms = t_ms(lambda: grad_launch(e, c, t, z, lse_full, coef, cfg))
                rec(shape, f"grad-epilogue {cfg}", ms)
            except Exception as ex:
                say(f"{shape} grad {cfg} FAILED: {type(ex).__name__}: {str(ex)[:300]}")
                traceback.print_exc(file=log)
        # existing recompute kernels for comparison
        # G pass variants
        for br, bc, w in ((4, 1024, 4), (8, 512, 4), (2, 2048, 8), (16, 256, 4)):
            ms = t_ms(lambda: gpass_launch(z, t, lse_full, coef, br, bc, w))
            rec(shape, f"G pass in place br={br} bc={bc} w={w}", ms, f"{4*n*v/ms/1e9:.0f} GB/s")
        out3 = torch.empty(3, n, device=dev)
        ms = t_ms(lambda: rowstats_launch(z, t, out3, v)); rec(shape, "row stats pass (bf16 Z)", ms, f"{2*n*v/ms/1e9:.0f} GB/s")
        del z
        # end to end
        ref = ref_grads(e, c, t) if si == 0 else None
        bcfg = best[1] if best else cfgs[0]
        say(f"{shape} best stats+Z cfg {bcfg}")
        measure_method(shape, f"proto B {bcfg}", lambda ee, cc, tt: FastProto.apply(ee, cc, tt, "B", bcfg), e, c, t, ref)
        measure_method(shape, "proto A (cuBLAS Z)", lambda ee, cc, tt: FastProto.apply(ee, cc, tt, "A", None), e, c, t, ref)
        if si < 2:
            comp = torch.compile(lambda ee, cc, tt: F.cross_entropy((ee @ cc.T).float(), tt), dynamic=False)
            measure_method(shape, "torch.compile", comp, e, c, t, ref)
        del ref
        torch.cuda.empty_cache()
    json.dump([dict(shape=s, what=w, ms=m, tflops=tf, extra=x) for s, w, m, tf, x in rows], open(f"{OUT}/proto1.json", "w"), indent=1)
    say("\n== summary")
    for s, w, m, tf, x in rows:
        if "fwd+bwd" in w or "cublas" in w:
            say(f"{s} {w:40s} {m:8.3f} {x}")


if __name__ == "__main__":
    main()
