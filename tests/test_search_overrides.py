"""Mixed-precision searches and the recipe's per-layer overrides; HAWQ's size budget with codebook candidates."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit.mixed.hawq as hawq
from lowbit.errors import LowbitError
from lowbit.mixed.hawq import hawq_search, solve_allocation
from lowbit.mixed.msq import msq_search
from lowbit.mixed.search import SearchSpace
from lowbit.recipes.recipe import load_recipe
from tests.test_mixed import TwoHeads

RECIPE = {"extends": "w4a8", "name": "tiny", "calibration": {"samples": 48, "batch_size": 48, "seed": 0},
          "steps": ["calibrate"]}
FLOAT3 = {**RECIPE, "overrides": [{"pattern": "4", "w_bits": 32}]}   # keep the middle conv float


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tiny_model() -> nn.Module:
    """Layers 0, 2, 4, 6 (convs) and 10 (linear): 0 and 10 frozen by first_last_bits."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).eval()


def tiny_data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % 3
    x[:, 0, :2, :2] += y[:, None, None].float() * 2
    return x, y


def unit_traces(space: SearchSpace) -> dict[str, float]:
    return {n: 1.0 for n in space.names}


def too_late(*args, **kwargs):
    raise AssertionError("traces or calibration ran: the budget was not checked up front")


# -- 1. layers an override fixes are not searched --------------------------------------------------------------
def test_an_override_fixed_layer_is_not_searchable_and_counts_at_its_bits():
    space = SearchSpace.build(tiny_model(), load_recipe(FLOAT3), 2, 8)
    assert space.searchable == ["2", "6"] and space.fixed_w == ["4"]
    assert space.start().layers["4"]["w_bits"] == 32
    assert space.uniform(2).layers["4"]["w_bits"] == 32
    # the budget is the whole model's mean: the float layer counts 32 bits per weight
    p = space.params
    assert space.weight_bits(space.uniform(2)) == 8 * (p["0"] + p["10"]) + 32 * p["4"] + 2 * (p["2"] + p["6"])


def test_msq_keeps_an_override_fixed_layer_at_its_bits():
    model, (x, y) = tiny_model(), tiny_data()
    space = SearchSpace.build(model, load_recipe(FLOAT3), 2, 8)
    target = (space.weight_bits(space.uniform(2)) + space.weight_bits(space.start())) / 2 / space.total_params()
    res = msq_search(model, FLOAT3, (x[:48], y[:48]), (x[48:], y[48:]), target_bits=target, b_max=8, b_min=2,
                     augment=False, progress=False)
    assert res.plan.layers["4"]["w_bits"] == 32, res.plan.layers
    assert space.weight_bits(res.plan) <= res.budget_bits
    assert all(step["lowered"] != "4" for step in res.path)


def test_hawq_keeps_an_override_fixed_layer_at_its_bits():
    model, (x, y) = tiny_model(), tiny_data()
    space = SearchSpace.build(model, load_recipe(FLOAT3), 2, 8)
    res = hawq_search(model, FLOAT3, (x[:48], y[:48]), target_bits=12.0, traces=unit_traces(space), progress=False)
    assert res.plan.layers["4"]["w_bits"] == 32, res.plan.layers
    assert space.weight_bits(res.plan) <= res.budget_bits


@pytest.mark.parametrize("method", ["msq", "hawq"])
def test_fixed_layers_that_make_the_target_unreachable_are_named_up_front(monkeypatch, method):
    # 3 mean bits would be reachable with layer 4 searchable; kept float it alone needs 32 x 576 bits
    monkeypatch.setattr(hawq, "hutchinson_traces", too_late)
    monkeypatch.setattr("lowbit.api.quantize", too_late)
    model, (x, y) = tiny_model(), tiny_data()
    needs = SearchSpace.build(model, load_recipe(FLOAT3), 2, 8)
    needs = needs.weight_bits(needs.uniform(2))
    with pytest.raises(LowbitError, match=rf"target unreachable: .*overrides fix '4' at 32\) the model needs {needs}"):
        if method == "msq":
            msq_search(model, FLOAT3, (x[:48], y[:48]), (x[48:], y[48:]), target_bits=3.0, progress=False)
        else:
            hawq_search(model, FLOAT3, (x[:48], y[:48]), target_bits=3.0, progress=False)


