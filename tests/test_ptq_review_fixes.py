"""Fixes from the PTQ code review: match_moments' chunks, zeroq on float64, USP's failure paths, lowbit.calibrate's
argument checks, reconstruction options never read, calibrate-step estimator options, estimator option ranges,
a layer the calibration data never reaches, and crop-and-flip on another device."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import DataMismatchError, LowbitError, RecipeError
from lowbit.recipes.recipe import load_recipe

BASE = {"weights": {"bits": 3, "estimator": "minmax"}, "activations": {"bits": 4, "estimator": "minmax"},
        "first_last_bits": None, "calibration": {"samples": 64, "batch_size": 32, "seed": 0}}


def _recipe(steps: list, **kw) -> dict:
    return {**BASE, **kw, "steps": steps}


def _mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    mid = [nn.BatchNorm1d(32)] if bn else []
    return nn.Sequential(nn.Linear(20, 32), *mid, nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                        nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 5))
    with torch.no_grad():  # non-trivial BN statistics (zeroq distils towards them; USP replaces them)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _data(shape: tuple[int, ...], n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _weight_scales(qm) -> list[torch.Tensor]:
    return [r.layer.weight_quantizer.scale.clone() for r in qm.layers]


# -- 1: match_moments gives the same answer whatever the chunk size ----------------------------
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_match_moments_result_does_not_depend_on_the_chunk_size(kind, chunk):
    """Chunks were corrected on the way with their own statistics: a 1-2 sample chunk has no per-channel variance
    at a Linear, so every later layer's scale hit max_ratio (MLP logit MSE 0.75 with one chunk, 69 at chunk 1)."""
    model, x = (_mlp(), _data((20,))) if kind == "mlp" else (_cnn(), _data((1, 8, 8)))
    steps = lambda c: ["calibrate", {"match_moments": {"chunk": c, "max_ratio": 4.0}}]  # noqa: E731
    one = lowbit.quantize(model, _recipe(steps(0)), calib=x, progress=False)
    chunked = lowbit.quantize(model, _recipe(steps(chunk)), calib=x, progress=False)
    assert set(chunked.meta["match_moments"]) == set(one.meta["match_moments"]) == {r.name for r in one.layers}
    moved = 0.0
    for a, b in zip(one.layers, chunked.layers):
        qa, qb = a.layer.weight_quantizer, b.layer.weight_quantizer
        torch.testing.assert_close(qb.scale, qa.scale, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(b.layer.module.bias, a.layer.module.bias, rtol=1e-4, atol=1e-5)
        moved += one.meta["match_moments"][a.name]["scale"]
    assert moved > 0.01  # the correction is not a no-op, so equal scales say something
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), one(x), rtol=1e-4, atol=1e-4)


