"""The per-layer analyzer: SQNR against its formula, sensitivities against models built to know the answer."""
import json
import math

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.report.analyzer import analyze, sqnr_db


def test_sqnr_formula_and_edges():
    assert sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(10 * math.log10(2))
    assert sqnr_db(torch.ones(3), torch.ones(3)) == math.inf
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf


def _batches(test, n=600):
    x, y = test
    return list(zip(torch.split(x[:n], 200), torch.split(y[:n], 200)))


def _top1(model, batches):
    with torch.no_grad():
        return 100 * sum(int((model(x).argmax(1) == y).sum()) for x, y in batches) / sum(len(y) for _, y in batches)


def test_a_model_with_one_quantized_layer_is_all_that_layer(mnist_cnn):
    model, calib, test = mnist_cnn
    recipe = {"extends": "w2a4", "first_last_bits": None, "quantize_adds": False,
              "overrides": [{"pattern": "*", "w_bits": 32, "a_bits": 32}, {"pattern": "conv2", "w_bits": 2, "a_bits": 4}]}
    qm = lowbit.quantize(model, recipe, calib=calib, progress=False)
    batches = _batches(test)
    out = analyze(qm, batches, progress=False)
    assert out["float_top1"] == pytest.approx(_top1(model.eval(), batches))
    assert out["quantized_top1"] == pytest.approx(_top1(qm, batches))
    assert [r.name for r in out["layers"]] == ["conv2"]
    conv2 = out["layers"][0]
    assert conv2.top1_only_this_quantized == pytest.approx(out["quantized_top1"])
    assert conv2.top1_all_but_this_quantized == pytest.approx(out["float_top1"])
    assert conv2.drop_alone_pt == pytest.approx(conv2.recovered_pt)
    assert (conv2.w_bits, conv2.a_bits) == (2, 4) and 0 < conv2.weight_sqnr_db < 20


def test_layers_are_ranked_and_the_model_is_left_as_it_was(mnist_cnn):
    model, calib, test = mnist_cnn
    qm = lowbit.quantize(model, "w2a4", calib=calib, progress=False)  # bias correction edits the biases
    batches = _batches(test, 400)
    before = qm(batches[0][0])
    out = analyze(qm, batches, progress=False)
    assert torch.equal(qm(batches[0][0]), before)  # flags, weights and biases restored
    drops = [r.drop_alone_pt for r in out["layers"]]
    assert drops == sorted(drops, reverse=True)
    assert {r.name for r in out["layers"]} == {r.name for r in qm.layers}
    by_name = {r.name: r for r in out["layers"]}
    assert by_name["conv1"].weight_sqnr_db > by_name["conv2"].weight_sqnr_db + 20  # 8-bit vs 2-bit weights


def test_analyze_refuses_what_it_cannot_use(mnist_cnn):
    model, calib, test = mnist_cnn
    with pytest.raises(LowbitError, match="takes a QuantModel"):
        analyze(model, _batches(test))
    qm = lowbit.quantize(model, "w8a8", calib=calib, progress=False)
    with pytest.raises(LowbitError, match="got no data"):
        analyze(qm, [])
    with pytest.raises(LowbitError, match="\\(input, label\\) batches"):
        analyze(qm, [test[0][:10]])


def test_analyze_command_ranks_layers_on_training_images(tmp_path, capsys, data_dir, monkeypatch):
    from lowbit.cli import main
    from lowbit.zoo import build, save_weights, trained_here_path

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    save_weights(build("small_cnn_fashion"), trained_here_path("small_cnn_fashion"))
    out = tmp_path / "a.json"
    assert main(["analyze", "--model", "small_cnn_fashion", "--recipe", "w3a3", "--samples", "300", "--data-dir",
                 str(data_dir), "--json", str(out), "--no-progress", "--no-download"]) == 0
    assert "most harmful first" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["images"] == 300 and len(payload["layers"]) == 4
    assert main(["analyze", "--model", "small_cnn_fashion", "--samples", "60000", "--data-dir", str(data_dir),
                 "--no-progress", "--no-download"]) == 2
    assert "left beside the calibration set" in capsys.readouterr().err


@pytest.mark.parametrize("side", ["weights", "activations"])
def test_the_split_puts_the_loss_on_the_quantized_side(mnist_cnn, side):
    """With only one side quantized, that side's top-1 is the quantized model's and the other's is float's."""
    model, calib, test = mnist_cnn
    bits = {"w_bits": 2, "a_bits": 32} if side == "weights" else {"w_bits": 32, "a_bits": 2}
    recipe = {"extends": "w2a4", "first_last_bits": None, "quantize_adds": False, "steps": ["calibrate"],
              "overrides": [{"pattern": "*", **bits}]}
    qm = lowbit.quantize(model, recipe, calib=calib, progress=False)
    batches = _batches(test, 400)
    out = analyze(qm, batches, progress=False)
    assert out["quantized_top1"] < out["float_top1"] - 1  # the quantized side costs something
    own, other = ("weights_only_top1", "activations_only_top1")[:: 1 if side == "weights" else -1]
    assert out[own] == pytest.approx(out["quantized_top1"])
    assert out[other] == pytest.approx(out["float_top1"])


def test_activations_only_runs_the_float_weights_as_built(mnist_cnn):
    """Steps that edit weights and biases (GPTQ, bias correction) are the weights' side of the split."""
    model, calib, test = mnist_cnn
    qm = lowbit.quantize(model, {"extends": "w2a4", "steps": ["calibrate", "gptq", "bias_correction"]},
                         calib=calib, progress=False)
    batches = _batches(test, 400)
    out = analyze(qm, batches, progress=False)
    plain = lowbit.quantize(model, {"extends": "w2a4", "steps": ["calibrate"]}, calib=calib, progress=False)
    with plain.quantization(weights=False):
        assert out["activations_only_top1"] == pytest.approx(_top1(plain, batches))
