"""Calibration: give every quantizer a scale/zero point with a range estimator."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from tqdm import tqdm

from lowbit.model.quant_model import QuantModel
from lowbit.ptq.bn_ranges import bn_implied_sample
from lowbit.quant.estimators import DATA_FREE, ESTIMATORS, check_estimator_options, estimate_range
from lowbit.quant.observer import SampleObserver
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.errors import DataMismatchError, RecipeError

BN_FALLBACK = "mse"
# Above this share of exact zeros a mid-rise weight grid, which has no 0 level, biases a layer.
MIDRISE_ZERO_SHARE = 0.01
# What the activation ranges are observed on: the network with its weights already quantized
# (lowbit's original choice), or the float network (as MCT and AIMET do; issue 16 part 1).
OBSERVE = ("quantized_weights", "float")


def _rows(t: torch.Tensor, q: UniformQuantizer) -> torch.Tensor:
    return t.detach().reshape(t.shape[0], -1) if q.spec.per_channel else t.detach().reshape(1, -1)


def apply_range(q: UniformQuantizer, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Set a quantizer's range from per-row (or one-row) lo/hi."""
    if not q.spec.per_channel:
        lo, hi = lo.reshape(()), hi.reshape(())
    q.set_range(lo, hi)


def calibrate_weight_quantizer(q: UniformQuantizer, weight: torch.Tensor, estimator: str = "mse",
                               options: dict[str, Any] | None = None) -> None:
    """Set one weight quantizer's range from the weight itself (no data needed)."""
    if q.signed is None:
        q.signed = True
    lo, hi = estimate_range(estimator, _rows(weight, q), q.spec, q.signed, **(options or {}))
    apply_range(q, lo, hi)


def calibrate_weights(qm: QuantModel, estimator: str = "mse", options: dict[str, Any] | None = None) -> None:
    if estimator in DATA_FREE:
        raise RecipeError(f"estimator {estimator!r} sets activation ranges only; pick a weight estimator from {sorted(ESTIMATORS)}")
    zeros = {}
    for r in qm.layers:
        if r.layer.quantize_weight:
            calibrate_weight_quantizer(r.layer.weight_quantizer, r.layer.weight, estimator, options)
            if r.layer.weight_quantizer.spec.grid == "midrise":
                zeros[r.name] = float(r.layer.weight.detach().eq(0).float().mean())
    warn_zeros_on_midrise(zeros)


def warn_zeros_on_midrise(zero_share: dict[str, float]) -> None:
    """Exact zeros (a pruned or already-quantized model) all round to +step/2 on a mid-rise grid
    (floor(0) = 0 → level ½), a same-signed shift of every output: measured, a W3A3-trained ResNet-20's
    deployed weights re-quantized on a 3-bit mid-rise grid scored 9.4% (weights alone; mid-tread: 90.9%)."""
    hit = {name: share for name, share in zero_share.items() if share > MIDRISE_ZERO_SHARE}
    if hit:
        listed = ", ".join(f"{name} {share:.0%}" for name, share in list(hit.items())[:3])
        warnings.warn(f"{len(hit)} layer(s) have exactly-zero weights ({listed}{' ...' if len(hit) > 3 else ''}), and "
                      "a mid-rise grid has no 0 level, so each becomes +step/2 (a bias in every output); use "
                      "weights.grid: midtread for pruned or already quantized weights", stacklevel=3)


