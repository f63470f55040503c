"""Every input checked at the door (issue 15): generated malformed recipes, artifacts,
datasets and data shapes must each end in a LowbitError that names the offending key,
file or layer, with nothing written or changed on disk."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.data import load_dataset
from lowbit.data.registry import DATASETS
from lowbit.errors import DataMismatchError, LowbitError, RecipeError

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

VALID = {
    "extends": "w4a4", "weights": {"bits": 4, "estimator": "mse"}, "activations": {"bits": 4},
    "calibration": {"samples": 64, "batch_size": 32, "seed": 0}, "first_last_bits": 8, "add_bits": 8,
    "overrides": [{"pattern": "layer1.*", "w_bits": 6}],
    "steps": ["calibrate", {"qdrop": {"iters": 10, "lr_scale": 1e-4, "keep_prob": 0.5}}],
}
# (path to a key, values of the wrong type or out of range for it)
BAD_VALUES: list[tuple[tuple, list]] = [
    (("weights", "bits"), ["4", 4.0, 0, 9, True, None]),
    (("activations", "bits"), ["8", -1, 33]),
    (("weights", "symmetric"), [1, "yes", None]),
    (("weights", "per_channel"), ["true", 0]),
    (("activations", "signed"), ["yes", 2]),
    (("weights", "estimator"), ["mean", 3, None]),
    (("activations", "estimator_options"), [3, "q"]),
    (("weights", "grid"), ["odd", 1]),
    (("calibration", "samples"), [0, "10", -5, 1.5]),
    (("calibration", "batch_size"), [0, "x"]),
    (("calibration", "seed"), [-1, "0"]),
    (("first_last_bits",), [9, "8", 2.5]),
    (("add_bits",), [0, "8", 12]),
    (("fold_bn",), ["yes", 1]),
    (("quantize_adds",), ["no", 0]),
    (("overrides", 0, "w_bits"), [0, "4", 10]),
    (("overrides", 0, "pattern"), [3, ""]),
    (("steps", 1, "qdrop", "iters"), [0, "100", 1.5, -3]),
    (("steps", 1, "qdrop", "lr_scale"), [0, -1e-3, "fast", float("nan")]),
    (("steps", 1, "qdrop", "keep_prob"), [0, 1.5, "half"]),
]
SECTIONS = [(), ("weights",), ("activations",), ("calibration",), ("overrides", 0), ("steps", 1, "qdrop")]


def _set(data: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(data)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


@FAST
@given(case=st.sampled_from([(p, v) for p, vals in BAD_VALUES for v in vals]))
def test_generated_bad_values_name_their_key(case):
    path, value = case
    with pytest.raises(RecipeError) as err:
        lowbit.load_recipe(_set(VALID, path, value))
    assert str(path[-1]) in str(err.value), (path, value, str(err.value))


@pytest.mark.parametrize(("step", "key"), [({"easyquant": {"low": 1.5}}, "low=1.5 must be below high"),
                                          ({"zeroq": {"input_shape": [3, 32]}}, "input_shape"),
                                          ({"zeroq": {"iters": 0}}, "iters"), ({"usp": {"flip": "yes"}}, "flip"),
                                          ({"calibrate": {"act_estimator": "median"}}, "act_estimator")])
def test_other_steps_name_their_bad_parameter(step, key):
    with pytest.raises(RecipeError, match=key):
        lowbit.load_recipe({"steps": ["calibrate", step]})


@FAST
@given(section=st.sampled_from(SECTIONS),
       key=st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).map(lambda t: f"x{t}_"))
def test_generated_unknown_keys_at_every_level_are_named(section, key):
    # the "x..._" form is never a real key (generated real names would be accepted, rightly)
    bad = _set(VALID, section + (key,), 1)
    with pytest.raises(RecipeError, match=key):
        lowbit.load_recipe(bad)


@FAST
@given(length=st.integers(1, 4), data=st.data())
def test_generated_extends_cycles_through_files_are_named(tmp_path_factory, length, data):
    folder = tmp_path_factory.mktemp("cycle")
    names = [f"r{i}.yaml" for i in range(length)]
    for i, name in enumerate(names):
        (folder / name).write_text(f"extends: {names[(i + 1) % length]}\n")
    before = {p: p.read_bytes() for p in folder.iterdir()}
    start = folder / data.draw(st.sampled_from(names))
    with pytest.raises(RecipeError, match=r"cycle: .*" + start.name):
        lowbit.load_recipe(start)
    assert {p: p.read_bytes() for p in folder.iterdir()} == before  # nothing written


# ---------------------------------------------------------------------------- artifacts

@pytest.fixture(scope="module")
def saved_artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(8, 3, 8, 8)
    qm = lowbit.quantize(model, {"extends": "w4a4", "calibration": {"samples": 8}}, calib=x, progress=False)
    path = lowbit.save(qm, tmp_path_factory.mktemp("art") / "m.lowbit")
    return model, x, qm(x), path.read_bytes()


@FAST
@given(data=st.data())
def test_generated_damaged_artifacts_are_refused_or_load_exactly(tmp_path_factory, saved_artifact, data):
    """A flipped byte or a cut anywhere: an ArtifactError naming the file, or (a byte of
    the safetensors header's padding) the very same model. Never a different model."""
    model, x, expected, blob = saved_artifact
    damaged = bytearray(blob)
    if data.draw(st.booleans()):
        damaged = damaged[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        i = data.draw(st.integers(0, len(blob) - 1))
        damaged[i] ^= data.draw(st.integers(1, 255))
    path = tmp_path_factory.mktemp("bad") / "m.lowbit"
    path.write_bytes(bytes(damaged))
    try:
        loaded = lowbit.load(path, model=model)
    except LowbitError as err:
        assert str(path) in str(err)
    else:
        assert torch.equal(loaded(x), expected)
    assert path.read_bytes() == bytes(damaged)  # loading never writes


def test_edited_header_bits_are_caught(tmp_path, saved_artifact):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from lowbit.deploy import header_codec

    model, _, _, blob = saved_artifact
    path = tmp_path / "m.lowbit"
    path.write_bytes(blob)
    tensors = load_file(str(path))
    header = header_codec.decode(tensors["header"].tobytes())
    header["layers"][1]["w_bits"] = 3  # the edit the issue describes (it was 8)
    tensors["header"] = np.frombuffer(header_codec.encode(header), dtype=np.uint8)
    save_file(tensors, str(path), metadata={"lowbit": "3"})
    with pytest.raises(LowbitError, match="checksum mismatch — the header or the tensor data"):
        lowbit.load(path, model=model)


def test_load_into_other_widths_and_save_over_other_files(tmp_path, saved_artifact):
    model, x, _, blob = saved_artifact
    path = tmp_path / "m.lowbit"
    path.write_bytes(blob)
    wider = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 4)).eval()
    with pytest.raises(LowbitError, match=r"layer '0': the file holds weight of shape \[8, 3, 3, 3\], the model's is \[16, 3, 3, 3\]"):
        lowbit.load(path, model=wider)
    qm = lowbit.load(path, model=model)
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    with pytest.raises(LowbitError, match="refusing to overwrite .*notes.txt"):
        lowbit.save(qm, precious)
    assert precious.read_text() == "keep me"
    with pytest.raises(LowbitError, match="is a directory"):
        lowbit.save(qm, tmp_path)
    lowbit.save(qm, path)  # over an artifact: allowed, atomically
    assert not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------- datasets

