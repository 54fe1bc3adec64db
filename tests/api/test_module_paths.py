"""The former module paths still import: the same module objects where one module moved whole, the
same names where one was split over several modules."""

from __future__ import annotations

import importlib

import pytest

# former path -> the module it is now (the same object)
MOVED = {
    "vocab_parallel_cce.backend": "vocab_parallel_cce.backends.protocol",
    "vocab_parallel_cce.torch_backend": "vocab_parallel_cce.backends.torch_backend",
    "vocab_parallel_cce.triton_backend": "vocab_parallel_cce.backends.triton",
    "vocab_parallel_cce.triton_gemm": "vocab_parallel_cce.backends.triton.logits_bf16",
    "vocab_parallel_cce.megatron": "vocab_parallel_cce.integrations.megatron",
    "vocab_parallel_cce.transformers": "vocab_parallel_cce.integrations.transformers",
    "vocab_parallel_cce.compat": "vocab_parallel_cce.integrations.compat",
}
# former path split over several modules -> names it still gives
SPLIT = {
    "vocab_parallel_cce.autograd": ("ShardStats", "LossWithHeldLogits", "LossWithGradInForward", "_AccumulateGradInto"),
    "vocab_parallel_cce.triton_kernels": ("forward_kernel", "logit_grad_kernel", "sparse_matmul_kernel",
                                          "row_stats_kernel", "row_logit_grad_kernel", "scale_kernel", "_tanh",
                                          "_grouped_tile"),
    "vocab_parallel_cce.api": ("linear_cross_entropy", "LinearCrossEntropy", "VocabParallelOptions",
                               "CrossEntropyOutput", "LinearCrossEntropyImpl", "clear_layout_cache"),
}


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_a_moved_module_keeps_its_former_path(old, new):
    """The former path is the module itself, so attributes set through it (monkeypatching) are
    the ones the library reads."""
    assert importlib.import_module(old) is importlib.import_module(new)


@pytest.mark.parametrize("old", sorted(SPLIT))
def test_a_split_module_keeps_its_names(old):
    module = importlib.import_module(old)
    missing = [name for name in SPLIT[old] if not hasattr(module, name)]
    assert not missing, missing

