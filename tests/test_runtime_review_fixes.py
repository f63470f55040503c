"""Fixes from a review of the runtime side: the run registry under a file, the runtime
benchmark (no recipes, "|" in a recipe name, honest repeat counts), falsy step parameters,
the forward probe's blame, ONNX input types and empty batches, and float codes in packing."""
from __future__ import annotations

import argparse

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn
from torch.utils.data import TensorDataset

import lowbit.deploy.bench as bench
from lowbit.checks import probe_forward
from lowbit.deploy.packing import pack_codes, unpack_codes
from lowbit.deploy.runtime import OnnxModel
from lowbit.errors import DataMismatchError, LowbitError, RecipeError
from lowbit.recipes.recipe import load_recipe
from lowbit.registry import Registry
from lowbit.zoo import build

# ---------------------------------------------------------------- 1. registry under a file


def test_a_registry_path_under_a_file_is_a_named_lowbit_error(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(LowbitError, match=r"cannot be created: .*afile is not a folder"):
        Registry(tmp_path / "afile" / "runs.sqlite3")
    with pytest.raises(LowbitError, match=r"afile is not a folder"):  # deeper: the file is an ancestor
        Registry(tmp_path / "afile" / "sub" / "runs.sqlite3")


def test_the_cli_only_warns_when_the_default_registry_sits_under_a_file(tmp_path, monkeypatch, capsys):
    from lowbit.cli import _open_run

    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("LOWBIT_REGISTRY", str(tmp_path / "afile" / "runs.sqlite3"))
    args = argparse.Namespace(command="eval", registry=None)
    _open_run(args, ["eval"])  # raised a raw FileExistsError, which aborted every recorded command
    assert getattr(args, "_run", None) is None
    assert "not recording this run" in capsys.readouterr().err


# ---------------------------------------------------------------- 2, 3, 5. runtime benchmark


def _bench_inputs():
    torch.manual_seed(0)
    model = build("small_cnn")
    x = torch.randn(24, 1, 28, 28)
    y = model(x).argmax(1).detach()
    return model.eval(), TensorDataset(x[:16], y[:16]), TensorDataset(x[16:], y[16:])


def test_bench_with_no_recipes_is_refused_by_name():
    model, train, test = _bench_inputs()
    with pytest.raises(LowbitError, match="name at least one recipe"):  # was an IndexError
        bench.run_runtime_benchmark(model, train, test, recipes=[], threads=1, repeats=1)


def test_a_recipe_name_holding_a_pipe_gets_its_row_and_the_payload_counts_timed_runs():
    model, train, test = _bench_inputs()
    recipe = {"name": "w8a8|per-tensor", "extends": "w8a8", "calibration": {"samples": 16}}
    out = bench.run_runtime_benchmark(model, train, test, recipes=(recipe,), threads=1, repeats=3)
    assert ("lowbit w8a8|per-tensor", "ort") in {(r["engine"], r["runtime"]) for r in out["rows"]}
    assert out["repeats"] == 3 and out["timed_runs_b64"] == 3 and out["timed_runs_b1"] == 4 * 3


class _LastBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.last = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = len(x)
        return x


@pytest.mark.parametrize("repeats", [1, 5, 19, 20, 29, 50])
def test_time_engines_times_exactly_the_runs_asked_for(repeats, monkeypatch):
    timed = {1: 0, 64: 0}
    engine = _LastBatch()

    def count(fn, warmup, repeats):
        fn()
        timed[engine.last] += repeats
        return 1.0

    monkeypatch.setattr(bench, "median_seconds", count)
    bench.time_engines({("e", "pytorch"): engine}, torch.zeros(1, 1), torch.zeros(64, 1), repeats=repeats)
    assert timed == {1: 4 * repeats, 64: repeats}  # before: 1..19 all timed 10 batch-64 runs, 29 timed 20


def test_time_engines_refuses_zero_repeats():
    with pytest.raises(LowbitError, match="repeats"):
        bench.time_engines({"e": _LastBatch()}, torch.zeros(1, 1), torch.zeros(64, 1), repeats=0)


# ---------------------------------------------------------------- 4. falsy step parameters

_BASE = {"name": "t", "weights": {"bits": 4}, "activations": {"bits": 8}}


@pytest.mark.parametrize("params", [False, 0, "", [], True, "off"])
def test_a_step_whose_parameters_are_not_a_mapping_is_refused(params):
    with pytest.raises(RecipeError, match=r"parameters must be a mapping.*delete it"):
        load_recipe({**_BASE, "steps": ["calibrate", {"bias_correction": params}]})


def test_a_step_written_with_no_parameters_is_still_accepted():  # guards against over-refusal
    recipe = load_recipe({**_BASE, "steps": [{"calibrate": None}, {"bias_correction": {}}]})
    assert [name for name, _ in recipe.steps] == ["calibrate", "bias_correction"]


# ---------------------------------------------------------------- 6. the forward probe's blame


class _LeNet(nn.Module):
    """The PyTorch-tutorial LeNet, built for 32x32 images (its view hard-codes 16*5*5)."""

    def __init__(self, flatten_by_view: bool = True) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 10)
        self.by_view = flatten_by_view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, 16 * 5 * 5) if self.by_view else torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def test_a_failure_in_the_models_own_code_does_not_blame_a_layer_that_ran():
    with pytest.raises(DataMismatchError) as err:
        probe_forward(_LeNet().eval(), torch.zeros(8, 1, 28, 28), "calibration batch 0")
    message = str(err.value)
    assert "own code" in message and "after layer `conv2` (Conv2d)" in message
    assert "output had shape (1, 16, 8, 8)" in message
    assert "expects" not in message


