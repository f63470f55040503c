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
from lowbit.qat.engine import training_precision
from lowbit.recipes.recipe import load_recipe
from lowbit.state_io import atomic_write_text
from lowbit.zoo import model_info, pretrained


def step_timer(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32",
               channels_last: bool = False):  # noqa: ANN201
    if channels_last:  # as the qat step lays them out (qat channels_last)
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    model.train()
    context = training_precision(precision, torch.device("cpu"))

    def step() -> float:
        start = time.perf_counter()
        with context():
            out = model(x).float()
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def training_form(model_name: str, recipe_name: str, data_dir: str, models_dir: str, batch_size: int):  # noqa: ANN201
    """(float model, the same calibrated and in the qat step's training form, one training batch x, y)."""
    train = load_dataset(model_info(model_name).dataset, "train", data_dir=data_dir, download=False)
    x, y = dataset_tensors(calibration_subset(train, batch_size, seed=0))
    model = pretrained(model_name, models_dir=models_dir, download=False)
    recipe = load_recipe(recipe_name)
    qm = lowbit.quantize(model, dict(recipe.source, steps=["calibrate"]), calib=x, progress=False)
    to_training_form(qm, recipe.weights.quantizer, recipe.activations.quantizer, recipe.weights.quantizer_options,
                     recipe.activations.quantizer_options, [x])
    return model, qm, x, y


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
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "both"),
                    help="arithmetic of both steps' convolutions (qat precision); both: time fp32 and bf16 interleaved")
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory order for both (qat channels_last)")
    ap.add_argument("--label", default="", help="which code ran (e.g. a commit), stored as the row's 'code'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, qm, x, y = training_form(args.model, args.recipe, args.data_dir, args.models_dir, args.batch_size)
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    timers = {f"{kind}_{p}": step_timer(m, x, y, p, args.channels_last)
              for p in precisions for kind, m in (("float", model), ("qat", qm))}
    for step in timers.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, step in timers.items():
            times[name].append(step())
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    base = precisions[0]
    row = {"model": args.model, "recipe": args.recipe, "batch_size": args.batch_size, "threads": args.threads,
           "rounds": args.rounds, "precision": args.precision, "channels_last": args.channels_last,
           "float_ms": ms[f"float_{base}"], "qat_ms": ms[f"qat_{base}"]}
    row["ratio"] = row["qat_ms"] / row["float_ms"]
    if "bf16" in precisions and base != "bf16":
        row.update(float_bf16_ms=ms["float_bf16"], qat_bf16_ms=ms["qat_bf16"],
                   qat_bf16_over_fp32=ms["qat_bf16"] / ms["qat_fp32"],
                   qat_bf16_over_float_fp32=ms["qat_bf16"] / ms["float_fp32"])
    if args.label:
        row["code"] = args.label
    print(json.dumps(row))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"rows": []}
    results["rows"].append(row)
    atomic_write_text(out, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
