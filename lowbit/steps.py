"""Recipe steps: the algorithms a recipe can run, by name, in order.

A step is ``fn(qm, batches, recipe, progress, **params)`` that edits the QuantModel in
place. Adding a technique means adding a module and one entry here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from lowbit.errors import RecipeError
from lowbit.ptq.batches import on_model_device

if TYPE_CHECKING:
    from lowbit.model.quant_model import QuantModel
    from lowbit.recipes.recipe import Recipe, TensorRecipe


def _calibrate(qm: "QuantModel", batches: list[torch.Tensor], recipe: "Recipe", progress: bool,
               weight_estimator: str | None = None, act_estimator: str | None = None,
               observe: str = "quantized_weights", weight_options: dict[str, Any] | None = None,
               act_options: dict[str, Any] | None = None) -> None:
    from lowbit.ptq.calibrate import calibrate

    w_est, a_est = weight_estimator or recipe.weights.estimator, act_estimator or recipe.activations.estimator
    calibrate(qm, batches, weight_estimator=w_est, act_estimator=a_est,
              weight_options=step_estimator_options(weight_options, w_est, recipe.weights),
              act_options=step_estimator_options(act_options, a_est, recipe.activations),
              seed=recipe.calibration["seed"], progress=progress, observe=observe)


def step_estimator_options(given: dict[str, Any] | None, estimator: str, section: "TensorRecipe") -> dict[str, Any]:
    """The options a calibrate step hands its estimator: its own, else the recipe section's when the step uses
    the section's estimator (naming that same estimator dropped them), else none (they belong to another one)."""
    if given is not None:
        return dict(given)
    return dict(section.estimator_options) if estimator == section.estimator else {}


def _usp(qm: "QuantModel", batches: list[torch.Tensor], recipe: "Recipe", progress: bool,
         recalibrate_activations: bool = True, augment_repeats: int = 0, padding: int = 4,
         flip: bool = True) -> None:
    """Seed 004's USP; then (by default) re-fit activation ranges to the corrected BNs.

    With ``augment_repeats`` > 0, image batches are replaced by that many crop-and-flip
    copies of the calibration set — for models trained with that augmentation, whose
    statistics on clean training images are biased (see lowbit.data.augment); inputs that
    are not NCHW images are refused.
    """
    from lowbit.data.augment import random_crop_flip
    from lowbit.ptq.calibrate import recalibrate_activations as refit_activations
    from lowbit.ptq.usp import update_bn_statistics

    stats_batches = batches
    if augment_repeats > 0:
        if batches[0].dim() != 4:  # known only now; they were skipped without a word
            raise RecipeError(f"usp: augment_repeats adds crop-and-flip copies of NCHW images, but the calibration "
                              f"inputs have shape {tuple(batches[0].shape)}; set augment_repeats: 0")
        g = torch.Generator().manual_seed(recipe.calibration["seed"])
        stats_batches = [random_crop_flip(b, padding, flip, g) for _ in range(augment_repeats) for b in batches]
    update_bn_statistics(qm, stats_batches, progress=progress)
    if recalibrate_activations:
        refit_activations(qm, batches, recipe.activations.estimator, recipe.activations.estimator_options,
                          seed=recipe.calibration["seed"], progress=progress)


def _bias_correction(qm: "QuantModel", batches: list[torch.Tensor], recipe: "Recipe", progress: bool,
                     source: str = "outputs", samples: int = 1024) -> None:
    from lowbit.ptq.bias_correction import correct_bias

    correct_bias(qm, batches, progress=progress, source=source, samples=samples)


def _match_moments(qm: "QuantModel", batches: list[torch.Tensor], recipe: "Recipe", progress: bool,
                   variance: bool = True, samples: int = 1024, max_ratio: float = 2.0, chunk: int = 0) -> None:
    from lowbit.ptq.moments import match_moments

    match_moments(qm, batches, progress=progress, variance=variance, samples=samples, max_ratio=max_ratio,
                  chunk=chunk)


