"""Child processes: programs the suites drive (torchrun, pytest, training runs) and the suites'
own measuring processes.

`run_logged` runs a command with its output echoed and saved, killed past a timeout.
`run_child` runs one suite's measuring function in a fresh process (`run.py _child CONFIG.json`):
a crash, a sticky CUDA error or a hang there costs that process only; what it measured is saved
after every row (`save_part`) and read back even when it failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from tables import save_json

HERE = os.path.dirname(os.path.abspath(__file__))
GRACE_S = 40.0  # a child still running this long past its deadline is stopped (its saved rows kept)


def run_logged(cmd: list[str], log_path: str, timeout: float | None = None, env: dict | None = None,
               cwd: str | None = None, echo: bool = True) -> tuple[int, str]:
    """Run `cmd`, echoing its output (unless `echo` is False) and saving it to `log_path`; (return
    code, its last lines).
    Past `timeout` seconds its process group is killed and the return code is 124."""
    tail: list[str] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env, cwd=cwd, start_new_session=True)

        def pump():
            for line in proc.stdout:
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                log.write(line)
                tail.append(line.rstrip("\n"))
                del tail[:-30]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
        reader.join(timeout=10)
    return rc, "\n".join(tail)


def run_child(suite: str, args, group: list, deadline: float, part_path: str, log_path: str,
              config_path: str) -> tuple[dict | None, dict | None]:
    """Measure `group` (the suite's unit: kinds, or (shape, kind) cases) in a child process that
    stops starting new work at `deadline` (epoch seconds) and is killed GRACE_S later.
    Returns (its saved part or None, a failure record or None)."""
    save_json({"suite": suite, "args": vars(args), "group": group, "deadline": deadline, "part": part_path},
              config_path)
    if os.path.exists(part_path):
        os.remove(part_path)
    rc, tail = run_logged([sys.executable, os.path.join(HERE, "run.py"), "_child", config_path], log_path,
                          timeout=max(30.0, deadline + GRACE_S - time.time()))
    part = None
    if os.path.exists(part_path):
        with open(part_path) as f:
            part = json.load(f)
    failure = None
    if rc != 0 or part is None:
        failure = {"group": group, "returncode": rc, "log_tail": tail,
                   **({} if part is not None else {"error": "the process wrote no results"})}
    return part, failure


def child_main(config_path: str, measure_of) -> int:
    """Entry of a child: CONFIG.json names the suite, its parsed arguments, the group, the deadline;
    `measure_of(suite)` is the suite's `measure(args, group, deadline, save_part)`."""
    import argparse

    with open(config_path) as f:
        cfg = json.load(f)
    measure_of(cfg["suite"])(argparse.Namespace(**cfg["args"]), cfg["group"], cfg["deadline"],
                             lambda part: save_json(part, cfg["part"]))
    return 0
