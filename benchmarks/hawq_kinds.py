"""HAWQ over (bits, weight kind) candidates: write the plan a mixed-kind QAT row trains.

Reads only the training split (the recipe's calibration subset), as `lowbit search` does;
then train and score the plan with benchmarks/qat.py, e.g.

    python benchmarks/hawq_kinds.py --data-dir ../shared/data --models-dir ../shared/models \
        --model lenet5 --recipe w2a32-twn --candidates 1:xnor,2:twn,3:kmeans --target-bits 2.0 \
        --out benchmarks/results/plans/lenet5-kinds-2.0.json
    python benchmarks/qat.py ... --model lenet5 --recipes w2a32-twn --epochs 1 \
        --edit plan=benchmarks/results/plans/lenet5-kinds-2.0.json --edit 'steps=[calibrate, kmeans, {qat: {}}]' \
        --tag hawq-kinds --out benchmarks/results/qat_families_lenet5.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from qat import model_and_data

from lowbit.data import calibration_subset, dataset_tensors
from lowbit.mixed.hawq import hawq_search, parse_candidates
from lowbit.recipes.recipe import load_recipe
from lowbit.state_io import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--recipe", default="w2a32-twn")
    ap.add_argument("--candidates", default="1:xnor,2:twn,3:kmeans")
    ap.add_argument("--target-bits", type=float, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, train, _ = model_and_data(args.model, args.data_dir, args.models_dir)
    recipe = load_recipe(args.recipe)
    c = recipe.calibration
    calib = dataset_tensors(calibration_subset(train, c["samples"], c["seed"]))
    result = hawq_search(model, recipe, calib, target_bits=args.target_bits,
                         candidates=parse_candidates(args.candidates))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plan = result.plan.to_dict()
    plan["meta"].update({"model": args.model, "recipe": args.recipe, "candidates": args.candidates,
                         "seconds": round(result.seconds, 1)})
    atomic_write_text(args.out, json.dumps(plan, indent=1))
    for name, entry in plan["layers"].items():
        print(f"{name:24s} {entry['w_bits']} bits  {entry.get('w_quantizer', '(recipe)')}")
    print(f"mean weight bits {plan['meta']['mean_w_bits']:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
