"""Recipes: quantization settings as data (YAML, TOML or a dict), validated strictly.

A recipe names the weight and activation grids and their range estimators, whether BN is
folded, per-layer overrides by name pattern, the calibration set size, and the ordered
algorithm steps. The CLI and the Python API read the same recipes.
"""
from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import BitsError, RecipeError
from lowbit.mixed.plan import Plan, load_plan
from lowbit.quant.estimators import DATA_FREE, ESTIMATORS, check_estimator_options
from lowbit.quant.spec import MAX_BITS, QuantSpec

TOP_KEYS = {"name", "description", "weights", "activations", "fold_bn", "quantize_adds", "add_bits", "first_last_bits",
            "overrides", "keep_float", "calibration", "steps", "extends", "plan", "widen", "relu", "shortcut"}
SPEC_KEYS = set(QuantSpec.__dataclass_fields__)
TENSOR_KEYS = SPEC_KEYS | {"estimator", "estimator_options", "quantizer", "quantizer_options"}
OVERRIDE_KEYS = {"pattern", "w_bits", "a_bits", "w_quantizer", "w_quantizer_options"}
CALIBRATION_KEYS = {"samples", "batch_size", "seed"}
SHORTCUT_KINDS = ("shared", "real", "bireal", "stream")

WEIGHT_DEFAULTS = {"bits": 8, "signed": True, "symmetric": True, "per_channel": True, "estimator": "mse"}
# The integer-runtime layout is the default: uint8 activations (affine where a tensor is
# signed, zero point 0 after ReLU), which is what ORT's and OpenVINO's int8 kernels run.
ACT_DEFAULTS = {"bits": 8, "signed": False, "symmetric": False, "per_channel": False, "estimator": "mse"}


def _check_keys(data: dict[str, Any], allowed: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = set(data) - allowed
    if unknown:
        raise RecipeError(f"unknown key(s) {sorted(unknown)} in {where}; allowed: {sorted(allowed)}")


def _check_bits(value: Any, where: str, allow_float: bool = True) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BitsError(f"{where} must be an integer bit width, got {value!r}")
    if allow_float and value == 32:
        return value
    if not 1 <= value <= MAX_BITS:  # 1 bit: binary weights through the layer table; the spec decides the rest
        raise BitsError(f"{where}={value} is outside 1..{MAX_BITS}" + (" (or 32 to keep float)" if allow_float else ""))
    return value


def _check_ch_axis(spec: QuantSpec, where: str) -> None:
    """Refuse a channel axis the layers would ignore: weight scales are always per output channel
    (the layer wrapper forces axis 0) and activations are per tensor, so any other axis would be
    stored in the recipe and artifact while the model quantized along axis 0."""
    if spec.ch_axis == 0:
        return
    if where == "weights":
        raise RecipeError(f"weights.ch_axis={spec.ch_axis}: per-channel weight grids are per output channel "
                          "(axis 0 of Conv and Linear weights); remove the key or set it to 0")
    raise RecipeError(f"{where}.ch_axis={spec.ch_axis}: activations are quantized per tensor (per-channel "
                      "activation scales are not supported by integer runtimes); remove the key or set it to 0")


@dataclass
class TensorRecipe:
    spec: QuantSpec
    estimator: str
    estimator_options: dict[str, Any] = field(default_factory=dict)
    # The kind trained by a `qat` step (lowbit.quant.registry); PTQ always calibrates the
    # uniform grid, which is also what a trained kind deploys as.
    quantizer: str = "uniform"
    quantizer_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: dict[str, Any], defaults: dict[str, Any], where: str) -> "TensorRecipe":
        _check_keys(data, TENSOR_KEYS, where)
        merged = {**defaults, **data}
        if not isinstance(merged["estimator"], str):
            raise RecipeError(f"{where}.estimator must be an estimator name, got {merged['estimator']!r}")
        estimator = merged.pop("estimator")
        options = merged.pop("estimator_options", {}) or {}
        if not isinstance(options, dict):
            raise RecipeError(f"{where}.estimator_options must be a mapping")
        from lowbit.quant.registry import check_kind, check_kind_options

        kind = check_kind(merged.pop("quantizer", "uniform"), where)
        kind_options = check_kind_options(kind, merged.pop("quantizer_options", {}) or {}, where)
        if "bits" in data:
            _check_bits(data["bits"], f"{where}.bits", allow_float=False)
        known = sorted(ESTIMATORS) + (sorted(DATA_FREE) if where == "activations" else [])
        if estimator not in known:
            raise RecipeError(f"{where}: unknown range estimator {estimator!r}; known: {known}")
        check_estimator_options(estimator, options, where)
        try:
            spec = QuantSpec.from_dict(merged)
        except RecipeError as err:  # name the section: "weights.symmetric must be ..."
            raise type(err)(f"{where}.{err}") from None
        _check_ch_axis(spec, where)
        from lowbit.quant.registry import check_kind_grid

        check_kind_grid(kind, spec, where)
        return cls(spec, str(estimator), dict(options), kind, kind_options)

    def to_dict(self) -> dict[str, Any]:
        return {**self.spec.to_dict(), "estimator": self.estimator, "estimator_options": self.estimator_options,
                "quantizer": self.quantizer, "quantizer_options": self.quantizer_options}


