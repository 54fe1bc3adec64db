"""Timing on the GPU (CUDA events; perf_counter on CPU) and peak memory.

- `time_calls`: median ms and peak added memory of repeated calls of one function (the loss suite);
- `timed_block`: ms per call of a block of back-to-back calls, and its peak added memory;
- `interleaved_rounds`: the race's timing: every round times a block of each function, in an order
  shuffled every round, so that a GPU warming up or slowing down (power, temperature) spreads over
  every method alike, after a settling load (`settling_load`) that starts every block in the same
  state; `paired_ratio` compares two methods round by round;
- `CublasProducts`: the three logits-shaped products of a forward+backward (and a fourth, the
  recompute), the reference rows of the loss and race suites;
- `measure_matmul_peak`: TFLOP/s of an 8192³ product, the peak the % columns refer to.

Peak added memory = max_memory_allocated during the calls − memory allocated before them: the
call's temporaries and outputs (e.g. gradients), not its inputs. NaN on CPU.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

from inputs import generator


def cuda_active() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def sync() -> None:
    if cuda_active():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if cuda_active():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def time_calls(fn: Callable[[], object], warmup: int = 3, rep: int = 10, max_seconds: float | None = None):
    """(median ms, peak added MiB) of `rep` timed calls of `fn()` after `warmup` untimed ones.

    With `max_seconds`, the number of timed calls is cut (to ≥ 3) so they take about that long,
    judged from the last warm-up call (past any compilation).
    """
    cuda = cuda_active()
    per = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync()
        per = time.perf_counter() - t0
    if max_seconds is not None and per is not None:
        rep = max(3, min(rep, int(max_seconds / max(per, 1e-9))))
    if not cuda:
        times = []
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for i in range(rep):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), peak


def timed_block(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(ms per call, peak added MiB) of `calls` back-to-back calls, CUDA events around the block."""
    if not cuda_active():
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls, float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / calls, (torch.cuda.max_memory_allocated() - base) / 2**20


def interleaved_rounds(fns: dict[str, Callable[[], object]], rounds: int, block: int,
                       on_error: Callable[[str, BaseException], None] | None = None,
                       settle: Callable[[], object] | None = None, seed: int = 0) -> dict[str, dict]:
    """{name: {"round_ms": [ms per call or None, one per round], "peak_mb": max over blocks}}.

    Round r times a block of `block` calls of each function, in an order shuffled every round
    (`random.Random(seed + r)`), so no function always follows the same one: on a power-capped GPU
    a block runs faster after a light method than after a heavy one (measured: 8% after a slow,
    low-power peer), and a fixed cyclic order would make that one method's bias. `settle` (untimed,
    before every block) puts every block's start in the same state (`settling_load`).
    A function that raises is reported to `on_error` and left out of the later rounds (its earlier
    rounds are kept; the rounds it missed are None).
    """
    import random

    names = list(fns)
    out = {n: {"round_ms": [None] * rounds, "peak_mb": float("nan")} for n in names}
    failed: set[str] = set()
    for r in range(rounds):
        order = names[:]
        random.Random(seed + r).shuffle(order)
        for name in order:
            if name in failed:
                continue
            try:
                if settle is not None:
                    settle()
                ms, mb = timed_block(fns[name], block)
            except Exception as err:  # noqa: BLE001  (one method failing must not stop the race)
                failed.add(name)
                free_memory()
                if on_error is not None:
                    on_error(name, err)
                continue
            out[name]["round_ms"][r] = ms
            if mb == mb:  # not NaN
                prev = out[name]["peak_mb"]
                out[name]["peak_mb"] = mb if prev != prev else max(prev, mb)
    return out


def settling_load(ms: float, device="cuda") -> Callable[[], None] | None:
    """A callable that keeps the GPU busy with bf16 products for about `ms` milliseconds (calibrated
    once here), or None on CPU or for ms <= 0. Run before each timed block, it starts every block
    from the same loaded state, as a loss layer in training follows the model's products."""
    if ms <= 0 or not cuda_active():
        return None
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(a)
    torch.mm(a, a, out=out)
    per, _ = timed_block(lambda: torch.mm(a, a, out=out), 20)
    count = max(1, round(ms / max(per, 1e-3)))

    def load() -> None:
        for _ in range(count):
            torch.mm(a, a, out=out)

    return load


def median_ms(round_ms: list) -> float | None:
    xs = [x for x in round_ms if x is not None]
    return statistics.median(xs) if xs else None


def paired_ratio(a: list, b: list) -> float | None:
    """Median over the rounds both ran of a[r] / b[r] (both timed within the same minute)."""
    xs = [x / y for x, y in zip(a, b) if x is not None and y]
    return statistics.median(xs) if xs else None


class CublasProducts:
    """The products of a loss's forward+backward at (N, D, V), by torch.mm (cuBLAS on CUDA) into
    preallocated outputs: E·Cᵀ [N, V] (the logits), G·C [N, D] (dE), Gᵀ·E [V, D] (dC), with G a
    small random [N, V]. `three()` is the no-recompute floor of a loss; `four()` adds the second
    E·Cᵀ a recomputing (memory-first) method makes. Uses the given e, c (same data as the losses)."""

    def __init__(self, e: torch.Tensor, c: torch.Tensor, seed: int = 0):
        n, v = e.shape[0], c.shape[0]
        self.e, self.c = e.detach(), c.detach()
        g = generator(e.device, seed)
        self.g = torch.randn(n, v, device=e.device, dtype=e.dtype, generator=g).mul_(1e-3)  # no float32 copy
        self.z = torch.empty(n, v, device=e.device, dtype=e.dtype)
        self.de = torch.empty_like(self.e)
        self.dc = torch.empty_like(self.c)

    def logits(self):
        torch.mm(self.e, self.c.T, out=self.z)

    def grad_e(self):
        torch.mm(self.g, self.c, out=self.de)

    def grad_c(self):
        torch.mm(self.g.T, self.e, out=self.dc)

    def three(self):
        self.logits()
        self.grad_e()
        self.grad_c()

    def four(self):
        self.three()
        self.logits()

    def each_ms(self, warmup: int = 3, rep: int = 10, max_seconds: float | None = None) -> dict[str, float]:
        """Median ms of each product timed alone."""
        return {label: time_calls(fn, warmup, rep, max_seconds)[0]
                for label, fn in (("E@C.T [N,V]", self.logits), ("G@C [N,D]", self.grad_e),
                                  ("G.T@E [V,D]", self.grad_c))}


def measure_matmul_peak(device="cuda", n: int = 8192, dtype=torch.bfloat16, warmup: int = 5, rep: int = 10) -> float:
    """TFLOP/s of an n³ product (median of `rep` after `warmup`)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms, _ = time_calls(lambda: torch.mm(a, b, out=out), warmup=warmup, rep=rep)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12


def setup_device(name: str) -> torch.device:
    """The device of `--device` ('cuda', 'cuda:1', 'cpu'), CUDA initialised and TF32 off (float32
    products stay float32); SystemExit when CUDA is asked for and absent."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but no GPU is visible (use --device cpu for a smoke run)")
        torch.cuda.set_device(device.index or 0)
        torch.cuda.init()
        torch.backends.cuda.matmul.allow_tf32 = False
    return device
