"""Issue 5: plans, MSQ probes and search, HAWQ traces and the ILP, on real data."""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.errors import BitsError, LowbitError, RecipeError
from lowbit.mixed.hawq import brute_force_allocation, hawq_search, hutchinson_traces, solve_allocation
from lowbit.mixed.msq import choose_layer, msq_search
from lowbit.mixed.plan import Plan, load_plan
from lowbit.mixed.probes import probe_accuracy, pyramid_features
from lowbit.mixed.search import SearchSpace

MNIST_BACKEND = {"weights": {"bits": 4, "symmetric": False}, "activations": {"bits": 8},
                 "first_last_bits": None, "calibration": {"samples": 256, "batch_size": 128, "seed": 0}}


@pytest.fixture(scope="module")
def mnist_labelled(mnist_cnn, data_dir):
    """Disjoint labelled calibration and validation slices of the MNIST training split."""
    from lowbit.data import dataset_tensors, load_dataset

    model, _, test = mnist_cnn
    train = load_dataset("mnist", "train", data_dir=data_dir, download=False)
    calib = dataset_tensors(train, torch.arange(4000, 4256))
    val = dataset_tensors(train, torch.arange(4256, 4768))
    return model, calib, val, test


@pytest.fixture(scope="module")
def mnist_train(data_dir):
    from lowbit.data import dataset_tensors, load_dataset

    return dataset_tensors(load_dataset("mnist", "train", data_dir=data_dir, download=False), torch.arange(4000))


# -- plans ----------------------------------------------------------------------------------
def test_plan_json_round_trip_applies_through_the_layer_table(resnet20, tmp_path):
    qm = lowbit.api.prepare(resnet20, "w4a8")
    plan = Plan.from_table(qm.layers, method="hand")
    plan.layers["layer2.1.conv1"] = {"w_bits": 3, "a_bits": 6}
    path = plan.save(tmp_path / "p.json")
    loaded = load_plan(path)
    assert loaded.layers == plan.layers and loaded.meta == {"method": "hand"}
    qm2 = lowbit.api.prepare(resnet20, lowbit.recipes.recipe.load_recipe("w4a8").with_plan(loaded))
    assert qm2.layers.plan() == plan.layers
    assert qm2.layers["layer2.1.conv1"].w_bits == 3 and qm2.layers["layer2.1.conv1"].a_bits == 6
    # the recipe carries the plan, so artifacts and reports can rebuild it
    assert qm2.meta["recipe"]["plan"]["layers"]["layer2.1.conv1"] == {"w_bits": 3, "a_bits": 6}


@pytest.mark.parametrize("plan, error, message", [
    ({"nope.conv": {"w_bits": 4}}, LowbitError, r"plan names layer\(s\) \['nope.conv'\]"),
    ({"conv1": {"w_bits": 9}}, BitsError, "outside 1..8"),
    ({"conv1": {"a_bits": 1}}, BitsError, "outside the supported range 2..8"),
    ({"conv1": {"wbits": 4}}, RecipeError, r"unknown key\(s\) \['wbits'\]"),
    ({"conv1": 4}, RecipeError, "must be a mapping"),
    ({"format": "other/9", "layers": {}}, RecipeError, "unknown plan format"),
])
def test_bad_plans_are_named(resnet20, plan, error, message):
    with pytest.raises(error, match=message):
        lowbit.api.prepare(resnet20, {"extends": "w4a8", "plan": plan})


