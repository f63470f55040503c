"""Fixes to the QAT quantizer families: each test fails on the code before its fix.

1. a k-means codebook is not silently replaced by a step-1 grid when `qat` trains another kind;
2. INQ's bits are capped, so a recipe's 8-bit first/last layers train with LSQ;
3. LSQ/LSQ+ (and PACT's LSQ+ inputs) train on exactly the values they deploy to;
4. an all-zero channel of TWN, XNOR, μL2Q and DoReFa deploys with a step its bias fits;
5. an all-zero channel on a 1-bit mid-rise grid stays ≈ 0 (not +½ everywhere);
6. per-channel codebook Gather indices do not wrap past 65535;
7. XNOR-Net activations are refused on a grouped conv;
8. the binary and ternary straight-through estimators give exactly their levels.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import RecipeError
from lowbit.qat.convert import freeze_batchnorms, to_deployed_form, to_training_form
from lowbit.quant import functional as F
from lowbit.quant.codebook import CodebookQuantizer
from lowbit.quant.learned.base import grad_scale
from lowbit.quant.learned.inq import INQQuantizer
from lowbit.quant.learned.lsq import LSQQuantizer
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.quant.registry import make_trainable
from lowbit.quant.spec import QuantSpec
from lowbit.zoo import SmallCNN


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the suite's conftest restores its own count after each test


def _images(n: int, seed: int, size: int = 12) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _cnn(seed: int = 0, width: int = 4, dead_channel: bool = False) -> nn.Module:
    """A tiny SmallCNN with BN statistics of its own; ``dead_channel``: conv2's channel 0 has γ = 0
    (its folded weights are all exactly zero, its output the bias 0.3), as in a slimmed network."""
    torch.manual_seed(seed)
    m = SmallCNN(width=width, input_size=12)
    m.train()
    with torch.no_grad():
        m(_images(64, 1))
        if dead_channel:
            m.bn2.weight[0], m.bn2.bias[0] = 0.0, 0.3
    return m.eval()


def _ptq(recipe: dict, model: nn.Module | None = None) -> lowbit.QuantModel:
    recipe = {"name": "t", "steps": ["calibrate"], **recipe}
    return lowbit.quantize(model if model is not None else _cnn(), recipe, calib=_images(64, 2), progress=False)


def _uniform(bits: int, scale, zero_point=0.0, signed: bool = True, per_channel: bool = False,
             grid: str = "midtread", symmetric: bool = True) -> UniformQuantizer:
    q = UniformQuantizer(QuantSpec(bits=bits, signed=signed, symmetric=symmetric, per_channel=per_channel, grid=grid))
    q.signed = signed
    q.set_params(torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(zero_point, dtype=torch.float32))
    return q


# -- 1. k-means codebooks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["uniform", "lsq", "ttq"])
def test_qat_after_kmeans_refuses_a_weight_kind_that_would_drop_the_codebook(kind):
    """`kmeans` then `qat` with weights.quantizer uniform (the w3a32-kmeans recipe's) trained the layers on the
    codebook's placeholder grid of step 1: conv2's weights deployed as {0, 1}. ttq, which refuses a 3-bit
    layer, went through the LSQ fallback to the same grid. Refused now, before any fallback."""
    qm = _ptq({"extends": "w3a32-kmeans", "steps": ["calibrate", "kmeans"]})
    assert isinstance(qm.layers["conv2"].layer.weight_quantizer, CodebookQuantizer)
    with pytest.raises(RecipeError, match=r"layer 'conv2' has a kmeans codebook .*weights.quantizer: kmeans"):
        to_training_form(qm, kind, "uniform", train_bn=False)
    # kmeans itself fine-tunes the centroids it was given, and the 8-bit first layer (no codebook) trains with LSQ
    qm = _ptq({"extends": "w3a32-kmeans", "steps": ["calibrate", "kmeans"]})
    before = torch.unique(qm.layers["conv2"].layer.quantized_weight().detach())
    info = to_training_form(qm, "kmeans", "uniform", train_bn=False)
    assert info["fallbacks"] == {"conv1.weight": "lsq", "linear.weight": "lsq"}
    qm.eval()
    to_deployed_form(qm)
    assert torch.equal(torch.unique(qm.layers["conv2"].layer.quantized_weight().detach()), before)


# -- 2. INQ's bit cap --------------------------------------------------------------------------------------------------

def test_inq_leaves_the_8_bit_first_and_last_layers_to_lsq():
    """w5a32-inq promises 8-bit LSQ first/last layers; INQ took them as 129-level power-of-two codebooks."""
    qm = _ptq({"extends": "w5a32-inq"})
    info = to_training_form(qm, "inq", "uniform", train_bn=False)
    assert info["fallbacks"] == {"conv1.weight": "lsq", "linear.weight": "lsq"}
    kinds = {r.name: type(r.layer.weight_quantizer) for r in qm.layers}
    assert kinds == {"conv1": LSQQuantizer, "conv2": INQQuantizer, "conv3": INQQuantizer, "linear": LSQQuantizer}
    assert qm.layers["conv2"].layer.weight_quantizer.levels.numel() == 17  # 5 bits: {0, ±2^n} × 8
    qm.eval()
    to_deployed_form(qm)
    deployed = {r.name: r.layer.weight_quantizer for r in qm.layers}
    assert type(deployed["conv1"]) is UniformQuantizer and deployed["conv1"].bits == 8
    assert len(torch.unique(qm.layers["conv1"].layer.quantized_weight().detach())) > 17  # an int8 grid's values
    assert isinstance(deployed["conv2"], CodebookQuantizer) and deployed["conv2"].centroids.numel() == 17


@pytest.mark.parametrize("bits, levels", [(3, 5), (5, 17), (7, 65)])
def test_inq_keeps_its_power_of_two_levels_up_to_seven_bits(bits, levels):
    w = torch.randn(8, 3, 3, 3) * 0.3
    q = make_trainable(_uniform(bits, 0.1), "inq", "weights", weight=w)
    assert q.levels.numel() == levels and bool((q.levels[q.levels > 0].log2() % 1 == 0).all())
    with pytest.raises(RecipeError, match="inq weights are for 7 bits or fewer"):
        make_trainable(_uniform(8, 0.1), "inq", "weights", weight=w)


# -- 3. LSQ's training forward is its deployed forward ------------------------------------------------------------

def test_grad_scale_keeps_the_value_exactly_and_scales_the_gradient():
    s = torch.rand(100000, generator=torch.Generator().manual_seed(0)) * 0.1 + 1e-3
    for n in (9 * 16, 3 * 3 * 64, 3 * 3 * 256, 32 * 32 * 16):
        g = 1 / math.sqrt(n * 7)
        x = s.clone().requires_grad_()
        out = grad_scale(x, g)
        assert torch.equal(out.detach(), s), n  # was (x − xg) + xg: 1489 of these 100000 steps an ulp off at n = 144
        out.backward(torch.ones_like(s))
        assert torch.allclose(x.grad, torch.full_like(s, g), rtol=1e-6)


@pytest.mark.parametrize("kind", ["lsq", "lsq+"])
def test_lsq_rounds_as_the_deployed_grid_at_a_float_tie(kind):
    """u = 0.49999997 with zero point 1: round(u + z) is round(1.5) = 2 in float32, while the deployed grid (and
    ONNX QuantizeLinear) computes round(u) + z = 1. LSQ (fused op) and LSQ+ (its learned-offset chain) now do too."""
    source = _uniform(4, 1.0, 1.0, signed=False, symmetric=False)  # codes 0..15, zero point 1
    q = make_trainable(source, kind, "activations")
    q.eval()
    x = torch.tensor([0.49999997, -1.49999997, 13.9, 14.6, -1.6, 3.5, 2.5]).requires_grad_()
    out = q(x)
    deployed = q.deploy()
    assert type(deployed) is UniformQuantizer
    assert torch.equal(out.detach(), deployed(x.detach()))
    assert out[0].item() == 0.0 and out[1].item() == -1.0  # round(u) + z, then − z


def test_lsq_gradients_are_lsqs_eq_3_clipped_on_the_unrounded_value():
    """The clip test moved from u + z to u against qmin − z, qmax − z: gradients as before (LSQ eq. 3)."""
    torch.manual_seed(0)
    for z in (0.0, 3.0):
        source = _uniform(4, 0.3, z, signed=False, symmetric=z == 0)
        for kind in ("lsq", "lsq+"):
            q = make_trainable(source, kind, "activations", grad_scale=False)
            x = (torch.randn(2000) * 3).requires_grad_()
            out = q(x)
            g = torch.randn_like(out)
            out.backward(g)
            u, s = x.detach() / 0.3, 0.3
            inside = (u + z >= 0) & (u + z <= 15)
            assert torch.allclose(x.grad, g * inside, rtol=1e-6, atol=0)  # (LSQ+'s chain: g·s·(1/s))
            ds = torch.where(inside, torch.round(u) - u, torch.where(u + z < 0, -z, 15 - z))
            assert torch.allclose(q.scale.grad, (g * ds).sum().reshape(q.scale.shape), rtol=1e-4)
            assert torch.equal(out.detach(), (torch.clamp(torch.round(u) + z, 0, 15) - z) * s)


@pytest.mark.parametrize("width, seed, act_kind", [(4, 0, "lsq"), (4, 2, "lsq+"), (8, 2, "pact")])
def test_a_trained_lsq_model_evaluates_as_it_deploys(width, seed, act_kind):
    """A few SGD steps, then the training form's eval forward against the deployed model: equal, where the
    grad_scale rounding and round(u + z) made them differ (here by 4e-7, 0.057 and 0.22 in the logits: a
    value an ulp from a rounding tie there takes the other code)."""
    qm = _ptq({"extends": "w4a4"}, _cnn(seed, width=width))
    to_training_form(qm, "lsq", act_kind, train_bn=False)
    assert_evaluates_as_deployed(qm, lr=0.01, steps=4, probes=1024)


def assert_evaluates_as_deployed(qm: lowbit.QuantModel, lr: float, steps: int, probes: int,
                                 freeze_at: int | None = None) -> None:
    """``steps`` SGD steps on batches of 64 random images (BN frozen before step ``freeze_at``), then the
    training form's eval forward must equal the deployed model's on ``probes`` images, logit for logit."""
    x, y = _images(256, 3), torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD([p for p in qm.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    qm.train()
    for i in range(steps):
        if i == freeze_at:
            freeze_batchnorms(qm)
        batch = slice((i % 4) * 64, (i % 4 + 1) * 64)
        loss = nn.functional.cross_entropy(qm(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    qm.eval()
    deployed = copy.deepcopy(qm)
    to_deployed_form(deployed)
    probe = _images(probes, 9)
    with torch.no_grad():
        assert torch.equal(qm(probe), deployed(probe))


# -- 4. / 5. all-zero channels ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, bits, grid", [("twn", 2, "midtread"), ("xnor", 1, "midrise"), ("ul2q", 2, "midrise"),
                                              ("dorefa", 2, "midrise")])
def test_an_all_zero_channel_deploys_with_a_step_its_bias_fits_and_exports(tmp_path, kind, bits, grid):
    """conv2's channel 0 is all zero after folding (γ = 0, β = 0.3): these kinds deployed it at step ~1e-12,
    so its bias 0.3 needed ~1e13 int32 steps and the export failed. Now TWN gives it step 1 (as PTQ and LSQ
    do) and the mid-rise kinds a tiny step (1e-4 of the layer's median), its values ≈ 0 either way."""
    ort = pytest.importorskip("onnxruntime")  # noqa: F841 - lowbit.OnnxModel runs it
    qm = _ptq({"extends": "w4a4", "weights": {"bits": bits, "grid": grid}}, _cnn(dead_channel=True))
    to_training_form(qm, kind, "lsq", train_bn=False)
    qm.eval()
    to_deployed_form(qm)
    layer = qm.layers["conv2"].layer
    step = layer.weight_quantizer.scale.detach()
    w = layer.quantized_weight().detach()
    if kind == "twn":
        assert step[0].item() == 1.0 and bool((w[0] == 0).all())
    else:
        ratio = step[0] / step[1:].median()
        assert 0.5e-4 < ratio.item() < 2e-4, ratio
        assert w[0].abs().max() <= 1e-3 * w[1:].abs().max()  # ±step/2: ≈ 0
    x = _images(64, 6)
    with torch.no_grad():
        ref = qm(x)
    path = lowbit.export_onnx(qm, tmp_path / f"zero_{kind}.onnx", x[:1])
    out = torch.as_tensor(lowbit.OnnxModel(path, threads=1)(x))
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()  # the integer runtime's rounding, nothing more
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_zero_width_range_on_a_mid_rise_grid_gets_a_tiny_step():
    spec = QuantSpec(bits=1, grid="midrise", signed=True, symmetric=True, per_channel=True)
    lo, hi = torch.tensor([-0.2, 0.0, -0.4, -0.1]), torch.tensor([0.1, 0.0, 0.3, 0.3])
    scale, zp = F.range_to_scale_zero_point(lo, hi, spec, True)
    assert torch.allclose(scale[[0, 2, 3]], torch.tensor([0.2, 0.4, 0.3]))  # amax / 2^(b−1)
    assert scale[1].item() == pytest.approx(1e-4 * 0.3)  # 1e-4 × the median live step (was 1: levels ±0.5)
    assert bool((zp == 0).all())
    whole, _ = F.range_to_scale_zero_point(torch.tensor(0.0), torch.tensor(0.0), spec.with_(per_channel=False), True)
    assert whole.item() == pytest.approx(1e-4)
    midtread = QuantSpec(bits=4, signed=True, symmetric=True, per_channel=True)
    assert F.range_to_scale_zero_point(lo, hi, midtread, True)[0][1].item() == 1.0  # code 0 is exact: unchanged


def test_binaryconnect_keeps_an_all_zero_channel_at_zero():
    """On the 1-bit mid-rise grid an all-zero channel became +0.5 everywhere (step 1), and BinaryConnect
    started (and stayed) at that level: conv2's channel 0 output 0.5·Σx instead of its bias."""
    qm = _ptq({"extends": "w1a32-binaryconnect", "steps": ["calibrate"]}, _cnn(dead_channel=True))
    layer = qm.layers["conv2"].layer
    live = layer.quantized_weight().detach()[1:].abs().max()
    assert layer.quantized_weight().detach()[0].abs().max() <= 1e-3 * live
    to_training_form(qm, "binaryconnect", "uniform", train_bn=False)
    q = layer.weight_quantizer
    assert q.level[0] <= 1e-3 * q.level[1:].max()
    x = _images(32, 5)
    seen = {}
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.__setitem__("out", out.detach()))
    for mode in (True, False):
        qm.train(mode)
        with torch.no_grad():
            qm(x)
        out = seen["out"]
        # the bias and ≈ nothing else (its ±step/2 weights add 2e-4 of a live channel's output; step 1 added 39)
        assert (out[:, 0] - 0.3).abs().max() <= 1e-3 * out[:, 1:].abs().max()
        assert out[:, 1:].std() > 0.05
    handle.remove()


# -- 6. Gather indices ------------------------------------------------------------------------------------------------

def test_per_channel_codebook_indices_past_65535_export_unwrapped(tmp_path):
    """LQ-Nets at 4 bits on a 4200-output Linear: 4200 × 16 flattened table entries, indices up to 67199,
    which the export stored as uint16 (wrapping to index 1663 and on)."""
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4200), nn.ReLU(),
                      nn.Linear(4200, 10)).eval()
    x = torch.randn(32, 1, 4, 4)
    qm = lowbit.quantize(m, {"extends": "w4a4", "name": "t", "steps": ["calibrate"]}, calib=x, progress=False)
    to_training_form(qm, "lqnet", "lsq", train_bn=False)
    qm.eval()
    to_deployed_form(qm)
    layer = next(r.layer for r in qm.layers if isinstance(r.layer.weight_quantizer, CodebookQuantizer))
    assert layer.weight_quantizer.centroids.shape == (4200, 16)
    path = lowbit.export_onnx(qm, tmp_path / "wide.onnx", x[:1])
    graph = onnx.load(str(path))
    stored = next(numpy_helper.to_array(i) for i in graph.graph.initializer if i.name.startswith("w_index")
                  and numpy_helper.to_array(i).size > 1)
    assert stored.dtype == np.int32 and int(stored.max()) > 65535  # (int32: what DequantizeLinear reads past uint8)
    gather = next(n for n in graph.graph.node if n.op_type == "Gather")
    graph.graph.output.append(onnx.helper.make_tensor_value_info(gather.output[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph.SerializeToString())
    rebuilt = sess.run([gather.output[0]], {sess.get_inputs()[0].name: x[:1].numpy()})[0]
    assert np.array_equal(rebuilt, layer.quantized_weight().detach().numpy())  # every weight its own centroid


# -- 7. XNOR-Net activations on grouped convs ---------------------------------------------------------------------

class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.linear = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv1(x)), 2)
        x = nn.functional.relu(self.conv3(nn.functional.relu(self.conv2(x))))
        return self.linear(torch.flatten(x, 1))


