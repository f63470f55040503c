"""Issue 4's methods on real data: each one must repair a deliberately bad quantization.

The bad model: the MNIST SmallCNN with every layer at 2-bit affine per-channel weights
and 4-bit activations (MSE ranges), which loses ~18 points; budgets are small so the
whole file runs in about a minute.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from tests.conftest import batches

import lowbit
from lowbit.errors import LowbitError, RecipeError, UnsupportedModelError
from lowbit.ptq.adaround import AdaRoundWeight, beta_schedule
from lowbit.ptq.units import split_units
from lowbit.recipes.recipe import load_recipe

BAD = {"weights": {"bits": 2, "estimator": "mse", "symmetric": False},
       "activations": {"bits": 4, "estimator": "mse"}, "first_last_bits": None}

METHOD_STEPS = {
    "bias_correction": "bias_correction",
    "easyquant": {"easyquant": {"candidates": 20, "samples": 128}},
    "adaround": {"adaround": {"iters": 80}},
    "brecq": {"brecq": {"iters": 80}},
    "qdrop": {"qdrop": {"iters": 80}},
    "pdquant": {"pdquant": {"iters": 80, "dc_iters": 5}},
    "adaquant": {"adaquant": {"iters": 80}},
    "adaquant (network-wise)": {"adaquant": {"iters": 80, "granularity": "network"}},
    "teacher_student": {"teacher_student": {"iters": 80}},
}


@pytest.fixture(scope="module")
def bad_baseline(mnist_cnn):
    model, calib, test = mnist_cnn
    qm = lowbit.quantize(model, {**BAD, "steps": ["calibrate"]}, calib=calib, progress=False)
    return lowbit.evaluate(qm, batches(test))


@pytest.mark.parametrize("method", sorted(METHOD_STEPS))
def test_method_repairs_a_badly_quantized_model(mnist_cnn, bad_baseline, method):
    model, calib, test = mnist_cnn
    float_top1 = lowbit.evaluate(model, batches(test))
    qm = lowbit.quantize(model, {**BAD, "steps": ["calibrate", METHOD_STEPS[method]]}, calib=calib, progress=False)
    top1 = lowbit.evaluate(qm, batches(test))
    assert float_top1 - bad_baseline > 0.1, "the baseline is meant to be bad"
    assert top1 > bad_baseline + 0.03, (method, bad_baseline, top1, float_top1)
    # Still a deployable model: every weight on its quantizer's grid.
    for r in qm.layers:
        q = r.layer.weight_quantizer
        w = r.layer.quantized_weight().detach()
        assert torch.allclose(q.dequantize(q.codes(w)), w, atol=1e-6)


def _bn_mismatch(qm, x):
    from lowbit.ptq.bn_stats import bn_statistic_loss, bn_targets

    with torch.no_grad(), qm.float_reference(), bn_statistic_loss(bn_targets(qm)) as terms:
        qm(x)
        return float(sum(terms))


def test_zeroq_distils_bn_matching_inputs_and_calibrates_without_real_data(mnist_cnn):
    from lowbit.ptq.zeroq import distill_inputs

    model, calib, test = mnist_cnn
    recipe = {"weights": {"bits": 4}, "activations": {"bits": 4}, "first_last_bits": None,
              "calibration": {"samples": 64}}
    real = lowbit.evaluate(lowbit.quantize(model, recipe, calib=calib, progress=False), batches(test))
    zq = lowbit.quantize(model, {**recipe, "steps": [{"zeroq": {"iters": 40, "input_shape": [1, 28, 28]}}, "calibrate"]},
                         calib=None, progress=False)
    assert "no real images" in zq.meta["calibration_data"]
    assert lowbit.evaluate(zq, batches(test)) > real - 0.02
    qm = lowbit.prepare(model, recipe)
    noise = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    distilled = torch.cat(distill_inputs(qm, 32, (1, 28, 28), iters=40, seed=0, progress=False))
    assert _bn_mismatch(qm, distilled) < 0.25 * _bn_mismatch(qm, noise)


def test_zeroq_refuses_real_data_and_reconstruction_needs_calibration(mnist_cnn):
    model, calib, _ = mnist_cnn
    with pytest.raises(LowbitError, match="calib=None"):
        lowbit.quantize(model, {"steps": ["zeroq", "calibrate"]}, calib=calib, progress=False)
    with pytest.raises(LowbitError, match="calibrate step first"):
        lowbit.quantize(model, {"steps": ["adaround", "calibrate"]}, calib=calib, progress=False)
    with pytest.raises(LowbitError, match=r"zeroq's input_shape \[3, 28, 28\] has shape \(1, 3, 28, 28\); the "
                                          r"model's layer `conv1` \(Conv2d\) expects a 4-D \(N, C, H, W\) input with 1 channels"):
        lowbit.quantize(model, {"steps": [{"zeroq": {"input_shape": [3, 28, 28]}}, "calibrate"]}, progress=False)


def test_network_wise_reconstruction_fits_the_float_logits_and_refuses_a_checkpoint(mnist_cnn, tmp_path):
    from lowbit.ptq.cache import run_chunked
    from lowbit.ptq.reconstruct import reconstruct

    model, calib, _ = mnist_cnn
    qm = lowbit.quantize(model, {**BAD, "steps": ["calibrate"]}, calib=calib, progress=False)
    x = calib
    with torch.no_grad(), qm.float_reference():
        target = run_chunked(qm, x)

    def logit_error() -> float:
        with torch.no_grad():
            return float((run_chunked(qm, x) - target).pow(2).sum(1).mean())

    before = logit_error()
    losses = reconstruct(qm, [calib], "adaquant", progress=False, iters=60, granularity="network")
    assert list(losses) == ["network"]
    assert logit_error() < 0.7 * before
    with pytest.raises(RecipeError, match="no unit boundary to resume from"):
        reconstruct(qm, [calib], "adaquant", progress=False, iters=5, granularity="network", checkpoint=tmp_path)
    with pytest.raises(RecipeError, match="augment_repeats needs granularity: network"):
        reconstruct(qm, [calib], "adaquant", progress=False, iters=5, augment_repeats=1)


def test_bad_step_parameters_are_named_when_the_recipe_loads():
    from lowbit.recipes.recipe import load_recipe

    with pytest.raises(RecipeError, match="unknown parameter.*'iterations'"):
        load_recipe({"steps": ["calibrate", {"adaround": {"iterations": 5}}]})
    with pytest.raises(RecipeError, match="keep_prob"):
        load_recipe({"steps": ["calibrate", {"qdrop": {"keep_prob": 0}}]})
    with pytest.raises(RecipeError, match="unknown parameter.*'rounds_'"):
        load_recipe({"steps": ["calibrate", {"easyquant": {"rounds_": 1}}]})
    with pytest.raises(RecipeError, match="unknown parameter.*'foo'"):
        load_recipe({"steps": ["calibrate", {"usp": {"foo": 1}}]})


def test_bias_correction_matches_float_channel_means_of_first_layer(mnist_cnn):
    model, calib, _ = mnist_cnn
    qm = lowbit.quantize(model, {**BAD, "steps": ["calibrate", "bias_correction"]}, calib=calib, progress=False)
    first = qm.layers[0].layer
    seen = {}
    h = first.register_forward_hook(lambda _m, _a, out: seen.__setitem__("q", out.mean((0, 2, 3))))
    qm(calib)
    with qm.float_reference():
        h2 = first.register_forward_hook(lambda _m, _a, out: seen.__setitem__("f", out.mean((0, 2, 3))))
        qm(calib)
    h.remove()
    h2.remove()
    # Exact up to the int32 bias grid (step s_in·s_w per channel).
    step = (first.input_ref[0].scale * first.weight_quantizer.scale).max()
    assert torch.allclose(seen["q"], seen["f"], atol=float(step))


def _layer_output_means(qm, layer, x) -> torch.Tensor:
    seen = {}
    h = layer.register_forward_hook(lambda _m, _a, out: seen.__setitem__("m", out.mean((0, 2, 3)) if out.dim() == 4
                                                                         else out.mean(0)))
    try:
        qm(x)
    finally:
        h.remove()
    return seen["m"]


@torch.no_grad()
def test_weight_source_bias_correction_undoes_each_layers_own_rounding_shift(mnist_cnn):
    """source: weights -> every layer's quantized output mean equals that of its float weights with the original
    bias, on the corrected network's own input to it (Nagel et al. 2019, eq. 3), up to the int32 bias grid."""
    model, calib, _ = mnist_cnn
    plain = lowbit.quantize(model, {**BAD, "steps": ["calibrate"]}, calib=calib, progress=False)
    qm = lowbit.quantize(model, {**BAD, "steps": ["calibrate", {"bias_correction": {"source": "weights"}}]},
                         calib=calib, progress=False)
    moved = 0.0
    for entry, before in zip(qm.layers, plain.layers):
        layer = entry.layer
        if not layer.quantize_weight:
            continue
        b0 = before.layer.bias if before.layer.bias is not None else torch.zeros_like(layer.bias)
        shift = layer.bias - b0
        moved = max(moved, float(shift.abs().max()))
        q_mean = _layer_output_means(qm, layer, calib)
        layer.quantize_weight = False
        fw_mean = _layer_output_means(qm, layer, calib)
        layer.quantize_weight = True
        step = float((layer.input_ref[0].scale * layer.weight_quantizer.scale).max()) if layer.input_ref else 1e-5
        assert torch.allclose(q_mean, fw_mean - shift, atol=step + 1e-5), layer.name
    assert moved > 1e-3  # 2-bit weights do shift the means: the test is not vacuous
    with pytest.raises(RecipeError, match="source"):
        load_recipe({"steps": ["calibrate", {"bias_correction": {"source": "both"}}]})


