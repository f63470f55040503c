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
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lowbit.errors import BitsError, LowbitError
from lowbit.mixed.plan import check_plan_bits
from lowbit.mixed.search import SearchResult, SearchSpace
from lowbit.model.layer_table import FLOAT_BITS
from lowbit.model.quant_layer import QuantLayer
from lowbit.model.quant_model import QuantModel
from lowbit.ptq.calibrate import calibrate_weight_quantizer
from lowbit.ptq.reconstruct import requires_grad
from lowbit.quant.codebook import CodebookQuantizer, kmeans_1d
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.quant.registry import TRAINABLE, check_kind, make_trainable, required_bits, spec_for_kind
from lowbit.quant.spec import MAX_BITS, weight_spec_at
from lowbit.recipes.recipe import Recipe, load_recipe


def hutchinson_traces(
    qm: QuantModel, x: torch.Tensor, y: torch.Tensor, samples: int = 32, batch_size: int = 256,
    seed: int = 0, progress: bool = True,
) -> dict[str, float]:
    """Tr(H_ii) of the cross-entropy loss w.r.t. each quantized layer's weight W_i, on the float
    network (``float_reference``): HAWQ-V2's per-block trace, by Hutchinson's estimator
    Tr(H_ii) = E[v_i^T H_ii v_i] over Rademacher vectors v_i, ``samples`` vectors per layer, each on
    the whole of ``x``.

    Each layer gets a vector of its own and its own block product H_ii v_i = d(g_i . v_i)/dW_i (one
    double backward per layer): one vector over all layers with H v over all weights would add the
    cross-terms v_i^T H_ij v_j of every other layer, which average to 0 but swamp a small block's
    trace (often negative on a trained network). This costs one backward per layer per vector."""
    if samples < 1:
        raise LowbitError(f"Hutchinson needs at least one sample vector, got {samples}")
    if torch.is_inference_mode_enabled():
        raise LowbitError("HAWQ's Hutchinson traces differentiate the loss twice, which torch.inference_mode() "
                          "forbids: call it outside inference_mode (torch.no_grad() is fine: it is lifted here)")
    if x.is_inference():  # made under inference_mode: autograd cannot save it for the backward
        x = x.clone()
    gen = torch.Generator().manual_seed(seed)
    names = [r.name for r in qm.layers]
    weights = [r.layer.weight for r in qm.layers]
    totals = np.zeros(len(names))
    chunks = [(x[s:s + batch_size], y[s:s + batch_size]) for s in range(0, x.shape[0], batch_size)]
    bar = tqdm(total=samples, desc="hutchinson", unit="vector", disable=not progress, leave=False)
    # (enable_grad: a caller's torch.no_grad() would otherwise leave the loss without a graph)
    with torch.enable_grad(), qm.float_reference(), requires_grad(weights, True):
        for _ in range(samples):
            vs = [(torch.randint(0, 2, w.shape, generator=gen).float() * 2 - 1).to(w.device) for w in weights]
            for cx, cy in chunks:
                loss = F.cross_entropy(qm(cx), cy) * (cx.shape[0] / x.shape[0])
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                for i, (g, w, v) in enumerate(zip(grads, weights, vs)):
                    if not g.requires_grad:  # the gradient does not depend on W_i: H_ii = 0
                        continue
                    (hv,) = torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True, allow_unused=True)
                    if hv is not None:
                        totals[i] += float((v * hv).sum())
            bar.update(1)
    bar.close()
    return {n: float(t / samples) for n, t in zip(names, totals)}


def perturbation(qm: QuantModel, name: str, bits: int, estimator: str, kind: str | None = None) -> float:
    """||Q_b(W) - W||^2 with the layer's own weight grid at ``bits`` (its range re-estimated),
    or with weight quantizer ``kind`` at ``bits`` as it would start QAT (binary, ternary and
    μL2Q forwards, TTQ's and INQ's levels) or cluster (k-means)."""
    layer = qm.layers[name].layer
    w = layer.weight.detach()
    need = required_bits(kind)
    if need is not None and bits != need:
        raise LowbitError(f"candidate {bits}:{kind}: {kind} quantizes to {need} bits only")
    spec = spec_for_kind(kind, weight_spec_at(layer.base_weight_spec, bits))
    q = UniformQuantizer(spec)
    calibrate_weight_quantizer(q, w, estimator)
    with torch.no_grad():
        if kind == "kmeans":
            values = CodebookQuantizer(spec, kmeans_1d(w.reshape(-1), 2**bits))(w)
        elif kind in (None, "uniform"):
            values = q(w)
        else:
            values = make_trainable(q, kind, "weights", weight=w).deployed_weight(w)
    return float(((values - w) ** 2).sum())


