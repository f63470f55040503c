"""One typed schema per recipe step: every parameter's type, range and default, declared
once, checked when a recipe is read (before any work starts) and printed by
``lowbit recipes --explain STEP``.

YAML trap, decided: PyYAML reads ``1e-3`` (no dot) as the *string* "1e-3". A float
parameter therefore accepts a string that parses as a finite number and converts it;
every other type mismatch (a string for an int or a bool, a float for an int) is an
error naming the step, the key, the value and what was expected.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Any

from lowbit.errors import RecipeError

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


@dataclass(frozen=True)
class Param:
    """One step parameter. ``low``/``high`` bound numbers (inclusive unless ``open_low``)."""

    name: str
    kind: str  # "int" | "float" | "bool" | "str" | "shape" | "path" | "kd" | "options"
    default: Any = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple[str, ...] | None = None
    doc: str = ""

    def expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind == "shape":
            return "a list of 3 positive integers [C, H, W]"
        if self.kind == "options":
            return "a mapping of option names to values"
        if self.kind == "kd":
            return ("a mapping {temperature: > 0, weight: 0..1, teacher: a zoo model name}, or {} to switch "
                    "distillation off")
        text = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "path": "a file path"}[self.kind]
        if self.low is not None or self.high is not None:
            lo = "" if self.low is None else f"{'>' if self.open_low else '>='} {self.low:g}"
            hi = "" if self.high is None else f"<= {self.high:g}"
            text += " " + " and ".join(p for p in (lo, hi) if p)
        return text

    def check(self, step: str, value: Any) -> Any:
        """The value, converted where the rules above allow; RecipeError otherwise."""
        def bad() -> RecipeError:
            return RecipeError(f"step {step!r}: {self.name}={value!r} is invalid; expected {self.expected()}")

        if value is None and self.default is None:
            return None
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise bad()
            return value
        if self.kind in ("str", "path"):
            if not isinstance(value, str) or not value or (self.choices and value not in self.choices):
                raise bad()
            return value
        if self.kind == "kd":
            if not isinstance(value, dict) or set(value) - {"temperature", "weight", "teacher"}:
                raise bad()
            out: dict[str, Any] = {}
            if "teacher" in value:
                from lowbit.zoo import list_models

                if value["teacher"] not in list_models():
                    raise RecipeError(f"step {step!r}: kd teacher {value['teacher']!r} is not a zoo model; "
                                      f"known: {', '.join(list_models())}")
                out["teacher"] = value["teacher"]
            for key, low, high in (("temperature", 0.0, None), ("weight", 0.0, 1.0)):
                if key in value:
                    out[key] = Param(key, "float", low=low, high=high, open_low=key == "temperature").check(step, value[key])
            return out
        if self.kind == "options":  # the values are checked against the estimator they go to (Recipe.from_dict)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise bad()
            return dict(value)
        if self.kind == "shape":
            if (not isinstance(value, (list, tuple)) or len(value) != 3
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
                raise bad()
            return list(value)
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad()
        else:  # float
            if isinstance(value, str):
                try:
                    value = float(value)  # YAML 1.1's "1e-3"
                except ValueError:
                    raise bad() from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad()
            value = float(value)
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            raise bad()
        if self.high is not None and value > self.high:
            raise bad()
        return value


def _recon_schema() -> list[Param]:
    """Reconstruction steps share ReconConfig's fields; their ranges are declared here."""
    from lowbit.ptq.reconstruct import ReconConfig

    ranges: dict[str, dict[str, Any]] = {
        "granularity": {"choices": ("layer", "block", "network")}, "rounding": {"choices": ("adaround", "ste")},
        "iters": {"low": 1}, "batch_size": {"low": 1}, "dc_iters": {"low": 0}, "augment_repeats": {"low": 0},
        "lr_round": {"low": 0, "open_low": True}, "lr_weight": {"low": 0, "open_low": True},
        "lr_scale": {"low": 0, "open_low": True}, "dc_lr": {"low": 0, "open_low": True},
        "pd_temperature": {"low": 0, "open_low": True},
        "reg_weight": {"low": 0}, "pd_weight": {"low": 0}, "rec_weight": {"low": 0}, "dc_reg": {"low": 0},
        "warmup": {"low": 0, "high": 1}, "keep_prob": {"low": 0, "open_low": True, "high": 1},
        "input_quant_prob": {"low": 0, "high": 1},
    }
    kinds = {int: "int", float: "float", bool: "bool", str: "str", "int": "int", "float": "float", "bool": "bool",
             "str": "str"}
    out = [Param(f.name, kinds[f.type], None if f.default is MISSING else f.default, **ranges.get(f.name, {}))
           for f in fields(ReconConfig)]
    out.append(Param("seed", "int", 0, low=0, high=MAX_SEED, doc="drives every random choice (default: calibration.seed)"))
    out.append(Param("checkpoint", "path", "", doc="state file written after every unit; a rerun resumes"))
    return out


