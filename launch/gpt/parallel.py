"""Process group, Megatron's model-parallel state, the CPU shim, and the gradient collectives."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket

import torch

from .args import DistInitError


class _CpuRNGStatesTracker:
    """Stand-in for Megatron's CudaRNGStatesTracker on a machine without CUDA: named CPU generator
    states, forked around tensor-parallel regions (e.g. dropout), as the CUDA tracker does."""

    def __init__(self):
        self.states_ = {}

    def is_initialized(self):
        return bool(self.states_)

    def reset(self):
        self.states_ = {}

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self.states_ = dict(states)

    def add(self, name, seed):
        if name in self.states_:
            raise Exception(f"cpu rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"cpu rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def install_cpu_shims(seed: int, tp_rank: int) -> None:
    """Let Megatron-core run on CPU: only used when the run has no GPU (--device cpu).

    Megatron-core allocates communication buffers on `torch.cuda.current_device()` and forks the
    CUDA RNG for tensor-parallel regions. Without CUDA we point the former at the CPU and replace
    the RNG tracker with one that keeps CPU generator states (seeded as
    model_parallel_cuda_manual_seed seeds the CUDA one).
    """
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"
    tracker = _CpuRNGStatesTracker()
    tracker.add(getattr(mrandom, "_DATA_PARALLEL_RNG_TRACKER_NAME", "data-parallel-rng"), seed)
    tracker.add(getattr(mrandom, "_MODEL_PARALLEL_RNG_TRACKER_NAME", "model-parallel-rng"), seed + 2718 + tp_rank)
    tracker.add(getattr(mrandom, "_EXPERT_PARALLEL_RNG_TRACKER_NAME", "expert-parallel-rng"), seed + 1024)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def init_distributed(cfg: dict):
    import torch.distributed as dist

    if cfg["world"] == 1 and "MASTER_ADDR" not in os.environ:
        # Plain `python launch/train_gpt.py`: a group of one on a free local port.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    if cfg["device"] == "cuda":
        torch.cuda.set_device(cfg["local_rank"])
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(cfg["backend"], rank=cfg["rank"], world_size=cfg["world"],
                                timeout=datetime.timedelta(seconds=cfg["dist_timeout"]))
        # A first collective, so that a missing rank shows up here rather than mid-training.
        probe = torch.ones(1, device="cuda" if cfg["device"] == "cuda" else "cpu")
        dist.all_reduce(probe)
    except (RuntimeError, TimeoutError, ValueError, OSError) as exc:  # DistStoreError is a RuntimeError
        first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        raise DistInitError(
            f"could not form the process group of {cfg['world']} rank(s) through {where} "
            f"({cfg['backend']}, timeout {cfg['dist_timeout']:.0f}s): {first}. Check that every node was "
            f"started, that the rendezvous address is reachable from this node, and that the port is open."
        ) from exc

    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=cfg["tp"])
    if cfg["device"] == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(cfg["seed"])
    else:
        install_cpu_shims(cfg["seed"], ps.get_tensor_model_parallel_rank())
    return ps


def sync_grads(params, ps, dp: int) -> None:
    """Sum sequence-parallel parameters' gradients over the TP group; average all over the DP group."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    def reduce(grads, group, scale):
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        if scale != 1:
            flat.mul_(scale)
        for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(r)

    if ps.get_tensor_model_parallel_world_size() > 1:
        reduce([p.grad for p in params if getattr(p, "sequence_parallel", False) and p.grad is not None],
               ps.get_tensor_model_parallel_group(), 1)
    if dp > 1:
        reduce([p.grad for p in params if p.grad is not None], ps.get_data_parallel_group(), 1.0 / dp)


def clip_grads(params, ps, max_norm: float) -> float:
    """Clip by the global gradient norm: TP-sharded parameters summed over the TP group, replicated
    ones counted once."""
    import torch.distributed as dist

    grads_sharded = [p.grad for p in params if p.grad is not None and getattr(p, "tensor_model_parallel", False)]
    grads_repl = [p.grad for p in params if p.grad is not None and not getattr(p, "tensor_model_parallel", False)]
    dev = (grads_sharded or grads_repl)[0].device
    sq = torch.zeros(2, dtype=torch.float32, device=dev)
    for g in grads_sharded:
        sq[0] += g.float().pow(2).sum()
    for g in grads_repl:
        sq[1] += g.float().pow(2).sum()
    if ps.get_tensor_model_parallel_world_size() > 1:
        shard = sq[:1].clone()
        dist.all_reduce(shard, group=ps.get_tensor_model_parallel_group())
        sq[0] = shard[0]
    norm = float((sq[0] + sq[1]).sqrt())
    if max_norm > 0 and norm > max_norm:
        for g in grads_sharded + grads_repl:
            g.mul_(max_norm / (norm + 1e-6))
    return norm