def test_xnor_activations_are_refused_on_a_grouped_conv():
    """K = mean_c |I| averages over every input channel, while a grouped conv's output reads only its group's:
    the grouped layer is refused by name before training, and QuantLayer refuses to compute its K."""
    torch.manual_seed(0)
    qm = _ptq({"extends": "w1a1-xnor"}, _Grouped().eval())
    with pytest.raises(RecipeError, match=r"layer 'conv2'.*grouped conv \(groups=2\)"):
        to_training_form(qm, "xnor", "xnor", train_bn=False)
    assert qm.layers["conv2"].layer.input_ref[0].method == "xnor"  # (swapped before the check refused it)
    with pytest.raises(RecipeError, match=r"layer 'conv2'.*groups=2"), torch.no_grad():
        qm(_images(2, 4))
    # the same network without groups trains with XNOR activations on conv2 and conv3
    plain = _Grouped()
    plain.conv2 = nn.Conv2d(8, 8, 3, padding=1)
    qm = _ptq({"extends": "w1a1-xnor"}, plain.eval())
    to_training_form(qm, "xnor", "xnor", train_bn=False)
    assert qm.layers["conv2"].layer.input_ref[0].method == "xnor"


# -- 8. exact straight-through estimators -------------------------------------------------------------------------

@pytest.mark.parametrize("kind, bits, grid", [("twn", 2, "midtread"), ("binaryconnect", 1, "midrise"),
                                              ("xnor", 1, "midrise"), ("dorefa", 1, "midrise")])
