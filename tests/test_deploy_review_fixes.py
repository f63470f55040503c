"""Deployment fixes from a code review: the ONNX exporter (bias grid, torch.add's alpha, atomic
writes, training mode, opsets, target paths) and the .lowbit artifact (crafted architectures and
activation specs, metric values, the tensors stored for quantizers nothing reads)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.deploy.artifact import ArtifactError, read_header, theoretical_bytes
from lowbit.deploy.onnx_export import ExportError, export_onnx
from lowbit.deploy.runtime import OnnxModel
from lowbit.model import graph
from lowbit.model.quant_model import QuantModel
from lowbit.zoo import build


def _craft(src: Path, dst: Path, mutate) -> Path:
    """``src`` rewritten as ``dst`` with its header edited by ``mutate(header, codes, floats)`` (which may
    return new buffers) and a valid checksum (sha256 is unkeyed: anyone editing a file can recompute it)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    import lowbit.deploy.artifact as artifact
    from lowbit.deploy import header_codec

    with safe_open(str(src), framework="numpy") as f:
        header, codes, floats = header_codec.decode(f.get_tensor("header").tobytes()), f.get_tensor("codes"), \
            f.get_tensor("floats")
    out = mutate(header, codes, floats)
    if out is not None:
        header, codes, floats = out
    header["sha256"] = artifact._digest(codes, floats, header)
    save_file({"codes": codes, "floats": floats, "header": np.frombuffer(header_codec.encode(header), np.uint8)},
              str(dst), metadata={"lowbit": "3"})
    return dst


class _Branches(nn.Module):
    """One ReLU output read by a max pool (into c1) and an average pool (into c2): the average pool's
    input quantizer then quantizes what c1 reads, whatever c1's own (disabled) input quantizer says."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 6, 3, padding=1)
        self.c1 = nn.Conv2d(6, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        r = torch.relu(self.c0(x))
        a = self.c1(F.max_pool2d(r, 2))
        b = self.c2(F.avg_pool2d(r, 2))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(a + b), 1), 1))


class _Plain(nn.Module):
    """Conv + BN (left unfolded by fold_bn: false) and a classifier; 8 channels so every packed segment
    is whole bytes (the size test compares bits exactly)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        x = torch.relu(self.b0(self.c0(x)))
        x = torch.relu(self.c1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _data(n: int = 32) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, 3, 8, 8)


# -- ONNX export ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_bits", [8, 2])
def test_a_layer_whose_input_quantizer_is_off_keeps_its_float_bias_in_onnx_as_in_the_model(tmp_path, weight_bits):
    """c1's own input quantizer is off (a_bits 32): the model keeps its bias float. The exporter rounded
    it to int32 at the disabled quantizer's placeholder scale 1.0 (0.015 off the model's logits at 2-bit
    weights), and a float bias inside the conv was rounded by ONNX Runtime itself; now one predicate
    decides for both, and the bias is added after the conv, where it stays float."""
    torch.manual_seed(0)
    model, x = _Branches().eval(), _data()
    recipe = {"extends": "w4a4", "name": "c1-a32", "weights": {"bits": weight_bits}, "first_last_bits": None,
              "steps": ["calibrate"], "overrides": [{"pattern": "c1", "a_bits": 32}]}
    qm = lowbit.quantize(model, recipe, calib=x, progress=False)
    path = export_onnx(qm, tmp_path / "m.onnx", x[:1])
    with torch.no_grad():
        assert float((OnnxModel(path, threads=1)(x) - qm(x)).abs().max()) < 1e-5
    c1 = qm.layers["c1"].layer
    assert not c1.input_ref[0].enabled and not c1.bias_on_int32_grid()
    assert torch.equal(c1.quantized_bias(), c1.bias)
    assert qm.layers["c2"].layer.bias_on_int32_grid()  # its input quantizer is on: the int32 grid


class _AddAlpha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 3)

    def forward(self, x):
        a = torch.relu(self.c0(x))
        return self.fc(torch.flatten(torch.add(a, self.c1(a), alpha=-0.5), 1))  # a - c1(a)/2