@dataclass
class Recipe:
    name: str
    weights: TensorRecipe
    activations: TensorRecipe
    description: str = ""
    fold_bn: bool = True
    quantize_adds: bool = True
    add_bits: int | None = 8
    first_last_bits: int | None = 8
    overrides: list[dict[str, Any]] = field(default_factory=list)
    keep_float: list[str] = field(default_factory=list)
    calibration: dict[str, int] = field(default_factory=lambda: {"samples": 1024, "batch_size": 128, "seed": 0})
    steps: list[tuple[str, dict[str, Any]]] = field(default_factory=lambda: [("calibrate", {})])
    plan: "Plan | None" = None
    widen: int = 1  # WRPN: every conv this many times wider before quantizing (lowbit.model.widen)
    relu: str = "keep"  # "hardtanh": every ReLU becomes hardtanh, so binary activations see signed inputs
    # What a residual add reads of a tensor that also feeds a quantized layer (lowbit.model.shortcuts):
    # "shared" its quantized value (one QDQ per tensor, as integer runtimes do), "real" the value
    # before the quantizer, "bireal" that plus a real-valued shortcut around every conv (Bi-Real Net),
    # "stream" the add inputs' own (add_bits) grid, from which the layer's quantizer requantizes: the
    # residual stream stays at 8 bits while the convs read 4 (needs quantize_adds).
    shortcut: str = "shared"
    source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], folder: Path | None = None) -> "Recipe":
        """``folder``: that of the recipe file ``data`` was read from, where its relative plan path
        points; None (a dict or a built-in) keeps such a path relative to the working directory."""
        _check_keys(data, TOP_KEYS, "recipe")
        data = copy.deepcopy(data)
        if folder is not None and isinstance(data.get("plan"), str):
            # Before merging a base: a base file's plan was already made absolute against its own folder.
            data["plan"] = _plan_near(data["plan"], folder)
        if "extends" in data:
            base = _load_base(data.pop("extends"))
            top, data = data, _merge(base, data)
            changed = sorted(k for k in data if k not in ("name", "description") and base.get(k) != data[k])
            base_name = str(base.get("name", "custom"))
            if "name" not in top and changed:  # (a dict: a file is named by its stem) not the base's results
                data["name"] = f"{base_name}-edited"
            if "description" not in top and changed:  # the base's would claim what the edits may have changed
                data["description"] = f"{base_name} with its {', '.join(changed)} changed"
        source = copy.deepcopy(data)
        for key in ("name", "description"):
            if key in data and not isinstance(data[key], str):
                raise RecipeError(f"{key} must be a string, got {data[key]!r}")
        for key in ("weights", "activations", "calibration"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise RecipeError(f"{key} must be a mapping, got {data[key]!r}")
        weights = TensorRecipe.parse(data.get("weights", {}) or {}, WEIGHT_DEFAULTS, "weights")
        acts = TensorRecipe.parse(data.get("activations", {}) or {}, ACT_DEFAULTS, "activations")
        if acts.spec.per_channel:
            raise RecipeError("activations.per_channel: per-channel activation scales are not supported "
                              "by integer runtimes; use per-tensor activations")
        fl = data.get("first_last_bits", 8)
        if fl is not None:
            _check_bits(fl, "first_last_bits")
        overrides = data.get("overrides", []) or []
        if not isinstance(overrides, list):
            raise RecipeError("overrides must be a list of {pattern, w_bits, a_bits}")
        for i, o in enumerate(overrides):
            _check_keys(o, OVERRIDE_KEYS, f"overrides[{i}]")
            if not isinstance(o.get("pattern"), str) or not o["pattern"]:
                raise RecipeError(f"overrides[{i}] needs a `pattern`, a layer-name glob such as 'layer1.*' "
                                  f"(got {o.get('pattern')!r})")
            for k in ("w_bits", "a_bits"):
                if k in o:
                    _check_bits(o[k], f"overrides[{i}].{k}")
            if "w_quantizer_options" in o and "w_quantizer" not in o:
                raise RecipeError(f"overrides[{i}]: w_quantizer_options without a w_quantizer")
            if "w_quantizer" in o:  # a weight kind for these layers only (mixed kinds in one model)
                from lowbit.quant.registry import check_kind, check_kind_options

                kind = check_kind(o["w_quantizer"], "weights", f"overrides[{i}].weights")
                check_kind_options(kind, o.get("w_quantizer_options", {}) or {}, f"overrides[{i}].weights")
        keep_float = data.get("keep_float", []) or []
        if not isinstance(keep_float, list) or not all(isinstance(p, str) for p in keep_float):
            raise RecipeError("keep_float must be a list of layer-name patterns")
        calib = {"samples": 1024, "batch_size": 128, "seed": 0, **(data.get("calibration", {}) or {})}
        _check_keys(calib, CALIBRATION_KEYS, "calibration")
        for k, v in calib.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "seed" else 1) or v > 2**63 - 1:
                raise RecipeError(f"calibration.{k} must be {'an integer from 0 to 2**63 - 1' if k == 'seed' else 'a positive integer'}"
                                  f", got {v!r}")
        raw_steps = data.get("steps", ["calibrate"])
        if not isinstance(raw_steps, list) or not raw_steps:
            raise RecipeError(f"steps must be a non-empty list such as [calibrate], got {raw_steps!r}")
        steps = [_parse_step(s, i) for i, s in enumerate(raw_steps)]
        _check_calibrate_options(steps, weights, acts)
        names = [n for n, _ in steps]
        check_layer_kinds({o["w_quantizer"] for o in overrides if "w_quantizer" in o}, names, "overrides")
        if weights.quantizer == "kmeans" and ("qat" not in names or "kmeans" not in names[:names.index("qat")]):
            raise RecipeError("weights.quantizer kmeans fine-tunes k-means centroids in a `qat` step: the steps need "
                              "`kmeans` before `qat`, e.g. [calibrate, kmeans, qat]")
        if data.get("plan") is not None and not isinstance(data["plan"], (str, dict)):
            raise RecipeError(f"plan must be a plan file path or a mapping, got {data['plan']!r}")
        plan = load_plan(data["plan"]) if data.get("plan") is not None else None
        if plan is not None:
            check_layer_kinds(plan.kinds(), names, "the plan")
        fold_bn = data.get("fold_bn", True)
        quantize_adds = data.get("quantize_adds", True)
        for key, value in (("fold_bn", fold_bn), ("quantize_adds", quantize_adds)):
            if not isinstance(value, bool):
                raise RecipeError(f"{key} must be true or false, got {value!r}")
        add_bits = data.get("add_bits", 8)
        if add_bits is not None:
            _check_bits(add_bits, "add_bits", allow_float=False)
        widen = data.get("widen", 1)
        if isinstance(widen, bool) or not isinstance(widen, int) or not 1 <= widen <= 16:
            raise RecipeError(f"widen must be an integer from 1 to 16 (WRPN's width factor), got {widen!r}")
        relu = data.get("relu", "keep")
        if relu not in ("keep", "hardtanh"):
            raise RecipeError(f"relu must be 'keep' or 'hardtanh' (binary activations need signed inputs), got {relu!r}")
        if acts.quantizer in ("bnn", "xnor") and relu != "hardtanh":
            raise RecipeError(f"activations.quantizer {acts.quantizer} takes the sign of each layer's input, which "
                              "after a ReLU is constant: set `relu: hardtanh`")
        shortcut = data.get("shortcut", "shared")
        if shortcut not in SHORTCUT_KINDS:
            raise RecipeError(f"shortcut must be one of {', '.join(SHORTCUT_KINDS)} (what residual adds read), "
                              f"got {shortcut!r}")
        if shortcut == "stream" and add_bits is None:
            raise RecipeError("shortcut: stream keeps the residual stream at add_bits while the layers read fewer; "
                              "add_bits: null puts the adds at the activations' bits, the stream `shared` already "
                              "gives: set add_bits (e.g. 8)")
        if shortcut == "stream" and not quantize_adds:
            raise RecipeError("shortcut: stream keeps the residual stream on the grid of the add inputs' quantizers, "
                              "which quantize_adds: false removes; set quantize_adds: true, or shortcut: real for "
                              "float adds")
        return cls(name=str(data.get("name", "custom")), description=str(data.get("description", "")),
                   weights=weights, activations=acts, fold_bn=fold_bn, quantize_adds=quantize_adds, add_bits=add_bits,
                   first_last_bits=fl,
                   overrides=overrides, keep_float=keep_float, calibration=calib, steps=steps, plan=plan,
                   widen=widen, relu=relu, shortcut=shortcut, source=source)

    @property
    def data_free(self) -> bool:
        """True when the recipe makes its own calibration data (first step ``zeroq``)."""
        return bool(self.steps) and self.steps[0][0] == "zeroq"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "weights": self.weights.to_dict(),
                "activations": self.activations.to_dict(), "fold_bn": self.fold_bn,
                "quantize_adds": self.quantize_adds, "add_bits": self.add_bits,
                "first_last_bits": self.first_last_bits, "overrides": self.overrides,
                "keep_float": self.keep_float, "calibration": self.calibration,
                "steps": [{name: params} for name, params in self.steps],
                **({"plan": self.plan.to_dict()} if self.plan is not None else {}),
                **({"widen": self.widen} if self.widen != 1 else {}),
                **({"relu": self.relu} if self.relu != "keep" else {}),
                **({"shortcut": self.shortcut} if self.shortcut != "shared" else {})}

    def with_plan(self, plan: "Plan | None") -> "Recipe":
        """The same recipe with a mixed-precision plan applied last (replacing any plan)."""
        if plan is not None:
            check_layer_kinds(plan.kinds(), [n for n, _ in self.steps], "the plan")
        out = copy.copy(self)
        out.plan = plan
        out.source = {**self.source, "plan": plan.to_dict()} if plan is not None else dict(self.source)
        return out