@torch.no_grad()
def calibrate_activations(
    qm: QuantModel, batches: list[torch.Tensor], estimator: str = "mse",
    options: dict[str, Any] | None = None, seed: int = 0, progress: bool = True,
    observe: str = "quantized_weights",
) -> dict[str, str]:
    """Observe activations (activations float; weights quantized, or float with
    ``observe="float"``) and set their ranges.

    Returns the estimator actually used per quantizer: "bn" falls back to data-based
    MSE for tensors no BatchNorm describes (the network input, residual sums).
    """
    if estimator not in ESTIMATORS and estimator not in DATA_FREE:
        raise RecipeError(f"unknown range estimator {estimator!r}; known: {sorted(ESTIMATORS) + sorted(DATA_FREE)}")
    if observe not in OBSERVE:
        raise RecipeError(f"observe={observe!r}: activation ranges are observed on one of {OBSERVE}")
    acts = {n: q for n, q in qm.act_quantizers().items() if q.enabled}
    used = {n: ("bn" if estimator == "bn" and n in qm.bn_priors else (BN_FALLBACK if estimator == "bn" else estimator))
            for n in acts}
    observers = {n: SampleObserver(n, seed=seed) for n in acts if used[n] != "bn"}
    if observers or any(r.macs is None for r in qm.layers):
        for n, obs in observers.items():
            acts[n].observer = obs
        try:
            with qm.quantization(weights=observe == "quantized_weights", activations=False):
                for x in tqdm(batches, desc="calibrate", unit="batch", disable=not progress, leave=False):
                    qm(x)
        finally:
            for q in acts.values():
                q.observer = None
    idle = [n for n, obs in observers.items() if obs.count == 0]
    if idle:  # named by the layers they feed, for keep_float (the observer alone knows only the quantizer)
        feeds = {n: [r.name for r in qm.layers if r.input_quantizer is acts[n]] for n in idle}
        layers = sorted({name for names in feeds.values() for name in names})
        raise DataMismatchError(f"no calibration input reached {', '.join(repr(n) for n in idle)}"
                                f"{f' (the input of layer(s) {layers})' if layers else ''}: a branch the data never "
                                "takes gets no range. Calibrate with inputs that run it, or keep those layers float: "
                                f"keep_float: {layers or ['<layer name>']}")
    for n, q in acts.items():
        if used[n] == "bn":
            prior, rectified = qm.bn_priors[n]
            sample = bn_implied_sample(prior, rectified, seed=seed)
            if q.signed is None:
                q.signed = not rectified
            lo, hi = estimate_range("mse", sample, q.spec, q.signed)
        else:
            sample = observers[n].sample()
            if q.signed is None:
                q.signed = bool(sample.min() < 0)
            opts = (options or {}) if used[n] == estimator else {}
            lo, hi = estimate_range(used[n], sample, q.spec, q.signed, **opts)
        apply_range(q, lo, hi)
    return used


def calibrate(
    qm: QuantModel, batches: list[torch.Tensor], weight_estimator: str = "mse", act_estimator: str = "mse",
    weight_options: dict[str, Any] | None = None, act_options: dict[str, Any] | None = None,
    seed: int = 0, progress: bool = True, observe: str = "quantized_weights",
) -> QuantModel:
    """Weights first (their ranges need no data), then activations, observed with the weights
    quantized (``observe="quantized_weights"``) or on the float network (``"float"``).

    ``batches``: a list of input tensors, or anything ``lowbit.quantize`` takes as ``calib`` (a DataLoader
    of (input, label) pairs, a Dataset, one tensor). It is checked, and run once on the float network,
    before any quantizer changes: bad data left the weight ranges rewritten and then failed deep in torch."""
    # every argument is checked before the first grid changes: a typo in act_estimator or observe left the
    # weight grids re-fitted with the new weight estimator and then failed
    check_calibration_args(weight_estimator, act_estimator, weight_options, act_options, observe)
    batches = _checked_batches(qm, batches)
    calibrate_weights(qm, weight_estimator, weight_options)
    used = calibrate_activations(qm, batches, act_estimator, act_options, seed=seed, progress=progress,
                                 observe=observe)
    qm.meta["calibration"] = {"weight_estimator": weight_estimator, "weight_options": dict(weight_options or {}),
                              "act_estimator": act_estimator, "act_options": dict(act_options or {}),
                              "act_estimators_used": used, "seed": seed, "observe": observe}
    return qm


