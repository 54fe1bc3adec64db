"""Where the loss's error against float64 comes from, on a GPU (one process, a few seconds).

The loss of a token is lse − x (lse = log Σ_j exp z_j, x = z_t the correct logit). For each way of
forming z this prints, over all tokens, the mean and spread of lse − lse₆₄ and of x − x₆₄, and the
mean loss's relative error:

- ours (linear_cross_entropy, reduction="none", return_lse=True: the memory-first mode) with the Gluon and the
  portable kernels: lse from float32 products, x from the Gluon merge's dot product or the float32 tile;
- cuBLAS with a float32 output (torch.mm(out_dtype=float32)) and torch.logsumexp; the same lse
  with x as an FMA dot product of two rows (no tensor cores);
- cuBLAS bf16 logits (the unfused layer's, torch.compile's);
- float32 logits summed over slices of K by ordinary float32 adds (one product per slice):
  if the lse bias shrinks with the slice width, it comes from the tensor cores' float32
  accumulation, not from the reduction that follows;
- float32 SGEMM of the same bf16 values (no tensor cores).

shrink k: the least-squares k in z − z₆₄ ≈ k·z₆₄ (a systematic pull of every logit toward 0). For
logits ~ N(0, σ²) the softmax-weighted mean of z is σ², so such a pull moves lse by ≈ k·σ².

Run:  python benchmarks/experiments/loss_bias.py [--out DIR]   (writes loss_bias.json and .md)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository

from inputs import make_inputs  # noqa: E402
from machine import describe, machine_info, today, write_experiment  # noqa: E402

from vocab_parallel_cce import Tuning, linear_cross_entropy  # noqa: E402


def errors(name: str, lse: torch.Tensor, x: torch.Tensor, ref: dict, z: torch.Tensor | None = None) -> dict:
    """Bias (mean) and spread (sd) of lse and x against float64; the relative errors of the mean
    loss and of the worst token's loss."""
    d_lse, d_x = lse.double() - ref["lse"], x.double() - ref["x"]
    token_ref = ref["lse"] - ref["x"]
    row = dict(method=name, loss_rel=abs((d_lse - d_x).mean() / token_ref.mean()).item(),
               token_rel_max=((d_lse - d_x).abs() / token_ref.abs()).max().item(),
               lse_bias=d_lse.mean().item(), lse_sd=d_lse.std().item(),
               x_bias=d_x.mean().item(), x_sd=d_x.std().item())
    if z is not None:  # the pull of every logit toward 0, over the first 1024 tokens
        z64 = ref["z"][:1024]
        dz = z[:1024].double() - z64
        row["shrink"] = ((dz * z64).sum() / (z64 * z64).sum()).item()
    return row


def one_shape(n: int, d: int, v: int, slices: list[int]) -> list[dict]:
    e, c, t = make_inputs(n, d, v, kind="random", device="cuda", seed=0)[:3]
    z64 = e.double() @ c.double().T
    ref = dict(lse=torch.logsumexp(z64, -1), x=z64.gather(1, t[:, None]).squeeze(1), z=z64)
    pick = lambda z: z.gather(1, t[:, None]).squeeze(1)  # noqa: E731
    rows = []
    for label, use_gluon in (("ours, Gluon kernels", True), ("ours, portable kernels", False)):
        loss, lse = linear_cross_entropy(e, c, t, reduction="none", return_lse=True, tuning=Tuning(use_gluon=use_gluon))
        rows.append(errors(label, lse, lse.double() - loss.double(), ref))
    z32 = torch.mm(e, c.T, out_dtype=torch.float32)
    lse32 = torch.logsumexp(z32, -1)
    rows.append(errors("cuBLAS float32 logits", lse32, pick(z32), ref, z32))
    x_fma = (e.float() * c[t].float()).sum(-1)
    rows.append(errors("cuBLAS float32 lse, FMA dot x", lse32, x_fma, ref))
    del z32
    zb = e @ c.T
    rows.append(errors("cuBLAS bf16 logits", torch.logsumexp(zb.float(), -1), pick(zb).float(), ref, zb))
    del zb
    for width in slices:
        z = torch.zeros(n, v, dtype=torch.float32, device="cuda")
        for k0 in range(0, d, width):  # one product per slice; the slices summed by float32 adds
            z += torch.mm(e[:, k0:k0 + width], c[:, k0:k0 + width].T, out_dtype=torch.float32)
        rows.append(errors(f"float32, K in slices of {width}", torch.logsumexp(z, -1), pick(z), ref, z))
        del z
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    z = e.float() @ c.float().T
    torch.backends.cuda.matmul.allow_tf32 = allow
    rows.append(errors("float32 SGEMM (no tensor cores)", torch.logsumexp(z, -1), pick(z), ref, z))
    for r in rows:
        r["shape"] = f"{n}×{d}×{v}"
    return rows


def markdown(doc: dict) -> str:
    lines = [f"# loss_bias: {doc['machine'].get('device_name', 'CPU')}, {doc['date']}", "", doc["about"], "",
             describe(doc["machine"]), "",
             "| shape | logits | mean loss rel. error | worst token | lse − lse₆₄ mean | sd | x − x₆₄ mean | sd | shrink k |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        k = f"{r['shrink']:.1e}" if "shrink" in r else "–"
        lines.append(f"| {r['shape']} | {r['method']} | {r['loss_rel']:.2e} | {r['token_rel_max']:.1e} | "
                     f"{r['lse_bias']:.2e} | {r['lse_sd']:.1e} | "
                     f"{r['x_bias']:.1e} | {r['x_sd']:.1e} | {k} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--slices", default="2048,512,128,32")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("loss_bias.py: needs a CUDA GPU")
    slices = [int(s) for s in args.slices.split(",") if s]
    rows = one_shape(8192, 4096, 128256, slices) + one_shape(16384, 4096, 16032, [])
    doc = dict(kind="experiment", name="loss_bias", date=today(), machine=machine_info(),
               about="Random inputs (logits ~ N(0, 4)), bf16 e and c, every token; errors against float64 of the same "
                     "bf16 values. Script: benchmarks/experiments/loss_bias.py (module docstring: the rows).",
               rows=rows)
    write_experiment(args.out, doc, markdown(doc))


if __name__ == "__main__":
    main()