def check_layer_kinds(kinds: set[str], step_names: list[str], source: str) -> None:
    """Per-layer weight kinds (overrides or a plan) need the step that makes them: a QAT kind a
    `qat` step, k-means a `kmeans` step before any `qat`. Without it the layer would stay on the
    recipe's uniform grid while the plan or the layer table says otherwise."""
    trained = kinds - {"uniform", "kmeans"}
    if trained and "qat" not in step_names:
        raise RecipeError(f"{source} give(s) layers the QAT weight kind(s) {sorted(trained)}, which only a `qat` step "
                          "trains: add one to the steps")
    before_qat = step_names[:step_names.index("qat")] if "qat" in step_names else step_names
    if "kmeans" in kinds and "kmeans" not in before_qat:
        raise RecipeError(f"{source} give(s) layers w_quantizer kmeans: the steps need a `kmeans` step (before any "
                          "`qat`) to cluster them, e.g. [calibrate, kmeans]")


# The recipe files being read, innermost last: an `extends` chain that comes back to one of
# them is a cycle (it would otherwise recurse until Python gives up).
_LOADING: list[str] = []


def _load_base(ref: Any) -> dict[str, Any]:
    """The source of the recipe ``ref`` names; a relative path is read next to the file
    that extends it (when it exists there), as a user writing two files side by side expects."""
    if not isinstance(ref, (str, Path)):
        raise RecipeError(f"extends must name a built-in recipe or a recipe file, got {ref!r}")
    if _LOADING and str(ref) not in builtin_names():
        nearby = Path(_LOADING[-1]).parent / ref
        if not Path(ref).is_absolute() and nearby.is_file():
            ref = nearby
    return load_recipe(ref).source