def test_lower_both_keeps_activation_bits_an_override_fixes():
    model = tiny_model()
    recipe = load_recipe({**RECIPE, "overrides": [{"pattern": "4", "a_bits": 5}]})
    space = SearchSpace.build(model, recipe, 2, 4, "both")
    assert "4" in space.searchable                   # its weights are still searched
    start = space.start()
    assert start.layers["4"] == {"w_bits": 4, "a_bits": 5} and start.layers["2"] == {"w_bits": 4, "a_bits": 4}
    assert space.with_bits(start, "4", 2).layers["4"] == {"w_bits": 2, "a_bits": 5}


def test_a_fixed_activation_holds_for_every_reader_of_its_tensor():
    recipe = load_recipe({"extends": "w8a8", "first_last_bits": None,
                          "overrides": [{"pattern": "[ab]", "a_bits": 8}]})
    space = SearchSpace.build(TwoHeads(), recipe, 2, 6, "both")
    lowered = space.with_bits(space.start(), "a", 4)
    assert lowered.layers == {"a": {"w_bits": 4, "a_bits": 8}, "b": {"w_bits": 6, "a_bits": 8}}


# -- 2. HAWQ: codebook tables in the smallest size, and the solver's infeasibility -----------------------------
def test_hawq_counts_codebook_tables_before_the_traces(monkeypatch):
    model, (x, y) = tiny_model(), tiny_data()
    space = SearchSpace.build(model, load_recipe(RECIPE), 3, 4)
    plain = space.weight_bits(space.uniform(3))               # what SearchSpace.budget accepts
    tables = 32 * 2**3 * len(space.searchable)                # one 8-entry k-means table per searchable layer
    monkeypatch.setattr(hawq, "hutchinson_traces", too_late)
    with pytest.raises(LowbitError, match=rf"target unreachable: .*3:kmeans.*the model needs {plain + tables};"):
        hawq_search(model, RECIPE, (x[:48], y[:48]), target_bits=(plain + tables // 2) / space.total_params(),
                    candidates=[(3, "kmeans"), (4, None)], progress=False)


def test_codebook_tables_are_per_channel_where_the_kind_keeps_per_channel_levels():
    from lowbit.api import prepare
    from lowbit.mixed.hawq import codebook_bits

    layer = prepare(tiny_model(), "w4a8").layers["2"].layer   # per-channel weights, 8 output channels
    assert codebook_bits(layer, 3, "kmeans") == 32 * 8            # k-means clusters a layer into one table
    assert codebook_bits(layer, 2, "lqnet") == 32 * 4 * 8
    assert codebook_bits(layer, 3, None) == 0


def test_solver_infeasibility_says_the_budget_cannot_be_met():
    with pytest.raises(LowbitError, match="budget cannot be met.*100 weight bits and 5 BOPs") as err:
        solve_allocation([[0.0, 1.0]], [[1, 2]], 100, bops=[[10, 20]], bops_budget=5)
    assert "HiGHS" not in str(err.value)


def test_hawq_with_an_unmet_bops_budget_says_the_budget_cannot_be_met():
    model, (x, y) = tiny_model(), tiny_data()
    space = SearchSpace.build(model, load_recipe(RECIPE), 2, 8)
    with pytest.raises(LowbitError, match="budget cannot be met"):
        hawq_search(model, RECIPE, (x[:48], y[:48]), target_bits=6.0, bops_ratio=1000.0, traces=unit_traces(space),
                    progress=False)