def test_corrupt_plan_file_is_named(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"layers": {"conv1": {"w_bits": 4}')
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_plan(path)
    with pytest.raises(RecipeError, match="does not exist"):
        load_plan(tmp_path / "missing.json")


class TwoHeads(nn.Module):
    """Two Linear layers reading one tensor (one activation quantizer between them)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_plan_cannot_split_a_shared_activation_quantizer():
    with pytest.raises(LowbitError, match="read the same tensor"):
        lowbit.api.prepare(TwoHeads(), {"extends": "w8a8", "first_last_bits": None,
                                        "plan": {"a": {"a_bits": 4}, "b": {"a_bits": 8}}})
    # a search lowering weights and inputs together gives the shared tensor the lowest bits its readers ask for
    recipe = lowbit.recipes.recipe.load_recipe({"extends": "w8a8", "first_last_bits": None})
    space = SearchSpace.build(TwoHeads(), recipe, b_min=2, b_max=6, lower="both")
    assert space.shared_inputs == [["a", "b"]]
    lowered = space.with_bits(space.start(), "a", 4)
    assert lowered.layers == {"a": {"w_bits": 4, "a_bits": 4}, "b": {"w_bits": 6, "a_bits": 4}}
    qm = lowbit.api.prepare(TwoHeads(), recipe.with_plan(lowered))  # applies (it raised "read the same tensor")
    assert (qm.layers["a"].w_bits, qm.layers["b"].w_bits, qm.layers["b"].a_bits) == (4, 6, 4)
    assert space.with_bits(lowered, "b", 5).layers["b"] == {"w_bits": 5, "a_bits": 4}


def test_one_weight_bit_is_binary_and_reverts(resnet20, cifar_slices):
    calib, _ = cifar_slices
    qm = lowbit.quantize(resnet20, {"extends": "w4a8", "plan": {"layer2.1.conv1": {"w_bits": 1}}}, calib=calib,
                         progress=False)
    row = qm.layers["layer2.1.conv1"]
    assert row.w_bits == 1 and row.layer.weight_quantizer.spec.grid == "midrise"
    w = row.layer.quantized_weight().detach().reshape(row.layer.weight.shape[0], -1)
    for channel in w:                                   # sign x one scale per channel
        levels = torch.unique(channel)
        assert len(levels) == 2 and torch.isclose(levels[0], -levels[1])
    row.w_bits = 3                                      # back on the recipe's grid
    assert row.layer.weight_quantizer.spec.grid == "midtread" and row.layer.weight_quantizer.spec.bits == 3
    assert not row.layer.weight_quantizer.calibrated


# -- MSQ probes -----------------------------------------------------------------------------
def test_pyramid_features_shapes_and_normalisation():
    out = torch.randn(3, 5, 8, 8)
    e = pyramid_features(out, (1, 2, 4))
    assert e.shape == (3, 3, 5 * 16)
    assert torch.allclose(e.norm(dim=2), torch.ones(3, 3), atol=1e-5)
    # the 1x1 scale is the channel means, replicated by the upsampling
    means = torch.nn.functional.normalize(out.mean((2, 3)), dim=1)
    assert torch.allclose(e[:, 0].reshape(3, 5, 16)[:, :, 0] / e[:, 0].reshape(3, 5, 16)[:, :, 0].norm(dim=1, keepdim=True),
                          means, atol=1e-5)
    assert pyramid_features(torch.randn(2, 7), (1, 2)).shape == (2, 2, 7 * 4)   # Linear outputs too


@pytest.mark.parametrize("probe_at", ["output", "next_input"])
def test_probes_rank_deeper_layers_higher_on_a_trained_resnet(resnet20, data_dir, probe_at):
    from lowbit.data import dataset_tensors, load_dataset

    train = load_dataset("cifar10", "train", data_dir=data_dir, download=False)
    calib = dataset_tensors(train, torch.arange(0, 512))
    val = dataset_tensors(train, torch.arange(512, 1024))
    qm = lowbit.quantize(resnet20, "w8a8", calib=calib[0], progress=False)
    res = probe_accuracy(qm, calib, val, probe_at=probe_at)
    acc = res.accuracy
    assert len(acc) == len(qm.layers) and res.network_accuracy > 0.9
    assert np.mean(acc[-4:]) > np.mean(acc[:4]) + 0.3, acc       # deeper = more task information
    assert acc[-1] > 0.9 and acc[0] < 0.5
    assert np.corrcoef(np.arange(len(acc)), acc)[0, 1] > 0.8     # rises through the network


# -- MSQ search -----------------------------------------------------------------------------
def test_choose_layer_follows_algorithm_1(resnet20):
    space = SearchSpace.build(resnet20, lowbit.recipes.recipe.load_recipe("w4a8"), b_min=2, b_max=4)
    plan = space.start()
    gains = [0.5] * (len(space.names) - 1)
    gains[0] = 0.0      # Diff of layer index 1 is smallest ...
    gains[4] = 0.01
    assert choose_layer(space, plan, gains) == space.names[1]
    plan = space.with_bits(plan, space.names[1], 2)   # ... until it sits at B_min: next smallest
    assert choose_layer(space, plan, gains) == space.names[5]
    gains[-1] = -1.0    # the last layer is frozen by first_last_bits: never chosen
    assert choose_layer(space, plan, gains) == space.names[5]
    # per bit saved: equal gains -> the largest layer goes first
    flat = [0.1] * (len(space.names) - 1)
    biggest = max(space.searchable, key=lambda n: (space.params[n], -space.names.index(n)))
    assert choose_layer(space, space.start(), flat, rank="gain_per_bit") == biggest
    with pytest.raises(LowbitError, match="unknown MSQ ranking"):
        choose_layer(space, plan, gains, rank="random")


def test_a_weights_only_plan_leaves_activations_to_the_recipe_it_is_applied_with(resnet20):
    """A plan searched with w4a8 at lower: weights carries no a_bits, so with w4a4 the activations stay at 4 bits
    (it pinned every layer's inputs at the search recipe's 8 while the run said w4a4)."""
    space = SearchSpace.build(resnet20, lowbit.recipes.recipe.load_recipe("w4a8"), b_min=2, b_max=6)
    plan = space.with_bits(space.start(), "layer2.0.conv1", 3)
    assert all("a_bits" not in b for b in plan.layers.values())
    qm = lowbit.api.prepare(resnet20, lowbit.recipes.recipe.load_recipe("w4a4").with_plan(plan))
    assert qm.layers["layer2.0.conv1"].w_bits == 3 and qm.layers["layer2.0.conv1"].a_bits == 4
    assert qm.layers["layer3.0.conv2"].a_bits == 4 and qm.layers["conv1"].a_bits == 8  # first layer: first_last_bits


def test_a_searched_plan_is_refused_on_another_network_whose_names_include_its_layers(resnet20, tmp_path):
    """A ResNet-20 plan names only layers a ResNet-32 has too: the name check passed it, and the extra blocks took
    the recipe's bits. A searched plan records its layers and sizes; a hand-written one (no record) still applies."""
    from lowbit.zoo import resnet32

    recipe = lowbit.recipes.recipe.load_recipe("w4a8")
    space = SearchSpace.build(resnet20, recipe, b_min=2, b_max=6)
    plan = space.final_plan(space.with_bits(space.start(), "layer2.0.conv1", 3), method="test", budget_bits=1)
    path = plan.save(tmp_path / "plan.json")
    loaded = load_plan(path)
    assert loaded.meta["architecture"]["layers"]["layer2.0.conv1"] == 32 * 16 * 9
    assert lowbit.api.prepare(resnet20, recipe.with_plan(loaded)).layers["layer2.0.conv1"].w_bits == 3
    with pytest.raises(LowbitError, match=r"searched on another network \(layers the plan does not know: layer1.3"):
        lowbit.api.prepare(resnet32(), recipe.with_plan(loaded))
    wide = lowbit.zoo.resnet_cifar(20, width=32)
    with pytest.raises(LowbitError, match=r"other sizes: conv1 \(432 -> 864 weights\)"):
        lowbit.api.prepare(wide, recipe.with_plan(loaded))
    hand_written = Plan(loaded.layers)  # no record: applies by name, as before
    assert lowbit.api.prepare(resnet32(), recipe.with_plan(hand_written)).layers["layer2.0.conv1"].w_bits == 3


def test_lower_both_moves_weight_and_input_bits_together(resnet20):
    recipe = lowbit.recipes.recipe.load_recipe("w4a8")
    space = SearchSpace.build(resnet20, recipe, b_min=2, b_max=6, lower="both")
    start = space.start()
    assert all(start.layers[n] == {"w_bits": 6, "a_bits": 6} for n in space.searchable)
    assert start.layers["conv1"] == {"w_bits": 8, "a_bits": 8}            # frozen first layer
    lowered = space.with_bits(start, "layer2.0.conv1", 5)
    assert lowered.layers["layer2.0.conv1"] == {"w_bits": 5, "a_bits": 5}
    qm = lowbit.api.prepare(resnet20, recipe.with_plan(lowered))
    assert qm.layers["layer2.0.conv1"].a_bits == 5 and qm.layers["layer2.0.conv2"].a_bits == 6
    with pytest.raises(LowbitError, match="lower must be"):
        SearchSpace.build(resnet20, recipe, b_min=2, b_max=6, lower="activations")


def test_msq_search_honours_the_budget_exactly(mnist_labelled, tmp_path):
    model, calib, val, _ = mnist_labelled
    res = msq_search(model, MNIST_BACKEND, calib, val, target_bits=3.0, b_max=4, b_min=1, progress=False,
                     checkpoint=tmp_path / "msq.json")
    space = SearchSpace.build(model, lowbit.recipes.recipe.load_recipe(MNIST_BACKEND), 1, 4)
    budget = int(3.0 * space.total_params())
    assert res.budget_bits == budget
    sizes = [p["weight_bits"] for p in res.path]
    assert sizes[-1] <= budget < sizes[-2]            # stops at the first plan within budget
    assert res.calibrations == len(res.path) - 1
    for before, after in zip(res.path, res.path[1:]):  # one layer loses exactly one bit per step
        changed = {n: (before["plan"][n]["w_bits"], after["plan"][n]["w_bits"])
                   for n in before["plan"] if before["plan"][n] != after["plan"][n]}
        assert changed == {before["lowered"]: (changed[before["lowered"]][0], changed[before["lowered"]][0] - 1)}
        assert before["lowered"] != space.names[0]     # layer 1 has no Diff, Algorithm 1 never picks it
    assert res.plan.weight_bits(space.params) == sizes[-1]
    qm = lowbit.quantize(model, lowbit.recipes.recipe.load_recipe(MNIST_BACKEND).with_plan(res.plan),
                         calib=calib[0], progress=False)
    assert sum(r.params * r.w_bits for r in qm.layers) == sizes[-1]
    # the finished checkpoint resumes to the same answer without calibrating again
    again = msq_search(model, MNIST_BACKEND, calib, val, target_bits=3.0, b_max=4, b_min=1, progress=False,
                       checkpoint=tmp_path / "msq.json")
    assert again.plan.layers == res.plan.layers and again.calibrations == res.calibrations
    with pytest.raises(LowbitError, match="other settings"):
        msq_search(model, MNIST_BACKEND, calib, val, target_bits=2.5, b_max=4, b_min=1, progress=False,
                   checkpoint=tmp_path / "msq.json")
    other_model = copy.deepcopy(model)  # another trained model of the same shape: not this search's
    with torch.no_grad():
        next(other_model.parameters()).mul_(1.5)
    with pytest.raises(LowbitError, match="another model or other data"):
        msq_search(other_model, MNIST_BACKEND, calib, val, target_bits=3.0, b_max=4, b_min=1, progress=False,
                   checkpoint=tmp_path / "msq.json")
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "list.json").write_text("[1, 2]")
    for bad, message in (("folder.json", "is a folder"), ("list.json", "is not an MSQ search state")):
        with pytest.raises(LowbitError, match=message):
            msq_search(model, MNIST_BACKEND, calib, val, target_bits=3.0, b_max=4, b_min=1, progress=False,
                       checkpoint=tmp_path / bad)


def test_msq_search_refuses_unreachable_targets(mnist_labelled):
    model, calib, val, _ = mnist_labelled
    with pytest.raises(LowbitError, match="target unreachable"):
        msq_search(model, MNIST_BACKEND, calib, val, target_bits=1.5, b_max=4, b_min=2, progress=False)
    with pytest.raises(BitsError, match="b_min <= b_max"):
        msq_search(model, MNIST_BACKEND, calib, val, target_bits=3, b_min=5, b_max=4, progress=False)


# -- HAWQ -----------------------------------------------------------------------------------
def test_hutchinson_matches_the_exact_hessian_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    qm = lowbit.api.prepare(model, {"extends": "w8a8", "first_last_bits": None})
    est = hutchinson_traces(qm, x, y, samples=400, progress=False)
    params = dict(model.named_parameters())
    for layer, key in (("0", "0.weight"), ("2", "2.weight")):
        w0 = params[key].detach()

        def loss(w, key=key):
            out = torch.func.functional_call(model, {**{k: v.detach() for k, v in params.items()}, key: w}, (x,))
            return torch.nn.functional.cross_entropy(out, y)

        exact = float(torch.autograd.functional.hessian(loss, w0).reshape(w0.numel(), w0.numel()).trace())
        assert est[layer] == pytest.approx(exact, rel=0.1), (layer, est[layer], exact)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 4), st.integers(2, 3))