# -- 2: zeroq on a float64 model ---------------------------------------------------------------
def test_zeroq_runs_on_a_float64_model():
    """Its shape probe was float32 and the error blamed the user's input dtype."""
    model = _cnn().double()
    recipe = _recipe([{"zeroq": {"iters": 2, "input_shape": [1, 8, 8], "batch_size": 8}}, "calibrate"],
                     calibration={"samples": 8, "batch_size": 8, "seed": 0})
    qm = lowbit.quantize(model, recipe, calib=None, progress=False)
    assert qm.calibrated and qm.meta["calibration_data"].startswith("zeroq")
    with torch.no_grad():
        assert qm(torch.zeros(2, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64


# -- 3: USP restores the BN statistics on failure; batches of one sample ------------------------
def _bn_state(qm) -> list[dict[str, torch.Tensor]]:
    from lowbit.model.fold_bn import BN_TYPES

    return [{k: v.clone() for k, v in m.state_dict().items()} | {"momentum": m.momentum, "training": m.training}
            for m in qm.net.modules() if isinstance(m, BN_TYPES)]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("fail_at", [1, 2])
def test_usp_interrupted_leaves_every_bn_as_it_was(error, fail_at):
    from lowbit.ptq.usp import update_bn_statistics

    x = _data((1, 8, 8))
    qm = lowbit.quantize(_cnn(), _recipe(["calibrate"], fold_bn=False), calib=x, progress=False)
    before = _bn_state(qm)
    calls = {"n": 0}

    def fail(_m, _a):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise error("stop")

    handle = qm.net.register_forward_pre_hook(fail)
    try:
        with pytest.raises(error):
            update_bn_statistics(qm, list(x.split(16)), progress=False)
    finally:
        handle.remove()
    after = _bn_state(qm)
    assert len(before) == 2
    for b, a in zip(before, after):
        assert b.keys() == a.keys()
        for k in b:
            assert torch.equal(b[k], a[k]) if isinstance(b[k], torch.Tensor) else b[k] == a[k], k


@pytest.mark.parametrize("sizes", [(1,) * 9, (1, 3, 1, 1, 2, 1)])
@torch.no_grad()
def test_usp_merges_every_single_sample_batch_on_batchnorm1d(sizes):
    """Only a last batch of one sample was merged: calibration.batch_size 1 (or any one-sample batch before the
    last) made BatchNorm1d raise a raw torch ValueError. Merged, the running mean is the mean over all samples."""
    from lowbit.model.fold_bn import BN_TYPES
    from lowbit.ptq.usp import update_bn_statistics

    x = _data((20,), n=sum(sizes))
    qm = lowbit.quantize(_mlp(bn=True), _recipe(["calibrate"], fold_bn=False), calib=x, progress=False)
    update_bn_statistics(qm, list(x.split(list(sizes))), progress=False)
    bn = next(m for m in qm.net.modules() if isinstance(m, BN_TYPES))
    seen = []
    handle = bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        qm(x)
    finally:
        handle.remove()
    torch.testing.assert_close(bn.running_mean, seen[0].mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(LowbitError, match="at least 2"):
        update_bn_statistics(qm, [x[:1]], progress=False)


def test_usp_step_with_calibration_batch_size_one():
    x = _data((20,), n=9)
    recipe = _recipe(["calibrate", "usp"], fold_bn=False, calibration={"samples": 9, "batch_size": 1, "seed": 0})
    assert lowbit.quantize(_mlp(bn=True), recipe, calib=x, progress=False).calibrated


# -- 4: lowbit.calibrate checks every argument before touching a grid ---------------------------
@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"weight_estimator": "minmax", "act_estimator": "msee"}, RecipeError, "estimator 'msee'"),
    ({"weight_estimator": "minmax", "observe": "Float"}, RecipeError, "observe='Float'"),
    ({"weight_estimator": "minmax", "act_estimator": "percentile", "act_options": {"qq": 1.0}}, RecipeError,
     "unknown option"),
    ({"weight_estimator": "minmax", "act_estimator": "percentile", "act_options": {"q": 10.0}}, RecipeError,
     r"\(50, 100\]"),
    ({"weight_estimator": "minmax", "act_estimator": "kl", "act_options": {"bins": 0}}, RecipeError, r"bins"),
    ({"weight_estimator": "minmax", "data": "empty"}, DataMismatchError, "batch 1 is empty"),
])
def test_calibrate_refuses_bad_arguments_before_rewriting_weight_grids(kwargs, error, message):
    x = _data((1, 8, 8))
    qm = lowbit.quantize(_cnn(), {**BASE, "weights": {"bits": 3, "estimator": "mse"}, "steps": ["calibrate"]},
                         calib=x, progress=False)
    before, meta = _weight_scales(qm), dict(qm.meta["calibration"])
    kwargs = dict(kwargs)
    data = [x[:16], x[:0]] if kwargs.pop("data", None) == "empty" else x
    with pytest.raises(error, match=message):
        lowbit.calibrate(qm, data, progress=False, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, _weight_scales(qm)))  # minmax grids differ from mse's
    assert qm.meta["calibration"] == meta