def _easyquant(qm: "QuantModel", batches: list[torch.Tensor], recipe: "Recipe", progress: bool,
               **params: Any) -> None:
    from lowbit.ptq.easyquant import easyquant

    easyquant(qm, batches, progress=progress, **params)


def _zeroq(qm: "QuantModel", batches: list[torch.Tensor], recipe: "Recipe", progress: bool,
           input_shape: list[int] | None = None, **params: Any) -> None:
    """Replace the calibration batches with distilled ones (later steps use those)."""
    from lowbit.checks import probe_forward
    from lowbit.ptq.zeroq import distill_inputs

    shape = tuple(input_shape) if input_shape else _default_input_shape(qm)
    # the probe in the model's dtype and on its device, as distill_inputs draws its inputs: a float32 CPU probe
    # refused a float64 (or GPU) model and blamed the user's input
    p = next(qm.parameters())
    with qm.quantization(weights=False, activations=False):  # a wrong shape is named before distilling
        probe_forward(qm, torch.zeros(1, *shape, dtype=p.dtype, device=p.device), f"zeroq's input_shape {list(shape)}")
    seed = recipe.calibration["seed"]
    batches[:] = distill_inputs(qm, recipe.calibration["samples"], shape, seed=seed, progress=progress, **params)
    qm.meta["calibration_data"] = "zeroq (distilled, no real images)"


def _default_input_shape(qm: "QuantModel") -> tuple[int, ...]:
    from lowbit.data.registry import get_info
    from lowbit.zoo import model_info

    arch = qm.meta.get("arch") or {}
    try:
        return tuple(get_info(model_info(arch["name"]).dataset).input_shape)
    except Exception:  # noqa: BLE001 - any failure means we cannot tell
        raise RecipeError("zeroq: cannot tell this model's input shape; give `input_shape: [C, H, W]`") from None


def _reconstruction(method: str) -> Callable[..., None]:
    def step(qm: "QuantModel", batches: list[torch.Tensor], recipe: "Recipe", progress: bool,
             **params: Any) -> None:
        from lowbit.ptq.reconstruct import reconstruct

        params.setdefault("seed", recipe.calibration["seed"])
        reconstruct(qm, batches, method=method, progress=progress, **params)

    step.__doc__ = f"{method} reconstruction (lowbit.ptq.reconstruct)"
    return step


def _qat(qm: "QuantModel", batches: list[torch.Tensor], recipe: "Recipe", progress: bool, **params: Any) -> None:
    """Quantization-aware training (lowbit.qat); the training data comes from the caller
    (``quantize(..., train=, val=)`` or ``lowbit train``), never from the calibration set."""
    from lowbit.qat.engine import QATConfig, train_qat

    data = getattr(qm, "qat_data", None)
    if data is None or data.get("train") is None:
        raise RecipeError(f"recipe {recipe.name!r} has a `qat` step, which trains: pass the training data, "
                          "lowbit.quantize(model, recipe, calib, train=train_set) or `lowbit train`")
    params.setdefault("seed", recipe.calibration["seed"])
    train_qat(qm, data["train"], val=data.get("val"), recipe=recipe, config=QATConfig.from_params(params),
              calib=batches, device=data.get("device", "cpu"), progress=progress, teacher=data.get("teacher"))


def _kmeans(qm: "QuantModel", batches: list[torch.Tensor], recipe: "Recipe", progress: bool,
            hessian: str = "none", joint: bool = False, iterations: int = 100,
            recalibrate_activations: bool = True) -> None:
    """k-means codebooks for every sub-8-bit layer (lowbit.ptq.kmeans), then activation ranges
    re-fitted to the clustered weights."""
    from lowbit.ptq.calibrate import recalibrate_activations as refit_activations
    from lowbit.ptq.kmeans import cluster_weights

    if not qm.calibrated:
        raise RecipeError("`kmeans` clusters a calibrated model: put `calibrate` before it")
    qm.meta["kmeans"] = cluster_weights(qm, batches, hessian=hessian, joint=joint, iterations=iterations,
                                        progress=progress)
    if recalibrate_activations:
        refit_activations(qm, batches, recipe.activations.estimator, recipe.activations.estimator_options,
                          seed=recipe.calibration["seed"], progress=progress)


