"""The Gluon float32-accumulating product (backends/triton/hopper/accumulate.py) against cuBLAS
addmm(out_dtype=float32, beta=1), on a Hopper GPU from the repository root: correctness against
float64, kernel times per configuration, and the memory-first fwd+bwd with and without it (same
process, interleaved rounds)."""
import os, sys, torch
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from hopper_suite import inputs
from timing import interleaved_rounds, median_ms, paired_ratio
from vocab_parallel_cce import linear_cross_entropy, Tuning
from vocab_parallel_cce.backends.triton import hopper as H
from vocab_parallel_cce.backends.triton.hopper import accumulate as A
from vocab_parallel_cce.backends.triton.recompute import counters
torch.manual_seed(0)
def rel(x, y): return ((x.double() - y).norm() / y.norm()).item()
# 1. correctness against float64 at odd sizes, offsets, strides, both operand orders
worst = 0.0
for (m, nn, k, acc, trans, off, pad) in [(1000, 4000, 1000, True, False, 0, 0), (1, 8, 8, True, False, 0, 0),
        (777, 136, 1037, False, False, 3, 3), (4096, 4096, 1024, True, False, 0, 0), (300, 264, 5000, True, True, 0, 4),
        (1037, 4096, 16384, True, True, 5, 3), (65, 136, 63, False, True, 0, 7), (1, 4096, 1, True, False, 0, 7)]:
    big = torch.randn(off + k + 8, nn, device="cuda").bfloat16()
    b = big[off:off + k]
    if trans:
        g = torch.randn(k, m + pad, device="cuda").bfloat16(); a = g[:, :m].T
    else:
        g = torch.randn(m, k + pad, device="cuda").bfloat16(); a = g[:, :k]
    out = torch.randn(m, nn, device="cuda") if acc else torch.full((m, nn), float("nan"), device="cuda")
    ref = (out.double() if acc else 0) + a.double() @ b.double()
    if (g.stride(0) * 2) % 16 or (nn * 4) % 16:
        print("skip unaligned", m, nn, k); continue
    ok = H.float32_product(out, a, b, acc)
    r = rel(out, ref); worst = max(worst, r)
    print(f"check m={m} nn={nn} k={k} acc={acc} trans={trans} ran={ok} rel={r:.2e}", flush=True)
print("WORST", worst)
# 2. kernel times: dE chunk (N x D += [N, w]·[w, D]) and dc_into chunk ([w, D] += Gᵀ·E)
CFGS = [(64, 256, 64, 4, 8, 4, 2, 4), (64, 256, 64, 3, 8, 4, 2, 2), (64, 128, 64, 4, 8, 4, 2, 1), (128, 256, 64, 3, 8, 8, 1, 4), (128, 128, 64, 4, 8, 8, 1, 1)]
for (n, d, w) in [(16384, 4096, 1024), (16384, 4096, 3072), (8192, 4096, 1792)]:
    out = torch.zeros(n, d, device="cuda"); g = torch.randn(n, w, device="cuda").bfloat16() * 0.01
    c = torch.randn(w, d, device="cuda").bfloat16(); e = torch.randn(n, d, device="cuda").bfloat16()
    mg = torch.zeros(w, d, device="cuda")
    fns = {"cublas dE": lambda: torch.addmm(out, g, c, beta=1, out_dtype=torch.float32, out=out),
           "cublas into": lambda: torch.addmm(mg, g.T, e, beta=1, out_dtype=torch.float32, out=mg)}
    for cfg in CFGS:
        fns[f"gluon dE {cfg}"] = (lambda cfg=cfg: A.launch(out, g, c, True, config=cfg))
        fns[f"gluon into {cfg}"] = (lambda cfg=cfg: A.launch(mg, g, e, True, trans_a=True, config=cfg))
    res = interleaved_rounds(fns, 6, 10)
    for name in fns:
        base = res["cublas " + name.split()[1]]["round_ms"]
        print(f"kernel {n}x{d} w={w} {name:<40} {median_ms(res[name]['round_ms']):7.3f} ms x cublas "
              f"{paired_ratio(res[name]['round_ms'], base):.3f}", flush=True)
    del out, g, c, e, mg
# 3. end to end: memory-first with and without the kernel
real = H.float32_product
for (n, d, v) in [(16384, 4096, 16032), (8192, 4096, 128256)]:
    e, c, t = inputs(n, d, v)
    main_grad = torch.zeros(v, d, device="cuda")
    def run(use, into=False):
        H.float32_product = real if use else (lambda *a, **k: False)
        le, lc = e.detach().requires_grad_(), c.detach().requires_grad_()
        loss = linear_cross_entropy(le, lc, t, grad_in_forward=False, dc_accumulate_into=main_grad if into else None)
        loss.backward()
        H.float32_product = real
        return le.grad, lc.grad
    counters.clear(); g1 = run(True); print("counters", dict(counters))
    g0 = run(False)
    print(f"e2e {n}x{d}x{v} dE rel {rel(g1[0], g0[0].double()):.2e} dC rel {rel(g1[1], g0[1].double()):.2e}")
    z = torch.empty(n, v, device="cuda", dtype=torch.bfloat16); gg = torch.randn_like(z) * 1e-3
    de, dc = torch.empty_like(e), torch.empty_like(c)
    def four():
        torch.mm(e, c.T, out=z); torch.mm(e, c.T, out=z); torch.mm(gg, c, out=de); torch.mm(gg.T, e, out=dc)
    fns = {"memory-first gluon acc": lambda: run(True), "memory-first cublas acc": lambda: run(False),
           "into gluon acc": lambda: run(True, True), "into cublas acc": lambda: run(False, True), "4 cuBLAS": four}
    res = interleaved_rounds(fns, 8, 3)
    b = res["4 cuBLAS"]["round_ms"]
    for name, r in res.items():
        print(f"e2e {n}x{d}x{v} {name:<26} {median_ms(r['round_ms']):8.2f} ms  x4cuBLAS {paired_ratio(r['round_ms'], b):.3f}"
              f"  x cublas-acc {paired_ratio(r['round_ms'], res['memory-first cublas acc']['round_ms']):.3f}", flush=True)
    del z, gg, de, dc, main_grad; torch.cuda.empty_cache()
