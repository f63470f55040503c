"""Optional MLflow logging of a CLI run (``--mlflow URI``), beside the run registry.

For teams whose experiments already live in MLflow: the same facts the registry keeps (command,
model, recipe, status, wall time, the metrics the command printed, the files it wrote) go to one
MLflow run. MLflow is never a lowbit dependency: asking for it without it installed is an error
that says how to get it.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise LowbitError("--mlflow needs the mlflow package: pip install mlflow") from None
    return mlflow


def check_available() -> None:
    """Fail at the door, before a long run, when --mlflow cannot be honoured."""
    _mlflow()


# What MLflow refuses in a metric name (its rule: ^[/\w.\- :]*$; the ':' only from MLflow 2.x on,
# so it goes too). One bad name makes log_metrics refuse the whole batch.
_NOT_IN_A_NAME = re.compile(r"[^/\w.\- ]")


def metric_name(*parts: Any) -> str:
    """A metric name MLflow takes: the parts joined by '.', each character it refuses (the '+'
    of a composed or planned recipe, the '|' of a bench engine) made '_'."""
    return ".".join(_NOT_IN_A_NAME.sub("_", str(p)) for p in parts)


def _row_label(row: dict[str, Any]) -> str | None:
    """What a payload row's metrics are named under: its recipe (quantize, train), or its
    engine and runtime (bench rows, as the bench keys its engines)."""
    if "recipe" in row:
        return str(row["recipe"])
    if "engine" in row and "runtime" in row:
        return f"{row['engine']}|{row['runtime']}"
    return None


# analyze's payload keeps its top-1s in % (its documented JSON); every other command's top-level top-1
# (quantize's and search --evaluate's float_top1, eval's top1) is a fraction. One MLflow key, one unit:
# these are logged as fractions too.
PERCENT_AT_TOP = {"analyze": ("float_top1", "quantized_top1", "weights_only_top1", "activations_only_top1")}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def flat_metrics(payload: dict[str, Any] | None, command: str | None = None,
                 ) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """(metrics, per-step series) from a command's JSON payload: top-level numbers, each result
    row's numbers under ``<recipe>.<key>`` (bench rows: ``<engine>_<runtime>.<key>``), a search's
    evaluation as a quantize run's are and its plan's size under ``plan.<key>``, and a QAT history
    as series over epochs; every name made one MLflow accepts (:func:`metric_name`). ``command``:
    the command that wrote it, for the top-1s it keeps in % (:data:`PERCENT_AT_TOP`)."""
    metrics: dict[str, float] = {}
    series: list[tuple[str, float, int]] = []
    payload = payload or {}
    evaluation = payload.get("evaluation") if isinstance(payload.get("evaluation"), dict) else {}
    search = payload.get("search") if isinstance(payload.get("search"), dict) else {}
    plan = search.get("plan") if isinstance(search.get("plan"), dict) else {}
    meta = plan.get("meta") if isinstance(plan.get("meta"), dict) else {}

    percent = PERCENT_AT_TOP.get(command or "", ())
    for k, v in {**payload, **evaluation}.items():  # search --evaluate: float_top1, test_images beside its rows
        if _number(v):
            metrics[metric_name(k)] = float(v) / 100 if k in percent else float(v)
    for k in ("mean_w_bits", "weight_compression", "weight_bits"):  # the plan a search chose
        if _number(meta.get(k)):
            metrics[metric_name("plan", k)] = float(meta[k])
    for k in ("budget_bits", "calibrations", "seconds"):
        if _number(search.get(k)):
            metrics[metric_name("search", k)] = float(search[k])
    for row in (list(payload.get("results") or []) + list(payload.get("rows") or [])
                + list(evaluation.get("results") or [])):
        label = _row_label(row) if isinstance(row, dict) else None
        if label is not None:
            for k, v in row.items():
                if _number(v):
                    metrics[metric_name(label, k)] = float(v)
    for row in payload.get("history") or []:
        if isinstance(row, dict) and _number(row.get("epoch")):
            series += [(metric_name(k), float(v), int(row["epoch"])) for k, v in row.items()
                       if k != "epoch" and _number(v)]
    return metrics, series


def log_run(uri: str, command: str, argv: list[str], *, status: str, seconds: float,
            payload: dict[str, Any] | None, artifacts: dict[str, str], params: dict[str, Any]) -> str:
    """Log one finished command as an MLflow run under the experiment ``lowbit``; returns its id."""
    mlflow = _mlflow()
    try:
        return _log(mlflow, uri, command, argv, status, seconds, payload, artifacts, params)
    except Exception as err:  # noqa: BLE001 - whatever the tracking server says, said as lowbit's error
        raise LowbitError(f"MLflow at {uri} did not take the run ({type(err).__name__}: {str(err)[:300]}); the "
                          "command itself finished: its results are in the run registry and its output files") from None


def _log(mlflow, uri: str, command: str, argv: list[str], status: str, seconds: float,
         payload: dict[str, Any] | None, artifacts: dict[str, str], params: dict[str, Any]) -> str:
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("lowbit")
    metrics, series = flat_metrics(payload, command)
    with mlflow.start_run(run_name=f"lowbit {command}") as run:
        mlflow.set_tags({"lowbit.command": command, "lowbit.status": status, "lowbit.argv": " ".join(argv)})
        mlflow.log_params({k: str(v) for k, v in params.items() if v is not None})
        mlflow.log_metrics({**metrics, "wall_seconds": seconds})
        for key, value, step in series:
            mlflow.log_metric(key, value, step=step)
        for path in artifacts.values():
            p = Path(path)
            if p.is_file():
                mlflow.log_artifact(str(p))
            elif p.is_dir():
                mlflow.log_artifacts(str(p), artifact_path=p.name)
        return run.info.run_id