def _fake_cifar(folder: Path, records: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    recs = rng.integers(0, 256, size=(records, 3073), dtype=np.uint8)
    recs[:, 0] %= 10
    path = folder / "cifar-10-batches-bin" / "test_batch.bin"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(recs.tobytes())
    return path


@FAST
@given(cut=st.integers(0, 20 * 3073 - 1))
def test_generated_truncated_datasets_are_errors_never_smaller_sets(tmp_path_factory, monkeypatch, cut):
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(DATASETS["cifar10"], split_sizes={"test": 20}))
    root = tmp_path_factory.mktemp("ds")
    path = _fake_cifar(root, 20)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(LowbitError, match="test_batch.bin"):
        load_dataset("cifar10", "test", data_dir=root, download=False)
    assert path.stat().st_size == cut


# ---------------------------------------------------------------------------- data vs model

class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.head(torch.flatten(torch.relu(self.stem(x)), 1))


@FAST
@given(shape=st.lists(st.integers(1, 10), min_size=1, max_size=5).map(tuple))
def test_generated_data_shapes_fit_or_name_the_layer(shape):
    model = _Tiny().eval()
    x = torch.randn((2,) + shape)
    try:
        lowbit.quantize(model, {"extends": "w8a8", "calibration": {"samples": 2}}, calib=x, progress=False)
    except DataMismatchError as err:
        msg = str(err)
        assert "calibration batch 0 has shape" in msg and ("`stem`" in msg or "`head`" in msg), msg
    else:
        assert shape == (3, 8, 8)