@torch.no_grad()
def test_float_inputs_bias_correction_is_the_rounding_shift_on_the_float_networks_input(mnist_cnn):
    """source: float_inputs -> each layer's bias moves by E[(W − Q(W)) ∗ x_float], x_float its input in the
    float network (quantization off), computed by hand here layer by layer."""
    model, calib, _ = mnist_cnn
    plain = lowbit.quantize(model, {**BAD, "steps": ["calibrate"]}, calib=calib, progress=False)
    qm = lowbit.quantize(model, {**BAD, "steps": ["calibrate", {"bias_correction": {"source": "float_inputs"}}]},
                         calib=calib, progress=False)
    inputs = {}
    hooks = [e.layer.register_forward_hook(lambda m, a, _o, n=e.layer.name: inputs.__setitem__(n, a[0]))
             for e in plain.layers]
    with plain.quantization(weights=False, activations=False):
        plain(calib)
    for h in hooks:
        h.remove()
    checked = 0
    for entry, before in zip(qm.layers, plain.layers):
        layer, ref = entry.layer, before.layer
        if not layer.quantize_weight:
            continue
        x, error = inputs[layer.name], ref.weight - ref.quantized_weight()
        out = torch.nn.functional.linear(x, error) if x.dim() == 2 else ref.module._conv_forward(x, error, None)
        expected = out.mean([d for d in range(out.dim()) if d != 1])
        b0 = ref.bias if ref.bias is not None else torch.zeros_like(layer.bias)
        assert torch.allclose(layer.bias - b0, expected, atol=1e-5), layer.name
        checked += float(expected.abs().max()) > 1e-3
    assert checked >= 2  # the low-bit layers do shift: not vacuous
    with pytest.raises(LowbitError, match="float_inputs after gptq"):
        lowbit.quantize(model, {**BAD, "steps": ["calibrate", "gptq", {"bias_correction": {"source": "float_inputs"}}]},
                        calib=calib, progress=False)


