"""Planning: the path a call takes is decided once, from the options, the backend, autograd and the
fast mode's chunk budget (which counts the bytes each backend stores per logit), and recorded in its
Plan: held logits, token chunks or the memory-first recompute. The tests that run impl="triton" use
the Triton interpreter on CPU."""

from __future__ import annotations

import pytest
import torch

from support import interpreter
from support.fast_mode import CountFast, fast_path_of
from support.inputs import weighted_inputs
from vocab_parallel_cce import Tuning, linear_cross_entropy
from vocab_parallel_cce.plan import Plan
from vocab_parallel_cce.planning import plan_cross_entropy


CHUNKS = Tuning(fast_chunk_tokens=7)  # several token chunks, the last one partial
FLAGS = dict(return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True)


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


@interpreter.required()
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


@interpreter.required()
def test_auto_mode_is_the_fast_one_where_it_is_exact(seed, monkeypatch):
    """The default is grad_in_forward="auto": the fast mode with grads on
    the triton backend — the held-logits path when the logits fit one chunk, for every reduction
    ("none" with per-token upstream gradients too), the token-chunked path beyond that for
    "mean"/"sum" only (per-token upstream gradients then take the memory-first mode) — and the
    memory-first mode for return_lse, the torch backend, while torch.compile traces, and without autograd."""
    e, c, t = _inputs(12, 16, 40, torch.float32)

    def mode(**kw):
        out = linear_cross_entropy(e, c, t, **{"impl": "triton", "grad_in_forward": "auto", **kw})
        return fast_path_of(out[0] if isinstance(out, tuple) else out)

    tiny = Tuning(fast_logits_bytes=64 * 40 * 4)  # chunks of 128 tokens (the least): 12 fit, 300 do not
    assert fast_path_of(linear_cross_entropy(e, c, t, impl="triton")) == "held"  # the default is "auto"
    assert mode() == "held" and mode(reduction="sum") == "held" and mode(reduction="none") == "held"
    assert mode(tuning=tiny) == "held" and mode(tuning=Tuning(fast_chunk_tokens=5)) == "chunked"
    assert mode(tuning=Tuning(fast_chunk_tokens=5), reduction="none") == "memory-first"
    big_e = torch.randn(300, 16, requires_grad=True)
    big_t = torch.randint(0, 40, (300,))
    for red, expect in (("mean", "chunked"), ("none", "memory-first")):
        out = linear_cross_entropy(big_e, c, big_t, impl="triton", grad_in_forward="auto", reduction=red, tuning=tiny)
        assert fast_path_of(out) == expect, red
    assert mode(return_lse=True) == "memory-first"
    assert mode(impl="torch") == "memory-first"
    assert mode(grad_in_forward=False) == "memory-first"
    with torch.no_grad():
        assert mode() == "no autograd"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert mode() == "memory-first"
    with pytest.raises(TypeError, match="^grad_in_forward: expected True, False or 'auto'"):
        linear_cross_entropy(e, c, t, impl="triton", grad_in_forward="yes")


@interpreter.required()
def test_auto_selects_the_fast_mode_for_these_options(seed, monkeypatch):
    fast = CountFast(monkeypatch)
    leaves, t, w = weighted_inputs(12, 16, 40, torch.float32)
    e, c = leaves[:2]
    flags = {k: v for k, v in FLAGS.items() if k != "return_z_loss"}
    cases = ({"return_token_accuracy": True}, {"return_predicted_tokens": True},
             {"class_weights": w.float(), "label_smoothing": 0.1},
             {"class_weights": w.float(), "z_loss": 1e-2}, {**flags, "class_weights": w.float(), "z_loss": 1e-2,
                                                          "label_smoothing": 0.1, "reduction": "sum"})
    for kw in cases:
        for tuning, path in ((None, "held"), (CHUNKS, "chunked")):
            fast.clear()
            linear_cross_entropy(e, c, t, impl="triton", grad_in_forward="auto", tuning=tuning, **kw)
            assert fast.paths == [path], kw
    # return_z_loss (an output with a gradient of its own) and "none" (per-token upstream
    # gradients): the fast mode only where it holds the logits (one chunk), else memory-first
    for kw in ({"return_z_loss": True, "z_loss": 1e-2}, {"reduction": "none", **FLAGS}):
        for tuning, paths in ((None, ["held"]), (CHUNKS, [])):
            fast.clear()
            out = linear_cross_entropy(e, c, t, impl="triton", grad_in_forward="auto", tuning=tuning, **kw)
            assert fast.paths == paths, (kw, tuning)
            if "z_loss" in kw:
                assert torch.isfinite(torch.autograd.grad(out.z_loss, e)[0]).all()
