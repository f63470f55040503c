"""Post-training quantization on real data: pretrained ResNet-20 (CIFAR-10) and a small
CNN trained here (MNIST)."""
import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from tests.conftest import batches


def test_resnet20_w8a8_matches_float_on_a_test_slice(resnet20, cifar_slices):
    calib, test = cifar_slices
    float_top1 = lowbit.evaluate(resnet20, batches(test))
    qm = lowbit.quantize(resnet20, "w8a8", calib=calib, progress=False)
    assert float_top1 > 0.9
    assert abs(lowbit.evaluate(qm, batches(test)) - float_top1) <= 0.006
    assert 3.8 < qm.compression_ratio() < 4.0
    # ResNet-20: 19 convs + 1 linear; 2 option-A shortcuts are parameter-free.
    assert len(qm.layers) == 20


def test_resnet20_activation_placement_matches_integer_runtime(resnet20, cifar_slices):
    """Residual sums feed the next block's conv and its identity path: one shared quantizer."""
    calib, _ = cifar_slices
    qm = lowbit.quantize(resnet20, "w4a4", calib=calib[:64], progress=False)
    code = qm.net.code
    # the network input is quantized first, before conv1 reads it
    assert code.index("act_quant_0(x)") < code.index("self.conv1(")
    # 19 convs + the head read 20 tensors, one quantizer each; the identity paths (and the
    # option-A shortcuts, slice + zero-pad of a quantized tensor, which stay on its grid) read
    # the block input's quantizer. The integer layout adds one 8-bit quantizer on each block's
    # conv2 output (an add input) and one on the pooling input: 9 + 1.
    assert len(qm.act_quantizers()) == 30 and len(qm.tensor_quantizers) == 10
    assert all(qm.net.get_submodule(k).bits == 8 for k in qm.tensor_quantizers)
    assert "getitem" in code and not any("add input getitem" in q.name or "add input pad" in q.name
                                         for q in qm.act_quantizers().values())
    old = lowbit.quantize(resnet20, {"extends": "w4a4", "quantize_adds": False}, calib=calib[:64], progress=False)
    assert len(old.act_quantizers()) == 20


def test_bn_estimator_needs_no_data_for_bn_fed_tensors(resnet20, cifar_slices):
    calib, test = cifar_slices
    qm = lowbit.quantize(resnet20, {"extends": "w8a8", "activations": {"estimator": "bn"}}, calib=calib, progress=False)
    used = qm.meta["calibration"]["act_estimators_used"]
    # the stem's relu(bn1) output and each block's relu(bn1) output (1 + 9) come from BN priors;
    # the image and residual sums fall back to data.
    assert sum(v == "bn" for v in used.values()) == 10
    assert set(used.values()) == {"bn", "mse"}
    assert lowbit.evaluate(qm, batches(test)) > 0.88


def test_usp_recovers_accuracy_of_a_badly_quantized_model(mnist_cnn):
    model, calib, test = mnist_cnn
    float_top1 = lowbit.evaluate(model, batches(test))
    base = {"weights": {"bits": 2, "estimator": "minmax"}, "activations": {"bits": 4, "estimator": "minmax"},
            "fold_bn": False, "first_last_bits": None}
    plain = lowbit.evaluate(lowbit.quantize(model, base, calib=calib, progress=False), batches(test))
    usp = lowbit.evaluate(lowbit.quantize(model, {**base, "steps": ["calibrate", "usp"]}, calib=calib, progress=False),
                          batches(test))
    assert float_top1 > 0.9
    assert usp > plain + 0.05, (float_top1, plain, usp)


def test_usp_refuses_folded_models(mnist_cnn):
    model, calib, _ = mnist_cnn
    with pytest.raises(LowbitError, match="fold_bn: false"):
        lowbit.quantize(model, {"steps": ["calibrate", "usp"]}, calib=calib, progress=False)


@pytest.mark.parametrize("estimator", ["minmax", "percentile", "mse", "cosine", "gaussian", "bn"])
def test_every_estimator_keeps_w8a8_near_float(mnist_cnn, estimator):
    """KL is tested on natural images below: on MNIST's raw input (one spike at the
    background value, one at white) entropy calibration can clip the white pixels, a
    known weakness of the method that the README states."""
    model, calib, test = mnist_cnn
    float_top1 = lowbit.evaluate(model, batches(test))
    recipe = {"extends": "w8a8", "activations": {"estimator": estimator},
              "weights": {"estimator": "mse" if estimator == "bn" else estimator}}
    qm = lowbit.quantize(model, recipe, calib=calib, progress=False)
    assert lowbit.evaluate(qm, batches(test)) >= float_top1 - 0.01



