"""Review fixes of the PTQ steps, each on a tiny synthetic model (no data files, no network).

1. bias_correction / match_moments on a layer called twice per forward: float target and correction
   from the same (first) call; split_units no longer recommends GPTQ for such a model.
2. EasyQuant on 1x1 outputs / one sample: a cosine of one value ties every scale.
3. match_moments' float variance as E[y²] − E[y]² cancelled in float32 for large-mean channels.
4. A QuantModel moved with ``.to()``: its float copy follows; tensors the steps create follow the model.
6. ``gptq: {regrid: true}`` re-fits grids with the calibrate step's weight estimator.
7. float64 calibration inputs: a dtype message, not a shape one.
8. Reconstruction loss of a Linear on [B, T, F] sums over the features.
"""
from __future__ import annotations

import contextlib
import re

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import DataMismatchError, UnsupportedModelError
from lowbit.ptq.calibrate import calibrate


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the conftest fixture restores its own count after each test


class Twice(nn.Module):
    """``c`` is called twice per forward, on inputs with different statistics."""

    def __init__(self):
        super().__init__()
        self.c0, self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.c0(x))
        x = torch.relu(self.c(x) + 1.0)
        x = torch.relu(self.c(x))
        return self.fc(x.mean((2, 3)))


class Net(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    m = Net()
    for b in (m.b1, m.b2):
        b.running_mean.uniform_(-0.5, 0.5)
        b.running_var.uniform_(0.5, 2)
        b.weight.data.uniform_(0.5, 1.5)
        b.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


W4A4 = {"weights": {"bits": 4, "per_channel": True, "estimator": "mse"}, "activations": {"bits": 4, "estimator": "mse"},
        "steps": ["calibrate"]}


def _layer(qm, name: str):
    return next(r.layer for r in qm.layers if r.name == name)


@torch.no_grad()
def _call_outputs(qm, name: str, x: torch.Tensor, float_net: bool) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    h = _layer(qm, name).register_forward_hook(lambda _m, _a, out: seen.append(out.double()))
    try:
        with qm.float_reference() if float_net else contextlib.nullcontext():
            qm(x)
    finally:
        h.remove()
    return seen


# -- 1 (and 5): a layer called twice ------------------------------------------------------------
@pytest.mark.parametrize("step", ["bias_correction", "match_moments"])
@torch.no_grad()
def test_a_layer_called_twice_is_corrected_to_the_float_statistics_of_the_call_it_is_measured_on(step):
    """The float target averaged both calls while the correction was measured on the first: the first call's
    channel means ended 0.28 off the float ones (0.02 with no correction at all)."""
    from lowbit.ptq.bias_correction import correct_bias
    from lowbit.ptq.moments import match_moments

    torch.manual_seed(0)
    qm = lowbit.prepare(Twice().eval(), {**W4A4, "weights": {"bits": 4, "per_channel": True}})
    x = torch.randn(64, 3, 8, 8)
    calibrate(qm, [x], progress=False)
    before = (_call_outputs(qm, "c", x, True)[0] - _call_outputs(qm, "c", x, False)[0]).mean((0, 2, 3)).abs().max()
    correct_bias(qm, [x], progress=False) if step == "bias_correction" else match_moments(qm, [x], progress=False)
    (f1, f2), (q1, _) = _call_outputs(qm, "c", x, True), _call_outputs(qm, "c", x, False)
    assert f1.mean((0, 2, 3)).sub(f2.mean((0, 2, 3))).abs().max() > 0.2  # the two calls do differ
    after = (f1 - q1).mean((0, 2, 3)).abs().max()
    assert after < 0.005 and after < before / 4
    if step == "match_moments":  # the variance too comes from the first call on both sides
        ratio = q1.var((0, 2, 3), unbiased=False) / f1.var((0, 2, 3), unbiased=False)
        assert (ratio - 1).abs().max() < 0.05


def test_the_called_twice_refusal_recommends_only_steps_that_handle_it():
    """GPTQ refuses such a model (through split_units); its message told the user to use gptq."""
    from lowbit.ptq.gptq import gptq

    torch.manual_seed(0)
    qm = lowbit.prepare(Twice().eval(), "w4a4")
    x = torch.randn(16, 3, 8, 8)
    calibrate(qm, [x], progress=False)
    with pytest.raises(UnsupportedModelError, match=r"layer\(s\) \['c'\] are called more than once") as err:
        gptq(qm, [x], progress=False)
    advice = str(err.value).split("Use ", 1)[1]
    assert "gptq" not in advice and "easyquant" not in advice
    assert "bias_correction" in advice and "match_moments" in advice


# -- 2: EasyQuant on a single value per channel ------------------------------------------------
def test_easyquant_scores_a_1x1_output_over_samples():
    from lowbit.ptq.easyquant import mean_cosine

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 1)
    target = torch.randn(32, 3, 1, 1)
    out = target + 0.5 * torch.randn(32, 3, 1, 1)
    expected = torch.nn.functional.cosine_similarity(out[:, :, 0, 0], target[:, :, 0, 0], dim=0)
    got = mean_cosine(out, target, per_channel=True, module=conv)
    torch.testing.assert_close(got, expected)
    assert (got.abs() < 0.99).all()  # not the ±1 of a one-value cosine


