"""The adaptive dC tile skipping of the memory-first backward (filter_eps "auto"): whether
skipping pays, judged from earlier backwards' measurements."""

from __future__ import annotations

import torch

from ...tuning import Tuning
from .common import counters


class TileSkipPolicy:
    """Adaptive dC tile skipping (filter_eps "auto"): skip when it pays, judged from the fraction
    of kept 128×128 tiles measured in an earlier backward with the same classifier shape (device,
    vocabulary rows, D; not the token count, which varies from batch to batch).

    Skipping pays on trained-like logits (few tiles kept) and loses on dense ones (a nearly
    untrained model), where the block-sparse kernel is slower than cuBLAS. The fraction travels
    to the host through a pinned buffer and is read once its CUDA event has completed, so no
    call ever waits for the GPU. The first call of a classifier shape runs dense and measures;
    while dense, the (cheap but not free) measurement is repeated every
    `tuning.skip_remeasure_every` calls. Skips while the fraction is below
    `tuning.skip_keep_threshold` (H200: faster at 34% kept at (8192, 4096, 128256), slower at 54%).
    """

    def __init__(self):
        self.state: dict = {}  # key → {"fraction", "pinned", "event", "since"}

    def reset(self) -> None:
        """Forget every measurement: the next backward of each classifier shape runs dense."""
        self.state.clear()

    def decide(self, key, tuning: Tuning) -> tuple[bool, bool]:
        """(skip, measure) for the next backward of `key`."""
        st = self.state.get(key)
        if st is None:
            return False, True
        capturing = st["event"] is not None and torch.cuda.is_current_stream_capturing()
        if st["event"] is not None and not capturing and st["event"].query():  # no query while captured
            st["fraction"], st["event"] = float(st["pinned"]), None
        st["since"] += 1
        skip = st["fraction"] is not None and st["fraction"] < tuning.skip_keep_threshold
        return skip, skip or st["since"] >= tuning.skip_remeasure_every

    def record(self, key, kept: torch.Tensor, total: int) -> None:
        """kept: device scalar, number of kept tiles out of `total`."""
        counters["skip_measurements"] += 1
        st = self.state.setdefault(key, {"fraction": None, "pinned": None, "event": None, "since": 0})
        if kept.device.type != "cuda":
            st["fraction"], st["since"] = float(kept) / max(total, 1), 0
            return
        if st["event"] is not None or torch.cuda.is_current_stream_capturing():
            return  # the previous measurement is still in flight (or we are being captured)
        if st["pinned"] is None:
            st["pinned"] = torch.empty((), dtype=torch.float32, pin_memory=True)
        st["pinned"].copy_(kept.float() / max(total, 1), non_blocking=True)
        st["event"] = torch.cuda.Event()
        st["event"].record()
        st["since"] = 0


skip_policy = TileSkipPolicy()  # process-wide: measurements carry over from call to call