def test_ilp_matches_brute_force(seed, layers, options):
    rng = np.random.default_rng(seed)
    costs = rng.random((layers, options)).tolist()
    sizes = rng.integers(1, 20, (layers, options)).tolist()
    budget = float(rng.integers(min(map(min, sizes)) * layers, max(map(max, sizes)) * layers + 1))
    try:
        best, best_cost = brute_force_allocation(costs, sizes, budget)
    except LowbitError:
        with pytest.raises(LowbitError, match="fits the budget"):
            solve_allocation(costs, sizes, budget)
        return
    choice = solve_allocation(costs, sizes, budget)
    assert sum(sizes[i][k] for i, k in enumerate(choice)) <= budget
    assert sum(costs[i][k] for i, k in enumerate(choice)) == pytest.approx(best_cost, abs=1e-9)


def test_hawq_plan_is_the_brute_force_optimum_on_a_tiny_model(mnist_labelled):
    model, calib, _, _ = mnist_labelled
    res = hawq_search(model, MNIST_BACKEND, calib, target_bits=3.0, b_max=4, b_min=1, samples=4,
                      trace_images=64, progress=False)
    names = list(res.plan.layers)
    params = {r.name: r.params for r in lowbit.api.prepare(model, MNIST_BACKEND).layers}
    sens = res.path[0]["sensitivity"]
    options = list(range(1, 5))
    costs = [sens[n] for n in names]
    sizes = [[params[n] * b for b in options] for n in names]
    _, best_cost = brute_force_allocation(costs, sizes, res.budget_bits)
    chosen = [options.index(res.plan.layers[n]["w_bits"]) for n in names]
    assert sum(costs[i][k] for i, k in enumerate(chosen)) == pytest.approx(best_cost)
    assert res.plan.weight_bits(params) <= res.budget_bits
    # sensitivities fall with bits: more bits, smaller perturbation
    for n in names:
        assert all(a >= b for a, b in zip(sens[n], sens[n][1:])), (n, sens[n])


