"""The report's figures, each drawn with matplotlib and returned as PNG bytes (embedded in
the HTML, so the report is one file), and the numbers behind the μL2Q error figure."""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np

from lowbit.quant.gaussian import optimal_gaussian_step
from lowbit.report.plots import _pyplot


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def accuracy_bars(rows: Sequence[dict[str, Any]]) -> bytes:
    """Top-1 of each quantized result beside its float baseline."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4))
    labels = [r["label"] for r in rows]
    y = np.arange(len(rows))
    floats = [r.get("float_top1") or 0.0 for r in rows]
    quant = [r.get("top1") or 0.0 for r in rows]
    ax.barh(y + 0.2, floats, height=0.4, color="#bbbbbb", label="float")
    ax.barh(y - 0.2, quant, height=0.4, color="#3572a5", label="quantized")
    for yi, r, q, f in zip(y, rows, quant, floats):
        if r.get("top1") is None:  # a float model's own score (`lowbit eval`): no quantized bar to label
            ax.text(f, yi + 0.2, f" {f:.2f}", va="center", fontsize=8)
        else:
            ax.text(q, yi - 0.2, f" {q:.2f} ({q - f:+.2f})" if f else f" {q:.2f}", va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    low = min([v for v in quant + floats if v > 0] or [0.0])
    ax.set_xlim(max(0.0, low - 10), 100)
    ax.set_xlabel("top-1 (%)")
    ax.legend(loc="lower right", fontsize=8)
    return _png(plt, fig)


def analyzer_bars(layers: Sequence[dict[str, Any]]) -> bytes:
    """Per layer, ranked: the drop with only it quantized and what keeping it float recovers."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(layers) + 1.4))
    y = np.arange(len(layers))
    ax.barh(y - 0.2, [r["drop_alone_pt"] for r in layers], height=0.4, color="#c0392b",
            label="drop with only this layer quantized (pt)")
    ax.barh(y + 0.2, [r["recovered_pt"] for r in layers], height=0.4, color="#27ae60",
            label="recovered with only this layer float (pt)")
    ax.set_yticks(y, [r["name"] for r in layers], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel("top-1 points")
    ax.legend(loc="lower right", fontsize=7)
    return _png(plt, fig)


def weight_histograms(weights: Sequence[tuple[str, np.ndarray]], columns: int = 4) -> bytes:
    """Each layer's weight histogram with the Gaussian of the same mean and spread drawn over
    it (seed 000, Figure 1: why a Gaussian-optimal step fits trained weights)."""
    plt = _pyplot()
    rows = math.ceil(len(weights) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.flat[len(weights):]:
        ax.axis("off")
    for ax, (name, w) in zip(axes.flat, weights):
        w = w.ravel().astype(np.float64)
        mu, sigma = float(w.mean()), float(w.std())
        ax.hist(w, bins=60, density=True, color="#3572a5", alpha=0.75)
        if sigma > 0:
            x = np.linspace(w.min(), w.max(), 200)
            ax.plot(x, np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi)), color="#c0392b", lw=1.2)
        ax.set_title(f"{name} (n={w.size})", fontsize=8)
        ax.tick_params(labelsize=6)
    return _png(plt, fig)


def ul2q_errors(weights: Sequence[tuple[str, np.ndarray]], max_bits: int = 8) -> list[dict[str, Any]]:
    """μL2Q's predicted against measured quantization error per bit width (seed 000).

    Predicted: E[(φ − Q(φ))²] for φ ~ N(0, 1) at the Gaussian-optimal mid-rise step α_b.
    Measured: the same error on each layer's weights standardised by their own σ about zero
    (σ = sqrt(E[w²]), as lowbit's μL2Q does), quantized per tensor on the same grid. The
    gap is what the Gaussian assumption costs on real weights."""
    out = []
    for b in range(1, max_bits + 1):
        step, predicted = optimal_gaussian_step(b, "midrise")
        half = 2 ** (b - 1)
        per_layer = {}
        for name, w in weights:
            w = w.ravel().astype(np.float64)
            sigma = math.sqrt(float(np.mean(w * w)))
            if sigma == 0:
                continue
            phi = w / sigma
            q = (np.clip(np.floor(phi / step), -half, half - 1) + 0.5) * step
            per_layer[name] = float(np.mean((phi - q) ** 2))
        out.append({"bits": b, "step": step, "predicted_mse": predicted, "measured_mse": per_layer})
    return out