def check_calibration_args(weight_estimator: str, act_estimator: str, weight_options: dict[str, Any] | None,
                           act_options: dict[str, Any] | None, observe: str) -> None:
    """RecipeError naming the first bad estimator name, estimator option or ``observe``, before any work."""
    if weight_estimator not in ESTIMATORS:
        extra = " (it sets activation ranges only)" if weight_estimator in DATA_FREE else ""
        raise RecipeError(f"unknown weight estimator {weight_estimator!r}{extra}; known: {sorted(ESTIMATORS)}")
    if act_estimator not in ESTIMATORS and act_estimator not in DATA_FREE:
        raise RecipeError(f"unknown activation estimator {act_estimator!r}; known: "
                          f"{sorted(ESTIMATORS) + sorted(DATA_FREE)}")
    if observe not in OBSERVE:
        raise RecipeError(f"observe={observe!r}: activation ranges are observed on one of {OBSERVE}")
    for name, options, key in ((weight_estimator, weight_options, "weight_options"),
                               (act_estimator, act_options, "act_options")):
        if options is not None and not isinstance(options, dict):
            raise RecipeError(f"calibrate: {key} must be a mapping, got {type(options).__name__}")
        check_estimator_options(name, options or {}, "calibrate", key)


def _checked_batches(qm: QuantModel, data: Any) -> list[torch.Tensor]:
    """A list of input tensors is kept as it is batched (observers sample per batch); other forms are cut as
    ``lowbit.quantize`` cuts them."""
    from lowbit.checks import probe_forward
    from lowbit.ptq.batches import as_batches, on_model_device

    if isinstance(data, (list, tuple)) and data and all(isinstance(x, torch.Tensor) for x in data):
        batches = list(data)
        for i, x in enumerate(batches):
            if x.dim() == 0 or not x.is_floating_point() or x.shape[1:] != batches[0].shape[1:]:
                raise DataMismatchError(f"calibration batch {i} ({x.dtype}, shape {tuple(x.shape)}) does not match "
                                        f"batch 0 ({batches[0].dtype}, {tuple(batches[0].shape)}): every batch must "
                                        "be float inputs of one shape")
            if x.shape[0] == 0:  # it failed in the observers, after the weight grids were rewritten
                raise DataMismatchError(f"calibration batch {i} is empty (shape {tuple(x.shape)}): every batch "
                                        "needs at least one sample")
    else:
        batches = as_batches(data)
    batches = on_model_device(qm, batches)  # as run_step does for recipes
    with qm.quantization(weights=False, activations=False):
        probe_forward(qm, batches[0], "calibration batch 0")
    return batches


def calibrated_weight_estimator(qm: QuantModel, estimator: str, options: dict[str, Any] | None
                                ) -> tuple[str, dict[str, Any]]:
    """The weight estimator and options the calibrate step used (the arguments only where none is recorded), for a
    step that re-fits weight grids (GPTQ's regrid): the recipe-level ones replaced e.g. ``calibrate:
    {weight_estimator: minmax}``."""
    done = qm.meta.get("calibration") or {}
    if "weight_estimator" not in done:
        return estimator, dict(options or {})
    return done["weight_estimator"], dict(done.get("weight_options", options) or {})


def recalibrate_activations(qm: QuantModel, batches: list[torch.Tensor], act_estimator: str,
                            act_options: dict[str, Any] | None, seed: int, progress: bool = True) -> None:
    """Re-fit the activation ranges after a step changed the network (USP, k-means, GPTQ) with the settings the
    calibrate step used (its estimator, options and observation; the arguments only where none is recorded), and
    record what was used: the recipe-level defaults replaced e.g. ``calibrate: {act_estimator: minmax}``."""
    done = qm.meta.get("calibration") or {}
    estimator = done.get("act_estimator", act_estimator)
    options = done.get("act_options", act_options) if "act_estimator" in done else act_options
    used = calibrate_activations(qm, batches, estimator, options, seed=done.get("seed", seed), progress=progress,
                                 observe=done.get("observe", "quantized_weights"))
    if done:
        done["act_estimators_used"] = used
