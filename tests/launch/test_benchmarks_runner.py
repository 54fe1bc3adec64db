"""The benchmarks' code paths on CPU: tiny runs of the race, loss and rl suites through their child
processes (our torch path, torch eager, the cuBLAS-product rows as CPU products; CUDA-only peers
recorded as skipped), the race's interleaved rounds and paired ratios, the float64 references,
the Tuning parser, the table / chart / merge of saved results, and report.py's RESULTS.md from
stored results. GPU timing itself is only measured on a GPU; these keep the harness working."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
            "machine": {"device_name": "NVIDIA H200", "device_count": 1},
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
    import methods as M

    cls, why = M.tuning_type()
    if cls is None:
        pytest.skip(f"no Tuning in this vocab_parallel_cce ({why})")
    t = M.parse_tuning("group_v=8;use_tma=0 grad_block=128,256,64,8,3 chunk_bytes=none")
    assert (t.group_v, t.use_tma, t.grad_block, t.chunk_bytes) == (8, False, (128, 256, 64, 8, 3), None)
    for bad in ("no_such_field=1", "use_tma", "use_tma=maybe", ""):
        with pytest.raises(ValueError, match="--tuning"):
            M.parse_tuning(bad)


def test_tuning_values_follow_the_field_type(runner):
    """A field is parsed by its annotation, so a new one (e.g. an optional bool) needs no code."""
    import methods as M

    assert [M._tuning_value("use_gluon", "bool | None", None, x) for x in ("1", "false", "none")] == [True, False, None]
    assert M._tuning_value("forward_splits", "int | None", None, "3") == 3
    assert M._tuning_value("workspace_fraction", "float", 0.09, "0.2") == 0.2
    assert M._tuning_value("grad_block", "BlockConfig | None", None, "64,128,32,4,3") == (64, 128, 32, 4, 3)
    with pytest.raises(ValueError, match="0/1/true/false"):
        M._tuning_value("use_gluon", "bool | None", None, "2")


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


def test_interleaved_rounds_shuffle_settle_and_drop_a_failing_method(runner):
    import random

    import timing

    order, errors, settled = [], [], []

    def make(name, fail_at=None):
        def fn():
            order.append(name)
            if fail_at is not None and order.count(name) == fail_at:
                raise RuntimeError("boom")
        return fn

    names = [f"m{i}" for i in range(6)]
    fns = {n: make(n, fail_at=2 if n == "m3" else None) for n in names}
    out = timing.interleaved_rounds(fns, rounds=4, block=1, on_error=lambda name, err: errors.append((name, str(err))),
                                    settle=lambda: settled.append(len(order)), seed=5)
    expected = []
    for r in range(4):
        perm = names[:]
        random.Random(5 + r).shuffle(perm)
        expected += [n for n in perm if not (n == "m3" and expected.count("m3") == 2)]
    assert order == expected  # every round a seeded permutation; m3 failed in its second block, then left out
    assert settled == list(range(len(order)))  # one settle before every block, the failing one too
    assert errors == [("m3", "boom")]
    assert [x is None for x in out["m3"]["round_ms"]] == [False, True, True, True]
    assert all(x > 0 for n in names if n != "m3" for x in out[n]["round_ms"])
    # predecessors vary: a rotated cyclic order would give at most len(names) (predecessor, name) pairs
    firsts = [0, 6, 12, 17, 22]  # round boundaries in `order` (6, 6, 5, 5 blocks)
    pairs = {(order[i], order[i + 1]) for a, b in zip(firsts, firsts[1:]) for i in range(a, b - 1)}
    assert len(pairs) > len(names)
    assert timing.paired_ratio([2.0, None, 6.0], [1.0, 1.0, 2.0]) == 2.5  # rounds both ran: 2 and 3
    assert timing.paired_ratio([None], [1.0]) is None
    assert timing.settling_load(100.0) is None  # no GPU: no load


def test_race_suite_cpu_smoke(tmp_path):
    """The race through its child process: every method and product row timed in every round,
    ratios = medians of within-round ratios, errors against float64 for every method (a method
    adding dC into a main_grad too), a missing peer recorded, a --tuning row, the outputs, and the
    short table at the end of stdout."""
    import statistics

    out = tmp_path / "res"
    env = {**os.environ, "PYTHONPATH": REPO}
    methods = ("vpcce_torch", "vpcce_torch_memory", "vpcce_torch_memory_into", "torch_eager", "liger", "cublas_3x",
               "cublas_4x")
    proc = subprocess.run([sys.executable, RUN, "race", "--device", "cpu", "--shapes", "48x16x90", "--kinds",
                           "random,zipf_shuffled", "--methods", ",".join(methods), "--tuning", "group_v=8", "--rounds",
                           "3", "--block", "1", "--warmup", "1", "--dtype", "fp32", "--stats-tokens", "16",
                           "--out", str(out)], capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for ext in ("json", "md", "png"):
        assert (out / f"race.{ext}").stat().st_size > 0
    assert (out / "race_raw" / "race_0.log").exists()
    doc = json.loads((out / "race.json").read_text())
    assert doc["suite"] == "race" and doc["failures"] == [] and doc["command"].startswith("python benchmarks/run.py race")
    rows = {(tuple(r["shape"]), r["kind"], r["method"]): r for r in doc["results"]}
    timed = [m for m in methods if m != "liger"] + ["vpcce_torch[group_v=8]", "vpcce_torch_memory[group_v=8]",
                                                     "vpcce_torch_memory_into[group_v=8]"]
    cases = [((48, 16, 90), k) for k in ("random", "zipf_shuffled")]
    assert set(rows) == {(s, k, m) for s, k in cases for m in timed + ["liger"]}
    for s, k in cases:
        assert rows[(s, k, "liger")]["skipped"]
        for m in timed:
            r = rows[(s, k, m)]
            assert len(r["round_ms"]) == 3 and all(x > 0 for x in r["round_ms"]), r
            assert r["fwd_bwd_ms"] == statistics.median(r["round_ms"])
            base = rows[(s, k, "cublas_3x")]["round_ms"]
            assert r["ratio_cublas_3x"] == pytest.approx(statistics.median(a / b for a, b in zip(r["round_ms"], base)))
            if not m.startswith("cublas"):  # fp32 against the float64 reference
                assert r["loss_rel_err"] < 1e-5 and r["de_rel_err"] < 1e-4 and r["dc_rel_err"] < 1e-4, r
    md = (out / "race.md").read_text()
    # the summary's row, every method's (liger's too), the inputs' row
    assert len(table_lines(md, "| 48×16×90 | random | ")) == 1 + len(timed) + 1 + 1
    tail = proc.stdout.strip().splitlines()  # the short table comes last
    assert tail[-1].startswith("| 48×16×90 | zipf_shuffled |") and "| 3 cuBLAS products |" in tail[-4]


def test_race_restarts_a_dead_process_for_the_cases_left(tmp_path, runner, monkeypatch):
    """A measuring process that dies: the case it was in is recorded as failed, a new process
    races the cases after it, and what the first one had saved is kept."""
    import race_suite

    calls = []

    def fake_child(suite, args, group, deadline, part_path, log_path, config_path):
        calls.append([list(x) for x in group])
        rows = [{"shape": x[:3], "kind": x[3], "method": "torch_eager", "errors": {}, "round_ms": [1.0, 2.0, 3.0],
                 "fwd_bwd_ms": 2.0} for x in group[:1]]
        if len(calls) == 1:  # dies in its second case
            return {"meta": {}, "results": rows, "current": group[1]}, {"returncode": -11, "log_tail": "Segfault"}
        return {"meta": {}, "results": rows, "current": None}, None

    monkeypatch.setattr(race_suite, "run_child", fake_child)
    args = runner.parser().parse_args(["race", "--device", "cpu", "--shapes", "8x8x10", "--kinds",
                                       "random,zipf,zipf_shuffled", "--methods", "torch_eager"])
    doc = race_suite.run(args, runner.Output(str(tmp_path), "race", None))
    assert calls == [[[8, 8, 10, "random"], [8, 8, 10, "zipf"], [8, 8, 10, "zipf_shuffled"]],
                     [[8, 8, 10, "zipf_shuffled"]]]
    by_kind = {r["kind"]: r for r in doc["results"]}
    assert by_kind["random"]["fwd_bwd_ms"] == 2.0 and by_kind["zipf_shuffled"]["fwd_bwd_ms"] == 2.0
    assert by_kind["zipf"]["method"] == "(process)" and "Segfault" in by_kind["zipf"]["errors"]["process"]
    assert doc["exit_status"] == 1 and len(doc["failures"]) == 1


def test_race_arguments_are_checked_before_any_work(runner):
    for bad, message in ((["--shapes", "8x8"], "--shapes"), (["--kinds", "zipff"], "--kinds"),
                         (["--methods", "nope"], "--methods"), (["--tuning", "nope=1"], "--tuning"),
                         (["--rounds", "0"], "--rounds")):
        with pytest.raises(SystemExit, match=message):
            runner.main(["race", "--device", "cpu", "--out", "/nonexistent/never-written", *bad])


def test_machine_keys(runner):
    from machine import machine_key, reproducible

    assert machine_key({"device_name": "NVIDIA H100 80GB HBM3", "device_count": 1}) == "h100"
    assert machine_key({"device_name": "NVIDIA H200", "device_count": 8}) == "h200x8"
    assert machine_key({}) == "cpu"
    assert runner.default_out("cuda", {"device_name": "NVIDIA H200"}).endswith(os.path.join("results", "h200"))
    assert reproducible("python benchmarks/run.py race --out /x/y --rounds 3") == "python benchmarks/run.py race --rounds 3"


def fake_race_doc() -> dict:
    results = []
    for shape in ([8192, 4096, 128256], [16384, 4096, 16032]):
        for method, rounds in (("vpcce_triton", [38.0, 39.0, 38.5]), ("torch_compile", [40.0, 39.5, 40.5]),
                               ("cublas_3x", [36.0, 36.5, 36.2])):
            results.append({"shape": shape, "kind": "random", "method": method, "errors": {}, "round_ms": rounds,
                            "fwd_bwd_ms": sorted(rounds)[1], "loss_rel_err": 1e-6})
        results.append({"shape": shape, "kind": "random", "method": "apple_cce", "skipped": "No module named 'x'"})
    return {"suite": "race", "date": "2026-12-07", "args": {"rounds": 3, "block": 3, "check_rows": 256},
            "machine": {"device_name": "NVIDIA H100 80GB HBM3", "device_count": 1, "torch": "2.11.0", "driver": "580"},
            "command": "python benchmarks/run.py race --out /tmp/somewhere --rounds 3",
            "inputs": [], "results": results, "failures": []}


def test_report_builds_results_md_from_stored_results(tmp_path, runner):
    import report

    (tmp_path / "h100").mkdir()
    (tmp_path / "h200").mkdir()
    (tmp_path / "h100" / "race.json").write_text(json.dumps(fake_race_doc()))
    (tmp_path / "h200" / "loss.json").write_text(json.dumps(fake_loss_doc()))
    (tmp_path / "h200" / "notes.json").write_text(json.dumps({"not": "a result"}))  # ignored
    (tmp_path / "h100" / "probe.json").write_text(json.dumps({"kind": "experiment", "date": "2026-12-07"}))
    (tmp_path / "h100" / "probe.md").write_text("# probe: NVIDIA H100 80GB HBM3, 2026-12-07\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    md = out.read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads == ["## h100: NVIDIA H100 80GB HBM3", "## h200: NVIDIA H200"]
    assert "### race — NVIDIA H100 80GB HBM3, 2026-12-07" in md
    assert "Reproduce: `python benchmarks/run.py race --rounds 3`" in md  # the --out folder left out
    summary = table_lines(md, "| 8192×4096×128256 | random | 38.50 | 40.00 | 36.20 | skip |")
    assert len(summary) == 1
    ratio_compile = statistics_median([38.0 / 40.0, 39.0 / 39.5, 38.5 / 40.5])
    assert summary[0].rstrip(" |").endswith(f"{ratio_compile:.3f} | {statistics_median([38 / 36, 39 / 36.5, 38.5 / 36.2]):.3f}")
    assert "| 16384×4096×16032 (tp=8 rank) | random |" in md and "### loss — NVIDIA H200, 2026-12-01" in md
    # an experiment record: its own table, after the suites of its machine
    assert "| h100 | [probe (experiment)](#h100-probe) | 2026-12-07 |" in md
    assert md.index("### race — ") < md.index("### probe — NVIDIA H100 80GB HBM3, 2026-12-07") < md.index("## h200")
    assert "| 1 | 2 |" in md


def statistics_median(xs):
    import statistics

    return statistics.median(xs)


def test_stored_results_tabulate(tmp_path, runner):
    """Every result kept in benchmarks/results/ still makes its table with today's code."""
    import report

    results = os.path.join(REPO, "benchmarks", "results")
    stored = report.collect(results)
    assert stored, "no stored results"
    md = report.build(results, str(tmp_path / "RESULTS.md"))
    assert "could not be tabulated" not in md
    for machine, docs in stored.items():
        for path, doc in docs:
            assert f"### {os.path.splitext(os.path.basename(path))[0]} — " in md


