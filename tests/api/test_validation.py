"""Bad inputs raise ValueError/TypeError whose message names the offending argument."""

from __future__ import annotations

import pytest
import torch

from support import interpreter
from vocab_parallel_cce import VocabParallelOptions, linear_cross_entropy, linear_log_probs

N, D, V = 6, 8, 11


def inputs(dtype=torch.float32):
    e = torch.randn(N, D, dtype=dtype)
    c = torch.randn(V, D, dtype=dtype)
    t = torch.randint(0, V, (N,))
    return e, c, t


def call(**overrides):
    e, c, t = inputs()
    kw = dict(e=e, c=c, targets=t, impl="torch")
    kw.update(overrides)
    return linear_cross_entropy(**kw)


def test_valid_call_works():
    assert torch.isfinite(call())


@pytest.mark.parametrize(
    "overrides,exc,match",
    [
        # shapes
        ({"c": torch.randn(V, D + 1)}, ValueError, r"^c: hidden size"),
        ({"c": torch.randn(V, D, 1)}, ValueError, r"^c: expected a 2-D"),
        ({"c": torch.randn(V * D)}, ValueError, r"^c: expected a 2-D"),
        ({"c": torch.randn(0, D)}, ValueError, r"^c: .*no rows"),
        ({"e": torch.tensor(1.0)}, ValueError, r"^e: "),
        ({"targets": torch.randint(0, V, (N + 1,))}, ValueError, r"^targets: expected shape"),
        ({"targets": torch.randint(0, V, (N, 1))}, ValueError, r"^targets: expected shape"),
        ({"bias": torch.randn(V + 1)}, ValueError, r"^bias: expected shape"),
        ({"bias": torch.randn(1, V)}, ValueError, r"^bias: expected shape"),
        # types
        ({"targets": torch.zeros(N)}, TypeError, r"^targets: .*int32 or int64"),
        ({"targets": torch.zeros(N, dtype=torch.int16)}, TypeError, r"^targets: "),
        ({"targets": [0] * N}, TypeError, r"^targets: "),
        ({"e": torch.ones(N, D, dtype=torch.int64)}, TypeError, r"^e: .*floating"),
        ({"e": [[0.0] * D] * N}, TypeError, r"^e: .*torch.Tensor"),
        ({"c": torch.ones(V, D, dtype=torch.int32)}, TypeError, r"^c: .*floating"),
        ({"bias": torch.ones(V, dtype=torch.int64)}, TypeError, r"^bias: "),
        ({"c": torch.randn(V, D, dtype=torch.float64)}, TypeError, r"^c/bias: dtype"),
        ({"c": torch.randn(V, D, dtype=torch.bfloat16)}, TypeError, r"^c/bias: dtype"),
        ({"bias": torch.randn(V, dtype=torch.float16)}, TypeError, r"^c/bias: dtype"),
        # devices
        ({"c": torch.randn(V, D, device="meta")}, ValueError, r"^c: is on meta"),
        ({"targets": torch.zeros(N, dtype=torch.long, device="meta")}, ValueError, r"^targets: is on meta"),
        ({"bias": torch.randn(V, device="meta")}, ValueError, r"^bias: is on meta"),
        # options
        ({"reduction": "avg"}, ValueError, r"^reduction: "),
        ({"reduction": None}, ValueError, r"^reduction: "),
        ({"impl": "cuda"}, ValueError, r"^impl: expected one of"),
        ({"softcap": 0}, ValueError, r"^softcap: "),
        ({"softcap": -1.0}, ValueError, r"^softcap: "),
        ({"softcap": "30"}, ValueError, r"^softcap: "),
        ({"label_smoothing": -0.1}, ValueError, r"^label_smoothing: "),
        ({"label_smoothing": 1.0}, ValueError, r"^label_smoothing: "),
        ({"label_smoothing": 2}, ValueError, r"^label_smoothing: "),
        ({"z_loss": -1e-4}, ValueError, r"^z_loss: "),
        ({"filter_eps": -1.0}, ValueError, r"^filter_eps: "),
        ({"filter_eps": "high"}, ValueError, r"^filter_eps: "),
        ({"shift": N}, ValueError, r"^shift: "),
        ({"shift": N + 3}, ValueError, r"^shift: "),
        ({"shift": -1}, ValueError, r"^shift: "),
        ({"shift": 1.5}, TypeError, r"^shift: "),
        # vocabulary layout without a group
        ({"vocab_start": 3}, ValueError, r"^vocab_start: "),
        ({"vocab_size": 0}, ValueError, r"^vocab_size: "),
        ({"vocab_size": V + 1}, ValueError, r"^vocab_size: "),
        ({"vocab_size": -2}, ValueError, r"^vocab_size: "),
        ({"vocab_size": 5.0}, ValueError, r"^vocab_size: "),
        ({"sequence_parallel": True}, ValueError, r"^sequence_parallel: "),
        ({"group": object()}, ValueError, r"^group: "),
        ({"vocab_parallel_options": VocabParallelOptions(0, V - 1)}, ValueError, r"^vocab_parallel_options: "),
        ({"vocab_parallel_options": VocabParallelOptions(0, V), "vocab_start": 0}, ValueError,
         r"^vocab_parallel_options: "),
    ],
    ids=lambda x: None,
)
def test_bad_input(overrides, exc, match):
    with pytest.raises(exc, match=match):
        call(**overrides)