def parse_candidates(text: str, where: str = "candidate") -> list[tuple[int, str | None]]:
    """``"2,2:twn,1:xnor,3:kmeans,4"`` -> [(2, None), (2, "twn"), ...]; a bare width uses the
    recipe's own weight kind. Errors name ``where`` (the CLI passes "--candidates")."""
    out: list[tuple[int, str | None]] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        bits_text, _, kind = item.partition(":")
        try:
            bits = int(bits_text)
        except ValueError:
            raise LowbitError(f"{where} {item!r}: expected BITS or BITS:KIND, e.g. 2:twn") from None
        out.append((bits, check_kind(kind, "weights") if kind else None))
    if not out:
        raise LowbitError("no candidates given")
    check_candidates(out, where)
    return out


def check_candidates(candidates: Sequence[tuple[int, str | None]], where: str = "candidate") -> None:
    """Each option's own bits, checked before they become b_min/b_max (whose error would name those)."""
    for bits, kind in candidates:
        label = f"{bits}:{kind}" if kind else str(bits)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            raise BitsError(f"{where} {label!r}: weight bits must be 1..{MAX_BITS}, got {bits!r}")
        need = required_bits(kind)
        if need is not None and bits != need:
            raise BitsError(f"{where} {label!r}: {kind} quantizes to {need} bits only")


def is_codebook(kind: str | None) -> bool:
    """Whether weight kind ``kind`` deploys as a float table beside its codes (k-means, TTQ, INQ, LQ-Nets)."""
    return bool(getattr(TRAINABLE.get(kind or "uniform"), "deploys_to_codebook", False))


def codebook_bits(layer: QuantLayer, bits: int, kind: str | None) -> int:
    """The float table a codebook kind stores beside its b-bit codes, which a size budget must count: 32 bits
    x 2^b entries per table, one table per output channel where the kind keeps per-channel levels (LQ-Nets on
    a per-channel grid), else one per layer (k-means clusters the whole layer into one table; TTQ and INQ are
    per tensor only). 0 for a grid kind or a float layer."""
    if not is_codebook(kind) or bits >= FLOAT_BITS:
        return 0
    spec = spec_for_kind(kind, weight_spec_at(layer.base_weight_spec, bits))
    tables = layer.weight.shape[spec.ch_axis] if spec.per_channel and kind != "kmeans" else 1
    return FLOAT_BITS * 2**bits * tables


def effective_kind(recipe: Recipe, layer: QuantLayer, own: str | None, bits: int, kmeans_named: bool) -> str | None:
    """The weight kind ``layer`` at ``bits`` deploys with when the search gives it no kind of its own (a bare
    width), as ``quantize`` resolves it: the layer's own kind (an override's w_quantizer) first; else a
    `kmeans` step's codebook below 8 bits (when some layer is named kmeans, the step clusters only those:
    ``kmeans_named``); else the recipe's weights.quantizer where a `qat` step trains it. None: the uniform
    grid, also where a QAT kind cannot take the layer at ``bits`` (LQ-Nets above 4 bits, binary/ternary kinds
    at other widths, ...), which QAT then trains with LSQ on that grid (lowbit.qat.convert)."""
    from lowbit.ptq.kmeans import CLUSTER_BELOW_BITS

    if bits >= FLOAT_BITS:
        return None
    steps = [name for name, _ in recipe.steps]
    if own == "kmeans":  # (a layer named kmeans is clustered at any width)
        return own
    if own:
        kind = own
    elif "kmeans" in steps and not kmeans_named and bits < CLUSTER_BELOW_BITS:
        return "kmeans"
    elif "qat" in steps and recipe.weights.quantizer != "kmeans":  # (kmeans fine-tunes the step's codebooks only)
        kind = recipe.weights.quantizer
    else:
        return None
    return kind if kind != "uniform" and _qat_takes(layer, bits, kind) else None


