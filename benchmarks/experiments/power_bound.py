"""How fast the three products of a loss could run at the clock the GPU holds under them.

For each shape, each method runs alone for a sustained window (after a warm-up) while nvidia-smi
samples the SM clock, the power draw and the clock-throttle reasons every 100 ms. From the
samples inside a method's window: its mean SM clock, mean power, the reasons seen. From the clock
f: the tensor cores' bf16 peak at that clock, P(f) = SMs · 4096 FLOP · f (sm_90: 1024 dense bf16
multiply-adds per SM per clock; 989.4 TFLOP/s at 1830 MHz on an H100 SXM), and

    utilisation = 6·N·D·V / ms / P(f)          (the three products' FLOPs, at the measured time)
    floor / compile = 6·N·D·V / P(f) / compile's ms

the second being the ratio to torch.compile that the three products would reach at 100% of the
tensor cores' peak at the clock measured under cuBLAS's products: no method that runs those
products at that clock goes below it.

Run:  python benchmarks/experiments/power_bound.py [--out DIR] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository

from inputs import make_inputs  # noqa: E402
from machine import describe, machine_info, today, write_experiment  # noqa: E402
from methods import build_method  # noqa: E402
from timing import CublasProducts  # noqa: E402

from vocab_parallel_cce import linear_cross_entropy  # noqa: E402

SHAPES = [(8192, 4096, 128256), (16384, 4096, 16032), (8192, 2304, 256000), (32768, 4096, 128256)]
FLOP_PER_SM_CLOCK = 4096  # sm_90 dense bf16: 1024 multiply-adds per SM per clock
METHODS = ("cublas_3x", "torch_compile", "fast", "memory_first")


class Sampler:
    """nvidia-smi in the background: (host time, SM MHz, W, throttle mask) every `period_ms`."""

    def __init__(self, period_ms: int = 100):
        query = "clocks.sm,power.draw,clocks_throttle_reasons.active"
        self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits",
                                      f"-lms={period_ms}"], stdout=subprocess.PIPE, text=True)
        self.samples: list[tuple[float, float, float, int]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                mhz, watts, mask = (x.strip() for x in line.split(","))
                self.samples.append((time.time(), float(mhz), float(watts), int(mask, 16)))
            except ValueError:
                continue

    def between(self, t0: float, t1: float) -> list[tuple[float, float, float, int]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]

    def stop(self) -> None:
        self.proc.terminate()


def sustained(fn, seconds: float) -> tuple[float, float, float]:
    """(ms per call, window start, window end): fn repeated for about `seconds` after a warm-up
    of half that, timed by CUDA events over the window."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t_end = time.time() + seconds / 2
    while time.time() < t_end:  # warm-up: the clock settles under this load
        fn()
        torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, t0 = 0, time.time()
    a.record()
    while time.time() - t0 < seconds:
        fn()
        calls += 1
        if calls % 4 == 0:
            torch.cuda.synchronize()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / calls, t0, time.time()


def window_stats(window: list[tuple[float, float, float, int]]) -> dict:
    """Mean SM MHz and W of a window's samples, the throttle reasons seen in any (OR of masks)."""
    mask = 0
    for s in window:
        mask |= s[3]
    nan = float("nan")
    return dict(sm_mhz=statistics.mean(s[1] for s in window) if window else nan,
                watts=statistics.mean(s[2] for s in window) if window else nan,
                throttle_mask=hex(mask), samples=len(window))


def summarise(row: dict, sms: int, square_mhz: float | None = None) -> dict:
    """The row with each method's 3-products TFLOP/s and utilisation at its clock, and the floor:
    the three products at 100% of the peak at cuBLAS's clock, in ms and over torch.compile's ms
    (and over compile's ms at `square_mhz`, the clock under the square product, if given)."""
    n, d, v = row["shape"]
    flops = 6.0 * n * d * v
    for m in row["methods"].values():
        m["tflops_3_products"] = flops / m["ms"] / 1e9
        m["utilisation"] = flops / (m["ms"] * 1e-3) / (sms * FLOP_PER_SM_CLOCK * m["sm_mhz"] * 1e6)
    cublas, compiled = row["methods"]["cublas_3x"], row["methods"]["torch_compile"]
    row["floor_ms"] = flops / (sms * FLOP_PER_SM_CLOCK * cublas["sm_mhz"] * 1e6) * 1e3
    row["floor_vs_compile"] = row["floor_ms"] / compiled["ms"]
    row["cublas_vs_compile"] = cublas["ms"] / compiled["ms"]
    if square_mhz:
        row["floor_vs_compile_square_clock"] = (flops / (sms * FLOP_PER_SM_CLOCK * square_mhz * 1e6) * 1e3
                                                / compiled["ms"])
    return row