def _qat_schema() -> list[Param]:
    """The qat step's parameters: defaults from QATConfig (one place), kinds, ranges and
    meanings declared here."""
    from lowbit.qat.engine import QATConfig

    declared: list[tuple[str, str, dict[str, Any], str]] = [
        ("epochs", "int", {"low": 1}, "passes over the training data"),
        ("batch_size", "int", {"low": 1}, "global batch (split among torchrun processes)"),
        ("optimizer", "str", {"choices": ("sgd", "adam")}, "SGD with Nesterov momentum, or Adam"),
        ("lr", "float", {"low": 0, "open_low": True}, "peak learning rate of weights and BN"),
        ("quantizer_lr", "float", {"low": 0}, "learning rate of quantizer parameters (0: lr)"),
        ("weight_decay", "float", {"low": 0}, "L2 on conv/linear weights (not on BN or quantizers)"),
        ("momentum", "float", {"low": 0, "high": 1}, "SGD momentum"),
        ("schedule", "str", {"choices": ("cosine", "constant")}, "learning-rate schedule after warm-up"),
        ("warmup", "float", {"low": 0}, "epochs of linear warm-up"),
        ("kd", "kd", {}, "distillation from the float model (or a zoo model named by teacher): {temperature: 4, weight: 0.5}"),
        ("train_bn", "bool", {}, "train with BatchNorm unfolded (batch statistics), fold at the end"),
        ("freeze_bn_after", "int", {"low": -1}, "epoch after which BN statistics freeze (-1: at 3/4 of the epochs)"),
        ("bn_momentum", "float", {"low": 0, "open_low": True, "high": 1}, "BN running-statistics momentum"),
        ("augment", "str", {"choices": ("auto", "crop_flip", "none")},
         "auto: pad-crop-flip for 3x32x32 images, none otherwise"),
        ("val_samples", "int", {"low": 1}, "training samples held out to choose the final epoch"),
        ("seed", "int", {"low": 0, "high": MAX_SEED}, "data order, augmentation and the validation split"),
        ("checkpoint", "path", {}, "folder written after every epoch; a rerun continues from it"),
        ("precision", "str", {"choices": ("fp32", "bf16")}, "arithmetic of the training steps' convolutions and "
         "matmuls: bf16 autocast (ResNet-20 QAT steps 1.1-1.6x faster on a CPU with AMX, with channels_last); "
         "quantizers, BN, loss, validation and the deployed model stay float32"),
        ("channels_last", "bool", {}, "train images and conv weights in NHWC memory order: faster convolutions "
         "(ResNet-20 W2A32 QAT step -21% in fp32, -38% with bf16)"),
        ("branch_from", "path", {}, "start from another run's checkpoint folder (its latest epoch) when the two "
         "differ only in freeze_bn_after / snap_at_freeze and neither has frozen BN yet: the same result as from "
         "scratch, without recomputing the shared epochs"),
        ("ema", "float", {"low": 0, "high": 0.99999}, "decay of a moving average of the weights, validated and kept "
         "instead of the last step's (0: off; e.g. 0.998)"),
        ("select", "str", {"choices": ("within_error", "best")}, "which epoch's weights are kept: within_error, the "
         "latest whose held-out top-1 is within one standard error of the highest (a smaller lead is noise); best, "
         "the highest"),
        ("steps_per_epoch", "int", {"low": 0}, "cap on steps per epoch (0: the whole training set)"),
        ("clip_grad_norm", "float", {"low": 0}, "rescale each step's gradient to at most this L2 norm (0: off)"),
        ("snap_at_freeze", "bool", {}, "when BN freezes, set binary/ternary latent weights to their quantized values "
         "(same forward; none left at a threshold where they oscillate and a frozen layer collapses)"),
        ("mix", "str", {"choices": ("none", "mixup", "cutmix")}, "mix each training batch with a permutation of "
         "itself: mixup blends whole images (Zhang et al. 2018), cutmix pastes a box (Yun et al. 2019); labels "
         "mixed in the same share, and a kd teacher distils on the mixed images"),
        ("mix_alpha", "float", {"low": 0, "open_low": True}, "λ ~ Beta(α, α) for mix (1: uniform)"),
        ("dampen", "float", {"low": 0}, "oscillation dampening (Nagel et al. 2022): final weight of a loss pulling "
         "each latent weight to the level it rounds to, rising from 0 on a cosine (0: off; e.g. 0.1)"),
    ]
    defaults = QATConfig()
    return [Param(name, kind, getattr(defaults, name), doc=doc, **ranges) for name, kind, ranges, doc in declared]