def _qat_takes(layer: QuantLayer, bits: int, kind: str) -> bool:
    """Whether QAT can give ``layer`` at ``bits`` weight kind ``kind``, or falls back to LSQ (it tries the
    kind, as lowbit.qat.convert does: each kind has its own limits)."""
    need = required_bits(kind)
    if need is not None and bits != need:
        return False
    w = layer.weight.detach()
    q = UniformQuantizer(spec_for_kind(kind, weight_spec_at(layer.base_weight_spec, bits)))
    calibrate_weight_quantizer(q, w, "minmax")  # (the range does not decide: the kind's limits are on the grid)
    try:
        make_trainable(q, kind, "weights", weight=w)
    except LowbitError:
        return False
    return True


def check_size_reachable(space: SearchSpace, sizes: Sequence[Sequence[float]], budget: int,
                         options: Sequence[tuple[int, str | None]]) -> None:
    """Refuse, before the Hutchinson traces and the solver, a budget no allocation meets: every layer at its
    smallest option, codebook tables included, which ``SearchSpace.budget`` (plain b_min codes) does not
    count. Without it the solver failed with its own "infeasible" status, after the costly traces."""
    smallest = int(sum(min(s) for s in sizes))
    if budget >= smallest:
        return
    books = [f"{b}:{k}" for b, k in options if is_codebook(k)]
    tables = f" (codebook tables of {', '.join(books)} counted: 32 bits x 2^b entries per table)" if books else ""
    raise LowbitError(
        f"target unreachable: {budget} weight bits requested, but with every searchable layer at its smallest "
        f"candidate{tables} and frozen layers at their recipe bits{space.fixed_note()} the model needs "
        f"{smallest}; raise the target{' or drop the codebook candidates' if books else ''}")


def solve_allocation(
    costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[float]], budget: float,
    bops: Sequence[Sequence[float]] | None = None, bops_budget: float | None = None,
    tie_break: Sequence[Sequence[float]] | None = None,
) -> list[int]:
    """Choose one option per layer minimising the summed cost with the summed size (and
    BOPs) within budget: a 0/1 ILP solved exactly by scipy's HiGHS ``milp``. Returns the
    chosen option index per layer.

    ``tie_break`` (e.g. each option's quantization error) re-chooses, in a second ILP, the layers
    whose options all cost the same (no measured curvature) within what the other layers leave
    of the budgets: without it such a layer gets whichever width the solver meets first, often
    the lowest, and leaves budget unspent. The other layers keep their choice, so the summed
    cost stays the optimum."""
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
    # HiGHS stops at a relative gap of 1e-4 and an absolute one of 1e-6 by default: HAWQ's Omega sum is ~1e-7..1e-5,
    # so it stopped at nearly any feasible plan, and rescaled costs gave another plan. Divided by a lower bound
    # of the optimum (each layer pays at least its cheapest option), the absolute gap is <= 1e-6 of the optimum;
    # the relative gap is asked to be 0.
    res = milp(c / _cost_scale(costs), constraints=constraints, integrality=np.ones(c.size), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0.0})
    if res.status != 0 or res.x is None:
        raise _unmet(res.status, budget, bops_budget if bops is not None else None, str(res.message))
    choice = [int(np.argmax(res.x[offsets[i]:offsets[i + 1]])) for i in range(len(n_opts))]
    if tie_break is None:
        return choice
    if [len(t) for t in tie_break] != n_opts:
        raise LowbitError("tie_break needs one value per option")
    flat = [i for i in range(len(n_opts)) if n_opts[i] > 1 and min(costs[i]) == max(costs[i])]
    if flat:
        rest = [i for i in range(len(n_opts)) if i not in flat]
        use_bops = bops is not None and bops_budget is not None
        again = solve_allocation(
            [tie_break[i] for i in flat], [sizes[i] for i in flat], budget - sum(sizes[i][choice[i]] for i in rest),
            [bops[i] for i in flat] if use_bops else None,  # type: ignore[index]
            bops_budget - sum(bops[i][choice[i]] for i in rest) if use_bops else None)  # type: ignore[index,operator]
        for i, k in zip(flat, again):
            choice[i] = k
    return choice


def _cost_scale(costs: Sequence[Sequence[float]]) -> float:
    """A positive unit for the ILP's costs: the sum of each layer's cheapest option (a lower bound of any
    allocation's cost), else the largest |cost| (every layer has a free option, or costs are negative), else 1."""
    floor = float(sum(min(float(x) for x in v) for v in costs))
    if floor > 0 and np.isfinite(floor):
        return floor
    top = float(max(abs(float(x)) for v in costs for x in v))
    return top if top > 0 and np.isfinite(top) else 1.0


