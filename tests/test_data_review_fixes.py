"""Review findings in data loading, the zoo's training and the CLI's train/eval/bench: inputs that ended in a
raw traceback, options accepted and ignored, and data that was silently read or resumed wrong."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from lowbit.cli import main
from lowbit.errors import DataMismatchError, LowbitError

RUN = ["--no-registry", "--no-progress", "--threads", "1"]


def _npz(path: Path, classes: int = 10, channels: int = 1, n: int = 64, seed: int = 0) -> Path:
    """A tiny tensors:FILE.npz of random 28x28 uint8 images."""
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 255, (n, channels, 28, 28), dtype=np.uint8), y_train=np.arange(n) % classes,
             x_test=rng.integers(0, 255, (16, channels, 28, 28), dtype=np.uint8), y_test=np.arange(16) % classes)
    return path


def _train(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "--model", "small_cnn", "--data", f"tensors:{data}", "--epochs", "1", *RUN,
            "--out", str(tmp_path / "out.safetensors"), *extra]


# 1. weights files that are not state dicts
def test_whole_pickled_model_and_non_checkpoint_pt_are_named(tmp_path):
    """torch.save(model) raised a raw UnpicklingError (a page of torch advice), a text file a raw KeyError."""
    from lowbit.zoo import build, load_weights

    whole = tmp_path / "whole.pt"
    torch.save(build("small_cnn"), whole)
    with pytest.raises(LowbitError, match=r"whole.pt holds pickled Python objects .*save model.state_dict\(\)"):
        load_weights(build("small_cnn"), whole)
    notes = tmp_path / "notes.pt"
    notes.write_text("hello, not a checkpoint\n")
    with pytest.raises(LowbitError, match="notes.pt: cannot read weights"):
        load_weights(build("small_cnn"), notes)


# 2. damaged .npz
def test_truncated_and_corrupt_npz_are_named(tmp_path):
    from lowbit.data.user import load_user_data

    good = _npz(tmp_path / "ok.npz", n=8)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LowbitError, match="cut.npz is truncated or corrupt"):
        load_user_data(f"tensors:{cut}")
    rng = np.random.default_rng(0)
    packed = tmp_path / "packed.npz"
    np.savez_compressed(packed, x_train=rng.integers(0, 255, (20, 1, 8, 8), dtype=np.uint8), y_train=np.arange(20) % 2,
                        x_test=rng.integers(0, 255, (10, 1, 8, 8), dtype=np.uint8), y_test=np.arange(10) % 2)
    raw = bytearray(packed.read_bytes())
    raw[80:120] = b"\0" * 40  # flipped bytes inside the first member's deflate stream
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(LowbitError, match="bad.npz is truncated or corrupt"):
        load_user_data(f"tensors:{bad}")


# 3. training from scratch on --data the zoo model does not fit
def test_train_refuses_more_classes_than_outputs_before_training(tmp_path, capsys):
    """12-class labels into a 10-output small_cnn ended in a raw IndexError inside the first step."""
    assert main(_train(tmp_path, _npz(tmp_path / "c12.npz", classes=12))) == 2
    err = capsys.readouterr().err
    assert "labels up to 11 (12 classes)" in err and "small_cnn has 10 outputs" in err and "c12.npz" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_train_refuses_images_of_other_channels(tmp_path, capsys):
    """RGB data into the 1-channel small_cnn ended in a raw conv RuntimeError."""
    assert main(_train(tmp_path, _npz(tmp_path / "rgb.npz", channels=3))) == 2
    err = capsys.readouterr().err
    assert "rgb.npz" in err and "1 channels" in err and "Traceback" not in err


def test_train_on_own_data_records_that_data(tmp_path, capsys):
    """The JSON, the printed line and the saved weights' metadata said "mnist" (the zoo model's dataset)."""
    from safetensors import safe_open

    data = _npz(tmp_path / "g10.npz")
    assert main(_train(tmp_path, data, "--json", str(tmp_path / "r.json"))) == 0
    assert json.loads((tmp_path / "r.json").read_text())["dataset"] == f"tensors:{data}"
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert f.metadata()["dataset"] == f"tensors:{data}"
    assert f"on tensors:{data}" in capsys.readouterr().out


# 4. resuming a checkpoint of another run
def test_train_checkpoint_of_another_seed_or_data_is_refused(tmp_path, capsys):
    """A rerun with another dataset or seed silently 'resumed' the old run and saved its weights."""
    data = _npz(tmp_path / "a.npz")
    ck = ["--checkpoint", str(tmp_path / "ck.safetensors")]
    assert main(_train(tmp_path, data, *ck)) == 0
    assert main(_train(tmp_path, data, *ck)) == 0  # the same run: resumes (nothing left to do)
    capsys.readouterr()
    assert main(_train(tmp_path, data, *ck, "--seed", "5")) == 2
    assert "seed: checkpoint 0, now 5" in capsys.readouterr().err
    other = _npz(tmp_path / "b.npz", seed=1)
    assert main(_train(tmp_path, other, *ck)) == 2
    assert "dataset: checkpoint" in capsys.readouterr().err
    assert main(_train(tmp_path, data, *ck, "--batch-size", "16")) == 2
    assert "batch_size" in capsys.readouterr().err


def test_checkpoint_without_the_run_keys_still_resumes(tmp_path):
    """A checkpoint written before the run's identity was kept must resume, not be refused."""
    from lowbit.zoo import build, train_classifier

    loader = [(torch.randn(4, 1, 28, 28), torch.arange(4))]
    ck = tmp_path / "old.safetensors"
    torch.manual_seed(0)
    first = train_classifier(build("small_cnn"), loader, 1, checkpoint=ck, progress=False)
    again = train_classifier(build("small_cnn"), loader, 1, checkpoint=ck, progress=False,
                             run={"model": "small_cnn", "dataset": "x", "seed": 3})
    assert torch.equal(first.conv1.weight, again.conv1.weight)  # finished: loaded, not retrained or refused
    with pytest.raises(LowbitError, match="dataset: checkpoint 'x', now 'y'"):
        ck2 = tmp_path / "new.safetensors"
        train_classifier(build("small_cnn"), loader, 1, checkpoint=ck2, progress=False, run={"dataset": "x"})
        train_classifier(build("small_cnn"), loader, 1, checkpoint=ck2, progress=False, run={"dataset": "y"})