def test_a_layer_that_refuses_its_input_is_still_blamed():  # guards against over-refusal: passes before too
    with pytest.raises(DataMismatchError, match=r"layer `fc1` \(Linear\) expects 400 input features and got "
                                                r"\(1, 256\)"):
        probe_forward(_LeNet(flatten_by_view=False).eval(), torch.zeros(2, 1, 28, 28), "test batch 0")
    with pytest.raises(DataMismatchError, match=r"layer `conv1` \(Conv2d\) expects a 4-D \(N, C, H, W\) input with "
                                                r"1 channels and got \(1, 3, 32, 32\)"):
        probe_forward(_LeNet().eval(), torch.zeros(2, 3, 32, 32), "test batch 0")


# ---------------------------------------------------------------- 7. ONNX input types, empty batches


def _cast_model(path, input_type: int) -> str:
    """y = float(x) for x of ``input_type``, shape (N, 3)."""
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "g",
                              [helper.make_tensor_value_info("x", input_type, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


RUNTIMES = ["ort", "openvino"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_float16_input_model_gets_float16_inputs(tmp_path, runtime):
    model = OnnxModel(_cast_model(tmp_path / "f16.onnx", TensorProto.FLOAT16), threads=1, runtime=runtime)
    x = torch.tensor([[0.5, -1.25, 3.0], [2.0, 0.0, -0.75]])  # exact in float16
    assert torch.equal(model(x), x)  # ONNX Runtime raised a raw InvalidArgument (float fed to a float16 input)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_integer_data_for_a_float_input_is_refused_naming_its_dtype(tmp_path, runtime):
    model = OnnxModel(_cast_model(tmp_path / "f32.onnx", TensorProto.FLOAT), threads=1, runtime=runtime)
    with pytest.raises(DataMismatchError, match=r"expects input 'x' as float32.*got uint8"):
        model(torch.full((2, 3), 200, dtype=torch.uint8))  # raw pixels ran silently, unnormalised


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_bfloat16_and_float64_inputs_run(tmp_path, runtime):  # bfloat16 was a raw TypeError
    model = OnnxModel(_cast_model(tmp_path / "f32.onnx", TensorProto.FLOAT), threads=1, runtime=runtime)
    x = torch.tensor([[0.5, -1.25, 3.0]])
    assert torch.equal(model(x.to(torch.bfloat16)), x) and torch.equal(model(x.double()), x)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_an_empty_batch_gets_one_answer_in_both_runtimes(tmp_path, runtime):
    model = OnnxModel(_cast_model(tmp_path / "f32.onnx", TensorProto.FLOAT), threads=1, runtime=runtime)
    with pytest.raises(DataMismatchError, match="holds no samples"):  # ORT returned (0, 3), OpenVINO failed
        model(torch.zeros(0, 3))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_an_integer_input_model_takes_its_own_dtype_and_refuses_floats(tmp_path, runtime):
    model = OnnxModel(_cast_model(tmp_path / "u8.onnx", TensorProto.UINT8), threads=1, runtime=runtime)
    assert torch.equal(model(torch.tensor([[1, 2, 255]], dtype=torch.uint8)), torch.tensor([[1.0, 2.0, 255.0]]))
    with pytest.raises(DataMismatchError, match=r"expects input 'x' as uint8, got float32"):
        model(torch.tensor([[1.5, 2.0, 3.0]]))


# ---------------------------------------------------------------- 8. float codes in packing


@pytest.mark.parametrize("codes", [[-0.9, 3.9], [0.4, 1.9, 2.7], [float("nan"), 1.0]])
def test_non_integer_codes_are_refused_not_truncated(codes):
    with pytest.raises(LowbitError, match="codes must be integers"):
        pack_codes(np.array(codes), 2, 0)  # -0.9 and 3.9 packed as 0 and 3


def test_integer_codes_and_whole_float_codes_still_pack():  # guards against over-refusal: passes before too
    codes = np.array([-2, -1, 0, 1], dtype=np.int32)  # what artifact.save passes
    assert np.array_equal(unpack_codes(pack_codes(codes, 2, -2), 4, 2, -2), codes)
    assert np.array_equal(unpack_codes(pack_codes(codes.astype(np.float32), 2, -2), 4, 2, -2), codes)


def test_unpack_refuses_a_width_or_count_it_cannot_mean():
    """A crafted header's count or width reached numpy as a negative reshape or a 9-bit plane."""
    from lowbit.deploy.packing import pack_codes, unpack_codes
    from lowbit.errors import BitsError

    packed = pack_codes(np.arange(4), 2, 0)
    assert unpack_codes(packed, 4, 2, 0).tolist() == [0, 1, 2, 3]
    with pytest.raises(BitsError, match="cannot unpack 9-bit codes"):
        unpack_codes(packed, 1, 9, 0)
    with pytest.raises(LowbitError, match="cannot unpack -1 codes"):
        unpack_codes(np.zeros(0, np.uint8), -1, 8, 0)