def _gptq(qm: "QuantModel", batches: list[torch.Tensor], recipe: "Recipe", progress: bool, damp: float = 0.01,
          block_size: int = 128, act_order: bool = False, recalibrate_activations: bool = False,
          target: str = "quantized", regrid: bool = False, grid_objective: str = "weights",
          rows_per_column: int | None = None) -> None:
    """GPTQ rounding of every layer's weights (lowbit.ptq.gptq); optionally re-fit the activation
    ranges to the rounded network."""
    from lowbit.ptq.calibrate import calibrated_weight_estimator, recalibrate_activations as refit_activations
    from lowbit.ptq.gptq import OUTPUT_GRID, gptq

    grid_fit = None
    if regrid:  # the grids are re-fitted as the calibrate step fitted them, not with the recipe-level estimator
        grid_fit = ((OUTPUT_GRID, {}) if grid_objective == "output"
                    else calibrated_weight_estimator(qm, recipe.weights.estimator, recipe.weights.estimator_options))
    gptq(qm, batches, damp=damp, block_size=block_size, act_order=act_order, progress=progress, target=target,
         regrid=grid_fit, rows_per_column=rows_per_column)
    if recalibrate_activations:
        refit_activations(qm, batches, recipe.activations.estimator, recipe.activations.estimator_options,
                          seed=recipe.calibration["seed"], progress=progress)


RECONSTRUCTION_METHODS = ("adaround", "brecq", "qdrop", "pdquant", "adaquant", "teacher_student")

STEPS: dict[str, Callable[..., None]] = {
    "calibrate": _calibrate,
    "usp": _usp,
    "bias_correction": _bias_correction,
    "match_moments": _match_moments,
    "easyquant": _easyquant,
    "zeroq": _zeroq,
    **{m: _reconstruction(m) for m in RECONSTRUCTION_METHODS},
    "kmeans": _kmeans,
    "gptq": _gptq,
    "qat": _qat,
}


def check_step_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Reject unknown or invalid step parameters, naming them; returns them converted
    (one schema per step: lowbit.recipes.schema)."""
    from dataclasses import fields

    from lowbit.recipes.schema import check_params

    checked = check_params(name, params)
    if name in RECONSTRUCTION_METHODS:  # combinations of parameters, refused when the recipe is read
        from lowbit.ptq.reconstruct import ReconConfig, make_config

        known = {f.name for f in fields(ReconConfig)}
        cfg = make_config(name, {k: v for k, v in checked.items() if k in known})
        if cfg.granularity == "network" and checked.get("checkpoint"):
            raise RecipeError(f"step {name!r}: a network-wise run is one optimisation with no unit boundary to "
                              "resume from; drop `checkpoint`")
        if cfg.augment_repeats and cfg.granularity != "network":
            raise RecipeError(f"step {name!r}: augment_repeats needs granularity: network (the unit-wise loops cache "
                              "each unit's inputs for the calibration images as they are)")
    if name == "usp" and not checked.get("augment_repeats") and {"padding", "flip"} & set(checked):
        raise RecipeError("step 'usp': padding and flip shape the crop-and-flip copies of augment_repeats, which is "
                          "0 here; set augment_repeats or drop them")
    if name == "kmeans" and checked.get("joint") and checked.get("hessian", "none") == "none":
        raise RecipeError("kmeans.joint clusters all layers into one codebook, which needs hessian: fisher to "
                          "compare errors across layers")
    return checked


def run_step(name: str, params: dict[str, Any], qm: "QuantModel", batches: list[torch.Tensor],
             recipe: "Recipe", progress: bool) -> None:
    # calibration batches go where the model is (a model moved to the GPU read CPU batches and failed inside
    # torch); in place, so later steps (and a zeroq step's distilled batches) share them
    batches[:] = on_model_device(qm, batches)
    try:
        STEPS[name](qm, batches, recipe, progress, **params)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise RecipeError(f"step {name!r}: {err}") from None
        raise
