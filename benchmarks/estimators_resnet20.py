"""Every range estimator × {W8A8, W6A6, W4A8, W4A4} on a CIFAR ResNet (issue 2's table).

Protocol (DESIGN.md): 1024 calibration images from the training split (seed 0), top-1 on
the full 10,000-image test split, float top-1 measured in the same run; per-channel
weights, first and last layer 8-bit, BN folded. Each estimator sets weight and activation
ranges, except: ``bn`` sets activation ranges from BN coefficients (weights then use MSE);
``gaussian-w`` is μL2Q's Gaussian rule on weights only (activations MSE); ``mse+usp``
keeps BN unfolded and re-estimates its statistics after calibration on crop-and-flip
copies of the calibration images (seed 004's QMSE+USP).

    python benchmarks/estimators_resnet20.py --data-dir ../shared/data --models-dir ../shared/models
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lowbit.data import load_dataset
from lowbit.evaluation import compare_recipes
from lowbit.report.tables import format_table
from lowbit.zoo import pretrained

CONFIGS = ["w8a8", "w6a6", "w4a8", "w4a4"]
ESTIMATORS = ["minmax", "percentile", "kl", "mse", "cosine", "gaussian", "gaussian-w", "bn", "mse+usp"]


def recipe_for(config: str, estimator: str) -> dict:
    if estimator == "mse+usp":
        return {"extends": config, "name": f"{config}/mse+usp", "fold_bn": False,
                "steps": ["calibrate", {"usp": {"augment_repeats": 1}}]}
    weight_est = {"bn": "mse", "gaussian-w": "gaussian"}.get(estimator, estimator)
    act_est = {"gaussian-w": "mse"}.get(estimator, estimator)
    return {"extends": config, "name": f"{config}/{estimator}",
            "weights": {"estimator": weight_est}, "activations": {"estimator": act_est}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data-dir")
    ap.add_argument("--models-dir")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--test-limit", type=int)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "estimators_resnet20.json")
    args = ap.parse_args()

    torch.set_num_threads(2)
    model = pretrained(args.model, models_dir=args.models_dir)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir)
    recipes = [recipe_for(c, e) for c in args.configs.split(",") for e in args.estimators.split(",")]
    start = time.perf_counter()
    out = compare_recipes(model, recipes, train, test, test_limit=args.test_limit, progress=False)
    rows = [r.row() for r in out["results"]]
    print(f"{args.model}: float top-1 {100 * out['float_top1']:.2f}% on {out['test_images']} test images")
    print(format_table(rows, ["recipe", "top1", "drop_pt", "compression", "w_compression", "quant_s"], markdown=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": args.model, "float_top1": out["float_top1"], "test_images": out["test_images"],
        "full_test_split": out["full_test_split"], "calibration": "1024 train images, seed 0",
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "total_seconds": time.perf_counter() - start, "results": rows,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