# -- 5: reconstruction options that would never be read are refused -----------------------------
@pytest.mark.parametrize(("step", "params", "message"), [
    ("adaquant", {"lr_round": 50.0}, "lr_round is not used here"),
    ("adaquant", {"reg_weight": 1e6}, "reg_weight is not used here"),
    ("adaquant", {"warmup": 0.0}, "warmup is not used here"),
    ("teacher_student", {"lr_scale": 1e-3}, "lr_scale is not used here"),
    ("adaround", {"lr_weight": 1e3}, "lr_weight is not used here"),
    ("adaround", {"rounding": "ste", "lr_round": 1e-2}, "lr_round is not used here"),
    ("qdrop", {"pd_temperature": 2.0}, "pd_temperature is not used here"),
    ("brecq", {"dc_lr": 0.1}, "dc_lr is not used here"),
    ("adaquant", {"granularity": "network", "input_quant_prob": 0.5}, "input_quant_prob is not used here"),
])
def test_reconstruction_options_that_are_never_read_are_refused_when_the_recipe_is_read(step, params, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe(["calibrate", {step: params}]))


@pytest.mark.parametrize(("step", "params"), [
    ("adaround", {"lr_weight": 1e-4, "learn_bias": True}),  # lr_weight drives the biases here
    ("adaround", {"lr_round": 1e-2, "reg_weight": 0.1, "warmup": 0.1}),
    ("adaquant", {"lr_weight": 1e-3, "lr_scale": 1e-3}),
    ("pdquant", {"pd_temperature": 2.0, "dc_lr": 0.1, "dc_reg": 0.5}),
])
def test_reconstruction_options_that_are_read_stay_accepted(step, params):
    assert load_recipe(_recipe(["calibrate", {step: params}])).steps[1] == (step, params)


def test_augment_repeats_on_inputs_that_are_not_images_is_refused_at_run_time():
    """Network-wise reconstruction and USP skipped the augmentation of 2-D inputs without a word."""
    from lowbit.ptq.reconstruct import reconstruct

    x = _data((20,))
    qm = lowbit.quantize(_mlp(), _recipe(["calibrate"]), calib=x, progress=False)
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    with pytest.raises(RecipeError, match=r"augment_repeats .* shape \(64, 20\)"):
        reconstruct(qm, [x], "adaquant", progress=False, iters=2, granularity="network", augment_repeats=2)
    assert all(torch.equal(v, qm.state_dict()[k]) for k, v in before.items())
    with pytest.raises(RecipeError, match="usp: augment_repeats"):
        lowbit.quantize(_mlp(bn=True), _recipe(["calibrate", {"usp": {"augment_repeats": 1}}], fold_bn=False),
                        calib=x, progress=False)
    with pytest.raises(RecipeError, match="padding and flip"):
        load_recipe(_recipe(["calibrate", {"usp": {"padding": 2}}], fold_bn=False))


# -- 6: a calibrate step naming the recipe's own estimator keeps its options --------------------
def test_calibrate_step_keeps_the_recipes_options_for_the_same_estimator_and_takes_its_own():
    x = _data((1, 8, 8))
    w = {"bits": 3, "symmetric": False, "estimator": "percentile", "estimator_options": {"q": 90.0}}
    plain = lowbit.quantize(_cnn(), _recipe(["calibrate"], weights=w), calib=x, progress=False)
    named = lowbit.quantize(_cnn(), _recipe([{"calibrate": {"weight_estimator": "percentile"}}], weights=w),
                            calib=x, progress=False)
    assert named.meta["calibration"]["weight_options"] == {"q": 90.0}
    assert all(torch.equal(a, b) for a, b in zip(_weight_scales(plain), _weight_scales(named)))
    other = lowbit.quantize(_cnn(), _recipe([{"calibrate": {"weight_estimator": "percentile",
                                                            "weight_options": {"q": 99.0}}}], weights=w),
                            calib=x, progress=False)
    assert other.meta["calibration"]["weight_options"] == {"q": 99.0}
    assert not all(torch.equal(a, b) for a, b in zip(_weight_scales(plain), _weight_scales(other)))
    minmax = lowbit.quantize(_cnn(), _recipe([{"calibrate": {"weight_estimator": "minmax"}}], weights=w),
                             calib=x, progress=False)
    assert minmax.meta["calibration"]["weight_options"] == {}  # the recipe's q is percentile's, not minmax's


