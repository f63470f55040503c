"""Issue 4's table: every post-training method × {W4A8, W4A4, W3A3, W2A4} on CIFAR ResNets.

Protocol (DESIGN.md): 1024 calibration images from the training split (the seed picks
the subset and drives every random choice of the method), top-1 on the full 10,000-image
test split, float top-1 measured in the same run; per-channel weights, first and last
layer 8-bit (weights and their input activations), BN folded unless a row says USP.
Methods with random optimisation run for several seeds; the table shows mean ± standard
deviation and the number of seeds. Rows that calibrate only are deterministic given the
subset and run for seed 0 only. ZeroQ reads no real image: it distils 256 inputs.

Results are appended to the JSON file as they finish, and a rerun skips what is already
there, so the run can be stopped and resumed; ``--table`` prints the README table.

    python benchmarks/ptq_methods.py --data-dir ../shared/data --models-dir ../shared/models \
        --models resnet20 --seeds 0
    python benchmarks/ptq_methods.py --table
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lowbit.api import evaluate, quantize
from lowbit.data import load_dataset
from lowbit.evaluation import TensorBatches, calibration_batches
from lowbit.recipes.recipe import load_recipe
from lowbit.state_io import atomic_write_text
from lowbit.zoo import pretrained

CONFIGS = ["w8a8", "w6a6", "w4a8", "w4a4", "w3a3", "w2a4"]
ITERS = 100          # per layer (layer-wise) or per block (block-wise); see README for why
PD_ITERS = 60        # PD-Quant runs the rest of the network every step: fewer iterations
LONG_ITERS = 1000    # the "long budget" rows: what a bigger budget buys
USP = {"usp": {"augment_repeats": 1}}
FLOAT_OBSERVED = {"calibrate": {"observe": "float"}}
# Below 4 bits the weights use an affine per-channel grid (2^b levels over [min, max] of
# each channel, as BRECQ and QDrop do); the symmetric grid is narrow-range (2 bits =
# ternary) and loses a level that matters at these widths. ONNX export needs symmetric
# weights, the .lowbit artifact stores either.
CONFIG_FIELDS = {"w3a3": {"weights": {"symmetric": False}}, "w2a4": {"weights": {"symmetric": False}}}


def output_grid_gptq(**extra) -> dict:
    """The `gptq` step aimed at the float network's output with each grid re-fitted by its output error
    (a fresh dict per method, plus any further gptq options)."""
    return {"gptq": {"target": "float", "regrid": True, "grid_objective": "output", **extra}}

# name -> (recipe fields added to the bit-width built-in, seed-dependent?). Every data-based row depends on
# its seed's calibration draw; the False rows were once run at seed 0 only, as if they drew nothing, and the
# plain rows the budget table compares with the peers' (which run every seed) are now True.
METHODS: dict[str, tuple[dict, bool]] = {
    "calibrate (mse)": ({"steps": ["calibrate"]}, False),
    "bias correction": ({"steps": ["calibrate", "bias_correction"]}, False),
    "bias correction (weights)": ({"steps": ["calibrate", {"bias_correction": {"source": "weights"}}]}, True),
    "seed002 bn+cosine": ({"weights": {"estimator": "cosine"}, "activations": {"estimator": "bn"},
                           "steps": ["calibrate"]}, False),
    "seed002 bn+cosine+teacher-student": ({"weights": {"estimator": "cosine"}, "activations": {"estimator": "bn"},
                                           "steps": ["calibrate", {"teacher_student": {"iters": ITERS}}]}, True),
    "easyquant": ({"steps": ["calibrate", "easyquant"]}, False),
    "adaround": ({"steps": ["calibrate", {"adaround": {"iters": ITERS}}]}, True),
    "adaround+usp": ({"fold_bn": False, "steps": ["calibrate", {"adaround": {"iters": ITERS}}, USP]}, True),
    "adaquant": ({"steps": ["calibrate", {"adaquant": {"iters": ITERS}}]}, True),
    "brecq": ({"steps": ["calibrate", {"brecq": {"iters": ITERS}}]}, True),
    "qdrop": ({"steps": ["calibrate", {"qdrop": {"iters": ITERS}}]}, True),
    "pdquant": ({"steps": ["calibrate", {"pdquant": {"iters": PD_ITERS, "dc_iters": 10}}]}, True),
    "gptq": ({"steps": ["calibrate", "gptq"]}, True),
    "gptq+bias correction": ({"steps": ["calibrate", "gptq", "bias_correction"]}, True),
    "gptq (act order)+bias correction": ({"steps": ["calibrate", {"gptq": {"act_order": True}}, "bias_correction"]},
                                         True),
    "gptq (float target)": ({"steps": ["calibrate", {"gptq": {"target": "float"}}]}, True),
    "gptq (float target)+bias correction": ({"steps": ["calibrate", {"gptq": {"target": "float"}}, "bias_correction"]},
                                            True),
    "gptq (float target regridded)": ({"steps": ["calibrate", {"gptq": {"target": "float", "regrid": True}}]}, True),
    "gptq (float target output grid)": ({"steps": ["calibrate", output_grid_gptq()]}, True),
    # activation ranges observed on the float network (calibrate's `observe: float`, issue 16 part 1)
    "bias correction (weights; float-observed ranges)": (
        {"steps": [FLOAT_OBSERVED, {"bias_correction": {"source": "weights"}}]}, True),
    # the peers' plain flow matched (issue 16 part 1): full-range symmetric weight grid (or, on affine weights,
    # lo and hi searched independently) and each layer's rounding shift taken on the float network's input
    "bias correction (float inputs; float-observed ranges; peer grid)": (
        {"weights": {"narrow_range": False, "estimator_options": {"ends": "independent"}},
         "steps": [FLOAT_OBSERVED, {"bias_correction": {"source": "float_inputs"}}]}, True),
    "gptq (float-observed ranges)+bias correction": ({"steps": [FLOAT_OBSERVED, "gptq", "bias_correction"]}, True),
    "gptq (float-observed ranges; full-range grid)+bias correction": (
        {"weights": {"narrow_range": False}, "steps": [FLOAT_OBSERVED, "gptq", "bias_correction"]}, True),
    "gptq (float target; float-observed ranges)+bias correction": (
        {"steps": [FLOAT_OBSERVED, {"gptq": {"target": "float"}}, "bias_correction"]}, True),
    "gptq (float target output grid; float-observed ranges)": (
        {"steps": [FLOAT_OBSERVED, output_grid_gptq()]}, True),
    # `shortcut: stream`: residual adds read the block input's 8-bit quantization, which the block's first conv
    # requantizes to its own bits (the default rounds the residual stream to the activations' bits at every block)
    "gptq (float-observed ranges; full-range grid; 8-bit residual stream)+bias correction": (
        {"shortcut": "stream", "weights": {"narrow_range": False}, "steps": [FLOAT_OBSERVED, "gptq", "bias_correction"]},
        True),
    "gptq (float-observed ranges; full-range grid; 8-bit residual stream)": (
        {"shortcut": "stream", "weights": {"narrow_range": False}, "steps": [FLOAT_OBSERVED, "gptq"]}, True),
    "gptq (float target; float-observed ranges; 8-bit residual stream)+bias correction": (
        {"shortcut": "stream", "steps": [FLOAT_OBSERVED, {"gptq": {"target": "float"}}, "bias_correction"]}, True),
    "gptq (float target output grid; float-observed ranges; 8-bit residual stream)": (
        {"shortcut": "stream",
         "steps": [FLOAT_OBSERVED, output_grid_gptq()]}, True),
    "gptq (float target output grid; float-observed ranges; 8-bit residual stream)+bias correction": (
        {"shortcut": "stream",
         "steps": [FLOAT_OBSERVED, output_grid_gptq(), "bias_correction"]}, True),
    "gptq (float target output grid; float-observed ranges; 8-bit residual stream; 2048 images)+bias correction": (
        {"shortcut": "stream", "calibration": {"samples": 2048},
         "steps": [FLOAT_OBSERVED, output_grid_gptq(), {"bias_correction": {"samples": 2048}}]}, True),
    "gptq (float-observed ranges; full-range grid; 8-bit residual stream)+moment matching": (
        {"shortcut": "stream", "weights": {"narrow_range": False}, "steps": [FLOAT_OBSERVED, "gptq", "match_moments"]},
        True),
    # `rows_per_column`: each layer's Hessians from only as many images as give it that many positions per column
    "gptq (float target output grid; float-observed ranges; 8-bit residual stream; 512 rows per column)": (
        {"shortcut": "stream",
         "steps": [FLOAT_OBSERVED, output_grid_gptq(rows_per_column=512)]}, True),
    "gptq (float target output grid; float-observed ranges; 8-bit residual stream; 512 rows per column)+bias correction": (
        {"shortcut": "stream",
         "steps": [FLOAT_OBSERVED, output_grid_gptq(rows_per_column=512), "bias_correction"]}, True),
    "gptq (float target output grid; float-observed ranges; adds read real values; 512 rows per column)": (
        {"shortcut": "real",
         "steps": [FLOAT_OBSERVED, output_grid_gptq(rows_per_column=512)]}, True),
    "gptq (float target output grid; float-observed ranges; 8-bit residual stream; 1024 rows per column)": (
        {"shortcut": "stream",
         "steps": [FLOAT_OBSERVED, output_grid_gptq(rows_per_column=1024)]}, True),
    "gptq (float-observed ranges; full-range grid; 8-bit residual stream; 512 rows per column)": (
        {"shortcut": "stream", "weights": {"narrow_range": False},
         "steps": [FLOAT_OBSERVED, {"gptq": {"rows_per_column": 512}}]}, True),
    "gptq (float-observed ranges; full-range grid; 8-bit residual stream; 512 rows per column)+bias correction": (
        {"shortcut": "stream", "weights": {"narrow_range": False},
         "steps": [FLOAT_OBSERVED, {"gptq": {"rows_per_column": 512}}, "bias_correction"]}, True),
    "gptq (float target; float-observed ranges; 8-bit residual stream; 512 rows per column)+bias correction": (
        {"shortcut": "stream",
         "steps": [FLOAT_OBSERVED, {"gptq": {"target": "float", "rows_per_column": 512}}, "bias_correction"]}, True),
    "moment matching (float-observed ranges; 8-bit residual stream)": (
        {"shortcut": "stream", "steps": [FLOAT_OBSERVED, "match_moments"]}, True),
    # `shortcut: real`: the adds read the block input before any quantizer (their own 8-bit one rounds it; float adds
    # in ONNX Runtime, 1 of 9 fused)
    "gptq (float-observed ranges; full-range grid; adds read real values)+bias correction": (
        {"shortcut": "real", "weights": {"narrow_range": False}, "steps": [FLOAT_OBSERVED, "gptq", "bias_correction"]},
        True),
    # seed 004's USP in folded form (match_moments): each layer's channel mean and variance set to the float one's
    "moment matching (float-observed ranges)": ({"steps": [FLOAT_OBSERVED, "match_moments"]}, True),
    "moment matching (float-observed ranges; peer grid)": (
        {"weights": {"narrow_range": False, "estimator_options": {"ends": "independent"}},
         "steps": [FLOAT_OBSERVED, "match_moments"]}, True),
    "bias correction (float inputs)+moment matching (float-observed ranges; peer grid)": (
        {"weights": {"narrow_range": False, "estimator_options": {"ends": "independent"}},
         "steps": [FLOAT_OBSERVED, {"bias_correction": {"source": "float_inputs"}}, "match_moments"]}, True),
    "gptq (float-observed ranges)+moment matching": ({"steps": [FLOAT_OBSERVED, "gptq", "match_moments"]}, True),
    "gptq (float target; float-observed ranges)+moment matching": (
        {"steps": [FLOAT_OBSERVED, {"gptq": {"target": "float"}}, "match_moments"]}, True),
    "gptq (float target output grid; float-observed ranges)+moment matching": (
        {"steps": [FLOAT_OBSERVED, output_grid_gptq(), "match_moments"]}, True),
    "usp+gptq": ({"fold_bn": False, "steps": ["calibrate", USP, "gptq"]}, True),
    "gptq+usp+bias correction": ({"fold_bn": False, "steps": ["calibrate", "gptq", USP, "bias_correction"]}, True),
    "gptq+usp": ({"fold_bn": False, "steps": ["calibrate", "gptq", USP]}, True),
    "gptq+qdrop": ({"steps": ["calibrate", "gptq", {"qdrop": {"iters": ITERS}}]}, True),
    "zeroq (no real data)": ({"calibration": {"samples": 256}, "steps": [{"zeroq": {"iters": 100}}, "calibrate"]}, True),
    f"seed002 bn+cosine+teacher-student ({LONG_ITERS} it)": (
        {"weights": {"estimator": "cosine"}, "activations": {"estimator": "bn"},
         "steps": ["calibrate", {"teacher_student": {"iters": LONG_ITERS}}]}, True),
    f"brecq ({LONG_ITERS} it)": ({"steps": ["calibrate", {"brecq": {"iters": LONG_ITERS}}]}, True),
    f"qdrop ({LONG_ITERS} it)": ({"steps": ["calibrate", {"qdrop": {"iters": LONG_ITERS}}]}, True),
}
DEFAULT_METHODS = [m for m in METHODS if "it)" not in m]
assert not any("," in m for m in METHODS), "--methods is comma-separated: no comma in a method name"


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

RESULTS = Path(__file__).parent / "results" / "ptq_methods.json"


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": [], "float": {}}


def key(run: dict) -> tuple:
    return run["model"], run["config"], run["method"], run["seed"]


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    data = load_results(args.out)
    done = {key(r) for r in data["runs"]}
    train = load_dataset("cifar10", "train", data_dir=args.data_dir)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir)
    test_batches = TensorBatches(test, 500)
    test_batches = [b for b in test_batches]  # decode once
    for model_name in args.models.split(","):
        model = pretrained(model_name, models_dir=args.models_dir)
        if model_name not in data["float"]:
            data["float"][model_name] = evaluate(model, test_batches)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for config in args.configs.split(","):
                for method in args.methods.split(","):
                    fields, stochastic = METHODS[method]
                    if (model_name, config, method, seed) in done or (seed != 0 and not stochastic):
                        continue
                    calibration = {"seed": seed, **fields.get("calibration", {})}
                    recipe = load_recipe(merge({"extends": config, "name": f"{config}/{method}",
                                                **CONFIG_FIELDS.get(config, {})}, {**fields, "calibration": calibration}))
                    data_free = recipe.steps[0][0] == "zeroq"
                    calib = None if data_free else calibration_batches(train, recipe)
                    torch.manual_seed(seed)
                    qm = quantize(model, recipe, calib, progress=False)
                    start = time.perf_counter()
                    top1 = evaluate(qm, test_batches)
                    row = {"model": model_name, "config": config, "method": method, "seed": seed,
                           "recipe": recipe.to_dict(),
                           "top1": 100 * top1, "drop_pt": 100 * (data["float"][model_name] - top1),
                           "quant_seconds": qm.meta["quantize_seconds"],
                           "step_seconds": qm.meta.get("step_seconds"),
                           "eval_seconds": time.perf_counter() - start,
                           "calibration_images": 0 if data_free else qm.meta["calibration_samples"]}
                    # re-read first: another lane (ptq_budgets' peers) may have added rows since
                    fresh = load_results(args.out)
                    fresh["float"].setdefault(model_name, data["float"][model_name])
                    data = fresh
                    data["runs"].append(row)
                    data["machine"] = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                       "cpu": platform.processor() or platform.machine()}
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(args.out, json.dumps(data, indent=1))  # a killed run keeps the last good file
                    print(f"{model_name} {config:5s} {method:36s} seed {seed}: {row['top1']:.2f} "
                          f"({row['quant_seconds']:.0f} s)", flush=True)


def load_all(paths: list[Path]) -> dict:
    """Merge result files (parallel runs write separate files). A (model, config, method,
    seed) measured in two files counts once, from the later file in ``paths`` (sorted names:
    the newer measurement files sort after ptq_methods.json), so a rerun is never averaged
    in as another seed."""
    merged: dict = {"runs": [], "float": {}}
    by_key: dict[tuple, dict] = {}
    for p in paths:
        d = load_results(p)
        for r in d["runs"]:
            by_key.pop(key(r), None)
            by_key[key(r)] = r
        merged["float"].update(d["float"])
    merged["runs"] = list(by_key.values())
    return merged


def table(data: dict, model: str) -> str:
    runs = [r for r in data["runs"] if r["model"] == model]
    if not runs:
        return f"(no results for {model})"
    fp = 100 * data["float"][model]
    configs = [c for c in CONFIGS if any(r["config"] == c for r in runs)]
    lines = [f"{model}, float {fp:.2f}. Cells: top-1 mean ± std (seeds) · change vs float (pt) · quantize wall time", "",
             "| method | " + " | ".join(c.upper() for c in configs) + " |",
             "|---|" + "---|" * len(configs)]
    for method in METHODS:
        cells = []
        for c in configs:
            rs = [r for r in runs if r["config"] == c and r["method"] == method]
            if not rs:
                cells.append("—")
                continue
            accs = [r["top1"] for r in rs]
            mean = statistics.fmean(accs)
            sd = f" ± {statistics.stdev(accs):.2f} ({len(accs)})" if len(accs) > 1 else " (1)"
            secs = statistics.fmean(r["quant_seconds"] for r in rs)
            change = mean - fp
            cells.append(f"{mean:.2f}{sd} · {'+' if change >= 0 else '−'}{abs(change):.2f} · {secs:.0f} s")
        if any(c != "—" for c in cells):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--data-dir")
    ap.add_argument("--models-dir")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="print the tables from every results/ptq_methods*.json and exit")
    args = ap.parse_args()
    if args.table:
        data = load_all(sorted(RESULTS.parent.glob("ptq_methods*.json")))
        for m in sorted({r["model"] for r in data["runs"]}):
            print(table(data, m) + "\n")
        return
    run(args)


if __name__ == "__main__":
    main()
