"""Fixes from the review of lowbit.model: tied weights and the float reference, Linear+BN folding,
as_float_model with keep_float, training-dependent forwards, functionally used layers, pre-hooks,
quantizer names, add/pool spellings, Bi-Real on odd maps, lazy layers and SyncBatchNorm."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

import lowbit
from lowbit.errors import UnsupportedModelError
from lowbit.model.as_float import as_float_model
from lowbit.zoo.resnet_cifar import resnet_cifar


def _random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine terms far from the identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


def _float_path(qm: lowbit.QuantModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), qm.quantization(weights=False, activations=False):
        return qm(x)


def _gptq_w2(**changes) -> dict:
    return {"name": "t", "weights": {"bits": 2}, "activations": {"bits": 8}, "steps": ["calibrate", "gptq"],
            **changes}


# -- 1. tied weights: the float reference --------------------------------------------------------
class _TiedPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(torch.relu(self.stem(x)))))))


def test_float_reference_of_tied_layers_is_the_float_model_after_gptq():
    torch.manual_seed(0)
    model, x = _TiedPair().eval(), torch.randn(128, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(model, _gptq_w2(), calib=x, progress=False)
    assert not torch.equal(qm.layers["b"].layer.module.weight, model.b.weight)  # GPTQ edited the untied copy
    with torch.no_grad(), qm.float_reference():
        assert torch.allclose(qm(x), model(x), atol=1e-6)
        assert torch.equal(qm.layers["b"].layer.weight, model.b.weight)


# -- 4. a weight tied to a keep_float layer ------------------------------------------------------
def test_weight_shared_with_a_keep_float_layer_is_untied():
    torch.manual_seed(0)
    model, x = _TiedPair().eval(), torch.randn(128, 16)
    with pytest.warns(UserWarning, match="a and b share weights"):
        qm = lowbit.quantize(model, _gptq_w2(keep_float=["b"]), calib=x, progress=False)
    kept = qm.net.get_submodule("b")
    assert type(kept) is nn.Linear and kept.weight is not qm.layers["a"].layer.module.weight
    assert torch.equal(kept.weight, model.b.weight)  # GPTQ's edits of `a` did not reach it
    with torch.no_grad(), qm.float_reference():
        assert torch.allclose(qm(x), model(x), atol=1e-6)


# -- 2. Linear + BatchNorm on more than 2 dims -----------------------------------------------------
class _SeqBN(nn.Module):
    """Linear on (N, T, F), then BatchNorm1d(T), which normalises the T axis."""

    def __init__(self, t: int, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(6, c)
        self.bn = nn.BatchNorm1d(t)
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.fc(x)))


class _Linear4dBN(nn.Module):
    """Linear on the last axis of (N, C, H, W), then BatchNorm2d(C)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 3 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.bn(self.fc(x)), 1))


@pytest.mark.parametrize("t, c", [(5, 8), (8, 8)])
def test_linear_batchnorm_normalising_another_axis_is_not_folded(t, c):
    model, x = _random_bn(_SeqBN(t, c)), torch.randn(4, t, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = lowbit.prepare(model, "w8a8")
    # said where the BN could have been the features' (as many as the Linear's outputs) and is left unfolded
    assert any("'bn' after Linear 'fc' kept unfolded" in str(w.message) for w in caught) == (t == c)
    assert "fc" not in qm.layer_bn
    assert torch.allclose(_float_path(qm, x), model(x), atol=1e-5)


def test_linear_on_4d_input_before_batchnorm2d_is_not_folded():
    model, x = _random_bn(_Linear4dBN()), torch.randn(4, 6, 3, 5)
    qm = lowbit.prepare(model, "w8a8")
    assert "fc" not in qm.layer_bn
    assert torch.allclose(_float_path(qm, x), model(x), atol=1e-5)


def test_linear_batchnorm_after_a_flatten_still_folds():
    """Guards against over-refusal (passes before the fix too): LeNet-5's flatten → fc1 → bn3."""
    model = _random_bn(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 8), nn.BatchNorm1d(8),
                                     nn.ReLU(), nn.Linear(8, 3)))
    x = torch.randn(4, 1, 8, 8)
    qm = lowbit.prepare(model, "w8a8")
    assert "2" in qm.layer_bn
    assert torch.allclose(_float_path(qm, x), model(x), atol=1e-5)


# -- 3. as_float_model with a keep_float layer whose BN folded --------------------------------------
def test_as_float_model_folds_a_keep_float_layers_batchnorm_once():
    torch.manual_seed(0)
    model = _random_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(8 * 36, 4)))
    x = torch.randn(32, 3, 6, 6)
    recipe = {"name": "t", "weights": {"bits": 8}, "activations": {"bits": 8}, "keep_float": ["0"],
              "steps": ["calibrate"]}
    qm = lowbit.quantize(model, recipe, calib=x, progress=False)
    copy = as_float_model(qm, model)
    with torch.no_grad(), qm.quantization(weights=True, activations=False):
        assert torch.allclose(copy(x), qm(x), atol=1e-5)


# -- 5. a forward that reads self.training ---------------------------------------------------------
class _FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(torch.relu(self.fc1(x)), p=0.5, training=self.training))


def test_a_forward_depending_on_self_training_warns():
    with pytest.warns(UserWarning, match=r"depends on self\.training.*eval-mode graph"):
        lowbit.prepare(_FunctionalDropout(), "w8a8")


