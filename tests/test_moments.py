"""match_moments (seed 004's USP on a folded network): each layer's channel mean and variance
on the calibration images become the float network's, with the integer weight codes unchanged."""
import pytest
import torch

import lowbit
from lowbit.errors import LowbitError, RecipeError

RECIPE = {"weights": {"bits": 2, "estimator": "mse", "symmetric": False},
          "activations": {"bits": 4, "estimator": "mse"}, "first_last_bits": None}


def _moments(qm, x, float_net: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    seen = {}

    def hook(layer, _args, out):
        dims = [d for d in range(out.dim()) if d != 1]
        seen[layer.name] = (out.mean(dims), out.var(dims, unbiased=False))

    handles = [r.layer.register_forward_hook(hook) for r in qm.layers]
    try:
        if float_net:
            with qm.float_reference():
                qm(x)
        else:
            qm(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def test_every_layer_gets_the_float_networks_channel_moments_with_the_same_codes(mnist_cnn):
    model, calib, _ = mnist_cnn
    plain = lowbit.quantize(model, {**RECIPE, "steps": ["calibrate"]}, calib=calib, progress=False)
    unbounded = {"match_moments": {"max_ratio": 100.0}}
    qm = lowbit.quantize(model, {**RECIPE, "steps": ["calibrate", unbounded]}, calib=calib, progress=False)
    target, before, after = _moments(plain, calib, True), _moments(plain, calib, False), _moments(qm, calib, False)
    moved = 0
    for i, (entry, ref) in enumerate(zip(qm.layers, plain.layers)):
        name, layer = entry.layer.name, entry.layer
        (m_f, v_f), (m_b, v_b), (m_a, v_a) = target[name], before[name], after[name]
        # the shift lands on the int32 bias grid (step s_in·s_w): the means agree to within one step
        # (half of it from rounding the new bias, up to a half from the old one's rounding, scaled)
        step = (layer.input_ref[0].scale * layer.weight_step()).flatten()
        assert torch.all((m_a - m_f).abs() <= step + 1e-5), name
        assert torch.allclose(v_a, v_f, rtol=1e-3, atol=1e-6), name
        moved += int((v_b - v_f).abs().gt(0.05 * v_f).sum())
        # same integer codes; each channel's step scaled with its weights
        codes = layer.weight_quantizer.codes(layer.quantized_weight())
        assert torch.equal(codes, ref.layer.weight_quantizer.codes(ref.layer.quantized_weight())), name
        if i == 0:  # the first layer's input is the same in both networks: its scale is sqrt(v_f / v_q)
            scale = layer.weight_quantizer.scale.flatten() / ref.layer.weight_quantizer.scale.flatten()
            assert torch.allclose(scale, (v_f / v_b).sqrt(), rtol=1e-4), name
    assert moved >= 5  # 2-bit weights do move the variances: the test is not vacuous
    assert set(qm.meta["match_moments"]) == {r.layer.name for r in qm.layers}
    bounded = lowbit.quantize(model, {**RECIPE, "steps": ["calibrate", "match_moments"]}, calib=calib, progress=False)
    ratios = torch.cat([(a.layer.weight_quantizer.scale / b.layer.weight_quantizer.scale).flatten()
                        for a, b in zip(bounded.layers, plain.layers)])
    assert ratios.min() >= 0.5 - 1e-6 and ratios.max() <= 2 + 1e-6  # max_ratio 2 by default
    assert ratios.max() > 1.9 or ratios.min() < 0.55  # and some channel does reach the bound here


def test_it_repairs_accuracy_and_mean_only_leaves_the_steps(mnist_cnn):
    from tests.conftest import batches

    model, calib, test = mnist_cnn
    plain = lowbit.quantize(model, {**RECIPE, "steps": ["calibrate"]}, calib=calib, progress=False)
    both = lowbit.quantize(model, {**RECIPE, "steps": ["calibrate", "match_moments"]}, calib=calib, progress=False)
    mean = lowbit.quantize(model, {**RECIPE, "steps": ["calibrate", {"match_moments": {"variance": False}}]},
                           calib=calib, progress=False)
    assert lowbit.evaluate(both, batches(test)) > lowbit.evaluate(plain, batches(test)) + 0.03
    for a, b in zip(mean.layers, plain.layers):
        assert torch.equal(a.layer.weight_quantizer.scale, b.layer.weight_quantizer.scale)
    assert all(v["scale"] == 0 for v in mean.meta["match_moments"].values())


def test_unfolded_bn_gets_the_float_statistics_it_was_trained_for(mnist_cnn):
    """fold_bn: false keeps BN as a float op: each conv's output is matched before its BN."""
    model, calib, _ = mnist_cnn
    unfolded = {**RECIPE, "fold_bn": False}
    plain = lowbit.quantize(model, {**unfolded, "steps": ["calibrate"]}, calib=calib, progress=False)
    qm = lowbit.quantize(model, {**unfolded, "steps": ["calibrate", "match_moments"]}, calib=calib, progress=False)
    with torch.no_grad():
        target, before, after = _moments(plain, calib, True), _moments(plain, calib, False), _moments(qm, calib, False)
    gap = {k: float((before[k][1] / target[k][1]).log().abs().mean()) for k in target}
    left = {k: float((after[k][1] / target[k][1]).log().abs().mean()) for k in target}
    assert all(left[k] < 0.1 * gap[k] + 1e-3 for k in target), (gap, left)


def test_saved_artifact_keeps_the_matched_model(mnist_cnn, tmp_path):
    model, calib, _ = mnist_cnn
    qm = lowbit.quantize(model, {**RECIPE, "steps": ["calibrate", "match_moments"]}, calib=calib, progress=False)
    lowbit.save(qm, tmp_path / "m.lowbit")
    back = lowbit.load(tmp_path / "m.lowbit", model=model)
    with torch.no_grad():
        assert torch.equal(back(calib[:64]), qm(calib[:64]))


def test_refusals_name_the_problem(mnist_cnn):
    model, calib, _ = mnist_cnn
    from lowbit.ptq.moments import match_moments
    from lowbit.qat.convert import attach_batchnorms

    training_form = lowbit.quantize(model, {**RECIPE, "steps": ["calibrate"]}, calib=calib, progress=False)
    assert attach_batchnorms(training_form, [calib], 0.1) > 0
    with pytest.raises(LowbitError, match="BatchNorm that trains with it.*before the qat step"):
        match_moments(training_form, [calib], progress=False)
    per_tensor = {**RECIPE, "weights": {**RECIPE["weights"], "per_channel": False}}
    with pytest.raises(LowbitError, match="no layer can take it.*per-tensor uniform grid.*variance: false"):
        lowbit.quantize(model, {**per_tensor, "steps": ["calibrate", "match_moments"]}, calib=calib, progress=False)
    mean_only = lowbit.quantize(model, {**per_tensor, "steps": ["calibrate", {"match_moments": {"variance": False}}]},
                                calib=calib, progress=False)
    assert all(v["shift"] > 0 for v in mean_only.meta["match_moments"].values())
    # codebook layers among uniform ones (k-means inside, the 8-bit first and last layers uniform): the
    # codebook layers are left as they are, and said so
    codebook = {"extends": "w4a4", "weights": {"bits": 3}}
    clustered = lowbit.quantize(model, {**codebook, "steps": ["calibrate", "kmeans"]}, calib=calib, progress=False)
    with pytest.warns(UserWarning, match=r"leaves 2 layer\(s\) uncorrected.*conv2 \(CodebookQuantizer weights\)"):
        qm = lowbit.quantize(model, {**codebook, "steps": ["calibrate", "kmeans", "match_moments"]}, calib=calib,
                             progress=False)
    assert qm.meta["match_moments"]["conv2"] == {"skipped": "CodebookQuantizer weights"}
    assert qm.meta["match_moments"]["conv1"]["scale"] > 0
    with torch.no_grad():
        assert torch.equal(qm.layers[1].layer.quantized_weight(), clustered.layers[1].layer.quantized_weight())
    with pytest.raises(RecipeError, match="max_ratio"):
        lowbit.quantize(model, {**RECIPE, "steps": ["calibrate", {"match_moments": {"max_ratio": 0.5}}]},
                        calib=calib, progress=False)
    with pytest.raises(LowbitError, match="calibrate first"):
        lowbit.quantize(model, {**RECIPE, "steps": ["match_moments"]}, calib=calib, progress=False)


def test_chunks_bound_memory_and_land_near_the_exact_correction(mnist_cnn):
    """Several chunks (each corrected by its own statistics on the way, as BN in training mode) give
    nearly the one-chunk answer: the same codes, the step scales within a few percent."""
    model, calib, _ = mnist_cnn
    exact = lowbit.quantize(model, {**RECIPE, "steps": ["calibrate", "match_moments"]}, calib=calib, progress=False)
    chunked = lowbit.quantize(model, {**RECIPE, "steps": ["calibrate", {"match_moments": {"chunk": 128}}]},
                              calib=calib, progress=False)
    for a, b in zip(exact.layers, chunked.layers):
        qa, qb = a.layer.weight_quantizer, b.layer.weight_quantizer
        assert torch.equal(qa.codes(a.layer.quantized_weight()), qb.codes(b.layer.quantized_weight()))
        assert torch.allclose(qa.scale, qb.scale, rtol=0.05), a.layer.name
    first_a, first_b = exact.layers[0].layer.weight_quantizer, chunked.layers[0].layer.weight_quantizer
    assert torch.allclose(first_a.scale, first_b.scale, rtol=1e-4)  # its input is the same: exact either way


def test_match_moments_names_outputs_too_large_for_their_squares_instead_of_writing_nan():
    """Inputs ~1e20 give outputs whose squares overflow float32: the weights became NaN, silently.
    (The float targets are float64 sums now, so the ~1e18 this test used no longer overflows.)"""
    from lowbit.errors import NumericalError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(32, 1, 8, 8) * 1e20
    with pytest.raises(NumericalError, match="not finite"):
        lowbit.quantize(model, {"extends": "w4a4", "first_last_bits": None, "steps": ["calibrate", "match_moments"]},
                        calib=x, progress=False)