def test_torch_add_with_alpha_exports_as_the_model_computes_it(tmp_path):
    """torch.add(a, b, alpha=k) was written as a plain Add (a + b): 0.5 off logits of 0.6."""
    torch.manual_seed(0)
    x = _data(16)
    qm = lowbit.quantize(_AddAlpha().eval(), "w8a8", calib=x, progress=False)
    path = export_onnx(qm, tmp_path / "alpha.onnx", x[:1])
    with torch.no_grad():
        assert float((OnnxModel(path, threads=1)(x) - qm(x)).abs().max()) < 1e-5
    adds = [n for n in qm.net.graph.nodes if n.op == "call_function" and n.target is torch.add]
    assert [graph.add_alpha(n) for n in adds] == [-0.5]


def test_two_exports_of_one_path_do_not_collide_and_each_is_flushed(tmp_path, monkeypatch):
    """The exporter wrote through a fixed ``<name>.part``: a second export of the same path renamed it away
    (a raw FileNotFoundError in the first), or truncated it under the first's rename, and a user's own
    ``m.onnx.part`` was deleted; no fsync preceded the rename. Now each export writes a file of its own,
    flushed before it is renamed (lowbit.state_io.write_atomically)."""
    torch.manual_seed(0)
    x = _data(16)
    qm = lowbit.quantize(_Plain().eval(), "w8a8", calib=x, progress=False)
    other = lowbit.quantize(_Plain().eval(), "w4a4", calib=x, progress=False)
    target = tmp_path / "m.onnx"
    mine = tmp_path / "m.onnx.part"
    mine.write_text("my notes")
    real_replace, real_fsync = os.replace, os.fsync
    events: list[str] = []

    def replace(src, dst, *args, **kwargs):
        events.append("replace")
        if events.count("replace") == 1:
            export_onnx(other, target, x[:1])  # another process exports to the same path just before the rename
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    export_onnx(qm, target, x[:1])
    monkeypatch.undo()
    assert events == ["fsync", "replace", "fsync", "replace"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.part"]  # no temporary file left
    assert mine.read_text() == "my notes"
    with torch.no_grad():  # the last rename wins, whole: the first export's model
        assert float((OnnxModel(target, threads=1)(x) - qm(x)).abs().max()) < 1e-5


def test_export_leaves_a_training_model_as_it_was(tmp_path):
    """The exporter's probe and shape forwards ran a model in training mode as such: its BN running
    statistics moved (and were exported), and its later eval outputs changed."""
    torch.manual_seed(0)
    x = _data()
    qm = lowbit.quantize(_Plain().eval(), {"extends": "w4a4", "name": "nofold", "fold_bn": False,
                                            "steps": ["calibrate"]}, calib=x, progress=False)
    qm.eval()
    with torch.no_grad():
        before = qm(x)
    state = {k: v.clone() for k, v in qm.state_dict().items()}
    qm.train()
    frozen = qm.layers["c1"].layer
    frozen.eval()  # a submodule the caller put in eval mode keeps it
    path = export_onnx(qm, tmp_path / "m.onnx", x[:1])
    assert qm.training and qm.net.b0.training and not frozen.training
    assert all(torch.equal(v, qm.state_dict()[k]) for k, v in state.items())
    qm.eval()
    with torch.no_grad():
        assert torch.equal(qm(x), before)
        assert float((OnnxModel(path, threads=1)(x) - before).abs().max()) < 1e-5


def _xnor_model(x: torch.Tensor) -> QuantModel:
    y = torch.randint(0, 8, (x.shape[0],))
    qat = {"qat": {"epochs": 1, "batch_size": 16, "lr": 0.001, "val_samples": 16, "steps_per_epoch": 2}}
    torch.manual_seed(0)
    return lowbit.quantize(_Plain().eval(), {"extends": "w1a1-xnor", "name": "xnor", "steps": ["calibrate", qat]},
                           calib=x, train=(x, y), progress=False)


def test_opsets_are_checked_and_xnor_exports_at_opset_18_and_later(tmp_path):
    """An opset below 13 wrote a model no runtime ran, and from opset 18 XNOR-Net's ReduceMean kept its
    axes as an attribute, which the ONNX checker refuses (a raw ValidationError). The range is checked,
    and from 18 on the axes are an input."""
    import contextlib
    import io

    x = _data(64)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        qm = _xnor_model(x)
    highest = onnx.defs.onnx_opset_version()
    for bad in (10, 12, highest + 1, "17", True):
        with pytest.raises(ExportError, match=rf"opset={bad!r}: the exporter writes opsets 13 to {highest}"):
            export_onnx(qm, tmp_path / "bad.onnx", x[:1], opset=bad)
    assert not (tmp_path / "bad.onnx").exists()
    for opset in (13, 18, 21):
        path = export_onnx(qm, tmp_path / f"op{opset}.onnx", x[:1], opset=opset)
        graph = onnx.load(str(path))
        reduce = [n for n in graph.graph.node if n.op_type == "ReduceMean"]
        # axes: an attribute up to opset 17, an input from 18 on
        assert reduce and all(("axes" in [a.name for a in n.attribute]) == (opset < 18) == (len(n.input) == 1)
                              for n in reduce)
        with torch.no_grad():
            assert float((OnnxModel(path, threads=1)(x) - qm(x)).abs().max()) < 1e-4


def test_an_invalid_graph_is_an_export_error(tmp_path, monkeypatch):
    torch.manual_seed(0)
    x = _data(16)
    qm = lowbit.quantize(_Plain().eval(), "w8a8", calib=x, progress=False)

    def refuse(model, *args, **kwargs):
        raise onnx.checker.ValidationError("Node (ReduceMean_3) has an unknown attribute axes")

    monkeypatch.setattr(onnx.checker, "check_model", refuse)
    with pytest.raises(ExportError, match="not a valid ONNX model at opset 17: Node .* unknown attribute axes"):
        export_onnx(qm, tmp_path / "m.onnx", x[:1])
    assert list(tmp_path.iterdir()) == []


def test_exporting_to_a_directory_or_under_a_file_is_named(tmp_path):
    """Both raised raw OS errors (IsADirectoryError, FileExistsError)."""
    torch.manual_seed(0)
    x = _data(16)
    qm = lowbit.quantize(_Plain().eval(), "w8a8", calib=x, progress=False)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(ExportError, match=r"cannot export to .*out: it is a directory; give a file path such as "
                                          r".*out/model\.onnx"):
        export_onnx(qm, folder, x[:1])
    a_file = tmp_path / "m.lowbit"
    a_file.write_text("not a folder")
    with pytest.raises(ExportError, match=r"cannot export to .*m\.lowbit/sub/m\.onnx: .*m\.lowbit is a file, not a "
                                          "folder"):
        export_onnx(qm, a_file / "sub" / "m.onnx", x[:1])
    assert a_file.read_text() == "not a folder" and list(folder.iterdir()) == []


# -- .lowbit artifacts --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet20_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    recipe = {"extends": "w8a8", "name": "w8a8-calibrated", "steps": ["calibrate"]}
    qm = lowbit.quantize(build("resnet20").eval(), recipe, calib=torch.randn(4, 3, 32, 32), progress=False)
    return lowbit.save(qm, tmp_path_factory.mktemp("r20") / "r20.lowbit")


def _arch(**kwargs):
    def mutate(h, c, f):
        h["arch"]["kwargs"] = kwargs
    return mutate


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": -1}, r"architecture 'resnet20' with \{'num_classes': -1\} cannot be built from the header "
                          r"\(Trying to create tensor with negative dimension"),
    ({"num_classes": 10 ** 12}, r"would hold more than \d+ parameter values, far more than the \d+ the file stores"),
    ({"width": 128}, r"would hold more than \d+ parameter values"),
    ({"depth": 2000}, r"would hold more than \d+ parameter values"),
    ({"depth": 32}, r"does not match the stored tensors: layer 'layer1\.3\.conv1' and 11 more of the model have no "
                    r"stored weight"),
    ({"num_classes": 11}, r"does not match the stored tensors: linear\.weight is \[11, 64\] in the model and "
                          r"\[10, 64\] in the file \(1 more tensors differ\)"),
])
def test_a_crafted_architecture_is_refused_before_it_is_built(resnet20_file, tmp_path, monkeypatch, kwargs, message):
    """The header's arch kwargs built the network before any check: a raw RuntimeError (num_classes=-1),
    terabytes asked for (num_classes=10**12), or minutes of building and tracing (depth=2000). The network
    is now built on the meta device under a budget the file accounts for, compared with the stored
    tensors, and only then built for real."""
    import lowbit.zoo as zoo

    real_build = zoo.build
    devices: list[str] = []

    def build_spy(name, **kw):
        model = real_build(name, **kw)
        devices.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(zoo, "build", build_spy)
    path = _craft(resnet20_file, tmp_path / "crafted.lowbit", _arch(**kwargs))
    with pytest.raises(ArtifactError, match=message):
        lowbit.load(path)
    assert "cpu" not in devices  # nothing was built for real


