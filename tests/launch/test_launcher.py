"""The launcher (launch/run.sh, launch/train_gpt.py and launch/gpt/) on CPU with 2 gloo ranks.

The end-to-end tests start launch/run.sh or torchrun as a subprocess: one short training run through
run.sh with --loss both (or native alone while vocab_parallel_cce.megatron is missing) is shared by
several tests.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch")
TRAIN = os.path.join(LAUNCH, "train_gpt.py")
TIMEOUT = 900  # generous: a loaded 2-core machine imports megatron-core slowly

# A small config: ~3,000-word vocabulary, 30 steps; the loss falls by several nats.
TINY = ["--layers", "2", "--hidden", "32", "--heads", "4", "--ffn-hidden", "128", "--seq-len", "32",
        "--micro-batch", "8", "--lexicon", "3000", "--corpus-tokens", "60000", "--lr", "1e-2", "--warmup", "3"]
STEPS = 30


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


train_gpt = _load("train_gpt", TRAIN)  # it puts launch/ on sys.path, where the gpt package is
from gpt import args as cli  # noqa: E402
from gpt import data, report  # noqa: E402
from gpt import train as training  # noqa: E402


def fused_available() -> bool:
    try:
        import vocab_parallel_cce.megatron  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def refusing_port():
    """A local port bound to a socket that never listens, for the duration: connections to it are
    refused, and no other process (another test's group) can take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def run_sh(args, **env) -> subprocess.CompletedProcess:
    """launch/run.sh with this interpreter's packages as they are (no set-up)."""
    env = child_env(PYTHON=sys.executable, SETUP="0", **env)
    return subprocess.run(["bash", os.path.join(LAUNCH, "run.sh"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


def torchrun(args, nproc: int = 2) -> subprocess.CompletedProcess:
    # --standalone: torchrun binds a free port itself (no port chosen here that another test could take)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), TRAIN, *args]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    out = tmp_path_factory.mktemp("launch") / "run"
    loss = "both" if fused_available() else "native"
    # The output folder from RUN_DIR (run.sh's default for --out): the check and the run must agree on it.
    proc = run_sh([*TINY, "--steps", str(STEPS), "--loss", loss], NPROC="2", RUN_DIR=str(out))
    assert proc.returncode == 0, f"launcher failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out, proc


def test_check_and_run_name_the_same_folder(run_dir):
    out, proc = run_dir
    checked = re.search(r"check ok: .* output (\S+)$", proc.stdout, re.M)
    wrote = re.search(r"^wrote (\S+)/log\.json and ", proc.stdout, re.M)
    assert checked and wrote, proc.stdout[-3000:]
    assert checked.group(1) == wrote.group(1) == str(out)


def test_writes_log_and_plot(run_dir):
    out, proc = run_dir
    assert sorted(os.listdir(out)) == ["log.json", "loss.png"]
    with open(out / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    log = json.loads((out / "log.json").read_text())
    cfg = log["config"]
    assert (cfg["world"], cfg["tp"], cfg["dp"], cfg["backend"]) == (2, 2, 1, "gloo")
    assert cfg["sequence_parallel"] is True
    assert cfg["padded_vocab_size"] % 256 == 0 and cfg["padded_vocab_size"] >= cfg["vocab_size"] > 2000
    for run in log["runs"].values():
        assert len(run["steps"]) == STEPS
        for rec in run["steps"]:
            assert rec["tokens_per_s"] > 0 and len(rec["peak_mem_mb"]) == 2 and min(rec["peak_mem_mb"]) > 0
            assert len(rec["fwd_bwd_peak_mem_mb"]) == 2 and min(rec["fwd_bwd_peak_mem_mb"]) > 0
    # The progress bar, the loss, tokens/s and the per-rank peak memory are printed.
    assert f"{STEPS}/{STEPS}" in proc.stdout and "tok/s" in proc.stdout and "peak MB/rank" in proc.stdout
    # Nothing left behind next to the output folder.
    assert [p.name for p in out.parent.iterdir()] == ["run"]


def test_loss_falls(run_dir):
    log = json.loads((run_dir[0] / "log.json").read_text())
    for name, run in log["runs"].items():
        losses = [r["loss"] for r in run["steps"]]
        first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
        assert last < first - 1.0, f"{name}: the loss did not fall: {losses}"


def test_fused_and_native_agree_first_steps(run_dir):
    if not fused_available():
        pytest.skip("vocab_parallel_cce.megatron is not importable")
    log = json.loads((run_dir[0] / "log.json").read_text())
    fused, native = log["runs"]["fused"]["steps"], log["runs"]["native"]["steps"]
    for a, b in zip(fused[:5], native[:5]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a["loss"], b["loss"])
    assert fused[0]["loss"] == pytest.approx(native[0]["loss"], rel=1e-5)


def test_bad_argument_exits_nonzero_under_torchrun(tmp_path):
    out = tmp_path / "never"
    proc = torchrun([*TINY, "--steps", "2", "--loss", "native", "--tp", "3", "--out", str(out)])
    assert proc.returncode != 0
    assert "train_gpt.py: error: --tp 3 does not divide the number of processes (2)" in proc.stderr
    assert not out.exists()


def test_unreachable_rendezvous_exits_nonzero(tmp_path):
    # Rank 1 of 2 looks for rank 0's store on a local port where nothing listens.
    with refusing_port() as port:
        env = child_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out = tmp_path / "never"
        proc = subprocess.run([sys.executable, TRAIN, *TINY, "--loss", "native", "--tp", "1", "--out", str(out),
                               "--dist-timeout", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "could not form the process group of 2 rank(s) through 127.0.0.1:" in proc.stderr
    assert not out.exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_sh_reports_unreachable_rendezvous():
    # Two nodes expected, only this one comes: torchrun's rendezvous times out; run.sh says so.
    env = child_env(PYTHON=sys.executable, SETUP="0", NNODES="2", NPROC="1", RDZV_TIMEOUT="3",
                    RDZV_ENDPOINT="127.0.0.1:0", RDZV_ID="test-unreachable")  # port 0: torchrun binds a free one
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "run.sh"), "--loss", "native"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "run.sh: error: the nodes could not meet at the rendezvous 127.0.0.1:" in proc.stderr
    assert proc.stderr.rstrip().endswith("reachable from each node")  # no status number after it


# ------------------------------------------------------------------------------- in process


@pytest.fixture
def torchrun_env(monkeypatch):
    for k, v in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)


SMALL_DATA = ["--lexicon", "500", "--corpus-tokens", "5000"]


@pytest.mark.parametrize("args, message", [
    (["--tp", "3"], "--tp 3 does not divide the number of processes (2)"),
    (["--heads", "3", "--hidden", "48"], "--tp 2 does not divide the 3 attention heads"),
    (["--ffn-hidden", "63"], "does not divide the MLP hidden size 63"),
    (["--seq-len", "33"], "sequence parallelism needs --tp 2 to divide --seq-len 33"),
    (["--hidden", "30"], "--heads 8 does not divide --hidden 30"),
    (["--vocab-size", "100"], "--vocab-size 100 is smaller than the data's ids"),
    (["--steps", "0"], "--steps must be > 0"),
    (["--device", "cuda"], "--device cuda"),
    (["--corpus", "/nonexistent/text.txt"], "--corpus /nonexistent/text.txt: no such file"),
    (["--fused-memory-first"], "--fused-memory-first only applies to --loss fused or both"),
])
def test_inconsistent_sizes_exit_2(torchrun_env, tmp_path, capsys, args, message):
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc = train_gpt.main([*SMALL_DATA, "--loss", "native", "--check", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and "train_gpt.py: error:" in err and message in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp16"], "--dtype: expected one of bf16, fp32, got 'fp16'"),
    (["--steps", "ten"], "--steps: expected an integer, got 'ten'"),
    (["--lr", "fast"], "--lr: expected a finite number, got 'fast'"),
    (["--lr", "nan"], "--lr: expected a finite number, got 'nan'"),
    (["--dist-timeout", "inf"], "--dist-timeout: expected a finite number, got 'inf'"),
    (["--loss", "mine"], "--loss: expected one of both, fused, native, got 'mine'"),
    (["--steps"], "--steps: expected one argument"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
])
def test_bad_options_are_refused_in_one_line(torchrun_env, tmp_path, capsys, args, message):
    """argparse's refusals: the message alone (no usage block), exit status 2, nothing started."""
    with pytest.raises(SystemExit) as exc:
        train_gpt.main([*SMALL_DATA, "--loss", "native", "--out", str(tmp_path / "o"), *args])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"train_gpt.py: error: {message}\n"
    assert not (tmp_path / "o").exists()


def test_bad_options_under_torchrun_are_printed_once(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")  # the other ranks exit with the same status, silently
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--dtype", "fp16"])
    assert exc.value.code == 2 and capsys.readouterr().err == ""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_sh_refuses_a_bad_option_before_any_set_up(tmp_path):
    proc = run_sh(["--steps", "ten"])
    assert proc.returncode == 2 and proc.stderr == "train_gpt.py: error: --steps: expected an integer, got 'ten'\n"
    # no interpreter given: checked with python3 before creating the venv
    env = {k: v for k, v in child_env(VENV=str(tmp_path / "venv")).items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "run.sh"), "--dtype", "fp16"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "train_gpt.py: error: --dtype: expected one of bf16, fp32, got 'fp16'\n"
    assert not (tmp_path / "venv").exists()


def _corpus_file(tmp_path, kind):
    """A --corpus argument of the given kind (files under tmp_path)."""
    path = tmp_path / f"{kind}.txt"
    rng = random.Random(5)
    contents = {
        "empty": b"",
        "random bytes": rng.randbytes(5000),
        "random bytes, no NUL": bytes(rng.randrange(1, 256) for _ in range(5000)),
        "latin-1": "café naïve façade ".encode("latin-1") * 50,
        "control characters": bytes(rng.choice(b"abc \x01\x02\x1b\x7f") for _ in range(3000)),
        "blank": b"  \n\t\n",
        "too short": b"hello world, a short text .\n",
    }
    if kind == "folder":
        path.mkdir()
    elif kind == "missing":
        pass
    else:
        path.write_bytes(contents[kind])
    return str(path)


@pytest.mark.parametrize("kind, message", [
    ("empty", "the file is empty, expected UTF-8 text"),
    ("random bytes", "not text (NUL byte at offset"),
    ("random bytes, no NUL", "not UTF-8 text (byte 0x"),
    ("latin-1", "not UTF-8 text (byte 0xe9 at offset 3 is invalid)"),
    ("control characters", "control characters), expected a UTF-8 text file"),
    ("blank", "the text has 0 tokens (words and punctuation), too few for one sequence of --seq-len 64"),
    ("too short", "the text has 7 tokens (words and punctuation), too few for one sequence of --seq-len 64: "
                  "expected at least 66"),
    ("folder", "is a folder, expected a UTF-8 text file"),
    ("missing", "no such file"),
])
def test_bad_corpus_is_refused_in_one_line(torchrun_env, tmp_path, capsys, kind, message):
    corpus = _corpus_file(tmp_path, kind)
    rc = train_gpt.main([*SMALL_DATA, "--loss", "native", "--check", "--out", str(tmp_path / "o"), "--corpus", corpus])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"train_gpt.py: error: --corpus {corpus}: ") and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_generated_corpus_sizes_and_empty_corpus_name(torchrun_env, tmp_path, capsys):
    base = ["--loss", "native", "--check", "--out", str(tmp_path / "o")]
    for args, message in ((["--lexicon", "10"], "--lexicon must be >= 16 (words of the generated corpus), got 10"),
                          (["--corpus-tokens", "999"], "--corpus-tokens must be >= 1000"),
                          (["--corpus", ""], "--corpus: expected a file name, got ''")):
        assert train_gpt.main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_utf8_text_corpus_is_accepted(torchrun_env, tmp_path, capsys):
    """UTF-8 with a byte-order mark, accents, Greek, tabs and line breaks: text."""
    words = ["alpha", "beta", "gamma", "délta", "ε", "naïve"]
    rng = random.Random(3)
    text = "\ufeff" + " ".join(rng.choice(words) for _ in range(300)) + ".\n\tend\r\n"
    path = tmp_path / "ok.txt"
    path.write_text(text, encoding="utf-8")
    rc = train_gpt.main([*SMALL_DATA, "--loss", "native", "--check", "--out", str(tmp_path / "o"),
                         "--corpus", str(path)])
    assert rc == 0, capsys.readouterr().err
    assert "check ok:" in capsys.readouterr().out
    assert data.load_text_file(str(path)) == text[1:]


def test_output_folder_checks(torchrun_env, tmp_path, capsys):
    base = [*SMALL_DATA, "--loss", "native", "--check"]
    assert train_gpt.main([*base, "--out", str(tmp_path / "missing" / "o")]) == 2
    assert "does not exist (create it first)" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert train_gpt.main([*base, "--out", str(tmp_path / "full")]) == 2
    assert "exists and is not empty (pass --overwrite" in capsys.readouterr().err
    assert train_gpt.main([*base, "--out", str(tmp_path / "full"), "--overwrite"]) == 0
    assert "check ok: world 2 (tp 2 x dp 1)" in capsys.readouterr().out
    assert (tmp_path / "full" / "keep.txt").exists()  # --check writes nothing
    (tmp_path / "file").write_text("x")
    assert train_gpt.main([*base, "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def _tiny_log():
    steps = [{"step": i, "loss": 5.0 - 0.1 * i, "tokens_per_s": 100.0, "step_time_s": 0.1, "lr": 1e-3,
              "grad_norm": 1.0, "peak_mem_mb": [10.0, 11.0]} for i in range(1, 6)]
    runs = {k: {"steps": steps, "summary": report.summarise(steps)} for k in ("fused", "native")}
    cfg = dict(layers=1, hidden=8, vocab_size=100, tp=2, dp=1, backend="gloo")
    return {"config": cfg, "runs": runs, "comparison": {"abs_diff_per_step": [0.0] * 5}}


def test_outputs_are_all_or_nothing(tmp_path, monkeypatch):
    out = tmp_path / "o"
    report.write_outputs(str(out), _tiny_log(), overwrite=False)
    assert sorted(os.listdir(out)) == ["log.json", "loss.png"]

    def broken_plot(log, path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "plot", broken_plot)
    out2 = tmp_path / "o2"
    with pytest.raises(RuntimeError, match="disk full"):
        report.write_outputs(str(out2), _tiny_log(), overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no o2, no partial folder
    with pytest.raises(RuntimeError):
        report.write_outputs(str(out), _tiny_log(), overwrite=True)
    assert sorted(os.listdir(out)) == ["log.json", "loss.png"]  # the old output is intact


# ------------------------------------------------------------------------------- data


def test_corpus_is_deterministic_and_tokenised():
    a = data.generate_corpus(n_words=300, n_tokens=3000, seed=7)
    b = data.generate_corpus(n_words=300, n_tokens=3000, seed=7)
    c = data.generate_corpus(n_words=300, n_tokens=3000, seed=8)
    assert a == b and a != c
    corpus = data.build_corpus(None, 300, 3000, 7)
    tok = corpus.tokenizer
    assert tok.vocab[0] == "<unk>" and 200 < len(tok) <= 300 + 3  # words, ',' and '.'
    assert int(corpus.ids.max()) == len(tok) - 1 and int(corpus.ids.min()) >= 1
    counts = torch.bincount(corpus.ids, minlength=len(tok))
    assert counts[1] >= counts[2] >= counts[len(tok) - 1]  # ids ordered by frequency
    words = data.split_words(a)[:20]
    assert tok.decode(tok.encode(" ".join(words))) == " ".join(words)
    assert tok.encode("zzzunknownzzz").tolist() == [0]


def test_batches_are_shifted_and_reproducible():
    ids = torch.arange(1000)
    s1 = data.BatchSampler(ids, seq_len=16, micro_batch=4, seed=3, dp_rank=0)
    s2 = data.BatchSampler(ids, seq_len=16, micro_batch=4, seed=3, dp_rank=0)
    s3 = data.BatchSampler(ids, seq_len=16, micro_batch=4, seed=3, dp_rank=1)
    x1, y1 = s1.next()
    x2, y2 = s2.next()
    x3, _ = s3.next()
    assert x1.shape == y1.shape == (4, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(y1[:, :-1], x1[:, 1:]) and torch.equal(y1[:, -1], x1[:, -1] + 1)


def test_lr_schedule():
    cfg = {"lr": 1.0, "warmup": 4, "steps": 20}
    assert training.lr_at(2, cfg) == pytest.approx(0.5)
    assert training.lr_at(4, cfg) == pytest.approx(1.0)
    assert training.lr_at(20, cfg) == pytest.approx(0.1)


# ------------------------------------------------------------------------------- checks before start


def test_fused_impl_checked_before_start(torchrun_env, tmp_path, capsys):
    if not fused_available():
        pytest.skip("vocab_parallel_cce.megatron is not importable")
    rc = train_gpt.main([*SMALL_DATA, "--loss", "both", "--fused-impl", "bogus", "--check",
                         "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "train_gpt.py: error: --fused-impl bogus:" in err and "'bogus'" in err, err
    assert train_gpt.main([*SMALL_DATA, "--loss", "both", "--fused-impl", "torch", "--check",
                           "--out", str(tmp_path / "o")]) == 0
    assert not (tmp_path / "o").exists()


def test_fused_modes_are_exclusive_and_reach_the_adapter(torchrun_env, tmp_path, capsys):
    """--fused-memory-first / --fused-grad-in-forward pick grad_in_forward False / True; neither: the
    adapter's default; both: a usage error. The benchmark suites name them memory / gif / default."""
    rc = train_gpt.main([*SMALL_DATA, "--loss", "both", "--fused-memory-first", "--fused-grad-in-forward",
                         "--check", "--out", str(tmp_path / "o")])
    assert rc == 2 and "choose one mode" in capsys.readouterr().err
    from gpt import model as gpt_model
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from train_suites import mode_args, mode_of

    if not fused_available():
        pytest.skip("vocab_parallel_cce.megatron is not importable")
    base = dict(loss="fused", fused_impl=None, fused_grad_in_forward=False)
    assert gpt_model.fused_loss(base)[1] == {}
    assert gpt_model.fused_loss({**base, "fused_memory_first": True})[1] == {"grad_in_forward": False}
    assert gpt_model.fused_loss({**base, "fused_grad_in_forward": True})[1] == {"grad_in_forward": True}
    assert mode_args("memory") == ["--fused-memory-first"] and mode_args("gif") == ["--fused-grad-in-forward"]
    assert mode_of({"fused_memory_first": True}) == "memory" and mode_of({}) == "default"
    with pytest.raises(SystemExit, match="unknown fused mode 'fast'"):
        mode_args("fast")


@pytest.mark.parametrize("out", ["/sys/vcce-never", "/proc/vcce-never"])
def test_unwritable_output_checked_before_start(torchrun_env, capsys, out):
    if not os.path.isdir(os.path.dirname(out)) or sys.platform != "linux":
        pytest.skip("needs Linux's /sys and /proc")
    rc = train_gpt.main([*SMALL_DATA, "--loss", "native", "--check", "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and f"--out {out}: cannot write in {os.path.dirname(out)}" in err, err
    assert not os.path.exists(out)


def test_help_shows_real_defaults_once():
    parser = cli.build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "default: False" not in text and "default: True" not in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        shown = formatter._expand_help(action) if action.help else ""
        assert shown.count("default") <= 1, shown
    assert "transformer layers (default: tiny 2, small 12)" in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_sh_help_lists_options_and_variables():
    proc = run_sh(["--help"])
    assert proc.returncode == 0, proc.stderr
    assert "--fused-impl IMPL" in proc.stdout and "(default: None)" not in proc.stdout
    for var in ("NPROC", "NNODES", "TORCH_SPEC", "TRITON_SPEC", "MCORE_SPEC", "RDZV_ENDPOINT", "RUN_DIR", "SETUP=0",
                "SKIP_CHECK=1", "SETUP_ONLY=1", "PYTHON"):
        assert re.search(rf"^\s+.*\b{re.escape(var)}\b", proc.stdout, re.M), var
    assert "#" not in proc.stdout.split("Environment:")[1]  # the comment marks are stripped
    assert "set -euo" not in proc.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_sh_error_line_ends_with_the_message():
    proc = run_sh(["--loss", "native"], NPROC="two")
    assert proc.returncode == 2
    assert proc.stderr.rstrip().splitlines()[-1] == "run.sh: error: NPROC must be a positive integer, got 'two'"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_pins_compare_versions_not_imports():
    """Both set-up scripts take their pins from launch/pins.sh, which compares installed versions."""
    for script in ("launch/run.sh", "tests/run.sh"):
        with open(os.path.join(ROOT, script)) as f:
            text = f.read()
        assert "source launch/pins.sh" in text and "pins_ensure" in text, script
        assert not re.search(r"^\s*(TORCH|TRITON|MCORE)_SPEC=", text, re.M), script  # no second set of pins
    torch_version = importlib.metadata.version("torch")
    script = ('source launch/pins.sh; pins_unmet "$PY" torch==0.0.1 torch "torch==$TV" no-such-package==1 ""; '
              'echo "pins: $TORCH_SPEC $TRITON_SPEC $MCORE_SPEC"')
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=child_env(PY=sys.executable, TV=torch_version.split("+")[0], TORCH_SPEC="",
                                        TRITON_SPEC="", MCORE_SPEC=""))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == [f"torch==0.0.1\t{torch_version}", "no-such-package==1\tnone"]
    assert lines[2].startswith("pins: torch==")  # the defaults, as no spec was given


# ------------------------------------------------------------------------------- loss.png


def test_comparison_shows_a_drift():
    steps = lambda losses: [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]  # noqa: E731
    native = [5.0] * 40
    fused = [5.0 + (1e-4 * i if i >= 20 else 0.0) for i in range(40)]  # equal, then drifting upwards
    cmp = report.compare({"fused": {"steps": steps(fused)}, "native": {"steps": steps(native)}})
    assert cmp["smoothing_window"] == 4 and cmp["diff_per_step"][:20] == [0.0] * 20
    assert cmp["mean_diff_last_window"] == pytest.approx(1e-4 * 37.5)
    assert cmp["max_abs_diff"] == pytest.approx(39e-4) and cmp["max_abs_diff_first_5"] == 0.0


def test_plot_labels_every_panel(tmp_path, monkeypatch):
    import matplotlib.figure

    figures = []
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *a, **k):
        figures.append(fig)
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    log = _tiny_log()
    log["runs"]["fused"]["steps"] = [dict(r, loss=r["loss"] + (1e-6 if r["step"] > 2 else 0.0))
                                     for r in log["runs"]["native"]["steps"]]
    report.plot(log, str(tmp_path / "loss.png"))
    (fig,) = figures
    assert len(fig.axes) == 3
    for ax in fig.axes:
        assert ax.get_xlabel() == "step" and ax.get_ylabel() and ax.get_title()
    assert "exactly equal (2 steps)" in [t.get_text() for t in fig.axes[2].get_legend().get_texts()]
    assert any("resident set size" in t.get_text() for t in fig.texts)  # what "peak MB" means on CPU