def test_kl_on_natural_images(resnet20, cifar_slices):
    calib, test = cifar_slices
    float_top1 = lowbit.evaluate(resnet20, batches(test))
    kl = {"extends": "w8a8", "activations": {"estimator": "kl"}, "weights": {"estimator": "kl"}}
    qm = lowbit.quantize(resnet20, kl, calib=calib, progress=False)
    assert lowbit.evaluate(qm, batches(test)) >= float_top1 - 0.01


def test_usp_with_training_augmentation_helps_resnet20_w4a4(resnet20, cifar_slices):
    """Clean training images bias the re-estimated BN statistics of a model trained with
    crop-and-flip; USP on augmented copies recovers accuracy instead."""
    calib, test = cifar_slices
    base = {"extends": "w4a4", "fold_bn": False}
    plain = lowbit.evaluate(lowbit.quantize(resnet20, {**base, "steps": ["calibrate"]}, calib=calib, progress=False),
                            batches(test))
    usp = lowbit.quantize(resnet20, {**base, "steps": ["calibrate", {"usp": {"augment_repeats": 2}}]},
                          calib=calib, progress=False)
    assert lowbit.evaluate(usp, batches(test)) > plain + 0.01


def test_random_crop_flip_keeps_content():
    from lowbit.data.augment import random_crop_flip

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    same = random_crop_flip(x, padding=0, flip=False)
    assert torch.equal(same, x)
    out = random_crop_flip(x, padding=2, flip=True, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    # every output value is an input value or the per-channel fill (the channel minimum)
    fills = x.amin(dim=(0, 2, 3))
    for c in range(3):
        allowed = set(x[:, c].flatten().tolist()) | {float(fills[c])}
        assert set(out[:, c].flatten().tolist()) <= allowed


def _act_scales(qm) -> dict[str, torch.Tensor]:
    return {n: q.scale.clone() for n, q in qm.act_quantizers().items() if q.enabled}


def test_float_observation_sets_activation_ranges_the_weights_cannot_move(mnist_cnn):
    """observe: float reads the float network, so the activation ranges are the same whatever
    the weight bits; observed with quantized weights they follow the weights' rounding."""
    model, calib, _ = mnist_cnn

    def scales(w_bits: int, observe: str) -> dict[str, torch.Tensor]:
        recipe = {"weights": {"bits": w_bits}, "activations": {"bits": 4}, "first_last_bits": None,
                  "steps": [{"calibrate": {"observe": observe}}]}
        qm = lowbit.quantize(model, recipe, calib=calib, progress=False)
        assert qm.meta["calibration"]["observe"] == observe
        return _act_scales(qm)

    w2, w8 = scales(2, "float"), scales(8, "float")
    assert all(torch.equal(w2[n], w8[n]) for n in w2)
    q2, q8 = scales(2, "quantized_weights"), scales(8, "quantized_weights")
    assert any(not torch.allclose(q2[n], q8[n]) for n in q2)
    # the network input sees no weight at all: the same range either way
    first = next(iter(w2))
    assert torch.equal(w2[first], q2[first])


def test_observe_must_name_a_network():
    from lowbit.errors import RecipeError
    from lowbit.recipes.recipe import load_recipe

    with pytest.raises(RecipeError, match="observe"):
        load_recipe({"extends": "w4a4", "steps": [{"calibrate": {"observe": "quantised"}}]})


def test_usp_statistics_weigh_every_sample_equally_and_take_a_single_sample_tail():
    """129 samples in batches of 128 and 1: the one-sample batch weighed half the estimate (and made BatchNorm1d
    raise inside torch). The running mean is now the mean over all samples."""
    from lowbit.ptq.usp import update_bn_statistics

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
                                torch.nn.Linear(4, 3)).eval()
    x = torch.randn(129, 6)
    x[128] += 40.0  # an outlier alone in the last batch
    recipe = {"extends": "w8a8", "fold_bn": False, "first_last_bits": None}
    qm = lowbit.quantize(model, recipe, calib=x, progress=False)
    bn = next(m for m in qm.modules() if isinstance(m, torch.nn.BatchNorm1d))
    captured = []
    handle = bn.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach().clone()))
    update_bn_statistics(qm, [x[:64], x[64:128], x[128:]], progress=False)
    handle.remove()
    inputs = torch.cat(captured)
    assert inputs.shape[0] == 129  # the tail ran, joined to the batch before it
    assert torch.allclose(bn.running_mean, inputs.mean(0), atol=1e-4)
    with pytest.raises(LowbitError, match="at least 2"):
        update_bn_statistics(qm, [x[:1]], progress=False)