class SE(nn.Module):
    """Squeeze-excitation: 1x1 convs on pooled [N, C, 1, 1] features."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc1, self.fc2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        z = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.head((y * z).mean((2, 3)))


def _scale_ratios(qm, run) -> dict[str, torch.Tensor]:
    before = {r.name: r.layer.weight_quantizer.scale.clone() for r in qm.layers}
    run()
    return {r.name: (r.layer.weight_quantizer.scale / before[r.name]).flatten() for r in qm.layers}


def test_easyquant_no_longer_shrinks_the_scales_of_1x1_layers_to_the_lowest_candidate():
    from lowbit.ptq.easyquant import easyquant

    torch.manual_seed(0)
    qm = lowbit.prepare(SE().eval(), {**W4A4, "first_last_bits": 4})
    x = torch.randn(128, 3, 8, 8)
    calibrate(qm, [x], progress=False)
    ratios = _scale_ratios(qm, lambda: easyquant(qm, [x], progress=False, candidates=15, rounds=1))
    for name in ("fc1", "fc2"):  # were 0.25 (0.5 twice) for most channels
        assert float(ratios[name].median()) > 0.6, (name, ratios[name])
        assert float((ratios[name] < 0.3).float().mean()) < 0.25


def test_easyquant_keeps_the_calibrated_scale_where_every_candidate_ties():
    """One sample on a Linear: each channel's cosine is over one value, ±1 for every candidate."""
    from lowbit.ptq.easyquant import easyquant

    qm = lowbit.prepare(_net(), W4A4)
    x = torch.randn(1, 3, 8, 8)
    calibrate(qm, [x], progress=False)
    ratios = _scale_ratios(qm, lambda: easyquant(qm, [x], progress=False, candidates=10, rounds=1))
    assert torch.equal(ratios["fc"], torch.ones_like(ratios["fc"]))  # was 0.25 for 9 of 10 channels


# -- 3: moment matching of a channel with a large mean ------------------------------------------
@pytest.mark.parametrize("chunk", [0, 128])
@torch.no_grad()
def test_match_moments_keeps_the_variance_of_a_channel_with_a_large_mean(chunk):
    """BN with beta 20, gamma 0.02 after c2: in float32 E[y²] − E[y]² lost the variance (std halved)."""
    from lowbit.ptq.moments import match_moments

    torch.manual_seed(0)
    m = Net().eval()
    m.b2.bias[0], m.b2.weight[0] = 20.0, 0.02
    qm = lowbit.prepare(m, {"weights": {"bits": 8, "per_channel": True}, "activations": {"bits": 8},
                            "steps": ["calibrate"]})
    x = torch.randn(512, 3, 8, 8)
    calibrate(qm, list(x.split(128)), progress=False)
    float_std = float(_call_outputs(qm, "c2", x, True)[0][:, 0].std(unbiased=False))
    match_moments(qm, list(x.split(128)), progress=False, chunk=chunk)
    after = _call_outputs(qm, "c2", x, False)[0]
    assert float(after[:, 0].std(unbiased=False)) == pytest.approx(float_std, rel=0.02)
    assert float(after[:, 0].mean()) == pytest.approx(float(_call_outputs(qm, "c2", x, True)[0][:, 0].mean()),
                                                      abs=1e-3)


