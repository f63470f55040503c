"""The ``lowbit`` command: quantize, eval, train, recipes."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from lowbit.errors import DataMismatchError, LowbitError, RecipeError
from lowbit.state_io import blocking_file, tensors_digest

# The main job shows lowbit at its best in a few minutes: plain calibration at 8 bits, the plain
# W4A4 flow ending with match_moments (90.49 on ResNet-20 over 3 seeds, 9 s quiet) and at 2-bit weights
# GPTQ aimed at the float network's output with its grid re-fitted (affine weights: 89.31 ± 0.05).
DEFAULT_RECIPES = "w8a8,w4a4,w2a4-gptq"
NEXT_STEP = ("Longer runs hold more accuracy: `lowbit quantize --recipe w2a4-qdrop` (QDrop, 1000 steps per block, "
             "~10 min here) or a mixed-precision plan from `lowbit search`.")


def _int_at_least(low: int, words: str):
    """An argparse type: an integer >= ``low``, refused at the door with the option's name."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {words}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {words}, got {value}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")  # a seed


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def bits(text: str) -> int:
    """argparse type: a bit width 1..8."""
    value = positive_int(text)
    if value > 8:
        raise argparse.ArgumentTypeError(f"must be a bit width in 1..8, got {value}")
    return value


def existing_file(text: str) -> Path:
    """argparse type: a file that exists (a directory or a missing path is refused)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return path


def output_file(text: str) -> Path:
    """argparse type: a file to write; an existing directory there, or a file among its parents, is refused."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing directory; give a file path")
    blocker = blocking_file(path)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{text} cannot be written: {blocker} is a file, not a folder")
    return path


def safetensors_file(text: str) -> Path:
    """argparse type: a weights file to write, checked before the training that fills it."""
    path = output_file(text)
    if path.suffix != ".safetensors":
        raise argparse.ArgumentTypeError(f"{text}: weights are written as safetensors; use a .safetensors file name")
    return path


def output_dir(text: str) -> Path:
    """argparse type: a directory to write into; an existing file there, or among its parents, is refused."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file; give a directory")
    blocker = blocking_file(path)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{text} cannot be made: {blocker} is a file, not a folder")
    return path


def one_runtime(text: str) -> str:
    """argparse type: one runtime name (ort, openvino)."""
    names = runtime_list(text)
    if len(names) != 1:
        raise argparse.ArgumentTypeError(f"name one runtime, got {text!r}")
    return names[0]


def runtime_list(text: str) -> list[str]:
    """argparse type: comma-separated runtimes (ort, openvino), each checked by name."""
    from lowbit.deploy.runtime import runtime_name

    try:
        names = [runtime_name(r) for r in text.split(",") if r.strip()]
    except LowbitError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not names:
        raise argparse.ArgumentTypeError("name at least one runtime (ort, openvino)")
    return list(dict.fromkeys(names))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet20", help="zoo model name (see `lowbit models`)")
    p.add_argument("--weights", type=existing_file,
                   help="weights for the model: .safetensors/.pt (default: its pretrained release)")
    p.add_argument("--dataset", help="dataset (default: the model's own)")
    p.add_argument("--data", help="your own data instead: imagefolder:DIR (DIR/train/<class>/*, DIR/test/<class>/*) "
                                  "or tensors:FILE.npz (x_train, y_train, x_test, y_test)")
    p.add_argument("--mean", type=float_list, help="per-channel mean of uint8 pixels in [0, 1] units, e.g. 0.5,0.5,0.5")
    p.add_argument("--std", type=float_list, help="per-channel std, same units (default 1)")
    p.add_argument("--data-dir", help="directory holding the dataset (else $LOWBIT_DATA_DIR, the cache, or download)")
    p.add_argument("--models-dir", help="directory holding pretrained weights (else $LOWBIT_MODELS_DIR, the cache, or download)")
    p.add_argument("--no-download", action="store_true", help="never download data or weights; fail if absent")
    p.add_argument("--test-limit", type=positive_int, help="score on the first N test images only (quick look; not the protocol)")
    p.add_argument("--json", type=output_file, help="also write the results as JSON to this file")
    p.add_argument("--debug", action="store_true", help="print the Python traceback of an unexpected error")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    _add_registry(p)
    p.add_argument("--no-registry", action="store_true", help="do not record this run in the run registry")
    p.add_argument("--mlflow", metavar="URI", help="also log this run to MLflow at this tracking URI (pip install mlflow)")


def _add_registry(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", type=Path,
                   help="run registry SQLite file (else $LOWBIT_REGISTRY, else <cache dir>/runs.sqlite3)")


def float_list(text: str) -> list[float]:
    """argparse type: comma-separated numbers."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    from lowbit import zoo

    if ":" in args.model:  # pkg.module:factory, the user's own architecture
        from lowbit.data.user import load_factory

        if not args.weights:
            raise LowbitError(f"--model {args.model}: a model from a factory needs --weights (its trained weights)")
        if not args.data:
            raise LowbitError(f"--model {args.model}: a model from a factory needs --data (imagefolder:DIR or "
                              "tensors:FILE.npz); the zoo's datasets belong to the zoo's models")
        model = zoo.load_weights(load_factory(args.model), args.weights)
        dataset = args.data
    else:
        model, dataset = _load_zoo_model(args)
    _record(args, model_fingerprint=_model_fingerprint(model), dataset=dataset,
            weights=os.path.abspath(args.weights) if args.weights else None)  # `lowbit report RUN` draws these
    args._model = model  # the data loader tries it on one image
    return model.eval(), dataset


def _load_zoo_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    from lowbit import zoo

    info = zoo.model_info(args.model)
    if args.weights:
        model = zoo.load_weights(zoo.build(args.model), args.weights)
    elif zoo.ARCHITECTURES[args.model].weights is None:
        # no published release (LeNet-5, the small CNNs): the float baseline lowbit trains once and caches
        from lowbit.zoo.trained_here import DEFAULT_EPOCHS

        path = zoo.trained_here_path(args.model)
        if not path.is_file():
            print(f"{args.model} has no published weights: training its float baseline on {info.dataset} "
                  f"({DEFAULT_EPOCHS} epochs, cached as {path}); --weights uses your own",
                  file=sys.stderr)
        model = zoo.trained_here(args.model, args.data_dir, progress=not args.no_progress,
                                 download=not args.no_download)
    else:
        model = zoo.pretrained(args.model, models_dir=args.models_dir, download=not args.no_download)
    return model, args.data or args.dataset or info.dataset


def _model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (16 hex) over the state dict's names and bytes: the same weights, the same print."""
    return tensors_digest(model.state_dict().items())


def _given(argv: list[str], option: str) -> bool:
    """Whether ``option`` was typed (as ``--opt value`` or ``--opt=value``), not left at its default."""
    return any(a == option or a.startswith(option + "=") for a in argv)


def _record(args: argparse.Namespace, **fields: Any) -> None:
    """Add fields to this command's row in the run registry (when it is recorded), and keep them on
    ``args`` either way: --mlflow logs the model and dataset the command resolved, not argparse's defaults."""
    resolved = getattr(args, "_resolved", None)
    if resolved is None:
        resolved = args._resolved = {}
    resolved.update(fields)
    run = getattr(args, "_run", None)
    if run is not None:
        run[0].update(run[1], **fields)


