"""WRPN widening: the wide model computes the pretrained function and contains its weights."""
import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import LowbitError, RecipeError
from lowbit.model.widen import widen
from lowbit.recipes.recipe import load_recipe
from lowbit.zoo import build


def _random_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so a wrong channel map cannot hide behind identity BNs."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.eval()


@pytest.mark.parametrize("name,shape", [("resnet20", (3, 3, 32, 32)), ("lenet5", (3, 1, 28, 28)),
                                        ("small_cnn", (3, 1, 28, 28))])
@pytest.mark.parametrize("factor", [2, 3])
def test_widened_model_computes_the_same_function(name, shape, factor):
    model = _random_bn(build(name))
    x = torch.randn(shape)
    wide = widen(model, factor).eval()
    assert torch.allclose(wide(x), model(x), atol=1e-5)
    wide.train(), model.train()  # batch statistics of the old channels are the old ones too
    assert torch.allclose(wide(x), model(x), atol=1e-4)
    convs = [(a, b) for a, b in zip(model.modules(), wide.modules()) if isinstance(a, nn.Conv2d)]
    assert convs and all(b.out_channels == factor * a.out_channels for a, b in convs)


def test_pretrained_weights_are_the_initial_slice_and_new_inputs_start_at_zero():
    model = build("lenet5")
    wide = widen(model, 2)
    w_old, w_new = model.conv2.weight, wide.conv2.weight  # 32->64 becomes 64->128
    assert torch.equal(w_new[:64, :32], w_old)
    assert torch.count_nonzero(w_new[:, 32:]) == 0  # nothing new reaches a channel yet
    fresh = w_new[64:, :32]
    assert not torch.equal(fresh, w_old) and torch.allclose(fresh, w_old, atol=0.1 * float(w_old.detach().std()))
    assert torch.equal(model.conv2.weight, w_old)  # the original is untouched


def test_resnet_downsampling_blocks_keep_the_shortcut_layout():
    """Option-A shortcuts pad both sides: an old channel in the padding must stay in the wide padding."""
    model = _random_bn(build("resnet20"))
    wide = widen(model, 2).eval()
    feats = {}
    model.layer2.register_forward_hook(lambda m, i, o: feats.__setitem__("old", o))
    wide.layer2.register_forward_hook(lambda m, i, o: feats.__setitem__("new", o))
    x = torch.randn(2, 3, 32, 32)
    model(x), wide(x)
    old, new = feats["old"], feats["new"]  # 32 vs 64 channels
    lo = model.layer2[0].pad_lo
    assert torch.allclose(new[:, :lo], old[:, :lo], atol=1e-5)
    assert torch.allclose(new[:, 2 * lo: 2 * lo + 16], old[:, lo: lo + 16], atol=1e-5)


def test_widen_refuses_bad_factors_and_unknown_models():
    with pytest.raises(LowbitError, match="integer >= 1"):
        widen(build("lenet5"), 1.5)
    with pytest.raises(LowbitError, match="WRPN widening knows .*Sequential is not one of them"):
        widen(nn.Sequential(nn.Conv2d(1, 4, 3)), 2)
    with pytest.raises(RecipeError, match="widen must be an integer from 1 to 16"):
        load_recipe({"extends": "w4a4", "widen": 0})


def test_widened_recipe_quantizes_saves_and_reloads_bit_exact(mnist_cnn, tmp_path):
    model, calib, test = mnist_cnn
    recipe = {"extends": "w4a4", "name": "wide", "widen": 2}
    qm = lowbit.quantize(model, recipe, calib=calib, progress=False)
    assert qm.layers[0].layer.weight.shape[0] == 2 * model.conv1.out_channels
    assert load_recipe("w2a2-wrpn").widen == 2
    path = lowbit.save(qm, tmp_path / "wide.lowbit")
    back = lowbit.load(path, model=type(model)())  # the narrow architecture: the recipe widens it
    assert torch.equal(back(test[0][:100]), qm(test[0][:100]))