MILP_INFEASIBLE = 2  # scipy.optimize.milp's status for "no solution satisfies the constraints"


def _unmet(status: int, budget: float, bops_budget: float | None, message: str) -> LowbitError:
    """The solver's failure in the budget's terms (its own message says "HiGHS Status 8" and no more)."""
    caps = f"{budget:.0f} weight bits" + (f" and {bops_budget:.4g} BOPs" if bops_budget is not None else "")
    if status == MILP_INFEASIBLE:
        bops = " or lower the BOPs ratio" if bops_budget is not None else ""
        return LowbitError(f"the budget cannot be met: no choice of one option per layer fits the budget of {caps}; "
                           f"raise the target{bops}, or add smaller candidates")
    return LowbitError(f"no bit allocation fits the budget of {caps}: the solver stopped ({message})")


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


DEFAULT_B_MIN, DEFAULT_B_MAX = 2, 8


def _width_range(b_min: int | None, b_max: int | None,
                 candidates: Sequence[tuple[int, str | None]] | None) -> tuple[int, int]:
    """b_min..b_max (default 2..8), or the candidates' own range. A width given beside candidates would be
    ignored (the candidates replace them), so it is refused, also when it equals the default: the CLI
    passes --b-min/--b-max only when they were typed."""
    if not candidates:
        return (DEFAULT_B_MIN if b_min is None else b_min), (DEFAULT_B_MAX if b_max is None else b_max)
    given = [f"{n}={v}" for n, v in (("b_min", b_min), ("b_max", b_max)) if v is not None]
    if given:
        raise LowbitError(f"{' and '.join(given)} given with candidates, which replace the widths b_min..b_max: "
                          "give one or the other (the candidates' own widths set the range)")
    check_candidates(candidates)
    return min(b for b, _ in candidates), max(b for b, _ in candidates)


