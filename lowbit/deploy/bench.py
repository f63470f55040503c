"""Runtime comparison in one run: PyTorch float, ONNX Runtime float, lowbit's int8 QDQ
ONNX, and ONNX Runtime's own ``quantize_static`` (the peer) on the same float model.

Accuracy on the test split; lowbit and the peer calibrate on the same training images.
Latency at batch 1 and throughput at batch 64: warm-up runs, then the median of repeated
timed runs, with intra-op threads fixed for every engine.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from lowbit.api import evaluate, quantize
from lowbit.deploy.artifact import save
from lowbit.deploy.onnx_export import export_onnx
from lowbit.deploy.runtime import OnnxModel
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


def ort_quantize_static(float_path: Path, out: Path, calib: list[torch.Tensor]) -> Path:
    """ONNX Runtime's static QDQ quantizer with its defaults plus per-channel weights."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    input_name = onnx.load(str(float_path)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{input_name: b.numpy()} for b in calib])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def run_runtime_benchmark(
    model: nn.Module, train: Dataset, test: Dataset, recipes: Sequence[Any] = ("w8a8",), threads: int = 2,
    repeats: int = 50, test_limit: int | None = None, workdir: Path | None = None,
) -> dict[str, Any]:
    """One row per engine; lowbit gets a fake-quant and an ONNX row per recipe."""
    torch.set_num_threads(threads)
    work = Path(workdir or tempfile.mkdtemp(prefix="lowbit-bench-"))
    loaded = [load_recipe(r) for r in recipes]
    calib_sets = [calibration_batches(train, r) for r in loaded]
    calib = calib_sets[0]  # the peer calibrates on the first recipe's images
    example = calib[0][:1]
    engines: dict[str, tuple[nn.Module, Path | None]] = {"pytorch float": (model, None)}
    float_onnx = None
    for r, r_calib in zip(loaded, calib_sets):
        qm = quantize(model, r, calib=r_calib, progress=False)
        if float_onnx is None:
            with qm.quantization(weights=False, activations=False):
                float_onnx = export_onnx(qm, work / "float.onnx", example)
            engines["onnxruntime float"] = (OnnxModel(float_onnx, threads=threads), float_onnx)
        stem = r.name.replace("/", "_")
        engines[f"lowbit fake-quant torch ({r.name})"] = (qm, save(qm, work / f"{stem}.lowbit"))
        onnx_path = export_onnx(qm, work / f"{stem}.onnx", example)
        engines[f"lowbit onnx ({r.name})"] = (OnnxModel(onnx_path, threads=threads), onnx_path)
    assert float_onnx is not None
    peer_onnx = ort_quantize_static(float_onnx, work / "ort_static.onnx", calib)
    engines["ort quantize_static"] = (OnnxModel(peer_onnx, threads=threads), peer_onnx)
    test_batches = TensorBatches(test, limit=test_limit)
    x1, _ = next(iter(TensorBatches(test, batch_size=1)))
    x64, _ = next(iter(TensorBatches(test, batch_size=64)))
    rows = []
    for name, (engine, file) in engines.items():
        top1 = evaluate(engine, test_batches)
        with torch.no_grad():
            lat1 = median_seconds(lambda e=engine: e(x1), warmup=20, repeats=4 * repeats)
            lat64 = median_seconds(lambda e=engine: e(x64), warmup=5, repeats=repeats)
        rows.append({"engine": name, "top1": round(100 * top1, 2), "latency_b1_ms": round(1000 * lat1, 3),
                     "throughput_b64_img_s": round(64 / lat64, 1),
                     "file_kb": round(os.path.getsize(file) / 1024, 1) if file else None})
    base = next(row for row in rows if row["engine"] == "onnxruntime float")
    for row in rows:
        row["speedup_b64"] = round(row["throughput_b64_img_s"] / base["throughput_b64_img_s"], 2)
        row["speedup_b1"] = round(base["latency_b1_ms"] / row["latency_b1_ms"], 2)
    return {"recipes": [r.name for r in loaded], "threads": threads, "repeats": repeats,
            "test_images": len(test_batches.indices), "rows": rows}