def _plan_near(ref: str, folder: Path) -> str:
    """The plan path a recipe file names, read from the file's folder when it exists there, as
    ``extends`` is (so a recipe and its plan move together), else as given (the working directory).
    Made absolute because the recipe's source is reloaded as a dict (``lowbit train``), which
    resolves against the working directory."""
    nearby = folder / ref
    if Path(ref).is_absolute() or not nearby.is_file():
        return ref
    return str(nearby)


# Keys an extending recipe gives whole (a plan is one thing: merging two would combine their layers and records)
REPLACED_KEYS = ("plan", "steps", "keep_float")


def _merge(base: dict[str, Any], top: dict[str, Any], top_level: bool = True) -> dict[str, Any]:
    """``base`` with ``top``'s settings: mappings merge key by key, a key given as null (a section whose
    entries are all commented out) changes nothing, and ``overrides`` add to the base's (applied after
    them), so extending an a32 built-in with an override keeps its float activations."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if v is None and isinstance(out.get(k), dict):
            continue
        if top_level and k == "overrides" and isinstance(v, list) and isinstance(out.get(k), list):
            out[k] = [*out[k], *v]
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and not (top_level and k in REPLACED_KEYS):
            out[k] = _merge(out[k], v, top_level=False)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_calibrate_options(steps: list[tuple[str, dict[str, Any]]], weights: TensorRecipe,
                             acts: TensorRecipe) -> None:
    """A calibrate step's weight_options/act_options checked against the estimator they will go to (the step's,
    else the recipe's), when the recipe is read."""
    for i, (name, params) in enumerate(steps):
        if name != "calibrate":
            continue
        for part, section in (("weight", weights), ("act", acts)):
            if f"{part}_options" in params:
                estimator = params.get(f"{part}_estimator") or section.estimator
                check_estimator_options(estimator, params[f"{part}_options"], f"steps[{i}].calibrate",
                                        f"{part}_options")