def test_shift_on_3d_checks_sequence_dim():
    e = torch.randn(2, 4, D)
    c = torch.randn(V, D)
    t = torch.randint(0, V, (2, 4))
    assert torch.isfinite(linear_cross_entropy(e, c, t, shift=3, impl="torch"))
    with pytest.raises(ValueError, match=r"^shift: .*sequence length 4"):
        linear_cross_entropy(e, c, t, shift=4, impl="torch")


def test_vocab_start_zero_without_group_is_allowed():
    assert torch.isfinite(call(vocab_start=0))


@pytest.mark.exact
def test_triton_on_cpu_without_interpreter_falls_back_to_torch(monkeypatch):
    """Where Triton cannot run, a triton impl (or its Apple alias) runs the exact torch path and
    warns, naming the value given."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    e, c, t = inputs()
    expect = linear_cross_entropy(e, c, t, impl="torch")
    for impl in ("triton", "triton_exact", "cce", "cce_exact"):
        with pytest.warns(UserWarning, match=rf"^impl='{impl}': Triton needs a CUDA tensor.*impl='torch'"):
            loss = linear_cross_entropy(e, c, t, impl=impl)
        assert torch.equal(loss, expect), impl


@interpreter.required()
def test_bf16_under_an_interpreter_without_bf16_products_falls_back_to_torch(monkeypatch):
    """Where the interpreter multiplies bfloat16's raw bits in tl.dot, a bf16 triton call runs the
    exact torch path and warns, rather than return a wrong loss; float32 calls keep Triton."""
    from vocab_parallel_cce.backends.triton import common

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(common, "interpreter_computes_bf16_dot", lambda: False)
    e, c, t = (x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs())
    expect = linear_cross_entropy(e, c, t, impl="torch")
    with pytest.warns(UserWarning, match=r"^impl='triton': Triton runs bfloat16 products .*interpreter.*impl='torch'"):
        loss = linear_cross_entropy(e, c, t, impl="triton")
    assert torch.equal(loss, expect)
    e, c, t = inputs()
    common.counters.clear()
    linear_cross_entropy(e, c, t, impl="triton")
    assert sum(common.counters.values()) > 0  # float32 ran the Triton kernels


@interpreter.required()
def test_interpreter_bf16_product_probe(monkeypatch):
    """The probe tells an interpreter whose bf16 tl.dot multiplies raw uint16 bits from one that
    multiplies values (the test set-up's mended one)."""
    import numpy as np
    from triton.runtime import interpreter as triton_interpreter

    from vocab_parallel_cce.backends.triton.common import interpreter_computes_bf16_dot

    builder = triton_interpreter.InterpreterBuilder  # as it was, after the test
    monkeypatch.setattr(builder, "create_dot", builder.create_dot)
    monkeypatch.setattr(builder, "_vpcce_bf16_patched", getattr(builder, "_vpcce_bf16_patched", False), raising=False)
    interpreter.patch_bf16_dot()
    assert interpreter_computes_bf16_dot()

    def raw_bits_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        out = np.matmul(a.data.astype(np.float32), b.data.astype(np.float32)) + d.data
        return triton_interpreter.TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)

    monkeypatch.setattr(builder, "create_dot", raw_bits_dot)
    assert not interpreter_computes_bf16_dot()