def test_snapshot_tool_finds_a_changed_bit(tmp_path, runner):
    """benchmarks/snapshot.py (the bit-for-bit check of refactorings): a snapshot equals itself,
    and one flipped bit in one output is reported with exit status 1."""
    import snapshot
    import torch

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "snapshot.py"), "save", str(a),
                           "--only", "torch/float32/one/"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and " cases → " in proc.stdout, proc.stdout + proc.stderr
    assert snapshot.main(["compare", str(a), str(a)]) == 0
    cases = torch.load(a)
    key = next(iter(cases))
    de = cases[key]["de"]
    de.view(torch.int32).view(-1)[0] ^= 1  # the last bit of one element of one case's dE
    torch.save(cases, b)
    assert snapshot.main(["compare", str(a), str(b)]) == 1


def test_hopper_suite_configurations_take_an_optional_consumer_count(runner):
    import hopper_suite

    got = hopper_suite._configs(["coop=128,256,64,3,1,16,8", "pp=64,256,64,4,1,32,4,2"])
    assert got == {"coop": (128, 256, 64, 3, 1, 16, 8), "pp": (64, 256, 64, 4, 1, 32, 4, 2)}
    for bad in ("x=1,2,3", "=128,256,64,3,1,16,8", "x=1,2,3,4,5,6,7,8,9"):
        with pytest.raises(SystemExit, match="--config"):
            hopper_suite._configs([bad])