def _parse_step(step: Any, i: int) -> tuple[str, dict[str, Any]]:
    from lowbit.steps import STEPS, check_step_params

    if isinstance(step, str):
        name, params = step, {}
    elif isinstance(step, dict) and len(step) == 1:
        name, params = next(iter(step.items()))
        if params is None:  # YAML `- calibrate:` (no parameters written); only None: `false`/`0`/`[]` are not "none"
            params = {}
    else:
        raise RecipeError(f"steps[{i}] must be a step name or {{name: {{params}}}}, got {step!r}")
    if name not in STEPS:
        raise RecipeError(f"steps[{i}]: unknown step {name!r}; known steps: {sorted(STEPS)}")
    if not isinstance(params, dict):
        raise RecipeError(f"steps[{i}] ({name}) parameters must be a mapping, got {params!r}; to turn the "
                          "step off, delete it from the steps list")
    return name, check_step_params(name, params)  # fail at load time, not after minutes of calibration


def builtin_names() -> list[str]:
    folder = resources.files("lowbit.recipes") / "builtin"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping: plain YAML keeps the last one,
    so a second (mistyped or forgotten) `weights:` section would silently replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        _check_unique_keys(self, node)
        return super().construct_mapping(node, deep=deep)


def _check_unique_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> None:
    """Only the keys written in this mapping: those a `<<` merge brings in may be overridden."""
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in first_line:
                raise RecipeError(f"key {key!r} is given twice (lines {first_line[key]} and {line}); "
                                  "YAML would keep only the last, so remove or merge one")
            first_line[key] = line
        except TypeError:  # an unhashable key: the SafeLoader reports it
            continue


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        # utf-8-sig: Windows editors start files with a byte-order mark, which TOML would reject.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe file {path} is not UTF-8 text (byte {err.start} cannot be decoded); "
                          "save it as UTF-8") from None
    kind = "TOML" if path.suffix == ".toml" else "YAML"
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else _load_yaml(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise RecipeError(f"recipe file {path} is not valid {kind}: {err}") from None
    except RecipeError as err:
        raise RecipeError(f"recipe file {path}: {err}") from None
    if data is None:
        raise RecipeError(f"recipe file {path} is empty; write at least `extends: w8a8` (see `lowbit recipes`)")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping at the top level")
    if not data:
        raise RecipeError(f"recipe file {path} holds no settings; write at least `extends: w8a8`")
    return data


def load_recipe(recipe: "str | Path | dict[str, Any] | Recipe") -> Recipe:
    """A built-in name, a path to a .yaml/.yml/.toml file, a dict, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        text = str(recipe)
        if text in builtin_names():
            data = _load_yaml((resources.files("lowbit.recipes") / "builtin" / f"{text}.yaml").read_text("utf-8"))
            data.setdefault("name", text)
            return Recipe.from_dict(data)
        from lowbit.recipes.compose import compose, is_composed

        if is_composed(text):  # w{W}a{A}[+word...]: bit widths and method words (lowbit.recipes.compose)
            try:
                return Recipe.from_dict(compose(text, builtin_names()))
            except RecipeError as err:
                if str(err).startswith(f"recipe {text!r}"):
                    raise
                raise RecipeError(f"recipe {text!r}: {err}") from None
        path = Path(text)
        if path.suffix in (".yaml", ".yml", ".toml"):
            if path.is_dir():
                raise RecipeError(f"recipe path {path} is a directory, not a recipe file")
            if not path.is_file():
                raise RecipeError(f"recipe file {path} does not exist")
            key = str(path.resolve())
            if key in _LOADING:
                chain = " -> ".join(Path(p).name for p in _LOADING[_LOADING.index(key):] + [key])
                raise RecipeError(f"recipe {path} extends itself through a cycle: {chain}")
            data = _read_file(path)
            data.setdefault("name", path.stem)
            _LOADING.append(key)
            try:
                return Recipe.from_dict(data, folder=Path(key).parent)
            finally:
                _LOADING.pop()
        raise RecipeError(f"unknown recipe {text!r}: not a built-in ({', '.join(builtin_names())}), a composed name "
                          "(w{W}a{A}[+word...], see `lowbit recipes`) nor a .yaml/.toml path")
    raise RecipeError(f"a recipe is a name, a path or a dict, not {type(recipe).__name__}")
