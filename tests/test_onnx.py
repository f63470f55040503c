"""ONNX QDQ export and ONNX Runtime inference."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.deploy.onnx_export import ExportError, export_onnx
from lowbit.deploy.runtime import OnnxModel
from tests.conftest import INT8_EXACT, batches


def test_exported_resnet20_matches_fake_quant(resnet20, cifar_slices, tmp_path):
    calib, test = cifar_slices
    qm = lowbit.quantize(resnet20, "w8a8", calib=calib, progress=False)
    path = export_onnx(qm, tmp_path / "r20.onnx", calib[:1])
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    w_codes = [i for i in model.graph.initializer if i.name.startswith("w_codes")]
    assert len(w_codes) == 20 and all(i.data_type == onnx.TensorProto.INT8 for i in w_codes)
    runner = OnnxModel(path, threads=1)
    out = runner(test[0][:300])  # dynamic batch: exported with batch 1, run with 300
    assert out.shape == (300, 10)
    agree = (out.argmax(1) == qm(test[0][:300]).argmax(1)).float().mean()
    assert agree >= (0.99 if INT8_EXACT else 0.96)  # see conftest.INT8_EXACT
    acc_onnx = lowbit.evaluate(runner, batches(test))
    acc_fake = lowbit.evaluate(qm, batches(test))
    assert abs(acc_onnx - acc_fake) <= (0.004 if INT8_EXACT else 0.015)


def test_float_export_equals_torch(resnet20, cifar_slices, tmp_path):
    calib, test = cifar_slices
    qm = lowbit.quantize(resnet20, "w8a8", calib=calib[:32], progress=False)
    with qm.quantization(weights=False, activations=False):
        path = export_onnx(qm, tmp_path / "float.onnx", calib[:1])
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "QuantizeLinear" not in ops
    x = test[0][:64]
    assert torch.allclose(OnnxModel(path)(x), resnet20(x), atol=1e-3)


def test_low_bit_export_clips_to_the_codes_range(resnet20, cifar_slices, tmp_path):
    calib, test = cifar_slices
    qm = lowbit.quantize(resnet20, "w4a4", calib=calib, progress=False)
    path = export_onnx(qm, tmp_path / "w4a4.onnx", calib[:1])
    graph = onnx.load(str(path)).graph
    assert any(n.op_type == "Clip" for n in graph.node)
    codes = [onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name.startswith("w_codes")]
    assert max(int(np.abs(c).max()) for c in codes[1:-1]) <= 7  # 4-bit codes inside int8
    x = test[0][:200]
    agree = (OnnxModel(path)(x).argmax(1) == qm(x).argmax(1)).float().mean()
    assert agree >= 0.97


def test_low_bit_activations_keep_every_conv_in_integer_kernels(resnet20, cifar_slices, tmp_path):
    """The b-bit clip acts on the codes after QuantizeLinear, so ORT still fuses Conv -> Q at 4 bits
    (a float Clip between them had left 10 of ResNet-20's 19 convs in float), and both runtimes compute
    the model's function: a conv's quantized output entering an add is quantized once more, which ORT
    removes and OpenVINO keeps (it fused the add and dropped the first quantizer's rounding)."""
    import onnxruntime as ort

    calib, test = cifar_slices
    qm = lowbit.quantize(resnet20, "w4a4", calib=calib, progress=False)
    path = export_onnx(qm, tmp_path / "w4a4.onnx", calib[:1])
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    clips = [n for n in graph.node if n.op_type == "Clip"]
    assert clips and all(producers[n.input[0]].op_type == "QuantizeLinear" for n in clips)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 19 and "Conv" not in ops and "FusedConv" not in ops
    x = test[0][:200]
    with torch.no_grad():
        ours = qm(x)
    for runtime in ("ort", "openvino"):
        theirs = OnnxModel(path, runtime=runtime)(x)
        # OpenVINO once skipped the rounding of each conv's 8-bit quantizer before the residual add (0.82 off)
        assert float((ours - theirs).abs().mean()) < 0.01, runtime
        assert (ours.argmax(1) == theirs.argmax(1)).float().mean() >= 0.99, runtime


def test_full_range_weights_export_their_extra_code(resnet20, cifar_slices, tmp_path):
    calib, test = cifar_slices
    recipe = {"extends": "w4a4", "weights": {"narrow_range": False}}
    qm = lowbit.quantize(resnet20, recipe, calib=calib, progress=False)
    path = export_onnx(qm, tmp_path / "w4a4-full.onnx", calib[:1])
    graph = onnx.load(str(path)).graph
    codes = [onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name.startswith("w_codes")]
    inner = np.concatenate([c.ravel() for c in codes[1:-1]])
    assert inner.min() == -8 and inner.max() <= 7  # the 16th level is used, still 4-bit codes
    x = test[0][:200]
    agree = (OnnxModel(path)(x).argmax(1) == qm(x).argmax(1)).float().mean()
    assert agree >= 0.97


def test_unsupported_op_is_named(tmp_path):
    class WithSigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.sigmoid(self.fc(x))

    qm = lowbit.quantize(WithSigmoid().eval(), "w8a8", calib=torch.randn(8, 4), progress=False)
    with pytest.raises(ExportError, match="sigmoid"):
        export_onnx(qm, tmp_path / "x.onnx", torch.randn(1, 4))


def test_pooling_exports_its_padding_dilation_and_divisor_and_refuses_ceil_mode(tmp_path):
    class Pools(nn.Module):
        def __init__(self, ceil: bool = False):
            super().__init__()
            self.c, self.c2, self.fc, self.ceil = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.Linear(8, 10), ceil

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.c(x)), 3, 2, 1, dilation=2)
            x = F.avg_pool2d(F.relu(self.c2(x)), 3, stride=1, padding=1, ceil_mode=self.ceil)  # zeros counted
            x = F.avg_pool2d(x, 2, count_include_pad=False, padding=1)
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    x = torch.randn(8, 3, 20, 20)
    qm = lowbit.quantize(Pools().eval(), "w8a8", calib=x, progress=False)
    path = export_onnx(qm, tmp_path / "pools.onnx", x[:1])
    with torch.no_grad():
        assert torch.allclose(OnnxModel(path)(x), qm(x), atol=1e-4)
    qm = lowbit.quantize(Pools(ceil=True).eval(), "w8a8", calib=x, progress=False)
    with pytest.raises(ExportError, match="avg_pool2d with ceil_mode=True is not exported"):
        export_onnx(qm, tmp_path / "ceil.onnx", x[:1])