def test_weight_source_bias_correction_is_refused_after_learned_rounding_and_kept_after_adaquant(mnist_cnn):
    """AdaRound bakes its rounded weights into the float copy: a weight-rounding shift is then zero, and a
    correction that silently adds nothing would be a wrong report. AdaQuant's latent weights still round."""
    model, calib, _ = mnist_cnn
    with pytest.raises(LowbitError, match="weights after adaround changes nothing"):
        lowbit.quantize(model, {**BAD, "steps": ["calibrate", {"adaround": {"iters": 2}},
                                                 {"bias_correction": {"source": "weights"}}]},
                        calib=calib, progress=False)
    qm = lowbit.quantize(model, {**BAD, "steps": ["calibrate", {"adaquant": {"iters": 2}},
                                                  {"bias_correction": {"source": "weights"}}]},
                         calib=calib, progress=False)
    assert max(qm.meta["bias_correction"].values()) > 0


def test_units_chain_equals_the_model_and_blocks_are_residual_blocks(resnet20, cifar_slices):
    calib, _ = cifar_slices
    cheap = {"extends": "w4a4", "weights": {"estimator": "minmax"}, "activations": {"estimator": "minmax"}}
    qm = lowbit.quantize(resnet20, cheap, calib=calib[:64], progress=False)
    units = split_units(qm)
    assert [u.name for u in units][:3] == ["conv1", "layer1.0", "layer1.1"]
    assert [len(u.layers) for u in units] == [1] + [2] * 9 + [1]
    x = calib[:8]
    y = x
    for u in units:
        y = u(y)
    assert torch.equal(y, qm(x))


