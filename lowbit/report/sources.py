"""What an HTML report is made of, gathered from runs, JSON results, artifacts and checkpoints.

A report reads what lowbit already writes: a run in the registry (its metrics and the files
it wrote), the ``--json`` payload of ``quantize``/``eval``/``train``/``analyze``/``search``, a saved
``.lowbit`` artifact (the layer table), or a QAT checkpoint folder (``metrics.jsonl``: the
training curves). Each source adds what it has; nothing is recomputed here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError


@dataclass
class ReportInputs:
    """Everything one report shows, each part optional."""

    model: str | None = None
    accuracy: list[dict[str, Any]] = field(default_factory=list)      # {label, top1, float_top1, note}
    layers: list[dict[str, Any]] = field(default_factory=list)        # the layer table of a quantized model
    layers_source: str = ""
    analysis: dict[str, Any] | None = None                            # lowbit.analyze's payload
    searches: list[dict[str, Any]] = field(default_factory=list)      # SearchResult.to_dict() payloads
    curves: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)  # (label, per-epoch rows)
    sources: list[str] = field(default_factory=list)                  # what was read, in order
    # each registry run read: {label, model, model_fingerprint, weights}, so the float model drawn is the run's
    runs: list[dict[str, Any]] = field(default_factory=list)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _in_percent(v: Any) -> float | None:
    """A top-1 that lowbit stores in % (result and train rows: ``RecipeResult.row``)."""
    return _number(v)


def _from_fraction(v: Any) -> float | None:
    """A top-1 that lowbit stores as a fraction (payload-level ``float_top1``, artifact metrics).
    Which one a number is follows from where it was read, never from its size: a collapsed
    model's 0.85 % is not 85 %."""
    n = _number(v)
    return None if n is None else 100.0 * n


def _model_name(v: Any) -> str | None:
    """The model a source names, as text: an artifact stores its architecture as
    ``{"name", "kwargs"}``, and the report's title and ``lowbit report``'s zoo look-up want the name."""
    if isinstance(v, dict):
        v = v.get("name")
    return v if isinstance(v, str) and v else None


def _first(*values: float | None) -> float | None:
    """The first number that is there (a recorded 0.0 counts)."""
    return next((v for v in values if v is not None), None)


def scored_on(label: str, facts: Any) -> str:
    """``label`` with what the top-1 beside it counted, read from ``facts`` (a payload, its
    ``evaluation`` part, an artifact's metrics): a ``--test-limit`` score is said to be one, and a
    source that does not say is not taken for the full split."""
    facts = facts if isinstance(facts, dict) else {}
    full, n = facts.get("full_test_split"), facts.get("test_images")
    if full is True:
        return label
    if full is False:  # --test-limit: a quick look, said so beside the number
        return f"{label}; first {n} test images, not the full split"
    if _number(n) is not None:
        return f"{label}; {int(n)} test images (whether the full split: not recorded)"
    return f"{label}; test images: unknown"


def _deployed(payload: dict[str, Any]) -> bool:
    """Whether an eval payload scored a quantized model (--lowbit / --onnx) rather than a float one.
    (Payloads from before the ``deployed`` key name the file they scored as their model.)"""
    if payload.get("deployed"):
        return True
    model = payload.get("model")
    return isinstance(model, str) and (".lowbit" in model or ".onnx" in model)


def add_payload(inputs: ReportInputs, payload: dict[str, Any], label: str) -> None:
    """Add a command's JSON payload (quantize, eval, train, analyze or search); refuse one that is none."""
    if not isinstance(payload, dict):
        raise LowbitError(f"{label}: expected a JSON object from a lowbit command, got {type(payload).__name__}")
    used = False
    deployed = _deployed(payload)
    inputs.model = inputs.model or _model_name(payload.get("arch") if deployed else payload.get("model"))
    float_top1 = _from_fraction(payload.get("float_top1"))
    note = scored_on(label, payload)
    for r in payload.get("results") or []:  # quantize / eval --recipe
        if isinstance(r, dict) and "recipe" in r and "top1" in r:
            inputs.accuracy.append({"label": str(r["recipe"]), "top1": _in_percent(r["top1"]),
                                    "float_top1": _first(_in_percent(r.get("float")), float_top1), "note": note})
            used = True
    for r in payload.get("rows") or []:  # train --recipe
        if isinstance(r, dict) and "recipe" in r and "top1" in r and "float_top1" in r:
            inputs.accuracy.append({"label": f"{r['recipe']} (QAT)", "top1": _in_percent(r["top1"]),
                                    "float_top1": _in_percent(r["float_top1"]), "note": note})
            inputs.model = inputs.model or _model_name(r.get("model"))
            used = True
    top1 = _from_fraction(payload.get("top1"))
    if top1 is not None and not payload.get("results"):  # eval (a float model, or a .lowbit / ONNX one), train
        name = str(payload.get("model"))
        inputs.accuracy.append({"label": name if deployed else f"{name} (float)", "top1": top1 if deployed else None,
                                "float_top1": None if deployed else top1, "note": note})
        used = True
    if isinstance(payload.get("history"), list) and payload["history"]:
        inputs.curves.append((label, payload["history"]))
        used = True
    if isinstance(payload.get("layers"), list) and "quantized_top1" in payload:  # analyze
        inputs.analysis = payload
        used = True
    search = payload.get("search") if isinstance(payload.get("search"), dict) else None
    if search is None and {"method", "path", "plan"} <= set(payload):  # a SearchResult saved by itself
        search = payload
    if search is not None:
        inputs.searches.append(search)
        evaluation = payload.get("evaluation") if isinstance(payload.get("evaluation"), dict) else {}
        for r in evaluation.get("results") or []:  # search --evaluate: its test-split facts sit beside the rows
            inputs.accuracy.append({"label": str(r.get("recipe")), "top1": _in_percent(r.get("top1")),
                                    "float_top1": _in_percent(r.get("float")), "note": scored_on(label, evaluation)})
        used = True
    if not used:
        keys = ", ".join(sorted(payload)[:8])
        raise LowbitError(f"{label}: nothing a report shows (keys: {keys}); give the --json output of quantize, "
                          "eval, train, analyze or search, a .lowbit artifact, a QAT checkpoint folder or a run id")
    inputs.sources.append(label)