def ul2q_error_figure(table: Sequence[dict[str, Any]]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    bits = [r["bits"] for r in table]
    ax.plot(bits, [r["predicted_mse"] for r in table], color="black", marker="o", lw=2,
            label="predicted (unit Gaussian)", zorder=3)
    names = list(table[0]["measured_mse"]) if table else []
    for name in names:
        ax.plot(bits, [r["measured_mse"].get(name, np.nan) for r in table], color="#3572a5", alpha=0.35, lw=0.8)
    if names:
        ax.plot(bits, [float(np.mean(list(r["measured_mse"].values()))) for r in table], color="#3572a5",
                marker="s", lw=1.5, label=f"measured, mean of {len(names)} layers (thin: each layer)")
    ax.set_yscale("log")
    ax.set_xlabel("weight bits (mid-rise grid, step α_b·σ)")
    ax.set_ylabel("E[(w/σ − Q(w/σ))²]")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def search_accuracy_points(path: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(mean weight bits, validation top-1 in %) of each search step that measured one. The
    accuracy is stored as a fraction (``ProbeResult.network_accuracy``), whatever its size: a
    step at 0.9 % is not 90 %."""
    pts = [(p["mean_w_bits"], p.get("val_accuracy")) for p in path if "mean_w_bits" in p]
    return [(b, 100 * a) for b, a in pts if isinstance(a, (int, float)) and not isinstance(a, bool)]


def search_figure(search: dict[str, Any]) -> bytes:
    """A mixed-precision search's path: size against the accuracy it measured on the way."""
    plt = _pyplot()
    path = search.get("path") or []
    fig, ax = plt.subplots(figsize=(7, 4))
    pts = [(p["mean_w_bits"], p.get("val_accuracy")) for p in path if "mean_w_bits" in p]
    with_acc = search_accuracy_points(path)
    if with_acc:
        ax.plot([b for b, _ in with_acc], [a for _, a in with_acc], marker="o", ms=3, color="#3572a5",
                label="validation top-1 at each step")
        ax.set_ylabel("top-1 on the search's validation images (%)")
    else:
        ax.plot(range(len(pts)), [b for b, _ in pts], marker="o", color="#3572a5", label="mean weight bits")
        ax.set_ylabel("mean weight bits")
    final = (search.get("plan") or {}).get("meta") or {}
    if "mean_w_bits" in final:
        ax.axvline(final["mean_w_bits"], color="#c0392b", ls="--", lw=1,
                   label=f"chosen: {final['mean_w_bits']:.2f} bits")
    ax.set_xlabel("mean weight bits" if with_acc else "search step")
    if with_acc:
        ax.invert_xaxis()
    ax.set_title(f"{search.get('method', 'search')}: budget {search.get('budget_bits')} weight bits", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def qat_curves(curves: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> bytes:
    """Per epoch: training loss (left) and training / validation top-1 (right), one colour a run."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, rows) in enumerate(curves):
        colour = f"C{i % 10}"
        epochs = [r["epoch"] for r in rows]
        left.plot(epochs, [r.get("train_loss") for r in rows], marker="o", ms=3, color=colour, label=label)
        right.plot(epochs, [r.get("val_top1") for r in rows], marker="o", ms=3, color=colour, label=f"{label} validation")
        right.plot(epochs, [r.get("train_top1") for r in rows], ls=":", color=colour, label=f"{label} training")
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    right.set_xlabel("epoch")
    right.set_ylabel("top-1 (%)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(plt, fig)