def test_a_one_bit_weight_layer_has_its_bias_on_the_int32_grid_as_onnx_runtime_runs_it(resnet20, cifar_slices,
                                                                                        tmp_path):
    """1-bit sign weights export as int8 codes ±1 (step s/2), which ONNX Runtime fuses into an integer conv that
    rounds the bias: the model must round it too (it kept it float: logits 0.7 apart on average)."""
    calib, test = cifar_slices
    recipe = {"extends": "w4a4", "overrides": [{"pattern": "layer1.0.conv1", "w_bits": 1}]}
    qm = lowbit.quantize(resnet20, recipe, calib=calib[:64], progress=False)
    layer = qm.layers["layer1.0.conv1"].layer
    assert layer.weight_quantizer.spec.bits == 1 and not torch.equal(layer.quantized_bias(), layer.bias)
    path = export_onnx(qm, tmp_path / "w1.onnx", calib[:1])
    x = test[0][:100]
    with torch.no_grad():
        ours, runtime = qm(x), OnnxModel(path)(x)
    assert float((ours - runtime).abs().mean()) < 0.05  # (4-bit rounding ties aside, as the plain w4a4 export)
    assert (ours.argmax(1) == runtime.argmax(1)).float().mean() >= 0.97


def test_missing_onnx_file_is_a_clear_error(tmp_path):
    with pytest.raises(lowbit.LowbitError, match="does not exist"):
        OnnxModel(tmp_path / "missing.onnx")


def test_default_recipe_keeps_every_conv_in_integer_kernels(resnet20, cifar_slices, tmp_path):
    """In the default (integer-runtime) layout ONNX Runtime's optimizer fuses every conv
    into an integer kernel: no float Conv is left in the optimized graph."""
    import onnxruntime as ort

    calib, test = cifar_slices
    qm = lowbit.quantize(resnet20, "w8a8", calib=calib, progress=False)
    path = export_onnx(qm, tmp_path / "int8.onnx", calib[:1])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 19 and "Conv" not in ops
    x = test[0][:300]
    agree = (OnnxModel(path)(x).argmax(1) == qm(x).argmax(1)).float().mean()
    assert agree >= (0.99 if INT8_EXACT else 0.96)