# 5. --weights without --recipe
def test_train_from_scratch_refuses_weights(tmp_path, capsys):
    from lowbit.zoo import build, save_weights

    weights = save_weights(build("small_cnn"), tmp_path / "w.safetensors")
    assert main(_train(tmp_path, _npz(tmp_path / "g.npz"), "--weights", str(weights))) == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "--recipe" in err
    assert not (tmp_path / "out.safetensors").exists()


# 6. a final training batch of one image
def test_training_loader_drops_a_single_sample_last_batch_evaluation_keeps_it():
    from lowbit.data import make_loader
    from lowbit.zoo import build, train_classifier

    data = TensorDataset(torch.randn(33, 1, 28, 28), torch.arange(33) % 10)
    train = make_loader(data, 32, shuffle=True)
    assert [len(y) for _, y in train] == [32]
    assert sum(len(y) for _, y in make_loader(data, 32)) == 33  # evaluation: every image
    assert sum(len(y) for _, y in make_loader(data, 30, shuffle=True)) == 33  # a last batch of 3 stays
    torch.manual_seed(0)
    train_classifier(build("lenet5"), train, 1, progress=False)  # BatchNorm1d raised on a batch of one


# 7. a --checkpoint that cannot be written
def test_train_checkpoint_target_is_checked_before_training(tmp_path, capsys):
    data = _npz(tmp_path / "g.npz")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(_train(tmp_path, data, "--checkpoint", str(afile / "ck.safetensors"))) == 2
    assert f"cannot be created: {afile} is a file" in capsys.readouterr().err
    assert main(_train(tmp_path, data, "--checkpoint", str(tmp_path))) == 2
    assert "is a directory" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


