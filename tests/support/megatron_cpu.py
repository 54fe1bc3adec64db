"""CPU fixtures for the Megatron-core tests: a gloo spawner, CUDA shims, a tiny GPTModel.

Megatron-core calls CUDA in a few places even on CPU (`torch.cuda.current_device()` as a device,
the CUDA RNG tracker, torch's LayerNorm refusing sequence parallelism). `cpu_megatron()` patches
those for the test process only; the library itself never does.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from support.process_groups import join_group, start_ranks

VOCAB = 1000  # "true" vocabulary; Megatron pads it to a multiple of 128 * tp
SEQ = 32
BATCH = 2
HIDDEN = 64
HEADS = 4
LAYERS = 2


def padded_vocab(tp: int, vocab: int = VOCAB, multiple: int = 128) -> int:
    m = multiple * tp
    return ((vocab + m - 1) // m) * m


# --------------------------------------------------------------------------- spawner


def _worker(rank, world, port_q, fn, args, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        join_group("gloo", rank, world, port_q)
        out = fn(rank, world, *args)
        torch.save({"ok": True, "out": out}, path)
    except BaseException as err:  # noqa: BLE001 - report everything to the parent
        torch.save({"ok": False, "err": f"{type(err).__name__}: {err}\n{traceback.format_exc()}"}, path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world: int, *args):
    """Run fn(rank, world, *args) in `world` forked processes on gloo; return the per-rank results."""
    with tempfile.TemporaryDirectory() as d:
        # fork: the parent has imported megatron-core once (slow); children start in milliseconds.
        ctx = mp.get_context("fork" if os.name == "posix" else "spawn")
        port_q = ctx.Queue()  # rank 0 hosts the rendezvous and passes its port on (process_groups.join_group)
        procs = [ctx.Process(target=_worker, args=(r, world, port_q, fn, args, d)) for r in range(world)]
        start_ranks(procs)
        for p in procs:
            p.join(timeout=300)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise RuntimeError("a rank did not finish within 300 s")
        results = []
        for r in range(world):
            path = os.path.join(d, f"rank{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            res = torch.load(path, weights_only=False)
            if not res["ok"]:
                raise RuntimeError(f"rank {r} failed:\n{res['err']}")
            results.append(res["out"])
        return results


# --------------------------------------------------------------------------- CPU shims


class CPURNGTracker:
    """Stands in for Megatron's CudaRNGStatesTracker: named, forkable CPU generator states."""

    def __init__(self, *args, **kwargs):
        self.states_ = {}
        self.seeds_ = set()

    def is_initialized(self):
        return bool(self.states_)

    def reset(self):
        self.states_, self.seeds_ = {}, set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self.states_ = dict(states)

    def add(self, name, seed):
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)
        self.seeds_.add(seed)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            self.add(name, 1234 + len(self.states_))
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _norm_accepting_sequence_parallel(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
    norm = torch.nn.LayerNorm(hidden_size, eps=eps)
    for p in norm.parameters():
        p.sequence_parallel = config.sequence_parallel
    return norm


@contextlib.contextmanager
def cpu_megatron():
    """Let megatron-core run a tiny model on CPU (test-process patches, undone on exit)."""
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import torch_norm

    saved = {
        "current_device": torch.cuda.current_device,
        "tracker": mrandom._CUDA_RNG_STATE_TRACKER,
        "tracker_init": mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED,
        "norm_new": torch_norm.WrappedTorchNorm.__new__,
        "tensor_cuda": torch.Tensor.cuda,
    }
    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *a, **k: self  # tied embeddings under PP move a weight "to" CUDA
    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch_norm.WrappedTorchNorm.__new__ = _norm_accepting_sequence_parallel
    try:
        yield
    finally:
        torch.cuda.current_device = saved["current_device"]
        mrandom._CUDA_RNG_STATE_TRACKER = saved["tracker"]
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = saved["tracker_init"]
        torch_norm.WrappedTorchNorm.__new__ = saved["norm_new"]
        torch.Tensor.cuda = saved["tensor_cuda"]


# --------------------------------------------------------------------------- the model


def mcore_version():
    from importlib.metadata import version

    from packaging.version import Version

    return Version(Version(version("megatron-core")).base_version)


def init_parallel(tp: int, pp: int = 1):
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def build_gpt(
    tp: int,
    *,
    sequence_parallel=False,
    tied=False,
    mtp_layers=0,
    seed=0,
    vocab=None,
    pre_process=True,
    post_process=True,
    pp=1,
    **config_extra,
):
    """A 2-layer GPTModel (hidden 64, 4 heads, vocab 1000 padded), deterministic for a seed.

    Needs `cpu_megatron()` active and the model-parallel state initialised.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = dict(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=4 * HIDDEN,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32 if pp > 1 else None,
        sequence_parallel=sequence_parallel and tp > 1,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        bf16=False,
        fp16=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        perform_initialization=True,
    )
    if mtp_layers:
        cfg["mtp_num_layers"] = mtp_layers
        cfg["mtp_loss_scaling_factor"] = 0.3
    cfg.update(config_extra)
    config = TransformerConfig(**cfg)
    spec = get_gpt_layer_local_spec()
    mtp_spec = None
    if mtp_layers:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False)
    torch.manual_seed(seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab or padded_vocab(tp),
        max_sequence_length=SEQ,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=tied,
        position_embedding_type="rope",
        mtp_block_spec=mtp_spec,
    )
    return model


def batch(seed=0, vocab=VOCAB):
    """input_ids, position_ids, attention_mask (causal), labels, loss_mask for BATCH × SEQ."""
    g = torch.Generator().manual_seed(1000 + seed)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ).contiguous()
    attention_mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    loss_mask = torch.ones(BATCH, SEQ)
    loss_mask[0, -5:] = 0
    return input_ids, position_ids, attention_mask, labels, loss_mask