def step_schemas() -> dict[str, list[Param]]:
    from lowbit.quant.estimators import DATA_FREE, ESTIMATORS
    from lowbit.steps import RECONSTRUCTION_METHODS

    weight_est, act_est = tuple(sorted(ESTIMATORS)), tuple(sorted(ESTIMATORS) + sorted(DATA_FREE))
    recon = _recon_schema()
    return {
        "calibrate": [
            Param("weight_estimator", "str", "", choices=weight_est, doc="default: the recipe's weights.estimator"),
            Param("act_estimator", "str", "", choices=act_est, doc="default: the recipe's activations.estimator"),
            Param("weight_options", "options", None, doc="options of the weight estimator (default: the recipe's "
                  "weights.estimator_options when the estimator is the recipe's, none otherwise)"),
            Param("act_options", "options", None, doc="options of the activation estimator (default: the recipe's "
                  "activations.estimator_options when the estimator is the recipe's, none otherwise)"),
            Param("observe", "str", "quantized_weights", choices=("quantized_weights", "float"),
                  doc="the network whose activations set the ranges: with the weights already quantized, "
                      "or the float network (as MCT and AIMET calibrate)"),
        ],
        "usp": [
            Param("recalibrate_activations", "bool", True, doc="re-fit activation ranges after the BN update"),
            Param("augment_repeats", "int", 0, low=0, doc="crop-and-flip copies of the calibration set"),
            Param("padding", "int", 4, low=0, doc="crop padding in pixels"),
            Param("flip", "bool", True, doc="random horizontal flips"),
        ],
        "bias_correction": [
            Param("source", "str", "outputs", choices=("outputs", "weights", "float_inputs"),
                  doc="outputs: match the float network's layer means; weights: undo only the layer's own rounding shift "
                  "on its quantized input; float_inputs: the same shift on the float network's input"),
            Param("samples", "int", 1024, low=1, doc="calibration images, run as one batch (memory: one pass at once)"),
        ],
        "match_moments": [
            Param("variance", "bool", True, doc="match each channel's variance too (scales its weight step; "
                  "the integer codes stay), not only its mean"),
            Param("samples", "int", 1024, low=1, doc="calibration images used"),
            Param("chunk", "int", 0, low=0, doc="images per pass (0: all of them while they hold at most 4M input "
                  "values); one chunk runs once, several bound memory and give the same answer (each layer's "
                  "statistics summed over all chunks before any moves past it: the chunks run once per layer)"),
            Param("max_ratio", "float", 2.0, low=1, doc="bound on a channel's scale change, either way"),
        ],
        "easyquant": [
            Param("rounds", "int", 2, low=1, doc="alternations of the weight and activation search (eqs. 6-7)"),
            Param("candidates", "int", 50, low=2, doc="scales tried per search"),
            Param("low", "float", 0.5, low=0, open_low=True, doc="search from low x the calibrated scale"),
            Param("high", "float", 1.2, low=0, open_low=True, doc="... to high x the calibrated scale"),
            Param("samples", "int", 256, low=1, doc="calibration images used"),
        ],
        "zeroq": [
            Param("input_shape", "shape", None, doc="[C, H, W]; default: the zoo model's dataset"),
            Param("iters", "int", 200, low=1, doc="optimisation steps of the distilled inputs"),
            Param("lr", "float", 0.2, low=0, open_low=True, doc="Adam step size"),
            Param("batch_size", "int", 128, low=1, doc="inputs distilled at a time"),
        ],
        **{m: recon for m in RECONSTRUCTION_METHODS},
        "kmeans": [
            Param("hessian", "str", "none", choices=("none", "fisher"),
                  doc="weight each squared error by the diagonal Fisher (Choi et al.'s Hessian-weighted k-means)"),
            Param("joint", "bool", False, doc="one codebook for all layers of a bit width (needs hessian: fisher)"),
            Param("iterations", "int", 100, low=1, doc="Lloyd iterations at most"),
            Param("recalibrate_activations", "bool", True, doc="re-fit activation ranges to the clustered weights"),
        ],
        "gptq": [
            Param("damp", "float", 0.01, low=0, open_low=True, doc="dampening: H + damp*mean(diag H)*I"),
            Param("block_size", "int", 128, low=1, doc="columns per lazy-update block (speed only)"),
            Param("act_order", "bool", False, doc="round columns by decreasing Hessian diagonal"),
            Param("recalibrate_activations", "bool", False, doc="re-fit activation ranges to the rounded weights"),
            Param("target", "str", "quantized", choices=("quantized", "float"),
                  doc="quantized: plain GPTQ; float: aim at the float network's output (corrects upstream error)"),
            Param("regrid", "bool", False,
                  doc="with target: float, re-fit each weight grid to the refitted weights before rounding"),
            Param("grid_objective", "str", "weights", choices=("weights", "output"),
                  doc="regrid's score: weights = the recipe's weight estimator on the refitted weights; "
                      "output = each row's rounding error weighted by the layer's input Hessian"),
            Param("rows_per_column", "int", None, low=1,
                  doc="each layer's Hessian from only the first calibration images giving it about this many "
                      "input positions per weight column (speed; null: every image)"),
        ],
        "qat": _qat_schema(),
    }


