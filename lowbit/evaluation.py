"""The benchmark protocol in code: float baseline and quantized results in one run.

Calibration comes from the training split, the score from the full test split (unless a
caller limits it and says so), with the float model scored in the same process.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from lowbit.api import evaluate, quantize
from lowbit.data import calibration_subset, dataset_tensors
from lowbit.model.quant_model import QuantModel
from lowbit.recipes.recipe import Recipe, load_recipe


class TensorBatches:
    """(x, y) batches cut from a dataset's tensors: re-iterable, no per-item overhead."""

    def __init__(self, dataset: Dataset, batch_size: int = 500, limit: int | None = None) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        self.indices = np.arange(n if limit is None else min(limit, n))
        self.dataset = dataset
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for s in range(0, len(self.indices), self.batch_size):
            yield dataset_tensors(self.dataset, self.indices[s : s + self.batch_size])


def calibration_size(train: Dataset, calibration: dict[str, Any]) -> int:
    """How many images calibrate: the recipe's count, or the whole training split when it holds fewer."""
    return min(calibration["samples"], len(train))  # type: ignore[arg-type]


def calibration_batches(train: Dataset, recipe: Recipe) -> list[torch.Tensor]:
    """The recipe's seeded calibration subset of the training split, as input batches."""
    c = recipe.calibration
    n = calibration_size(train, c)
    if n < c["samples"]:  # a small dataset of the user's: calibrate on all of it, and say so
        print(f"lowbit: note: the recipe asks for {c['samples']} calibration images, the training split holds "
              f"{len(train)}: using all of them", file=sys.stderr)
    subset = calibration_subset(train, n, c["seed"])
    x, _ = dataset_tensors(subset)
    return list(torch.split(x, c["batch_size"]))


@dataclass
class RecipeResult:
    recipe: str
    top1: float
    float_top1: float
    w_bits: float
    a_bits: float
    compression: float
    weight_compression: float
    quant_seconds: float
    eval_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "top1": round(100 * self.top1, 2), "float": round(100 * self.float_top1, 2),
            "drop_pt": round(100 * (self.float_top1 - self.top1), 2), "w_bits": round(self.w_bits, 2),
            "a_bits": round(self.a_bits, 2), "compression": round(self.compression, 2),
            "w_compression": round(self.weight_compression, 2), "quant_s": round(self.quant_seconds, 1),
            **self.extra,
        }


def score_quantized(qm: QuantModel, name: str, test: TensorBatches, float_top1: float,
                    progress: bool = False, extra: dict[str, Any] | None = None) -> RecipeResult:
    start = time.perf_counter()
    top1 = evaluate(qm, test, progress=progress, desc=f"test {name}")
    bits = qm.mean_bits()
    return RecipeResult(
        recipe=name, top1=top1, float_top1=float_top1, w_bits=bits["w_bits"], a_bits=bits["a_bits"],
        compression=qm.compression_ratio(), weight_compression=qm.compression_ratio(weights_only=True),
        quant_seconds=qm.meta.get("quantize_seconds", float("nan")), eval_seconds=time.perf_counter() - start,
        extra=dict(extra or {}),
    )


def compare_recipes(
    model: nn.Module, recipes: Sequence[str | dict[str, Any] | Recipe], train: Dataset, test: Dataset,
    test_limit: int | None = None, progress: bool = True,
    on_model: Callable[[QuantModel, RecipeResult], None] | None = None,
) -> dict[str, Any]:
    """Float top-1 and every recipe's quantized top-1, compression and wall time;
    ``on_model`` sees each scored QuantModel (e.g. to save it)."""
    test_batches = TensorBatches(test, limit=test_limit)
    float_top1 = evaluate(model, test_batches, progress=progress, desc="test float")
    results = []
    for spec in recipes:
        r = load_recipe(spec)
        calib = None if r.data_free else calibration_batches(train, r)
        qm = quantize(model, r, calib=calib, progress=progress)
        result = score_quantized(qm, r.name, test_batches, float_top1, progress=progress)
        results.append(result)
        if on_model is not None:
            on_model(qm, result)
    return {
        "float_top1": float_top1,
        "test_images": len(test_batches.indices),
        "full_test_split": test_limit is None or test_limit >= len(test),  # type: ignore[arg-type]
        "results": results,
    }
