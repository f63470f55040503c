"""Runtime benchmark (issue 3): PyTorch float, ONNX Runtime float, lowbit's int8 QDQ ONNX,
and ONNX Runtime's own quantize_static on the same float model, in one run.

Accuracy on the full CIFAR-10 test split; calibration (lowbit and the peer alike) on the
same 1024 training images. Latency at batch 1 and throughput at batch 64: warm-up runs,
then the median of repeated timed runs, with intra-op threads fixed for every engine.

    python benchmarks/runtime_resnet20.py --data-dir ../shared/data --models-dir ../shared/models
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import lowbit
from lowbit.data import load_dataset
from lowbit.deploy.onnx_export import export_onnx
from lowbit.deploy.runtime import OnnxModel
from lowbit.evaluation import TensorBatches, calibration_batches
from lowbit.report.tables import format_table
from lowbit.zoo import pretrained


def timed(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ort_quantize_static(float_path: Path, out: Path, calib: list[torch.Tensor]) -> Path:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    input_name = onnx.load(str(float_path)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{input_name: b.numpy()} for b in calib])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--data-dir")
    ap.add_argument("--models-dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "runtime_resnet20.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = pretrained(args.model, models_dir=args.models_dir)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir)
    recipe = lowbit.load_recipe(args.recipe)
    calib = calibration_batches(train, recipe)
    qm = lowbit.quantize(model, recipe, calib=calib, progress=False)
    work = Path(tempfile.mkdtemp(prefix="lowbit-bench-"))
    example = calib[0][:1]
    with qm.quantization(weights=False, activations=False):
        float_onnx = export_onnx(qm, work / "float.onnx", example)
    lowbit_onnx = export_onnx(qm, work / "lowbit_int8.onnx", example)
    peer_onnx = ort_quantize_static(float_onnx, work / "ort_static.onnx", calib)
    artifact = lowbit.save(qm, work / "model.lowbit")

    engines = {
        "pytorch float": model,
        "lowbit fake-quant (torch)": qm,
        "onnxruntime float": OnnxModel(float_onnx, threads=args.threads),
        "lowbit int8 onnx": OnnxModel(lowbit_onnx, threads=args.threads),
        "ort quantize_static": OnnxModel(peer_onnx, threads=args.threads),
    }
    files = {"pytorch float": None, "lowbit fake-quant (torch)": artifact, "onnxruntime float": float_onnx,
             "lowbit int8 onnx": lowbit_onnx, "ort quantize_static": peer_onnx}
    test_batches = TensorBatches(test)
    x1, _ = next(iter(TensorBatches(test, batch_size=1)))
    x64, _ = next(iter(TensorBatches(test, batch_size=64)))
    rows = []
    for name, engine in engines.items():
        top1 = lowbit.evaluate(engine, test_batches)
        with torch.no_grad():
            lat1 = timed(lambda: engine(x1), warmup=20, repeats=args.repeats * 4)
            lat64 = timed(lambda: engine(x64), warmup=5, repeats=args.repeats)
        rows.append({"engine": name, "top1": round(100 * top1, 2), "latency_b1_ms": round(1000 * lat1, 3),
                     "throughput_b64_img_s": round(64 / lat64, 1),
                     "file_kb": round(os.path.getsize(files[name]) / 1024, 1) if files[name] else None})
    base = next(r for r in rows if r["engine"] == "onnxruntime float")
    for r in rows:
        r["speedup_b64_vs_ort_float"] = round(r["throughput_b64_img_s"] / base["throughput_b64_img_s"], 2)
        r["speedup_b1_vs_ort_float"] = round(base["latency_b1_ms"] / r["latency_b1_ms"], 2)
    print(f"{args.model} {args.recipe}, {args.threads} threads, full CIFAR-10 test split")
    print(format_table(rows, markdown=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "recipe": args.recipe, "threads": args.threads,
                                    "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