# 8. two processes downloading one file
def test_concurrent_downloads_of_one_file_both_succeed(tmp_path, monkeypatch):
    """Both writers used one fixed <name>.part: the one that finished second found it renamed away."""
    import hashlib

    import lowbit.data.download as dl

    payload = bytes(range(256)) * 64
    md5 = hashlib.md5(payload).hexdigest()
    both_writing = threading.Barrier(2, timeout=10)
    first_done = threading.Event()

    def fetch(url, dest, progress=True):
        with open(dest, "wb") as out:
            out.write(payload[:100])
            both_writing.wait()
            if url.endswith("late"):  # finishes after the other writer has renamed its file into place
                first_done.wait(10)
            out.write(payload[100:])

    monkeypatch.setattr(dl, "fetch_url", fetch)
    dest = tmp_path / "cache" / "payload.bin"
    result = {}

    def go(url):
        try:
            dl.download_file([url], dest, md5=md5, progress=False)
            result[url] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded for the assertion
            result[url] = f"{type(e).__name__}: {e}"
        finally:
            if url.endswith("early"):
                first_done.set()

    threads = [threading.Thread(target=go, args=(u,)) for u in ("file:///early", "file:///late")]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert result == {"file:///early": "ok", "file:///late": "ok"}
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["payload.bin"]  # no temporary file left


def test_download_accepts_a_verified_file_another_writer_finished(tmp_path, monkeypatch):
    import hashlib

    import lowbit.data.download as dl

    dest = tmp_path / "payload.bin"
    dest.write_bytes(b"ready")

    def fail(url, part, progress=True):
        raise OSError("connection reset")

    monkeypatch.setattr(dl, "fetch_url", fail)
    assert dl.download_file(["http://x/payload.bin"], dest, md5=hashlib.md5(b"ready").hexdigest()) == dest
    with pytest.raises(LowbitError, match="could not download"):  # a file that does not verify is not taken
        dl.download_file(["http://x/payload.bin"], dest, md5=hashlib.md5(b"other").hexdigest())


# 9. ImageDataset casts
def test_image_dataset_refuses_pixels_and_labels_a_cast_would_change():
    from lowbit.data import ImageDataset

    with pytest.raises(LowbitError, match="float32"):
        ImageDataset(np.random.default_rng(0).random((4, 3, 8, 8)).astype(np.float32), np.zeros(4, np.int64),
                     [0.5] * 3, [0.25] * 3)
    with pytest.raises(LowbitError, match="int16 hold values 300..300"):
        ImageDataset(np.full((1, 1, 2, 2), 300, np.int16), np.zeros(1, np.int64), [0.0], [1.0])
    with pytest.raises(LowbitError, match="labels must be integer class indices, got dtype float64"):
        ImageDataset(np.zeros((4, 1, 2, 2), np.uint8), np.array([0.9, 1.7, 2.2, 3.99]), [0.0], [1.0])
    ok = ImageDataset(np.full((1, 1, 2, 2), 200, np.int16), np.ones(1, np.uint8), [0.0], [1.0])  # in range: kept
    assert ok.images.dtype == torch.uint8 and ok.images.flatten().tolist() == [200] * 4 and ok.labels.tolist() == [1]


# 10. values that cannot be right
def test_non_finite_pixels_and_255_unit_mean_std_are_refused(tmp_path):
    from lowbit.data.user import load_user_data

    x = np.zeros((4, 1, 4, 4), np.float32)
    x[1, 0, 0, 0] = np.nan
    x[2, 0, 1, 1] = np.inf
    np.savez(tmp_path / "nan.npz", x_train=np.zeros_like(x), y_train=np.zeros(4, np.int64), x_test=x,
             y_test=np.zeros(4, np.int64))
    with pytest.raises(LowbitError, match="x_test holds 2 NaN or infinite pixel value.*2 image"):
        load_user_data(f"tensors:{tmp_path / 'nan.npz'}")
    u8 = _npz(tmp_path / "u8.npz", channels=3, n=8)
    with pytest.raises(LowbitError, match=r"--mean .*divide by 255"):
        load_user_data(f"tensors:{u8}", mean=[125.3, 123.0, 113.9])
    with pytest.raises(LowbitError, match=r"--std .*divide by 255"):
        load_user_data(f"tensors:{u8}", mean=[0.49, 0.48, 0.45], std=[63.0, 62.1, 66.7])
    train, _ = load_user_data(f"tensors:{u8}", mean=[0.49, 0.48, 0.45], std=[0.25])  # [0, 1] units: accepted
    assert len(train) == 8