def test_graph_is_laid_out_as_integer_runtimes_expect(resnet20, cifar_slices, tmp_path):
    """Relu before a zero-point-0 quantizer is absorbed by it (Q clamps at 0); the option-A
    shortcut's Slice and Pad run on the codes (no requantization); every Conv reads DQ."""
    calib, test = cifar_slices
    qm = lowbit.quantize(resnet20, "w8a8", calib=calib[:128], progress=False)
    path = lowbit.export_onnx(qm, tmp_path / "m.onnx", calib[:1])  # the top-level name
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    ops = [n.op_type for n in graph.node]
    assert "Relu" not in ops
    for n in graph.node:
        if n.op_type in ("Slice", "Pad"):
            assert producer[n.input[0]].op_type in ("QuantizeLinear", "Slice"), n.name
        if n.op_type == "Pad":  # padded with the zero point: the integer value of 0.0
            assert producer[n.input[0]].op_type == "Slice" and len(n.input) == 3
        if n.op_type in ("Conv", "Gemm"):
            assert all(producer[i].op_type == "DequantizeLinear" for i in n.input), n.name
    x = test[0][:300]
    a, b = OnnxModel(path)(x), qm(x)
    if INT8_EXACT:  # elsewhere the kernels saturate (conftest.INT8_EXACT): the layout is still checked above
        assert (a - b).abs().mean() < 0.05 and (a.argmax(1) == b.argmax(1)).float().mean() >= 0.99


def test_openvino_runs_the_same_model(resnet20, cifar_slices, tmp_path):
    calib, test = cifar_slices
    qm = lowbit.quantize(resnet20, "w8a8", calib=calib[:128], progress=False)
    path = lowbit.export_onnx(qm, tmp_path / "m.onnx", calib[:1])
    ort_model, ov_model = lowbit.OnnxModel(path, threads=1), lowbit.OnnxModel(path, threads=1, runtime="openvino")
    assert ov_model.runtime == "openvino"
    x = test[0][:200]
    a, b = ort_model(x), ov_model(x)
    assert ov_model(x[:7]).shape == (7, 10)  # every batch size, compiled once each
    floor = 0.98 if INT8_EXACT else 0.95  # see conftest.INT8_EXACT
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= floor
    assert (b.argmax(1) == qm(x).argmax(1)).float().mean() >= floor


def test_openvino_computes_a_codebook_layer_in_float32_as_the_model_does(mnist_cnn, tmp_path):
    """A codebook layer runs in float; on a CPU with bf16 units OpenVINO's CPU plugin ran it in bf16 by
    default (0.047 off per logit on a 3-bit k-means MNIST CNN). lowbit asks it for f32."""
    pytest.importorskip("openvino")
    model, calib, test = mnist_cnn
    recipe = {"extends": "w4a4", "name": "km", "weights": {"bits": 3, "per_channel": False},
              "steps": ["calibrate", "kmeans"]}
    qm = lowbit.quantize(model, recipe, calib=calib, progress=False)
    path = lowbit.export_onnx(qm, tmp_path / "km.onnx", test[0][:1])
    x = test[0][:300]
    with torch.no_grad():
        reference = qm(x)
    for runtime in ("ort", "openvino"):
        out = OnnxModel(path, threads=1, runtime=runtime)(x)
        assert float((out - reference).abs().mean()) < 1e-3, runtime
    with pytest.raises(lowbit.LowbitError, match="openvino_precision must be one of f32, bf16, auto"):
        OnnxModel(path, runtime="openvino", openvino_precision="fp16")


def test_runtime_and_path_errors_are_named(tmp_path):
    with pytest.raises(lowbit.LowbitError, match="unknown runtime 'tvm'"):
        OnnxModel(tmp_path, runtime="tvm")
    with pytest.raises(lowbit.LowbitError, match="is a directory"):
        OnnxModel(tmp_path)
    with pytest.raises(lowbit.LowbitError, match="is a directory"):
        lowbit.load(tmp_path)
    with pytest.raises(lowbit.LowbitError, match="threads must be a positive integer"):
        OnnxModel(__file__, threads=0)


def _bench_data(model: nn.Module, n_train: int = 64, n_test: int = 40):
    """Random inputs labelled by the float model itself: its float top-1 is 100%."""
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    x = torch.randn(n_train + n_test, 1, 28, 28)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def _fixed_timing(seen: dict[str, bool]):
    """time_engines stand-in: runs every engine once at both batch sizes (as timing does) and
    reports 1 ms at batch 1, 0.5 s for the throughput batch; ``seen``: each engine's training flag."""
    def fake(engines, x1, x64, repeats, rounds=10):
        with torch.no_grad():
            for name, engine in engines.items():
                seen[name] = engine.training
                engine(x1), engine(x64)
        return {name: (0.001, 0.5) for name in engines}
    return fake


def test_bench_float_onnx_is_the_float_model_whatever_the_first_recipe(tmp_path, monkeypatch):
    from lowbit.deploy import bench
    from lowbit.zoo import build

    torch.manual_seed(0)
    model = build("small_cnn").eval()
    train, test = _bench_data(model)
    monkeypatch.setattr(bench, "time_engines", _fixed_timing({}))
    # w4a4's bias correction and match_moments edit the weights of its QuantModel
    out = bench.run_runtime_benchmark(model, train, test, recipes=("w4a4", "w8a8"), threads=1, repeats=1,
                                      workdir=tmp_path)
    x = test.tensors[0]
    exported = OnnxModel(tmp_path / "float.onnx", threads=1)(x)
    with torch.no_grad():
        assert torch.allclose(exported, model(x), atol=1e-4, rtol=1e-4)
    rows = {(r["engine"], r["runtime"]): r for r in out["rows"]}
    assert rows[("float", "ort")]["top1"] == rows[("float", "pytorch")]["top1"] == 100.0