def test_an_unchanged_architecture_still_loads_and_a_layer_mismatch_is_one_line(resnet20_file):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    assert lowbit.load(resnet20_file)(x).shape == (2, 10)
    with pytest.raises(ArtifactError) as err:  # every layer name of both models was listed
        lowbit.load(resnet20_file, model=build("resnet32"))
    assert "layer 7 is 'layer2.0.conv1' in the file and 'layer1.3.conv1' in the model (20 layers in the file, " \
           "32 in the model)" in str(err.value) and len(str(err.value)) < 300


@pytest.mark.parametrize("name, recipe", [("resnet20", "w8a8"), ("resnet110", "w4a4"), ("small_cnn", "w2a32-twn"),
                                          ("lenet5", {"extends": "w4a4", "name": "kf", "keep_float": ["conv1"]}),
                                          ("resnet20", "w2a2-wrpn")])
def test_every_zoo_architecture_passes_the_check_against_its_own_layout(name, recipe):
    """No false refusal: each zoo model built on the meta device matches the tensors its QuantModel stores
    (kept-float layers, a widening recipe included)."""
    from lowbit.api import prepare
    from lowbit.deploy.artifact import _build_from_header, _stored_tensors

    qm = prepare(build(name), recipe)
    packed, floats = _stored_tensors(qm)
    tensors = {**{k: layer.weight for k, layer in packed.items()}, **floats}
    header = {"arch": {"name": name, "kwargs": {}}, "recipe": qm.meta["recipe"],
              "layout": [{"key": k, "shape": list(t.shape), "count": t.numel()} for k, t in tensors.items()]}
    assert type(_build_from_header(Path("m.lowbit"), header)) is type(build(name))


