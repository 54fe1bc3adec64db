"""Experiment (GPU): block shapes of the fast mode's two passes over the stored bf16 logits.

The statistics pass (`stored_logits_stats_kernel`, reads Z once; without the logit sum, as plain
cross-entropy runs it, and the library's shape once with it) and the gradient pass
(`grad_from_stored_kernel`, reads and rewrites Z) are memory-bound: their floor is Z's bytes at
the HBM bandwidth, measured here by a bf16 copy (read + write) and a row max (read). For each
(rows, cols, warps) of each pass: ms, GB/s, and the fraction of that floor.

Run:  python3 benchmarks/experiments/pass_tuning.py [NxV ...]   (writes $OUT/pass_tuning.json)
"""
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from vocab_parallel_cce.backends.triton import logits_bf16 as G  # noqa: E402

STATS_CONFIGS = [(1, 2048, 8), (1, 4096, 8), (1, 4096, 16), (1, 8192, 16), (2, 2048, 8), (2, 4096, 16),
                 (1, 1024, 4), (4, 1024, 8)]
GRAD_CONFIGS = [(4, 1024, 4), (2, 2048, 8), (4, 2048, 8), (8, 1024, 8), (1, 4096, 8), (8, 512, 4), (16, 256, 4)]


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def main(shapes):
    out = {"device": torch.cuda.get_device_name(), "shapes": {}}
    for n, v in shapes:
        gen = torch.Generator(device="cuda").manual_seed(0)
        z = (torch.randn(n, v, device="cuda", generator=gen) * 2).bfloat16()
        zbytes = z.numel() * 2
        t = torch.randint(0, v, (n,), device="cuda", generator=gen)
        res = {"copy_ms": timed(lambda: z.clone()), "rowmax_ms": timed(lambda: z.amax(dim=1))}
        ref = torch.logsumexp(z.float(), dim=1)
        stats = torch.empty(3, n, device="cuda")
        rows_out = []
        x_ref = z.gather(1, t[:, None])[:, 0].float()
        for (rows, cols, warps), need_sum in [(cfg, False) for cfg in STATS_CONFIGS] + [(STATS_CONFIGS[0], True)]:
            def run():
                G.stored_logits_stats_kernel[(triton.cdiv(n, rows),)](
                    z, z, t, stats, n, v, z.stride(0), 1.0, stats, HAS_BIAS=False, HAS_SOFTCAP=False,
                    NEED_SUM=need_sum, WRITE_BACK=False, BLOCK_R=rows, BLOCK_C=cols, num_warps=warps)
            ms = timed(run)
            err = ((stats[0] - ref).abs().max() / ref.abs().max()).item()
            x_exact = bool(torch.equal(stats[1], x_ref))
            rows_out.append({"cfg": [rows, cols, warps], "need_sum": need_sum, "ms": ms, "GBps": zbytes / ms / 1e6,
                             "err": err, "x_exact": x_exact})
        res["stats"] = rows_out
        lse = ref.contiguous()
        coef = torch.stack([torch.full((n,), 1.0 / n, device="cuda"), torch.full((n,), -1.0 / n, device="cuda"),
                            torch.zeros(n, device="cuda")]).contiguous()
        rows_out = []
        for rows, cols, warps in GRAD_CONFIGS:
            work = z.clone()

            def run():
                G.grad_from_stored_kernel[(triton.cdiv(n, rows), triton.cdiv(v, cols))](
                    work, t, lse, coef, work, n, v, work.stride(0), 0, 1.0, 0.0, lse,
                    HAS_SOFTCAP=False, FILTER=False, BLOCK_R=rows, BLOCK_C=cols, num_warps=warps)
            ms = timed(run)
            rows_out.append({"cfg": [rows, cols, warps], "ms": ms, "GBps": 2 * zbytes / ms / 1e6})
            del work
        res["grad"] = rows_out
        out["shapes"][f"{n}x{v}"] = res
        del z
        torch.cuda.empty_cache()
    path = os.path.join(os.environ.get("OUT", "/tmp/out"), "pass_tuning.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    for key, res in out["shapes"].items():
        n, v = (int(x) for x in key.split("x"))
        zb = n * v * 2
        print(f"{key}: copy {res['copy_ms']:.3f} ms ({2 * zb / res['copy_ms'] / 1e6:.0f} GB/s), "
              f"row max {res['rowmax_ms']:.3f} ms ({zb / res['rowmax_ms'] / 1e6:.0f} GB/s)")
        for kind in ("stats", "grad"):
            for r in res[kind]:
                print(f"  {kind:5s} {str(r['cfg']):16s} {r['ms']:.3f} ms {r['GBps']:6.0f} GB/s"
                      + (f" err {r['err']:.1e} x exact {r['x_exact']} sum {r['need_sum']}" if "err" in r else ""))


if __name__ == "__main__":
    args = sys.argv[1:] or ["8192x128256", "16384x16032", "8192x256000"]
    main([tuple(int(x) for x in a.split("x")) for a in args])