# -- deployment of mixed plans ----------------------------------------------------------------
def test_mixed_plan_survives_artifact_and_onnx(mnist_labelled, tmp_path):
    pytest.importorskip("onnxruntime")
    from lowbit.deploy.artifact import load, save
    from lowbit.deploy.onnx_export import export_onnx
    from lowbit.deploy.runtime import OnnxModel

    model, calib, _, test = mnist_labelled
    plan = {"conv1": {"w_bits": 8, "a_bits": 8}, "conv2": {"w_bits": 3, "a_bits": 4},
            "conv3": {"w_bits": 5, "a_bits": 6}, "linear": {"w_bits": 2, "a_bits": 8}}
    qm = lowbit.quantize(model, {"extends": "w8a8", "first_last_bits": None, "plan": plan}, calib=calib[0],
                         progress=False)
    assert qm.layers.plan() == plan
    x = test[0][:500]
    ref = qm(x)
    back = load(save(qm, tmp_path / "m.lowbit"), model=model)
    assert back.layers.plan() == plan and torch.equal(back(x), ref)
    onnx_model = OnnxModel(export_onnx(qm, tmp_path / "m.onnx", x[:1]))
    agree = (onnx_model(x).argmax(1) == ref.argmax(1)).float().mean()
    assert agree > 0.98, agree


