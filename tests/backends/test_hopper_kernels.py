"""The Hopper (Gluon) kernels on CPU: every configuration compiles for sm_90a, the merge of their
per-tile partials (a plain Triton kernel, in the interpreter) against float64, and the gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vocab_parallel_cce.backends.triton import hopper
from vocab_parallel_cce.backends.triton.hopper import partials

gluon_missing = not hopper._has_gluon()


def _tile_partials(z: torch.Tensor, block: int, rounded: bool, need_sum: bool, need_pz: bool = False) -> torch.Tensor:
    """What the logits kernel writes for logits z [N, V] (float64) in column tiles of `block`."""
    n, v = z.shape
    tiles = -(-v // block)
    rows = [torch.empty(tiles, n, dtype=torch.float64) for _ in range(2 + rounded + need_sum + need_pz)]
    z_rounded = z.to(torch.bfloat16).double()
    for k in range(tiles):
        part = z[:, k * block:(k + 1) * block]
        m = part.max(1).values
        rows[0][k], rows[1][k] = m, torch.exp(part - m[:, None]).sum(1)
        i = 2
        if rounded:
            rows[i][k] = torch.exp(z_rounded[:, k * block:(k + 1) * block] - m[:, None]).sum(1)
            i += 1
        if need_sum:
            rows[i][k] = part.sum(1)
            i += 1
        if need_pz:
            rows[i][k] = (torch.exp(part - m[:, None]) * part).sum(1)
    return torch.stack(rows).float()


@pytest.mark.parametrize("n,d,v,block", [(1, 16, 1, 16), (37, 40, 203, 32), (64, 24, 64, 64), (5, 8, 300, 16)])
@pytest.mark.parametrize("rounded,need_sum", [(True, False), (False, True), (True, True), (False, False)])
def test_merge_partials_against_float64(n, d, v, block, rounded, need_sum, seed):
    e = torch.randn(n, d).bfloat16()
    c = (torch.randn(v + 3, d) * 2).bfloat16()  # 3 rows past n_cols: padding, never read as targets
    t = torch.randint(-2, v + 3, (n,))
    z = e.double() @ c[:v].double().T
    out = partials.merge(_tile_partials(z, block, rounded, need_sum), e, c, t, v, rounded, need_sum)
    assert torch.isfinite(out[0]).all()
    lse = torch.logsumexp(z, 1)
    has_t = (t >= 0) & (t < v)
    x = torch.where(has_t, z.gather(1, t.clamp(0, v - 1)[:, None])[:, 0], 0.0)
    tol = 2e-6 * (1 + z.abs().max().item())
    assert (out[0].double() - lse).abs().max() <= tol
    assert (out[1].double() - x).abs().max() <= tol
    if need_sum:
        assert (out[2].double() - z.sum(1)).abs().max() <= 1e-5 * (1 + z.abs().sum(1).max().item())
    else:
        assert (out[2] == 0).all()
    if rounded:
        lse_rounded = torch.logsumexp(z.to(torch.bfloat16).double(), 1)
        assert (out[3].double() - lse_rounded).abs().max() <= tol


@pytest.mark.parametrize("n,d,v,block", [(1, 16, 1, 16), (37, 40, 203, 32), (5, 8, 300, 16)])
@pytest.mark.parametrize("inv_temp", [1.0, 1 / 0.7])
def test_merge_partials_entropy_statistic(n, d, v, block, inv_temp, seed):
    """pz = Σ_j p_j z_j from the per-tile q, and x with the temperature (z = e·cᵀ / T)."""
    e = torch.randn(n, d).bfloat16()
    c = (torch.randn(v, d) * 2).bfloat16()
    t = torch.randint(-1, v, (n,))
    z = (e.double() @ c.double().T) * inv_temp
    out = partials.merge(_tile_partials(z, block, False, True, True), e, c, t, v, False, True, True, inv_temp)
    p = torch.softmax(z, 1)
    tol = 2e-6 * (1 + z.abs().max().item())
    assert (out[4].double() - (p * z).sum(1)).abs().max() <= tol
    x = torch.where(t >= 0, z.gather(1, t.clamp(0)[:, None])[:, 0], 0.0)
    assert (out[1].double() - x).abs().max() <= tol
    assert (out[0].double() - torch.logsumexp(z, 1)).abs().max() <= tol


def test_merge_partials_no_rows():
    e, c = torch.randn(0, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    out = partials.merge(torch.empty(2, 1, 0), e, c, torch.empty(0, dtype=torch.long), 4, False, False)
    assert out.shape == (5, 0)


@pytest.mark.skipif(gluon_missing, reason="this Triton has no Gluon")
def test_every_gluon_kernel_compiles_for_sm90a():
    """Ahead of time, no GPU, in a process of its own (the interpreter must be off): an API change
    in a newer Triton fails here. No spills, within sm_90's shared memory, wgmma and setmaxnreg."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "vocab_parallel_cce.backends.triton.hopper.aot"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    built = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert {b["name"] for b in built} == {"logits", "logits+sum", "stats", "stats+sum", "stats+entropy", "grad",
                                          "grad+entropy", "logits+one-slice", "stats+one-slice+entropy",
                                          "portable-fast-stats+float32", "merge-partials"}
    for b in built:
        assert b["shared"] <= 232448, b  # sm_90's per-block limit
        if b["name"] not in ("portable-fast-stats+float32", "merge-partials"):  # `tl` kernels
            assert b["wgmma"] and 240 in b["setmaxnreg"], b
        assert b.get("local", 0) == 0 and b.get("stack", 0) == 0, b  # no spills


def test_statistics_modes_refuse_column_slices():
    """A slice past n_cols would have no valid column and poison the merge: refused, not run."""
    from vocab_parallel_cce.backends.triton.hopper import logits

    e, c = torch.zeros(4, 64).bfloat16(), torch.zeros(8, 64).bfloat16()
    with pytest.raises(ValueError, match="SPLIT"):
        logits.launch(e, c, 8, logits.MODE_STATS.value, config=(128, 256, 64, 3, 2, 16, 8))


@pytest.mark.parametrize("k_slice", [100, -64])
def test_accumulator_slices_must_be_whole_k_blocks(k_slice):
    """k_slice is refused unless 0 or a positive multiple of the block's K (64), before any launch."""
    from vocab_parallel_cce.backends.triton.hopper import logits

    e, c = torch.zeros(4, 64).bfloat16(), torch.zeros(8, 64).bfloat16()
    with pytest.raises(ValueError, match="k_slice: expected 0 or a positive multiple of the block's K \\(64\\)"):
        logits.launch(e, c, 8, logits.MODE_STATS.value, k_slice=k_slice)


def test_gate_keeps_gluon_off_cpu_and_when_asked():
    assert not hopper.available(torch.device("cpu"), None)
    assert not hopper.available(torch.device("cpu"), True)
    if torch.cuda.is_available():
        assert not hopper.available(torch.device("cuda"), False)


def test_a_build_that_fails_falls_back_with_one_warning():
    key = ("test-kernel", id(object()))

    def broken():
        raise RuntimeError("ptxas: unsupported instruction")

    with pytest.warns(RuntimeWarning, match="failed to build"):
        assert not hopper.build_ok(key, broken)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hopper.build_ok(key, broken)  # no second warning
    assert hopper.build_ok(("fine", 1), lambda: None)
