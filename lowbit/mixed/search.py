"""What every mixed-precision search shares: the search space, the budget and the result."""
from __future__ import annotations

import json
import math
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from lowbit.errors import BitsError, LowbitError
from lowbit.mixed.plan import ARCHITECTURE_KEY, Plan, architecture_of, check_plan_bits, write_text_file
from lowbit.model.layer_table import FLOAT_BITS, LayerTable
from lowbit.recipes.recipe import Recipe

Labelled = tuple[torch.Tensor, torch.Tensor]


def _calibration(train: Dataset, recipe: Recipe, keep: int = 0) -> Subset:
    """The recipe's seeded calibration subset of the training split, clamped as ``quantize`` clamps it
    (a small dataset of the user's calibrates on all of it, with a note), less ``keep`` samples left
    for validation: a search accepts the datasets that quantize accepts."""
    from lowbit.data import calibration_subset

    c = recipe.calibration
    total = len(train)  # type: ignore[arg-type]
    n = min(c["samples"], total - keep)
    if n < 1:
        raise LowbitError(f"the training split has {total} samples: not enough for calibration and {keep} "
                          "validation samples; lower --val-samples")
    if n < c["samples"]:
        spare = f" ({keep} kept for validation)" if keep else ""
        print(f"lowbit: note: the recipe asks for {c['samples']} calibration images, the training split holds "
              f"{total}{spare}: using {n}", file=sys.stderr)
    return calibration_subset(train, n, c["seed"])


def search_calibration(train: Dataset, recipe: Recipe) -> Labelled:
    """The recipe's calibration subset of the training split, labelled (all HAWQ needs)."""
    from lowbit.data import dataset_tensors

    return dataset_tensors(_calibration(train, recipe))


def search_subsets(train: Dataset, recipe: Recipe, val_samples: int = 1024) -> tuple[Labelled, Labelled]:
    """The recipe's calibration subset of the training split, and a disjoint validation
    subset of it (seeded), both labelled: searches never see the test split."""
    from lowbit.data import dataset_tensors

    c = recipe.calibration
    calib = _calibration(train, recipe, keep=val_samples)
    taken = set(int(i) for i in calib.indices)
    n = len(train)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(c["seed"] + 1)).tolist()
    val_idx = sorted([i for i in order if i not in taken][:val_samples])
    return dataset_tensors(calib), dataset_tensors(train, val_idx)


def overridden(table: LayerTable, recipe: Recipe, key: str) -> list[str]:
    """Layers (table order) whose ``key`` ("w_bits" or "a_bits") some recipe override sets: a search
    must not move them, or its plan, applied last, would silently overrule the recipe."""
    matched = {r.name for o in recipe.overrides if key in o for r in table.match(o["pattern"])}
    return [n for n in table.names() if n in matched]


def _floor(bits: float) -> int:
    """floor(bits), forgiving float rounding: a target read off a plan (its own ratio 32 N / size, or mean bits
    size / N) gives back size -+ a few ulps, and a plain floor then made the budget one bit below that plan."""
    return math.floor(bits + max(1e-9, abs(bits) * 1e-12))