def test_float_reference_is_the_original_network_after_edits(mnist_cnn):
    model, calib, _ = mnist_cnn
    qm = lowbit.quantize(model, {**BAD, "steps": ["calibrate", "bias_correction", {"adaquant": {"iters": 5}}]},
                         calib=calib, progress=False)
    with qm.float_reference():
        out = qm(calib[:16])
    assert torch.allclose(out, model(calib[:16]), atol=1e-4)
    assert not torch.allclose(qm(calib[:16]), out, atol=1e-2)


def test_hook_fallback_models_get_a_clear_reconstruction_error(mnist_cnn):
    model, calib, _ = mnist_cnn
    qm = lowbit.prepare(model, BAD)
    qm.mode = "hooks"
    with pytest.raises(UnsupportedModelError, match="graph"):
        split_units(qm)


def test_adaround_starts_at_the_float_weight_and_bakes_onto_the_grid(mnist_cnn):
    model, calib, _ = mnist_cnn
    qm = lowbit.quantize(model, BAD, calib=calib, progress=False)
    layer = qm.layers[1].layer
    r = AdaRoundWeight(layer)
    w = layer.module.weight.detach()
    q = layer.weight_quantizer
    codes = w / r.scale + r.zero_point
    qmin, qmax = q.code_range()
    inside = (codes > qmin) & (codes < qmax)
    assert torch.allclose(r()[inside], w[inside], atol=1e-3 * float(q.scale.max()))
    r.bake(layer)
    baked = layer.module.weight.detach()
    assert torch.equal(q(baked), baked)  # round-to-nearest reproduces the learned codes
    moved = (q.codes(baked).float() - torch.floor(codes))[inside]
    assert set(moved.unique().tolist()) == {0.0, 1.0}  # every weight rounded down or up, and both occur
    assert beta_schedule(0, 100) is None and beta_schedule(19, 100) is None
    assert beta_schedule(20, 100) == pytest.approx(20.0) and beta_schedule(99, 100) == pytest.approx(2.0, abs=0.3)