# -- 4: another device or dtype -----------------------------------------------------------------
@torch.no_grad()
def test_to_float64_takes_the_float_copy_along_and_bias_correction_runs_in_float64():
    from lowbit.ptq.bias_correction import correct_bias

    m = _net()
    qm = lowbit.prepare(m, W4A4)
    x = torch.randn(64, 3, 8, 8)
    calibrate(qm, [x], progress=False)
    qm.to(torch.float64)
    assert {f.dtype for _, f in qm._float_copy} == {torch.float64}
    shifts = correct_bias(qm, [x.double()], progress=False)  # RuntimeError: double input, float bias
    assert shifts and all(r.layer.module.bias.dtype == torch.float64 for r in qm.layers)
    with qm.float_reference():
        y = qm(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, m.double()(x.double()), rtol=1e-5, atol=1e-5)  # the float network, unedited


@torch.no_grad()
def test_the_float_copy_of_a_buffer_follows_to():
    """nn.Module replaces a buffer by a new tensor on ``.to()``: its float pair must find the new one."""
    m = _net()
    qm = lowbit.prepare(m, {**W4A4, "fold_bn": False})
    bn = next(mod for mod in qm.net.modules() if isinstance(mod, nn.BatchNorm2d))
    original = bn.running_mean.clone()
    qm.to(torch.float64)
    bn.running_mean.add_(1.0)  # as USP's re-estimate would
    with qm.float_reference():
        torch.testing.assert_close(bn.running_mean, original.double())
    torch.testing.assert_close(bn.running_mean, original.double() + 1)


# The meta device stands in for a GPU: a CPU tensor mixed into it raises, as on CUDA.
def test_gptq_retarget_makes_its_identity_on_the_hessians_device():
    from lowbit.ptq.gptq import retarget

    w, h = torch.empty(4, 6, device="meta"), torch.empty(6, 6, device="meta")
    assert retarget(w, h, h).device == torch.device("meta")  # torch.eye was made on the CPU


def test_bn_implied_sample_is_drawn_where_the_bn_coefficients_are():
    from lowbit.model.fold_bn import BNPrior
    from lowbit.ptq.bn_ranges import bn_implied_sample

    prior = BNPrior(beta=torch.zeros(4, device="meta"), gamma=torch.ones(4, device="meta"))
    assert bn_implied_sample(prior, True, total=64).device == torch.device("meta")
    cpu = BNPrior(beta=torch.full((4,), 0.5), gamma=torch.full((4,), 2.0))
    sample = bn_implied_sample(cpu, False, total=4096, seed=3)  # still N(beta, gamma²) per channel
    assert sample.device.type == "cpu" and abs(float(sample.mean()) - 0.5) < 0.1 and abs(float(sample.std()) - 2) < 0.1


def test_qdrop_masks_are_made_on_the_activations_device():
    import lowbit.ptq.reconstruct as R
    from lowbit.ptq.drop import keep_mask

    act = nn.Identity()  # stands in for an activation quantizer: QDrop's hook selects between its output and input
    with R._dropped([act], 0.5, torch.Generator().manual_seed(0)):
        assert act(torch.empty(4, 3, device="meta")).device == torch.device("meta")  # the CPU mask raised
    # drawn on the generator's device: the same seed gives the same mask wherever it goes
    assert torch.equal(keep_mask((64,), 0.5, torch.Generator().manual_seed(3), torch.device("cpu")),
                       keep_mask((64,), 0.5, torch.Generator().manual_seed(3)))


def test_easyquant_makes_its_factors_on_the_models_device(monkeypatch):
    import lowbit.ptq.easyquant as E

    qm = lowbit.prepare(_net(), W4A4)
    x = torch.randn(8, 3, 8, 8)
    calibrate(qm, [x], progress=False)
    qm.to("meta")
    made: list[torch.device] = []

    class Stop(Exception):
        pass

    def spy(t: torch.Tensor, *_a, **_k):  # the factors are made here; the search itself does not run on meta
        made.append(t.device)
        raise Stop

    monkeypatch.setattr(torch, "unique", spy)
    with pytest.raises(Stop):
        E.easyquant(qm, [x.to("meta")], progress=False)
    assert made == [torch.device("meta")]


@torch.no_grad()
def test_zeroq_distils_inputs_the_model_can_read():
    from lowbit.ptq.zeroq import distill_inputs

    qm = lowbit.prepare(_net(), {**W4A4, "fold_bn": False})
    qm.to(torch.float64)
    with torch.enable_grad():
        out = distill_inputs(qm, 4, (3, 8, 8), iters=2, progress=False)  # float32 inputs: RuntimeError
    assert out[0].dtype == torch.float64 and out[0].shape == (4, 3, 8, 8)


