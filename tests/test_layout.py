"""The library's layout: the path a call takes is decided once and recorded in its Plan, the fast
mode's chunk budget counts the bytes each backend stores per logit, and the former module paths
still import (the same module objects where one module moved whole)."""

from __future__ import annotations

import importlib

import pytest
import torch

from support.fast_mode import fast_path_of
from vocab_parallel_cce import Tuning, linear_cross_entropy
from vocab_parallel_cce.backends import torch_backend
from vocab_parallel_cce.plan import Plan
from vocab_parallel_cce.planning import plan_cross_entropy

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


def _inputs(n, d, v, dtype, requires_grad=True):
    g = torch.Generator().manual_seed(n * 1000 + v)
    e = torch.randn(n, d, generator=g).to(dtype).requires_grad_(requires_grad)
    c = torch.randn(v, d, generator=g).to(dtype).requires_grad_(requires_grad)
    return e, c, torch.randint(0, v, (n,), generator=g)


def test_the_plan_records_the_path():
    """planning decides the path once: held logits where they fit one chunk, token chunks (with
    their size) where they do not, the memory-first recompute when asked or without autograd."""
    e, c, t = _inputs(20, 8, 16, torch.float32)
    plan, _ = plan_cross_entropy(e, c, t, impl="torch", grad_in_forward=True, tuning=Tuning())
    assert (plan.path, plan.chunk_tokens) == ("held", None)
    plan, _ = plan_cross_entropy(e, c, t, impl="torch", grad_in_forward=True, tuning=Tuning(fast_chunk_tokens=7))
    assert (plan.path, plan.chunk_tokens) == ("chunked", 7)
    plan, _ = plan_cross_entropy(e, c, t, impl="torch", grad_in_forward=False)
    assert (plan.path, plan.chunk_tokens) == ("recompute", None)
    with torch.no_grad():
        plan, _ = plan_cross_entropy(e, c, t, impl="torch", grad_in_forward=True)
    assert plan.path == "recompute"


def test_a_plan_checks_its_path():
    e, c, t = _inputs(4, 8, 16, torch.float32)
    plan, _ = plan_cross_entropy(e, c, t, impl="torch", grad_in_forward=True)
    fields = {**plan.__dict__}
    with pytest.raises(ValueError, match=r"^Plan.path: "):
        Plan(**{**fields, "path": "fast"})
    with pytest.raises(ValueError, match=r"^Plan.chunk_tokens: "):
        Plan(**{**fields, "path": "chunked", "chunk_tokens": None})
    with pytest.raises(ValueError, match=r"^Plan.chunk_tokens: "):
        Plan(**{**fields, "path": "held", "chunk_tokens": 5})


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("dtype,exact", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False),
                                         (torch.float32, False)])
def test_logits_dtype_is_what_logits_and_stats_stores(name, dtype, exact, monkeypatch):
    """Each backend's storage rule (`logits_dtype`, the contract's) is the dtype of the Z its
    logits_and_stats returns."""
    if name == "torch":
        backend = torch_backend
    else:
        from vocab_parallel_cce.backends import triton as backend
    e, c, t = _inputs(5, 16, 16, dtype, requires_grad=False)
    plan, _ = plan_cross_entropy(e, c, t, impl=name, grad_in_forward=True)
    plan = Plan(**{**plan.__dict__, "exact": exact, "backend": backend, "path": "held"})
    z = backend.logits_and_stats(e, c, None, t, plan)[0]
    assert z.dtype == backend.logits_dtype(dtype, exact)


def test_the_chunk_budget_counts_the_bytes_the_torch_backend_stores():
    """bf16 inputs on the torch backend store float32 logits: where their logits fit
    `fast_logits_bytes` in 2 bytes each but not in 4, the fast mode takes token chunks (it held
    them, counting 2 bytes, over budget); the Triton backend's bf16 logits are held."""
    n, d, v = 300, 8, 8
    tuning = Tuning(fast_logits_bytes=n * v * 2)
    e, c, t = _inputs(n, d, v, torch.bfloat16)
    loss = linear_cross_entropy(e, c, t, impl="torch", grad_in_forward=True, tuning=tuning)
    assert fast_path_of(loss) == "chunked"
    loss.backward()
    e, c, t = _inputs(n, d, v, torch.bfloat16)
    loss = linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=True, tuning=tuning)
    assert fast_path_of(loss) == "held"
    loss.backward()