def test_reconstruction_resumes_from_its_checkpoint(mnist_cnn, tmp_path, monkeypatch):
    model, calib, _ = mnist_cnn
    ckpt = tmp_path / "ckpt"
    recipe = {**BAD, "steps": ["calibrate", {"adaround": {"iters": 10, "checkpoint": str(ckpt)}}]}
    import lowbit.ptq.reconstruct as R

    calls = []
    real = R._layer

    def stop_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[1].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "_layer", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        lowbit.quantize(model, recipe, calib=calib, progress=False)
    assert json.loads((ckpt / "progress.json").read_text())["units_done"] == 2
    calls.clear()
    monkeypatch.setattr(R, "_layer", lambda *a, **k: calls.append(a[1].name) or real(*a, **k))
    qm = lowbit.quantize(model, recipe, calib=calib, progress=False)
    assert calls == ["conv3", "linear"]  # the first two units were restored, not redone
    assert json.loads((ckpt / "progress.json").read_text())["units_done"] == 4
    straight = lowbit.quantize(model, {**BAD, "steps": ["calibrate", {"adaround": {"iters": 10}}]}, calib=calib,
                               progress=False)
    for (k, a), (_, b) in zip(straight.state_dict().items(), qm.state_dict().items()):
        assert torch.equal(a, b), k  # the sampler resumed where it was: the same batches, the same result
    other = {**BAD, "steps": ["calibrate", {"adaround": {"iters": 11, "checkpoint": str(ckpt)}}]}
    with pytest.raises(LowbitError, match="different reconstruction"):
        lowbit.quantize(model, other, calib=calib, progress=False)
    elsewhere = {**recipe, "weights": {**BAD.get("weights", {}), "bits": 3}}  # another start, same settings
    with pytest.raises(LowbitError, match="another starting point"):
        lowbit.quantize(model, elsewhere, calib=calib, progress=False)
    with pytest.raises(LowbitError, match="another starting point"):
        lowbit.quantize(model, recipe, calib=calib[: len(calib) // 2], progress=False)
    state = next(ckpt.glob("state*.safetensors"))
    state.write_bytes(state.read_bytes()[:100])  # damaged on disk
    with pytest.raises(LowbitError, match="cannot read reconstruction checkpoint .*delete the directory"):
        lowbit.quantize(model, recipe, calib=calib, progress=False)
    assert qm.calibrated


@pytest.mark.parametrize("steps", [["calibrate", "bias_correction"], ["calibrate", {"adaround": {"iters": 5}}]])
def test_method_results_survive_save_and_load(tmp_path, steps):
    from lowbit.zoo import build

    torch.manual_seed(0)
    model = build("small_cnn").eval()
    x = torch.randn(64, 1, 28, 28)
    # Unfolded BN: the convolutions have no bias until bias correction adds one.
    qm = lowbit.quantize(model, {"extends": "w4a4", "fold_bn": False, "steps": steps}, calib=x, progress=False)
    path = lowbit.save(qm, tmp_path / "m.lowbit")
    assert torch.equal(lowbit.load(path)(x), qm(x))


def test_capture_inputs_stops_early_and_records_what_capture_layers_records(resnet20, cifar_slices):
    """The early-stopping capture gives the same per-layer inputs as a full pass, and the
    unit's later layers are not run for it."""
    from lowbit.ptq.cache import capture_inputs, capture_layers

    cheap = {"extends": "w4a4", "weights": {"estimator": "minmax"}, "activations": {"estimator": "minmax"}}
    qm = lowbit.quantize(resnet20, cheap, calib=cifar_slices[0][:64], progress=False)
    unit = split_units(qm)[1]
    x = torch.randn(20, 16, 32, 32).relu()
    full, _, _ = capture_layers(unit, x, unit.layers, outputs=False, chunk=8)
    ran = []
    handle = unit.layers[-1].register_forward_hook(lambda *_: ran.append(1))
    try:
        first = capture_inputs(unit, x, unit.layers[:1], chunk=8)
    finally:
        handle.remove()
    assert torch.equal(first[unit.layers[0].name], full[unit.layers[0].name]) and not ran
    both = capture_inputs(unit, x, unit.layers, chunk=8)
    assert all(torch.equal(both[n], full[n]) for n in full) and len(both) == len(unit.layers)


def test_per_channel_corrections_of_a_linear_on_token_sequences_work_per_feature():
    """A Linear on [batch, tokens, features] has its channels last: bias correction and moment matching took dim 1
    (the tokens), raised on a shape clash, or, with as many tokens as features, silently corrected per token."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5)).eval()
    x = torch.randn(64, 8, 8) + torch.linspace(-1, 1, 8)  # as many tokens as features
    recipe = {"weights": {"bits": 3}, "activations": {"bits": 8}, "first_last_bits": None}  # a fine int32 bias grid
    with torch.no_grad():
        float_mean = model[0](x).mean((0, 1))
    errors = {}
    for step in ("calibrate", "bias_correction", "match_moments"):
        qm = lowbit.quantize(model, {**recipe, "steps": ["calibrate"] + [step] * (step != "calibrate")}, calib=x,
                             progress=False)
        seen = []
        handle = qm.layers["0"].layer.register_forward_hook(lambda _m, _a, out: seen.append(out))
        with torch.no_grad():
            qm(x)
        handle.remove()
        errors[step] = float((seen[0].mean((0, 1)) - float_mean).abs().max())  # per feature
    # corrected to the int32 bias grid (s_w·s_x, about 4e-3 here), from a shift several times larger
    assert errors["calibrate"] > 0.02 and errors["bias_correction"] < 3e-3 and errors["match_moments"] < 3e-3, errors
    qm = lowbit.quantize(model, {**recipe, "steps": ["calibrate", "easyquant"]}, calib=torch.randn(64, 6, 8),
                         progress=False)
    assert qm.calibrated


def test_recalibration_after_usp_keeps_the_calibrate_steps_settings(mnist_cnn):
    """USP, k-means and GPTQ re-fit activation ranges: they used the recipe-level estimator and quantized-weight
    observation, dropping ``calibrate: {act_estimator: minmax, observe: float}``, while the meta still named them."""
    from lowbit.ptq.calibrate import calibrate_activations

    model, calib, _ = mnist_cnn
    steps = [{"calibrate": {"act_estimator": "minmax", "observe": "float"}}, "usp"]
    qm = lowbit.quantize(model, {**BAD, "fold_bn": False, "steps": steps}, calib=calib, progress=False)
    assert qm.meta["calibration"]["act_estimator"] == "minmax" and qm.meta["calibration"]["observe"] == "float"
    scales = {n: q.scale.clone() for n, q in qm.act_quantizers().items()}
    calibrate_activations(qm, [calib], "minmax", {}, seed=0, progress=False, observe="float")
    assert all(torch.equal(q.scale, scales[n]) for n, q in qm.act_quantizers().items())  # what the step re-fitted
    assert set(qm.meta["calibration"]["act_estimators_used"].values()) == {"minmax"}


def test_public_calibrate_takes_what_quantize_takes_and_checks_it_before_changing_anything(mnist_cnn):
    """lowbit.calibrate on a DataLoader of (input, label) pairs raised deep in an observer; on a wrongly shaped
    tensor, inside a matmul; on nothing, after rewriting every weight range."""
    from torch.utils.data import DataLoader, TensorDataset

    from lowbit.errors import DataMismatchError

    model, calib, _ = mnist_cnn
    labels = torch.zeros(len(calib), dtype=torch.long)
    qm = lowbit.prepare(model, "w4a4")
    lowbit.calibrate(qm, DataLoader(TensorDataset(calib, labels), batch_size=64), progress=False)
    assert qm.calibrated
    before = [q.scale.clone() for q in qm.weight_quantizers()]
    with pytest.raises(DataMismatchError, match="calibration batch 0 has shape"):
        lowbit.calibrate(qm, calib.flatten(1), progress=False)
    with pytest.raises(LowbitError, match="empty"):
        lowbit.calibrate(qm, [], progress=False)
    assert all(torch.equal(q.scale, before[i]) for i, q in enumerate(qm.weight_quantizers()))  # left as it was


def test_reconstruction_refuses_what_it_would_get_wrong_before_any_work(mnist_cnn, tmp_path):
    """k-means then AdaRound rounded onto the codebook's placeholder grid (every weight a code 0..K-1); a moving
    weight step under learned rounding re-rounded the learned codes; PD-Quant's terms were dropped layer-wise; a
    tuple output and a checkpoint that is a file failed deep inside torch after work was done."""
    model, calib, _ = mnist_cnn
    small = {**BAD, "calibration": {"samples": 64, "batch_size": 32}}
    with pytest.raises(RecipeError, match="layer 'conv1' has CodebookQuantizer weights"):
        lowbit.quantize(model, {**small, "weights": {"bits": 3}, "steps": ["calibrate", "kmeans",
                                                                            {"adaround": {"iters": 2}}]},
                        calib=calib, progress=False)
    with pytest.raises(RecipeError, match="learn_weight_scale needs rounding: ste"):
        load_recipe({"steps": ["calibrate", {"brecq": {"learn_weight_scale": True}}]})
    with pytest.raises(RecipeError, match="pd_weight .* needs granularity block or network"):
        load_recipe({"steps": ["calibrate", {"pdquant": {"granularity": "layer"}}]})
    with pytest.raises(RecipeError, match="dc_iters .* needs granularity block"):
        load_recipe({"steps": ["calibrate", {"pdquant": {"granularity": "network", "pd_weight": 1.0}}]})

    class TwoOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x), x.mean()

    with pytest.raises(UnsupportedModelError, match="returns a tuple"):
        lowbit.quantize(TwoOutputs(), {**small, "steps": ["calibrate", {"adaround": {"iters": 2}}]}, calib=calib,
                        progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(RecipeError, match="is a file; give a folder"):
        lowbit.quantize(model, {**small, "steps": ["calibrate", {"adaround": {"iters": 2, "checkpoint":
                                                                               str(tmp_path / "file")}}]},
                        calib=calib, progress=False)


def test_a_float_layer_in_layerwise_reconstruction_is_left_alone(mnist_cnn):
    model, calib, _ = mnist_cnn
    recipe = {**BAD, "calibration": {"samples": 64, "batch_size": 32},
              "overrides": [{"pattern": "conv2", "w_bits": 32}], "steps": ["calibrate", {"adaround": {"iters": 2}}]}
    qm = lowbit.quantize(model, recipe, calib=calib, progress=False)  # raised "does not require grad"
    assert math.isnan(qm.meta["reconstruction"][0]["final_losses"]["conv2"])


def test_pdquant_runs_the_rest_of_the_network_with_the_float_weights(mnist_cnn, monkeypatch):
    """After GPTQ (which edits the weights in place) the PD term's "float" rest of the network was the edited one."""
    import lowbit.ptq.reconstruct as rc

    model, calib, _ = mnist_cnn
    checks = []
    real_optimize = rc._optimize

    def spy(cfg, layers, quantizers, forward, q_in, fp_in, target, extra, gen, progress, name):
        if extra is not None and not checks:  # the first block: the last layer is in the rest
            last = qm_of[0].layers[-1].layer.module.weight
            float_value = next(f for t, f in qm_of[0]._float_copy if t is last)
            checks.append((torch.equal(last, float_value), float(gptq_moved[0])))
        return real_optimize(cfg, layers, quantizers, forward, q_in, fp_in, target, extra, gen, progress, name)

    qm_of, gptq_moved = [], []
    real_split = rc.split_units

    def split(qm):
        qm_of.append(qm)
        last = qm.layers[-1].layer.module.weight
        gptq_moved.append((last - next(f for t, f in qm._float_copy if t is last)).abs().max())
        return real_split(qm)

    monkeypatch.setattr(rc, "split_units", split)
    monkeypatch.setattr(rc, "_optimize", spy)
    steps = ["calibrate", "gptq", {"pdquant": {"iters": 1, "dc_iters": 0}}]
    lowbit.quantize(model, {**BAD, "calibration": {"samples": 64, "batch_size": 32}, "steps": steps}, calib=calib,
                    progress=False)
    (is_float, moved), = checks
    assert moved > 0 and is_float  # GPTQ had moved it; the PD term ran it at its float value


def test_reconstruction_refuses_a_layer_called_twice():
    """Its cached inputs of one call were paired with the outputs of the other (or a raw KeyError)."""
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.c, self.fc = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1), \
                torch.nn.Linear(4, 3)

        def forward(self, x):
            s = torch.relu(self.stem(x))
            return self.fc((s + self.c(torch.relu(self.c(s)))).mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8)
    with pytest.raises(UnsupportedModelError, match=r"layer\(s\) \['c'\] are called more than once"):
        lowbit.quantize(Twice().eval(), {**BAD, "calibration": {"samples": 32, "batch_size": 16},
                                         "steps": ["calibrate", {"adaround": {"iters": 2}}]}, calib=x, progress=False)