@pytest.mark.parametrize(("step", "message"), [
    ({"weight_options": {"q": 10.0}}, r"steps\[0\]\.calibrate\.weight_options\.q .* \(50, 100\]"),
    ({"weight_estimator": "kl", "weight_options": {"q": 99.0}}, r"steps\[0\]\.calibrate\.weight_options: unknown"),
    ({"act_options": {"bins": 1}}, r"steps\[0\]\.calibrate\.act_options: unknown"),  # act estimator is minmax
    ({"act_options": [1]}, r"act_options=\[1\] is invalid"),
])
def test_calibrate_step_options_are_checked_against_their_estimator_at_load(step, message):
    w = {"bits": 3, "estimator": "percentile"}
    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe([{"calibrate": step}], weights=w))


# -- 7: estimator option ranges at recipe load ---------------------------------------------------
@pytest.mark.parametrize(("section", "message"), [
    ({"estimator": "kl", "estimator_options": {"bins": 0}}, r"bins of estimator 'kl' must be in \[2, ∞\), got 0"),
    ({"estimator": "kl", "estimator_options": {"bins": -5}}, r"bins of estimator 'kl'"),
    ({"estimator": "percentile", "estimator_options": {"q": 50}},
     r"q of estimator 'percentile' must be in \(50, 100\]"),
    ({"estimator": "percentile", "estimator_options": {"q": 100.5}}, r"\(50, 100\]"),
    ({"estimator": "mse", "estimator_options": {"ends": "both"}}, r"ends must be one of shared, independent"),
])
def test_estimator_option_ranges_are_checked_when_the_recipe_is_read(section, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe({"extends": "w4a4", "activations": section})


def test_estimate_range_checks_option_ranges_for_python_callers_and_kl_warns_when_bins_cannot_search():
    from lowbit.quant.estimators import estimate_range
    from lowbit.quant.spec import QuantSpec

    x = torch.randn(1, 20000, generator=torch.Generator().manual_seed(0)).abs()
    with pytest.raises(RecipeError, match="bins"):
        estimate_range("kl", x, QuantSpec(bits=4), False, bins=0)
    with pytest.warns(UserWarning, match="no threshold to search"):
        lo, hi = estimate_range("kl", x, QuantSpec(bits=4), False, bins=8)
    assert float(hi) == pytest.approx(float(x.max()))  # what bins <= levels gives: min-max, now said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, hi = estimate_range("kl", x, QuantSpec(bits=4), False, bins=2048)
    assert float(hi) < 0.9 * float(x.max())


# -- 8: a layer the calibration data never reaches ----------------------------------------------
class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = self.a(h) if float(h.mean()) < 1e6 else self.b(h)  # data-dependent: traced as hooks, b never runs
        return self.head(torch.flatten(h, 1))


def test_a_layer_the_data_never_reaches_is_named_with_keep_float_as_the_way_out():
    torch.manual_seed(0)
    model, x = _Branchy().eval(), _data((1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataMismatchError, match=r"input of layer\(s\) \['b'\].*keep_float: \['b'\]"):
            lowbit.quantize(model, _recipe(["calibrate"]), calib=x, progress=False)
        qm = lowbit.quantize(model, _recipe(["calibrate"], keep_float=["b"]), calib=x, progress=False)
    assert qm.calibrated


def test_an_observer_that_saw_nothing_raises_a_data_mismatch():
    from lowbit.quant.observer import SampleObserver

    with pytest.raises(DataMismatchError, match="'layer3.input_quantizer' saw no data.*keep_float"):
        SampleObserver("layer3.input_quantizer").sample()


# -- 9: crop-and-flip keeps its draws on the generator's device and moves them to the images' -----
def test_random_crop_flip_handles_images_on_another_device_than_its_generator():
    """A CPU generator's mask and offsets met CUDA images and failed. No GPU here: the 'meta' device stands in
    for one (any device other than the generator's took the same failing path); the CPU draws are unchanged."""
    from lowbit.data.augment import random_crop_flip

    x = _data((3, 8, 8), n=6)
    out = random_crop_flip(x.to("meta"), 2, True, torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == x.shape
    a = random_crop_flip(x, 2, True, torch.Generator().manual_seed(3))
    b = random_crop_flip(x, 2, True, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, x)
