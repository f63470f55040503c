"""Runtime comparison in one run: PyTorch float, ONNX Runtime float, lowbit's int8 QDQ
ONNX, and ONNX Runtime's own ``quantize_static`` (the peer) on the same float model.

Accuracy on the test split; lowbit and the peer calibrate on the same training images.
Latency at batch 1 and throughput at batch 64 (the whole test split when it holds fewer
images; the payload's ``throughput_batch``): warm-up runs, then the median of repeated
timed runs, with intra-op threads fixed for every engine. ``repeats`` is the exact number of
timed batch-64 runs per engine (batch 1 gets four times as many, being cheaper), spread over
up to ten interleaved rounds; the payload records both counts (``timed_runs_b64``,
``timed_runs_b1``) next to the ``repeats`` asked for.
"""
from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from lowbit.api import evaluate, quantize
from lowbit.deploy.artifact import save
from lowbit.deploy.onnx_export import export_onnx
from lowbit.deploy.runtime import OnnxModel, runtime_name
from lowbit.errors import LowbitError
from lowbit.evaluation import TensorBatches, calibration_batches
from lowbit.recipes.recipe import load_recipe


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ort_quantize_static(float_path: Path, out: Path, calib: list[torch.Tensor], **options: Any) -> Path:
    """ONNX Runtime's static QDQ quantizer with its defaults plus per-channel weights (uint8
    activations, int8 weights); ``options`` go to ``quantize_static`` as they are (the peers
    benchmark passes 4-bit types, a calibration method and per-tensor overrides)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    input_name = onnx.load(str(float_path)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{input_name: b.numpy()} for b in calib])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

    settings = {"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8,
                "weight_type": QuantType.QInt8, **options}
    quantize_static(str(float_path), str(out), Reader(), **settings)
    return out


B1_RUNS_PER_REPEAT = 4  # batch-1 runs are cheap and noisier: four timed ones per timed batch-64 run


def split_repeats(repeats: int, rounds: int = 10) -> list[int]:
    """Timed batch-64 runs per round, summing to exactly ``repeats`` (at most ``rounds``
    rounds, none empty), so every ``repeats`` value times as many runs as it says."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise LowbitError(f"bench: repeats must be a whole number of timed runs >= 1, not {repeats!r}")
    n = max(1, min(rounds, repeats))
    q, extra = divmod(repeats, n)
    return [q + (1 if i < extra else 0) for i in range(n)]


def time_engines(engines: dict[Hashable, nn.Module], x1: torch.Tensor, x64: torch.Tensor, repeats: int,
                 rounds: int = 10) -> dict[Hashable, tuple[float, float]]:
    """(batch-1 latency, batch-64 time) per engine: up to ``rounds`` interleaved rounds, each
    a median of timed runs, and the median over rounds, so a slow spell of the machine
    falls on every engine alike instead of on whichever ran then. Each engine gets exactly
    ``repeats`` timed batch-64 runs and ``B1_RUNS_PER_REPEAT * repeats`` timed batch-1 runs."""
    plan = split_repeats(repeats, rounds)
    seen: dict[Hashable, tuple[list[float], list[float]]] = {k: ([], []) for k in engines}
    with torch.no_grad():
        for r, per in enumerate(plan):
            for name, engine in engines.items():
                seen[name][0].append(median_seconds(lambda: engine(x1), warmup=20 if r == 0 else 2,
                                                    repeats=B1_RUNS_PER_REPEAT * per))
                seen[name][1].append(median_seconds(lambda: engine(x64), warmup=5 if r == 0 else 1, repeats=per))
    return {k: (statistics.median(a), statistics.median(b)) for k, (a, b) in seen.items()}


def run_runtime_benchmark(
    model: nn.Module, train: Dataset, test: Dataset, recipes: Sequence[Any] = ("w8a8",), threads: int = 2,
    repeats: int = 50, test_limit: int | None = None, workdir: Path | None = None,
    runtimes: Sequence[str] = ("ort",), peers: Sequence[tuple[str, Path, Sequence[str], float | None]] = (),
) -> dict[str, Any]:
    """One row per (engine, runtime): PyTorch float, the float ONNX model, lowbit's ONNX
    per recipe, ORT ``quantize_static`` on the same calibration images, and any ``peers``
    given as (name, model file, runtimes it runs in, its quantization seconds). Ratios
    are to the float ONNX model in ONNX Runtime and, when timed, in OpenVINO. ``repeats``:
    timed batch-64 runs per engine (see the module docstring)."""
    recipes = list(recipes)  # (a generator would be spent by the check)
    if not recipes:  # checked before any work: an empty list used to die at its first recipe's calibration
        raise LowbitError("bench: name at least one recipe")
    split_repeats(repeats)  # a bad count is refused before minutes of quantizing, not after
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if workdir is not None:
            return _run(model, train, test, recipes, threads, repeats, test_limit, workdir, runtimes, peers)
        with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as scratch:  # (each run left ~2 MB in /tmp)
            return _run(model, train, test, recipes, threads, repeats, test_limit, Path(scratch), runtimes, peers)
    finally:
        torch.set_num_threads(previous)  # a library call leaves the process as it found it


# The float ONNX model's wrapper: quantization is switched off for the export, so its
# quantizers only need to be calibrated (min-max on one batch), not good.
FLOAT_RECIPE = {"name": "float", "description": "the float network as built (BN folded), for the float ONNX model",
                "weights": {"bits": 8, "estimator": "minmax"}, "activations": {"bits": 8, "estimator": "minmax"},
                "steps": ["calibrate"]}