def test_a_header_cannot_make_an_activation_quantizer_per_channel(tmp_path):
    """A header switching an activation quantizer to per channel (with a 5-value scale for 6 channels)
    loaded, then failed at the first forward with a raw size mismatch."""
    torch.manual_seed(0)
    model, x = _Plain().eval(), _data()
    good = lowbit.save(lowbit.quantize(model, "w4a4", calib=x, progress=False), tmp_path / "good.lowbit")

    def per_channel(h, c, f):
        name = "net.act_quant_1"
        h["quantizers"][name]["spec"].update(per_channel=True, ch_axis=1)
        values, layout, offset = [], [], 0
        for key, shape in h["layout"]["floats"]:
            n = int(np.prod(shape))
            v = f[offset: offset + n]
            offset += n
            if key in (f"{name}.scale", f"{name}.zero_point"):
                v, shape = np.repeat(v[:1], 5), [5]
            layout.append([key, shape])
            values.append(v)
        h["layout"]["floats"] = layout
        return h, c, np.concatenate(values).astype(np.float32)

    crafted = _craft(good, tmp_path / "pc.lowbit", per_channel)
    with pytest.raises(ArtifactError, match="activation quantizer 'net.act_quant_1' is per channel in the header"):
        lowbit.load(crafted, model=_Plain().eval())