def test_cli_search_writes_a_plan_that_quantize_accepts(tmp_path, data_dir, models_dir, capsys):
    from lowbit.cli import main

    common = ["--model", "resnet20", "--data-dir", str(data_dir), "--models-dir", str(models_dir),
              "--no-download", "--no-progress"]
    recipe = tmp_path / "backend.yaml"
    recipe.write_text("extends: w4a8\ncalibration: {samples: 256, batch_size: 128, seed: 0}\n")
    out = tmp_path / "plan.json"
    assert main(["search", *common, "--method", "msq", "--recipe", str(recipe), "--b-max", "4",
                 "--target-bits", "3.97", "--val-samples", "256", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["format"] == "lowbit-plan/1" and plan["meta"]["mean_w_bits"] <= 3.97
    assert main(["quantize", *common, "--recipe", str(recipe), "--plan", str(out), "--test-limit", "200"]) == 0
    assert "backend+plan" in capsys.readouterr().out
    assert main(["search", *common, "--method", "msq", "--recipe", str(recipe), "--target-bits", "0.5",
                 "--out", str(out)]) == 2
    assert "target unreachable" in capsys.readouterr().err
    hawq = tmp_path / "hawq.json"
    assert main(["search", *common, "--method", "hawq", "--recipe", str(recipe), "--b-max", "6",
                 "--target-ratio", "8", "--hutchinson-samples", "1", "--out", str(hawq), "--evaluate",
                 "--test-limit", "200"]) == 0
    assert re.search(r"float top-1 [\d.]+% \(first 200 test images \(NOT the full split\)\)", capsys.readouterr().out)
    meta = json.loads(hawq.read_text())["meta"]
    assert meta["method"] == "hawq" and meta["weight_compression"] >= 8


def test_hawq_bops_budget_is_honoured(mnist_labelled):
    model, calib, _, _ = mnist_labelled
    free = hawq_search(model, MNIST_BACKEND, calib, target_bits=3.5, b_max=4, b_min=1, samples=2,
                       trace_images=32, progress=False)
    capped = hawq_search(model, MNIST_BACKEND, calib, target_bits=3.5, b_max=4, b_min=1, samples=2,
                         trace_images=32, bops_ratio=2.0, traces=free.path[0]["traces"], progress=False)
    qm = lowbit.api.prepare(model, MNIST_BACKEND)
    with torch.no_grad(), qm.float_reference():
        qm(calib[0][:2])                                   # fills the MAC counts
    macs = {r.name: r.macs for r in qm.layers}
    a_bits = {r.name: r.a_bits for r in qm.layers}  # the recipe's: a weights-only plan carries none

    def bops(plan):
        return sum(macs[n] * b["w_bits"] * a_bits[n] for n, b in plan.layers.items())

    full = sum(macs[n] * 4 * a_bits[n] for n in free.plan.layers)
    assert bops(capped.plan) <= full / 2.0 < bops(free.plan)


def test_adaround_keeps_binary_layers_on_their_grid(mnist_labelled):
    model, calib, _, test = mnist_labelled
    recipe = {**MNIST_BACKEND, "plan": {"conv2": {"w_bits": 1}}, "steps": ["calibrate", {"adaround": {"iters": 20}}]}
    qm = lowbit.quantize(model, recipe, calib=calib[0], progress=False)
    row = qm.layers["conv2"]
    q = row.layer.weight_quantizer
    w = row.layer.quantized_weight().detach()
    assert q.spec.grid == "midrise" and torch.allclose(q.dequantize(q.codes(w)), w, atol=1e-6)
    assert set(q.codes(w).unique().tolist()) <= {-1, 0}


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from lowbit.report.plots import allocation_plot, pareto_plot

    pts = [{"method": m, "weight_compression": 32 / b, "mean_w_bits": b, "top1": 90 - 3 * (4 - b)}
           for m in ("uniform", "msq") for b in (2.0, 3.0, 4.0)]
    out = pareto_plot(pts, tmp_path / "p.png", title="t", float_top1=91.7)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    plans = {"msq": {"a": {"w_bits": 2}, "b": {"w_bits": 4}}, "uniform": {"a": {"w_bits": 3}, "b": {"w_bits": 3}}}
    out = allocation_plot(plans, tmp_path / "a.png", params={"a": 10, "b": 20})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(LowbitError, match="at least one plan"):
        allocation_plot({}, tmp_path / "b.png")


# -- mixed kinds --------------------------------------------------------------------------------
def test_perturbation_of_a_kind_is_its_own_error(mnist_labelled):
    from lowbit.mixed.hawq import perturbation

    model, _, _, _ = mnist_labelled
    qm = lowbit.api.prepare(model, MNIST_BACKEND)
    w = qm.layers["conv2"].layer.weight.detach()
    # TWN: Δ = 0.7·E|W|, α = mean |W| over |W| > Δ, per output channel (the recipe is per-channel)
    rows = w.reshape(w.shape[0], -1)
    delta = 0.7 * rows.abs().mean(1, keepdim=True)
    big = rows.abs() > delta
    alpha = (rows.abs() * big).sum(1, keepdim=True) / big.sum(1, keepdim=True)
    twn = torch.sign(rows) * big * alpha
    assert perturbation(qm, "conv2", 2, "mse", "twn") == pytest.approx(float(((twn - rows) ** 2).sum()), rel=1e-5)
    # XNOR: α = mean |W| per output channel
    xnor = torch.sign(rows) * rows.abs().mean(1, keepdim=True)
    assert perturbation(qm, "conv2", 1, "mse", "xnor") == pytest.approx(float(((xnor - rows) ** 2).sum()), rel=1e-5)
    # k-means: each weight to its nearest of 8 fitted centroids, which beat 8 uniform levels per tensor
    from lowbit.ptq.calibrate import calibrate_weight_quantizer
    from lowbit.quant.codebook import kmeans_1d
    from lowbit.quant.quantizer import UniformQuantizer

    c = kmeans_1d(w.reshape(-1), 8)
    nearest = c[(w.reshape(-1, 1) - c.reshape(1, -1)).abs().argmin(1)]
    km = perturbation(qm, "conv2", 3, "mse", "kmeans")
    assert km == pytest.approx(float(((nearest - w.reshape(-1)) ** 2).sum()), rel=1e-5)
    uniform = UniformQuantizer(qm.layers["conv2"].layer.base_weight_spec.with_(bits=3, per_channel=False))
    calibrate_weight_quantizer(uniform, w, "mse")
    assert km < float(((uniform(w) - w) ** 2).sum())
    with pytest.raises(LowbitError, match="twn quantizes to 2 bits only"):
        perturbation(qm, "conv2", 3, "mse", "twn")


def test_hawq_over_kinds_picks_the_cheaper_kind_and_the_plan_trains(mnist_labelled, mnist_train):
    from lowbit.mixed.hawq import parse_candidates

    model, calib, _, test = mnist_labelled
    candidates = parse_candidates("2,2:twn,3:kmeans,4")
    assert candidates == [(2, None), (2, "twn"), (3, "kmeans"), (4, None)]
    with pytest.raises(LowbitError, match="expected BITS or BITS:KIND"):
        parse_candidates("two:twn")
    with pytest.raises(RecipeError, match="quantizer must be one of"):
        parse_candidates("2:ternary")
    res = hawq_search(model, MNIST_BACKEND, calib, target_bits=2.6, samples=4, trace_images=64, progress=False,
                      candidates=candidates)
    sens = res.path[0]["sensitivity"]
    kinds = {n: (b["w_bits"], b.get("w_quantizer")) for n, b in res.plan.layers.items()}
    assert {k for k in kinds.values()} - set(candidates) == set()
    for n, (bits, kind) in kinds.items():
        if bits == 2:  # same size: the 2-bit option with the smaller sensitivity
            chosen, other = (1, 0) if kind == "twn" else (0, 1)
            assert sens[n][chosen] <= sens[n][other], (n, sens[n])
    assert any(k for _, k in kinds.values()), kinds  # some layer got a kind of its own
    # the plan is a recipe's plan: QAT trains each layer with its own kind, k-means layers clustered first
    recipe = {"extends": "w4a4", "first_last_bits": None, "plan": res.plan.to_dict(), "overrides": [],
              "quantize_adds": False, "activations": {"bits": 8},
              "steps": ["calibrate", "kmeans", {"qat": {"epochs": 1, "steps_per_epoch": 8, "batch_size": 64,
                                                         "lr": 0.002, "val_samples": 200}}]}
    if not any(k == "kmeans" for _, k in kinds.values()):
        recipe["steps"].remove("kmeans")
    # the same plan with a recipe whose steps cannot make its kinds: refused, not run on the uniform grid
    with pytest.raises(RecipeError, match=r"the plan give\(s\) layers (the QAT weight kind|w_quantizer kmeans)"):
        lowbit.load_recipe({**recipe, "steps": ["calibrate"]})
    with pytest.raises(RecipeError, match=r"the plan give\(s\) layers (the QAT weight kind|w_quantizer kmeans)"):
        lowbit.load_recipe(MNIST_BACKEND).with_plan(res.plan)
    qm = lowbit.quantize(model, recipe, calib=calib[0], train=mnist_train, progress=False)
    methods = {r.name: r.quantizer for r in qm.layers}
    for n, (bits, kind) in kinds.items():
        assert methods[n] == (kind or "uniform"), (n, methods[n], kind)
        assert qm.layers[n].w_bits == bits


def test_overrides_mix_kinds_and_name_their_mistakes(mnist_labelled, mnist_train, tmp_path):
    model, calib, _, test = mnist_labelled
    recipe = {"extends": "w4a4", "weights": {"quantizer": "lsq"}, "first_last_bits": 8, "quantize_adds": False,
              "overrides": [{"pattern": "*", "a_bits": 32}, {"pattern": "conv2", "w_bits": 2, "w_quantizer": "twn"},
                            {"pattern": "conv3", "w_bits": 1, "w_quantizer": "xnor"}],
              "steps": ["calibrate", {"qat": {"epochs": 1, "steps_per_epoch": 8, "batch_size": 64, "lr": 0.002,
                                             "val_samples": 200}}]}
    qm = lowbit.quantize(model, recipe, calib=calib[0], train=mnist_train, progress=False)
    assert [r.quantizer for r in qm.layers] == ["lsq", "twn", "xnor", "lsq"]
    row = qm.layers["conv2"].layer.quantized_weight().detach().reshape(qm.layers["conv2"].params // 9, -1)
    assert max(len(torch.unique(r)) for r in row) <= 3
    back = lowbit.load(lowbit.save(qm, tmp_path / "mixed.lowbit"), model=model)
    assert torch.equal(back(test[0][:100]), qm(test[0][:100]))
    assert [r.quantizer for r in back.layers] == ["lsq", "twn", "xnor", "lsq"]
    with pytest.raises(RecipeError, match="'twn' needs 2-bit weights, the layer has 3"):
        lowbit.api.prepare(model, {**recipe, "overrides": [{"pattern": "conv2", "w_bits": 3, "w_quantizer": "twn"}]})
    with pytest.raises(RecipeError, match="only a `qat` step trains"):
        lowbit.load_recipe({**recipe, "steps": ["calibrate"]})
    with pytest.raises(RecipeError, match="need a `kmeans` step"):
        lowbit.load_recipe({**recipe, "overrides": [{"pattern": "conv2", "w_quantizer": "kmeans"}]})
    with pytest.raises(RecipeError, match=r"overrides\[0\].weights.quantizer must be one of"):
        lowbit.load_recipe({**recipe, "overrides": [{"pattern": "conv2", "w_quantizer": "ternary"}]})