def test_data_forms_accepted_or_refused_by_name(cifar_slices):
    model = _Tiny().eval()
    ds = torch.utils.data.TensorDataset(torch.randn(40, 3, 8, 8), torch.zeros(40, dtype=torch.long))
    recipe = {"extends": "w8a8", "calibration": {"samples": 32, "batch_size": 16}}
    qm = lowbit.quantize(model, recipe, calib=ds, progress=False)  # a map-style Dataset: stacked
    assert qm.meta["calibration_samples"] == 32
    # each step's own time, in recipe order, within the whole quantize call's
    assert [name for name, _ in qm.meta["step_seconds"]] == ["calibrate"]
    assert 0 <= sum(s for _, s in qm.meta["step_seconds"]) <= qm.meta["quantize_seconds"]
    loader = torch.utils.data.DataLoader(ds, batch_size=10)
    assert lowbit.quantize(model, recipe, calib=loader, progress=False).meta["calibration_samples"] == 32
    with pytest.raises(DataMismatchError, match=r"calibration batch 1 has shape \(4, 3, 6, 6\)"):
        lowbit.quantize(model, recipe, calib=[torch.randn(4, 3, 8, 8), torch.randn(4, 3, 6, 6)], progress=False)
    with pytest.raises(LowbitError, match="not iterable"):
        lowbit.quantize(model, recipe, calib=3, progress=False)
    with pytest.raises(DataMismatchError, match=r"test batch 0 has shape \(2, 1, 8, 8\); the model's layer `stem`"):
        lowbit.evaluate(model, [(torch.randn(2, 1, 8, 8), torch.zeros(2))])
    with pytest.raises(DataMismatchError, match=r"example input has shape \(1, 3, 9, 9\).*`head`"):
        lowbit.export_onnx(qm, "unused.onnx", torch.randn(1, 3, 9, 9))
    assert not Path("unused.onnx").exists()


def test_nan_batchnorm_statistic_names_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model[1].running_var[2] = float("nan")
    with pytest.raises(LowbitError, match=r"buffer '1.running_var' holds NaN/Inf"):
        lowbit.quantize(model, "w8a8", calib=torch.randn(4, 3, 8, 8), progress=False)


def test_keep_float_typo_and_empty_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="keep_float pattern 'stme' matches no layer"):
        lowbit.quantize(_Tiny().eval(), {"keep_float": ["stme"]}, calib=torch.randn(4, 3, 8, 8), progress=False)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(RecipeError, match="is empty"):
        lowbit.load_recipe(empty)
    (tmp_path / "blank.yaml").write_text("{}\n")
    with pytest.raises(RecipeError, match="holds no settings"):
        lowbit.load_recipe(tmp_path / "blank.yaml")


