"""Performance knobs of the two backends, in one place.

Nothing here changes what is computed beyond float32 rounding order: block shapes, chunk sizes,
load paths, the adaptive skip policy's thresholds. `Tuning.from_env()` is the only place in the
library that reads `VPCCE_*` environment variables (`linear_cross_entropy` calls it when no
`tuning=` is given); benchmarks and tests pass a `Tuning` explicitly
(`linear_cross_entropy(..., tuning=Tuning(...))`).

Block configs are tuples; `None` means "the dtype's default" (chosen in backends/triton/; under
TRITON_INTERPRET=1 small 16-wide blocks):
    forward_block, grad_block: (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages)
    matmul_block:              (BLOCK_M, BLOCK_NN, BLOCK_K, GROUP_M, num_warps, num_stages)
    torch_block:               (tokens, vocabulary rows) per block of the torch backend
"""

from __future__ import annotations

import ast
import functools
import os
from dataclasses import dataclass, fields, replace

BlockConfig = tuple[int, ...]


@dataclass(frozen=True)
class Tuning:
    forward_block: BlockConfig | None = None  # statistics kernel tile (recompute forward)
    grad_block: BlockConfig | None = None  # logit-gradient kernel tile = keep-flag granularity
    matmul_block: BlockConfig | None = None  # Triton (block-sparse) product tile
    forward_splits: int | None = None  # vocabulary splits of the forward grid (None: ~4 waves)
    use_tma: bool = True  # TMA tensor descriptors on Hopper+ (and the interpreter) where layouts allow
    g_inside_dc: bool = True  # backward: logit-gradient chunks live in dC's (by tokens: dE's) unwritten rows
    group_v: int = 12  # vocabulary tiles per group of the logit-gradient kernel's grid
    chunk_bytes: int | None = None  # backward workspace chunk (None: workspace_fraction of dE + dC, 8–512 MiB)
    workspace_fraction: float = 0.09  # backward memory beyond dE and dC, as a fraction of their size
    # narrowest workspace chunk (narrower is launch-bound); wider = fewer float32 dE read-modify-writes
    # for 2·N bytes per column more (DESIGN.md, the memory-first path)
    min_chunk_columns: int = 1024
    # memory-first backward with dc_accumulate_into: token chunks over the whole vocabulary (dE rows
    # complete per chunk, no float32 [N, D] accumulator) instead of vocabulary chunks; pays only
    # where the shard's rows V_r ≲ N (each chunk reads and writes the whole float32 target)
    dc_into_by_tokens: bool = False
    fast_chunk_tokens: int | None = None  # gradient-in-forward token chunk (None: from fast_logits_bytes)
    fast_logits_bytes: int = 4 << 30  # gradient-in-forward: largest logits chunk [n_c, V_r] held at once
    skip_keep_threshold: float = 0.4  # "auto" skipping: skip while kept-tile fraction is below it
    skip_remeasure_every: int = 8  # "auto" skipping: re-measure every k dense calls
    torch_block: BlockConfig | None = None  # torch backend block (None: 4096 rows, 2**22 elements)
    # Hopper (sm_90) Gluon kernels (backends/triton/hopper/): None = the memory-first mode where
    # tested (GPU, Triton release, options), True = the fast mode too and any Triton release with
    # Gluon, False = never
    use_gluon: bool | None = None
    # Gluon statistics kernels: columns of D per float32 accumulator slice (None: the kernels'
    # default, 2048; 0: one slice). The tensor cores' accumulation pulls every logit toward 0 in
    # proportion to the K one accumulator sums over; slices bound it (DESIGN.md, the Hopper kernels)
    stats_k_slice: int | None = None

    def __post_init__(self) -> None:
        k = self.stats_k_slice
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0 or k % 64):
            raise ValueError(f"Tuning.stats_k_slice: expected None, 0 or a positive multiple of 64 (the "
                             f"kernels' K block), got {k!r}")

    @classmethod
    def from_env(cls) -> "Tuning":
        """Defaults overridden by VPCCE_<FIELD> (upper case; tuples as comma-separated ints,
        booleans as 0/1). Read once per call by the API, never inside kernels' launchers."""
        kw = {}
        for name, default in _FIELD_DEFAULTS:
            raw = os.environ.get("VPCCE_" + name.upper())
            if raw is None or raw == "":
                continue
            if name.endswith("_block"):
                kw[name] = tuple(int(v) for v in raw.split(","))
            elif name == "use_gluon":  # 1 / 0 / auto
                kw[name] = None if raw == "auto" else raw not in ("0", "false", "False")
            elif isinstance(default, bool):
                kw[name] = raw not in ("0", "false", "False")
            elif isinstance(default, float):
                kw[name] = float(raw)
            else:
                kw[name] = int(raw)
        return cls(**kw)

    def with_(self, **changes) -> "Tuning":
        return replace(self, **changes)

    def grad_in_forward_chunk(self, n: int, v: int, element_size: int) -> int:
        """Tokens per chunk of the gradient-in-forward mode for n tokens and V_r = v rows of logits
        stored in `element_size` bytes: fast_chunk_tokens, else all n tokens when their logits fit
        in fast_logits_bytes (then dC is one product, written once, as the unfused layer would),
        else the most tokens (a multiple of 128) that fit (dC then accumulates in float32)."""
        if self.fast_chunk_tokens:
            return self.fast_chunk_tokens
        fit = self.fast_logits_bytes // max(1, v * element_size)
        return max(1, n) if fit >= n else max(128, fit // 128 * 128)

    def encode(self) -> str:
        """The fields as a Python literal (a dict): how a Tuning crosses the custom-op boundary,
        whose ops take scalars and strings only; `decode` inverts it. (repr, not json: torch.compile
        traces repr of constants without a graph break.)"""
        return repr({f.name: getattr(self, f.name) for f in fields(self)})

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def decode(text: str) -> "Tuning":
        return Tuning(**ast.literal_eval(text))


# (name, default) of every field, read once here: torch.compile (dynamo) traces a loop over this
# tuple, where `dataclasses.fields(cls)` inside from_env was a graph break (torch 2.13).
_FIELD_DEFAULTS = tuple((f.name, f.default) for f in fields(Tuning))
