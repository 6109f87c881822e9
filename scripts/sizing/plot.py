"""The talk's picture: throughput per device against TTFT and against ITL, a Pareto front per TP, limits shaded."""

from __future__ import annotations

from pathlib import Path

from .roofline import MEASURED, Estimate
from .selection import Choice, Limits, pareto_front


def plot_fronts(points: list[Estimate], limits: Limits, choice: Choice, path: Path, title: str,
                unit: str = "GPU") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    tps = sorted({p.tp for p in points})
    for ax, (key, label, limit) in zip(axes, (
            ("ttft_s", "time to first token (ms)", limits.bounds().get("ttft_s")),
            ("itl_s", "inter-token latency (ms)", limits.bounds().get("itl_s"))), strict=True):

        def ms(p: Estimate, key: str = key) -> float:
            return getattr(p, key) * 1e3

        for i, tp in enumerate(tps):
            mine = [p for p in points if p.tp == tp]
            front = pareto_front(mine, key)
            ax.plot([ms(p) for p in front], [p.rps_per_device for p in front], "-", color=colors(i),
                    label=f"TP {tp} (Pareto front)", alpha=0.9)
            for measured in (False, True):
                some = [p for p in mine if (p.label == MEASURED) == measured]
                ax.scatter([ms(p) for p in some], [p.rps_per_device for p in some], color=colors(i),
                           s=36 if measured else 10, marker="s" if measured else "o",
                           label=f"TP {tp} measured" if measured and some else None)
            for p in front:
                ax.annotate(str(p.concurrency), (ms(p), p.rps_per_device), fontsize=6, xytext=(2, 2),
                            textcoords="offset points", color=colors(i))
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        if limit is not None:
            left, right = ax.get_xlim()
            left, right = min(left, limit * 1e3 / 1.6), max(right, limit * 1e3 * 1.6)
            ax.axvspan(limit * 1e3, right, color="0.88", zorder=0, label="over the limit")
            ax.axvline(limit * 1e3, color="0.4", lw=1, ls="--")
            ax.set_xlim(left, right)
        for chosen, marker, name in ((choice.throughput_optimal, "*", "throughput-optimal"),
                                     (choice.latency_optimal, "D", "latency-optimal"),
                                     (choice.nearest_miss, "X", "nearest miss (nothing fits)")):
            if chosen is not None:
                ax.scatter([ms(chosen)], [chosen.rps_per_device], s=180, marker=marker, facecolor="none",
                           edgecolor="black", linewidth=1.5, zorder=5, label=name)
        ax.set_xlabel(label + ", log scale")
        ax.set_ylabel(f"requests/s per {unit}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
    fig.suptitle(title + "\n(labels: concurrency; lines: Pareto front per TP)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