def _datasets(args: argparse.Namespace, dataset: str):
    from lowbit.data import load_dataset

    download = not getattr(args, "no_download", False)
    if getattr(args, "data", None):
        from lowbit.data.user import load_user_data

        train, test = load_user_data(args.data, args.mean, args.std)
        _check_fits(getattr(args, "_model", None), train, args.data)
    else:
        if getattr(args, "mean", None) or getattr(args, "std", None):
            raise LowbitError("--mean/--std normalise your own --data; the zoo datasets carry their own")
        train = load_dataset(dataset, "train", data_dir=args.data_dir, download=download)
        test = load_dataset(dataset, "test", data_dir=args.data_dir, download=download)
    _record(args, data_fingerprint=f"{dataset}:train={len(train)}:test={len(test)}")
    return train, test


def _check_fits(model: torch.nn.Module | None, train: Any, source: str) -> Any:
    """Run the model on one training sample, so a shape it refuses is named here (with the data's
    source and the layer that refused it), not deep in a step; returns the model's output on it."""
    if model is not None:
        from lowbit.checks import probe_forward

        return probe_forward(model, train[0][0].unsqueeze(0), f"the model refuses the images of {source}: the first")
    return None


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float made None: ``json.dumps`` writes inf and NaN as the bare
    tokens Infinity and NaN, which strict JSON parsers (RFC 8259: browsers, jq, other languages) refuse.
    (An analyzed layer that keeps float weights has an infinite weight SQNR.)"""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _emit(args: argparse.Namespace, payload: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from lowbit.report.tables import format_table

    print(format_table(rows))
    payload = strict_json(payload)
    _record(args, metrics=payload)
    args._payload = payload  # for --mlflow
    if args.json:
        from lowbit.mixed.plan import write_text_file

        write_text_file(args.json, json.dumps(payload, indent=2, default=str))  # /dev/stdout, a link: written through
        print(f"wrote {args.json}")


def artifact_stem(recipe: str) -> str:
    """The file name `--save` gives a recipe's model: the recipe's name, less a recipe-file suffix only
    (``exp.1`` and ``exp.2`` stay apart; Path.stem made both ``exp``, the second overwriting the first)."""
    name = Path(str(recipe)).name
    for suffix in (".yaml", ".yml", ".toml", ".json"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _recipes(args: argparse.Namespace) -> list[Any]:
    """The --recipe list, each with the --plan (a mixed-precision plan JSON) applied."""
    from lowbit.mixed.plan import load_plan
    from lowbit.recipes.recipe import load_recipe

    names = [r.strip() for r in args.recipe.split(",") if r.strip()]
    plan_file = getattr(args, "plan", None)
    if not plan_file:
        return names
    plan = load_plan(plan_file)
    out = []
    for name in names:
        r = load_recipe(name).with_plan(plan)
        r.name = f"{r.name}+{Path(plan_file).stem}"
        out.append(r)
    return out


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.evaluation import compare_recipes

    recipes = _recipes(args)
    if getattr(args, "save", None):  # one file per recipe: two recipes of one name would overwrite each other
        from lowbit.recipes.recipe import load_recipe

        stems = [artifact_stem(load_recipe(r).name if isinstance(r, str) else r.name) for r in recipes]
        twice = sorted({s for s in stems if stems.count(s) > 1})
        if twice:
            raise LowbitError(f"--save would write {', '.join(f'{s}.lowbit' for s in twice)} for more than one "
                              "recipe: give the recipes distinct names")
        _check_artifact_targets([Path(args.save) / f"{s}.lowbit" for s in stems])
    model, dataset = _load_model(args)
    train, test = _datasets(args, dataset)

    def keep(qm, result) -> None:
        if getattr(args, "save", None):
            from lowbit.deploy.artifact import save

            path = save(qm, Path(args.save) / f"{artifact_stem(result.recipe)}.lowbit",
                        metrics={"top1": result.top1, "float_top1": result.float_top1,
                                 **scored_on(test, args.test_limit)})
            print(f"saved {path}")

    out = compare_recipes(model, recipes, train, test, test_limit=args.test_limit, progress=not args.no_progress,
                          on_model=keep)
    rows = [r.row() for r in out["results"]]
    note = "full test split" if out["full_test_split"] else f"first {out['test_images']} test images (NOT the full split)"
    print(f"{args.model} on {dataset}: float top-1 {100 * out['float_top1']:.2f}% ({note})")
    payload = {"model": args.model, "dataset": dataset, **out, "results": rows}
    _emit(args, payload, rows)
    if args.recipe == DEFAULT_RECIPES:
        print(NEXT_STEP)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.api import evaluate
    from lowbit.evaluation import TensorBatches

    if args.onnx and args.lowbit:
        raise LowbitError("--onnx and --lowbit each name the model to score: give one of them")
    if (args.onnx or args.lowbit) and args.recipe:
        raise LowbitError(f"--recipe quantizes the float --model; {'--onnx' if args.onnx else '--lowbit'} scores a "
                          "model already quantized, so it would be ignored: drop one of them")
    if not args.onnx and not args.lowbit and _given(args.argv, "--runtime"):
        raise LowbitError("--runtime picks the runtime of an --onnx model; without --onnx the score comes from "
                          "PyTorch, so it would be ignored: add --onnx FILE (from `lowbit export`) or drop --runtime")
    if args.weights and args.onnx:
        raise LowbitError("--weights loads float weights into --model; --onnx scores the exported model with the "
                          "weights inside it, so --weights would be ignored: drop it")
    if args.weights and args.lowbit and ":" not in args.model:
        raise LowbitError("--weights is used with --lowbit only to rebuild the architecture of a --model "
                          "pkg.module:factory; a .lowbit artifact holds its own weights and rebuilds its zoo model, "
                          "so --weights would be ignored: drop it")
    if args.onnx or args.lowbit:
        return _eval_deployed(args)
    model, dataset = _load_model(args)
    if args.recipe:
        return cmd_quantize(args)
    _, test = _datasets(args, dataset)
    batches = TensorBatches(test, limit=args.test_limit)
    top1 = evaluate(model, batches, progress=not args.no_progress)
    rows = [{"model": args.model, "dataset": dataset, "top1": round(100 * top1, 2), "test_images": len(batches.indices)}]
    _emit(args, {"model": args.model, "dataset": dataset, "top1": top1, **scored_on(test, args.test_limit)}, rows)
    return 0


def scored_on(test: Any, limit: int | None) -> dict[str, Any]:
    """How many test images a top-1 counts and whether that is the whole split: a result written
    without it (a payload, an artifact's metrics) is shown by `lowbit report` as if it were."""
    n = len(test) if limit is None else min(limit, len(test))
    return {"test_images": n, "full_test_split": n == len(test)}


def _eval_deployed(args: argparse.Namespace) -> int:
    """Score an exported ONNX model (ONNX Runtime) or a saved .lowbit artifact."""
    from lowbit import zoo
    from lowbit.api import evaluate
    from lowbit.evaluation import TensorBatches

    if args.lowbit and _given(args.argv, "--runtime"):
        raise LowbitError("--runtime picks the runtime of an --onnx model; a .lowbit artifact runs in PyTorch "
                          "(export it with `lowbit export` to run it in ONNX Runtime or OpenVINO)")
    if args.onnx:
        from lowbit.deploy.runtime import OnnxModel

        model = OnnxModel(args.onnx, threads=args.threads, runtime=args.runtime)
        source = f"{args.onnx} ({model.runtime})"
    else:
        from lowbit.deploy.artifact import load

        # an artifact of the user's own architecture (pkg.module:factory) names none: it is rebuilt from --model
        float_model = _load_model(args)[0] if ":" in args.model else None
        model, source = load(args.lowbit, model=float_model), str(args.lowbit)
    recorded = None  # the dataset an ONNX file names
    if args.onnx:  # lowbit's export names the network and the dataset in the file
        from lowbit.deploy.onnx_export import METADATA_ARCH, METADATA_DATASET
        from lowbit.deploy.runtime import onnx_metadata

        onnx_meta = onnx_metadata(args.onnx)
        arch, recorded = onnx_meta.get(METADATA_ARCH), onnx_meta.get(METADATA_DATASET)
    else:  # an artifact names its model
        arch = (model.meta.get("arch") or {}).get("name")
    if arch:  # the file holds its own network: --model cannot choose another, and the registry records it
        if _given(args.argv, "--model") and args.model != arch:
            where = "an artifact rebuilds its own network" if args.lowbit else "the ONNX file holds its own network"
            raise LowbitError(f"{args.lowbit or args.onnx} holds a {arch}, not the --model {args.model}: drop "
                              f"--model ({where})")
        _record(args, model=arch)
    elif args.onnx and not _given(args.argv, "--model"):
        _record(args, model=None)  # unknown (a file from another tool): not the --model default
    if args.lowbit:
        _record(args, artifacts=[str(args.lowbit)])
    if recorded and ":" in recorded and not (args.data or args.dataset):  # a tensors:/imagefolder: spec
        raise LowbitError(f"{args.onnx} was quantized on your own data ({recorded}): give --data with it (and the "
                          "--mean/--std it was normalised with)")
    known = args.data or args.dataset or recorded
    if not known and args.onnx and not arch and not _given(args.argv, "--model"):
        raise LowbitError(f"{args.onnx} does not say which model or dataset it holds (a file from another tool or "
                          "an older lowbit): give --dataset NAME, --data DIR or the --model it was exported from")
    dataset = known or zoo.model_info(arch or args.model).dataset
    _record(args, dataset=dataset)
    _, test = _datasets(args, dataset)
    batches = TensorBatches(test, limit=args.test_limit)
    top1 = evaluate(model, batches, progress=not args.no_progress)
    row = {"model": source, "dataset": dataset, "top1": round(100 * top1, 2), "test_images": len(batches.indices)}
    # "deployed": the score is a quantized model's (the report shows it as one); "arch": the network it holds
    _emit(args, {**row, "top1": top1, **scored_on(test, args.test_limit),
                 "deployed": "onnx" if args.onnx else "lowbit", **({"arch": arch} if arch else {})}, [row])
    return 0


def _quantize_first_recipe(args: argparse.Namespace) -> tuple[Any, Any, Any, list[torch.Tensor] | None]:
    """Model and training split from the arguments, quantized with the one --recipe:
    (QuantModel, recipe, training split, calibration batches or None for data-free recipes)."""
    from lowbit.api import quantize
    from lowbit.evaluation import calibration_batches
    from lowbit.recipes.recipe import load_recipe

    recipes = _recipes(args)
    if len(recipes) != 1:  # export and analyze make one model: a second recipe would be ignored
        raise LowbitError(f"--recipe names {len(recipes)} recipes ({args.recipe!r}); lowbit {args.command} takes one")
    model, dataset = _load_model(args)
    train, _ = _datasets(args, dataset)
    recipe = load_recipe(recipes[0])
    calib = None if recipe.data_free else calibration_batches(train, recipe)
    return quantize(model, recipe, calib=calib, progress=not args.no_progress), recipe, train, calib


def _check_artifact_targets(paths: list[Path]) -> None:
    """Each .lowbit file a command will write must be writable before any quantizing starts: refused
    after the work, a refusal lost it (and left the command's other outputs behind)."""
    from lowbit.deploy.artifact import check_target

    for path in paths:
        blocker = blocking_file(path)
        if blocker is not None:
            raise LowbitError(f"cannot write {path}: {blocker} is a file, not a folder")
        check_target(path)


def cmd_export(args: argparse.Namespace) -> int:
    from lowbit.deploy.artifact import save
    from lowbit.deploy.onnx_export import export_onnx

    if args.lowbit:
        _check_artifact_targets([Path(args.lowbit)])
    qm, _, train, calib = _quantize_first_recipe(args)
    example = calib[0][:1] if calib else train[0][0].unsqueeze(0)
    dataset = (getattr(args, "_resolved", None) or {}).get("dataset")
    out = export_onnx(qm, args.out, example, dataset=_dataset_identity(dataset) if dataset else None)
    print(f"wrote {out} (QDQ ONNX, dynamic batch)")
    if args.lowbit:
        print(f"wrote {save(qm, args.lowbit)}")
    return 0


def analysis_subset(train: Any, calibration: dict[str, Any], n: int) -> Any:
    """``n`` seeded training-split samples disjoint from the recipe's calibration images."""
    from torch.utils.data import Subset

    from lowbit.data import calibration_subset
    from lowbit.evaluation import calibration_size

    used = set(calibration_subset(train, calibration_size(train, calibration), calibration["seed"]).indices)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(calibration["seed"] + 1))
    free = [i for i in order.tolist() if i not in used]
    if not free:  # a small dataset the recipe calibrates on entirely
        print(f"lowbit: note: every training image calibrates the recipe; scoring on {min(n, len(train))} of them",
              file=sys.stderr)
        return Subset(train, sorted(order.tolist()[:n]))
    if n > len(free):
        raise LowbitError(f"--samples {n}: only {len(free)} training images are left beside the calibration set")
    return Subset(train, sorted(free[:n]))