def measure(seconds: float) -> tuple[list[dict], float | None, int, dict]:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    compiled = build_method("torch_compile")
    sampler = Sampler()
    rows = []
    try:
        time.sleep(1.0)
        idle = [s[1] for s in sampler.samples]
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b, o = torch.randn_like(a), torch.empty_like(a)
        ms, t0, t1 = sustained(lambda: torch.mm(a, b, out=o), seconds)
        square = dict(ms=ms, tflops=2 * 8192 ** 3 / ms / 1e9, **window_stats(sampler.between(t0, t1)))
        square["utilisation"] = square["tflops"] * 1e12 / (sms * FLOP_PER_SM_CLOCK * square["sm_mhz"] * 1e6)
        print("square", square, flush=True)
        del a, b, o
        for n, d, v in SHAPES:
            e, c, t = make_inputs(n, d, v, kind="random", seed=0)
            eg, cg = e.clone().requires_grad_(), c.clone().requires_grad_()
            fns = {"cublas_3x": CublasProducts(e, c).three,
                   "torch_compile": lambda: torch.autograd.grad(compiled(eg, cg, t), (eg, cg)),
                   "fast": lambda: torch.autograd.grad(linear_cross_entropy(eg, cg, t), (eg, cg)),
                   "memory_first": lambda: torch.autograd.grad(
                       linear_cross_entropy(eg, cg, t, grad_in_forward=False), (eg, cg))}
            row = dict(shape=[n, d, v], methods={})
            for name in METHODS:
                ms, t0, t1 = sustained(fns[name], seconds)
                row["methods"][name] = dict(ms=ms, **window_stats(sampler.between(t0, t1)))
                print((n, d, v), name, row["methods"][name], flush=True)
            row = summarise(row, sms, square["sm_mhz"])
            rows.append(row)
            del eg, cg, e, c, t, fns
            torch.cuda.empty_cache()
    finally:
        sampler.stop()
    return rows, (statistics.mean(idle) if idle else None), sms, square


def markdown(doc: dict) -> str:
    lines = [f"# power_bound: {doc['machine'].get('device_name', 'cpu')}, {doc['date']}", "", doc["about"], "",
             describe(doc["machine"]), "", f"Idle SM clock {doc['idle_mhz'] or float('nan'):.0f} MHz; {doc['sms']} SMs.", "", _square_text(doc), "",
             "| N×D×V | method | ms | SM MHz | W | throttle | 3 products' TFLOP/s | × peak at that clock |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        for name, m in r["methods"].items():
            lines.append(f"| {'×'.join(map(str, r['shape']))} | {name} | {m['ms']:.2f} | {m['sm_mhz']:.0f} | "
                         f"{m['watts']:.0f} | {m['throttle_mask']} | {m['tflops_3_products']:.0f} | "
                         f"{m['utilisation']:.3f} |")
    lines += ["", "| N×D×V | 3 cuBLAS / compile | 3 products at 100% of peak, cuBLAS's clock: ms | that / compile | "
              "that at the square product's clock / compile |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        sq = r.get("floor_vs_compile_square_clock")
        lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['cublas_vs_compile']:.3f} | {r['floor_ms']:.2f} | "
                     f"{r['floor_vs_compile']:.3f} | {'–' if sq is None else f'{sq:.3f}'} |")
    return "\n".join(lines) + "\n"


def _square_text(doc: dict) -> str:
    sq = doc.get("square_product")
    if not sq:
        return "No square product measured."
    return (f"An 8192³ bf16 product alone: {sq['ms']:.3f} ms, {sq['tflops']:.0f} TFLOP/s at {sq['sm_mhz']:.0f} MHz "
            f"and {sq['watts']:.0f} W (throttle {sq['throttle_mask']}), {sq['utilisation']:.3f} of the peak at "
            "that clock.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed window per method (after half as long warm)")
    args = ap.parse_args()
    rows, idle, sms, square = measure(args.seconds)
    doc = dict(kind="experiment", name="power_bound", date=today(), machine=machine_info(), rows=rows,
               idle_mhz=idle, sms=sms, seconds=args.seconds, square_product=square,
               about=("bf16 forward + backward (grads of e and c), mean loss, random inputs. Each method runs "
                      f"alone for {args.seconds:g} s after a warm-up of half that; nvidia-smi samples the SM clock, "
                      "power and throttle reasons (0x4: the power cap) every 100 ms. 'fast' and 'memory_first' "
                      "are the library's two modes with its defaults. '× peak at that clock': the three "
                      "products' FLOPs (6·N·D·V) over the time, over SMs · 4096 FLOP · the method's mean clock."))
    write_experiment(args.out, doc, markdown(doc))


if __name__ == "__main__":
    main()
