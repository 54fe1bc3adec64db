"""The benchmark runner's code path on CPU (benchmarks/run.py): a tiny loss-suite run through its
per-kind child processes, a tiny rl-suite run (and its float64 reference against autograd), and
the table / chart / merge of saved results. GPU timing itself can
only be checked on a GPU; this keeps the runner from rotting between device calls."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "benchmarks", "run.py")


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("benchmarks_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # puts benchmarks/ on sys.path for its plain modules
    return mod


def table_lines(md: str, prefix: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith(prefix)]


def test_loss_suite_cpu_smoke(tmp_path):
    """One child process per kind, every output written, one table row per (kind, method)."""
    out = tmp_path / "res"
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, RUN, "loss", "--device", "cpu", "--shapes", "64x32x100",
                           "--kinds", "random,zipf_shuffled", "--methods", "vpcce_torch,torch_eager",
                           "--reps", "2", "--warmup", "1", "--stats-tokens", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for ext in ("json", "md", "png"):
        assert (out / f"loss.{ext}").stat().st_size > 0
    for kind in ("random", "zipf_shuffled"):  # its own process, its own log and part
        assert (out / "loss_raw" / f"{kind}.log").exists()
        assert (out / "loss_raw" / f"part_{kind}.json").exists()
    doc = json.loads((out / "loss.json").read_text())
    assert doc["suite"] == "loss" and doc["failures"] == []
    rows = {(r["kind"], r["method"]): r for r in doc["results"]}
    assert set(rows) == {(k, m) for k in ("random", "zipf_shuffled") for m in ("vpcce_torch", "torch_eager")}
    for r in rows.values():
        assert r["fwd_bwd_ms"] > 0 and r["fwd_ms"] > 0
        assert r["loss_rel_err"] < 1e-3 and r["de_rel_err"] < 1e-2  # float32 vs float64 reference
    assert len({p["pid"] for p in doc["processes"]}) == 2
    md = (out / "loss.md").read_text()
    method_rows = [r for r in table_lines(md, "| 64×32×100 |") if "| ours (torch path) |" in r or "| torch eager |" in r]
    assert len(method_rows) == 4


def fake_loss_doc(kinds=("random", "zipf")) -> dict:
    results = []
    for kind in kinds:
        for shape in ([8192, 4096, 128256], [8192, 2304, 256000]):
            for method, ms, mb in (("vpcce_triton", 54.0, 1165.0), ("torch_compile", 39.0, 3070.0),
                                   ("cublas_4x", 45.0, None), ("cublas_3x", 33.0, None)):
                results.append({"shape": shape, "kind": kind, "method": method, "fwd_bwd_ms": ms,
                                "fwd_bwd_peak_mb": mb, "errors": {}})
            results.append({"shape": shape, "kind": kind, "method": "liger", "skipped": "not installed"})
    return {"suite": "loss", "date": "2026-12-01", "args": {"dtype": "bf16", "reps": 10, "warmup": 3},
            "processes": [{"env": {"device_name": "NVIDIA H200"}, "peak_tflops": 790.0}],
            "inputs": [], "results": results}


def test_chart_and_merge_of_saved_results(tmp_path, runner):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(fake_loss_doc(("random",))))
    b.write_text(json.dumps(fake_loss_doc(("zipf",))))
    png = tmp_path / "chart.png"
    assert runner.main(["chart", str(a), "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000
    assert runner.main(["merge", str(a), str(b), "--out", str(tmp_path / "m"), "--tag", "all"]) == 0
    doc = json.loads((tmp_path / "m" / "loss_all.json").read_text())
    assert len(doc["results"]) == 2 * 2 * 5
    ours = [r for r in doc["results"] if r["method"] == "vpcce_triton"]
    assert all(r["ratio_torch_compile"] == pytest.approx(54 / 39) for r in ours)
    assert all(r["ratio_cublas_4x"] == pytest.approx(54 / 45) for r in ours)
    md = (tmp_path / "m" / "loss_all.md").read_text()
    rows = table_lines(md, "| 8192×")
    assert len(rows) == 20
    assert any("skipped: not installed" in r for r in rows)
    assert (tmp_path / "m" / "loss_all.png").stat().st_size > 10_000


def test_tuning_spec_parsing(runner):
    import common as C

    cls, why = C.tuning_type()
    if cls is None:
        pytest.skip(f"no Tuning in this vocab_parallel_cce ({why})")
    t = C.parse_tuning("group_v=8;use_tma=0 grad_block=128,256,64,8,3 chunk_bytes=none")
    assert (t.group_v, t.use_tma, t.grad_block, t.chunk_bytes) == (8, False, (128, 256, 64, 8, 3), None)
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        C.parse_tuning("no_such_field=1")


def test_rl_reference_matches_autograd(runner):
    """The rl suite's float64 reference (chunked over tokens, gradients written out by hand)
    against autograd through materialised float64 logits."""
    import rl_suite
    import torch

    g = torch.Generator().manual_seed(3)
    n, d, v, temp = 23, 16, 50, 0.7
    e = torch.randn(n, d, dtype=torch.float64, generator=g)
    c = torch.randn(v, d, dtype=torch.float64, generator=g) * 0.6
    t = torch.randint(0, v, (n,), generator=g)
    w1, w2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    ref = rl_suite.reference(e, c, t, w1, w2, temp, chunk_bytes=8 * v * 5, out_dtype=torch.float64)  # 5 tokens/chunk
    e_, c_ = e.clone().requires_grad_(), c.clone().requires_grad_()
    logp = torch.log_softmax(e_ @ c_.T / temp, dim=-1)
    lp = logp.gather(1, t[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(1)
    de, dc = torch.autograd.grad((lp * w1.double()).sum() + (ent * w2.double()).sum(), (e_, c_))
    for got, want in ((ref["lp"], lp), (ref["ent"], ent), (ref["de"], de), (ref["dc"], dc)):
        assert torch.allclose(got, want.detach(), rtol=1e-10, atol=1e-12)


def test_rl_suite_cpu_smoke(tmp_path, runner):
    """The rl suite on CPU (our torch path, eager; verl needs CUDA): every output, the errors
    against float64, the ratios to our loss, the summary; then a merge of two results."""
    out = tmp_path / "res"
    env = {**os.environ, "PYTHONPATH": REPO}
    methods = ("vpcce_log_probs", "vpcce_loss_memory", "verl", "eager")
    proc = subprocess.run([sys.executable, RUN, "rl", "--device", "cpu", "--shapes", "64x128x300,32x48x100",
                           "--methods", ",".join(methods), "--temperature", "0.7", "--dtype", "fp32",
                           "--reps", "2", "--warmup", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for ext in ("json", "md", "png"):
        assert (out / f"rl.{ext}").stat().st_size > 0
    doc = json.loads((out / "rl.json").read_text())
    assert doc["suite"] == "rl" and doc["impl"] == "torch" and doc["machine"]["torch"]
    rows = {(tuple(r["shape"]), r["method"]): r for r in doc["results"]}
    shapes = ((64, 128, 300), (32, 48, 100))
    assert set(rows) == {(s, m) for s in shapes for m in methods}
    for s in shapes:
        assert rows[(s, "verl")]["skipped"]  # no CUDA here (or no verl at all)
        for m in ("vpcce_log_probs", "eager"):
            r = rows[(s, m)]
            assert r["fwd_bwd_ms"] > 0 and r["temperature"] == 0.7 and r["lp_sign"] == "log p"
            assert r["lp_rel_err"] < 1e-5 and r["ent_rel_err"] < 1e-5  # float32 vs float64
            assert r["de_rel_err"] < 1e-4 and r["dc_rel_err"] < 1e-4
            assert r["ratio_loss_memory"] > 0
        loss = rows[(s, "vpcce_loss_memory")]
        assert loss["loss_rel_err"] < 1e-5 and loss["de_rel_err"] < 1e-4 and loss["ratio_loss_memory"] == 1.0
    md = (out / "rl.md").read_text()
    assert len(table_lines(md, "| 64×128×300 | random | 0.7 |")) == len(methods) + 2  # rows, inputs, summary
    assert md.splitlines()[-4 - len(shapes)].startswith("Summary")  # the short table comes last
    assert runner.main(["merge", str(out / "rl.json"), str(out / "rl.json"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "rl_merged.json").read_text())
    assert len(merged["results"]) == 2 * len(doc["results"])


def test_race_cpu_smoke(tmp_path):
    """benchmarks/race.py: every method timed once per round, the ratio the median of the per-round
    ratios, one table row per (kind, shape)."""
    import statistics

    race = os.path.join(REPO, "benchmarks", "race.py")
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, race, "--device", "cpu", "--shapes", "48x16x90,1x8x33",
                           "--kinds", "random,zipf", "--methods", "vpcce_torch,torch_eager",
                           "--rounds", "3", "--block", "1", "--out", str(tmp_path), "--tag", "t"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "race_t.json").read_text())
    assert len(doc["results"]) == 4
    for r in doc["results"]:
        assert set(r["rounds"]) == {"vpcce_torch", "torch_eager"}
        assert all(len(ts) == 3 and all(x > 0 for x in ts) for ts in r["rounds"].values())
        a, b = r["rounds"]["vpcce_torch"], r["rounds"]["torch_eager"]
        assert r["ratios"]["vpcce_torch/torch_eager"] == statistics.median(x / y for x, y in zip(a, b))
        assert r["ms"]["torch_eager"] == statistics.median(b)
    rows = table_lines((tmp_path / "race_t.md").read_text(), "| ")
    assert len(rows) == 1 + 4 and "1×8×33 | zipf" in "".join(rows)  # the header, then a row per case
