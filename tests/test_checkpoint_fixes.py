"""QAT checkpoint and label defects found in review, each pinned by a tiny synthetic run: a lost
best model, labels outside the model's classes, a metrics.jsonl left an epoch behind, and the
caller's RNG state changed by a resume."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset, Subset

import lowbit
from lowbit.data.dataset import ImageDataset
from lowbit.errors import LowbitError
from tests.test_qat import _run_killed_after_its_first_checkpoint
from tests.test_qat_fixes import _calib, _data, _model, _recipe


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short runs warn that BN never freezes; not what these tests check
        yield


def _run(recipe: dict, train=None, val=None) -> lowbit.QuantModel:
    return lowbit.quantize(_model(), recipe, calib=_calib(), train=_data() if train is None else train, val=val,
                           progress=False)


def _killed_after_first_checkpoint(monkeypatch, recipe: dict) -> None:
    """A run "killed" (KeyboardInterrupt) right after it wrote its first checkpoint."""
    _run_killed_after_its_first_checkpoint(monkeypatch, _model(), recipe, _calib(), _data())


# -- 1. a missing or unreadable best.safetensors ----------------------------------------------------
@pytest.mark.parametrize("damage", ["delete", "garbage", "truncate"])
def test_a_missing_or_unreadable_best_model_is_refused_with_the_file_named(tmp_path, damage):
    folder = tmp_path / "run"
    recipe = _recipe(epochs=1, select="best", checkpoint=str(folder))
    _run(recipe)
    best = folder / "best.safetensors"
    if damage == "delete":
        best.unlink()
    elif damage == "garbage":
        best.write_bytes(b"\0" * 100)
    else:
        best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    with pytest.raises(LowbitError, match=f"{folder}.*best.safetensors.*epoch 1.*delete {folder} to start over"):
        _run(recipe)


def _restamp(best: Path, epoch: int) -> None:
    """best.safetensors as another epoch's (what a run killed between its two writes leaves)."""
    save_file(load_file(str(best)), str(best), metadata={"format": "lowbit-qat-checkpoint", "epoch": str(epoch)})


def test_a_finished_run_whose_best_model_is_another_epochs_is_refused(tmp_path):
    folder = tmp_path / "run"
    recipe = _recipe(epochs=1, checkpoint=str(folder))
    _run(recipe)
    _restamp(folder / "best.safetensors", 2)
    with pytest.raises(LowbitError, match=f"{folder}.*best.safetensors holds another epoch.*delete {folder}"):
        _run(recipe)


