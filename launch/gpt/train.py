"""The training loop: AdamW (fp32 master weights under bf16), learning-rate schedule, per-step records."""

from __future__ import annotations

import math
import resource
import time

import torch

from . import data, model, parallel
from .report import Progress


def peak_memory_mb(device: str) -> float:
    """GPU: torch.cuda.max_memory_allocated. CPU: the process's peak resident set size, which never falls."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up to lr, then cosine decay to lr/10 at the last step (step counts from 1)."""
    if cfg["warmup"] and step <= cfg["warmup"]:
        return cfg["lr"] * step / cfg["warmup"]
    span = max(1, cfg["steps"] - cfg["warmup"])
    progress = min(1.0, (step - cfg["warmup"]) / span)
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(params: list, cfg: dict):
    """(AdamW, the tensors it updates): fp32 master copies of bf16 parameters, else the parameters."""
    if cfg["dtype"] == "bf16":
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
    return opt, masters


def train(cfg: dict, loss_kind: str, corpus: data.Corpus, ps, init_state) -> tuple[list[dict], dict]:
    """Train one model for cfg['steps'] steps; return the per-step records (identical on all ranks)
    and the initial state dict (to start the next loss type from the same weights)."""
    import torch.distributed as dist

    device = torch.device("cuda", cfg["local_rank"]) if cfg["device"] == "cuda" else torch.device("cpu")
    gpt = model.build_model(cfg, loss_kind)
    if init_state is None:
        init_state = {k: v.detach().to("cpu", copy=True) for k, v in gpt.state_dict().items()
                      if isinstance(v, torch.Tensor)}
    else:
        gpt.load_state_dict(init_state, strict=False)
    if loss_kind == "fused":
        patch, options = model.fused_loss(cfg)
        gpt = patch(gpt, **options)
    gpt.train()

    params = [p for p in gpt.parameters() if p.requires_grad]
    opt, masters = _optimizer(params, cfg)

    sampler = data.BatchSampler(corpus.ids, cfg["seq_len"], cfg["micro_batch"], cfg["seed"],
                                ps.get_data_parallel_rank())
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
        loss_mask = torch.ones(labels.shape, dtype=torch.float32, device=device)
        if cfg["device"] == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)

        if cfg["device"] == "cuda":
            torch.cuda.reset_peak_memory_stats()  # per step; forward+backward read separately
        # The loss mask (all ones: every position is scored) goes to the forward as Megatron's
        # pretrain step passes it (the fused loss's fast mode needs it to keep Megatron's losses).
        per_token = gpt(tokens, position_ids, causal_mask, labels=labels, loss_mask=loss_mask)  # [b, s]
        loss = per_token.float().mean()
        loss.backward()
        fwd_bwd_peak = peak_memory_mb(cfg["device"])  # the loss's share shows here, not after opt.step
        parallel.sync_grads(params, ps, cfg["dp"])
        if masters is not params:
            for m, p in zip(masters, params):
                m.grad = None if p.grad is None else p.grad.float()
        grad_norm = parallel.clip_grads(masters, ps, cfg["clip_grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        gpt.zero_grad(set_to_none=True)
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
    del gpt, opt
    return records, init_state