def cmd_analyze(args: argparse.Namespace) -> int:
    from lowbit.data import make_loader
    from lowbit.report.analyzer import analysis_payload, analyze

    qm, recipe, train, _ = _quantize_first_recipe(args)
    subset = analysis_subset(train, recipe.calibration, args.samples)
    out = analysis_payload(analyze(qm, make_loader(subset, 250), progress=not args.no_progress))
    rows = out["layers"]
    print(f"{args.model} {recipe.name} on {out['images']} training-split images (not the calibration ones): "
          f"float {out['float_top1']:.2f}%, quantized {out['quantized_top1']:.2f}% (weights only "
          f"{out['weights_only_top1']:.2f}%, activations only {out['activations_only_top1']:.2f}%); "
          "layers, most harmful first")
    payload = {"model": args.model, "recipe": recipe.name, **out, "layers": rows}
    _emit(args, payload, rows)
    return 0


# options of one method only: given to the other, they would be ignored (value None: not given)
MSQ_ONLY = ("rank", "probe_at", "val_samples", "checkpoint")
HAWQ_ONLY = ("hutchinson_samples", "bops_ratio", "candidates")


def _check_search_options(args: argparse.Namespace) -> None:
    """Refuse, before any work, an option the chosen method (or a search without --evaluate) would ignore."""
    why = {"hawq": "an MSQ option: HAWQ's search is one ILP pass, with no probes, validation images or steps "
                   "to resume",
           "msq": "a HAWQ option: MSQ lowers one bit at a time where its probes say, with no Hessian traces, "
                  "ILP options or BOPs cap"}
    for name in (MSQ_ONLY if args.method == "hawq" else HAWQ_ONLY):
        if getattr(args, name) is not None:
            raise LowbitError(f"--{name.replace('_', '-')} is {why[args.method]}; --method {args.method} would "
                              "ignore it")
    if args.method == "hawq" and args.lower != "weights":
        raise LowbitError("--lower both is an MSQ option; HAWQ allocates weight bits only")
    if args.test_limit is not None and not args.evaluate:
        raise LowbitError("--test-limit limits the test images --evaluate scores; without --evaluate nothing is "
                          "scored, so it would be ignored")
    typed = [o for o in ("--b-min", "--b-max") if _given(args.argv, o)]
    if args.candidates and typed:  # (their defaults cannot tell whether they were typed: the argv can)
        raise LowbitError(f"{' and '.join(typed)} given with --candidates, whose widths replace them: give one or "
                          "the other")


