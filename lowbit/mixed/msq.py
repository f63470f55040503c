"""MSQ search (seed 003, Algorithm 1): lower one bit at a time where the probes say the
layer adds the least accuracy, re-quantizing with the PTQ back-end after every change."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm import tqdm

from lowbit.data.augment import random_crop_flip
from lowbit.errors import LowbitError
from lowbit.mixed.plan import Plan
from lowbit.mixed.probes import DEFAULT_POOL_SIZES, probe_accuracy
from lowbit.mixed.search import Labelled, SearchResult, SearchSpace
from lowbit.recipes.recipe import Recipe, load_recipe
from lowbit.state_io import atomic_write_text, tensors_digest


def imprint_set(calib: Labelled, augment: bool, seed: int) -> Labelled:
    """Seed 003 §4: the calibration images are randomly cropped and flipped before the
    probes imprint from them (the network has fit the clean training images)."""
    x, y = calib
    if augment and x.dim() == 4:
        x = random_crop_flip(x, generator=torch.Generator().manual_seed(seed))
    return x, y


RANKINGS = ("gain", "gain_per_bit")


def choose_layer(space: SearchSpace, plan: Plan, gains: Sequence[float], rank: str = "gain") -> str | None:
    """Algorithm 1 steps 4-5: the layer i (i >= 2) with the smallest Diff_i that is
    searchable and still above B_min; None when no layer can be lowered.

    ``rank="gain_per_bit"`` (our variant, not the seed's) ranks by Diff_i / n_i, the gain
    given up per weight bit saved: the literal rule lowers the small early layers first
    (their probes gain little) although each step then saves few bits."""
    if rank not in RANKINGS:
        raise LowbitError(f"unknown MSQ ranking {rank!r}; known: {list(RANKINGS)}")

    def key(k: int) -> tuple[float, int]:
        value = gains[k] / space.params[space.names[k + 1]] if rank == "gain_per_bit" else gains[k]
        return value, k

    order = sorted(range(len(gains)), key=key)
    for k in order:
        name = space.names[k + 1]                     # Diff index k belongs to layer k+1
        if name in space.searchable and plan.layers[name]["w_bits"] > space.b_min:
            return name
    return None


def check_reachable(space: SearchSpace, budget: int) -> None:
    """Refuse, before any calibration, a budget MSQ cannot reach: its probes rank layers 1.. only
    (``choose_layer``), so a searchable first layer (``first_last_bits: null``) stays at b_max, which
    ``SearchSpace.budget`` (every searchable layer at b_min) does not count."""
    first = space.names[0]
    if first not in space.searchable:
        return
    smallest = space.weight_bits(space.with_bits(space.uniform(space.b_min), first, space.b_max))
    if budget < smallest:
        raise LowbitError(
            f"target unreachable for MSQ: {budget} weight bits requested, but MSQ never lowers the first layer "
            f"({first!r}, layer 0 stays at b_max={space.b_max} bits), so with every other searchable layer at "
            f"b_min={space.b_min} bits the model needs {smallest}; raise the target or lower b_max")


class _Checkpoint:
    """The search so far as JSON (settings, current plan, path); a rerun continues it."""

    def __init__(self, path: str | Path | None, settings: dict[str, Any]) -> None:
        self.path = Path(path) if path else None
        self.settings = settings

    def load(self) -> dict[str, Any] | None:
        if self.path is not None and self.path.is_dir():
            raise LowbitError(f"search checkpoint {self.path} is a folder; MSQ's checkpoint is a JSON file")
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise LowbitError(f"search checkpoint {self.path} is corrupt ({err}); delete it to start over") from None
        saved = state.get("settings") if isinstance(state, dict) else None
        if not isinstance(saved, dict) or not all(k in state for k in ("plan", "path", "calibrations", "seconds")):
            raise LowbitError(f"search checkpoint {self.path} is not an MSQ search state; delete it to start over")
        # a setting the checkpoint lacks was added later (e.g. the model and data digests): it does not refuse
        if any(k not in self.settings or self.settings[k] != v for k, v in saved.items()):
            raise LowbitError(f"search checkpoint {self.path} was written with other settings, another model or "
                              "other data; delete it or use another path")
        return state

    def save(self, plan: Plan, path: list[dict[str, Any]], calibrations: int, seconds: float) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a temporary file of its own, flushed before the rename: a fixed <name>.tmp was the checkpoint itself
        # when it is named x.tmp (truncated in place), and a crash could leave an empty file renamed over it
        atomic_write_text(self.path, json.dumps({"settings": self.settings, "plan": plan.to_dict(), "path": path,
                                                 "calibrations": calibrations, "seconds": seconds}))


def msq_search(
    model: nn.Module, recipe: str | Path | dict[str, Any] | Recipe, calib: Labelled, val: Labelled,
    target_ratio: float | None = None, target_bits: float | None = None, b_max: int = 8, b_min: int = 2,
    lower: str = "weights", rank: str = "gain", probe_at: str = "output", pool_sizes: Sequence[int] = DEFAULT_POOL_SIZES, augment: bool = True,
    checkpoint: str | Path | None = None, progress: bool = True,
) -> SearchResult:
    """Algorithm 1. ``recipe`` is the PTQ back-end run at every step (any recipe); ``calib``
    and ``val`` are disjoint labelled subsets of the training split. Returns the first
    configuration within the budget, and every configuration on the way in ``path``."""
    from lowbit.api import quantize

    r = load_recipe(recipe)
    if rank not in RANKINGS:
        raise LowbitError(f"unknown MSQ ranking {rank!r}; known: {list(RANKINGS)}")
    if r.data_free:
        raise LowbitError("MSQ needs labelled calibration data; a data-free (zeroq) back-end cannot imprint probes")
    space = SearchSpace.build(model, r, b_min, b_max, lower)
    budget = space.budget(target_ratio, target_bits)
    check_reachable(space, budget)
    settings = {"method": "msq", "recipe": r.to_dict(), "budget_bits": budget, "b_min": b_min, "b_max": b_max,
                "lower": lower, "rank": rank, "probe_at": probe_at, "pool_sizes": list(pool_sizes), "augment": augment,
                "calib": int(calib[0].shape[0]), "val": int(val[0].shape[0]),
                "model_sha256": tensors_digest(model.state_dict().items()),
                "data_sha256": tensors_digest([("calib_x", calib[0]), ("calib_y", calib[1]), ("val_x", val[0]),
                                               ("val_y", val[1])])}
    ckpt = _Checkpoint(checkpoint, settings)
    state = ckpt.load()
    plan = Plan.from_mapping(state["plan"]) if state else space.start()
    path: list[dict[str, Any]] = state["path"] if state else []
    calibrations = state["calibrations"] if state else 0
    spent = state["seconds"] if state else 0.0
    start = time.perf_counter()
    imprint = imprint_set(calib, augment, r.calibration["seed"])
    bar = tqdm(desc="msq search", unit="step", disable=not progress, leave=False)
    while space.weight_bits(plan) > budget:
        qm = quantize(model, r.with_plan(plan), calib=calib[0], progress=False)      # step 1
        calibrations += 1
        probes = probe_accuracy(qm, imprint, val, pool_sizes, probe_at=probe_at)     # step 2
        gains = probes.gains()                                                       # step 3
        name = choose_layer(space, plan, gains, rank)                                # step 4
        if name is None:
            raise LowbitError("MSQ cannot reach the budget: every layer it can lower is at b_min")
        path.append({**space.summary(plan), "plan": plan.to_dict()["layers"], "probe_accuracy": probes.accuracy,
                     "val_accuracy": probes.network_accuracy, "lowered": name})
        plan = space.with_bits(plan, name, plan.layers[name]["w_bits"] - 1)          # step 5
        seconds = spent + time.perf_counter() - start
        ckpt.save(plan, path, calibrations, seconds)                                 # step 6
        bar.update(1)
        bar.set_postfix(mean_w_bits=f"{space.summary(plan)['mean_w_bits']:.2f}", val=f"{probes.network_accuracy:.3f}")
    bar.close()
    path.append({**space.summary(plan), "plan": plan.to_dict()["layers"], "lowered": None})
    variant = ", ".join(v for v, default in ((rank, "gain"), (probe_at, "output")) if v != default)
    final = space.final_plan(plan, method=f"msq ({variant})" if variant else "msq", budget_bits=budget)
    return SearchResult("msq", final, budget, settings, path, calibrations, spent + time.perf_counter() - start)