# Payload rows hold top-1 in % rounded to 2 decimals (RecipeResult.row), artifacts the exact fraction:
# the same result read from both differs by up to half a hundredth of a point.
SAME_RESULT_PT = 0.005


def add_artifact(inputs: ReportInputs, path: Path, accuracy: bool = True) -> None:
    """The layer table (bits and quantizer kind per layer) of a saved model, and the top-1 it
    was saved with unless ``accuracy`` is False (the run that saved it has shown that result)."""
    from lowbit.deploy.artifact import load

    qm = load(path)
    inputs.layers = qm.layers.rows()
    inputs.layers_source = str(path)
    metrics = qm.meta.get("metrics") or {}
    label, top1 = path.stem, _from_fraction(metrics.get("top1"))
    if accuracy and top1 is not None and not any(
            a["label"] == label and a["top1"] is not None and abs(a["top1"] - top1) <= SAME_RESULT_PT + 1e-9
            for a in inputs.accuracy):  # a --json of the command that saved it, given beside it, has it already
        inputs.accuracy.append({"label": label, "top1": top1, "float_top1": _from_fraction(metrics.get("float_top1")),
                                "note": scored_on(str(path), metrics)})
    inputs.model = inputs.model or _model_name(qm.meta.get("arch"))
    inputs.sources.append(str(path))


def read_metrics_lines(path: Path) -> list[dict[str, Any]]:
    """A QAT run's per-epoch rows (metrics.jsonl); a line cut short by a killed run is named."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise LowbitError(f"{path}, line {i}: not JSON ({err.msg})") from None
    if not rows:
        raise LowbitError(f"{path} holds no epochs yet")
    return rows


def add_path(inputs: ReportInputs, path: Path) -> None:
    if path.is_dir():
        if not (path / "metrics.jsonl").is_file():
            raise LowbitError(f"{path} is a folder without metrics.jsonl (a QAT checkpoint folder has one)")
        inputs.curves.append((path.name, read_metrics_lines(path / "metrics.jsonl")))
        inputs.sources.append(str(path))
    elif not path.is_file():
        raise LowbitError(f"no such file or run id: {path}")
    elif path.suffix == ".lowbit":
        add_artifact(inputs, path)
    elif path.name.endswith(".jsonl"):
        inputs.curves.append((path.parent.name or path.stem, read_metrics_lines(path)))
        inputs.sources.append(str(path))
    else:
        try:
            payload = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LowbitError(f"{path} is not a JSON file ({err})") from None
        add_payload(inputs, payload, str(path))


def add_run(inputs: ReportInputs, run: dict[str, Any]) -> None:
    """A registry run: its metrics, and the artifact or checkpoint it wrote where still on disk."""
    label = f"run {run['id']} ({run['command']}{', ' + run['recipe'] if run.get('recipe') else ''})"
    if run.get("status") != "done":
        raise LowbitError(f"{label} is {run.get('status')}, not done: nothing finished to report")
    inputs.model = inputs.model or _model_name(run.get("model"))
    inputs.runs.append({"label": label, "model": _model_name(run.get("model")),
                        "model_fingerprint": run.get("model_fingerprint"), "weights": run.get("weights")})
    before, rows_before = len(inputs.sources), len(inputs.accuracy)
    if run.get("metrics"):
        add_payload(inputs, run["metrics"], label)
    shown = len(inputs.accuracy) > rows_before  # the run's own rows already hold the score it saved
    artifacts = run.get("artifacts") if isinstance(run.get("artifacts"), dict) else {}
    for key, value in artifacts.items():
        p = Path(value)
        if key in ("save", "lowbit") and p.suffix == ".lowbit" and p.is_file():
            add_artifact(inputs, p, accuracy=not shown)
        elif key == "save" and p.is_dir():  # quantize --save DIR: one artifact per recipe
            for a in sorted(p.glob("*.lowbit"))[:1]:
                add_artifact(inputs, a, accuracy=not shown)
    if len(inputs.sources) == before:
        raise LowbitError(f"{label} recorded no metrics and no .lowbit file that is still on disk: nothing to report")


def collect(sources: list[str], registry: str | Path | None = None) -> ReportInputs:
    """Read every source (a run id, a file or a folder) into one ReportInputs."""
    if not sources:
        raise LowbitError("a report needs at least one source: a run id, a --json file, a .lowbit file or a QAT "
                          "checkpoint folder")
    inputs = ReportInputs()
    reg = None
    try:
        for s in sources:
            if s.isdigit() and not Path(s).exists():
                if reg is None:
                    from lowbit.registry import Registry, default_path

                    where = Path(registry) if registry is not None else default_path()
                    if not where.is_file():
                        raise LowbitError(f"{s} looks like a run id, but there is no run registry at {where}")
                    reg = Registry(where)
                add_run(inputs, reg.get(int(s)))
            else:
                add_path(inputs, Path(s))
    finally:
        if reg is not None:
            reg.close()
    return inputs