def test_a_best_model_of_another_epoch_is_dropped_and_the_next_epoch_kept_consistently(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    recipe = _recipe(epochs=2, select="best", checkpoint=str(folder))
    _killed_after_first_checkpoint(monkeypatch, recipe)
    _restamp(folder / "best.safetensors", 2)  # killed after epoch 2's best was written, before its state.json
    assert json.loads((folder / "state.json").read_text())["best_epoch"] == 1
    meta = _run(recipe).meta["qat"]
    assert meta["best_epoch"] == 2  # the next epoch became the kept one, with its own score
    assert meta["best_val_top1"] == meta["history"][1]["val_top1"]


# -- 2. labels outside the model's classes ------------------------------------------------------------
class _ItemDataset(Dataset):
    """A dataset without a label tensor: (input, label) one item at a time."""

    def __init__(self, x: torch.Tensor, labels: list) -> None:
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.labels[i]


def _bad_labels(case: str):
    x, y = _data()
    if case == "out_of_range":
        return (x, torch.where(y == 3, torch.tensor(7), y)), "train data: sample [0-9]+ has label 7 .*4 classes"
    if case == "negative":
        return (x, torch.where(y == 3, torch.tensor(-1), y)), "train data: sample [0-9]+ has label -1 .*4 classes"
    if case == "one_hot":
        return (x, torch.nn.functional.one_hot(y, 4).float()), r"train data: the labels have shape \(256, 4\)"
    if case == "column":
        return (x, y[:, None]), r"train data: the labels have shape \(256, 1\)"
    if case == "float":
        return (x, y.float()), "train data: the labels are torch.float32"
    if case == "items_one_hot":
        return (_ItemDataset(x, list(torch.nn.functional.one_hot(y, 4).float())),
                r"the label of item 0 of this batch has shape \(4,\), not one class index")
    return _ItemDataset(x, [int(v) + 4 * (i == 9) for i, v in enumerate(y)]), "train data: sample 9 has label [4-7], outside the model.s 4 classes"


@pytest.mark.parametrize("case", ["out_of_range", "negative", "one_hot", "column", "float", "items_one_hot",
                                  "items_out_of_range"])
def test_labels_that_are_not_the_models_class_indices_are_refused_before_training(case):
    train, message = _bad_labels(case)
    with pytest.raises(LowbitError, match=message):
        _run(_recipe(epochs=1), train=train)


def test_validation_labels_outside_the_classes_are_refused_with_the_set_named():
    x, y = _data(64, seed=3)
    with pytest.raises(LowbitError, match="val data: sample 5 has label 4, outside the model's 4 classes"):
        _run(_recipe(epochs=1), val=(x, torch.where(torch.arange(64) == 5, torch.tensor(4), y)))


def test_labels_are_read_without_the_inputs_where_the_dataset_keeps_them(monkeypatch):
    from lowbit.qat.labels import dataset_labels

    x, y = _data(40)
    images = ImageDataset((x.clamp(0, 1) * 255).to(torch.uint8), y, [0.5], [0.5])
    monkeypatch.setattr(ImageDataset, "tensors", lambda *a, **k: pytest.fail("read the inputs"))
    monkeypatch.setattr(ImageDataset, "__getitem__", lambda *a, **k: pytest.fail("read the inputs"))
    assert torch.equal(dataset_labels(Subset(images, [3, 1, 7])), y[[3, 1, 7]])
    assert dataset_labels(_ItemDataset(x, list(y))) is None  # items: checked batch by batch, not read up front


# -- 3. metrics.jsonl behind state.json -------------------------------------------------------------
def test_metrics_left_behind_by_a_kill_after_the_last_commit_are_rewritten(tmp_path, monkeypatch):
    import lowbit.qat.checkpoint as checkpoint

    folder = tmp_path / "run"
    recipe = _recipe(epochs=2, checkpoint=str(folder))
    real_write = checkpoint.atomic_write_text

    def die_before_the_last_metrics(path, text):
        if path.name == "metrics.jsonl" and text.count("\n") == 2:
            raise KeyboardInterrupt  # the last epoch's state.json is committed, its metrics line is not
        real_write(path, text)

    monkeypatch.setattr(checkpoint, "atomic_write_text", die_before_the_last_metrics)
    with pytest.raises(KeyboardInterrupt):
        _run(recipe)
    monkeypatch.setattr(checkpoint, "atomic_write_text", real_write)
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1
    qm = _run(recipe)  # finished: trains nothing
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rows == qm.meta["qat"]["history"] == json.loads((folder / "state.json").read_text())["history"]
    assert not list(folder.glob("*.part"))


# -- 4. the caller's RNG state on resume --------------------------------------------------------------
def test_resuming_leaves_the_callers_rng_state_as_it_was(tmp_path):
    folder = tmp_path / "run"
    recipe = _recipe(epochs=1, checkpoint=str(folder))
    _run(recipe)
    ptq = lowbit.quantize(_model(), {**recipe, "steps": ["calibrate"]}, calib=_calib(), progress=False)
    torch.manual_seed(42)
    before = torch.get_rng_state()
    lowbit.train_qat(ptq, _data(), recipe=recipe, config=recipe["steps"][-1]["qat"], progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_killed_run_resumes_to_the_uninterrupted_runs_weights_without_the_saved_rng_state(tmp_path, monkeypatch):
    straight = _run(_recipe(epochs=2))
    recipe = _recipe(epochs=2, checkpoint=str(tmp_path / "run"))
    _killed_after_first_checkpoint(monkeypatch, recipe)
    resumed = _run(recipe)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