def check_params(step: str, params: dict[str, Any]) -> dict[str, Any]:
    """The step's parameters checked against its schema (unknown keys, types, ranges);
    returns them converted (e.g. "1e-3" -> 0.001 for a float)."""
    schemas = step_schemas()
    if step not in schemas:
        raise RecipeError(f"unknown step {step!r}; known steps: {sorted(schemas)}")
    if not isinstance(params, dict):
        raise RecipeError(f"step {step!r}: parameters must be a mapping, got {type(params).__name__}")
    by_name = {p.name: p for p in schemas[step]}
    unknown = sorted(set(params) - set(by_name), key=str)
    if unknown:
        raise RecipeError(f"step {step!r}: unknown parameter(s) {unknown}; known: {sorted(by_name)}")
    out = {k: by_name[k].check(step, v) for k, v in params.items()}
    if step == "easyquant":
        low = out.get("low", by_name["low"].default)
        high = out.get("high", by_name["high"].default)
        if not low < high:
            raise RecipeError(f"step 'easyquant': low={low} must be below high={high} (the scale search interval)")
    if step == "gptq" and out.get("regrid") and out.get("target", by_name["target"].default) != "float":
        raise RecipeError("step 'gptq': regrid re-fits the grid to the float target's refitted weights; "
                          "it needs target: float")
    if step == "gptq" and out.get("grid_objective", by_name["grid_objective"].default) != "weights" \
            and not out.get("regrid"):
        raise RecipeError("step 'gptq': grid_objective scores the re-fitted grid; it needs regrid: true")
    return {k: v for k, v in out.items() if v is not None}


def explain(step: str) -> list[dict[str, Any]]:
    """Rows for ``lowbit recipes --explain STEP``."""
    schemas = step_schemas()
    if step not in schemas:
        raise RecipeError(f"unknown step {step!r}; known steps: {sorted(schemas)}")
    return [{"parameter": p.name, "expects": p.expected(), "default": "-" if p.default in (None, "") else p.default,
             "meaning": p.doc} for p in schemas[step]]