def cmd_search(args: argparse.Namespace) -> int:
    """Search a plan (bits per layer) for a size target; optionally score it on the test split."""
    from lowbit.mixed.search import search_calibration, search_subsets
    from lowbit.recipes.recipe import load_recipe

    _check_search_options(args)
    candidates = None
    if args.candidates:  # checked at the door, each option named as --candidates
        from lowbit.mixed.hawq import parse_candidates

        candidates = parse_candidates(args.candidates, "--candidates")
    if args.evaluate and candidates:  # the plan's kinds must be runnable by the recipe: say so before searching
        from lowbit.recipes.recipe import check_layer_kinds

        check_layer_kinds({k for _, k in candidates if k}, [n for n, _ in load_recipe(args.recipe).steps],
                          "--candidates (for --evaluate)")
    model, dataset = _load_model(args)
    train, test = _datasets(args, dataset)
    recipe = load_recipe(args.recipe)
    target = {"target_ratio": args.target_ratio, "target_bits": args.target_bits}
    if args.method == "msq":
        from lowbit.mixed.msq import msq_search

        calib, val = search_subsets(train, recipe, 1024 if args.val_samples is None else args.val_samples)
        result = msq_search(model, recipe, calib, val, **target, b_max=args.b_max, b_min=args.b_min,
                            lower=args.lower, rank=args.rank or "gain", probe_at=args.probe_at or "output",
                            checkpoint=args.checkpoint, progress=not args.no_progress)
    else:
        from lowbit.mixed.hawq import hawq_search

        calib = search_calibration(train, recipe)  # HAWQ validates nothing: no validation subset to draw
        typed = {o: getattr(args, o) for o in ("b_min", "b_max") if _given(args.argv, "--" + o.replace("_", "-"))}
        result = hawq_search(model, recipe, calib, **target, **typed,
                             bops_ratio=args.bops_ratio,
                             samples=32 if args.hutchinson_samples is None else args.hutchinson_samples,
                             candidates=candidates, progress=not args.no_progress)
    plan_path = result.plan.save(args.out)
    s = result.plan.meta
    print(f"{args.method}: {s['mean_w_bits']:.3f} mean weight bits, {s['weight_compression']:.2f}x weight-code "
          f"compression (budget {result.budget_bits} code bits; per-channel scales and codebooks add to the stored "
          f"size), {result.calibrations} calibrations, {result.seconds:.0f} s; "
          f"wrote {plan_path}")
    payload: dict[str, Any] = {"model": args.model, "dataset": dataset, "search": result.to_dict()}
    rows = [{"layer": n, **b} for n, b in result.plan.layers.items()]
    if args.evaluate:
        from lowbit.evaluation import compare_recipes

        planned = recipe.with_plan(result.plan)
        planned.name = f"{recipe.name}+{args.method}"
        out = compare_recipes(model, [recipe, planned], train, test, test_limit=args.test_limit,
                              progress=not args.no_progress)
        payload["evaluation"] = {**out, "results": [r.row() for r in out["results"]]}
        note = "full test split" if out["full_test_split"] else \
            f"first {out['test_images']} test images (NOT the full split)"
        print(f"float top-1 {100 * out['float_top1']:.2f}% ({note})")
        from lowbit.report.tables import format_table
        print(format_table(payload["evaluation"]["results"]))
    _emit(args, payload, rows)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lowbit.deploy.bench import run_runtime_benchmark

    recipes = [r.strip() for r in args.recipe.split(",") if r.strip()]
    if not recipes:  # before loading anything: an empty list ended in a raw IndexError after model and data
        raise LowbitError(f"--recipe {args.recipe!r} names no recipe: give one or more, comma-separated (e.g. w8a8)")
    model, dataset = _load_model(args)
    train, test = _datasets(args, dataset)
    out = run_runtime_benchmark(model, train, test, recipes, threads=args.threads or 2,
                                repeats=args.repeats, test_limit=args.test_limit, runtimes=args.runtime)
    print(f"{args.model}: {out['threads']} threads, {out['test_images']} test images")
    _emit(args, out, out["rows"])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.recipe:
        return _train_qat(args)
    from lowbit import zoo
    from lowbit.api import evaluate
    from lowbit.data import make_loader
    from lowbit.evaluation import TensorBatches
    from lowbit.qat.labels import dataset_labels
    from lowbit.zoo.train import check_checkpoint_target

    if args.weights:
        raise LowbitError(f"--weights applies only with --recipe (QAT starts from those weights); without --recipe "
                          f"`lowbit train` trains --model {args.model} from scratch and would ignore it: drop "
                          "--weights, or add a QAT --recipe")
    if args.checkpoint:  # before any data or epoch: a path that cannot be written was found after the first epoch
        check_checkpoint_target(Path(args.checkpoint), "--checkpoint")
    info = zoo.model_info(args.model)
    dataset = args.data or args.dataset or info.dataset  # what the weights were trained on, as the outputs say
    seed = args.seed if args.seed is not None else 0
    torch.manual_seed(seed)
    model = zoo.build(args.model)
    train, test = _datasets(args, dataset)
    # before any epoch: channels/size the model refuses, and labels beyond its outputs, named
    outputs = int(_check_fits(model, train, dataset).shape[-1])
    _check_labels_fit(outputs, train, test, dataset, args.model)
    if args.train_limit:
        from torch.utils.data import Subset
        train = Subset(train, range(min(args.train_limit, len(train))))
    epochs, lr, batch = args.epochs or 3, args.lr or 0.02, args.batch_size or 32
    loader = make_loader(train, batch_size=batch, shuffle=True, seed=seed)
    labels = dataset_labels(train)
    # what a --checkpoint must match to be resumed, beside the schedule train_classifier compares itself
    run = {"model": args.model, "dataset": _dataset_identity(dataset), "train_images": len(train),
           "labels": tensors_digest([("labels", labels)]) if labels is not None else None,
           "mean": args.mean, "std": args.std, "seed": seed, "batch_size": batch}
    zoo.train_classifier(model, loader, epochs=epochs, lr=lr, checkpoint=args.checkpoint,
                         progress=not args.no_progress, run=run)
    batches = TensorBatches(test, limit=args.test_limit)
    top1 = evaluate(model, batches)
    split = scored_on(test, args.test_limit)
    out = args.out or Path(f"{args.model}.safetensors")
    zoo.save_weights(model, out, metadata={"model": args.model, "dataset": dataset, "test_top1": f"{top1:.4f}",
                                           "test_images": str(split["test_images"])})
    # the trained weights are this run's float model: `lowbit report RUN` draws them, not the zoo's
    _record(args, dataset=dataset, model_fingerprint=_model_fingerprint(model), weights=os.path.abspath(out))
    note = "full test split" if split["full_test_split"] else \
        f"first {split['test_images']} test images (NOT the full split)"
    print(f"{args.model} on {dataset}: test top-1 {100 * top1:.2f}% ({note}) after {epochs} "
          f"epoch(s) on {len(train)} training images; saved {out}")
    rows = [{"model": args.model, "dataset": dataset, "top1": round(100 * top1, 2),
             "test_images": split["test_images"], "epochs": epochs, "train_images": len(train)}]
    _emit(args, {"model": args.model, "dataset": dataset, "top1": top1, **split, "epochs": epochs,
                 "train_images": len(train), "weights": str(out)}, rows)
    return 0