def test_triton_rejects_float64(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    e, c, t = inputs(torch.float64)
    with pytest.raises(TypeError, match=r"impl='triton' supports float32"):
        linear_cross_entropy(e, c, t, impl="triton")


def test_triton_rejects_meta_device():
    e, c, t = (x.to("meta") for x in inputs())
    with pytest.raises(ValueError, match=r"impl='triton' does not support device type 'meta'"):
        linear_cross_entropy(e, c, t, impl="triton")


def test_dtype_mismatch_allowed_under_autocast():
    e, c, t = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(e, c.to(torch.bfloat16), t, impl="torch")
    assert torch.isfinite(loss)


def test_zero_hidden_size_names_e_and_c():
    """D = 0 (e [N, 0], c [V, 0]): one ValueError naming e/c before any work, from the loss and
    from linear_log_probs (they share the checks), not a reshape error from inside."""
    e, c, t = torch.randn(N, 0), torch.randn(V, 0), torch.randint(0, V, (N,))
    with pytest.raises(ValueError, match=r"^e/c: the hidden size D must be > 0, got e of shape \(6, 0\)"):
        linear_cross_entropy(e, c, t, impl="torch")
    with pytest.raises(ValueError, match=r"^e/c: the hidden size D must be > 0"):
        linear_log_probs(e, c, t, impl="torch")


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_meta_tensors_name_e(impl):
    """Tensors on the meta device hold no values: one ValueError naming e (not autocast's
    "unsupported scalarType" from inside), for the loss and linear_log_probs."""
    e, c, t = (x.to("meta") for x in inputs())
    with pytest.raises(ValueError, match=r"^e: is on the meta device"):
        linear_cross_entropy(e, c, t, impl=impl)
    with pytest.raises(ValueError, match=r"^e: is on the meta device"):
        linear_log_probs(e, c, t, impl=impl)


@pytest.mark.parametrize("value", [1.5, True, None, "-100", torch.tensor(-100.0)], ids=repr)
def test_ignore_index_must_be_an_int(value):
    """A non-integer ignore_index (a float, a bool, None, a string, a float tensor) is a TypeError
    naming it, for the loss and linear_log_probs; before, a float was taken silently."""
    with pytest.raises(TypeError, match=r"^ignore_index: expected an int"):
        call(ignore_index=value)
    e, c, t = inputs()
    with pytest.raises(TypeError, match=r"^ignore_index: expected an int"):
        linear_log_probs(e, c, t, ignore_index=value, impl="torch")


def test_ignore_index_takes_integer_likes():
    """Integer-likes (a numpy integer, a 0-d integer tensor) stand for their int."""
    np = pytest.importorskip("numpy")
    e, c, t = inputs()
    t[::2] = 3
    want = linear_cross_entropy(e, c, t, ignore_index=3, impl="torch")
    for value in (np.int64(3), np.int32(3), torch.tensor(3)):
        assert torch.equal(linear_cross_entropy(e, c, t, ignore_index=value, impl="torch"), want), repr(value)
