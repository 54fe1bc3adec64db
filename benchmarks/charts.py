"""Charts of the suites' results: grouped bars of a time-like value and, below, of peak memory.

`bar_chart` draws, per panel (an input kind, or one panel), grouped bars (one group per shape or
configuration, one bar per method); reference rows (e.g. the cuBLAS products) are horizontal lines
across their group; each bar is labelled with its ratio to the run's baseline. Rows are plain dicts,
as stored in the JSON.
"""

from __future__ import annotations

from tables import label, num


def bar_chart(rows: list[dict], path: str, *, value_label: str, mem_label: str | None = "peak MiB added",
              ratio_label: str = "", refs: tuple[str, ...] = (), title: str = "", higher_is_better: bool = False,
              labels: dict | None = None):
    """rows: dicts with group, panel, method, value (float or None), mem, ratio, status; `labels`
    overrides the display names of methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(r["panel"] for r in rows))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in refs]
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    by = {(r["panel"], r["group"], r["method"]): r for r in rows}

    def name(m):
        return (labels or {}).get(m) or label(m)

    if mem_label and not any(num(r.get("mem")) is not None for r in rows):
        mem_label = None  # e.g. CPU runs: no memory measured
    n_axes = len(panels) * (2 if mem_label else 1)
    width = max(9.0, 1.2 + 0.26 * len(groups) * (len(methods) + 1))
    ncol = max(1, min(len(methods) + len(refs), int(width // 2.6)))
    legend_rows = -(-(len(methods) + len(refs)) // ncol)
    top_in = 0.1 + 0.2 * legend_rows + (0.3 if title else 0)
    height = 3.3 * n_axes + top_in
    fig, axes = plt.subplots(n_axes, 1, figsize=(width, height), squeeze=False)
    bar_w = 0.8 / max(1, len(methods))
    ref_styles = [dict(color="black", ls="--", lw=1.3), dict(color="dimgray", ls=":", lw=1.3)]

    def draw(ax, panel, key, ylabel, with_refs, with_ratio):
        vals = []
        for gi, g in enumerate(groups):
            for mi, m in enumerate(methods):
                r = by.get((panel, g, m))
                x = gi + (mi - (len(methods) - 1) / 2) * bar_w
                y = None if r is None else num(r.get(key))
                if y is None:
                    if r is not None and r.get("status"):
                        ax.text(x, 0.0, "skip" if r["status"].startswith("skipped") else "err", rotation=90,
                                ha="center", va="bottom", fontsize=6, color="gray", transform=ax.get_xaxis_transform())
                    continue
                vals.append(y)
                ax.bar(x, y, bar_w * 0.92, color=colors[m], label=None if m in seen else name(m))
                seen.add(m)
                ratio = num(r.get("ratio")) if with_ratio else None
                if ratio is not None:
                    ax.annotate(f"{ratio:.2f}", (x, y), xytext=(0, 2), textcoords="offset points", rotation=90,
                                ha="center", va="bottom", fontsize=6)
            if with_refs:
                for ri, ref in enumerate(refs):
                    r = by.get((panel, g, ref))
                    y = None if r is None else num(r.get(key))
                    if y is not None:
                        vals.append(y)
                        ax.hlines(y, gi - 0.45, gi + 0.45, label=None if ref in seen else name(ref),
                                  **ref_styles[ri % len(ref_styles)])
                        seen.add(ref)
        positive = [v for v in vals if v > 0]
        if positive and max(positive) / min(positive) > 8:
            ax.set_yscale("log")
            ax.set_ylim(min(positive) / 1.6, max(positive) * 2.2)  # room for the ratio labels
        elif positive:
            ax.set_ylim(0, max(positive) * 1.25)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.set_xlim(-0.6, len(groups) - 0.4)

    i = 0
    for panel in panels:
        seen: set = set()
        ax = axes[i, 0]
        draw(ax, panel, "value", value_label, True, bool(ratio_label))
        head = f"{panel}: " if panel else ""
        note = f" (bar labels: {ratio_label})" if ratio_label else ""
        ax.set_title(f"{head}{value_label}{' (higher is better)' if higher_is_better else ''}{note}", fontsize=10)
        i += 1
        if mem_label:
            seen = set()
            ax = axes[i, 0]
            draw(ax, panel, "mem", mem_label, False, False)
            ax.set_title(f"{head}{mem_label}", fontsize=10)
            i += 1
    handles = {}
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    top = 1 - top_in / height
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=ncol, fontsize=8,
               bbox_to_anchor=(0.5, 1 - (0.3 if title else 0.05) / height), frameon=False)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.05 / height, va="top")
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
