"""QAT table: each recipe trained from the pretrained float model, scored on the full test split.

Protocol (DESIGN.md): calibration and training on the training split (45,000 images train,
5,000 held out to choose the final epoch), the float model and the calibration-only (PTQ)
start of the same recipe scored in the same run, the test split touched once per row.
Resumable twice over: finished rows are kept in the JSON file, and an interrupted row
continues from its per-epoch checkpoint under --runs.

    python benchmarks/qat.py --data-dir ../shared/data --models-dir ../shared/models \
        --model resnet20 --recipes w4a4-lsq --out benchmarks/results/qat_resnet20.json
"""
from __future__ import annotations

import argparse
import fcntl
import json
import platform
import time
from pathlib import Path

import torch

import lowbit
from lowbit.data import calibration_subset, dataset_tensors, load_dataset
from lowbit.errors import NumericalError
from lowbit.evaluation import TensorBatches
from lowbit.qat.warm_start import progressive_teacher, trained_float_model
from lowbit.recipes.recipe import load_recipe
from lowbit.state_io import atomic_write_text


def model_and_data(name: str, data_dir: str, models_dir: str):
    from lowbit.zoo import ARCHITECTURES, model_info, pretrained, trained_here

    dataset = model_info(name).dataset
    if ARCHITECTURES[name].weights is None:  # LeNet-5, the small CNNs: a float baseline trained here, cached
        model = trained_here(name, data_dir, download=False)
    else:
        model = pretrained(name, models_dir=models_dir, download=False)
    return model, load_dataset(dataset, "train", data_dir=data_dir, download=False), \
        load_dataset(dataset, "test", data_dir=data_dir, download=False)