def test_binary_and_ternary_training_forward_is_exactly_the_deployed_weight(kind, bits, grid):
    """x + (q − x).detach() rounds (TWN: 142 of 18432 weights an ulp off); q + (x − x.detach()) is q exactly,
    with the same straight-through gradient."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, 3, 3, generator=g) * 0.05
    source = _uniform(bits, torch.rand(64, generator=g) * 0.05 + 0.01, torch.zeros(64), per_channel=True, grid=grid)
    q = make_trainable(source, kind, "weights", weight=w)
    q.eval()
    latent = w.clone().requires_grad_()
    out = q(latent)
    with torch.no_grad():
        exact = q(w)  # without a gradient: the levels themselves
    deployed = q.deploy(w)
    assert torch.equal(out.detach(), exact)
    assert torch.equal(out.detach(), q.deployed_weight(w))
    assert torch.equal(deployed(out.detach()), out.detach())  # the deployed grid reproduces them
    if kind == "twn":
        delta, alpha = q.threshold_and_alpha(w)
        assert torch.equal(out.detach(), alpha * torch.sign(w) * (w.abs() > delta))
    out.backward(torch.ones_like(out))
    if kind in ("twn", "binaryconnect"):
        assert torch.allclose(latent.grad, torch.ones_like(w))  # straight through
    if kind == "dorefa":
        assert torch.allclose(latent.grad, q._magnitude(w).expand_as(w))


def test_lqnet_starts_an_all_zero_channel_at_zero_and_keeps_it_there(tmp_path):
    """LQ-Nets' levels vᵀb (b ∈ {−1, +1}^K) have no 0 unless v = 0: on the 2-bit mid-tread grid the w2a2-lqnet
    recipes calibrate on, an all-zero channel's step is 1 and its basis started at (0.5, 1), so the channel
    became ±0.5 everywhere (a bias in each of its outputs) until QEM's moving average shrank it."""
    ort = pytest.importorskip("onnxruntime")  # noqa: F841 - lowbit.OnnxModel runs it
    qm = _ptq({"extends": "w4a4", "weights": {"bits": 2, "grid": "midtread"}}, _cnn(dead_channel=True))
    to_training_form(qm, "lqnet", "lsq", train_bn=False)
    layer = qm.layers["conv2"].layer
    q = layer.weight_quantizer
    assert bool((q.basis[0] == 0).all()) and bool((q.basis[1:] > 0).all())
    x = _images(32, 5)
    qm.train()
    with torch.no_grad():
        for _ in range(3):  # QEM fits the basis on every training forward
            qm(x)
            assert layer.quantized_weight().detach()[0].abs().max() == 0
    assert bool((q.basis[0] == 0).all())
    qm.eval()
    to_deployed_form(qm)
    assert layer.quantized_weight().detach()[0].abs().max() == 0
    with torch.no_grad():
        ref = qm(x)
    path = lowbit.export_onnx(qm, tmp_path / "zero_lqnet.onnx", x[:1])
    out = torch.as_tensor(lowbit.OnnxModel(path, threads=1)(x))
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("method", ["ttq", "inq", "lqnet"])
def test_training_a_finished_codebook_run_again_says_to_resume_it(method):
    """QAT on a TTQ / INQ / LQ-Nets-trained model was refused with k-means' advice ("put qat before kmeans")."""
    from lowbit.quant.codebook import CodebookQuantizer
    from lowbit.quant.registry import check_codebook_source

    done = CodebookQuantizer(QuantSpec(bits=2, signed=True, symmetric=True), torch.tensor([-0.1, 0.0, 0.1]),
                             name="conv2.weight", method=method)
    with pytest.raises(RecipeError, match=rf"the deployed form of a finished {method} run.*qat checkpoint folder"):
        check_codebook_source(done, method, "weights")
    kmeans = CodebookQuantizer(QuantSpec(bits=2, signed=True, symmetric=True), torch.tensor([-0.1, 0.0, 0.1]),
                               name="conv2.weight", method="kmeans")
    with pytest.raises(RecipeError, match="put `qat` before `kmeans`"):
        check_codebook_source(kmeans, "lsq", "weights")
