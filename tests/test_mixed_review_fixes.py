"""Mixed-precision search: the mistakes a code review of HAWQ, MSQ's search space and plan files found, each
pinned down (the ILP's stopping gap, per-layer Hessian traces, weight kinds in HAWQ's costs, frozen layers'
inputs under lower both, plans and shared inputs, duplicate plan keys, grad modes, b_min/b_max with
candidates, budget rounding)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
import lowbit.mixed.hawq as hawq
from lowbit.errors import LowbitError, RecipeError
from lowbit.mixed.hawq import brute_force_allocation, hawq_search, hutchinson_traces, solve_allocation
from lowbit.mixed.msq import msq_search
from lowbit.mixed.plan import Plan, load_plan
from lowbit.mixed.search import SearchSpace
from lowbit.recipes.recipe import load_recipe
from tests.test_search_overrides import RECIPE, tiny_data, tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def unit_traces(model: nn.Module, recipe: dict) -> dict[str, float]:
    return {r.name: 1.0 for r in lowbit.api.prepare(model, recipe).layers}


def too_late(*args, **kwargs):
    raise AssertionError("the Hessian traces ran: the mistake was not caught up front")


class TwoHeads(nn.Module):
    """Two Linear layers reading one tensor (one activation quantizer between them)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class Stem(nn.Module):
    """Two convs read the network input (an Inception / ResNet-D style stem): 'a' is the first layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.c, self.fc = nn.Conv2d(4, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x) + self.b(x))
        return self.fc(torch.relu(self.c(h)).mean((2, 3)))


# -- 1. the ILP solves to optimality whatever the unit of the costs --------------------------------------------
def hawq_like_problem(seed: int, layers: int = 6, bits: tuple[int, ...] = (2, 3, 4, 5)):
    """HAWQ-shaped costs (trace x 4^-b, so each bit quarters the error) and sizes params x bits."""
    rng = np.random.default_rng(seed)
    params = rng.integers(20, 400, layers)
    traces = 10 ** rng.uniform(-1, 2, layers)
    costs = [[float(t * 4.0**-b * rng.uniform(0.8, 1.2)) for b in bits] for t in traces]
    sizes = [[int(p * b) for b in bits] for p in params]
    budget = int(rng.uniform(2.6, 4.4) * params.sum())
    return costs, sizes, budget


@pytest.mark.parametrize("seed", range(4))
def test_ilp_plan_is_the_optimum_at_any_cost_scale(seed):
    costs, sizes, budget = hawq_like_problem(seed)
    best, best_cost = brute_force_allocation(costs, sizes, budget)
    plans = {}
    for scale in (1.0, 1e-6):   # HAWQ's own Omega sums are ~1e-7..1e-5
        choice = solve_allocation([[c * scale for c in row] for row in costs], sizes, budget)
        assert sum(sizes[i][k] for i, k in enumerate(choice)) <= budget
        plans[scale] = choice
        got = sum(costs[i][k] for i, k in enumerate(choice))
        assert got == pytest.approx(best_cost, rel=1e-6), (scale, choice, best)
    assert plans[1.0] == plans[1e-6] == best


def test_ilp_still_handles_free_and_negative_costs():
    # every layer has a free option (the sum of the cheapest is 0), and negative costs: the argmin is unchanged
    for costs in ([[0.0, 1e-9, 3e-9], [0.0, 2e-9, 5e-9]], [[-3.0, -1.0, 0.0], [-2.0, 0.5, 1.0]]):
        sizes = [[3, 2, 1], [3, 2, 1]]
        best, best_cost = brute_force_allocation(costs, sizes, 4)
        choice = solve_allocation(costs, sizes, 4)
        assert sum(costs[i][k] for i, k in enumerate(choice)) == pytest.approx(best_cost)


# -- 2. Hutchinson: each layer's own block trace Tr(H_ii), without the other layers' cross-terms ---------------
def relu_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return model, x, y


def exact_block_traces(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    params = dict(model.named_parameters())
    out = {}
    for layer in ("0", "2", "4"):
        key = f"{layer}.weight"

        def loss(w: torch.Tensor, key: str = key) -> torch.Tensor:
            logits = torch.func.functional_call(model, {**{k: v.detach() for k, v in params.items()}, key: w}, (x,))
            return nn.functional.cross_entropy(logits, y)

        w0 = params[key].detach()
        out[layer] = float(torch.autograd.functional.hessian(loss, w0).reshape(w0.numel(), -1).trace())
    return out


def test_hutchinson_estimates_each_layers_own_block_trace():
    model, x, y = relu_mlp()
    qm = lowbit.api.prepare(model, {"extends": "w8a8", "first_last_bits": None})
    exact = exact_block_traces(model, x, y)
    est = hutchinson_traces(qm, x, y, samples=200, progress=False)
    for name in exact:   # one vector across all layers put layer 0 45% off here, from layers 2 and 4's cross-terms
        assert est[name] == pytest.approx(exact[name], rel=0.15), (name, est[name], exact[name])
    # a ReLU network is piecewise linear in one layer's weights, so with cross-entropy H_ii = J^T H_CE J is PSD:
    # every single vector's v^T H_ii v is >= 0 (the shared vector gave negatives, e.g. -0.85 on layer 0)
    for seed in range(10):
        single = hutchinson_traces(qm, x, y, samples=1, seed=seed, progress=False)
        assert min(single.values()) >= 0, (seed, single)


# -- 3. a bare width is sized and scored with the kind the layer deploys with ----------------------------------
def deployed_bits(qm) -> int:
    """Codes plus the float tables codebook layers store beside them."""
    codes = sum(r.params * r.w_bits for r in qm.layers)
    tables = sum(r.layer.weight_quantizer.param_bits() for r in qm.layers if r.quantizer == "kmeans")
    return codes + tables


@pytest.mark.parametrize("recipe, clustered", [
    ({**RECIPE, "steps": ["calibrate", "kmeans"]}, ["2", "4", "6"]),                  # the step clusters <8 bits
    ({**RECIPE, "steps": ["calibrate", "kmeans"], "overrides": [{"pattern": "4", "w_quantizer": "kmeans"}]}, ["4"]),
])
def test_hawq_budget_counts_the_codebooks_a_kmeans_recipe_deploys(recipe, clustered):
    model, (x, y) = tiny_model(), tiny_data()
    res = hawq_search(model, recipe, (x[:48], y[:48]), target_bits=3.3, b_max=4, b_min=2,
                      traces=unit_traces(model, recipe), progress=False)
    qm = lowbit.quantize(model, load_recipe(recipe).with_plan(res.plan), calib=x[:48], progress=False)
    assert sorted(r.name for r in qm.layers if r.quantizer == "kmeans") == clustered
    assert deployed_bits(qm) <= res.budget_bits, (res.plan.layers, deployed_bits(qm), res.budget_bits)
    # ... and scored by the k-means error (unit traces: Omega = error / n), not the uniform grid's
    est = lowbit.api.prepare(model, recipe)
    expect = [hawq.perturbation(est, "4", b, "mse", "kmeans") / est.layers["4"].params for b in (2, 3, 4)]
    assert res.path[0]["sensitivity"]["4"] == pytest.approx(expect, rel=1e-6)


def test_hawq_names_kmeans_on_every_layer_the_step_clusters_when_a_candidate_names_it():
    # a plan naming kmeans makes the step cluster the named layers only: bare widths it costed as k-means too
    recipe = {**RECIPE, "steps": ["calibrate", "kmeans"]}
    model, (x, y) = tiny_model(), tiny_data()
    res = hawq_search(model, recipe, (x[:48], y[:48]), target_bits=4.0,
                      candidates=[(2, None), (3, "kmeans"), (4, None)], traces=unit_traces(model, recipe), progress=False)
    qm = lowbit.quantize(model, load_recipe(recipe).with_plan(res.plan), calib=x[:48], progress=False)
    assert [r.quantizer for r in qm.layers if r.name in ("2", "4", "6")] == ["kmeans"] * 3, res.plan.layers
    assert deployed_bits(qm) <= res.budget_bits


def test_hawq_counts_the_tables_of_the_recipes_codebook_qat_kind_up_front(monkeypatch):
    recipe = {**RECIPE, "weights": {"quantizer": "lqnet"}, "steps": ["calibrate", {"qat": {"epochs": 1}}]}
    model, (x, y) = tiny_model(), tiny_data()
    space = SearchSpace.build(model, load_recipe(recipe), 2, 4)
    plain = space.weight_bits(space.uniform(2))
    tables = sum(32 * 2**2 * lowbit.api.prepare(model, recipe).layers[n].layer.weight.shape[0]  # per channel
                 for n in space.searchable)
    monkeypatch.setattr(hawq, "hutchinson_traces", too_late)
    with pytest.raises(LowbitError, match=rf"target unreachable: .*2:lqnet.*the model needs {plain + tables};"):
        hawq_search(model, recipe, (x[:48], y[:48]), target_bits=(plain + tables // 2) / space.total_params(),
                    b_min=2, b_max=4, progress=False)


# -- 4. lower both: a frozen layer's input keeps its bits, also where a searchable layer shares it -------------
def test_lower_both_keeps_a_frozen_first_layers_input_bits():
    recipe = load_recipe(RECIPE)
    space = SearchSpace.build(Stem().eval(), recipe, 2, 6, lower="both")
    assert space.shared_inputs == [["a", "b"]] and space.searchable == ["b", "c"]
    plan = space.start()
    assert plan.layers["a"] == {"w_bits": 8, "a_bits": 8} and plan.layers["b"] == {"w_bits": 6, "a_bits": 8}
    lowered = space.with_bits(plan, "b", 2)
    assert lowered.layers["a"] == {"w_bits": 8, "a_bits": 8} and lowered.layers["b"] == {"w_bits": 2, "a_bits": 8}
    assert space.with_bits(lowered, "c", 3).layers["c"] == {"w_bits": 3, "a_bits": 3}  # unshared ones still move
    qm = lowbit.api.prepare(Stem().eval(), recipe.with_plan(lowered))
    assert (qm.layers["a"].a_bits, qm.layers["b"].w_bits) == (8, 2)


def test_msq_lower_both_leaves_the_network_input_at_first_last_bits():
    x, y = tiny_data()
    res = msq_search(Stem().eval(), RECIPE, (x[:48], y[:48]), (x[48:], y[48:]), target_bits=4.0, b_max=6, b_min=2,
                     lower="both", augment=False, progress=False)
    assert res.plan.layers["a"]["a_bits"] == 8 and res.plan.layers["b"]["a_bits"] == 8, res.plan.layers
    qm = lowbit.quantize(Stem().eval(), load_recipe(RECIPE).with_plan(res.plan), calib=x[:48], progress=False)
    assert qm.layers["a"].a_bits == 8


# -- 5. a plan's a_bits on some readers of a shared tensor only --------------------------------------------------
def test_plan_a_bits_on_one_reader_of_a_shared_tensor_is_refused():
    recipe = {"extends": "w8a8", "first_last_bits": None}
    with pytest.raises(LowbitError, match=r"a_bits 4 to 'a', but 'b' \(at 8\) read\(s\) the same tensor"):
        lowbit.api.prepare(TwoHeads(), {**recipe, "plan": {"a": {"a_bits": 4}}})
    with pytest.raises(LowbitError, match="'b' .at 8. read.s. the same tensor"):   # listed, but without a_bits
        lowbit.api.prepare(TwoHeads(), {**recipe, "plan": {"a": {"a_bits": 4}, "b": {"w_bits": 4}}})
    # the other reader already at those bits, or given them too: nothing changes silently
    qm = lowbit.api.prepare(TwoHeads(), {**recipe, "plan": {"a": {"a_bits": 8, "w_bits": 4}}})
    assert (qm.layers["a"].w_bits, qm.layers["b"].a_bits) == (4, 8)
    qm = lowbit.api.prepare(TwoHeads(), {**recipe, "plan": {"a": {"a_bits": 4}, "b": {"a_bits": 4}}})
    assert (qm.layers["a"].a_bits, qm.layers["b"].a_bits) == (4, 4)


# -- 6. a plan file listing a layer twice ---------------------------------------------------------------------
@pytest.mark.parametrize("text, key", [
    ('{"format": "lowbit-plan/1", "layers": {"2": {"w_bits": 2}, "2": {"w_bits": 8}}}', "'2'"),
    ('{"2": {"w_bits": 2, "w_bits": 6}}', "'w_bits'"),
])
def test_plan_file_with_a_repeated_key_is_refused(tmp_path, text, key):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(RecipeError, match=f"plan file .*plan.json: key {key} appears twice"):
        load_plan(path)
    good = tmp_path / "good.json"
    Plan({"2": {"w_bits": 2}, "4": {"w_bits": 6}}).save(good)
    assert load_plan(good).layers == json.loads(good.read_text())["layers"]


# -- 7. grad modes ------------------------------------------------------------------------------------------------
def test_hawq_runs_inside_no_grad_and_refuses_inference_mode():
    model, (x, y) = tiny_model(), tiny_data()
    kwargs = dict(target_bits=4.0, b_max=6, samples=1, trace_images=16, progress=False)
    free = hawq_search(model, RECIPE, (x[:48], y[:48]), **kwargs)
    with torch.no_grad():
        inside = hawq_search(model, RECIPE, (x[:48], y[:48]), **kwargs)
    assert inside.plan.layers == free.plan.layers
    assert inside.path[0]["traces"] == pytest.approx(free.path[0]["traces"])
    with torch.inference_mode():
        with pytest.raises(LowbitError, match="inference_mode"):
            hawq_search(model, RECIPE, (x[:48], y[:48]), **kwargs)
        with pytest.raises(LowbitError, match="inference_mode"):
            hutchinson_traces(lowbit.api.prepare(model, RECIPE), x[:16], y[:16], samples=1, progress=False)


# -- 8. candidates with explicit b_min / b_max --------------------------------------------------------------------
def test_hawq_refuses_widths_that_candidates_would_override(monkeypatch):
    model, (x, y) = tiny_model(), tiny_data()
    monkeypatch.setattr(hawq, "hutchinson_traces", too_late)
    candidates = [(2, None), (3, "kmeans"), (4, None)]
    for widths, named in (({"b_min": 3}, "b_min=3"), ({"b_max": 6}, "b_max=6"), ({"b_min": 1, "b_max": 3}, "b_min=1"),
                          ({"b_min": 2, "b_max": 8}, "b_min=2 and b_max=8")):  # the defaults, typed, are ignored too
        with pytest.raises(LowbitError, match=f"{named}.* given with candidates"):
            hawq_search(model, RECIPE, (x[:48], y[:48]), target_bits=4.0, candidates=candidates, progress=False,
                        **widths)
    # no widths: the candidates' own range
    traces = unit_traces(model, RECIPE)
    res = hawq_search(model, RECIPE, (x[:48], y[:48]), target_bits=4.0, candidates=candidates, traces=traces,
                      progress=False)
    assert (res.settings["b_min"], res.settings["b_max"]) == (2, 4)
    res = hawq_search(model, RECIPE, (x[:48], y[:48]), target_bits=4.0, traces=traces, progress=False)
    assert (res.settings["b_min"], res.settings["b_max"]) == (2, 8)


# -- 9. a target read off a plan gives that plan's size as the budget ---------------------------------------------
def test_budget_of_a_plans_own_ratio_or_mean_bits_is_its_size():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        n = int(rng.integers(1_000, 30_000_000))
        size = int(rng.integers(n, 8 * n + 1))
        space = SearchSpace(["l"], {"l": n}, Plan({"l": {"w_bits": 8}}), ["l"], 1, 8)
        assert space.budget(target_ratio=32 * n / size) == size, (n, size)
        assert space.budget(target_bits=size / n) == size, (n, size)
    space = SearchSpace(["l"], {"l": 268336}, Plan({"l": {"w_bits": 8}}), ["l"], 1, 8)
    assert space.budget(target_ratio=6.3846959170077096) == 1344896   # ResNet-20 at 5 bits: it gave 1344895
    for bad in (float("inf"), float("nan")):
        with pytest.raises(LowbitError, match="must be a finite number"):
            space.budget(target_bits=bad)