def test_run_step_moves_the_calibration_batches_to_the_model(monkeypatch):
    from lowbit import steps

    qm = lowbit.prepare(_net(), W4A4)
    qm.to("meta")
    seen: list[torch.device] = []
    monkeypatch.setitem(steps.STEPS, "calibrate",
                        lambda _qm, batches, *_a, **_k: seen.extend(b.device for b in batches))
    batches = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    steps.run_step("calibrate", {}, qm, batches, lowbit.load_recipe(W4A4), False)
    assert seen == [torch.device("meta")] * 2 and all(b.device.type == "meta" for b in batches)


def test_the_data_probe_does_not_take_a_device_difference_for_a_shape_error():
    """quantize() probes the batches before run_step moves them to the model."""
    from lowbit.checks import probe_forward

    qm = lowbit.prepare(_net(), W4A4)
    qm.to("meta")
    with qm.quantization(weights=False, activations=False):  # as calibrate probes it
        probe_forward(qm, torch.randn(2, 3, 8, 8), "calibration batch 0")  # raised "has shape ..."


# -- 6: GPTQ's regrid uses the calibrate step's weight estimator ---------------------------------
def test_gptq_regrid_refits_with_the_estimator_calibrate_used(monkeypatch):
    import lowbit.ptq.gptq as G

    used: list[tuple[str, dict]] = []
    fit = G.calibrate_weight_quantizer
    monkeypatch.setattr(G, "calibrate_weight_quantizer",
                        lambda q, w, est="mse", opts=None: used.append((est, dict(opts or {}))) or fit(q, w, est, opts))
    recipe = {**W4A4, "weights": {"bits": 4, "per_channel": True, "estimator": "mse"},
              "steps": [{"calibrate": {"weight_estimator": "minmax"}}, {"gptq": {"target": "float", "regrid": True}}]}
    torch.manual_seed(0)
    qm = lowbit.quantize(_net(), recipe, calib=torch.randn(32, 3, 8, 8), progress=False)
    assert used and set(e for e, _ in used) == {"minmax"} and all(o == {} for _, o in used)  # was "mse"
    assert qm.meta["calibration"]["weight_estimator"] == "minmax" and qm.meta["calibration"]["weight_options"] == {}


# -- 7: float64 inputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["calibrate", "quantize"])
def test_float64_calibration_inputs_are_named_as_a_dtype_problem(path):
    m = _net()
    x = torch.randn(16, 3, 8, 8).double()
    with pytest.raises(DataMismatchError) as err:
        if path == "calibrate":
            calibrate(lowbit.prepare(m, W4A4), [x], progress=False)
        else:
            lowbit.quantize(m, "w4a4", calib=x, progress=False)
    msg = str(err.value)
    assert "torch.float64" in msg and "torch.float32" in msg and ".float()" in msg
    assert not re.search(r"has shape|expects a 4-D", msg)


# -- 8: reconstruction loss of a Linear on [B, T, F] ---------------------------------------------
@pytest.mark.parametrize("method", ["adaround", "brecq", "pdquant"])  # layer-wise, block-wise, block + PD term
def test_reconstruction_loss_of_a_token_linear_sums_over_its_features(monkeypatch, method):
    import lowbit.ptq.reconstruct as R

    torch.manual_seed(0)
    T, F = 6, 5  # unequal to the features (8, 5), so the summed dim shows in the shapes
    model = nn.Sequential(nn.Linear(F, 8), nn.ReLU(), nn.Linear(8, F)).eval()
    x = torch.randn(64, T, F)
    qm = lowbit.prepare(model, {"weights": {"bits": 3}, "activations": {"bits": 3}, "first_last_bits": None})
    calibrate(qm, [x], progress=False)
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    loss = R._rec_loss

    def spy(out, target, *rest):
        value = loss(out, target, *rest)
        calls.append((out.detach(), target.detach(), value.detach()))
        return value

    monkeypatch.setattr(R, "_rec_loss", spy)
    params = {"dc_iters": 0} if method == "pdquant" else {}
    R.reconstruct(qm, [x], method=method, progress=False, iters=2, **params)
    assert len(calls) == 4
    # each layer's output features sit where the loss sums (dim 1), the tokens were summed before
    assert sorted({out.shape[1:] for out, _, _ in calls}) == [(5, T), (8, T)]
    for out, target, value in calls:
        torch.testing.assert_close(value, (out - target).pow(2).sum(1).mean())
