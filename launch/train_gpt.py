#!/usr/bin/env python
"""Train a Megatron-core GPT with tensor (and sequence) parallelism, with our fused loss or Megatron's.

Run it under torchrun, one process per GPU (NCCL) or, on a machine with no GPU, one process per
CPU rank (gloo):

    torchrun --nproc-per-node 2 launch/train_gpt.py --loss both --out runs/demo

`--loss both` trains twice from the same initial weights and the same batches, first with the
fused loss (vocab_parallel_cce.megatron.patch_gpt_model) and then with Megatron's own
vocab-parallel cross-entropy, and plots both loss curves. Rank 0 prints a progress bar with the
loss, tokens/s and the peak memory of every rank; at the end it writes OUT/log.json and
OUT/loss.png. OUT is written under a temporary name and renamed when complete, so a failed run
leaves nothing half-written. `--check` validates the arguments, the output folder and the data
without starting any process group (launch/run.sh uses it before calling torchrun).

Exit status: 0 success; 2 bad arguments or inconsistent sizes; 3 the process group could not be
formed (unreachable rendezvous / timeout); 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import resource
import shutil
import signal
import socket
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as data_mod  # noqa: E402  (launch/data.py, next to this file)

EXIT_USAGE, EXIT_DIST = 2, 3

# Defaults per preset; every value can be overridden by its flag. "auto" = tiny without a GPU.
PRESETS = {
    "tiny": dict(layers=2, hidden=64, heads=8, ffn_hidden=256, seq_len=64, micro_batch=8, steps=60,
                 lexicon=8000, corpus_tokens=400_000, lr=1e-2, warmup=5, dtype="fp32"),
    "small": dict(layers=12, hidden=1024, heads=16, ffn_hidden=4096, seq_len=1024, micro_batch=8,
                  steps=300, lexicon=32000, corpus_tokens=2_000_000, lr=6e-4, warmup=30, dtype="bf16"),
}


class UsageError(Exception):
    """Bad arguments or inconsistent sizes: exit status 2."""


class DistInitError(Exception):
    """The process group could not be formed: exit status 3."""


# --------------------------------------------------------------------------------------------
# Arguments and validation (no process group needed)
# --------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train_gpt.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model (defaults come from --preset)")
    g.add_argument("--preset", choices=["auto", "tiny", "small"], default="auto",
                   help="'tiny' (CPU demo: 2 layers, hidden 64), 'small' (12 layers, hidden 1024); auto: "
                        "small with GPUs, tiny without")
    g.add_argument("--layers", type=int)
    g.add_argument("--hidden", type=int, help="hidden size")
    g.add_argument("--heads", type=int, help="attention heads (tp must divide it)")
    g.add_argument("--ffn-hidden", type=int, help="MLP hidden size (tp must divide it)")
    g.add_argument("--seq-len", type=int, help="sequence length")
    g.add_argument("--vocab-size", type=int,
                   help="model vocabulary before padding (default: the tokenizer's size; must cover the data's ids)")
    g.add_argument("--tie-embeddings", action="store_true", help="share input embedding and output layer weights")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tp", type=int, help="tensor-parallel size (default: the processes of one node, "
                                           "LOCAL_WORLD_SIZE); the rest of the world is data-parallel")
    g.add_argument("--sequence-parallel", dest="sequence_parallel", action="store_true", default=None,
                   help="Megatron sequence parallelism (default: on when tp > 1)")
    g.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_false")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: one GPU per process (NCCL) when GPUs are present, else CPU (gloo)")
    g.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds to wait for the other ranks (process-group set-up and collectives)")
    g = p.add_argument_group("training")
    g.add_argument("--loss", choices=["fused", "native", "both"], default="both",
                   help="fused: vocab_parallel_cce; native: Megatron's vocab-parallel cross-entropy; "
                        "both: fused then native from the same initial weights and batches")
    g.add_argument("--fused-impl", default=None,
                   help="impl= for the fused loss (auto, torch, triton, ...; default: the library's)")
    g.add_argument("--fused-grad-in-forward", action="store_true",
                   help="the fused loss computes its gradients during the forward (grad_in_forward=True: "
                        "fewer FLOPs, more memory; this script's loss is a plain mean, which it needs)")
    g.add_argument("--native-fused-ce", action="store_true",
                   help="native runs use Megatron's fused vocab-parallel cross-entropy "
                        "(cross_entropy_loss_fusion=True) instead of its unfused one")
    g.add_argument("--micro-batch", type=int, help="sequences per data-parallel rank per step")
    g.add_argument("--steps", type=int, help="optimizer steps per loss type")
    g.add_argument("--lr", type=float, help="peak learning rate (AdamW; linear warm-up, cosine decay to 10%%)")
    g.add_argument("--warmup", type=int, help="warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    g.add_argument("--dtype", choices=["fp32", "bf16"], help="parameter/compute dtype (bf16 keeps fp32 master "
                                                              "weights); default fp32 on CPU, bf16 on GPU")
    g.add_argument("--seed", type=int, default=1234, help="seed of the weights and of the batches")
    g = p.add_argument_group("data")
    g.add_argument("--corpus", help="train on this UTF-8 text file (word-level tokenised) instead of the "
                                    "generated corpus")
    g.add_argument("--lexicon", type=int, help="words in the generated corpus's lexicon (~vocabulary size)")
    g.add_argument("--corpus-tokens", type=int, help="tokens in the generated corpus")
    g.add_argument("--data-seed", type=int, default=1234, help="seed of the generated corpus")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="output folder for log.json and loss.png; its parent must exist "
                                 "(default: runs/gpt-<date>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    g.add_argument("--log-interval", type=int, default=0,
                   help="print a progress line every N steps when stdout is not a terminal (0: ~10 lines per run)")
    g.add_argument("--check", action="store_true",
                   help="validate arguments, output folder and data, then exit (no process group)")
    g.add_argument("--verbose", action="store_true", help="keep Megatron's warnings")
    return p.parse_args(argv)


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise UsageError(f"environment variable {name}={v!r} is not an integer") from None


def resolve(args: argparse.Namespace) -> dict:
    """Fill defaults, read torchrun's environment, and check that all sizes are consistent."""
    rank, world = env_int("RANK", 0), env_int("WORLD_SIZE", 1)
    local_rank = env_int("LOCAL_RANK", 0)
    local_world = env_int("LOCAL_WORLD_SIZE", world)
    if not (0 <= rank < world and 0 <= local_rank < local_world <= world):
        raise UsageError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} "
                         f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}")

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = args.device
    if device == "auto":
        device = "cuda" if n_gpus > 0 else "cpu"
    if device == "cuda":
        if n_gpus == 0:
            raise UsageError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
        if local_world > n_gpus:
            raise UsageError(f"{local_world} processes on this node but only {n_gpus} GPU(s): run one process "
                             f"per GPU (torchrun --nproc-per-node {n_gpus})")

    preset = args.preset if args.preset != "auto" else ("small" if device == "cuda" else "tiny")
    cfg = dict(PRESETS[preset])
    for key in list(cfg):
        val = getattr(args, key, None)
        if val is not None:
            cfg[key] = val
    cfg["preset"] = preset

    for key in ("layers", "hidden", "heads", "ffn_hidden", "seq_len", "micro_batch", "steps", "lexicon",
                "corpus_tokens"):
        if cfg[key] <= 0:
            raise UsageError(f"--{key.replace('_', '-')} must be > 0, got {cfg[key]}")
    if cfg["warmup"] < 0 or cfg["lr"] <= 0:
        raise UsageError(f"--lr must be > 0 and --warmup >= 0, got {cfg['lr']} and {cfg['warmup']}")
    if args.dist_timeout <= 0:
        raise UsageError(f"--dist-timeout must be > 0, got {args.dist_timeout}")
    if cfg["hidden"] % cfg["heads"]:
        raise UsageError(f"--heads {cfg['heads']} does not divide --hidden {cfg['hidden']}")

    tp = args.tp if args.tp is not None else local_world
    if tp <= 0:
        raise UsageError(f"--tp must be > 0, got {tp}")
    if world % tp:
        raise UsageError(f"--tp {tp} does not divide the number of processes ({world}); with torchrun "
                         f"--nproc-per-node N, use a tp that divides N x nodes")
    if cfg["heads"] % tp:
        raise UsageError(f"--tp {tp} does not divide the {cfg['heads']} attention heads (--heads)")
    if cfg["ffn_hidden"] % tp:
        raise UsageError(f"--tp {tp} does not divide the MLP hidden size {cfg['ffn_hidden']} (--ffn-hidden)")
    sp = args.sequence_parallel if args.sequence_parallel is not None else tp > 1
    if sp and tp == 1:
        sp = False  # nothing to split
    if sp and cfg["seq_len"] % tp:
        raise UsageError(f"sequence parallelism needs --tp {tp} to divide --seq-len {cfg['seq_len']} "
                         f"(or pass --no-sequence-parallel)")
    if args.vocab_size is not None and args.vocab_size <= 0:
        raise UsageError(f"--vocab-size must be > 0, got {args.vocab_size}")
    if args.corpus and not os.path.isfile(args.corpus):
        raise UsageError(f"--corpus {args.corpus}: no such file")
    if args.fused_impl is not None and args.loss == "native":
        raise UsageError("--fused-impl only applies to --loss fused or both")
    if args.fused_grad_in_forward and args.loss == "native":
        raise UsageError("--fused-grad-in-forward only applies to --loss fused or both")

    cfg.update(rank=rank, world=world, local_rank=local_rank, local_world=local_world, tp=tp, dp=world // tp,
               sequence_parallel=sp, device=device, backend="nccl" if device == "cuda" else "gloo",
               loss=args.loss, seed=args.seed, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
               tie_embeddings=args.tie_embeddings, fused_impl=args.fused_impl, corpus=args.corpus,
               native_fused_ce=args.native_fused_ce, fused_grad_in_forward=args.fused_grad_in_forward,
               data_seed=args.data_seed, dist_timeout=args.dist_timeout)
    return cfg


