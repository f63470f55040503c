"""Packed .lowbit size vs the theoretical size, and exact round trips (issue 3).

Theoretical size = packed codes (params × bits / 8, per layer rounded up to a byte) +
float32 tensors (per-channel scales, activation scales, biases). The file adds the
safetensors header and lowbit's compressed JSON header.

    python benchmarks/artifact_sizes.py --data-dir ../shared/data --models-dir ../shared/models
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

import lowbit
from lowbit.data import load_dataset
from lowbit.deploy.artifact import theoretical_bytes
from lowbit.evaluation import TensorBatches, calibration_batches
from lowbit.report.tables import format_table
from lowbit.zoo import pretrained, pretrained_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--recipes", default="w8a8,w4a4,w2a4")
    ap.add_argument("--data-dir")
    ap.add_argument("--models-dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "artifact_sizes.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = pretrained(args.model, models_dir=args.models_dir)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir)
    x, _ = next(iter(TensorBatches(test, batch_size=500)))
    work = Path(tempfile.mkdtemp(prefix="lowbit-sizes-"))
    float_bytes = 4 * sum(p.numel() for p in model.parameters())
    rows = []
    for name in args.recipes.split(","):
        recipe = lowbit.load_recipe(name)
        qat = {"train": train} if any(s == "qat" for s, _ in recipe.steps) else {}
        if qat:  # sizes only: one training step deploys the kind's grid or codebook; its accuracy is not the point
            src = dict(recipe.source, name=name)
            src["steps"] = [{"qat": {**s["qat"], "epochs": 1, "steps_per_epoch": 1, "val_samples": 256}}
                            if isinstance(s, dict) and "qat" in s else s for s in src["steps"]]
            recipe = lowbit.load_recipe(src)
        qm = lowbit.quantize(model, recipe, calib=calibration_batches(train, recipe), progress=False, **qat)
        path = lowbit.save(qm, work / f"{name}.lowbit")
        loaded = lowbit.load(path)
        size, ideal = os.path.getsize(path), theoretical_bytes(qm)
        rows.append({"recipe": name, "quantizers": sorted({r["quantizer"] for r in qm.layers.rows()}),
                     "w_bits": round(qm.mean_bits()["w_bits"], 3), "file_bytes": size, "theoretical_bytes": ideal,
                     "overhead_pct": round(100 * (size - ideal) / ideal, 2),
                     "vs_float32_params": round(float_bytes / size, 2),
                     "round_trip_exact": bool(torch.equal(loaded(x), qm(x)))})
    print(f"{args.model}: float32 parameters {float_bytes} bytes; checkpoint {os.path.getsize(pretrained_path(args.model, args.models_dir))} bytes")
    print(format_table(rows, markdown=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "float32_param_bytes": float_bytes, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