def test_bench_leaves_a_train_mode_model_alone_and_counts_a_small_test_split(tmp_path, monkeypatch):
    from lowbit.deploy import bench
    from lowbit.zoo import build

    torch.manual_seed(0)
    model = build("small_cnn")
    train, test = _bench_data(model, n_test=10)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen: dict[str, bool] = {}
    monkeypatch.setattr(bench, "time_engines", _fixed_timing(seen))
    out = bench.run_runtime_benchmark(model, train, test, recipes=("w8a8",), threads=1, repeats=1, workdir=tmp_path)
    assert model.training  # the caller's model keeps its mode and its BN statistics
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert seen["float|pytorch"] is False  # timed as the eval-mode network it is scored as
    assert out["throughput_batch"] == 10
    assert {r["throughput_b64_img_s"] for r in out["rows"]} == {20.0}  # 10 images in 0.5 s, not 64


def test_bench_runs_a_data_free_recipe_without_real_calibration(tmp_path, monkeypatch):
    from lowbit.deploy import bench
    from lowbit.zoo import build

    torch.manual_seed(0)
    model = build("small_cnn").eval()
    train, test = _bench_data(model)
    monkeypatch.setattr(bench, "time_engines", _fixed_timing({}))
    zeroq = {"extends": "w4a4-zeroq", "name": "zq", "calibration": {"samples": 16},
             "steps": [{"zeroq": {"iters": 2}}, "calibrate"]}
    out = bench.run_runtime_benchmark(model, train, test, recipes=(zeroq,), threads=1, repeats=1, workdir=tmp_path)
    engines = {r["engine"] for r in out["rows"]}
    assert {"float", "lowbit zq", "ort quantize_static"} <= engines
    assert out["calibration_images"] == 16  # the peer still calibrates on real training images


@pytest.mark.parametrize("runtime", ["ort", "openvino"])
def test_an_input_of_the_wrong_shape_is_named_not_left_to_the_runtime(tmp_path, runtime):
    from lowbit.deploy.runtime import _OpenVinoRunner
    from lowbit.errors import DataMismatchError
    from lowbit.zoo import build

    torch.manual_seed(0)
    qm = lowbit.quantize(build("small_cnn").eval(), "w8a8", calib=torch.randn(64, 1, 28, 28), progress=False)
    path = export_onnx(qm, tmp_path / "m.onnx", torch.randn(1, 1, 28, 28))
    model = OnnxModel(path, threads=1, runtime=runtime)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)  # any batch size still runs
    expected = r"m\.onnx expects input 'x' of shape \(batch, 1, 28, 28\), got "
    for x, got in ((torch.randn(2, 3, 32, 32), r"\(2, 3, 32, 32\)"), (torch.randn(1, 28, 28), r"\(1, 28, 28\)")):
        with pytest.raises(DataMismatchError, match=expected + got):
            model(x)
    if runtime == "openvino":  # OpenVINO's own shape inference fails in reshape: said as lowbit's error too
        with pytest.raises(lowbit.LowbitError, match=r"OpenVINO cannot compile the model for input shape \(2, 3, 32"):
            _OpenVinoRunner(path, 1).request((2, 3, 32, 32))


def test_an_export_killed_while_writing_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    from lowbit.zoo import build

    torch.manual_seed(0)
    qm = lowbit.quantize(build("small_cnn").eval(), "w8a8", calib=torch.randn(64, 1, 28, 28), progress=False)
    x = torch.randn(1, 1, 28, 28)
    good = export_onnx(qm, tmp_path / "m.onnx", x)
    before = good.read_bytes()
    real_save = onnx.save

    def killed(model, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(model.SerializeToString()[:100])
        raise KeyboardInterrupt  # the process dies half-way through the write

    monkeypatch.setattr(onnx, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(qm, good, x)
    assert good.read_bytes() == before  # the good model is still there, whole
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # and nothing half-written beside it
    monkeypatch.setattr(onnx, "save", real_save)
    link = tmp_path / "link.onnx"
    link.symlink_to(good)
    export_onnx(qm, link, x)  # through a link: the link stays, its target is the new model
    assert link.is_symlink() and onnx.load(str(good)).graph.output[0].name == "logits"