def float_onnx_model(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """The float ONNX model, wrapped from ``model`` itself: a recipe's QuantModel would carry
    the weights its steps edited (bias correction, GPTQ, ...) or the network it rewrote
    (widen, hardtanh, Bi-Real shortcuts), so every ratio would depend on recipe order."""
    qm = quantize(model, FLOAT_RECIPE, calib=[example], progress=False)
    with qm.quantization(weights=False, activations=False):
        return export_onnx(qm, path, example)


def _run(model, train, test, recipes, threads, repeats, test_limit, workdir, runtimes, peers) -> dict[str, Any]:
    runtimes = [runtime_name(r) for r in runtimes]
    work = Path(workdir)
    # A copy in eval mode: a model in train mode would update its BN statistics while timed
    # (changing the caller's model) and be timed and scored as a different network.
    model = copy.deepcopy(model).eval()
    loaded = [load_recipe(r) for r in recipes]
    names = [r.name for r in loaded]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # each recipe's files and row are named by it: the later one overwrote the earlier, one row lost
        raise LowbitError(f"bench: recipe name(s) {twice} given more than once (two recipe files of one name count "
                          "too); give each recipe a distinct name")
    calib = calibration_batches(train, loaded[0])  # the peers calibrate on the first recipe's images
    example = calib[0][:1]
    # (name, file, runtimes, quantize seconds, artifact file)
    files: list[tuple[str, Path, list[str], float | None, Path | None]] = []
    float_onnx = float_onnx_model(model, work / "float.onnx", example)
    files.append(("float", float_onnx, runtimes, None, None))
    for i, r in enumerate(loaded):
        r_calib = _recipe_calibration(train, r, calib if i == 0 else None)
        start = time.perf_counter()
        qm = quantize(model, r, calib=r_calib, progress=False)
        seconds = time.perf_counter() - start
        stem = r.name.replace("/", "_")
        files.append((f"lowbit {r.name}", export_onnx(qm, work / f"{stem}.onnx", example), runtimes, seconds,
                      save(qm, work / f"{stem}.lowbit")))
    start = time.perf_counter()
    peer_onnx = ort_quantize_static(float_onnx, work / "ort_static.onnx", calib)
    files.append(("ort quantize_static", peer_onnx, runtimes, time.perf_counter() - start, None))
    files += [(name, Path(path), [runtime_name(r) for r in rts if runtime_name(r) in runtimes], secs, None)
              for name, path, rts, secs in peers]
    test_batches = TensorBatches(test, limit=test_limit)
    x1, _ = next(iter(TensorBatches(test, batch_size=1)))
    x64, _ = next(iter(TensorBatches(test, batch_size=64)))
    # keyed by (engine name, runtime): a recipe name may hold any character, "|" included
    engines: dict[tuple[str, str], nn.Module] = {("float", "pytorch"): model}
    info: dict[tuple[str, str], tuple[Path, float | None, Path | None]] = {}
    for name, path, rts, seconds, artifact in files:
        for rt in rts:
            engines[(name, rt)] = OnnxModel(path, threads=threads, runtime=rt)
            info[(name, rt)] = (path, seconds, artifact)
    # time_engines sees "name|runtime" labels (what its callers and tests print); they are only looked up,
    # never split, and stay distinct because no runtime name holds a "|"
    timing = time_engines({_label(k): e for k, e in engines.items()}, x1, x64, repeats)
    rows = []
    for key, engine in engines.items():
        name, rt = key
        lat1, lat_batch = timing[_label(key)]
        path, seconds, artifact = info.get(key, (None, None, None))
        row = {"engine": name, "runtime": rt, "top1": round(100 * evaluate(engine, test_batches), 2),
               "latency_b1_ms": round(1000 * lat1, 3),
               # a test split under 64 images makes a smaller batch: count the images it holds
               "throughput_b64_img_s": round(len(x64) / lat_batch, 1),
               "file_kb": None if path is None else round(_model_bytes(path) / 1024, 1),
               "quantize_s": None if seconds is None else round(seconds, 2)}
        if artifact is not None:
            row["lowbit_file_kb"] = round(os.path.getsize(artifact) / 1024, 1)
        rows.append(row)
    for rt in ("ort", "openvino"):
        base = next((row for row in rows if row["engine"] == "float" and row["runtime"] == rt), None)
        if base is None:
            continue
        for row in rows:
            row[f"b64_vs_float_{rt}"] = round(row["throughput_b64_img_s"] / base["throughput_b64_img_s"], 2)
            row[f"b1_vs_float_{rt}"] = round(base["latency_b1_ms"] / row["latency_b1_ms"], 2)
    return {"recipes": [r.name for r in loaded], "threads": threads, "repeats": repeats,
            "timed_runs_b64": repeats, "timed_runs_b1": B1_RUNS_PER_REPEAT * repeats, "runtimes": runtimes,
            "test_images": len(test_batches.indices), "calibration_images": sum(len(b) for b in calib),
            "throughput_batch": len(x64), "rows": rows}


def _label(key: tuple[str, str]) -> str:
    """An engine's "name|runtime" label; unique per (name, runtime) since runtime names hold no "|"."""
    return f"{key[0]}|{key[1]}"


def _recipe_calibration(train: Dataset, recipe: Any, ready: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    """A recipe's calibration batches (``ready``: already drawn for it); None for a data-free
    recipe (ZeroQ), which distils its own and refuses real ones."""
    if recipe.data_free:
        return None
    return ready if ready is not None else calibration_batches(train, recipe)


def _model_bytes(path: Path) -> int:
    """An ONNX file, or an OpenVINO IR's .xml plus its .bin weights."""
    size = os.path.getsize(path)
    weights = path.with_suffix(".bin")
    return size + (os.path.getsize(weights) if path.suffix == ".xml" and weights.is_file() else 0)