def _check_labels_fit(outputs: int, train: Any, test: Any, source: str, name: str) -> None:
    """Every label must be one of the model's ``outputs``: a larger one ended training in a raw IndexError
    (cross-entropy), and in the test split it could never be scored right."""
    from lowbit.qat.labels import dataset_labels

    for split, data in (("training", train), ("test", test)):
        labels = dataset_labels(data)
        if labels is not None and labels.numel() and int(labels.max()) >= outputs:
            raise DataMismatchError(f"{source}: the {split} split has labels up to {int(labels.max())} "
                                    f"({int(labels.max()) + 1} classes), but --model {name} has {outputs} outputs "
                                    f"(classes 0..{outputs - 1}): use data of at most {outputs} classes, or "
                                    "another model")


def _dataset_identity(dataset: str) -> str:
    """A dataset name, with a --data path made absolute: the same file from another directory is the same data."""
    kind, sep, path = dataset.partition(":")
    return f"{kind}:{os.path.abspath(path)}" if sep and path else dataset


def _check_training_targets(args: argparse.Namespace) -> None:
    """--save must name a file that may be (over)written and --checkpoint a folder that can be made.
    Found only after training, the first lost the trained model and the second an epoch's work."""
    from lowbit.deploy.artifact import check_target

    if args.save:
        check_target(Path(args.save))
    if args.checkpoint:
        folder = Path(args.checkpoint)
        if folder.exists() and not folder.is_dir():
            raise LowbitError(f"--checkpoint {folder} is an existing file; QAT writes a folder there")
        blocker = blocking_file(folder)
        if blocker is not None:
            raise LowbitError(f"--checkpoint {folder} cannot be made: {blocker} is a file, not a folder")


