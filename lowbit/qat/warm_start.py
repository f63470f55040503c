"""A finished QAT run as the start of another: progressive quantization (Zhuang et al. 2018
train 32 → 4 → 2 bits, each stage starting from the float weights of the one before).

The run's checkpoint folder records its recipe; the model is rebuilt from it (its post-training
steps, then the QAT training form), given the kept epoch's state (``best.safetensors``), and made
float by :func:`lowbit.model.as_float.as_float_model`: by default the *latent* weights with the
trained BN folded in, not the deployed ones, which sit exactly on their grid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model.as_float import as_float_model
from lowbit.qat.checkpoint import read_summary


def progressive_teacher(model: nn.Module, qat: dict[str, Any]) -> nn.Module | None:
    """The teacher of a run started from another run's float weights: the pretrained ``model`` when the
    ``qat`` step distils and names no teacher of its own (a ``kd.teacher`` zoo model stays the teacher)."""
    kd = qat.get("kd") or {}
    return model if kd and not kd.get("teacher") else None


def _rewrites(recipe: Any) -> tuple[str, str]:
    """The graph rewrites a recipe makes that change the float network's function: its ReLU
    replacement, and its shortcut when that is Bi-Real's (``real`` and the default leave the
    float network as it is)."""
    return recipe.relu, recipe.shortcut if recipe.shortcut == "bireal" else "unchanged"


def trained_float_model(folder: str | Path, model: nn.Module, train: Any, weights: str = "latent",
                        recipe: Any = None) -> nn.Module:
    """The float network of the finished QAT run in ``folder``, in ``model``'s architecture.

    ``model``: the float model that run started from; ``train``: its training split (the recipe's
    calibration subset is drawn from it, as in that run); ``weights``: "latent" or "quantized";
    ``recipe``: the recipe the result will be quantized with. A run whose recipe rewrote the graph
    (``relu: hardtanh``, ``shortcut: bireal``) trained weights for the rewritten network, so it is
    a start only for a recipe that makes the same rewrites (checked here).
    """
    from lowbit.api import quantize
    from lowbit.evaluation import calibration_batches
    from lowbit.qat.convert import to_training_form
    from lowbit.qat.engine import trains_batchnorms
    from lowbit.recipes.recipe import load_recipe

    folder = Path(folder)
    summary = read_summary(folder)
    if summary is None:
        raise LowbitError(f"{folder} holds no QAT checkpoint (state.json): pass the --checkpoint folder of a finished run")
    fingerprint = summary.get("fingerprint") or {}
    source, qat = fingerprint.get("recipe"), fingerprint.get("qat")
    if not (isinstance(source, dict) and isinstance(qat, dict)):
        raise LowbitError(f"{folder}/state.json records no recipe: it was not written by lowbit's QAT")
    if int(summary["epoch"]) < int(qat["epochs"]):
        raise LowbitError(f"the run in {folder} stopped after epoch {summary['epoch']} of {qat['epochs']}: finish it "
                          "(rerun its command) before starting another run from it")
    run_recipe = load_recipe(source)
    recipe = None if recipe is None else load_recipe(recipe)  # a name or a dict, as everywhere else
    rewritten = _rewrites(run_recipe) != ("keep", "unchanged")
    if rewritten and (recipe is None or _rewrites(recipe) != _rewrites(run_recipe)):
        relu, shortcut = run_recipe.relu, run_recipe.shortcut
        wanted = "no recipe was given" if recipe is None else \
            f"recipe {recipe.name!r} has relu: {recipe.relu}, shortcut: {recipe.shortcut}"
        raise LowbitError(f"the run in {folder} trained a rewritten graph (relu: {relu}, shortcut: {shortcut}); its "
                          f"weights start only a recipe with the same rewrites, and {wanted}")
    before = [s for s in source["steps"] if not (isinstance(s, dict) and "qat" in s)]
    calib = calibration_batches(train, run_recipe)
    qm = quantize(model, dict(source, steps=before or ["calibrate"]), calib=calib, progress=False)
    to_training_form(qm, run_recipe.weights.quantizer, run_recipe.activations.quantizer,
                     run_recipe.weights.quantizer_options, run_recipe.activations.quantizer_options, calib,
                     trains_batchnorms(qm, qat["train_bn"]), qat["bn_momentum"])
    try:
        best = load_file(str(folder / "best.safetensors"), device="cpu")
    except (OSError, ValueError, SafetensorError) as e:
        raise LowbitError(f"cannot read {folder}/best.safetensors: {e}") from e
    try:
        qm.load_state_dict(best)
    except RuntimeError as e:
        raise LowbitError(f"the run in {folder} does not fit {type(model).__name__} "
                          f"({str(e).splitlines()[0]}): pass the model that run started from") from e
    return as_float_model(qm.eval(), model, weights=weights, rewritten=rewritten)
