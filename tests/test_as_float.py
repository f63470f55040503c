"""A QuantModel made float again (lowbit.as_float_model): the start of progressive quantization."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError, UnsupportedModelError
from lowbit.zoo.lenet import LeNet5


def _w3a3(**changes):
    return {"extends": "w4a4", "name": "test-w3a3", "weights": {"bits": 3, "estimator": "minmax"},
            "activations": {"bits": 3}, "steps": ["calibrate"], **changes}


def test_the_float_copy_computes_the_quantized_weights_with_float_activations(mnist_cnn):
    model, calib, test = mnist_cnn
    qm = lowbit.quantize(model, _w3a3(), calib=calib, progress=False)
    copy = lowbit.as_float_model(qm, model)
    assert type(copy) is type(model) and copy is not model
    assert not torch.equal(copy.conv2.weight, model.conv2.weight)  # the original is left as it was
    with torch.no_grad(), qm.quantization(weights=True, activations=False):
        expected = qm(test[0][:256])
    assert torch.allclose(copy(test[0][:256]), expected, atol=1e-5, rtol=1e-5)
    # the BN after conv2 is the identity carrying the folded bias
    assert torch.equal(copy.bn2.running_mean, torch.zeros(32)) and torch.equal(copy.bn2.weight.data, torch.ones(32))
    assert torch.allclose(copy.bn2.bias, qm.layers[1].layer.bias)


def test_quantizing_the_float_copy_at_the_same_bits_gives_back_the_same_weights(mnist_cnn):
    """Its weights already lie on the grid, and min-max finds that grid again: the round trip is exact."""
    model, calib, _ = mnist_cnn
    qm = lowbit.quantize(model, _w3a3(), calib=calib, progress=False)
    again = lowbit.quantize(lowbit.as_float_model(qm, model), _w3a3(), calib=calib, progress=False)
    for first, second in zip(qm.layers, again.layers):
        assert torch.allclose(first.layer.quantized_weight(), second.layer.quantized_weight(), atol=1e-6), first.name
        assert torch.allclose(first.layer.bias, second.layer.bias, atol=1e-6), first.name


def test_a_quantized_model_is_refused_where_its_layers_do_not_fit(mnist_cnn):
    model, calib, _ = mnist_cnn
    qm = lowbit.quantize(model, _w3a3(), calib=calib, progress=False)
    with pytest.raises(LowbitError, match="takes a QuantModel, got SmallCNN"):
        lowbit.as_float_model(model, model)
    with pytest.raises(UnsupportedModelError, match="'conv1' of the QuantModel is not a Conv/Linear layer of Sequential"):
        lowbit.as_float_model(qm, torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(UnsupportedModelError, match=r"'conv1': the QuantModel's weight is \(16, 1, 3, 3\), LeNet5's"):
        lowbit.as_float_model(qm, LeNet5())
    wide = lowbit.quantize(model, _w3a3(widen=2), calib=calib, progress=False)
    with pytest.raises(UnsupportedModelError, match="widened, for a widening recipe"):
        lowbit.as_float_model(wide, model)


def test_a_model_in_training_form_gives_its_latent_weights_with_the_trained_bn_folded(mnist_cnn, mnist_train_small):
    from lowbit.qat.convert import to_training_form

    model, calib, test = mnist_cnn
    qm = lowbit.quantize(model, _w3a3(), calib=calib, progress=False)
    to_training_form(qm, "lsq", "lsq+", batches=[calib])
    opt = torch.optim.SGD(qm.parameters(), lr=0.05)
    qm.train()
    for i in range(0, 640, 64):  # a few steps: the BN statistics and latent weights move off their start
        loss = torch.nn.functional.cross_entropy(qm(mnist_train_small[0][i:i + 64]), mnist_train_small[1][i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    qm.eval()
    latent = lowbit.as_float_model(qm, model, weights="latent")
    quantized = lowbit.as_float_model(qm, model)
    x = test[0][:256]
    with torch.no_grad():
        with qm.quantization(weights=False, activations=False):
            assert torch.allclose(latent(x), qm(x), atol=1e-4, rtol=1e-4)
        with qm.quantization(weights=True, activations=False):
            assert torch.allclose(quantized(x), qm(x), atol=1e-4, rtol=1e-4)
    folded = qm.layers[1].layer
    assert torch.allclose(latent.conv2.weight, folded.weight)  # W·γ/σ of the trained BN, not yet on a grid
    assert not torch.allclose(latent.conv2.weight, quantized.conv2.weight)
    with pytest.raises(LowbitError, match="weights must be 'quantized' or 'latent', got 'float'"):
        lowbit.as_float_model(qm, model, weights="float")


def test_a_teacher_reaches_the_qat_step_through_quantize(mnist_cnn, mnist_train_small):
    class FiveClasses(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 5)

    model, calib, _ = mnist_cnn
    qat = {"epochs": 1, "batch_size": 64, "lr": 0.01, "val_samples": 300, "kd": {"temperature": 4.0, "weight": 1.0}}
    recipe = _w3a3(steps=["calibrate", {"qat": qat}])
    with pytest.raises(LowbitError, match="same classes"):  # the given teacher, not the float model, is used
        lowbit.quantize(model, recipe, calib=calib, train=mnist_train_small, teacher=FiveClasses(), progress=False)
    with pytest.raises(LowbitError, match="has no `qat` step.*teacher="):
        lowbit.quantize(model, _w3a3(), calib=calib, teacher=model, progress=False)
    with pytest.raises(LowbitError, match="teacher must be a torch.nn.Module, got str"):
        lowbit.quantize(model, recipe, calib=calib, train=mnist_train_small, teacher="resnet32", progress=False)


@pytest.fixture(scope="module")
def mnist_train_small(data_dir):
    from lowbit.data import dataset_tensors, load_dataset

    train = load_dataset("mnist", "train", data_dir=data_dir, download=False)
    return dataset_tensors(train, torch.arange(1500))


def test_exact_zero_weights_on_a_midrise_grid_are_warned_about(mnist_cnn):
    """A deployed mid-tread model's weights hold many exact zeros; a mid-rise grid sends them all to +step/2."""
    model, calib, _ = mnist_cnn
    qm = lowbit.quantize(model, _w3a3(), calib=calib, progress=False)
    copy = lowbit.as_float_model(qm, model)
    midrise = _w3a3(weights={"bits": 3, "grid": "midrise", "estimator": "minmax"})
    with pytest.warns(UserWarning, match=r"layer\(s\) have exactly-zero weights \(conv2 \d+%.*weights.grid: midtread"):
        lowbit.quantize(copy, midrise, calib=calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.quantize(model, midrise, calib=calib, progress=False)  # dense float weights: no warning


def test_a_finished_run_is_the_start_of_a_run_at_fewer_bits(mnist_cnn, mnist_train_small, data_dir, tmp_path, capsys):
    """`lowbit train --init-from`: the library call rebuilds the run's kept epoch; its quantized weights
    reproduce the deployed model, and a W2A2 run starts from its latent weights."""
    from lowbit.cli import main
    from lowbit.data import load_dataset
    from lowbit.qat.warm_start import trained_float_model
    from lowbit.zoo import save_weights

    model, _, test = mnist_cnn
    weights = save_weights(model, tmp_path / "float.safetensors")
    common = ["--model", "small_cnn", "--weights", str(weights), "--epochs", "1", "--train-limit", "1500",
              "--val-samples", "300", "--batch-size", "64", "--data-dir", str(data_dir), "--no-progress",
              "--test-limit", "500"]
    run = tmp_path / "w3a3"
    assert main(["train", "--recipe", "w3a3-lsq", "--checkpoint", str(run), "--save", str(tmp_path / "w3a3.lowbit"),
                 *common]) == 0
    capsys.readouterr()
    deployed = lowbit.load(tmp_path / "w3a3.lowbit", model=type(model)())
    train = load_dataset("mnist", "train", data_dir=data_dir, download=False)
    from torch.utils.data import Subset

    train = Subset(train, range(1500))
    quantized = trained_float_model(run, model, train, weights="quantized")
    latent = trained_float_model(run, model, train)
    x = test[0][:256]
    with torch.no_grad(), deployed.quantization(weights=True, activations=False):
        assert torch.allclose(quantized(x), deployed(x), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(latent.conv2.weight, quantized.conv2.weight)

    assert main(["train", "--recipe", "w2a2-lsq", "--init-from", str(run), "--kd", "1.0",
                 "--checkpoint", str(tmp_path / "w2a2"), *common]) == 0
    assert "small_cnn w2a2-lsq: test top-1" in capsys.readouterr().out
    assert main(["train", "--recipe", "w2a2-lsq", "--init-from", str(tmp_path / "nothing"), *common]) == 2
    assert "holds no QAT checkpoint" in capsys.readouterr().err
    side = json.loads((run / "state.json").read_text())
    side["epoch"] = 0
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "state.json").write_text(json.dumps(side))
    with pytest.raises(LowbitError, match="stopped after epoch 0 of 1: finish it"):
        trained_float_model(unfinished, model, train)
    with pytest.raises(LowbitError, match="does not fit LeNet5"):
        trained_float_model(run, LeNet5(), train)


def test_an_untraceable_model_made_float_again_keeps_its_quantized_weights():
    """The hook fallback (no graph, BN not folded): each layer takes its weights and bias back directly."""
    from tests.test_quant_model import Untraceable

    torch.manual_seed(0)
    model = Untraceable().eval()
    x = torch.randn(32, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the documented hook-fallback warning
        qm = lowbit.quantize(model, {"extends": "w4a4", "first_last_bits": None}, calib=x, progress=False)
    assert qm.mode == "hooks"
    copy = lowbit.as_float_model(qm, model)
    with torch.no_grad(), qm.quantization(weights=True, activations=False):
        assert torch.allclose(copy(x), qm(x), atol=1e-6)
    assert len(torch.unique(copy.a.weight[0])) <= 15  # on the 4-bit grid


def test_a_progressive_run_distils_from_the_pretrained_model_unless_it_names_a_teacher():
    from lowbit.qat.warm_start import progressive_teacher

    model = LeNet5()
    assert progressive_teacher(model, {"kd": {"temperature": 4.0, "weight": 1.0}}) is model
    assert progressive_teacher(model, {"kd": {"weight": 1.0, "teacher": "resnet32"}}) is None  # the zoo model stays
    assert progressive_teacher(model, {"kd": {}}) is None and progressive_teacher(model, {}) is None  # no distillation


def test_a_conv_subclass_followed_by_bn_is_folded_once_in_the_float_copy():
    """A plain ``class MyConv(nn.Conv2d): pass`` is now quantized with its BN folded; the float copy traced it with
    torch.fx's own tracer, which entered it, found no BN to reset, and applied the BN a second time."""
    class MyConv(torch.nn.Conv2d):
        pass

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = MyConv(1, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.bn1(self.conv1(x))).mean((2, 3)))

    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.bn1.running_mean.normal_()
        model.bn1.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(16, 1, 8, 8)
    qm = lowbit.quantize(model, {"extends": "w4a4", "first_last_bits": None}, calib=x, progress=False)
    copy = lowbit.as_float_model(qm, model)
    with torch.no_grad(), qm.quantization(weights=True, activations=False):
        expected = qm(x)
    assert torch.allclose(copy(x), expected, atol=1e-5)


def test_a_rewritten_graph_gives_its_weights_only_with_rewritten_true(mnist_cnn):
    """relu: hardtanh changes the float function, so the copy is refused unless asked for as a start of a
    recipe with the same rewrite; quantized again by that recipe it gives back the same weights."""
    model, calib, _ = mnist_cnn
    recipe = _w3a3(relu="hardtanh")
    qm = lowbit.quantize(model, recipe, calib=calib, progress=False)
    with pytest.raises(UnsupportedModelError, match="pass rewritten=True"):
        lowbit.as_float_model(qm, model)
    again = lowbit.quantize(lowbit.as_float_model(qm, model, rewritten=True), recipe, calib=calib, progress=False)
    for first, second in zip(qm.layers, again.layers):
        assert torch.allclose(first.layer.quantized_weight(), second.layer.quantized_weight(), atol=1e-6), first.name


def test_a_binary_run_in_two_stages(mnist_cnn, mnist_train_small, data_dir, tmp_path, capsys):
    """Sign activations with float weights first, then W1A1 from that run (`--init-from`); a start whose
    graph rewrites differ from the next recipe's is refused with both named."""
    from torch.utils.data import Subset

    from lowbit.cli import main
    from lowbit.data import load_dataset
    from lowbit.qat.warm_start import trained_float_model
    from lowbit.recipes.recipe import load_recipe
    from lowbit.zoo import save_weights

    model, _, _ = mnist_cnn
    weights = save_weights(model, tmp_path / "float.safetensors")
    common = ["--model", "small_cnn", "--weights", str(weights), "--epochs", "1", "--train-limit", "1500",
              "--val-samples", "300", "--batch-size", "64", "--data-dir", str(data_dir), "--no-progress",
              "--test-limit", "500"]
    stage1 = {"extends": "w1a1-bnn", "name": "test-a1", "overrides": [{"pattern": "*", "w_bits": 32}]}
    (tmp_path / "a1.yaml").write_text(json.dumps(stage1))
    run = tmp_path / "a1"
    assert main(["train", "--recipe", str(tmp_path / "a1.yaml"), "--checkpoint", str(run), *common]) == 0
    train = Subset(load_dataset("mnist", "train", data_dir=data_dir, download=False), range(1500))
    # the message names the run recipe's own shortcut (w1a1-bnn: real), not an internal placeholder
    with pytest.raises(LowbitError, match=r"relu: hardtanh, shortcut: real\); .* and no recipe was given"):
        trained_float_model(run, model, train)
    with pytest.raises(LowbitError, match="recipe 'w2a2-lsq' has relu: keep"):
        trained_float_model(run, model, train, recipe=load_recipe("w2a2-lsq"))
    start = trained_float_model(run, model, train, recipe=load_recipe("w1a1-bnn"))
    assert not torch.equal(start.conv2.weight, model.conv2.weight)  # stage 1 trained the weights
    # a recipe name or dict is taken as everywhere else in the API (a name raised AttributeError)
    for named in ("w1a1-bnn", {"extends": "w1a1-bnn"}):
        assert torch.equal(trained_float_model(run, model, train, recipe=named).conv2.weight, start.conv2.weight)
    capsys.readouterr()
    assert main(["train", "--recipe", "w1a1-bnn", "--init-from", str(run), "--checkpoint", str(tmp_path / "w1a1"),
                 *common]) == 0
    assert "small_cnn w1a1-bnn: test top-1" in capsys.readouterr().out
    assert main(["train", "--recipe", "w2a2-lsq", "--init-from", str(run), *common]) == 2
    assert "trained a rewritten graph" in capsys.readouterr().err
