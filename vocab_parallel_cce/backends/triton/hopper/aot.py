"""Compile the Gluon kernels for sm_90a on a machine without a GPU (and the `tl` kernels whose
gathered loads of rows of C the interpreter does not check: `_portable_fast_stats`, `_merge`).

`python -m vocab_parallel_cce.backends.triton.hopper.aot` prints one JSON line per kernel
configuration (name, shared memory, registers, local memory, whether wgmma and setmaxnreg are
there). Run it in a process of its own: under TRITON_INTERPRET=1 Triton's own library functions
are interpreted, and Gluon cannot compile them.

`compile_all()` swaps in a driver whose target is Hopper (compute capability 9.0) for the duration
of the call and compiles every kernel configuration the library launches, with stand-in tensors;
an API change in a newer Triton then fails here (the test suite runs it on CPU), not in a user's
job. Returns one `Built` per configuration: its name, shared memory, registers and the compiled
kernel (cubin, PTX and the IR in `.asm`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

import triton

HOPPER = ("cuda", 90, 32)


@dataclass
class Built:
    name: str
    shared_bytes: int
    kernel: Any


class _Dtype:
    """Stands in for a torch dtype (Triton canonicalises dtypes through str())."""

    def __init__(self, name: str):
        self.name = name
        self.is_floating_point = name.startswith(("float", "bfloat"))

    def __str__(self) -> str:
        return "torch." + self.name


def stand_in(dtype: str, shape) -> Any:
    """A tensor stand-in of `shape` for compilation (no memory)."""
    from triton.runtime.jit import MockTensor

    return MockTensor(_Dtype(dtype), list(shape))


@contextlib.contextmanager
def hopper_target() -> Iterator[None]:
    """Compile for sm_90a whatever the machine has (no kernel may run meanwhile); a fresh cache."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class _CompileOnly(DriverBase):
        def __init__(self):
            pass

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_current_target(self):
            return GPUTarget(*HOPPER)

        def get_active_torch_device(self):
            raise NotImplementedError

        def get_benchmarker(self):
            raise NotImplementedError

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    saved_driver = triton.runtime.driver._active
    saved_cache = os.environ.get("TRITON_CACHE_DIR")
    saved_interp = os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="vpcce_sm90a_")
    triton.runtime.driver.set_active(_CompileOnly())
    try:
        yield
    finally:
        triton.runtime.driver._active = saved_driver  # (reset_active would look for a GPU)
        if saved_cache is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved_cache
        if saved_interp is not None:
            os.environ["TRITON_INTERPRET"] = saved_interp


def compile_all(n: int = 8192, d: int = 4096, v: int = 128256) -> list[Built]:
    """Every Gluon kernel configuration, compiled for sm_90a with stand-ins of (N, D, V)."""
    from . import logits as L

    built = []
    with hopper_target():
        e, c = stand_in("bfloat16", (n, d)), stand_in("bfloat16", (v, d))
        z = stand_in("bfloat16", (n, v))
        vec, t = stand_in("float32", (5, n)), stand_in("int64", (n,))
        # (mode, name, need_sum, need_pz with a temperature): the loss's and linear_log_probs'
        variants = [(L.MODE_LOGITS.value, "logits", False, False), (L.MODE_LOGITS.value, "logits", True, False),
                    (L.MODE_STATS.value, "stats", False, False), (L.MODE_STATS.value, "stats", True, False),
                    (L.MODE_STATS.value, "stats", False, True), (L.MODE_GRAD.value, "grad", False, False),
                    (L.MODE_GRAD.value, "grad", False, True)]
        # ... and the statistics modes with one accumulator slice (Tuning(stats_k_slice=0))
        variants += [(L.MODE_LOGITS.value, "logits+one-slice", False, False),
                     (L.MODE_STATS.value, "stats+one-slice", False, True)]
        for mode, name, need_sum, entropy in variants:
            k = L.launch(e, c, v, mode, out=z, partials=vec, need_sum=need_sum, need_pz=entropy,
                         inv_temp=0.5 if entropy else 1.0, lse=vec, coef=vec, t=t,
                         k_slice=0 if name.endswith("+one-slice") else None, warmup=True)
            built.append(Built(f"{name}{'+sum' if need_sum else ''}{'+entropy' if entropy else ''}",
                               k.metadata.shared, k))
        built.append(_portable_fast_stats(e, c, z, vec, t, n, d, v))
        built.append(_merge(e, c, vec, t, n, d, v))
    return built


def _portable_fast_stats(e, c, z, vec, t, n: int, d: int, v: int) -> Built:
    """The portable fast mode's statistics pass with its float32 logits (TARGET_DOT): a `tl` kernel,
    but its gathered [rows, slots, D] loads are checked only by a real compilation."""
    from .. import logits_bf16 as B

    k = B.stored_logits_stats_kernel.warmup(
        z, z, t, vec, n, v, v, 1.0, vec, HAS_BIAS=False, HAS_SOFTCAP=False, NEED_SUM=True, WRITE_BACK=False,
        BLOCK_R=B.STATS_ROWS, BLOCK_C=B.STATS_COLS, num_warps=B.STATS_WARPS, CE=vec, ignore_t=-100, lo_t=0, hi_t=v,
        NEED_CE=True, E=e, C=c, D=d, stride_e=d, stride_c=d, GLSE_ROW=3, TARGET_DOT=True, BLOCK_D=B.FLOAT32_BLOCK_D,
        TOP_K=B.FLOAT32_TOP_K, SLOTS=B.float32_slots(), grid=(n,))
    return Built("portable-fast-stats+float32", k.metadata.shared, k)


def _merge(e, c, vec, t, n: int, d: int, v: int) -> Built:
    """The merge of the statistics kernel's partials (`partials.merge`), with its float32 x = e·c_t."""
    from .partials import merge_partials_kernel

    part = stand_in("float32", (3, 64, n))
    k = merge_partials_kernel.warmup(part, 64, n, e, c, t, vec, d, v, d, d, 1.0, HAS_ROUNDED=True, NEED_SUM=False,
                                     NEED_PZ=False, BLOCK_R=16, BLOCK_T=64, BLOCK_D=128, num_warps=4, grid=(n // 16,))
    return Built("merge-partials", k.metadata.shared, k)


def _resources(cubin: bytes) -> dict:
    """REG / STACK / LOCAL of a cubin by the cuobjdump Triton ships ({} where there is none)."""
    import re
    import shutil
    import subprocess

    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                                     "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return {k.lower(): int(m.group(1)) for k in ("REG", "STACK", "LOCAL") if (m := re.search(k + r":(\d+)", text))}


def main() -> None:
    import json
    import re

    for b in compile_all():
        ptx = b.kernel.asm["ptx"]
        print(json.dumps(dict(name=b.name, shared=b.shared_bytes, **_resources(b.kernel.asm["cubin"]),
                              wgmma="wgmma.mma_async" in ptx, triton=triton.__version__,
                              setmaxnreg=sorted({int(r) for r in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)",
                                                                         ptx)}))), flush=True)


if __name__ == "__main__":
    main()
