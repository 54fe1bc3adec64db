#!/usr/bin/env python
"""Train a Megatron-core GPT with tensor (and sequence) parallelism, with our fused loss or Megatron's.

Run it under torchrun, one process per GPU (NCCL) or, on a machine with no GPU, one process per
CPU rank (gloo):

    torchrun --nproc-per-node 2 launch/train_gpt.py --loss both --out runs/demo

`--loss both` trains twice from the same initial weights and the same batches, first with the
fused loss (vocab_parallel_cce.megatron.patch_gpt_model) and then with Megatron's own
vocab-parallel cross-entropy. Rank 0 prints a progress bar with the loss, tokens/s and the peak
memory of every rank; at the end it writes OUT/log.json and OUT/loss.png, under a temporary name
renamed when complete, so a failed run leaves nothing half-written. `--check` validates the
arguments, the output folder, the fused loss's options and the data without starting any process
group (launch/run.sh uses it before calling torchrun).

The pieces live in launch/gpt/: args (options, presets, checks), data (corpus, tokenizer,
batches), parallel (process group, CPU shim, gradient collectives), model (GPTModel, fused loss),
train (the loop), report (progress, summaries, log.json, loss.png).

Exit status: 0 success; 2 bad arguments or inconsistent sizes; 3 the process group could not be
formed (unreachable rendezvous / timeout); 1 anything else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import args as cli  # noqa: E402  (launch/gpt/, next to this file; standard library only)


def quiet_megatron() -> None:
    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|absl|TransformerEngine).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def err(msg: str, rank0_only: bool = True) -> None:
    if not rank0_only or cli.env_int("RANK", 0) == 0:
        print(f"train_gpt.py: error: {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = cli.parse_args(argv)  # --help exits here, before torch is imported
    if not args.verbose:
        quiet_megatron()
    import torch

    from gpt import data, model, parallel, report, train

    try:
        cfg = cli.resolve(args)
        out = cli.check_output_dir(args.out, args.overwrite) if cfg["rank"] == 0 else None
        if cfg["loss"] in ("fused", "both"):
            model.fused_loss(cfg)
        t_data = time.perf_counter()
        corpus = data.load(cfg, args.vocab_size)
        t_data = time.perf_counter() - t_data
        if args.check:
            if cfg["rank"] == 0:
                print(f"train_gpt.py: check ok: world {cfg['world']} (tp {cfg['tp']} x dp {cfg['dp']}), "
                      f"{cfg['device']}/{cfg['backend']}, vocabulary {cfg['vocab_size']} (padded "
                      f"{cfg['padded_vocab_size']}), output {out}")
            return 0
    except cli.UsageError as exc:
        err(str(exc))
        return cli.EXIT_USAGE

    # torchrun stops the other workers with SIGTERM when one fails: unwind so `finally` blocks run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if cfg["device"] == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg["local_world"]))
    try:
        ps = parallel.init_distributed(cfg)
    except cli.DistInitError as exc:
        err(str(exc), rank0_only=False)
        return cli.EXIT_DIST
    import torch.distributed as dist

    status = 0
    try:
        is0 = cfg["rank"] == 0
        if is0:
            report.print_header(cfg, t_data)
        kinds = ["fused", "native"] if cfg["loss"] == "both" else [cfg["loss"]]
        runs, init_state = {}, None
        for kind in kinds:
            records, init_state = train.train(cfg, kind, corpus, ps, init_state)
            runs[kind] = {"steps": records, "summary": report.summarise(records)}
            if is0:
                report.print_summary(kind, runs[kind]["summary"])
        if is0:
            config = {k: v for k, v in cfg.items() if k not in ("rank", "local_rank")}
            config["torch"] = torch.__version__
            config["peak_mem_note"] = report.MEMORY_NOTE[cfg["device"]]
            log = {"config": config, "runs": runs}
            if len(runs) == 2:
                log["comparison"] = report.compare(runs)
                report.print_comparison(log["comparison"])
            report.write_outputs(out, log, args.overwrite)
            print(f"wrote {os.path.join(out, 'log.json')} and {os.path.join(out, 'loss.png')}", flush=True)
    except cli.UsageError as exc:
        err(str(exc), rank0_only=False)
        status = cli.EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - report, then exit non-zero
        err(f"{type(exc).__name__}: {exc}", rank0_only=False)
        if args.verbose:
            raise
        status = 1
    finally:
        if status == 0:
            with contextlib.suppress(Exception):
                dist.barrier()
        # Megatron's parallel_state refers to its groups: drop those references first, or
        # destroy_process_group() cannot free the groups (and join gloo's worker threads, which can
        # otherwise abort the process at interpreter exit: DESIGN.md "Process-group lifetime").
        with contextlib.suppress(Exception):
            ps.destroy_model_parallel()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
