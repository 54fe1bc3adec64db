"""What rank 0 shows and writes: the progress bar, the summaries, log.json and loss.png."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from .args import UsageError

MEMORY_NOTE = {
    "cpu": "peak MB: each process's peak resident set size (ru_maxrss); it never falls, so a later run's "
           "figure includes the earlier runs'",
    "cuda": "peak MB: torch.cuda.max_memory_allocated of each rank, reset before each run",
}


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


def summarise(records: list[dict]) -> dict:
    steady = records[1:] or records
    tps = sorted(r["tokens_per_s"] for r in steady)
    k = max(1, min(5, len(records) // 5))
    ranks = range(len(records[0]["peak_mem_mb"]))
    return {
        "first_loss": records[0]["loss"],
        "final_loss": records[-1]["loss"],
        "mean_loss_first_k": sum(r["loss"] for r in records[:k]) / k,
        "mean_loss_last_k": sum(r["loss"] for r in records[-k:]) / k,
        "k": k,
        "median_tokens_per_s": tps[len(tps) // 2],
        "peak_mem_mb_per_rank": [max(r["peak_mem_mb"][i] for r in records) for i in ranks],
        # forward+backward only (the loss's share); absent from logs written before it was recorded
        "fwd_bwd_peak_mem_mb_per_rank": [max(r.get("fwd_bwd_peak_mem_mb", r["peak_mem_mb"])[i] for r in records)
                                         for i in ranks],
        "total_time_s": sum(r["step_time_s"] for r in records),
    }


def smoothing_window(n: int) -> int:
    return max(1, round(n / 10))


def trailing_mean(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def compare(runs: dict) -> dict:
    """fused − native loss per step: signed, absolute, and the signed one smoothed (a drift shows there)."""
    diff = [a["loss"] - b["loss"] for a, b in zip(runs["fused"]["steps"], runs["native"]["steps"])]
    absd = [abs(d) for d in diff]
    k, w = min(5, len(diff)), smoothing_window(len(diff))
    smooth = trailing_mean(diff, w)
    return {"diff_per_step": diff, "abs_diff_per_step": absd, "max_abs_diff_first_5": max(absd[:k]),
            "max_abs_diff": max(absd), "smoothing_window": w, "smoothed_diff_per_step": smooth,
            "mean_diff_last_window": smooth[-1]}


def print_header(cfg: dict, t_data: float) -> None:
    print(f"GPT {cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads, seq {cfg['seq_len']}, "
          f"vocabulary {cfg['vocab_size']:,} (padded to {cfg['padded_vocab_size']:,}), micro-batch "
          f"{cfg['micro_batch']}, {cfg['steps']} steps, {cfg['dtype']}\n"
          f"{cfg['world']} rank(s): tp {cfg['tp']} x dp {cfg['dp']}, sequence parallel "
          f"{'on' if cfg['sequence_parallel'] else 'off'}, {cfg['backend']} on {cfg['device']}\n"
          f"data: {cfg['data']}: {cfg['corpus_size']:,} tokens (tokenised in {t_data:.1f}s)\n"
          f"{MEMORY_NOTE[cfg['device']]}", flush=True)


def print_summary(kind: str, sm: dict) -> None:
    print(f"{kind:>6}: loss {sm['first_loss']:.4f} -> {sm['final_loss']:.4f}, median "
          f"{sm['median_tokens_per_s']:,.0f} tokens/s, peak MB per rank "
          f"{', '.join(f'{m:.0f}' for m in sm['peak_mem_mb_per_rank'])} (forward+backward: "
          f"{', '.join(f'{m:.0f}' for m in sm['fwd_bwd_peak_mem_mb_per_rank'])})", flush=True)


def print_comparison(cmp: dict) -> None:
    k = min(5, len(cmp["diff_per_step"]))
    print(f"fused vs native: max |loss difference| {cmp['max_abs_diff_first_5']:.2e} over the first {k} steps, "
          f"{cmp['max_abs_diff']:.2e} over all; fused - native {cmp['mean_diff_last_window']:+.2e} on average "
          f"over the last {cmp['smoothing_window']} steps", flush=True)


def plot(log: dict, path: str) -> None:
    """Loss curves; with both losses also fused − native per step (signed, with its trailing mean)
    and |fused − native| on a log scale (steps where the two agree exactly marked on the axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, c = log["runs"], log["config"]
    device = c.get("device", "cuda" if c.get("backend") == "nccl" else "cpu")
    both = "fused" in runs and "native" in runs
    fig, axes = plt.subplots(1, 3 if both else 1, figsize=(16 if both else 6.5, 4.6), squeeze=False)
    ax = axes[0, 0]
    styles = {"fused": dict(color="tab:blue", lw=2), "native": dict(color="tab:orange", lw=1.2, ls="--")}
    for name, run in runs.items():
        steps = [r["step"] for r in run["steps"]]
        label = (f"{name} ({run['summary']['median_tokens_per_s']:,.0f} tok/s, "
                 f"peak {max(run['summary']['peak_mem_mb_per_rank']):,.0f} MB)")
        ax.plot(steps, [r["loss"] for r in run["steps"]], label=label, **styles.get(name, {}))
    ax.set_title(f"training loss | GPT {c['layers']}L h{c['hidden']} V={c['vocab_size']:,} | tp={c['tp']} "
                 f"dp={c['dp']} {c['backend']}", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if both:
        cmp = compare(runs)
        steps = list(range(1, len(cmp["diff_per_step"]) + 1))
        ax = axes[0, 1]
        ax.axhline(0.0, color="black", lw=0.8)
        ax.plot(steps, cmp["diff_per_step"], color="tab:green", lw=0.8, alpha=0.45, marker=".", ms=3,
                label="per step")
        ax.plot(steps, cmp["smoothed_diff_per_step"], color="tab:green", lw=2.2,
                label=f"mean of the last {cmp['smoothing_window']} steps")
        ax.set_title("fused − native (a drift moves the thick line off 0)", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss difference (nats/token)")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

        ax = axes[0, 2]
        nonzero = [(s, d) for s, d in zip(steps, cmp["abs_diff_per_step"]) if d > 0]
        zeros = [s for s, d in zip(steps, cmp["abs_diff_per_step"]) if d == 0]
        if nonzero:
            ax.semilogy([s for s, _ in nonzero], [d for _, d in nonzero], color="tab:green", marker=".", ms=3,
                        lw=0.8, label="|fused − native|")
        if zeros:  # log scale has no 0: drawn on the bottom edge
            ax.plot(zeros, [0.0] * len(zeros), ls="none", marker="v", color="tab:red", ms=5, clip_on=False,
                    transform=ax.get_xaxis_transform(), label=f"exactly equal ({len(zeros)} steps)")
        ax.set_xlim(0.5, len(steps) + 0.5)
        ax.set_title("|fused − native| per step (log scale)", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("|loss difference| (nats/token)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.text(0.01, 0.01, MEMORY_NOTE[device], fontsize=8, color="0.35")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
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