def check_output_dir(out: str | None, overwrite: bool) -> str:
    """Return the absolute output path; refuse one we cannot (or must not) write. Creates nothing,
    except the default's parent `runs/`."""
    if out is None:
        os.makedirs("runs", exist_ok=True)
        out = os.path.join("runs", datetime.datetime.now().strftime("gpt-%Y%m%d-%H%M%S"))
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: the folder it goes in, {parent}, does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write in {parent}")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"--out {out}: exists and is not a folder")
        if os.listdir(out) and not overwrite:
            raise UsageError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")
    return out


def load_data(cfg: dict, vocab_size_arg: int | None) -> data_mod.Corpus:
    corpus = data_mod.build_corpus(cfg["corpus"], cfg["lexicon"], cfg["corpus_tokens"], cfg["data_seed"])
    n_ids = int(corpus.ids.max()) + 1
    if corpus.ids.numel() < cfg["seq_len"] + 2:
        raise UsageError(f"the corpus has {corpus.ids.numel()} tokens, too few for --seq-len {cfg['seq_len']}")
    vocab = vocab_size_arg if vocab_size_arg is not None else len(corpus.tokenizer)
    if vocab < n_ids:
        raise UsageError(f"--vocab-size {vocab} is smaller than the data's ids (the tokenizer produces ids up to "
                         f"{n_ids - 1}); use --vocab-size >= {n_ids} or leave it out")
    multiple = 128 * cfg["tp"]
    cfg.update(vocab_size=vocab, padded_vocab_size=math.ceil(vocab / multiple) * multiple,
               data=corpus.description, corpus_size=corpus.ids.numel())
    return corpus