def test_yaml_numbers_that_pyyaml_reads_as_strings(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("extends: w4a4\nsteps:\n  - calibrate\n  - qdrop: {iters: 10, lr_scale: 1e-4}\n")
    r = lowbit.load_recipe(f)
    assert r.steps[1] == ("qdrop", {"iters": 10, "lr_scale": 1e-4})  # "1e-4" from YAML, as a number
    f.write_text("extends: w4a4\nsteps:\n  - calibrate\n  - qdrop: {iters: '10'}\n")
    with pytest.raises(RecipeError, match=r"step 'qdrop': iters='10' is invalid; expected an integer >= 1"):
        lowbit.load_recipe(f)


# ---------------------------------------------------------------------------- the CLI

def test_cli_refuses_bad_paths_and_never_shows_a_traceback(tmp_path, capsys, monkeypatch):
    for argv, message in (
        (["eval", "--weights", str(tmp_path / "none.safetensors")], "none.safetensors does not exist"),
        (["eval", "--onnx", str(tmp_path)], "is a directory, not a file"),
        (["quantize", "--json", str(tmp_path)], "is an existing directory"),
        (["search", "--target-ratio", "-2"], "must be a number > 0"),
        (["search", "--target-ratio", "8", "--b-max", "12"], "bit width in 1..8"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(SystemExit):
        main(["quantize", "--save", str(a_file)])
    assert "is an existing file" in capsys.readouterr().err

    import lowbit.cli as cli

    def boom(args):
        raise RuntimeError("deep inside")

    monkeypatch.setattr(cli, "cmd_models", boom)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert "lowbit: error: RuntimeError: deep inside" in err and "Traceback" not in err and "--debug" in err


def test_recipes_explain_prints_a_steps_schema(capsys):
    assert main(["recipes", "--explain", "qdrop"]) == 0
    out = capsys.readouterr().out
    assert "keep_prob" in out and "a number > 0 and <= 1" in out and "iters" in out
    assert main(["recipes", "--explain", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown step or quantizer kind 'nosuch'" in err and "'lqnet'" in err and "'qdrop'" in err


def test_recipes_explain_prints_a_quantizer_kinds_options_per_role(capsys):
    assert main(["recipes", "--explain", "lqnet"]) == 0
    out = capsys.readouterr().out
    assert "quantizer 'lqnet' (weights and activations)" in out
    rows = [line.split() for line in out.splitlines() if "momentum" in line or "fit_fraction" in line]
    assert [r[:2] for r in rows] == [["weights", "momentum"], ["activations", "momentum"], ["activations", "fit_fraction"]]
    assert "0.25" in rows[2]  # the default
    assert main(["recipes", "--explain", "uniform"]) == 0
    assert "(none)" in capsys.readouterr().out  # a fixed grid has no options
    assert main(["recipes", "--explain", "kmeans"]) == 0  # a step and a quantizer kind of that name: both shown
    out = capsys.readouterr().out
    assert "step 'kmeans' parameters" in out and "quantizer 'kmeans' (weights)" in out


def test_cli_dataset_that_does_not_fit_the_model_is_named(capsys, data_dir, models_dir):
    assert main(["eval", "--dataset", "mnist", "--test-limit", "50", "--data-dir", str(data_dir), "--models-dir",
                 str(models_dir), "--no-progress", "--no-download"]) == 2
    err = capsys.readouterr().err
    assert "layer `conv1` (Conv2d) expects a 4-D (N, C, H, W) input with 3 channels" in err
    assert "--dataset mnist does not fit --model resnet20" in err and "Traceback" not in err


def test_a_state_commit_removes_only_its_own_earlier_tensors_files(tmp_path):
    """lowbit.state_io.commit_state drops the tensors file the JSON no longer names, and the legacy fixed
    name, but never another file that merely starts with the stem (a user's state_backup.safetensors)."""
    import json

    from safetensors.torch import save_file

    from lowbit.state_io import commit_state, committed_tensors

    for name in ("state.safetensors", "state-3.safetensors", "state_backup.safetensors", "statement.safetensors"):
        save_file({"x": torch.zeros(1)}, str(tmp_path / name))
    commit_state(tmp_path, "state", 4, {"x": torch.ones(2)}, "side.json", {"epoch": 4})
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "state-4.safetensors", "state_backup.safetensors", "statement.safetensors"]
    side = json.loads((tmp_path / "side.json").read_text())
    assert committed_tensors(tmp_path, side, "state.safetensors").name == "state-4.safetensors"


def test_a_dataset_calibrates_on_the_images_the_cli_draws_from_it():
    """The API took a Dataset's first N samples, `lowbit quantize` a seeded subset: the same
    recipe on the same training split calibrated on other images in the two."""
    from lowbit.evaluation import calibration_batches
    from lowbit.ptq.batches import as_batches
    from lowbit.recipes.recipe import load_recipe

    ds = torch.utils.data.TensorDataset(torch.arange(100.0).reshape(100, 1, 1, 1), torch.zeros(100, dtype=torch.long))
    recipe = load_recipe({"extends": "w8a8", "calibration": {"samples": 24, "batch_size": 8, "seed": 3}})
    api = as_batches(ds, 24, 8, seed=3)
    cli = calibration_batches(ds, recipe)
    assert [b.shape[0] for b in api] == [8, 8, 8]
    assert torch.equal(torch.cat(api), torch.cat(cli))
    assert not torch.equal(torch.cat(api).flatten(), torch.arange(24.0))  # not the first 24
    assert torch.equal(torch.cat(as_batches(ds, 24, 8)).flatten(), torch.arange(24.0))  # no seed: in order
    assert torch.equal(torch.cat(as_batches(ds, 500, 8, seed=3)).flatten(), torch.arange(100.0))  # all of it