# 11. the float baseline trained here
def test_trained_here_refuses_a_non_safetensors_cache_before_reading_data(tmp_path, monkeypatch):
    import lowbit.data
    from lowbit.zoo import trained_here

    def no_data(*a, **k):
        raise AssertionError("the data was loaded before the cache name was checked")

    monkeypatch.setattr(lowbit.data, "load_dataset", no_data)
    with pytest.raises(LowbitError, match=r"baseline.pt.*\.safetensors"):
        trained_here("small_cnn", cache=tmp_path / "baseline.pt", progress=False)


def test_trained_here_resumes_an_interrupted_training(tmp_path, monkeypatch, data_dir):
    """It trained minutes without a checkpoint: a killed run started again from epoch 1."""
    import lowbit.data
    import lowbit.zoo.train as T
    from lowbit.data import load_dataset
    from lowbit.zoo import trained_here

    mnist = Subset(load_dataset("mnist", "train", data_dir=data_dir, download=False), range(256))
    monkeypatch.setattr(lowbit.data, "load_dataset", lambda *a, **k: mnist)
    whole = trained_here("small_cnn", epochs=2, cache=tmp_path / "a" / "m.safetensors", progress=False)

    real, seen = T.train_classifier, []

    class Killed(Exception):
        pass

    def killed_in_epoch_2(model, loader, epochs, **kw):
        seen.append(kw.get("checkpoint"))

        class Dies:  # a loader that dies at the third batch (epoch 2 of 2 batches each)
            sampler, count = loader.sampler, [0]

            def __len__(self):
                return len(loader)

            def __iter__(self):
                for b in loader:
                    self.count[0] += 1
                    if self.count[0] == 3:
                        raise Killed
                    yield b
        return real(model, Dies(), epochs, **kw)

    cache = tmp_path / "b" / "m.safetensors"
    monkeypatch.setattr(T, "train_classifier", killed_in_epoch_2)
    with pytest.raises(Killed):
        trained_here("small_cnn", epochs=2, cache=cache, progress=False)
    assert seen[0] is not None and Path(seen[0]).parent == cache.parent and Path(seen[0]).is_file()
    monkeypatch.setattr(T, "train_classifier", real)
    resumed = trained_here("small_cnn", epochs=2, cache=cache, progress=False)
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert sorted(p.name for p in cache.parent.iterdir()) == ["m.safetensors"]  # the checkpoint is gone


# 12. an image over Pillow's size limit
def test_decompression_bomb_sized_image_is_named(tmp_path, monkeypatch):
    from PIL import Image

    from lowbit.data.user import load_user_data

    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / split / "a" / "0.png")
    Image.new("L", (64, 64)).save(tmp_path / "train" / "a" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2x the limit: Pillow's bomb error
    with pytest.raises(LowbitError, match="big.png is too large"):
        load_user_data(f"imagefolder:{tmp_path}")


# 13. eval options that were ignored
@pytest.fixture
def eval_args(data_dir, models_dir):
    return ["eval", "--models-dir", str(models_dir), "--data-dir", str(data_dir), "--no-download", *RUN,
            "--test-limit", "20"]


def test_eval_refuses_runtime_without_onnx(eval_args, capsys):
    assert main([*eval_args, "--runtime", "openvino"]) == 2
    assert "--runtime" in capsys.readouterr().err
    assert main([*eval_args, "--recipe", "w8a8", "--runtime", "ort"]) == 2
    assert "without --onnx" in capsys.readouterr().err


def test_eval_refuses_weights_it_would_ignore(eval_args, tmp_path, capsys):
    from lowbit.zoo import build, save_weights

    weights = save_weights(build("resnet20"), tmp_path / "w.safetensors")
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read")
    assert main([*eval_args, "--onnx", str(model), "--weights", str(weights)]) == 2
    assert "--weights" in capsys.readouterr().err
    artifact = tmp_path / "m.lowbit"
    artifact.write_bytes(b"not read")
    assert main([*eval_args, "--lowbit", str(artifact), "--weights", str(weights)]) == 2
    assert "--weights" in capsys.readouterr().err


# 14. bench with an empty recipe list
def test_bench_refuses_an_empty_recipe_list_before_loading(monkeypatch, capsys):
    import lowbit.cli

    def no_model(args):
        raise AssertionError("the model was loaded before the recipe list was checked")

    monkeypatch.setattr(lowbit.cli, "_load_model", no_model)
    assert main(["bench", "--recipe", ",", *RUN, "--no-download"]) == 2
    assert "names no recipe" in capsys.readouterr().err