def _train_qat(args: argparse.Namespace) -> int:
    """`lowbit train --recipe R`: calibrate the pretrained model, then QAT; under torchrun
    every process runs this and rank 0 reports."""
    from lowbit.api import evaluate, quantize
    from lowbit.evaluation import TensorBatches, calibration_batches
    from lowbit.qat import distributed as D
    from lowbit.recipes.recipe import load_recipe

    _check_training_targets(args)  # before any training: a bad path found after it would lose the run
    device = D.init_from_env(args.device)  # under torchrun with GPUs: this process's own one
    model, dataset = _load_model(args)
    train, test = _datasets(args, dataset)
    if args.train_limit:
        from torch.utils.data import Subset
        train = Subset(train, range(min(args.train_limit, len(train))))
    recipe = load_recipe(args.recipe)
    if not any(name == "qat" for name, _ in recipe.steps):
        raise LowbitError(f"recipe {recipe.name!r} has no `qat` step; `lowbit train --recipe` takes a QAT recipe "
                          "(e.g. w4a4-lsq; see `lowbit recipes`), `lowbit quantize` runs the others")
    source = json.loads(json.dumps(recipe.source))
    changes = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
               "val_samples": args.val_samples,
               "checkpoint": str(args.checkpoint) if args.checkpoint else None,
               "branch_from": str(args.branch_from) if args.branch_from else None,
               "precision": args.precision, "channels_last": True if args.channels_last else None}
    for step in source["steps"]:
        if isinstance(step, dict) and "qat" in step:
            step["qat"] = {**(step["qat"] or {}), **{k: v for k, v in changes.items() if v is not None}}
            if args.kd is not None or args.kd_temperature is not None:  # merged into the recipe's kd, not replacing it
                if args.kd is None and not step["qat"].get("kd"):
                    raise LowbitError(f"--kd-temperature needs distillation on: recipe {recipe.name!r} does not "
                                      "distil, add --kd WEIGHT")
                given = {"weight": args.kd, "temperature": args.kd_temperature}
                step["qat"]["kd"] = {**(step["qat"].get("kd") or {}), **{k: v for k, v in given.items() if v is not None}}
            if args.kd_teacher:
                if not step["qat"].get("kd"):
                    raise LowbitError(f"--kd-teacher needs distillation on: recipe {recipe.name!r} does not distil, "
                                      "add --kd WEIGHT")
                step["qat"]["kd"] = {**step["qat"]["kd"], "teacher": args.kd_teacher}
    source["name"] = recipe.name
    start, teacher = model, None
    if args.init_from:  # progressive: the finished run's float weights are the start, the float model the teacher
        from lowbit.qat.warm_start import progressive_teacher, trained_float_model

        start = trained_float_model(args.init_from, model, train, recipe=recipe)
        teacher = progressive_teacher(model, next(s["qat"] for s in source["steps"] if isinstance(s, dict) and "qat" in s))
    qm = quantize(start, source, calib=calibration_batches(train, recipe), train=train, device=device,
                  progress=not args.no_progress and D.rank() == 0, teacher=teacher)
    qm.to("cpu")
    if D.rank() != 0:
        return 0
    top1 = evaluate(qm, TensorBatches(test, limit=args.test_limit))
    float_top1 = evaluate(model, TensorBatches(test, limit=args.test_limit))
    info = qm.meta["qat"]
    note = "full test split" if not args.test_limit else f"first {args.test_limit} test images (NOT the full split)"
    print(f"{args.model} {recipe.name}: test top-1 {100 * top1:.2f}% (float {100 * float_top1:.2f}%, {note}); "
          f"kept epoch {info['best_epoch']}/{info['epochs']} by validation on {info['val_samples']} training images "
          f"({info.get('select', 'best')}); "
          f"{info['processes']} process(es)")
    split = scored_on(test, args.test_limit)
    if args.save:
        from lowbit.deploy.artifact import save

        print(f"saved {save(qm, args.save, metrics={'top1': top1, 'float_top1': float_top1, **split})}")
    rows = [{"model": args.model, "recipe": recipe.name, "top1": round(100 * top1, 2),
             "float_top1": round(100 * float_top1, 2), "epochs": info["epochs"], "best_epoch": info["best_epoch"]}]
    _emit(args, {"rows": rows, "history": info["history"], **split}, rows)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from lowbit.recipes.recipe import builtin_names, load_recipe
    from lowbit.report.tables import format_table

    rows = []
    for name in builtin_names():
        r = load_recipe(name)
        # an `overrides: [{pattern: "*", a_bits: 32}]` recipe (every *a32 built-in) keeps activations float
        float_acts = any(o.get("pattern") == "*" and o.get("a_bits") == 32 for o in r.overrides)
        rows.append({"recipe": name, "weights": f"{r.weights.spec.bits}b {r.weights.estimator}",
                     "activations": "float" if float_acts else f"{r.activations.spec.bits}b {r.activations.estimator}",
                     "steps": ",".join(s for s, _ in r.steps), "description": r.description})
    if args.explain:
        from lowbit.quant.registry import KINDS, TRAINABLE, explain_kind
        from lowbit.recipes.schema import explain, step_schemas

        name, steps = args.explain, step_schemas()
        if name not in steps and name not in KINDS:
            raise RecipeError(f"unknown step or quantizer kind {name!r}; steps: {sorted(steps)}; "
                              f"quantizer kinds: {list(KINDS)}")
        if name in steps:  # "kmeans" is both a step and a quantizer kind: both are printed
            print(f"step {name!r} parameters (a float also accepts a numeric string such as YAML's 1e-3):")
            rows = explain(name)
            print(format_table(rows) if rows else "  (none)")
        if name in KINDS:  # a quantizer kind: its options under <role>.quantizer_options
            roles = " and ".join(TRAINABLE[name].roles) if name in TRAINABLE else "weights and activations"
            print(f"quantizer {name!r} ({roles}) options, set under <role>.quantizer_options:")
            rows = explain_kind(name)
            print(format_table(rows) if rows else "  (none)")
        return 0
    if args.show:  # the one recipe asked for, not the table before it
        import yaml
        print(yaml.safe_dump(load_recipe(args.show).to_dict(), sort_keys=False))
        return 0
    print(format_table(rows))
    from lowbit.recipes.compose import grammar_help

    print("\n" + grammar_help())
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    import datetime

    from lowbit.registry import Registry, headline
    from lowbit.report.tables import format_table

    if args.registry is not None and not args.registry.exists():
        raise LowbitError(f"no run registry at {args.registry}")
    reg = Registry(args.registry)
    try:
        def when(t: float | None) -> str:
            return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""

        if args.action == "list":
            rows = [{"id": r["id"], "started": when(r["started"]), "command": r["command"], "model": r["model"] or "",
                     "recipe": r["recipe"] or "", "status": r["status"],
                     "seconds": round(r["seconds"], 1) if r["seconds"] is not None else "",
                     "result": headline(r["metrics"])} for r in reg.list(args.limit)]
            print(format_table(rows) if rows else f"no runs recorded in {reg.path}")
        elif args.action == "show":
            if len(args.ids) != 1:
                raise LowbitError("runs show takes one run id")
            print(json.dumps(reg.get(args.ids[0]), indent=2, default=str))
        else:
            if len(args.ids) != 2:
                raise LowbitError("runs compare takes two run ids")
            a, b = (reg.get(i) for i in args.ids)
            keys = ["command", "model", "recipe", "dataset", "model_fingerprint", "weights", "data_fingerprint",
                    "status", "seconds", "versions", "artifacts"]
            rows = [{"field": k, f"run {a['id']}": json.dumps(a[k], default=str) if isinstance(a[k], dict) else a[k],
                     f"run {b['id']}": json.dumps(b[k], default=str) if isinstance(b[k], dict) else b[k],
                     "same": a[k] == b[k]} for k in keys]
            rows.append({"field": "result", f"run {a['id']}": headline(a["metrics"]),
                         f"run {b['id']}": headline(b["metrics"]), "same": a["metrics"] == b["metrics"]})
            print(format_table(rows))
    finally:
        reg.close()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """One self-contained HTML file from runs, JSON results, artifacts and checkpoints."""
    from lowbit.report.html import write_report
    from lowbit.report.sources import collect

    from lowbit import zoo

    inputs = collect(args.sources, args.registry)
    if args.model is None and inputs.model in zoo.ARCHITECTURES:  # the sources name a zoo model: its float weights
        args.model = inputs.model
    model = None
    if args.model is not None:
        args.data = args.dataset = None  # the report reads the model's weights only, never its data
        if args.weights is None:  # a run that read its own --weights: those, not the zoo's release
            args.weights = _recorded_weights(inputs.runs, args.model)
        if ":" in args.model:  # pkg.module:factory, the user's own architecture
            if not args.weights:
                raise LowbitError(f"--model {args.model}: a model from a factory needs --weights")
            from lowbit.data.user import load_factory

            model = zoo.load_weights(load_factory(args.model), args.weights)
        else:
            model, _ = _load_zoo_model(args)
        _check_report_model(inputs.runs, args, _model_fingerprint(model))
    path = write_report(inputs, args.out, model, args.title)
    regular = path.is_file()  # -o /dev/stdout (a pipe): the page is on stdout, this line goes beside it
    print(f"wrote {path}" + (f" ({path.stat().st_size // 1024} KB)" if regular else "")
          + f" from {len(inputs.sources)} source(s)"
          + ("" if model is not None else "; no float model, so no weight histograms or μL2Q figure (give --model)"),
          file=sys.stdout if regular else sys.stderr)
    return 0


def _recorded_weights(runs: list[dict[str, Any]], model: str) -> Path | None:
    """The float weights file the runs of ``model`` read (their --weights, or a from-scratch training's
    output), if they recorded one; refused when they read different ones or it is gone."""
    files = {r["weights"]: r["label"] for r in runs if r.get("model") == model and r.get("weights")}
    if len(files) > 1:
        raise LowbitError("the runs read different float weights (" + "; ".join(f"{lbl}: {w}" for w, lbl in
                          files.items()) + "): report them separately, or choose one with --weights")
    for weights, label in files.items():
        if not Path(weights).is_file():
            raise LowbitError(f"{label} read its float {model} weights from {weights}, which is no longer there: "
                              "give --weights with the same weights file")
        return Path(weights)
    return None


def _check_report_model(runs: list[dict[str, Any]], args: argparse.Namespace, fingerprint: str) -> None:
    """Refuse float weights other than the ones a reported run quantized: the histograms and the μL2Q
    figure would describe another network than the run's (the zoo's release for a run given --weights)."""
    for r in runs:
        if r.get("model") == args.model and r.get("model_fingerprint") and r["model_fingerprint"] != fingerprint:
            where = f"--weights {args.weights}" if args.weights else f"the zoo's {args.model} weights"
            raise LowbitError(f"{where} (fingerprint {fingerprint}) are not the float weights {r['label']} "
                              f"quantized (fingerprint {r['model_fingerprint']}): give --weights with the file "
                              "that run read (`lowbit runs show` prints its command line)")