@dataclass
class SearchSpace:
    """Which layers a search may change and between which bit widths.

    The recipe's first/last-layer rule (``first_last_bits``) freezes those layers at their
    recipe bits, the convention every uniform baseline here uses too, and so does an
    ``overrides`` entry that sets a layer's ``w_bits`` (the recipe's word on that layer is
    final: a plan would otherwise overrule it). Frozen layers stay in the budget at those bits
    (see ``budget``). ``lower`` is "weights" (activations keep the recipe's bits) or "both"
    (Algorithm 1 literally: a layer's weights and input activations move together, except
    activations an override's ``a_bits`` fixes and the inputs of frozen layers, ``fixed_a``: a
    tensor one of them reads keeps its bits for every reader).
    """

    names: list[str]
    params: dict[str, int]
    base: Plan                      # every layer's bits before the search (from the recipe)
    searchable: list[str]
    b_min: int
    b_max: int
    lower: str = "weights"
    shared_inputs: list[list[str]] = field(default_factory=list)  # layers reading one tensor (one act. quantizer)
    fixed_w: list[str] = field(default_factory=list)   # w_bits set by a recipe override: not searched
    fixed_a: set[str] = field(default_factory=set)     # a_bits not searched: an override's, or a frozen layer's

    @classmethod
    def build(cls, model: nn.Module, recipe: Recipe, b_min: int, b_max: int, lower: str = "weights") -> "SearchSpace":
        from lowbit.api import prepare

        check_plan_bits(b_min, "b_min")
        check_plan_bits(b_max, "b_max")
        if b_max == FLOAT_BITS or not b_min <= b_max:
            raise BitsError(f"need 1 <= b_min <= b_max <= 8, got b_min={b_min}, b_max={b_max}")
        if lower not in ("weights", "both"):
            raise LowbitError(f"lower must be 'weights' or 'both', got {lower!r}")
        if lower == "both" and b_min < 2:  # else refused only when the first 1-bit plan is applied, many steps in
            raise BitsError(f"lower both moves activation bits with weight bits, and activations cannot go below "
                            f"2 bits: b_min={b_min} needs lower weights (1-bit weights) or b_min >= 2")
        qm = prepare(model, recipe.with_plan(None))
        table = qm.layers
        names = table.names()
        frozen = {names[0], names[-1]} if recipe.first_last_bits is not None else set()
        fixed_w = overridden(table, recipe, "w_bits")
        searchable = [n for n in names if n not in frozen and n not in fixed_w]
        if not searchable:
            raise LowbitError("nothing to search: every quantized layer is frozen by first_last_bits or has its "
                              f"w_bits set by the recipe's overrides ({', '.join(fixed_w) or 'none'})")
        base = table.plan()
        if lower == "weights":  # a weights-only plan leaves activations to whichever recipe it is applied with
            base = {n: {k: v for k, v in b.items() if k != "a_bits"} for n, b in base.items()}
        groups: dict[int, list[str]] = {}
        for r in table:
            if r.input_quantizer is not None:
                groups.setdefault(id(r.input_quantizer), []).append(r.name)
        shared = [g for g in groups.values() if len(g) > 1]
        # (an override's a_bits covers every reader of a shared tensor: apply_bit_overrides refuses it otherwise)
        # A frozen layer's input keeps its recipe bits too (the first layer's network input at first_last_bits),
        # also where a searchable layer reads the same tensor.
        fixed_a = set(overridden(table, recipe, "a_bits")) | (set(names) - set(searchable))
        return cls(names, {r.name: r.params for r in table}, Plan(base), searchable, b_min, b_max, lower, shared,
                   fixed_w, fixed_a)

    def _tie_shared_inputs(self, layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Under lower: both, layers that read one tensor share its activation quantizer, so they must share
        a_bits: the tensor takes the lowest bits any of its readers asks for (a plan splitting them is refused),
        unless a reader's a_bits are fixed (``fixed_a``): then that reader's bits, which the recipe gave the
        one quantizer, hold for all."""
        if self.lower == "both":
            for group in self.shared_inputs:
                fixed = [layers[n]["a_bits"] for n in group if n in self.fixed_a and "a_bits" in layers[n]]
                bits = fixed[0] if fixed else min(layers[n]["a_bits"] for n in group if "a_bits" in layers[n])
                for n in group:
                    layers[n]["a_bits"] = bits
        return layers

    def start(self) -> Plan:
        """Every searchable layer at B_max (Algorithm 1's initialisation)."""
        layers = {n: dict(b) for n, b in self.base.layers.items()}
        for n in self.searchable:
            layers[n]["w_bits"] = self.b_max
            if self.lower == "both" and n not in self.fixed_a:
                layers[n]["a_bits"] = self.b_max
        return Plan(self._tie_shared_inputs(layers))

    def with_bits(self, plan: Plan, name: str, bits: int) -> Plan:
        layers = {n: dict(b) for n, b in plan.layers.items()}
        layers[name]["w_bits"] = bits
        if self.lower == "both" and name not in self.fixed_a:
            layers[name]["a_bits"] = bits
        return Plan(self._tie_shared_inputs(layers))

    def weight_bits(self, plan: Plan) -> int:
        return plan.weight_bits(self.params)

    def total_params(self) -> int:
        return sum(self.params.values())

    def budget(self, target_ratio: float | None = None, target_bits: float | None = None) -> int:
        """Weight-code bits allowed: float32 size / ratio, or mean bits x parameters, both over every
        quantizable layer. Frozen layers count at their recipe bits, as the first/last 8-bit layers always
        have: an override keeping a layer float counts 32 bits per weight, so the target is the whole
        model's mean (what ``summary`` reports), and fixed layers can make it unreachable up front."""
        if (target_ratio is None) == (target_bits is None):
            raise LowbitError("give exactly one of target_ratio (weight compression) or target_bits (mean weight bits)")
        given = target_ratio if target_ratio is not None else target_bits
        if isinstance(given, numbers.Real) and not math.isfinite(given):  # (floor of inf/nan raised a raw error)
            raise LowbitError(f"{'target_ratio' if target_ratio is not None else 'target_bits'} must be a finite "
                              f"number, got {given}")
        if target_ratio is not None:
            if target_ratio <= 0:
                raise LowbitError(f"target_ratio must be positive, got {target_ratio}")
            budget = _floor(FLOAT_BITS * self.total_params() / target_ratio)
        else:
            if not target_bits or target_bits <= 0:
                raise LowbitError(f"target_bits must be positive, got {target_bits}")
            budget = _floor(target_bits * self.total_params())
        smallest = self.weight_bits(self.uniform(self.b_min))
        if budget < smallest:
            raise LowbitError(
                f"target unreachable: {budget} weight bits requested, but with every searchable layer at "
                f"b_min={self.b_min} bits (and frozen layers at their recipe bits{self.fixed_note()}) "
                f"the model needs {smallest}")
        return budget

    def fixed_note(self) -> str:
        """The override-fixed layers and their bits, for messages: they are what a user can change."""
        if not self.fixed_w:
            return ""
        shown = ", ".join(f"{n!r} at {self.base.layers[n]['w_bits']}" for n in self.fixed_w[:4])
        return f"; overrides fix {shown}{' ...' if len(self.fixed_w) > 4 else ''}"

    def uniform(self, bits: int) -> Plan:
        """Every searchable layer at ``bits`` (frozen layers at their recipe bits)."""
        plan = self.start()
        for n in self.searchable:
            plan = self.with_bits(plan, n, bits)
        return plan

    def summary(self, plan: Plan) -> dict[str, Any]:
        size = self.weight_bits(plan)
        return {"weight_bits": size, "mean_w_bits": size / self.total_params(),
                "weight_compression": FLOAT_BITS * self.total_params() / size}

    def final_plan(self, plan: Plan, **meta: Any) -> Plan:
        """The search's answer: its bits, provenance, size and the layers it was searched on (so that applying it
        to another network is refused)."""
        return Plan(plan.layers, {**meta, **self.summary(plan), ARCHITECTURE_KEY: architecture_of(self.params)})


@dataclass
class SearchResult:
    """A search's answer (``plan``) and everything needed to judge and reproduce it."""

    method: str
    plan: Plan
    budget_bits: int
    settings: dict[str, Any]
    path: list[dict[str, Any]] = field(default_factory=list)   # configurations on the way
    calibrations: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "budget_bits": self.budget_bits, "settings": self.settings,
                "plan": self.plan.to_dict(), "path": self.path, "calibrations": self.calibrations,
                "seconds": self.seconds}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_text_file(path, json.dumps(self.to_dict(), indent=2))  # a long search's result: never half-written
        return path
