"""`lowbit train --recipe`: what the options hand to the qat step, and the targets checked before training."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import lowbit.api
from lowbit.cli import main
from lowbit.zoo import build


@pytest.fixture
def qat_step(monkeypatch):
    """Runs `lowbit train` up to the quantize call and returns the qat step it was handed (None: never called)."""
    seen: dict = {}

    def capture(model, source, **kw):  # noqa: ANN001, ANN003, ANN202
        seen["qat"] = next(s["qat"] for s in source["steps"] if isinstance(s, dict) and "qat" in s)
        raise SystemExit(0)

    monkeypatch.setattr(lowbit.api, "quantize", capture)

    def run(args: list[str]) -> dict | None:
        seen.clear()
        try:
            code = main(args)
        except SystemExit:
            return seen["qat"]
        assert code != 0
        return None

    return run


@pytest.fixture
def base_args(tmp_path, data_dir):
    weights = tmp_path / "cnn.safetensors"
    torch.manual_seed(0)
    save_file(build("small_cnn").state_dict(), str(weights))
    return ["train", "--model", "small_cnn", "--weights", str(weights), "--data-dir", str(data_dir),
            "--train-limit", "600", "--no-progress"]


def _recipe_file(tmp_path, qat: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\nextends: w4a4\ncalibration: {{seed: 3}}\nsteps: [calibrate, {{qat: {qat}}}]\n")
    return str(path)


def test_the_recipes_seed_is_kept_unless_seed_is_given(tmp_path, base_args, qat_step):
    """--seed defaulted to 0 and always replaced the recipe's (or the API's default, the calibration seed)."""
    args = [*base_args, "--recipe", _recipe_file(tmp_path, "{epochs: 1, seed: 5}")]
    assert qat_step(args)["seed"] == 5
    assert qat_step([*args, "--seed", "7"])["seed"] == 7
    unseeded = [*base_args, "--recipe", _recipe_file(tmp_path, "{epochs: 1}")]
    assert "seed" not in qat_step(unseeded)  # the API's default applies: the calibration seed, as lowbit.quantize


def test_kd_options_change_only_what_they_name(tmp_path, base_args, qat_step, capsys):
    """--kd replaced the recipe's whole kd (its teacher and temperature lost); --kd-temperature alone did nothing."""
    args = [*base_args, "--recipe", _recipe_file(tmp_path, "{epochs: 1, kd: {teacher: lenet5, temperature: 2.0, weight: 0.7}}")]
    assert qat_step([*args, "--kd", "0.5"])["kd"] == {"teacher": "lenet5", "temperature": 2.0, "weight": 0.5}
    assert qat_step([*args, "--kd-temperature", "8"])["kd"] == {"teacher": "lenet5", "temperature": 8.0, "weight": 0.7}
    plain = [*base_args, "--recipe", _recipe_file(tmp_path, "{epochs: 1}")]
    assert qat_step([*plain, "--kd", "0.3"])["kd"] == {"weight": 0.3}  # the schema's default temperature applies
    assert qat_step([*plain, "--kd-temperature", "8"]) is None
    assert "--kd-temperature needs distillation on" in capsys.readouterr().err


def test_save_and_checkpoint_targets_are_refused_before_training(tmp_path, base_args, qat_step, capsys):
    """Both were found only after training: the trained model (or an epoch) was lost."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    args = [*base_args, "--recipe", "w4a4-lsq"]
    assert qat_step([*args, "--save", str(notes)]) is None
    assert "refusing to overwrite" in capsys.readouterr().err and notes.read_text() == "my notes"
    assert qat_step([*args, "--checkpoint", str(notes / "run")]) is None
    assert f"{notes} is a file, not a folder" in capsys.readouterr().err
    assert qat_step([*args, "--checkpoint", str(notes)]) is None
    assert "is an existing file; QAT writes a folder there" in capsys.readouterr().err
    assert qat_step([*args, "--checkpoint", str(tmp_path / "runs" / "a")]) is not None  # a folder to be made: fine