def test_zoo_resnet_and_dropout_modules_do_not_warn():
    """Guards against over-warning (passes before the fix too)."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.prepare(model, "w8a8")
        lowbit.prepare(resnet_cifar(20).eval(), "w8a8")


# -- 6. Conv/Linear used through their weights --------------------------------------------------------
class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)).mean((2, 3))
        return self.fc.forward(h)


class _FunctionalThenHead(_Functional):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(x))


def test_layers_used_through_their_weights_are_named():
    with pytest.warns(UserWarning, match="conv, fc are used through their weights"):
        qm = lowbit.prepare(_FunctionalThenHead().eval(), "w8a8")
    assert qm.layers.names() == ["head"]
    with pytest.raises(UnsupportedModelError, match="conv, fc are used through their weights") as err:
        lowbit.prepare(_Functional().eval(), "w8a8")
    assert "has no Conv1d/Conv2d/Linear" not in str(err.value)


# -- 7. forward pre-hooks (old weight_norm, pruning) -------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated")
def test_layers_with_forward_pre_hooks_are_refused_by_name():
    normed = nn.Sequential(torch.nn.utils.weight_norm(nn.Conv1d(3, 8, 3, padding=1)), nn.Flatten(),
                           nn.Linear(80, 4))
    with pytest.raises(UnsupportedModelError, match=r"0 \(Conv1d, hook WeightNorm\).*remove_weight_norm"):
        lowbit.prepare(normed, "w8a8")
    pruned = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 4))
    prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    with pytest.raises(UnsupportedModelError, match=r"0 \(Conv2d, hook L1Unstructured\).*prune\.remove"):
        lowbit.prepare(pruned, "w8a8")
    prune.remove(pruned[0], "weight")  # the way out the message names
    lowbit.prepare(pruned, "w8a8")


# -- 8. generated quantizer names ------------------------------------------------------------------
def test_quantizer_names_skip_a_users_submodule_of_that_name():
    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(8, 8)
            self.act_quant_0 = nn.Tanh()
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.act_quant_0(self.fc1(x)))

    torch.manual_seed(0)
    model, x = Named().eval(), torch.randn(16, 8)
    qm = lowbit.prepare(model, "w8a8")
    assert isinstance(qm.net.get_submodule("act_quant_0"), nn.Tanh)
    assert list(qm.act_quantizers()) == ["act_quant_1", "act_quant_2"]
    assert torch.allclose(_float_path(qm, x), model(x), atol=1e-6)


# -- 9. add and pool spellings ---------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.c2(F.relu(self.c1(x)))
        out = out + x if self.style == "plus" else out.add(x)
        out = F.relu(out)
        out = F.adaptive_avg_pool2d(out, 1) if self.style == "plus" else self.pool(out)
        return self.fc(torch.flatten(out, 1))


def test_method_add_and_pool_modules_get_their_inputs_quantized_like_the_functions():
    torch.manual_seed(0)
    plus = _Block("plus").eval()
    method = _Block("method").eval()
    method.load_state_dict(plus.state_dict())
    x = torch.randn(8, 8, 6, 6)
    recipe = {"extends": "w4a4", "add_bits": 8, "steps": ["calibrate"]}
    qp = lowbit.quantize(plus, recipe, calib=x, progress=False)
    qm = lowbit.quantize(method, recipe, calib=x, progress=False)
    assert qm.tensor_quantizers == qp.tensor_quantizers and len(qp.tensor_quantizers) == 2
    assert all(qm.net.get_submodule(k).bits == 8 for k in qm.tensor_quantizers)
    with torch.no_grad():
        assert torch.equal(qm(x), qp(x))


class _BiRealNet(nn.Module):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        out = out + x if self.style == "plus" else out.add(x)
        return self.fc(F.adaptive_avg_pool2d(F.relu(out), 1).flatten(1))


def test_bireal_block_written_with_a_method_add_gets_no_extra_identity_path():
    x = torch.randn(2, 3, 6, 6)
    outs = []
    for style in ("plus", "method"):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = lowbit.prepare(_random_bn(_BiRealNet(style)), "w1a1-bireal")
        outs.append(_float_path(qm, x))
    assert torch.equal(outs[0], outs[1])


# -- 10. Bi-Real on odd-sized maps -----------------------------------------------------------------
def test_bireal_shortcuts_run_on_odd_sized_feature_maps():
    torch.manual_seed(0)
    model = resnet_cifar(20).eval()
    x = torch.randn(2, 3, 18, 18)  # a 9×9 map enters layer3's stride-2 conv
    qm = lowbit.prepare(model, "w1a1-bireal")
    assert _float_path(qm, x).shape == (2, 10)


# -- 11. lazy layers and SyncBatchNorm --------------------------------------------------------------
def test_an_uninitialised_lazy_layer_asks_for_a_forward_pass():
    with pytest.raises(UnsupportedModelError, match=r"0 \(LazyLinear\).*run one forward pass first"):
        lowbit.prepare(nn.Sequential(nn.LazyLinear(4)), "w8a8")


def test_syncbatchnorm_folds_like_batchnorm():
    model = _random_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(4 * 16, 2)))
    x = torch.randn(4, 3, 6, 6)
    qm = lowbit.prepare(model, "w8a8")
    assert "0" in qm.layer_bn and not any(isinstance(m, nn.SyncBatchNorm) for m in qm.net.modules())
    assert torch.allclose(_float_path(qm, x), model(x), atol=1e-5)
