"""Bit-for-bit snapshots of the library's results (CPU): proof that a refactoring changes no number.

    python benchmarks/snapshot.py save before.pt          # on the old version
    python benchmarks/snapshot.py save after.pt           # on the new one
    python benchmarks/snapshot.py compare before.pt after.pt    # exit status 1 if any value differs

About 600 cases: loss, dE, dC (and dbias, the dc_accumulate_into target) of `linear_cross_entropy`
with impl="triton" (the Triton kernels in the interpreter, TRITON_INTERPRET=1, set here) and
impl="torch", bf16 / float32 (/ float16), three shapes, every reduction with a non-trivial upstream
gradient, over the options below. `compare` checks the bits: NaNs compare as NaNs, a -0.0 against
0.0 is reported but not counted. `--only SUBSTRING` keeps the cases whose key contains it (keys are
impl/dtype/shape/reduction/option/upstream, e.g. 'torch/float32/one/mean/plain/x3.7').
"""

from __future__ import annotations

import itertools
import os
import sys
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # support.interpreter: the interpreter's bf16 products

import torch  # noqa: E402

SHAPES = {"small": (24, 16, 40), "odd": (37, 24, 101), "one": (1, 8, 19)}
OPTIONS = {
    "plain": {},
    "ignored": dict(ignore_every=3),
    "all-ignored": dict(ignore_every=1),
    "bad-target": dict(bad_target=True),
    "ignore_index=5": dict(ignore_index=5),
    "softcap+bias": dict(softcap=4.0, bias=True),
    "vocab_size": dict(vocab_pad=7),
    "int32+shift": dict(int32=True, shift=1),
    "smoothing": dict(label_smoothing=0.1),
    "z-loss": dict(z_loss=1e-2),
    "weights": dict(weights=True),
    "return_z_loss": dict(z_loss=1e-2, return_z_loss=True),
    "loss_mask": dict(loss_mask=True),
    "dc_into": dict(dc_into=True),
}
DTYPES = {"triton": (torch.bfloat16, torch.float32, torch.float16), "torch": (torch.bfloat16, torch.float32)}


def _case(impl, dtype, shape, reduction, opt, upstream):
    from vocab_parallel_cce import linear_cross_entropy

    n, d, v = shape
    o = dict(OPTIONS[opt])
    g = torch.Generator().manual_seed(zlib.crc32(f"{shape}/{opt}/{reduction}".encode()))
    e = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    c = (torch.randn(v, d, generator=g) * 2 / d**0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).requires_grad_() if o.pop("bias", False) else None
    t = torch.randint(0, v, (n,), generator=g)
    every = o.pop("ignore_every", 0)
    ii = o.pop("ignore_index", -100)
    if every:
        t[::every] = ii
    if ii != -100:
        t[1::2] = ii
    if o.pop("bad_target", False) and n > 1:
        t[1] = v + 3
    pad = o.pop("vocab_pad", 0)
    if pad:
        o["vocab_size"] = v - pad
        t = t % (v - pad)
    if o.pop("int32", False):
        t = t.int()
    kw = dict(reduction=reduction, impl=impl, ignore_index=ii)
    if o.pop("weights", False):
        kw["class_weights"] = torch.rand(v, generator=g) + 0.5
    if o.pop("loss_mask", False):
        if reduction != "none":
            return None
        mask = torch.rand(n, generator=g) > 0.3
        kw["loss_mask"] = mask
    into = None
    if o.pop("dc_into", False):
        into = torch.randn(v, d, generator=g)
        kw["dc_accumulate_into"] = into
    if o.get("shift") and n == 1:
        o.pop("shift")
    kw.update(o)
    out = linear_cross_entropy(e, c, t, b, **kw)
    loss = out.loss if hasattr(out, "loss") else out
    if reduction == "none":
        w = torch.rand(loss.shape, generator=g) * upstream
        if "loss_mask" in kw:
            w = w * kw["loss_mask"][: loss.numel()].view(loss.shape)
        obj = (loss * w).sum()
    else:
        obj = loss * upstream
    if hasattr(out, "z_loss") and out.z_loss is not None and opt == "return_z_loss" and reduction != "none":
        obj = obj + 0.0 * out.z_loss
    obj.backward()
    res = {"loss": loss.detach(), "de": e.grad, "dc": c.grad}
    if b is not None:
        res["db"] = b.grad
    if into is not None:
        res["into"] = into
    return res


def save(path: str, only: str = "") -> int:
    """Runs every case (whose key contains `only`) and saves {key: {name: tensor}} to `path`."""
    from support import interpreter

    interpreter.patch_bf16_dot()
    results = {}
    for impl, shape, reduction, opt, up in itertools.product(("triton", "torch"), SHAPES, ("mean", "sum", "none"),
                                                            OPTIONS, (3.7,)):
        for dtype in DTYPES[impl]:
            key = f"{impl}/{str(dtype)[6:]}/{shape}/{reduction}/{opt}/x{up}"
            if only not in key:
                continue
            r = _case(impl, dtype, SHAPES[shape], reduction, opt, up)
            if r is not None:
                results[key] = r
    if not results:
        raise SystemExit(f"--only {only!r}: no case key contains it")
    torch.save(results, path)
    print(f"{len(results)} cases → {path}")
    return len(results)


def _bits(x):
    if x is None:
        return None
    x = x.detach().contiguous()
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def compare(a_path: str, b_path: str) -> int:
    """The number of (case, output) pairs whose values differ (signed zeros and NaN payloads aside)."""
    a, b = torch.load(a_path), torch.load(b_path)
    if a.keys() != b.keys():
        raise SystemExit(f"the snapshots hold different cases: {sorted(set(a) ^ set(b))[:10]}")
    bad = 0
    for key in a:
        for name in a[key]:
            x, y = a[key][name], b[key].get(name)
            if x is None and y is None:
                continue
            if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
                print("MISMATCH (shape/dtype)", key, name)
                bad += 1
                continue
            both_nan = torch.isnan(x.float()) & torch.isnan(y.float())
            same_bits = torch.equal(_bits(x), _bits(y))
            if not same_bits:
                diff = ~both_nan & (_bits(x) != _bits(y))
                if diff.any():
                    kind = "signed zero" if torch.equal(torch.where(both_nan, 0, x), torch.where(both_nan, 0, y)) \
                        else "VALUE"
                    print(f"{kind} difference", key, name, int(diff.sum()), "elements")
                    bad += kind == "VALUE"
    print(f"{len(a)} cases compared: {'all bit-identical (NaNs as NaNs)' if not bad else f'{bad} differ'}")
    return bad


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save", help="run the cases, save their results")
    s.add_argument("path")
    s.add_argument("--only", default="", help="keep the cases whose key contains this")
    c = sub.add_parser("compare", help="compare two saved snapshots bit for bit")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args(argv)
    if args.command == "save":
        save(args.path, args.only)
        return 0
    return 1 if compare(args.a, args.b) else 0


if __name__ == "__main__":
    sys.exit(main())
