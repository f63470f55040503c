"""Do the exported ONNX models score in ONNX Runtime and OpenVINO what the QuantModel scores?

For each recipe: quantize ResNet-20 (the recipe's own calibration draw from the training split),
export it, and score the QuantModel and the file in each runtime on the full test split; also the
mean |logit| difference of each runtime from the QuantModel. One thread everywhere.

    python benchmarks/onnx_runtime_agreement.py --data-dir ../shared/data --models-dir ../shared/models \\
        --out benchmarks/results/onnx_runtime_agreement.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import lowbit
from lowbit.data import dataset_tensors, load_dataset
from lowbit.deploy.onnx_export import export_onnx
from lowbit.deploy.runtime import OnnxModel
from lowbit.evaluation import TensorBatches, calibration_batches
from lowbit.recipes.recipe import load_recipe
from lowbit.zoo import pretrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--recipes", default="w8a8,w4a4,w3a3")
    ap.add_argument("--runtimes", default="ort,openvino")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = pretrained(args.model, models_dir=args.models_dir, download=False)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir, download=False)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir, download=False)
    x, _ = dataset_tensors(test)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes.split(","):
            qm = lowbit.quantize(model, name, calib=calibration_batches(train, load_recipe(name)), progress=False)
            path = export_onnx(qm, Path(tmp) / f"{name}.onnx", x[:1])
            with torch.no_grad():
                ours = torch.cat([qm(x[i:i + 500]) for i in range(0, len(x), 500)])
            row = {"recipe": name, "model": args.model, "test_images": len(x),
                   "quantmodel_top1": 100 * lowbit.evaluate(qm, TensorBatches(test, 500))}
            for rt in args.runtimes.split(","):
                engine = OnnxModel(path, runtime=rt, threads=1)
                theirs = torch.cat([engine(x[i:i + 500]) for i in range(0, len(x), 500)])
                row[f"{rt}_top1"] = 100 * lowbit.evaluate(engine, TensorBatches(test, 500))
                row[f"{rt}_mean_abs_logit_diff"] = float((ours - theirs).abs().mean())
                row[f"{rt}_top1_agreement"] = 100 * float((ours.argmax(1) == theirs.argmax(1)).float().mean())
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
