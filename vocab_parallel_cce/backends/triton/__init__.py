"""The Triton backend (contract: backends/protocol.py); this package is what `Plan.backend` holds.

- recompute.py: the memory-first path's kernels and launchers (`forward_stats`, `backward`),
  registered as torch custom ops;
- stored_logits.py: the fast mode's product and passes over a stored chunk of logits
  (`logits_and_stats`, `grad_from_logits`, the plain cross-entropy's fused route,
  `scale_in_place`), with the passes themselves in logits_bf16.py and logits_fp32.py;
- products.py: TMA descriptors, the block-sparse Triton product, the float32-output product;
- skip_policy.py: the adaptive dC tile skipping (filter_eps "auto").

`counters` counts the paths taken (TMA or pointer loads, where G lived, block-sparse dC products,
skip measurements, bf16 stored logits, the Hopper kernels, dC added straight into a target), for
tests and benchmarks; `counters.clear()` resets it.
"""

from .common import counters
from .products import product_fp32
from .recompute import backward, forward_stats
from .skip_policy import TileSkipPolicy, skip_policy
from .stored_logits import (
    fuses_plain,
    grad_from_logits,
    grad_from_logits_plain,
    logits_and_stats,
    logits_dtype,
    plain_ce,
    scale_in_place,
)

__all__ = [
    "forward_stats", "backward", "logits_dtype", "logits_and_stats", "grad_from_logits", "fuses_plain", "plain_ce",
    "grad_from_logits_plain", "product_fp32", "scale_in_place", "counters", "skip_policy", "TileSkipPolicy",
]  # fmt: skip
