"""Command line, presets and the checks that need no process group.

Only the standard library is imported at module level, so `train_gpt.py --help` answers before
torch is installed (torch is imported inside `resolve`).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os

EXIT_USAGE, EXIT_DIST = 2, 3

# Defaults per preset; every value can be overridden by its flag. "auto" = tiny without a GPU.
PRESETS = {
    "tiny": dict(layers=2, hidden=64, heads=8, ffn_hidden=256, seq_len=64, micro_batch=8, steps=60,
                 lexicon=8000, corpus_tokens=400_000, lr=1e-2, warmup=5, dtype="fp32"),
    "small": dict(layers=12, hidden=1024, heads=16, ffn_hidden=4096, seq_len=1024, micro_batch=8,
                  steps=300, lexicon=32000, corpus_tokens=2_000_000, lr=6e-4, warmup=30, dtype="bf16"),
}

DESCRIPTION = "Train a Megatron-core GPT with tensor (and sequence) parallelism, with our fused loss or Megatron's."
EPILOG = ("Run it under torchrun (one process per GPU, or per CPU rank without GPUs). Exit status: 0 success; "
          "2 bad arguments or inconsistent sizes (nothing started, nothing written); 3 the process group could "
          "not be formed; 1 anything else.")


class UsageError(Exception):
    """Bad arguments or inconsistent sizes: exit status 2."""


class DistInitError(Exception):
    """The process group could not be formed: exit status 3."""


class _Help(argparse.HelpFormatter):
    """Shows a default only where there is one to show and the help text does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "default" not in text):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a refusal is one line (no usage block), printed once under torchrun (rank 0
    only), with exit status 2: `train_gpt.py: error: --dtype: expected one of bf16, fp32, got 'fp16'`."""

    def error(self, message: str):
        if message.startswith("argument "):  # argparse's "argument --steps: ..."
            message = message[len("argument "):]
        if os.environ.get("RANK", "") in ("", "0"):
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")
        self.exit(EXIT_USAGE)

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            raise argparse.ArgumentError(action, f"expected one of {', '.join(sorted(action.choices))}, got {value!r}")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # nan would pass every "> 0" check after it
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _preset(key: str, text: str) -> str:
    tiny, small = PRESETS["tiny"][key], PRESETS["small"][key]
    return f"{text} (default: tiny {tiny}, small {small})".lstrip()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train_gpt.py", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Help)
    g = p.add_argument_group("model (a preset's defaults, each overridable)")
    g.add_argument("--preset", choices=["auto", "tiny", "small"], default="auto",
                   help="tiny: the CPU demo; small: a GPT for GPUs; auto: small with GPUs, tiny without")
    g.add_argument("--layers", type=_integer, metavar="N", help=_preset("layers", "transformer layers"))
    g.add_argument("--hidden", type=_integer, metavar="N", help=_preset("hidden", "hidden size"))
    g.add_argument("--heads", type=_integer, metavar="N", help=_preset("heads", "attention heads (tp must divide it)"))
    g.add_argument("--ffn-hidden", type=_integer, metavar="N",
                   help=_preset("ffn_hidden", "MLP hidden size (tp must divide it)"))
    g.add_argument("--seq-len", type=_integer, metavar="N", help=_preset("seq_len", "sequence length"))
    g.add_argument("--vocab-size", type=_integer, metavar="N",
                   help="model vocabulary before padding; must cover the data's ids (default: the tokenizer's size)")
    g.add_argument("--tie-embeddings", action="store_true", help="share input embedding and output layer weights")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tp", type=_integer, metavar="N", help="tensor-parallel size; the rest of the world is "
                                                       "data-parallel (default: the processes of one node)")
    g.add_argument("--sequence-parallel", dest="sequence_parallel", action="store_true", default=None,
                   help="Megatron sequence parallelism (default: on when tp > 1)")
    g.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_false", default=None,
                   help="turn sequence parallelism off")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: one GPU per process (NCCL) when GPUs are present, else CPU (gloo)")
    g.add_argument("--dist-timeout", type=_number, default=300.0, metavar="SECONDS",
                   help="seconds to wait for the other ranks (process-group set-up and collectives)")
    g = p.add_argument_group("training")
    g.add_argument("--loss", choices=["fused", "native", "both"], default="both",
                   help="fused: vocab_parallel_cce; native: Megatron's vocab-parallel cross-entropy; "
                        "both: fused then native from the same initial weights and batches")
    g.add_argument("--fused-impl", metavar="IMPL",
                   help="impl= of the fused loss: auto, torch, triton, triton_exact (or Apple CCE's names); "
                        "default: the library's auto")
    g.add_argument("--fused-grad-in-forward", action="store_true",
                   help="the fused loss in its fast mode always (grad_in_forward=True: 6·N·D·V FLOPs, the "
                        "logits held in bf16); without this flag or --fused-memory-first, the adapter's "
                        "default ('auto': the fast mode in each forward that receives the loss mask)")
    g.add_argument("--fused-memory-first", action="store_true",
                   help="the fused loss in its memory-first mode (grad_in_forward=False: the logits "
                        "recomputed in the backward, CCE memory)")
    g.add_argument("--native-fused-ce", action="store_true",
                   help="native runs use Megatron's fused vocab-parallel cross-entropy "
                        "(cross_entropy_loss_fusion=True) instead of its unfused one")
    g.add_argument("--micro-batch", type=_integer, metavar="N",
                   help=_preset("micro_batch", "sequences per data-parallel rank per step"))
    g.add_argument("--steps", type=_integer, metavar="N", help=_preset("steps", "optimizer steps per loss type"))
    g.add_argument("--lr", type=_number, help=_preset("lr", "peak learning rate (AdamW; linear warm-up, cosine "
                                                          "decay to 10%%)"))
    g.add_argument("--warmup", type=_integer, metavar="N", help=_preset("warmup", "warm-up steps"))
    g.add_argument("--weight-decay", type=_number, default=0.01, metavar="W", help="AdamW weight decay")
    g.add_argument("--clip-grad", type=_number, default=1.0, metavar="NORM", help="global gradient-norm clip (0: off)")
    g.add_argument("--dtype", choices=["fp32", "bf16"],
                   help=_preset("dtype", "parameter/compute dtype (bf16 keeps fp32 master weights)"))
    g.add_argument("--seed", type=_integer, default=1234, help="seed of the weights and of the batches")
    g = p.add_argument_group("data")
    g.add_argument("--corpus", metavar="FILE",
                   help="train on this UTF-8 text file (word-level tokenised) instead of the generated corpus")
    g.add_argument("--lexicon", type=_integer, metavar="N",
                   help=_preset("lexicon", "words in the generated corpus's lexicon (~ the vocabulary)"))
    g.add_argument("--corpus-tokens", type=_integer, metavar="N",
                   help=_preset("corpus_tokens", "tokens in the generated corpus"))
    g.add_argument("--data-seed", type=_integer, default=1234, metavar="SEED", help="seed of the generated corpus")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="output folder for log.json and loss.png; its parent must exist "
                                                "(default: runs/gpt-<date>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    g.add_argument("--log-interval", type=_integer, default=0, metavar="N",
                   help="when stdout is not a terminal, a progress line every N steps (0: ~10 lines per run)")
    g.add_argument("--check", action="store_true",
                   help="validate arguments, output folder, fused-loss options and data, then exit (no process "
                        "group, nothing written)")
    g.add_argument("--verbose", action="store_true", help="keep Megatron's warnings; full tracebacks")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


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
    import torch

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
    if args.corpus is not None:  # its contents are checked where it is read (data.load_text_file)
        if not args.corpus:
            raise UsageError("--corpus: expected a file name, got ''")
        if os.path.isdir(args.corpus):
            raise UsageError(f"--corpus {args.corpus}: is a folder, expected a UTF-8 text file")
        if not os.path.exists(args.corpus):
            raise UsageError(f"--corpus {args.corpus}: no such file")
    else:  # the generated corpus (data.generate_corpus)
        if cfg["lexicon"] < 16:
            raise UsageError(f"--lexicon must be >= 16 (words of the generated corpus), got {cfg['lexicon']}")
        if cfg["corpus_tokens"] < 1000:
            raise UsageError(f"--corpus-tokens must be >= 1000 (tokens of the generated corpus), "
                             f"got {cfg['corpus_tokens']}")
    if args.fused_impl is not None and args.loss == "native":
        raise UsageError("--fused-impl only applies to --loss fused or both")
    if args.fused_grad_in_forward and args.loss == "native":
        raise UsageError("--fused-grad-in-forward only applies to --loss fused or both")
    if args.fused_memory_first and args.loss == "native":
        raise UsageError("--fused-memory-first only applies to --loss fused or both")
    if args.fused_memory_first and args.fused_grad_in_forward:
        raise UsageError("--fused-memory-first and --fused-grad-in-forward: choose one mode")

    cfg.update(rank=rank, world=world, local_rank=local_rank, local_world=local_world, tp=tp, dp=world // tp,
               sequence_parallel=sp, device=device, backend="nccl" if device == "cuda" else "gloo",
               loss=args.loss, seed=args.seed, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
               tie_embeddings=args.tie_embeddings, fused_impl=args.fused_impl, corpus=args.corpus,
               native_fused_ce=args.native_fused_ce, fused_grad_in_forward=args.fused_grad_in_forward,
               fused_memory_first=args.fused_memory_first, data_seed=args.data_seed, dist_timeout=args.dist_timeout, log_interval=args.log_interval)
    return cfg


def _probe_write(folder: str) -> None:
    """Create and remove a folder holding one file in `folder`, as the final write will: catches
    read-only and pseudo file systems (/sys, /proc) that os.access accepts for root."""
    probe = os.path.join(folder, f".train_gpt-check-{os.getpid()}")
    os.mkdir(probe)
    try:
        with open(os.path.join(probe, "probe"), "w") as f:
            f.write("ok")
        os.remove(os.path.join(probe, "probe"))
    finally:
        os.rmdir(probe)


def check_output_dir(out: str | None, overwrite: bool) -> str:
    """Return the absolute output path; refuse one we cannot (or must not) write. Leaves nothing
    behind, except the default's parent `runs/`."""
    if out is None:
        os.makedirs("runs", exist_ok=True)
        out = os.path.join("runs", datetime.datetime.now().strftime("gpt-%Y%m%d-%H%M%S"))
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: the folder it goes in, {parent}, does not exist (create it first)")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"--out {out}: exists and is not a folder")
        if os.listdir(out) and not overwrite:
            raise UsageError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")
    try:
        _probe_write(parent)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write in {parent} ({exc.strerror or exc})") from None
    return out