def test_metrics_from_numpy_or_torch_are_saved_and_others_are_named(tmp_path):
    """save(qm, path, metrics={"top1": np.float32(...)}) failed with a raw TypeError in the header encoder."""
    torch.manual_seed(0)
    qm = lowbit.quantize(_Plain().eval(), "w8a8", calib=_data(16), progress=False)
    metrics = {"top1": np.float32(0.5), "loss": torch.tensor(1.25), "n": np.int64(3),
               "per_class": [np.float64(0.25), 1.0], "nested": {"top5": torch.tensor(0.75, dtype=torch.float64)}}
    path = lowbit.save(qm, tmp_path / "m.lowbit", metrics=metrics)
    assert lowbit.load(path, model=_Plain().eval()).meta["metrics"] == {
        "top1": 0.5, "loss": 1.25, "n": 3, "per_class": [0.25, 1.0], "nested": {"top5": 0.75}}
    for bad, message in (({"top1": np.array([0.5, 0.6])}, r"metrics\['top1'\] is a ndarray of shape \[2\]"),
                         ({"curve": [torch.ones(3)]}, r"metrics\['curve'\]\[0\] is a Tensor of shape \[3\]"),
                         ({"when": object()}, r"metrics\['when'\] is a object"),
                         ({1: 0.5}, r"metrics has the key 1; metric names are strings"),
                         (torch.tensor(0.5), "metrics is a Tensor; pass a dict")):
        with pytest.raises(ArtifactError, match=message):
            lowbit.save(qm, tmp_path / "bad.lowbit", metrics=bad)
    assert not (tmp_path / "bad.lowbit").exists()


def test_the_file_holds_what_size_bits_counts_and_old_files_still_load(tmp_path):
    """theoretical_bytes (and the file) counted the scale and zero point of quantizers nothing reads (disabled
    activation quantizers, a codebook's placeholders), which qm.size_bits() does not: they are no longer
    stored; load leaves them at their defaults, uncalibrated, and still reads files that hold them."""
    torch.manual_seed(0)
    model, x = _Plain().eval(), _data()
    recipe = {"extends": "w4a4", "name": "km-a32", "weights": {"bits": 3}, "quantize_adds": False,
              "overrides": [{"pattern": "*", "a_bits": 32}],
              "steps": ["calibrate", "kmeans"]}
    qm = lowbit.quantize(model, recipe, calib=x, progress=False)
    assert 8 * theoretical_bytes(qm) == qm.size_bits()["stored_bits"]
    path = lowbit.save(qm, tmp_path / "m.lowbit")
    header, _, _ = read_header(path)
    stored = {e["key"] for e in header["layout"]}
    assert not {k for k in stored if k.endswith((".scale", ".zero_point"))} - {"net.c0.weight_quantizer.scale",
                                                                                "net.fc.weight_quantizer.scale"}
    loaded = lowbit.load(path, model=_Plain().eval())
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x))
    act = loaded.layers["c1"].input_quantizer
    assert not act.enabled and not act.calibrated
    loaded.layers["c1"].a_bits = 8  # re-enabled: it asks for a calibration instead of running a placeholder
    with pytest.raises(lowbit.LowbitError, match="has no scale yet"):
        loaded(x)

    def with_unread(h, c, f):  # as files written before this change hold them
        extra = [[f"net.act_quant_{i}.{b}", []] for i in range(3) for b in ("scale", "zero_point")] \
            + [["net.c1.weight_quantizer.scale", []]]  # the codebook's placeholder
        h["layout"]["floats"] += extra
        return h, c, np.concatenate([f, np.full(len(extra), 0.5, np.float32)])

    old = _craft(path, tmp_path / "old.lowbit", with_unread)
    with torch.no_grad():
        assert torch.equal(lowbit.load(old, model=_Plain().eval())(x), qm(x))
