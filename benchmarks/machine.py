"""The machine a result was measured on: GPU, driver, versions, host; and its key in results/.

`machine_info()` reads the GPU's name and driver from nvidia-smi where it can (no CUDA context in a
process that needs none); `machine_key(info)` names its folder: the GPU model in lower case, with
×count when several are visible ("h100", "h200", "h100x8", "rtx-4090", "cpu").
"""

from __future__ import annotations

import datetime
import platform
import re
import subprocess
from importlib.metadata import PackageNotFoundError, version

import torch

PACKAGES = ("vocab_parallel_cce", "triton", "liger-kernel", "cut-cross-entropy", "megatron-core", "transformers")


def machine_info() -> dict:
    """{gpu, gpu_count, driver, cuda, torch, triton, python, host, packages...} (no tensors made)."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
            "cuda_available": torch.cuda.is_available()}
    for pkg in PACKAGES:
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    if torch.cuda.is_available():
        info["device_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
        try:
            first = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.splitlines()[0]
            info["device_name"], info["driver"] = (x.strip() for x in first.split(",", 1))
        except Exception:  # noqa: BLE001  (no nvidia-smi: the name from torch, no driver)
            info["driver"] = None
        if not info.get("device_name"):
            info["device_name"] = torch.cuda.get_device_name()
    return info


def gpu_state() -> dict | None:
    """The first GPU's SM clock (MHz), power draw and limit (W) and active clock-throttle reasons
    (a hex mask; 0x4 = the power cap) by nvidia-smi, taken right after timed rounds to say at what
    clock they ran; None without nvidia-smi or on any failure."""
    query = "clocks.sm,power.draw,power.limit,clocks_throttle_reasons.active"
    try:
        line = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20).stdout.splitlines()[0]
        mhz, watts, limit, reasons = (x.strip() for x in line.split(","))
        return {"sm_mhz": float(mhz), "power_w": float(watts), "power_limit_w": float(limit), "throttle": reasons}
    except Exception:  # noqa: BLE001
        return None


_NOISE = re.compile(r"^(nvidia|geforce|tesla|\d+gb|hbm\d*e?|sxm\d*)$")


def machine_key(info: dict) -> str:
    """'NVIDIA H100 80GB HBM3' → 'h100'; 4 visible → 'h100x4'; no GPU → 'cpu'."""
    name = info.get("device_name")
    if not name:
        return "cpu"
    words = [w for w in re.split(r"[^0-9a-z]+", name.lower()) if w and not _NOISE.match(w)]
    key = "-".join(words) or "gpu"
    count = info.get("device_count") or 1
    return key + (f"x{count}" if count > 1 else "")


def describe(info: dict) -> str:
    """One line: GPU × count, driver, torch, triton, python, host."""
    gpu = f"{info['device_name']}" + (f" × {info['device_count']}" if (info.get("device_count") or 1) > 1 else "") \
        if info.get("device_name") else "CPU"
    parts = [gpu, f"driver {info.get('driver')}" if info.get("driver") else None,
             f"torch {info.get('torch')}" if info.get("torch") else None,
             f"triton {info.get('triton')}" if info.get("triton") else None,
             f"python {info.get('python')}" if info.get("python") else None,
             f"host {info.get('host')}" if info.get("host") else None]
    return ", ".join(p for p in parts if p)


def today() -> str:
    return datetime.date.today().isoformat()


def write_experiment(out: str, doc: dict, text: str) -> None:
    """An experiment's record: OUT/NAME.json (doc, NAME = doc["name"], as `tables.save_json` writes
    it) and OUT/NAME.md (text), and the text printed."""
    import os

    from tables import save_json

    os.makedirs(out, exist_ok=True)
    save_json(doc, os.path.join(out, doc["name"] + ".json"))
    with open(os.path.join(out, doc["name"] + ".md"), "w") as f:
        f.write(text)
    print(text)


def reproducible(command: str) -> str:
    """The command without its --out folder (where the results went is no part of what they are)."""
    import shlex

    try:
        words = shlex.split(command)
    except ValueError:
        return command
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w == "--out":
            skip = True
        elif not w.startswith("--out="):
            out.append(w)
    return shlex.join(out)


def header(doc: dict, what: str, intro: str = "") -> list[str]:
    """A result table's head: title (suite, GPU, date), the machine and packages, the command that
    reproduces it, then `intro` (what the table measures)."""
    m = doc.get("machine") or {}
    peers = ", ".join(f"{p} {m[p]}" for p in ("liger-kernel", "cut-cross-entropy", "megatron-core") if m.get(p))
    lines = [f"# {what}: {m.get('device_name') or 'CPU'}, {doc.get('date', '')}", "",
             describe(m) + (f"; {peers}" if peers else "") + ".", ""]
    merged = [c for c in doc.get("merged_from") or [] if c]
    if merged:
        lines += [f"Reproduce (merged from {len(merged)} runs): " + "; ".join(f"`{reproducible(c)}`" for c in merged), ""]
    elif doc.get("command"):
        lines += [f"Reproduce: `{reproducible(doc['command'])}`", ""]
    if doc.get("converted_from"):
        lines += [f"({doc['converted_from']})", ""]
    if doc.get("note"):
        lines += [doc["note"], ""]
    return lines + ([intro, ""] if intro else [])