# --------------------------------------------------------------------------------------------
# Process group, and the CPU shim for Megatron-core
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def layer_spec(cfg: dict):
    """Megatron-core's local GPT layer spec. With sequence parallelism its torch LayerNorm refuses
    to run, so the norms are swapped for a LayerNorm that marks its parameters `sequence_parallel`
    (their gradients are then summed over the tensor-parallel group, see sync_grads)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec()
    if not cfg["sequence_parallel"]:
        return spec
    import copy

    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    class SequenceParallelLayerNorm(torch.nn.LayerNorm):
        def __init__(self, config, hidden_size, eps=1e-5, **_unused):
            super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
            for p in self.parameters():
                p.sequence_parallel = True

    spec = copy.deepcopy(spec)
    spec.submodules.input_layernorm = SequenceParallelLayerNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * cfg["layers"], layer_norm=SequenceParallelLayerNorm)


def build_model(cfg: dict, loss: str = "fused"):
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    bf16 = cfg["dtype"] == "bf16"
    config = TransformerConfig(
        num_layers=cfg["layers"], hidden_size=cfg["hidden"], num_attention_heads=cfg["heads"],
        ffn_hidden_size=cfg["ffn_hidden"], tensor_model_parallel_size=cfg["tp"],
        sequence_parallel=cfg["sequence_parallel"], hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=cfg["device"] == "cpu", bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        cross_entropy_loss_fusion=loss == "native" and cfg.get("native_fused_ce", False),
    )
    torch.manual_seed(cfg["seed"])
    model = GPTModel(
        config=config, transformer_layer_spec=layer_spec(cfg), vocab_size=cfg["padded_vocab_size"],
        max_sequence_length=cfg["seq_len"], parallel_output=True,
        share_embeddings_and_output_weights=cfg["tie_embeddings"], position_embedding_type="learned_absolute",
    )
    if bf16:
        model.bfloat16()  # as Megatron's Float16Module does: norms and all, one dtype
    if cfg["device"] == "cuda":
        model.cuda()
    return model


def fused_patcher():
    """vocab_parallel_cce.megatron.patch_gpt_model, or None with the reason it is unavailable."""
    try:
        from vocab_parallel_cce.megatron import patch_gpt_model
    except ImportError as exc:
        return None, f"vocab_parallel_cce.megatron is not importable ({exc})"
    return patch_gpt_model, ""


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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


class Progress:
    """A tiny progress bar, printed by rank 0: redrawn in place on a terminal, one line per
    `interval` steps otherwise."""

    def __init__(self, label: str, total: int, interval: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = sys.stdout.isatty()
        self.interval = interval if interval > 0 else max(1, total // 10)
        self.t0 = time.perf_counter()

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * step / self.total)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / step * (self.total - step)
        line = (f"{self.label:>6} [{'#' * filled}{'.' * (width - filled)}] {step:>{len(str(self.total))}}/"
                f"{self.total} {text} | {elapsed:.0f}s<{eta:.0f}s")
        if self.tty:  # redraw in place; cut to the terminal's width so that \r can return
            cols = shutil.get_terminal_size((120, 24)).columns
            print("\r" + line[: cols - 1].ljust(cols - 1), end="\n" if step == self.total else "", flush=True)
        elif step % self.interval == 0 or step == self.total or step == 1:
            print(line, flush=True)


def lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up to lr, then cosine decay to lr/10 at the last step (step counts from 1)."""
    if cfg["warmup"] and step <= cfg["warmup"]:
        return cfg["lr"] * step / cfg["warmup"]
    span = max(1, cfg["steps"] - cfg["warmup"])
    progress = min(1.0, (step - cfg["warmup"]) / span)
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: dict, loss_kind: str, corpus, ps, init_state) -> tuple[list[dict], dict]:
    """Train one model for cfg['steps'] steps; return the per-step records (identical on all ranks)
    and the initial state dict (to start the next loss type from the same weights)."""
    import torch.distributed as dist

    device = torch.device("cuda", cfg["local_rank"]) if cfg["device"] == "cuda" else torch.device("cpu")
    model = build_model(cfg, loss_kind)
    if init_state is None:
        init_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                      if isinstance(v, torch.Tensor)}
    else:
        model.load_state_dict(init_state, strict=False)
    if loss_kind == "fused":
        patch, why = fused_patcher()
        if patch is None:
            raise UsageError(f"--loss fused: {why}")
        options = {} if cfg["fused_impl"] is None else {"impl": cfg["fused_impl"]}
        if cfg.get("fused_grad_in_forward"):
            options["grad_in_forward"] = True
        model = patch(model, **options)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["dtype"] == "bf16":  # fp32 master weights for AdamW; the model keeps bf16 copies
        masters = [p.detach().float().clone().requires_grad_(True) for p in params]
        for m, p in zip(masters, params):
            for attr in ("tensor_model_parallel", "sequence_parallel"):
                if hasattr(p, attr):
                    setattr(m, attr, getattr(p, attr))
    else:
        masters = params
    decay = [m for m in masters if m.dim() >= 2]
    no_decay = [m for m in masters if m.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.95), eps=1e-8)

    dp_rank = ps.get_data_parallel_rank()
    sampler = data_mod.BatchSampler(corpus.ids, cfg["seq_len"], cfg["micro_batch"], cfg["seed"], dp_rank)
    s, b = cfg["seq_len"], cfg["micro_batch"]
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    causal_mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1)[None, None]
    tokens_per_step = b * s * cfg["dp"]
    if cfg["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()

    world = dist.get_world_size()
    progress = Progress(loss_kind, cfg["steps"], cfg["log_interval"], cfg["rank"] == 0)
    records = []
    for step in range(1, cfg["steps"] + 1):
        tokens, labels = sampler.next()
        tokens, labels = tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if cfg["device"] == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)

        if cfg["device"] == "cuda":
            torch.cuda.reset_peak_memory_stats()  # per step; forward+backward read separately
        per_token = model(tokens, position_ids, causal_mask, labels=labels)  # [b, s]
        loss = per_token.float().mean()
        loss.backward()
        fwd_bwd_peak = peak_memory_mb(cfg["device"])  # the loss's share shows here, not after opt.step
        sync_grads(params, ps, cfg["dp"])
        if masters is not params:
            for m, p in zip(masters, params):
                m.grad = None if p.grad is None else p.grad.float()
        grad_norm = clip_grads(masters, ps, cfg["clip_grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        if masters is not params:
            with torch.no_grad():
                for m, p in zip(masters, params):
                    p.copy_(m)
        if cfg["device"] == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0

        # One small all-gather per step: every rank's loss, time and peak memory.
        mine = torch.tensor([loss.item(), dt, peak_memory_mb(cfg["device"]), fwd_bwd_peak],
                            dtype=torch.float64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        stats = torch.stack(gathered).cpu()
        if not math.isfinite(float(stats[:, 0].mean())):
            raise RuntimeError(f"{loss_kind}: the loss is not finite at step {step}")
        rec = {
            "step": step,
            "loss": float(stats[:, 0].mean()),  # TP ranks agree; the mean is over DP replicas
            "lr": lr_at(step, cfg),
            "grad_norm": grad_norm,
            "step_time_s": float(stats[:, 1].max()),
            "tokens_per_s": tokens_per_step / float(stats[:, 1].max()),
            "peak_mem_mb": [round(float(m), 1) for m in stats[:, 2]],
            "fwd_bwd_peak_mem_mb": [round(float(m), 1) for m in stats[:, 3]],
        }
        records.append(rec)
        mem = " ".join(f"{m:.0f}" for m in rec["peak_mem_mb"])
        progress.update(step, f"loss {rec['loss']:.4f} | {rec['tokens_per_s']:,.0f} tok/s | peak MB/rank {mem}")
    del model, opt
    return records, init_state


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

def summarise(records: list[dict]) -> dict:
    steady = records[1:] or records
    tps = sorted(r["tokens_per_s"] for r in steady)
    k = max(1, min(5, len(records) // 5))
    return {
        "first_loss": records[0]["loss"],
        "final_loss": records[-1]["loss"],
        "mean_loss_first_k": sum(r["loss"] for r in records[:k]) / k,
        "mean_loss_last_k": sum(r["loss"] for r in records[-k:]) / k,
        "k": k,
        "median_tokens_per_s": tps[len(tps) // 2],
        "peak_mem_mb_per_rank": [max(r["peak_mem_mb"][i] for r in records) for i in range(len(records[0]["peak_mem_mb"]))],
        # forward+backward only (the loss's share); absent from logs written before it was recorded
        "fwd_bwd_peak_mem_mb_per_rank": [max(r.get("fwd_bwd_peak_mem_mb", r["peak_mem_mb"])[i] for r in records)
                                         for i in range(len(records[0]["peak_mem_mb"]))],
        "total_time_s": sum(r["step_time_s"] for r in records),
    }


def plot(log: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = log["runs"]
    both = "fused" in runs and "native" in runs
    fig, axes = plt.subplots(1, 2 if both else 1, figsize=(11 if both else 6.5, 4.2), squeeze=False)
    ax = axes[0, 0]
    styles = {"fused": dict(color="tab:blue", lw=2), "native": dict(color="tab:orange", lw=1.2, ls="--")}
    for name, run in runs.items():
        steps = [r["step"] for r in run["steps"]]
        label = (f"{name} ({run['summary']['median_tokens_per_s']:,.0f} tok/s, "
                 f"peak {max(run['summary']['peak_mem_mb_per_rank']):,.0f} MB)")
        ax.plot(steps, [r["loss"] for r in run["steps"]], label=label, **styles.get(name, {}))
    c = log["config"]
    ax.set_title(f"GPT {c['layers']}L h{c['hidden']} V={c['vocab_size']:,} | tp={c['tp']} dp={c['dp']} "
                 f"{c['backend']}", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if both:
        ax = axes[0, 1]
        diff = log["comparison"]["abs_diff_per_step"]
        ax.semilogy(range(1, len(diff) + 1), [max(d, 1e-12) for d in diff], color="tab:green")
        ax.set_title("|fused − native| loss per step", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: str, log: dict, overwrite: bool) -> None:
    """Write log.json and loss.png into a temporary sibling folder, then rename it to `out`."""
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial-{os.getpid()}")
    try:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "log.json"), "w") as f:
            json.dump(log, f, indent=1)
        plot(log, os.path.join(tmp, "loss.png"))
        if os.path.exists(out):
            if os.listdir(out) and not overwrite:
                raise UsageError(f"--out {out}: appeared (not empty) while training; not replacing it")
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------

def quiet_megatron() -> None:
    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|absl|TransformerEngine).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def err(msg: str, rank0_only: bool = True) -> None:
    if not rank0_only or env_int("RANK", 0) == 0:
        print(f"train_gpt.py: error: {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        quiet_megatron()
    try:
        cfg = resolve(args)
        cfg["log_interval"] = args.log_interval
        out = check_output_dir(args.out, args.overwrite) if cfg["rank"] == 0 else None
        if cfg["loss"] in ("fused", "both"):
            patch, why = fused_patcher()
            if patch is None:
                raise UsageError(f"--loss {cfg['loss']}: the fused loss is unavailable: {why}; use --loss native")
        t_data = time.perf_counter()
        corpus = load_data(cfg, args.vocab_size)
        t_data = time.perf_counter() - t_data
        if args.check:
            if cfg["rank"] == 0:
                print(f"train_gpt.py: check ok: world {cfg['world']} (tp {cfg['tp']} x dp {cfg['dp']}), "
                      f"{cfg['device']}/{cfg['backend']}, vocabulary {cfg['vocab_size']} (padded "
                      f"{cfg['padded_vocab_size']}), output {out}")
            return 0
    except UsageError as exc:
        err(str(exc))
        return EXIT_USAGE

    # torchrun stops the other workers with SIGTERM when one fails: unwind so `finally` blocks run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if cfg["device"] == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg["local_world"]))
    try:
        ps = init_distributed(cfg)
    except DistInitError as exc:
        err(str(exc), rank0_only=False)
        return EXIT_DIST
    import torch.distributed as dist

    status = 0
    try:
        is0 = cfg["rank"] == 0
        if is0:
            print(f"GPT {cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads, seq {cfg['seq_len']}, "
                  f"vocabulary {cfg['vocab_size']:,} (padded to {cfg['padded_vocab_size']:,}), micro-batch "
                  f"{cfg['micro_batch']}, {cfg['steps']} steps, {cfg['dtype']}\n"
                  f"{cfg['world']} rank(s): tp {cfg['tp']} x dp {cfg['dp']}, sequence parallel "
                  f"{'on' if cfg['sequence_parallel'] else 'off'}, {cfg['backend']} on {cfg['device']}\n"
                  f"data: {cfg['data']}: {cfg['corpus_size']:,} tokens (tokenised in {t_data:.1f}s)", flush=True)
        kinds = ["fused", "native"] if cfg["loss"] == "both" else [cfg["loss"]]
        runs, init_state = {}, None
        for kind in kinds:
            records, init_state = train(cfg, kind, corpus, ps, init_state)
            runs[kind] = {"steps": records, "summary": summarise(records)}
            if is0:
                sm = runs[kind]["summary"]
                print(f"{kind:>6}: loss {sm['first_loss']:.4f} -> {sm['final_loss']:.4f}, median "
                      f"{sm['median_tokens_per_s']:,.0f} tokens/s, peak MB per rank "
                      f"{', '.join(f'{m:.0f}' for m in sm['peak_mem_mb_per_rank'])} (forward+backward: "
                      f"{', '.join(f'{m:.0f}' for m in sm['fwd_bwd_peak_mem_mb_per_rank'])})", flush=True)
        if is0:
            config = {k: v for k, v in cfg.items() if k not in ("rank", "local_rank")}
            config["torch"] = torch.__version__
            log = {"config": config, "runs": runs}
            if len(runs) == 2:
                diff = [abs(a["loss"] - b["loss"]) for a, b in zip(runs["fused"]["steps"], runs["native"]["steps"])]
                k = min(5, len(diff))
                log["comparison"] = {"abs_diff_per_step": diff, "max_abs_diff_first_5": max(diff[:k]),
                                     "max_abs_diff": max(diff)}
                print(f"fused vs native: max |loss difference| {max(diff[:k]):.2e} over the first {k} steps, "
                      f"{max(diff):.2e} over all", flush=True)
            if cfg["device"] == "cpu":
                log["config"]["peak_mem_note"] = ("CPU: peak resident set size of each process (ru_maxrss); it never "
                                                  "decreases, so a later run's figure includes the earlier runs'")
            write_outputs(out, log, args.overwrite)
            print(f"wrote {os.path.join(out, 'log.json')} and {os.path.join(out, 'loss.png')}", flush=True)
    except UsageError as exc:
        err(str(exc), rank0_only=False)
        status = EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - report, then exit non-zero
        err(f"{type(exc).__name__}: {exc}", rank0_only=False)
        if args.verbose:
            raise
        status = 1
    finally:
        if status == 0:
            with contextlib.suppress(Exception):
                dist.barrier()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
