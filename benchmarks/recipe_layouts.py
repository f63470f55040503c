"""Issue 10, part 1: the accuracy of every built-in recipe in the old activation layout
(signed/unsigned symmetric grids chosen per tensor, residual-add inputs left unquantized)
("old") and in the integer-runtime layout that is now the default ("integer") (uint8-style grids, affine
where a tensor is signed, add/pool inputs quantized at 8 bits), plus the same layout with
add inputs at the layers' activation width, to show why they stay at 8 bits.

Protocol (DESIGN.md): the recipe's calibration images from the training split (seed 0),
top-1 on the full test split, float top-1 in the same run. Results are appended to the
JSON file as they finish; a rerun skips what it holds.

    python benchmarks/recipe_layouts.py --data-dir ../shared/data --models-dir ../shared/models
    python benchmarks/recipe_layouts.py --table
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowbit.api import evaluate, quantize
from lowbit.data import load_dataset
from lowbit.evaluation import TensorBatches, calibration_batches
from lowbit.recipes.recipe import builtin_names, load_recipe
from lowbit.report.tables import format_table
from lowbit.zoo import pretrained

RESULTS = Path(__file__).parent / "results" / "recipe_layouts.json"
LAYOUTS = {
    "old": {"activations": {"signed": "auto", "symmetric": True}, "quantize_adds": False},
    "integer": {},
    "integer-adds-at-a_bits": {"add_bits": None},
}


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"rows": []}


def save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)  # atomic: a killed run never leaves half a file


def table(data: dict) -> str:
    by = {}
    for r in data["rows"]:
        by.setdefault(r["recipe"], {"recipe": r["recipe"]})[r["layout"]] = r["top1"]
    rows = [{"recipe": k, **{lay: v.get(lay, "") for lay in LAYOUTS}} for k, v in by.items()]
    return format_table(rows, markdown=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(n for n in builtin_names() if n != "w8a8-int8"))
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data-dir")
    ap.add_argument("--models-dir")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    data = load(args.out)
    if args.table:
        print(table(data))
        return
    torch.set_num_threads(args.threads)
    model = pretrained(args.model, models_dir=args.models_dir)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir)
    test = TensorBatches(load_dataset("cifar10", "test", data_dir=args.data_dir))
    done = {(r["model"], r["recipe"], r["layout"]) for r in data["rows"]}
    float_top1 = None
    for name in args.recipes.split(","):
        for layout in args.layouts.split(","):
            if (args.model, name, layout) in done:
                continue
            if layout == "integer-adds-at-a_bits" and load_recipe(name).activations.spec.bits == 8:
                continue  # same model as the default at 8 bits
            if float_top1 is None:
                float_top1 = round(100 * evaluate(model, test), 2)
            recipe = {"extends": name, "name": name, **LAYOUTS[layout]}
            r = load_recipe(recipe)
            calib = None if r.data_free else calibration_batches(train, r)
            start = time.perf_counter()
            qm = quantize(model, r, calib=calib, progress=False)
            seconds = time.perf_counter() - start
            top1 = round(100 * evaluate(qm, test), 2)
            row = {"model": args.model, "recipe": name, "layout": layout, "top1": top1, "float_top1": float_top1,
                   "quant_s": round(seconds, 1), "threads": args.threads}
            print(json.dumps(row), flush=True)
            data = load(args.out)
            data["rows"].append(row)
            save(args.out, data)
    print(table(load(args.out)))


if __name__ == "__main__":
    main()
