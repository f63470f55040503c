"""A/B of the MSE range search's refinement: as shipped (offsets around the coarse optimum, 0 not among them)
against the same with the coarse optimum itself re-scored (offset 0 appended), on the main job's first two
recipes (ResNet-20, seed 0, full test split, one thread). Why the shipped one stays: README / estimators.py.

    python benchmarks/mse_refine_ab.py --data-dir ../shared/data --models-dir ../shared/models
"""
from __future__ import annotations

import argparse
import json

import torch

import lowbit
import lowbit.quant.estimators as E
from lowbit.data import load_dataset
from lowbit.evaluation import TensorBatches, calibration_batches
from lowbit.recipes.recipe import load_recipe
from lowbit.zoo import pretrained

SHIPPED_LINSPACE = torch.linspace


def _with_zero_offset(start, end, steps, *args, **kwargs):
    """torch.linspace, plus offset 0 when called for the refinement's offsets (-step..step, 20 points)."""
    out = SHIPPED_LINSPACE(start, end, steps, *args, **kwargs)
    if steps == 20 and float(start) == -float(end) and float(end) < 0.05:
        out = torch.cat([out, torch.zeros(1)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--models-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = pretrained("resnet20", models_dir=args.models_dir, download=False)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir, download=False)
    test = TensorBatches(load_dataset("cifar10", "test", data_dir=args.data_dir, download=False))
    rows = []
    for variant in ("shipped", "coarse optimum re-scored"):
        E.torch.linspace = SHIPPED_LINSPACE if variant == "shipped" else _with_zero_offset
        try:
            for name in ("w8a8", "w4a4"):
                recipe = load_recipe(name)
                qm = lowbit.quantize(model, recipe, calib=calibration_batches(train, recipe), progress=False)
                rows.append({"variant": variant, "recipe": name, "top1": round(100 * lowbit.evaluate(qm, test), 2)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            E.torch.linspace = SHIPPED_LINSPACE


if __name__ == "__main__":
    main()
