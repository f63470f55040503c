"""One self-contained HTML file about a quantized model: accuracy against float, the layer
table, the analyzer's ranking, weight histograms with their fitted Gaussian and μL2Q's
predicted vs measured error (seed 000), mixed-precision search paths, QAT curves.

Figures are PNGs embedded as data URIs and the style is inline, so the file can be mailed or
attached to a ticket and opens anywhere without the run's folder next to it.
"""
from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch import nn

from lowbit.errors import LowbitError
from lowbit.report import figures
from lowbit.report.sources import ReportInputs

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.muted{color:#777;font-size:.9em}
img{max-width:100%;border:1px solid #eee}nav a{margin-right:1em}
"""

MAX_HISTOGRAM_LAYERS = 24  # beyond this the small multiples stop being readable: the first ones are shown


def _img(fig_id: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="{fig_id}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str], table_id: str) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if np.isfinite(v) else html.escape(str(v))
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _split(analysis: dict) -> str:
    """Which side loses, where the analysis has it (files written before the split was added do not)."""
    if analysis.get("weights_only_top1") is None or analysis.get("activations_only_top1") is None:
        return ""
    return (f" (weights only {analysis['weights_only_top1']:.2f}%, activations only "
            f"{analysis['activations_only_top1']:.2f}%)")


def _analysis_rows(layers: Sequence[Any]) -> list[dict[str, Any]]:
    """The analyzer's layers as table rows: ``lowbit.analyze`` returns LayerSensitivity objects,
    its --json (and a run) plain dicts; both are drawn."""
    return [r.row() if hasattr(r, "row") else dict(r) for r in layers]


def _missing(what: str) -> str:
    return f'<p class="muted">Not in these sources: {html.escape(what)}</p>'


def model_weights(model: nn.Module) -> list[tuple[str, np.ndarray]]:
    """The float model's conv and linear weights as trained (before any BN folding), by name."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            out.append((name, m.weight.detach().cpu().double().numpy()))
    return out


def render(inputs: ReportInputs, float_model: nn.Module | None = None, title: str | None = None) -> str:
    """The report's HTML text."""
    title = title or f"lowbit report{': ' + str(inputs.model) if inputs.model else ''}"  # a hand-built input too
    parts: list[str] = []
    sections = [("accuracy", "Accuracy"), ("layers", "Layers"), ("analysis", "Which layer hurts"),
                ("weights", "Weights and the Gaussian"), ("ul2q", "μL2Q error: predicted vs measured"),
                ("searches", "Mixed-precision searches"), ("qat", "Training curves")]

    parts.append('<section id="accuracy"><h2>Accuracy</h2>')
    if inputs.accuracy:
        parts.append(_img("fig-accuracy", figures.accuracy_bars(inputs.accuracy), "top-1, float vs quantized"))
        rows = [{**r, "drop_pt": (r["float_top1"] - r["top1"]) if r.get("float_top1") and r.get("top1") is not None
                 else None} for r in inputs.accuracy]
        parts.append(_table(rows, ["label", "top1", "float_top1", "drop_pt", "note"], "table-accuracy"))
    else:
        parts.append(_missing("top-1 results (the --json of quantize or train, or a run of either)"))
    parts.append("</section>")

    parts.append('<section id="layers"><h2>Layers</h2>')
    if inputs.layers:
        parts.append(f'<p class="muted">From {html.escape(inputs.layers_source)}.</p>')
        parts.append(_table(inputs.layers, ["name", "kind", "params", "w_bits", "a_bits", "quantizer", "a_quantizer"],
                            "table-layers"))
    else:
        parts.append(_missing("a quantized model's layer table (a .lowbit file, or a run that saved one)"))
    parts.append("</section>")

    parts.append('<section id="analysis"><h2>Which layer hurts</h2>')
    if inputs.analysis:
        a = inputs.analysis
        layers = _analysis_rows(a.get("layers") or [])
        parts.append(f"<p>On {html.escape(str(a.get('images')))} training-split images: float {a['float_top1']:.2f}%, "
                     f"quantized {a['quantized_top1']:.2f}%{_split(a)}. Layers ranked by the drop with only that layer "
                     "quantized.</p>")
        parts.append(_img("fig-analysis", figures.analyzer_bars(layers), "per-layer sensitivity"))
        parts.append(_table(layers, ["name", "quantizer", "w_bits", "a_bits", "weight_sqnr_db", "output_sqnr_db",
                                     "drop_alone_pt", "recovered_pt"], "table-analysis"))
    else:
        parts.append(_missing("the analyzer's ranking (the --json of `lowbit analyze`, or its run)"))
    parts.append("</section>")

    weights = model_weights(float_model) if float_model is not None else []
    parts.append('<section id="weights"><h2>Weights and the Gaussian</h2>')
    if weights:
        shown = weights[:MAX_HISTOGRAM_LAYERS]
        more = f" (the first {len(shown)} of {len(weights)})" if len(shown) < len(weights) else ""
        parts.append(f"<p>Each layer's float weights{more}, with the normal density of the same mean and standard "
                     "deviation drawn over them (seed 000, Figure 1).</p>")
        parts.append(_img("fig-weights", figures.weight_histograms(shown), "weight histograms with fitted Gaussians"))
    else:
        parts.append(_missing("the float model (give --model, and --weights for your own)"))
    parts.append("</section>")

    parts.append('<section id="ul2q"><h2>μL2Q error: predicted vs measured</h2>')
    if weights:
        table = figures.ul2q_errors(weights)
        parts.append("<p>Seed 000 quantizes w/σ with the step that is optimal for a unit Gaussian, and predicts the "
                     "error from that Gaussian alone. Measured: each layer's weights standardised by their own σ "
                     "(about zero), per tensor, on the same mid-rise grid.</p>")
        parts.append(_img("fig-ul2q", figures.ul2q_error_figure(table), "μL2Q predicted vs measured error"))
        rows = []
        for r in table:
            measured = list(r["measured_mse"].values())  # empty when every layer is all zero (no σ to scale by)
            rows.append({"bits": r["bits"], "step α_b": r["step"], "predicted": r["predicted_mse"],
                         "measured (mean)": float(np.mean(measured)) if measured else None,
                         "measured (min)": min(measured, default=None), "measured (max)": max(measured, default=None)})
        parts.append(_table(rows, list(rows[0]), "table-ul2q"))
    else:
        parts.append(_missing("the float model (give --model)"))
    parts.append("</section>")

    parts.append('<section id="searches"><h2>Mixed-precision searches</h2>')
    if inputs.searches:
        for i, s in enumerate(inputs.searches):
            parts.append(_img(f"fig-search-{i}", figures.search_figure(s), f"{s.get('method')} search path"))
    else:
        parts.append(_missing("a search (the --json of `lowbit search`, or its run)"))
    parts.append("</section>")

    parts.append('<section id="qat"><h2>Training curves</h2>')
    if inputs.curves:
        parts.append(_img("fig-qat", figures.qat_curves(inputs.curves), "QAT loss and top-1 per epoch"))
        parts.append('<p class="muted">Validation is the held-out part of the training split that chooses the final '
                     "epoch, never the test split.</p>")
    else:
        parts.append(_missing("QAT curves (a checkpoint folder, the --json of `lowbit train`, or its run)"))
    parts.append("</section>")

    nav = " ".join(f'<a href="#{sid}">{html.escape(name)}</a>' for sid, name in sections)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    src = ", ".join(html.escape(s) for s in inputs.sources)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<p class="muted">Made {stamp} from {src}.</p><nav>{nav}</nav>{"".join(parts)}</body></html>')


def write_report(inputs: ReportInputs, path: str | Path, float_model: nn.Module | None = None,
                 title: str | None = None) -> Path:
    """Render and write: a regular file atomically (a report being rewritten is never left
    half-written), a symlink or a device (/dev/stdout) written through, not replaced."""
    from lowbit.mixed.plan import write_text_file

    path = Path(path)
    if path.is_dir():
        raise LowbitError(f"{path} is a directory; give the report's file name (e.g. {path / 'report.html'})")
    write_text_file(path, render(inputs, float_model, title))
    return path


def html_report(sources: str | Path | Sequence[str | Path] | ReportInputs, path: str | Path = "report.html",
                model: nn.Module | None = None, registry: str | Path | None = None, title: str | None = None) -> Path:
    """Python twin of ``lowbit report``: sources are run ids, JSON results, .lowbit files and QAT
    checkpoint folders (one, or a list; or a ReportInputs built by hand, whose ``analysis`` may be
    ``lowbit.analyze``'s result as it is); ``model`` is the float model (an nn.Module) whose
    weights the histogram and μL2Q figures read."""
    from lowbit.report.sources import collect

    if model is not None and not isinstance(model, nn.Module):
        raise LowbitError(f"html_report's model is the float network itself (a torch.nn.Module), got "
                          f"{type(model).__name__} {model!r:.60}; for a zoo model pass lowbit.zoo.pretrained(name)")
    if isinstance(sources, ReportInputs):
        return write_report(sources, path, model, title)
    if isinstance(sources, (str, Path)) or _is_analysis(sources):  # one source, not a sequence of its parts
        sources = [sources]
    if not isinstance(sources, Sequence):
        raise LowbitError(f"html_report's sources are run ids, file paths, lowbit.analyze results or a ReportInputs, "
                          f"got {type(sources).__name__}")
    analyses = [s for s in sources if _is_analysis(s)]
    if len(analyses) > 1:
        raise LowbitError(f"html_report shows one lowbit.analyze result, got {len(analyses)}: make one report each")
    others = [s for s in sources if not _is_analysis(s)]
    for s in others:
        if not isinstance(s, (str, Path, int)) or isinstance(s, bool):
            raise LowbitError(f"html_report's sources are run ids, file paths, lowbit.analyze results or a "
                              f"ReportInputs, got {type(s).__name__} {s!r:.60}")
    inputs = collect([str(s) for s in others], registry) if others else ReportInputs()
    if analyses:
        inputs.analysis = analyses[0]
    return write_report(inputs, path, model, title)


def _is_analysis(source: Any) -> bool:
    """``lowbit.analyze``'s result (or its JSON form): a mapping with the layers and both top-1s."""
    return isinstance(source, Mapping) and {"layers", "float_top1", "quantized_top1"} <= set(source)