def test_gpu_state_reads_nvidia_smi_and_the_race_table_shows_it(tmp_path, runner, monkeypatch):
    import machine
    import race_suite

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '1335, 694.43, 700.00, 0x0000000000000004'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    state = machine.gpu_state()
    assert state == {"sm_mhz": 1335.0, "power_w": 694.43, "power_limit_w": 700.0, "throttle": "0x0000000000000004"}
    assert race_suite._gpu_state_text(state) == "1335 / 694 of 700 (power cap)"
    assert race_suite._gpu_state_text({**state, "throttle": "0x0"}) == "1335 / 694 of 700"
    fake.write_text("#!/bin/sh\nexit 1\n")
    assert machine.gpu_state() is None and race_suite._gpu_state_text(None) == "–"


def _experiment(name: str):
    """benchmarks/experiments/NAME.py, imported (the experiments are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", "experiments", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loss_bias_experiment_separates_bias_from_spread(runner):
    """The loss-bias experiment's arithmetic (it runs on a GPU only): a constant lse offset is a
    bias with no spread, a zero-mean x error a spread with no bias, the mean loss's error their
    difference, the pull k·z recovered; its table has one row per record row."""
    import torch

    lb = _experiment("loss_bias")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 50, generator=g, dtype=torch.float64) * 2
    t = torch.randint(0, 50, (64,), generator=g)
    ref = dict(lse=torch.logsumexp(z, -1), x=z.gather(1, t[:, None]).squeeze(1), z=z)
    noise = torch.randn(64, generator=g, dtype=torch.float64) * 1e-3
    noise -= noise.mean()
    row = lb.errors("probe", ref["lse"] - 2e-4, ref["x"] + noise, ref, z * (1 - 3e-6))
    assert abs(row["lse_bias"] + 2e-4) < 1e-12 and row["lse_sd"] < 1e-12
    assert abs(row["x_bias"]) < 1e-12 and abs(row["x_sd"] - noise.std().item()) < 1e-12
    loss_ref = (ref["lse"] - ref["x"]).mean().item()
    assert abs(row["loss_rel"] - 2e-4 / loss_ref) < 1e-9
    assert abs(row["shrink"] + 3e-6) < 1e-12
    doc = dict(machine={}, date="2026-12-07", about="probe", rows=[{**row, "shape": "64×4×50"}] * 2)
    assert len(table_lines(lb.markdown(doc), "| 64×4×50 | probe |")) == 2


def test_k_slices_experiment_table(runner):
    """The K-slice experiment runs on a GPU only; its table has one row per record row, with '–'
    where a row has no error columns (the cuBLAS reference, the end-to-end rows' lse)."""
    ks = _experiment("k_slices")
    kernel = dict(shape="64×4096×50", method="statistics kernel, slices of 2048", ms_median=1.5, x_cublas=1.02,
                  lse_bias=-7.5e-6, lse_sd=4.6e-7, loss_rel=5.4e-7)
    product = dict(shape="64×4096×50", method="cuBLAS bf16 product", ms_median=1.47, x_cublas=1.0)
    doc = dict(machine={}, date="2026-12-07", about="probe", results=[kernel, product])
    text = ks.markdown(doc)
    assert table_lines(text, "| 64×4096×50 | statistics kernel, slices of 2048 | 1.500 | 1.020 | -7.50e-06 |")
    assert table_lines(text, "| 64×4096×50 | cuBLAS bf16 product | 1.470 | 1.000 | – | – | – |")


def test_float32_tolerances_experiment_measures_against_assert_close(runner):
    """The float32-tolerance experiment runs on a GPU only: its measure is ≤ 1 exactly where
    torch.testing.assert_close's float32 default passes, and its table marks only rows above 1."""
    import torch

    ft = _experiment("float32_tolerances")
    ref = torch.tensor([11.9, 0.0, 3.0])
    tol = 1e-5 + 1.3e-6 * ref.abs()
    for k in (0.5, 0.9, 1.5, 3.0):
        loss = ref + torch.tensor([0.0, 1.0, 0.0]) * k * tol
        assert abs(ft.over_tolerance(loss, ref) - k) < 1e-3
        passes = True
        try:
            torch.testing.assert_close(loss, ref)
        except AssertionError:
            passes = False
        assert passes == (k <= 1)
    rows = [dict(dtype="bfloat16", shape="80×125×64", method=m, worst_over_tolerance=w)
            for m, w in (("a", 0.5), ("b", 7.0))]
    text = ft.markdown(dict(machine={}, date="2026-12-07", about="probe", results=rows))
    assert table_lines(text, "| bfloat16 | 80×125×64 | a | 0.5 |")
    assert table_lines(text, "| bfloat16 | 80×125×64 | b | 7 (fails) |")


def test_float32_logits_experiment_tables(runner):
    """The float32-logit experiments run on a GPU only: one accuracy row per case with a column per
    K, one cost row per shape; the end-to-end race one row per shape and input kind."""
    fl = _experiment("float32_logits")
    by_k = {k: 0.5 + k for k in fl.TOP_KS}
    doc = dict(machine={}, date="2026-12-07", about="probe",
               accuracy=[dict(case="peaked 8×16×4", metric="rel", unfused=1.3e-3, by_k=by_k)],
               cost=[dict(shape=[8, 4, 16], stats_ms=0.2, cublas_ms=2.7, added_ms=by_k)])
    text = fl.markdown(doc)
    assert table_lines(text, "| peaked 8×16×4 | rel | 0.0013 | 0.5 | 1.5 | 3.5 | 4.5 | 7.5 |")
    assert table_lines(text, "| 8×4×16 | 0.200 | 2.700 | 0.500 | 1.500 | 3.500 | 4.500 | 7.500 |")

    race = _experiment("float32_logits_race")
    names = list(race.SETTINGS)
    row = dict(shape=[8, 4, 16], kind="zipf", ms={**{k: 10.0 + i for i, k in enumerate(names)},
                                                   "torch_compile": 10.0, "cublas_3x": 9.0},
               vs_compile={k: 1.0 + i / 10 for i, k in enumerate(names)},
               vs_stored={k: 1.0 + i / 100 for i, k in enumerate(names)},
               loss_rel_err={k: 10.0 ** -(5 + i) for i, k in enumerate(names)})
    text = race.markdown(dict(machine={}, date="2026-12-07", about="probe", rows=[row, {**row, "kind": "random"}]))
    assert table_lines(text, "| 8×4×16 | zipf | 10.00 (1.000) | 11.00 (1.100) | 12.00 (1.200) | 10.00 | 9.00 | "
                             "1.020 | 1.0e-05 / 1.0e-06 / 1.0e-07 |")
    assert len(table_lines(text, "| 8×4×16 |")) == 2


def test_power_bound_experiment_arithmetic(runner):
    """The power-bound experiment runs on a GPU only: a window's clock and power are its samples'
    means and its throttle reasons their union; the three products' floor is 6·N·D·V FLOPs at
    SMs · 4096 FLOP per clock at cuBLAS's clock, over torch.compile's time."""
    pb = _experiment("power_bound")
    stats = pb.window_stats([(0.0, 1300.0, 690.0, 0x4), (0.1, 1500.0, 700.0, 0x1)])
    assert stats == dict(sm_mhz=1400.0, watts=695.0, throttle_mask="0x5", samples=2)
    assert pb.window_stats([])["samples"] == 0
    n, d, v, sms = 1024, 2048, 4096, 100
    flops = 6.0 * n * d * v
    at_peak_ms = flops / (sms * 4096 * 1000e6) * 1e3  # the three products at 100% of 1000 MHz's peak
    row = dict(shape=[n, d, v], methods={
        "cublas_3x": dict(ms=2 * at_peak_ms, sm_mhz=1000.0, watts=700.0, throttle_mask="0x4", samples=9),
        "torch_compile": dict(ms=4 * at_peak_ms, sm_mhz=500.0, watts=700.0, throttle_mask="0x4", samples=9)})
    row = pb.summarise(row, sms, square_mhz=2000.0)
    assert abs(row["methods"]["cublas_3x"]["utilisation"] - 0.5) < 1e-12
    assert abs(row["methods"]["torch_compile"]["utilisation"] - 0.5) < 1e-12
    assert abs(row["floor_ms"] - at_peak_ms) < 1e-9 and abs(row["floor_vs_compile"] - 0.25) < 1e-12
    assert abs(row["cublas_vs_compile"] - 0.5) < 1e-12 and abs(row["floor_vs_compile_square_clock"] - 0.125) < 1e-12
    text = pb.markdown(dict(machine={}, date="2026-12-08", about="probe", idle_mhz=None, sms=sms, rows=[row]))
    assert table_lines(text, "| 1024×2048×4096 | cublas_3x |")
    assert table_lines(text, "| 1024×2048×4096 | 0.500 |")[0].endswith("| 0.250 | 0.125 |")
    assert "No square product measured." in text


def test_write_experiment_keeps_the_record_and_its_table(tmp_path, runner, capsys):
    import machine

    doc = dict(kind="experiment", name="probe", date="2026-12-07", results=[{"x": 1.5}])
    machine.write_experiment(str(tmp_path / "out"), doc, "| probe | 1.5 |\n")
    assert json.loads((tmp_path / "out" / "probe.json").read_text()) == doc
    assert (tmp_path / "out" / "probe.md").read_text() == "| probe | 1.5 |\n"
    assert "| probe | 1.5 |" in capsys.readouterr().out
