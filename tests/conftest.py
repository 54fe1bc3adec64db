"""Shared pytest set-up: tests/ on sys.path (for the `support` package, also in spawned ranks), each
xdist worker's thread count, the Triton interpreter on machines without a GPU, the same start for
every test, and the `gpu` marker's skip without CUDA (the markers are listed in pyproject.toml).

The test folders (api, paths, backends, distributed, integrations, launch, gpu) are not packages:
pytest imports each test module by its file name, so those names are unique across tests/."""

from __future__ import annotations

import os
import random
import sys
import zlib

import pytest


def _threads_per_worker() -> None:
    """Under pytest-xdist, each worker's share of the cores as its thread count (OpenMP, MKL,
    OpenBLAS), unless the environment sets one: -n auto runs one worker per core, and more threads
    per worker only contend (idle OpenMP threads spin), costing a third of the suite's CPU time on
    2 cores. Set before torch (and numpy) load their thread pools."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(max(1, cores // int(workers))))


_threads_per_worker()

import torch  # noqa: E402

# Without a GPU the Triton kernels can only run in the interpreter, and triton decides that when a
# kernel is first decorated: switch it on before any test module imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)


def pytest_collection_modifyitems(config, items):
    gpu = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("gpu") is not None and not gpu:  # a mark, not a name: tests/gpu/ is one
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def _seed_of(request) -> int:
    return zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF


@pytest.fixture(autouse=True)
def _same_start_in_any_order(request):
    """Every test starts from the same state whatever ran before it in its worker (pytest -n, any
    --dist): torch's and Python's generators seeded from its id, and the library's process-wide
    state empty (the adaptive tile-skip policy's measurements, the path counters, the layout cache
    of process groups), where those modules are loaded."""
    s = _seed_of(request)
    torch.manual_seed(s)
    random.seed(s)
    backend = sys.modules.get("vocab_parallel_cce.backends.triton")  # loaded without its former name too
    if backend is not None:
        backend.skip_policy.reset()
        backend.counters.clear()
    distributed = sys.modules.get("vocab_parallel_cce.distributed")
    if distributed is not None:
        distributed.clear_layout_cache()
    yield


@pytest.fixture
def seed(request) -> int:
    """A seed derived from the test's id, so every test draws its own fresh inputs, reproducibly
    (torch's generator is seeded with it before every test)."""
    s = _seed_of(request)
    torch.manual_seed(s)
    return s


@pytest.fixture(autouse=True)
def _no_autocast_leak():
    yield
    assert not torch.is_autocast_enabled("cpu"), "a test left CPU autocast enabled"