def append_row(out: Path, row: dict) -> None:
    """Re-read OUT under a lock and add one row: two lanes may write the same file, and a copy read at start
    would drop the other lane's rows (or a rename made meanwhile)."""
    with open(out.with_suffix(out.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(out.read_text()) if out.exists() else {"rows": []}
        results["rows"] = [r for r in results["rows"] if r["row"] != row["row"]] + [row]
        atomic_write_text(out, json.dumps(results, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--recipes", default="w4a4-lsq")
    ap.add_argument("--epochs", type=int, default=0, help="override every recipe's qat epochs (0: the recipe's)")
    ap.add_argument("--set", action="append", default=[], help="extra qat parameter, key=value (YAML value)")
    ap.add_argument("--edit", action="append", default=[],
                    help="recipe change, dotted.key=value (YAML value), e.g. weights.quantizer=dorefa")
    ap.add_argument("--tag", default="", help="suffix of the row name (e.g. kd); name the edits here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", default="runs", help="folder of per-row checkpoints")
    ap.add_argument("--init-from", default="", help="a finished QAT run's checkpoint folder: its trained model, made "
                    "float, is quantized instead of the pretrained one, which stays the float baseline and the "
                    "distillation teacher (progressive quantization; name it in --tag)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import yaml

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {"rows": []}
    done = {r["row"] for r in results["rows"]}
    model, train, test = model_and_data(args.model, args.data_dir, args.models_dir)
    test_batches = TensorBatches(test, 500)
    float_top1 = None
    for name in args.recipes.split(","):
        recipe = load_recipe(name)
        src = json.loads(json.dumps(recipe.source))
        for kv in args.edit:
            key, v = kv.split("=", 1)
            *parents, leaf = key.split(".")
            node = src
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = yaml.safe_load(v)
        steps = [dict(s) if isinstance(s, dict) else s for s in src.get("steps", [])]
        qat = next((s["qat"] for s in steps if isinstance(s, dict) and "qat" in s), None)
        if qat is None:  # a post-training recipe (e.g. k-means): a row that trains nothing
            qat = {"epochs": 0}
        else:
            if args.epochs:
                qat["epochs"] = args.epochs
            for kv in args.set:
                k, v = kv.split("=", 1)
                qat[k] = yaml.safe_load(v)
        row_name = f"{name}{'-' + args.tag if args.tag else ''}-e{qat['epochs']}"
        if row_name in done:
            print(f"{row_name}: done already", flush=True)
            continue
        # a progressive start: the finished run's float weights (for the graph this recipe builds)
        start_model = trained_float_model(args.init_from, model, train, recipe=load_recipe(dict(src, steps=steps))) \
            if args.init_from else model
        if qat["epochs"]:
            qat["checkpoint"] = str(Path(args.runs) / f"{args.model}-{row_name}")
        src["steps"] = steps
        src["name"] = name
        if float_top1 is None:
            float_top1 = 100 * lowbit.evaluate(model, test_batches)
        c = recipe.calibration
        calib = dataset_tensors(calibration_subset(train, c["samples"], c["seed"]))[0]
        # the PTQ start: every step before qat (calibrate, and e.g. kmeans for k-means layers)
        before = next((i for i, s in enumerate(steps) if isinstance(s, dict) and "qat" in s), len(steps))
        ptq_src = dict(src, steps=steps[:before] or ["calibrate"])
        if src.get("weights", {}).get("quantizer") == "kmeans":  # its qat needs the kmeans step before it
            ptq_src["weights"] = dict(src["weights"], quantizer="uniform")
        ptq = lowbit.quantize(start_model, ptq_src, calib=calib, progress=False)
        ptq_top1 = 100 * lowbit.evaluate(ptq, test_batches)
        print(f"{row_name}: float {float_top1:.2f}, post-training start {ptq_top1:.2f}", flush=True)
        start = time.perf_counter()
        if not qat["epochs"]:
            qm = lowbit.quantize(start_model, src, calib=calib, progress=False)
            row = {"row": row_name, "recipe": name, "model": args.model, "epochs": 0, "init_from": args.init_from, "top1": 100 * lowbit.evaluate(
                qm, test_batches), "float_top1": float_top1, "ptq_start_top1": ptq_top1,
                "w_bits": qm.mean_bits()["w_bits"], "wall_seconds": time.perf_counter() - start,
                "threads": args.threads, "edits": args.edit}
            print(json.dumps({k: row[k] for k in ("row", "top1", "float_top1", "ptq_start_top1")}), flush=True)
            append_row(out, row)
            continue
        try:
            qm = lowbit.quantize(start_model, src, calib=calib, train=train, device=args.device,
                                 teacher=progressive_teacher(model, qat) if args.init_from else None)
        except NumericalError as err:  # a diverged run is a result too: recorded, not retried
            row = {"row": row_name, "recipe": name, "model": args.model, "epochs": qat["epochs"], "qat": qat,
                   "top1": None, "diverged": str(err), "float_top1": float_top1, "ptq_start_top1": ptq_top1,
                   "wall_seconds": time.perf_counter() - start, "threads": args.threads, "device": args.device}
            print(json.dumps({k: row[k] for k in ("row", "diverged", "ptq_start_top1")}), flush=True)
            append_row(out, row)
            continue
        wall = time.perf_counter() - start
        top1 = 100 * lowbit.evaluate(qm.to("cpu"), test_batches)
        info = qm.meta["qat"]
        row = {"row": row_name, "recipe": name, "model": args.model, "epochs": qat["epochs"], "qat": qat,
               "top1": top1, "float_top1": float_top1, "ptq_start_top1": ptq_top1,
               "w_bits": qm.mean_bits()["w_bits"], "a_bits": qm.mean_bits()["a_bits"],
               "best_epoch": info["best_epoch"], "best_val_top1": info["best_val_top1"],
               "wall_seconds": wall, "threads": args.threads, "device": args.device,
               "hardware": platform.processor() or platform.machine(), "history": info["history"],
               "fallbacks": info["fallbacks"], "edits": args.edit, "init_from": args.init_from}
        print(json.dumps({k: row[k] for k in ("row", "top1", "float_top1", "ptq_start_top1", "wall_seconds")}),
              flush=True)
        append_row(out, row)


if __name__ == "__main__":
    main()
