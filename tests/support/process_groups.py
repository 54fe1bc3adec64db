"""Start a gloo process group from pytest and collect each rank's results.

`run_group(fn, world_size)` starts `world_size` processes (forked, or spawned where a fork would
not do: `_start_method`), each runs `fn(rank, world_size, *args)` inside an initialised gloo group
and returns a list of (case name, ok, message) tuples; the parent gets {rank: results} (a rank
that crashed or hung appears with a single failing entry). Rank 0 hosts the group's TCPStore on a
port the system picks and binds at once (`join_group`): no other group (`pytest -n auto`, a test's
own torchrun) can take it between its choice and its use.
"""

from __future__ import annotations

import datetime
import gc
import os
import queue as queue_mod
import time
import traceback

import torch.multiprocessing as mp

PG_TIMEOUT_S = 60


def join_group(backend: str, rank: int, world_size: int, port_q) -> None:
    """init_process_group through a TCPStore that rank 0 hosts on a port the system picks (port 0,
    bound at once: no other process can take it between its choice and its use); rank 0 hands the
    port to the other ranks through `port_q` (a multiprocessing queue of the parent's)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=PG_TIMEOUT_S)
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False, timeout=timeout)
        for _ in range(world_size - 1):
            port_q.put(store.port)
    else:
        store = dist.TCPStore("127.0.0.1", port_q.get(timeout=PG_TIMEOUT_S), world_size, is_master=False,
                              timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def start_ranks(procs) -> None:
    """Start the rank processes with this process's objects frozen out of the garbage collector
    while they fork: a forked child must never finalise what it inherited (a TCPStore's destructor
    joins a server thread that exists only in the parent, and would wait forever)."""
    gc.freeze()
    try:
        for p in procs:
            p.start()
    finally:
        gc.unfreeze()


def _entry(rank, world_size, port_q, fn, args, env, out_q, backend="gloo"):
    os.environ.update(env)  # before anything imports triton (TRITON_INTERPRET is read at import/jit time)
    results = []
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        join_group(backend, rank, world_size, port_q)
        try:
            results = list(fn(rank, world_size, *args))
            # no rank tears the group down while another is still joining it: a rank whose fn runs
            # no collective otherwise closes its gloo pairs under a peer's connectFullMesh
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 -- report everything to the parent
        results.append(("<worker>", False, traceback.format_exc()))
    out_q.put((rank, results))


def _start_method(env: dict | None, backend: str) -> str:
    """"fork" where a child of this process is what the rank needs: a gloo rank whose environment
    is this process's (TRITON_INTERPRET included: triton reads it when it loads, and the child
    inherits the loaded modules). Forked ranks start in milliseconds; spawned ones import torch,
    triton and the library again (seconds each). "spawn" for NCCL (CUDA does not survive a fork)
    and for an environment of its own."""
    same_env = all(os.environ.get(k) == v for k, v in (env or {}).items())
    return "fork" if backend == "gloo" and same_env and os.name == "posix" else "spawn"


def run_group(fn, world_size: int, *args, env: dict | None = None, timeout_s: float = 240.0,
              backend: str = "gloo"):
    """Run `fn` on `world_size` gloo ranks (backend="nccl": one GPU each, rank r on cuda:r);
    return {rank: [(name, ok, message), ...]}."""
    ctx = mp.get_context(_start_method(env, backend))
    out_q, port_q = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port_q, fn, args, dict(env or {}), out_q, backend), daemon=True)
        for r in range(world_size)
    ]
    start_ranks(procs)
    results: dict[int, list] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < world_size:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            rank, res = out_q.get(timeout=min(left, 1.0))
            results[rank] = res
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs) and out_q.empty():
                break
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()) if len(results) == world_size else 1.0)
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join(5)
        if r not in results:
            results[r] = [("<worker>", False, f"rank {r} gave no result (exit code {p.exitcode}; hung or crashed)")]
    return results


def record(results: list, name: str, fn) -> None:
    """Inside a rank: run the check `fn` (it returns a list of problems, empty when it passes) and
    append (name, ok, message) to `results`; an exception becomes a failing entry with its traceback."""
    try:
        problems = fn()
        results.append((name, not problems, "; ".join(problems)))
    except Exception:  # noqa: BLE001
        results.append((name, False, traceback.format_exc()))


def failures(results: dict) -> list[str]:
    """Every failing entry of run_group's {rank: results}, as "[rank r] name: message" lines."""
    out = []
    for rank in sorted(results):
        for name, ok, msg in results[rank]:
            if not ok:
                out.append(f"[rank {rank}] {name}: {msg}")
    return out

