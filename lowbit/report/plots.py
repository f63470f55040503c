"""Pareto and bit-allocation figures (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from lowbit.errors import LowbitError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LowbitError("plots need matplotlib: pip install 'lowbit[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto_plot(points: Sequence[Mapping[str, Any]], path: str | Path, title: str = "",
                float_top1: float | None = None) -> Path:
    """Top-1 vs weight compression (left) and vs mean weight bits (right), one line per
    method. Each point: {"method", "weight_compression", "mean_w_bits", "top1"} (top1 in %)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(p["method"] for p in points))
    for method in methods:
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["mean_w_bits"])
        for ax, key in zip(axes, ("weight_compression", "mean_w_bits")):
            ax.plot([p[key] for p in pts], [p["top1"] for p in pts], marker="o", label=method)
    for ax, label in zip(axes, ("weight compression (×, float32 / stored weight codes)", "mean weight bits")):
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%) on the full test split")
        ax.grid(alpha=0.3)
        if float_top1 is not None:
            ax.axhline(float_top1, color="gray", linestyle="--", linewidth=1, label="float")
    axes[0].legend()
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)


def allocation_plot(plans: Mapping[str, Mapping[str, Mapping[str, int]]], path: str | Path,
                    params: Mapping[str, int] | None = None, title: str = "") -> Path:
    """Weight bits per layer (network order), one bar group per plan."""
    plt = _pyplot()
    if not plans:
        raise LowbitError("allocation_plot needs at least one plan")
    names = list(next(iter(plans.values())))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.6 * len(names)), 4.5))
    width = 0.8 / len(plans)
    for k, (label, plan) in enumerate(plans.items()):
        xs = [i + (k - (len(plans) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [plan[n].get("w_bits", 32) for n in names], width=width, label=label)
    ticks = [f"{n}\n({params[n]})" if params else n for n in names]
    ax.set_xticks(range(len(names)), ticks, rotation=70, fontsize=7)
    ax.set_ylabel("weight bits")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return _save(plt, fig, path)
