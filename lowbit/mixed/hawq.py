"""HAWQ-style allocation: Hessian traces by Hutchinson's estimator, bits by an integer
linear program (scipy's ``milp``) under a size budget and, optionally, a BOPs budget.

Sensitivity of layer i at b bits (HAWQ-v2/v3): Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2,
the second-order loss increase of the weight perturbation if the Hessian block of the
layer were its mean eigenvalue times the identity. The ILP picks one width per layer
minimising the summed sensitivity.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lowbit.errors import LowbitError
from lowbit.mixed.plan import Plan
from lowbit.mixed.search import SearchResult, SearchSpace
from lowbit.model.quant_model import QuantModel
from lowbit.ptq.calibrate import calibrate_weight_quantizer
from lowbit.ptq.reconstruct import requires_grad
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.quant.spec import weight_spec_at
from lowbit.recipes.recipe import Recipe, load_recipe


def hutchinson_traces(
    qm: QuantModel, x: torch.Tensor, y: torch.Tensor, samples: int = 32, batch_size: int = 256,
    seed: int = 0, progress: bool = True,
) -> dict[str, float]:
    """Tr(H_i) of the cross-entropy loss w.r.t. each quantized layer's weight, on the float
    network (``float_reference``): the mean of v^T H v over Rademacher vectors v, with H v
    from double backpropagation. ``samples`` vectors, each on the whole of ``x``."""
    if samples < 1:
        raise LowbitError(f"Hutchinson needs at least one sample vector, got {samples}")
    gen = torch.Generator().manual_seed(seed)
    names = [r.name for r in qm.layers]
    weights = [r.layer.weight for r in qm.layers]
    totals = np.zeros(len(names))
    chunks = [(x[s:s + batch_size], y[s:s + batch_size]) for s in range(0, x.shape[0], batch_size)]
    bar = tqdm(total=samples, desc="hutchinson", unit="vector", disable=not progress, leave=False)
    with qm.float_reference(), requires_grad(weights, True):
        for _ in range(samples):
            vs = [torch.randint(0, 2, w.shape, generator=gen).float() * 2 - 1 for w in weights]
            for cx, cy in chunks:
                loss = F.cross_entropy(qm(cx), cy) * (cx.shape[0] / x.shape[0])
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                hv = torch.autograd.grad(grads, weights, grad_outputs=vs)
                totals += np.array([float((v * h).sum()) for v, h in zip(vs, hv)])
            bar.update(1)
    bar.close()
    return {n: float(t / samples) for n, t in zip(names, totals)}


def perturbation(qm: QuantModel, name: str, bits: int, estimator: str) -> float:
    """||Q_b(W) - W||^2 with the layer's own weight grid at ``bits`` (its range re-estimated)."""
    layer = qm.layers[name].layer
    q = UniformQuantizer(weight_spec_at(layer.base_weight_spec, bits))
    w = layer.weight.detach()
    calibrate_weight_quantizer(q, w, estimator)
    return float(((q(w) - w) ** 2).sum())


