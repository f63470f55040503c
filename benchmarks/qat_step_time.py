"""ms per training step, float vs QAT, measured in one run (the ratio is the figure).

Float: the pretrained model in train mode. QAT: the same model calibrated with the recipe
and put in its training form (trainable quantizers, BN trained), exactly what the qat step
runs. Both take SGD steps on the same batches, interleaved round by round so that machine
noise hits both alike; the median per step is reported.

    python benchmarks/qat_step_time.py --data-dir ../shared/data --models-dir ../shared/models \
        --out benchmarks/results/qat_step_time.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit.data import calibration_subset, dataset_tensors, load_dataset
from lowbit.qat.convert import to_training_form
from lowbit.recipes.recipe import load_recipe
from lowbit.state_io import atomic_write_text
from lowbit.zoo import model_info, pretrained


def step_timer(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN201
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    model.train()

    def step() -> float:
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--recipe", default="w4a4-lsq")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--label", default="", help="which code ran (e.g. a commit), stored as the row's 'code'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train = load_dataset(model_info(args.model).dataset, "train", data_dir=args.data_dir, download=False)
    x, y = dataset_tensors(calibration_subset(train, args.batch_size, seed=0))
    model = pretrained(args.model, models_dir=args.models_dir, download=False)
    recipe = load_recipe(args.recipe)
    ptq = dict(recipe.source, steps=["calibrate"])
    qm = lowbit.quantize(model, ptq, calib=x, progress=False)
    to_training_form(qm, recipe.weights.quantizer, recipe.activations.quantizer, recipe.weights.quantizer_options,
                     recipe.activations.quantizer_options, [x])
    float_step, qat_step = step_timer(model, x, y), step_timer(qm, x, y)
    float_step(), qat_step()  # warm-up
    times: dict[str, list[float]] = {"float": [], "qat": []}
    for _ in range(args.rounds):
        times["float"].append(float_step())
        times["qat"].append(qat_step())
    row = {"model": args.model, "recipe": args.recipe, "batch_size": args.batch_size, "threads": args.threads,
           "rounds": args.rounds, "float_ms": 1000 * statistics.median(times["float"]),
           "qat_ms": 1000 * statistics.median(times["qat"])}
    row["ratio"] = row["qat_ms"] / row["float_ms"]
    if args.label:
        row["code"] = args.label
    print(json.dumps(row))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"rows": []}
    results["rows"].append(row)
    atomic_write_text(out, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