def hawq_search(
    model: nn.Module, recipe: str | Path | dict[str, Any] | Recipe, calib: tuple[torch.Tensor, torch.Tensor],
    target_ratio: float | None = None, target_bits: float | None = None, b_max: int | None = None,
    b_min: int | None = None, bops_ratio: float | None = None, samples: int = 32, trace_images: int = 256,
    traces: dict[str, float] | None = None, progress: bool = True,
    candidates: Sequence[tuple[int, str | None]] | None = None,
) -> SearchResult:
    """Weight bits per searchable layer in [b_min, b_max] (default 2..8) by ILP; activations keep the
    recipe's bits, and layers that first_last_bits or an override's w_bits fix keep theirs
    (counted in the size). ``bops_ratio`` also caps bit-operations (MACs x w_bits x a_bits) at
    the B_max model's BOPs divided by this ratio. ``traces`` reuses earlier estimates.
    ``candidates`` replaces the widths b_min..b_max by (bits, weight kind) options, so one
    plan may mix kinds (2-bit ternary here, 3-bit k-means there; kind None = the recipe's);
    the plan names each layer's kind. A bare width is sized and scored with the kind the layer
    deploys with (``effective_kind``: an override's, a `kmeans` step's, the recipe's QAT kind), and a
    codebook's centroids count in its size."""
    from lowbit.api import prepare

    start = time.perf_counter()
    if torch.is_inference_mode_enabled():  # (torch.no_grad() is lifted for the traces; inference mode cannot be)
        raise LowbitError("hawq_search differentiates the loss twice for its Hessian traces, which "
                          "torch.inference_mode() forbids: call it outside inference_mode")
    r = load_recipe(recipe)
    b_min, b_max = _width_range(b_min, b_max, candidates)
    space = SearchSpace.build(model, r, b_min, b_max, "weights")
    budget = space.budget(target_ratio, target_bits)
    top = space.start()                                          # every searchable layer at b_max
    qm = prepare(model, r.with_plan(top))
    options = list(candidates) if candidates else [(b, None) for b in range(b_min, b_max + 1)]
    for b, _ in options:
        check_plan_bits(b, "candidate bits")
    layer_opts = [options if row.name in space.searchable else [(space.base.layers[row.name]["w_bits"], None)]
                  for row in qm.layers]
    # the kind each option deploys with: a bare width is the layer's own, the kmeans step's or the recipe's kind,
    # which its size (codebook tables) and its perturbation must count, not the plain uniform grid
    kmeans_named = any(b.get("w_quantizer") == "kmeans" for b in space.base.layers.values())
    kinds = [[k if k is not None else effective_kind(r, row.layer, space.base.layers[row.name].get("w_quantizer"), b,
                                                     kmeans_named)
              for b, k in opts] for row, opts in zip(qm.layers, layer_opts)]
    sizes = [[row.params * b + codebook_bits(row.layer, b, k) for (b, _), k in zip(opts, ks)]
             for row, opts, ks in zip(qm.layers, layer_opts, kinds)]
    check_size_reachable(space, sizes, budget,
                         sorted({(b, k) for opts, ks in zip(layer_opts, kinds) for (b, _), k in zip(opts, ks)},
                                key=lambda o: (o[0], o[1] or "")))
    x, y = calib
    with torch.no_grad(), qm.float_reference():
        qm(x[:2])                                                # fills each layer's MAC count
    if traces is None:
        traces = hutchinson_traces(qm, x[:trace_images], y[:trace_images], samples=samples,
                                   seed=r.calibration["seed"], progress=progress)
    estimator = r.weights.estimator if r.weights.estimator in ("mse", "minmax", "cosine") else "mse"
    flat = [n for n in space.searchable if traces[n] <= 0]
    if flat:
        warnings.warn(f"Hutchinson trace estimate <= 0 for {len(flat)} layer(s) ({', '.join(flat[:3])}"
                      f"{' ...' if len(flat) > 3 else ''}): no measured curvature, so their bits follow the "
                      "quantization error alone, with the budget the other layers leave (more "
                      "--hutchinson-samples or trace images give a better estimate)", stacklevel=2)
    costs, errors, bops = [], [], []
    for row, opts, ks in zip(qm.layers, layer_opts, kinds):
        if row.name in space.searchable:
            # A small negative estimate is sampling noise around a flat direction: treat it as 0.
            curvature = max(traces[row.name], 0.0) / row.params
            error = [perturbation(qm, row.name, b, estimator, k) for (b, _), k in zip(opts, ks)]
            omega = [curvature * e for e in error]
        else:
            omega = error = [0.0]
        costs.append(omega)
        errors.append(error)
        bops.append([(row.macs or 0) * b * row.a_bits for b, _ in opts])
    bops_budget = None
    if bops_ratio is not None:
        full = sum((row.macs or 0) * top.layers[row.name]["w_bits"] * row.a_bits for row in qm.layers)
        bops_budget = full / bops_ratio
    # ties (a flat layer costs 0 at every width) go to the least quantization error the budget allows
    choice = solve_allocation(costs, sizes, budget, bops if bops_budget else None, bops_budget, tie_break=errors)
    plan = top
    for row, k in zip(qm.layers, choice):
        if row.name in space.searchable:
            bits, kind = options[k]
            plan = space.with_bits(plan, row.name, bits)
            if kind is not None:
                plan.layers[row.name]["w_quantizer"] = kind
    if not kmeans_named and any(b.get("w_quantizer") == "kmeans" for b in plan.layers.values()):
        # a plan naming kmeans makes the `kmeans` step cluster only the layers named: name the ones it would
        # have clustered too (costed and sized as codebooks above), else they would deploy on the uniform grid
        for row, k, ks in zip(qm.layers, choice, kinds):
            if ks[k] == "kmeans":
                plan.layers[row.name]["w_quantizer"] = "kmeans"
    settings = {"method": "hawq", "recipe": r.to_dict(), "budget_bits": budget, "b_min": b_min, "b_max": b_max,
                "bops_ratio": bops_ratio, "hutchinson_samples": samples,
                "candidates": [f"{b}:{k}" if k else str(b) for b, k in options], "trace_images": min(trace_images, int(x.shape[0]))}
    final = space.final_plan(plan, method="hawq", budget_bits=budget)
    path = [{**space.summary(plan), "plan": plan.layers, "traces": traces,
             "sensitivity": {row.name: c for row, c in zip(qm.layers, costs)}}]
    return SearchResult("hawq", final, budget, settings, path, calibrations=0, seconds=time.perf_counter() - start)