def cmd_models(args: argparse.Namespace) -> int:
    from lowbit import zoo
    from lowbit.report.tables import format_table

    print(format_table([{"model": n, "dataset": zoo.model_info(n).dataset} for n in zoo.list_models()]))
    return 0


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that takes options only as spelled in full: argparse's prefix matching let
    `--b-mi 4` set --b-min, which the checks of what was typed (``_given``, reading the argv) missed,
    so an option they refuse, or whose default they tell apart, slipped through."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit", description="Quantize trained PyTorch networks.")
    sub = parser.add_subparsers(dest="command", required=True)  # sub-parsers are _Parsers too (parser_class)
    q = sub.add_parser("quantize", help="quantize a model with one or more recipes; float vs quantized table")
    _add_common(q)
    q.add_argument("--recipe", default=DEFAULT_RECIPES, help=f"comma-separated built-in names or recipe files (default {DEFAULT_RECIPES})")
    q.add_argument("--save", type=output_dir, help="directory to write each quantized model to as <recipe>.lowbit")
    q.set_defaults(func=cmd_quantize)
    e = sub.add_parser("eval", help="top-1 of a float model (or of quantized ones with --recipe)")
    _add_common(e)
    e.add_argument("--recipe", help="quantize with these recipes before scoring")
    e.add_argument("--onnx", type=existing_file, help="score this exported ONNX model (in --runtime)")
    e.add_argument("--runtime", type=one_runtime, default="ort",
                   help="runtime for --onnx: ort (ONNX Runtime, default) or openvino (pip install 'lowbit[openvino]')")
    e.add_argument("--lowbit", type=existing_file, help="score this saved .lowbit artifact")
    e.set_defaults(func=cmd_eval)
    q.add_argument("--plan", type=existing_file, help="mixed-precision plan JSON (from `lowbit search`) applied to every recipe")
    s = sub.add_parser("search", help="mixed-precision search (MSQ or HAWQ) for a size target; writes a plan JSON")
    _add_common(s)
    s.add_argument("--method", choices=["msq", "hawq"], default="msq")
    tgt = s.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--target-ratio", type=positive_float, help="weight compression to reach (float32 size / weight-code size)")
    tgt.add_argument("--target-bits", type=positive_float, help="mean weight bits to reach (parameter-weighted)")
    s.add_argument("--recipe", default="w4a8", help="the PTQ back-end recipe run at every search step (default w4a8)")
    s.add_argument("--b-max", type=bits, default=8, help="highest weight bits (MSQ starts every layer here)")
    s.add_argument("--b-min", type=bits, default=2, help="lowest weight bits (1 = binary: sign x per-channel scale)")
    s.add_argument("--lower", choices=["weights", "both"], default="weights",
                   help="MSQ: lower weight bits only, or a layer's weight and input-activation bits together")
    s.add_argument("--rank", choices=["gain", "gain_per_bit"],
                   help="MSQ: lower the layer of smallest probe gain (the seed, default), or smallest gain per weight "
                        "bit saved")
    s.add_argument("--probe-at", choices=["output", "next_input"],
                   help="MSQ: probe each layer's output (the seed, default) or the next layer's input (block outputs "
                        "in ResNets)")
    s.add_argument("--val-samples", type=positive_int,
                   help="MSQ: validation images for the probes (from train; default 1024)")
    s.add_argument("--bops-ratio", type=positive_float, help="HAWQ: also cut bit-operations by this factor")
    s.add_argument("--candidates", help="HAWQ: per-layer options BITS[:KIND], e.g. 2,2:twn,1:xnor,3:kmeans,4 "
                   "(replaces --b-min/--b-max; the plan then names each layer's weight kind)")
    s.add_argument("--hutchinson-samples", type=positive_int,
                   help="HAWQ: random vectors per trace estimate (default 32)")
    s.add_argument("--checkpoint", type=output_file, help="MSQ: JSON state written after every step; a rerun resumes from it")
    s.add_argument("--out", type=output_file, default=Path("plan.json"), help="where to write the plan")
    s.add_argument("--evaluate", action="store_true", help="score the uniform recipe and the plan on the test split")
    s.set_defaults(func=cmd_search)
    x = sub.add_parser("export", help="quantize and write a QDQ ONNX model (and optionally a .lowbit file)")
    _add_common(x)
    x.add_argument("--recipe", default="w8a8", help="one built-in name or recipe file (default w8a8)")
    x.add_argument("--out", type=output_file, default=Path("model.onnx"), help="the ONNX file (default model.onnx)")
    x.add_argument("--lowbit", type=output_file, help="also save the bit-packed artifact here")
    x.add_argument("--plan", type=existing_file, help="mixed-precision plan JSON (from `lowbit search`) applied to the recipe")
    x.set_defaults(func=cmd_export)
    a = sub.add_parser("analyze", help="per-layer sensitivity: weight/output SQNR, top-1 with only this layer "
                                       "quantized and with only this layer float; ranked")
    _add_common(a)
    a.add_argument("--recipe", default="w4a4", help="one built-in name or recipe file (default w4a4)")
    a.add_argument("--samples", type=positive_int, default=2000,
                   help="training-split images to score on, disjoint from the calibration set (default 2000)")
    a.add_argument("--plan", type=existing_file, help="mixed-precision plan JSON applied to the recipe")
    a.set_defaults(func=cmd_analyze)
    b = sub.add_parser("bench", help="PyTorch/ORT float vs lowbit int8 ONNX vs ORT quantize_static: speed and accuracy")
    _add_common(b)
    b.add_argument("--recipe", default="w8a8", help="comma-separated recipes to compare")
    b.add_argument("--runtime", type=runtime_list, default=["ort"],
                   help="comma-separated runtimes to time every ONNX model in: ort, openvino (default ort)")
    b.add_argument("--repeats", type=positive_int, default=50,
                   help="timed batch-64 runs per engine (batch 1 gets 4x as many), spread over up to 10 interleaved rounds")
    b.set_defaults(func=cmd_bench)
    t = sub.add_parser("train", help="QAT of a pretrained model with a recipe that has a qat step (--recipe), "
                                     "or a zoo architecture from scratch (no --recipe); resumes from --checkpoint")
    _add_common(t)
    t.add_argument("--recipe", help="QAT recipe (e.g. w4a4-lsq; see `lowbit recipes`): calibrate, then train")
    t.add_argument("--epochs", type=positive_int, help="epochs (default: the recipe's; 3 from scratch)")
    t.add_argument("--lr", type=positive_float, help="peak learning rate (default: the recipe's; 0.02 from scratch)")
    t.add_argument("--batch-size", type=positive_int, help="global batch size (default: the recipe's; 32 from scratch)")
    t.add_argument("--kd", type=positive_float, help="distil from the float model with this loss weight (0..1)")
    t.add_argument("--kd-temperature", type=positive_float,
                   help="distillation temperature (default: the recipe's, else 4); needs distillation on")
    t.add_argument("--kd-teacher", help="distil from this zoo model (e.g. resnet32) instead of the float model")
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun: cuda, and each process "
                   "uses the GPU of its LOCAL_RANK)")
    t.add_argument("--train-limit", type=positive_int, help="train on the first N training images only")
    t.add_argument("--val-samples", type=positive_int,
                   help="QAT: training images held out to choose the final epoch (default: the recipe's, 5000)")
    t.add_argument("--seed", type=non_negative_int,
                   help="QAT: the qat step's seed (default: the recipe's, else its calibration seed, as the Python "
                        "API does); from scratch: the initialisation and data order (default 0)")
    t.add_argument("--checkpoint", help="QAT: folder written after every epoch; from scratch: a state file. "
                                        "Rerunning the same command resumes from it")
    t.add_argument("--branch-from", help="QAT: start from another run's checkpoint folder, for a run that differs "
                                         "only in freeze_bn_after / snap_at_freeze, before either freezes BN")
    t.add_argument("--init-from", help="QAT: start from the float weights of a finished run (its --checkpoint "
                                       "folder; same model) instead of the pretrained ones, e.g. W2A2 from a trained "
                                       "W3A3 (progressive quantization); the pretrained model stays the float "
                                       "baseline and the distillation teacher")
    t.add_argument("--precision", choices=("fp32", "bf16"),
                   help="QAT: arithmetic of the training convolutions (default: the recipe's, fp32); bf16 about "
                        "halves a step on CPUs with AMX/AVX512-BF16 and on GPUs, the deployed model stays float32")
    t.add_argument("--channels-last", action="store_true", help="QAT: train in NHWC memory order (faster convolutions)")
    t.add_argument("--save", type=output_file, help="QAT: write the trained model as a .lowbit artifact")
    t.add_argument("--out", type=safetensors_file,
                   help="from scratch: where to write the weights (<model>.safetensors)")
    t.set_defaults(func=cmd_train)
    r = sub.add_parser("recipes", help="list the built-in recipes")
    r.add_argument("--show", help="print one recipe (a name or file) in full")
    r.add_argument("--explain", metavar="NAME", help="print a step's parameters (type, range, default, meaning), "
                   "or a quantizer kind's options (e.g. lqnet)")
    r.set_defaults(func=cmd_recipes)
    u = sub.add_parser("runs", help="the run registry: list recent runs, show one, compare two")
    u.add_argument("action", nargs="?", default="list", choices=("list", "show", "compare"))
    u.add_argument("ids", nargs="*", type=positive_int, help="run id(s) for show / compare")
    u.add_argument("--limit", type=positive_int, default=20, help="how many recent runs list shows")
    _add_registry(u)
    u.add_argument("--debug", action="store_true", help="print the Python traceback of an unexpected error")
    u.set_defaults(func=cmd_runs)
    p = sub.add_parser("report", help="one self-contained HTML report from run ids, --json files, .lowbit files "
                                      "and QAT checkpoint folders")
    p.add_argument("sources", nargs="+", help="run ids (see `lowbit runs`), JSON results, .lowbit files, checkpoint folders")
    p.add_argument("-o", "--out", type=output_file, default=Path("report.html"), help="the HTML file to write")
    p.add_argument("--model", help="the float model for the weight figures: a zoo name (default: the one the sources "
                                   "name) or pkg.module:factory with --weights")
    p.add_argument("--weights", type=existing_file, help="weights for --model")
    p.add_argument("--models-dir", help="directory holding pretrained weights")
    p.add_argument("--data-dir", help="directory holding datasets (for zoo models whose float baseline lowbit trains)")
    p.add_argument("--no-download", action="store_true", help="never download weights; fail if absent")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--title", help="the report's title")
    _add_registry(p)
    p.add_argument("--debug", action="store_true", help="print the Python traceback of an unexpected error")
    p.set_defaults(func=cmd_report)
    m = sub.add_parser("models", help="list the zoo models")
    m.set_defaults(func=cmd_models)
    return parser


