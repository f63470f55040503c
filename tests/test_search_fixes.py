"""Mixed-precision search and `lowbit eval` on a tiny model of one's own (pkg.module:factory, tensors:FILE.npz):
the mistakes a review found, each pinned down."""
from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.errors import BitsError, LowbitError, RecipeError
from lowbit.mixed.hawq import hawq_search
from lowbit.mixed.msq import _Checkpoint, msq_search
from lowbit.mixed.plan import Plan, load_plan
from lowbit.mixed.search import SearchSpace, search_subsets
from lowbit.recipes.recipe import load_recipe

MODULE = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
'''
RECIPE = {"extends": "w4a8", "name": "tiny", "calibration": {"samples": 48, "batch_size": 48, "seed": 0},
          "steps": ["calibrate"]}
FACTORY = "lowbit_search_fixes_net:build"


def tiny_model() -> nn.Module:
    """The network the CLI builds from FACTORY (the same source, so the two cannot drift apart)."""
    namespace: dict = {}
    exec(MODULE, namespace)
    return namespace["build"]().eval()


def tiny_data(n: int = 96, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % 3
    x[:, 0, :2, :2] += y[:, None, None].float() * 2
    return x, y


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's folder: the model's module, its weights, 300/60 images as tensors:FILE.npz, a quick recipe."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("own")
    (root / "lowbit_search_fixes_net.py").write_text(MODULE)
    sys.path.insert(0, str(root))
    try:
        from lowbit.data.user import load_factory

        model = load_factory(FACTORY)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "net.safetensors"))
        rng = np.random.default_rng(0)

        def images(n: int) -> tuple[np.ndarray, np.ndarray]:
            y = np.arange(n) % 3
            x = rng.integers(0, 255, size=(n, 1, 8, 8)).astype(np.uint8)
            x[:, 0, :2, :2] = (y[:, None, None] * 100).astype(np.uint8)
            return x, y.astype(np.int64)

        (xtr, ytr), (xte, yte) = images(300), images(60)
        np.savez(root / "data.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
        (root / "recipe.yaml").write_text("extends: w4a8\nname: tinyr\ncalibration: {samples: 64, batch_size: 64, "
                                          "seed: 0}\nsteps: [calibrate]\n")
        yield root
    finally:
        sys.path.remove(str(root))


def own(root) -> list[str]:
    return ["--model", FACTORY, "--weights", str(root / "net.safetensors"), "--data", f"tensors:{root / 'data.npz'}",
            "--no-progress", "--no-registry", "--threads", "1"]


# -- 1. HAWQ: a layer with no measured curvature ----------------------------------------------------
def test_hawq_gives_a_flat_layer_the_most_bits_the_leftover_budget_allows():
    model, (x, y) = tiny_model(), tiny_data()
    recipe = {**RECIPE, "first_last_bits": None}
    space = SearchSpace.build(model, load_recipe(recipe), 2, 8)
    flat = "2"                                       # 288 weights: cheap to raise
    traces = {n: 1.0 for n in space.names} | {flat: -0.5}
    for target in (3.0, 4.0, 5.5):
        with pytest.warns(UserWarning, match="trace estimate <= 0"):
            res = hawq_search(model, recipe, (x[:48], y[:48]), target_bits=target, b_max=8, b_min=2, traces=traces,
                              progress=False)
        used, bits = space.weight_bits(res.plan), res.plan.layers[flat]["w_bits"]
        assert used <= res.budget_bits
        # at b_max, or one more bit would not fit: the ILP was indifferent and left it at b_min with budget unspent
        assert bits == 8 or used + space.params[flat] > res.budget_bits, (target, res.plan.layers, used)
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # positive traces: no warning
        hawq_search(model, recipe, (x[:48], y[:48]), target_bits=4.0, traces={n: 1.0 for n in space.names},
                    progress=False)


# -- 2. search options the method ignores -------------------------------------------------------------
@pytest.mark.parametrize("method, extra, option", [
    ("hawq", ["--rank", "gain_per_bit"], "--rank"),
    ("hawq", ["--probe-at", "next_input"], "--probe-at"),
    ("hawq", ["--val-samples", "100"], "--val-samples"),
    ("msq", ["--hutchinson-samples", "4"], "--hutchinson-samples"),
    ("msq", ["--test-limit", "10"], "--test-limit"),
    ("hawq", ["--test-limit", "10"], "--test-limit"),
])
def test_search_refuses_options_its_method_would_ignore(project, tmp_path, capsys, method, extra, option):
    code = main(["search", *own(project), "--method", method, "--recipe", str(project / "recipe.yaml"),
                 "--target-bits", "6", "--out", str(tmp_path / "plan.json"), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert option in err and "ignore" in err
    assert not (tmp_path / "plan.json").exists()


def test_hawq_search_draws_no_validation_images_and_clamps_calibration_like_quantize(project, tmp_path, capsys):
    # 300 training images: fewer than 1024 calibration images, and than 64 + 1024 validation ones HAWQ never uses
    recipe = tmp_path / "big.yaml"
    recipe.write_text("extends: w4a8\nname: big\ncalibration: {samples: 1024, batch_size: 128, seed: 0}\n"
                      "steps: [calibrate]\n")
    out = tmp_path / "plan.json"
    for r in (project / "recipe.yaml", recipe):
        code = main(["search", *own(project), "--method", "hawq", "--recipe", str(r), "--target-bits", "6",
                     "--hutchinson-samples", "1", "--out", str(out)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert json.loads(out.read_text())["meta"]["method"] == "hawq"
    assert "using 300" in captured.err


def test_msq_subsets_clamp_calibration_like_quantize(project):
    from lowbit.data.user import load_user_data

    train, _ = load_user_data(f"tensors:{project / 'data.npz'}")
    recipe = load_recipe({**RECIPE, "calibration": {"samples": 1024, "batch_size": 128, "seed": 0}})
    (cx, _), (vx, _) = search_subsets(train, recipe, 100)
    assert cx.shape[0] == 200 and vx.shape[0] == 100  # all of it, the validation images kept apart
    assert not {tuple(r.flatten().tolist()) for r in cx} & {tuple(r.flatten().tolist()) for r in vx}
    with pytest.raises(LowbitError, match="not enough for calibration and 300 validation"):
        search_subsets(train, recipe, 300)


# -- 3. --out through a symlink -----------------------------------------------------------------------------
def test_search_out_writes_through_a_symlink(project, tmp_path, capsys):
    target = tmp_path / "kept" / "plan-target.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "plan.json"
    link.symlink_to(target)
    code = main(["search", *own(project), "--method", "hawq", "--recipe", str(project / "recipe.yaml"),
                 "--target-bits", "6", "--hutchinson-samples", "1", "--out", str(link)])
    assert code == 0, capsys.readouterr().err
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert json.loads(target.read_text())["format"] == "lowbit-plan/1"
    # Plan.save itself: a regular file is still replaced atomically, a link written through
    plan = Plan({"0": {"w_bits": 4}})
    plan.save(link)
    assert link.is_symlink() and load_plan(target).layers == plan.layers


# -- 4. MSQ never lowers layer 0 ---------------------------------------------------------------------------
def test_msq_refuses_a_target_only_lowering_layer_0_could_reach_before_calibrating(monkeypatch):
    model, (x, y) = tiny_model(), tiny_data()
    recipe = {**RECIPE, "first_last_bits": None}
    space = SearchSpace.build(model, load_recipe(recipe), 2, 8)
    # every layer at 2 bits but layer 0 (36 weights) at 8 fits 2.1 bits per weight: SearchSpace.budget accepts it
    assert space.budget(target_bits=2.1) >= space.weight_bits(space.uniform(2))

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated before refusing the target")

    monkeypatch.setattr(lowbit.api, "quantize", no_calibration)
    with pytest.raises(LowbitError, match="layer 0 stays at b_max"):
        msq_search(model, recipe, (x[:48], y[:48]), (x[48:], y[48:]), target_bits=2.1, b_max=8, b_min=2,
                   progress=False, pool_sizes=(1,))


def test_msq_with_a_searchable_first_layer_reaches_a_reachable_target():
    model, (x, y) = tiny_model(), tiny_data()
    recipe = {**RECIPE, "first_last_bits": None}
    res = msq_search(model, recipe, (x[:48], y[:48]), (x[48:], y[48:]), target_bits=3.8, b_max=4, b_min=2,
                     progress=False, pool_sizes=(1,))
    assert res.plan.layers["0"]["w_bits"] == 4 and res.plan.meta["mean_w_bits"] <= 3.8


# -- 5. a malformed plan meta --------------------------------------------------------------------------------
@pytest.mark.parametrize("meta", [[1, 2], "msq", 3])
def test_a_plan_meta_that_is_not_a_mapping_is_named(tmp_path, meta):
    data = {"format": "lowbit-plan/1", "layers": {"conv": {"w_bits": 4}}, "meta": meta}
    with pytest.raises(RecipeError, match=r"plan\.meta must be a mapping"):
        Plan.from_mapping(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RecipeError, match=r"plan p\.json\.meta must be a mapping"):
        load_plan(path)
    assert Plan.from_mapping({**data, "meta": None}).meta == {}


# -- 7. the MSQ checkpoint is written atomically -------------------------------------------------------
def test_msq_checkpoint_named_tmp_survives_a_failed_write(tmp_path, monkeypatch):
    import pathlib

    path = tmp_path / "search.tmp"
    ckpt = _Checkpoint(path, {"method": "msq"})
    ckpt.save(Plan({"a": {"w_bits": 4}}), [], 1, 1.0)
    good = path.read_text()

    def disk_full(self, text, *args, **kwargs):
        with open(self, "w") as f:           # truncates, writes half, fails
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(OSError):
        ckpt.save(Plan({"a": {"w_bits": 3}}), [], 2, 2.0)
    monkeypatch.undo()
    assert path.read_text() == good and ckpt.load()["calibrations"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search.tmp"]  # no temporary file left


# -- 8. --lower both with 1-bit weights ----------------------------------------------------------------
def test_lower_both_refuses_b_min_1_up_front(monkeypatch):
    model, (x, y) = tiny_model(), tiny_data()
    with pytest.raises(BitsError, match="activations cannot go below 2 bits"):
        SearchSpace.build(model, load_recipe(RECIPE), 1, 2, "both")
    SearchSpace.build(model, load_recipe(RECIPE), 1, 2, "weights")  # 1-bit weights alone are fine
    monkeypatch.setattr(lowbit.api, "quantize", lambda *a, **k: pytest.fail("calibrated before refusing"))
    with pytest.raises(BitsError, match="activations cannot go below 2 bits"):
        msq_search(model, RECIPE, (x[:48], y[:48]), (x[48:], y[48:]), target_bits=1.5, b_max=2, b_min=1,
                   lower="both", progress=False, pool_sizes=(1,))


# -- 9./10. eval of a deployed model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(project):
    from lowbit.data.user import load_factory
    from lowbit.zoo import load_weights

    model = load_weights(load_factory(FACTORY), project / "net.safetensors").eval()
    x = torch.from_numpy(np.load(project / "data.npz")["x_train"][:64]).float() / 255
    qm = lowbit.quantize(model, load_recipe(project / "recipe.yaml"), calib=x, progress=False)
    return lowbit.save(qm, project / "net.lowbit")


def test_eval_scores_an_artifact_of_a_factory_model(project, artifact, tmp_path, capsys):
    report = tmp_path / "eval.json"
    code = main(["eval", "--lowbit", str(artifact), *own(project), "--json", str(report)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    payload = json.loads(report.read_text())
    assert payload["test_images"] == 60 and payload["dataset"] == f"tensors:{project / 'data.npz'}"
    assert 0 <= payload["top1"] <= 1


def test_eval_refuses_what_a_deployed_model_would_ignore(project, artifact, tmp_path, capsys):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not read")
    code = main(["eval", "--lowbit", str(artifact), *own(project), "--recipe", "w4a4"])
    err = capsys.readouterr().err
    assert code == 2 and "--recipe" in err and "--lowbit" in err
    code = main(["eval", "--onnx", str(onnx), *own(project), "--recipe", "w4a4"])
    err = capsys.readouterr().err
    assert code == 2 and "--recipe" in err and "--onnx" in err
    code = main(["eval", "--onnx", str(onnx), "--lowbit", str(artifact), *own(project)])
    err = capsys.readouterr().err
    assert code == 2 and "give one of them" in err


# -- 11. a bad HAWQ candidate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("candidates, words", [("9", "'9': weight bits must be 1..8"),
                                               ("2,32", "'32': weight bits must be 1..8"),
                                               ("3:twn", "'3:twn': twn quantizes to 2 bits only")])
def test_a_bad_candidate_names_candidates(project, tmp_path, capsys, candidates, words):
    code = main(["search", *own(project), "--method", "hawq", "--recipe", str(project / "recipe.yaml"),
                 "--target-bits", "6", "--candidates", candidates, "--out", str(tmp_path / "plan.json")])
    err = capsys.readouterr().err
    assert code == 2 and f"--candidates {words}" in err and "b_min" not in err, err
    model, (x, y) = tiny_model(), tiny_data()
    bits, _, kind = candidates.split(",")[-1].partition(":")
    with pytest.raises(BitsError, match="candidate"):
        hawq_search(model, RECIPE, (x[:48], y[:48]), target_bits=4, candidates=[(int(bits), kind or None)],
                    progress=False)
