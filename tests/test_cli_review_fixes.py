"""Defects a review of the CLI's outputs, `eval`, `bench`, `recipes` and recipe overrides found."""
from __future__ import annotations

import io
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.zoo import build


@pytest.fixture
def small_cnn_weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "cnn.safetensors"
    save_file(build("small_cnn").state_dict(), str(path))
    return path


@pytest.mark.parametrize("command", [["search", "--out"], ["search", "--checkpoint"], ["quantize", "--json"],
                                     ["quantize", "--save"]])
def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, capsys, command):
    """Found when the results were written, it lost a whole search (HAWQ keeps no checkpoint)."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main([*command, str(blocker / "plan.json"), "--no-progress"])
    assert exc.value.code == 2
    assert f"{blocker} is a file, not a folder" in capsys.readouterr().err


def test_bench_refuses_two_recipes_of_one_name(tmp_path):
    from lowbit.deploy.bench import run_runtime_benchmark

    for folder, bits in (("a", 8), ("b", 2)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.yaml").write_text(f"name: x\nextends: w8a8\nweights: {{bits: {bits}}}\n")
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    with pytest.raises(LowbitError, match=r"recipe name\(s\) \['x'\] given more than once"):
        run_runtime_benchmark(build("small_cnn").eval(), data, data, [str(tmp_path / "a" / "x.yaml"),
                                                                       str(tmp_path / "b" / "x.yaml")])


def test_bench_removes_its_scratch_folder(tmp_path, monkeypatch):
    import tempfile

    from lowbit.deploy.bench import run_runtime_benchmark

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(70, 1, 28, 28), torch.randint(0, 10, (70,)))
    out = run_runtime_benchmark(build("small_cnn").eval(), data, data, ["w8a8"], threads=1, repeats=1, test_limit=8)
    assert out["rows"] and not list(tmp_path.glob("lowbit-bench-*"))  # (every run left ~2 MB behind)


def test_eval_of_an_artifact_refuses_another_model_and_records_its_own(tmp_path, capsys, data_dir, small_cnn_weights):
    from lowbit.registry import Registry

    assert main(["quantize", "--model", "small_cnn", "--weights", str(small_cnn_weights), "--recipe", "w8a8",
                 "--data-dir", str(data_dir), "--test-limit", "20", "--save", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    artifact = tmp_path / "out" / "w8a8.lowbit"
    args = ["eval", "--lowbit", str(artifact), "--data-dir", str(data_dir), "--test-limit", "20", "--no-progress"]
    assert main([*args, "--model", "lenet5"]) == 2
    assert f"{artifact} holds a small_cnn, not the --model lenet5" in capsys.readouterr().err
    assert main([*args, "--runtime", "openvino"]) == 2
    assert "--runtime picks the runtime of an --onnx model" in capsys.readouterr().err
    assert main(args) == 0
    last = Registry().list(limit=1)[0]
    assert last["command"] == "eval" and last["model"] == "small_cnn"  # the registry said resnet20, the default


def test_eval_of_an_onnx_file_reads_its_model_and_dataset_from_the_file(tmp_path, capsys, data_dir,
                                                                         small_cnn_weights):
    """`eval --onnx` had scored every file on --model's default dataset (CIFAR-10) and recorded resnet20."""
    import onnx

    from lowbit.registry import Registry

    exported = tmp_path / "m.onnx"
    assert main(["export", "--model", "small_cnn", "--weights", str(small_cnn_weights), "--recipe", "w8a8",
                 "--data-dir", str(data_dir), "--out", str(exported), "--no-progress"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    assert meta == {"lowbit.arch": "small_cnn", "lowbit.dataset": "mnist"}
    args = ["eval", "--data-dir", str(data_dir), "--test-limit", "20", "--no-progress"]
    assert main([*args, "--onnx", str(exported), "--model", "lenet5"]) == 2
    assert f"{exported} holds a small_cnn, not the --model lenet5" in capsys.readouterr().err
    capsys.readouterr()
    assert main([*args, "--onnx", str(exported)]) == 0  # MNIST from the file: CIFAR-10 would not fit
    last = Registry().list(limit=1)[0]
    assert last["model"] == "small_cnn" and last["dataset"] == "mnist"
    # a file that names nothing (another tool's) needs the dataset said, and records no model
    bare = onnx.load(str(exported))
    del bare.metadata_props[:]
    anonymous = tmp_path / "bare.onnx"
    onnx.save(bare, str(anonymous))
    assert main([*args, "--onnx", str(anonymous)]) == 2
    assert "does not say which model or dataset it holds" in capsys.readouterr().err
    assert main([*args, "--onnx", str(anonymous), "--dataset", "mnist"]) == 0
    last = Registry().list(limit=1)[0]
    assert last["model"] is None and last["dataset"] == "mnist"


def test_recipes_lists_float_activations_as_float_and_show_prints_only_the_recipe(capsys):
    assert main(["recipes"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("w2a32-ttq "))
    assert " float " in row and "4b" not in row.split("w2a32-ttq")[1].split("float")[0]
    assert main(["recipes", "--show", "w8a8"]) == 0
    shown = capsys.readouterr().out
    assert "w2a32-ttq" not in shown and "weights:" in shown


def test_a_reader_that_leaves_early_is_not_reported_as_a_bug(monkeypatch, capsys):
    class Gone(io.StringIO):
        def write(self, text):  # noqa: ANN001, ANN202
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            return self._fd

    out = Gone()
    out._fd = open("/dev/null", "w").fileno()  # noqa: SIM115 - the dup2 target, closed with the process
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["recipes"]) == 141
    assert "this is a bug" not in capsys.readouterr().err


class _TwoReaders(nn.Module):
    """Two convs reading one tensor (one activation quantizer between them), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conva, self.convb = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.head(torch.flatten(torch.relu(self.conva(h) + self.convb(h)), 1))


def test_an_a_bits_override_on_one_of_two_readers_of_a_tensor_is_refused():
    torch.manual_seed(0)
    recipe = {"extends": "w8a8", "name": "t", "overrides": [{"pattern": "convb", "a_bits": 2}]}
    with pytest.raises(LowbitError, match=r"overrides\[0\] gives a_bits 2 to 'convb', but \['conva'\] read the same"):
        lowbit.quantize(_TwoReaders().eval(), recipe, calib=torch.randn(16, 1, 8, 8), progress=False)
    both = {**recipe, "overrides": [{"pattern": "conv*", "a_bits": 2}]}
    qm = lowbit.quantize(_TwoReaders().eval(), both, calib=torch.randn(16, 1, 8, 8), progress=False)
    assert qm.layers["conva"].a_bits == qm.layers["convb"].a_bits == 2


def test_an_override_to_8_bits_in_a_1_bit_recipe_keeps_the_integer_grid(tmp_path):
    """Only the first/last rule switched 8-bit layers off the mid-rise grid: an override's 8-bit layer could not export."""
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = build("small_cnn").eval()
    x = torch.randn(16, 1, 28, 28)
    names = [r.name for r in lowbit.quantize(model, "w8a8", calib=x, progress=False).layers]
    recipe = {"extends": "w1a4", "name": "t", "overrides": [{"pattern": names[1], "w_bits": 8}]}
    qm = lowbit.quantize(model, recipe, calib=x, progress=False)
    assert qm.layers[names[1]].layer.weight_quantizer.spec.grid == "midtread"
    lowbit.export_onnx(qm, tmp_path / "m.onnx", x[:1])


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_an_artifact_target_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch, command):
    """Refused after quantizing, `export --lowbit notes.txt` left its ONNX file behind and `quantize --save`
    lost every recipe's work; now nothing is loaded or quantized."""
    import lowbit.cli as cli

    def no_work(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the target was checked")

    monkeypatch.setattr(cli, "_load_model", no_work)
    notes = tmp_path / "w8a8.lowbit"
    notes.write_text("my notes")  # an existing file that is not an artifact
    if command == "quantize":
        argv = ["quantize", "--recipe", "w8a8", "--save", str(tmp_path), "--no-progress"]
    else:
        argv = ["export", "--recipe", "w8a8", "--out", str(tmp_path / "m.onnx"), "--lowbit", str(notes), "--no-progress"]
    assert main(argv) == 2
    assert f"refusing to overwrite {notes}" in capsys.readouterr().err
    assert notes.read_text() == "my notes" and not (tmp_path / "m.onnx").exists()


def test_search_refuses_typed_widths_with_candidates(capsys):
    """--b-min 2 --candidates 3,4 searched 3..4 bits; typing the default value is refused too (the argv says it was)."""
    assert main(["search", "--method", "hawq", "--target-bits", "3", "--candidates", "3,4", "--b-min", "2",
                 "--no-progress"]) == 2
    assert "--b-min given with --candidates" in capsys.readouterr().err


def test_abbreviated_options_are_refused(capsys):
    """`--b-mi 4` was taken as --b-min by argparse's prefix matching, unseen by the checks that read the argv."""
    with pytest.raises(SystemExit) as exc:
        main(["search", "--method", "hawq", "--target-bits", "3", "--candidates", "3,4", "--b-mi", "4"])
    assert exc.value.code == 2 and "unrecognized arguments: --b-mi 4" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["export", "analyze"])
def test_one_model_commands_refuse_a_second_recipe(tmp_path, capsys, command):
    """export and analyze make one model from the first --recipe: a second one was silently ignored."""
    out = ["--out", str(tmp_path / "m.onnx")] if command == "export" else []
    code = main([command, "--recipe", "w4a4,w8a8", *out, "--no-progress", "--no-registry"])
    assert code != 0
    assert "--recipe names 2 recipes ('w4a4,w8a8'); lowbit " + command + " takes one" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