RECORDED_COMMANDS = ("quantize", "eval", "train", "export", "search", "bench", "analyze")
_ARTIFACT_ARGS = ("out", "save", "lowbit", "checkpoint", "json", "onnx")


def _artifacts(args: argparse.Namespace) -> dict[str, str]:
    """The files and folders this command was told to write, by option name."""
    # absolute (not resolved: /dev/stdout stays itself), so `lowbit report N` finds them from any directory
    return {k: os.path.abspath(os.path.expanduser(str(getattr(args, k))))
            for k in _ARTIFACT_ARGS if getattr(args, k, None)}


def process_rank() -> int:
    """This process's rank under torchrun ($RANK; 0 alone). Only rank 0 records a run and logs it to
    MLflow: every process of one training runs the same command, and each made its own row and run."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _open_run(args: argparse.Namespace, argv: list[str]) -> None:
    """Start this command's row in the run registry (status running)."""
    if args.command not in RECORDED_COMMANDS or getattr(args, "no_registry", False) or process_rank() != 0:
        return
    from lowbit.registry import Registry

    try:
        reg = Registry(getattr(args, "registry", None))
    except LowbitError as err:
        if getattr(args, "registry", None) is not None:  # asked for by name: its problem is the user's error
            raise
        print(f"lowbit: warning: not recording this run ({err}); --no-registry silences this", file=sys.stderr)
        return
    recipe = getattr(args, "recipe", None)
    args._run = (reg, reg.start(args.command, argv, model=getattr(args, "model", None),
                                recipe=str(recipe) if recipe is not None else None))


def _close_run(args: argparse.Namespace, status: str, error: str | None = None) -> None:
    run = getattr(args, "_run", None)
    if run is None:
        return
    reg, run_id = run
    artifacts = _artifacts(args)
    if artifacts:
        reg.update(run_id, artifacts=artifacts)
    reg.finish(run_id, status, error)
    reg.close()
    args._run = None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # which options were typed, not defaulted (see _given)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        if getattr(args, "mlflow", None):
            from lowbit.mlflow_log import check_available

            check_available()  # at the door, not after an hour of training
        _open_run(args, argv)
        code = args.func(args)
        status = "done" if code == 0 else "failed"
        _close_run(args, status, None if code == 0 else f"exit status {code}")
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        _close_run(args, status, None if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}")
        try:
            _log_mlflow(args, argv, status, started)
        except Exception:  # noqa: BLE001 - the command's own error is the one to report
            pass
        return _report_error(args, err)
    try:
        _log_mlflow(args, argv, status, started)
    except LowbitError as err:
        return _report_error(args, err)
    return code


def _log_mlflow(args: argparse.Namespace, argv: list[str], status: str, started: float) -> None:
    """The finished command as an MLflow run, when --mlflow asked for one."""
    uri = getattr(args, "mlflow", None)
    if not uri or process_rank() != 0:  # under torchrun: one training, one MLflow run (rank 0's)
        return
    from lowbit.mlflow_log import log_run

    artifacts = _artifacts(args)
    if args.command == "eval":  # eval's --lowbit and --onnx are the files it read, not ones it wrote
        artifacts = {k: v for k, v in artifacts.items() if k not in ("lowbit", "onnx")}
    resolved = getattr(args, "_resolved", None) or {}  # what the command worked out, beside what was typed
    params = {"model": resolved["model"] if "model" in resolved else getattr(args, "model", None),
              "recipe": getattr(args, "recipe", None),
              "dataset": resolved.get("dataset") or getattr(args, "dataset", None) or getattr(args, "data", None)}
    run_id = log_run(uri, args.command, argv, status=status, seconds=time.perf_counter() - started,
                     payload=getattr(args, "_payload", None), artifacts=artifacts, params=params)
    print(f"logged to MLflow ({uri}) as run {run_id}", file=sys.stderr)


def _report_error(args: argparse.Namespace, err: BaseException) -> int:
    """The exit status and message of a failed command (no traceback unless --debug)."""
    try:
        raise err
    except LowbitError as err:
        print(f"lowbit: error: {err}", file=sys.stderr)
        if isinstance(err, DataMismatchError) and getattr(args, "dataset", None):
            print(f"lowbit: --dataset {args.dataset} does not fit --model {args.model}; drop --dataset to use the "
                  "model's own dataset", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lowbit runs | head`: the reader has gone, nothing went wrong here
        try:  # (stdout's final flush at exit would raise again)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except Exception as err:  # noqa: BLE001 - the last resort: no traceback reaches a user unasked
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        print(f"lowbit: error: {type(err).__name__}: {err}" + ("" if getattr(args, "debug", False) else
              "\n(this is a bug in lowbit or an input it does not check yet; rerun with --debug for the traceback "
              "and please report it)"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
