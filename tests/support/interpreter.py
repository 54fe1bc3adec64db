"""Test set-up for running the Triton kernels on CPU under TRITON_INTERPRET=1.

tests/conftest.py turns the interpreter on for machines without a GPU, before any test module can
import the kernels; on a GPU machine set TRITON_INTERPRET=1 yourself for these tests.
`patch_bf16_dot()` mends an interpreter gap (not a kernel change): the interpreter keeps bfloat16
values as their raw uint16 bits and hands those bits to np.matmul in `tl.dot`; the patch decodes
bfloat16 operands to float32 first, which is what the GPU's tensor cores compute with.
"""


def on_cpu_only(patch_dot: bool = True) -> None:
    """At the top of a test module that runs the kernels under the interpreter: skip the module on
    a GPU machine unless TRITON_INTERPRET=1 was set for this pytest process (conftest.py turns it
    on only where there is no GPU), then `patch_bf16_dot()` unless told not to."""
    import os

    import pytest
    import torch

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("on a GPU machine run these with TRITON_INTERPRET=1 in their own pytest process",
                    allow_module_level=True)
    if patch_dot:
        patch_bf16_dot()


def required():
    """on_cpu_only's rule as a mark, for a single test that runs the kernels on CPU tensors in a
    module that does not need the interpreter otherwise: skipped on a GPU machine unless
    TRITON_INTERPRET=1 was set for this pytest process."""
    import os

    import pytest
    import torch

    return pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                              reason="on a GPU machine run this with TRITON_INTERPRET=1 in its own pytest process")


def patch_bf16_dot() -> None:
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_vpcce_bf16_patched", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            def decode(h):
                if h.dtype.scalar != tl.bfloat16:
                    return h.data.astype(np.float32)
                return interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)

            out = np.matmul(decode(a), decode(b), dtype=np.float32).astype(d.data.dtype) + d.data
            return interpreter.TensorHandle(out, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    builder._vpcce_bf16_patched = True


def kernel_bf16(x):
    """float32 → bfloat16 as a kernel's `.to(tl.bfloat16)` does under the interpreter: it truncates
    the mantissa (no rounding mode given), where the GPU rounds to nearest even."""
    import torch

    return (x.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
