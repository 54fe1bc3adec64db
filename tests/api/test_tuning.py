"""Tuning: read from VPCCE_* variables in one place (Tuning.from_env, used when no tuning= is given),
carried across the custom ops intact."""

from __future__ import annotations

import os

import pytest
import torch

from vocab_parallel_cce import Tuning, linear_cross_entropy


def test_from_env_parses_every_kind_of_field(monkeypatch):
    monkeypatch.setenv("VPCCE_FORWARD_BLOCK", "16,32,16,1,1")
    monkeypatch.setenv("VPCCE_USE_TMA", "0")
    monkeypatch.setenv("VPCCE_SKIP_KEEP_THRESHOLD", "0.25")
    monkeypatch.setenv("VPCCE_GROUP_V", "8")
    monkeypatch.setenv("VPCCE_CHUNK_BYTES", "")  # empty: the default
    assert Tuning.from_env() == Tuning(forward_block=(16, 32, 16, 1, 1), use_tma=False, skip_keep_threshold=0.25,
                                       group_v=8)


def test_encode_decode_round_trip():
    t = Tuning(grad_block=(16, 16, 16, 1, 1), chunk_bytes=1, g_inside_dc=False, workspace_fraction=0.5,
               torch_block=(3, 5))
    assert Tuning.decode(t.encode()) == t and Tuning.decode(Tuning().encode()) == Tuning()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need TRITON_INTERPRET=1")
def test_no_tuning_argument_reads_the_environment(monkeypatch):
    from vocab_parallel_cce import triton_backend

    e = torch.randn(20, 24, requires_grad=True)  # 96-byte rows: TMA-able
    c = torch.randn(50, 24, requires_grad=True)
    t = torch.randint(0, 50, (20,))
    for env, path in (("1", "tma"), ("0", "pointers")):
        monkeypatch.setenv("VPCCE_USE_TMA", env)
        triton_backend.counters.clear()
        torch.autograd.grad(linear_cross_entropy(e, c, t, impl="triton", grad_in_forward=False), (e, c))
        assert triton_backend.counters[path] == 2, (env, triton_backend.counters)  # forward and backward


@pytest.mark.parametrize("bad", [100, -64, 64.0, True, "2048"])
def test_stats_k_slice_must_be_whole_k_blocks(bad):
    """The Gluon kernels take slices of whole 64-column K blocks: anything else is refused when the
    Tuning is made, before any call (a build failure would only fall back to the portable kernels)."""
    with pytest.raises(ValueError, match=r"Tuning\.stats_k_slice: expected None, 0 or a positive multiple of 64"):
        Tuning(stats_k_slice=bad)
    assert Tuning(stats_k_slice=0).stats_k_slice == 0 and Tuning(stats_k_slice=512).stats_k_slice == 512