def solve_allocation(
    costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[float]], budget: float,
    bops: Sequence[Sequence[float]] | None = None, bops_budget: float | None = None,
) -> list[int]:
    """Choose one option per layer minimising the summed cost with the summed size (and
    BOPs) within budget: a 0/1 ILP solved exactly by scipy's HiGHS ``milp``. Returns the
    chosen option index per layer."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_opts = [len(c) for c in costs]
    if any(n == 0 for n in n_opts) or [len(s) for s in sizes] != n_opts:
        raise LowbitError("every layer needs at least one option, with a cost and a size per option")
    c = np.concatenate([np.asarray(v, dtype=float) for v in costs])
    offsets = np.cumsum([0] + n_opts)
    one_hot = np.zeros((len(n_opts), c.size))
    for i in range(len(n_opts)):
        one_hot[i, offsets[i]:offsets[i + 1]] = 1
    constraints = [LinearConstraint(one_hot, 1, 1),
                   LinearConstraint(np.concatenate([np.asarray(v, float) for v in sizes])[None, :], -np.inf, budget)]
    if bops is not None and bops_budget is not None:
        constraints.append(LinearConstraint(np.concatenate([np.asarray(v, float) for v in bops])[None, :],
                                            -np.inf, bops_budget))
    res = milp(c, constraints=constraints, integrality=np.ones(c.size), bounds=Bounds(0, 1))
    if res.status != 0 or res.x is None:
        raise LowbitError(f"no bit allocation fits the budget ({res.message})")
    return [int(np.argmax(res.x[offsets[i]:offsets[i + 1]])) for i in range(len(n_opts))]


def brute_force_allocation(
    costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[float]], budget: float,
) -> tuple[list[int], float]:
    """Exhaustive search (for checking the ILP on tiny problems)."""
    best: tuple[list[int], float] | None = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        if sum(sizes[i][k] for i, k in enumerate(choice)) > budget:
            continue
        total = sum(costs[i][k] for i, k in enumerate(choice))
        if best is None or total < best[1]:
            best = (list(choice), total)
    if best is None:
        raise LowbitError("no allocation fits the budget")
    return best


def hawq_search(
    model: nn.Module, recipe: str | Path | dict[str, Any] | Recipe, calib: tuple[torch.Tensor, torch.Tensor],
    target_ratio: float | None = None, target_bits: float | None = None, b_max: int = 8, b_min: int = 2,
    bops_ratio: float | None = None, samples: int = 32, trace_images: int = 256,
    traces: dict[str, float] | None = None, progress: bool = True,
) -> SearchResult:
    """Weight bits per searchable layer in [b_min, b_max] by ILP; activations keep the
    recipe's bits. ``bops_ratio`` also caps bit-operations (MACs x w_bits x a_bits) at
    the B_max model's BOPs divided by this ratio. ``traces`` reuses earlier estimates."""
    from lowbit.api import prepare

    start = time.perf_counter()
    r = load_recipe(recipe)
    space = SearchSpace.build(model, r, b_min, b_max, "weights")
    budget = space.budget(target_ratio, target_bits)
    top = space.start()                                          # every searchable layer at b_max
    qm = prepare(model, r.with_plan(top))
    x, y = calib
    with torch.no_grad(), qm.float_reference():
        qm(x[:2])                                                # fills each layer's MAC count
    if traces is None:
        traces = hutchinson_traces(qm, x[:trace_images], y[:trace_images], samples=samples,
                                   seed=r.calibration["seed"], progress=progress)
    options = list(range(b_min, b_max + 1))
    estimator = r.weights.estimator if r.weights.estimator in ("mse", "minmax", "cosine") else "mse"
    costs, sizes, bops = [], [], []
    for row in qm.layers:
        if row.name in space.searchable:
            bits = options
            # A small negative estimate is sampling noise around a flat direction: treat it as 0.
            curvature = max(traces[row.name], 0.0) / row.params
            omega = [curvature * perturbation(qm, row.name, b, estimator) for b in bits]
        else:
            bits = [space.base.layers[row.name]["w_bits"]]
            omega = [0.0]
        costs.append(omega)
        sizes.append([row.params * b for b in bits])
        bops.append([(row.macs or 0) * b * row.a_bits for b in bits])
    bops_budget = None
    if bops_ratio is not None:
        full = sum((row.macs or 0) * top.layers[row.name]["w_bits"] * row.a_bits for row in qm.layers)
        bops_budget = full / bops_ratio
    choice = solve_allocation(costs, sizes, budget, bops if bops_budget else None, bops_budget)
    plan = top
    for row, k in zip(qm.layers, choice):
        if row.name in space.searchable:
            plan = space.with_bits(plan, row.name, options[k])
    settings = {"method": "hawq", "recipe": r.to_dict(), "budget_bits": budget, "b_min": b_min, "b_max": b_max,
                "bops_ratio": bops_ratio, "hutchinson_samples": samples, "trace_images": min(trace_images, int(x.shape[0]))}
    final = Plan(plan.layers, {"method": "hawq", "budget_bits": budget, **space.summary(plan)})
    path = [{**space.summary(plan), "plan": plan.layers, "traces": traces,
             "sensitivity": {row.name: c for row, c in zip(qm.layers, costs)}}]
    return SearchResult("hawq", final, budget, settings, path, calibrations=0, seconds=time.perf_counter() - start)
