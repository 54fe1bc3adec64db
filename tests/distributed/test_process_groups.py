"""The test suite's process-group starter (tests/support/process_groups.py's run_group) itself."""

from __future__ import annotations

import gc

import torch.distributed as dist

from support.process_groups import failures, run_group


def _collect(rank, world):
    gc.collect()  # finalises whatever garbage this rank's collector sees; returns only if that ends
    return [("collected", True, "")]


def test_forked_ranks_never_finalise_the_parents_objects():
    """A TCPStore that is garbage in the parent (in a cycle, so only a collection frees it) when the
    ranks fork: its destructor joins a server thread that exists only in the parent, so a rank that
    collected it would wait forever. start_ranks freezes the parent's objects out of the ranks'
    collector."""
    gc.disable()  # the cycle must still be there when the ranks fork
    try:
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
        cycle = [store]
        cycle.append(cycle)
        del store, cycle
        results = run_group(_collect, 2, timeout_s=30)
    finally:
        gc.enable()
        gc.collect()  # here, in the parent, the store's thread exists: it stops
    assert not failures(results), failures(results)
    assert all(len(r) == 1 for r in results.values())
