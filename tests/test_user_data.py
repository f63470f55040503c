"""A new user's session on a model and a folder of images that are not in the zoo:
quantize, analyze, export, runs, report; and the errors that name what is wrong."""
import json
import sys

import numpy as np
import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.data.user import load_factory, load_user_data
from lowbit.errors import LowbitError

MODULE = '''
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 14 * 14, 3)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1))


def build():
    return TinyNet()


NOT_A_MODEL = 3


def not_a_module():
    return "model"
'''


@pytest.fixture(scope="module")
def user_project(tmp_path_factory, data_dir):
    """A folder of MNIST 0/1/2 digits as PNG files, a module with the model, and trained weights."""
    from PIL import Image

    from lowbit.data import dataset_tensors, load_dataset
    from lowbit.zoo import save_weights, train_classifier

    root = tmp_path_factory.mktemp("user")
    mnist = load_dataset("mnist", "train", data_dir=data_dir, download=False)
    want = {"train": 60, "test": 20}
    for split, per_class in want.items():
        for label, name in enumerate(["zero", "one", "two"]):
            (root / "images" / split / name).mkdir(parents=True)
        counts = {0: 0, 1: 0, 2: 0}
        offset = 0 if split == "train" else 30000
        for i in range(offset, offset + 3000):
            y = int(mnist.labels[i])
            if y in counts and counts[y] < per_class:
                Image.fromarray(mnist.images[i, 0].numpy()).save(root / "images" / split /
                                                               ["zero", "one", "two"][y] / f"{i}.png")
                counts[y] += 1
    (root / "mynet.py").write_text(MODULE)
    sys.path.insert(0, str(root))
    train, _ = load_user_data(f"imagefolder:{root / 'images'}", [0.13], [0.31])
    x, y = dataset_tensors(train)
    torch.manual_seed(0)
    order = torch.randperm(len(y))  # the folder reads class by class: shuffle before batching
    x, y = x[order], y[order]
    model = train_classifier(load_factory("mynet:build"), list(zip(torch.split(x, 30), torch.split(y, 30))),
                             epochs=20, lr=0.02, progress=False)
    save_weights(model, root / "mynet.safetensors")
    yield root
    sys.path.remove(str(root))


def test_a_new_users_session_end_to_end(user_project, tmp_path, capsys):
    root = user_project
    reg = tmp_path / "runs.sqlite3"
    own = ["--model", "mynet:build", "--weights", str(root / "mynet.safetensors"),
           "--data", f"imagefolder:{root / 'images'}", "--mean", "0.13", "--std", "0.31",
           "--no-progress", "--registry", str(reg)]
    report = tmp_path / "q.json"
    assert main(["quantize", "--recipe", "w8a8,w4a4", "--json", str(report), *own]) == 0
    captured = capsys.readouterr()
    assert "using all of them" in captured.err  # 180 images, fewer than the recipe's 1024
    payload = json.loads(report.read_text())
    assert payload["test_images"] == 60 and payload["full_test_split"]
    assert payload["float_top1"] > 0.8  # a 3-class model trained on 180 images
    assert abs(payload["results"][0]["drop_pt"]) < 5  # w8a8 keeps it
    assert main(["analyze", "--recipe", "w4a4", "--samples", "60", *own]) == 0
    captured = capsys.readouterr()
    assert "conv" in captured.out and "every training image calibrates the recipe" in captured.err
    onnx = tmp_path / "mynet.onnx"
    assert main(["export", "--recipe", "w8a8", "--out", str(onnx), *own]) == 0 and onnx.exists()
    capsys.readouterr()
    # the file records the user's data (absolute): scoring it needs that data said again, not the zoo's
    assert main(["eval", "--onnx", str(onnx), "--no-progress", "--no-registry"]) == 2
    assert f"was quantized on your own data (imagefolder:{root / 'images'})" in capsys.readouterr().err
    assert main(["eval", "--onnx", str(onnx), *own[4:10], "--no-progress", "--no-registry"]) == 0
    assert "top1" in capsys.readouterr().out
    assert main(["runs", "--registry", str(reg)]) == 0
    listing = capsys.readouterr().out
    assert listing.count("mynet:build") == 3 and "export" in listing
    # one HTML file of the session: the quantize and analyze runs, and the user's float weights
    html = tmp_path / "report.html"
    assert main(["report", "1", "2", "-o", str(html), "--registry", str(reg), "--model", "mynet:build",
                 "--weights", str(root / "mynet.safetensors")]) == 0
    text = html.read_text()
    for figure in ("fig-accuracy", "fig-analysis", "fig-weights", "fig-ul2q"):
        assert f'id="{figure}"' in text
    assert "w4a4" in text and "conv" in text


def test_user_data_and_model_errors_name_the_problem(user_project, tmp_path, capsys):
    root = user_project
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "test" / "cat").mkdir(parents=True)
    with pytest.raises(LowbitError, match="cat holds no images"):
        load_user_data(f"imagefolder:{empty}")
    with pytest.raises(LowbitError, match="needs a train/ sub-folder"):
        load_user_data(f"imagefolder:{tmp_path}")
    with pytest.raises(LowbitError, match="write imagefolder:DIR or tensors:FILE.npz"):
        load_user_data("folder:x")
    for spec, message in [("mynet:nope", "has no 'nope'"), ("nomodule_xyz:build", "cannot import 'nomodule_xyz'"),
                          ("mynet:NOT_A_MODEL", "is not callable"), ("mynet:not_a_module", "returned str")]:
        with pytest.raises(LowbitError, match=message):
            load_factory(spec)
    npz = tmp_path / "rgb.npz"  # 3-channel 32x32 images for a 1-channel 28x28 model
    rng = np.random.default_rng(0)
    np.savez(npz, x_train=rng.integers(0, 255, (8, 3, 32, 32), dtype=np.uint8), y_train=np.arange(8) % 3,
             x_test=rng.integers(0, 255, (4, 3, 32, 32), dtype=np.uint8), y_test=np.arange(4) % 3)
    common = ["--weights", str(root / "mynet.safetensors"), "--no-progress", "--no-registry"]
    assert main(["quantize", "--model", "mynet:build", "--data", f"tensors:{npz}", *common]) == 2
    assert "the model refuses the images of tensors:" in capsys.readouterr().err
    assert main(["quantize", "--model", "mynet:build", *common]) == 2
    assert "needs --data" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((2, 1, 4, 4)))
    with pytest.raises(LowbitError, match="lacks \\['x_train'"):
        load_user_data(f"tensors:{bad}")
    with pytest.raises(LowbitError, match="--std gives 2 values for images with 1 channels"):
        load_user_data(f"imagefolder:{root / 'images'}", None, [0.3, 0.3])


def test_labels_and_splits_that_would_score_wrong_are_refused(tmp_path, capsys):
    """(N, 1) labels broadcast against (N,) predictions and reported top-1 far above 100%; labels outside the
    classes and a uint8 train split beside a float test split (calibrated on [0, 1], scored on 0-255) were
    accepted without a word."""
    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 255, (6, 1, 4, 4), dtype=np.uint8)
    column = tmp_path / "column.npz"
    np.savez(column, x_train=x8, y_train=(np.arange(6) % 3)[:, None], x_test=x8, y_test=np.arange(6) % 3)
    with pytest.raises(LowbitError, match="y_train \\(shape \\(N,\\)\\); got \\(6, 1, 4, 4\\) and \\(6, 1\\)"):
        load_user_data(f"tensors:{column}")
    mixed = tmp_path / "mixed.npz"
    np.savez(mixed, x_train=x8, y_train=np.arange(6) % 3, x_test=x8.astype(np.float32), y_test=np.arange(6) % 3)
    with pytest.raises(LowbitError, match="x_train is uint8 and x_test is float32"):
        load_user_data(f"tensors:{mixed}")
    floats = tmp_path / "floats.npz"  # two float widths: both taken as they are
    np.savez(floats, x_train=x8.astype(np.float32) / 255, y_train=np.arange(6) % 3, x_test=x8.astype(np.float64) / 255,
             y_test=np.arange(6) % 3)
    assert len(load_user_data(f"tensors:{floats}")[1]) == 6
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(6, 1, 4, 4)
    for y, message in [(torch.arange(6).reshape(6, 1) % 3, "shape \\(6, 1\\); evaluate needs one class index"),
                       (torch.tensor([0, 1, 2, 3, 0, 1]), "run from 0 to 3; the model has 3 classes"),
                       (torch.tensor([0, 1, -1, 0, 1, 2]), "run from -1 to 2"),
                       (torch.zeros(6), "are torch.float32; class indices are integers")]:
        with pytest.raises(LowbitError, match=message):
            lowbit.evaluate(net, [(x, y)])
    assert lowbit.evaluate(net, [(x, torch.arange(6) % 3)]) >= 0.0
    qm = lowbit.quantize(net, "w8a8", calib=x, progress=False)
    with pytest.raises(LowbitError, match="already quantized: pass the float model"):
        lowbit.quantize(qm, "w8a8", calib=x, progress=False)
    assert main(["search", "--method", "msq", "--bops-ratio", "2", "--target-bits", "4", "--no-progress"]) == 2
    assert "--bops-ratio is a HAWQ option" in capsys.readouterr().err
    assert main(["search", "--method", "hawq", "--checkpoint", str(tmp_path / "c"), "--target-bits", "4",
                 "--no-progress"]) == 2
    assert "--checkpoint is an MSQ option" in capsys.readouterr().err


def test_16bit_grayscale_images_are_scaled_not_clipped(tmp_path):
    """Pillow's convert("L") clipped 16-bit grayscale (mode I;16) to 0 and 255; the top 8 bits are kept now."""
    from PIL import Image

    wide = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000  # 0..63000
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(wide).save(tmp_path / split / name / "0.png")
    assert Image.open(tmp_path / "train" / "a" / "0.png").mode == "I;16"
    train, test = load_user_data(f"imagefolder:{tmp_path}")
    assert train.images.shape == (2, 1, 8, 8)
    assert np.array_equal(train.images[0, 0].numpy(), (wide >> 8).astype(np.uint8))
    assert np.array_equal(test.images[1, 0].numpy(), (wide >> 8).astype(np.uint8))


def test_npz_files_that_fail_later_are_refused_by_name(tmp_path):
    """An object array gave a raw ValueError, a .npy a raw AttributeError; train/test images of different shapes
    and negative labels were accepted."""
    x = np.zeros((4, 1, 8, 8), np.uint8)
    y = np.arange(4) % 2
    cases = {
        "obj.npz": dict(x_train=np.array([x], dtype=object), y_train=y, x_test=x, y_test=y),
        "shape.npz": dict(x_train=x, y_train=y, x_test=np.zeros((4, 3, 16, 16), np.uint8), y_test=y),
        "neg.npz": dict(x_train=x, y_train=-np.ones(4, np.int64), x_test=x, y_test=y),
    }
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    np.save(tmp_path / "plain.npy", x)
    for name, message in [("obj.npz", "x_train is an object array .*save plain numeric arrays"),
                          ("plain.npy", "holds a single array \\(ndarray\\), not an .npz archive: save the splits "
                                        "with np.savez"),
                          ("shape.npz", "x_train images are C×H×W \\(1, 8, 8\\) but x_test images are \\(3, 16, 16\\)"),
                          ("neg.npz", "y_train holds negative labels \\(smallest -1\\); labels are class indices")]:
        with pytest.raises(LowbitError, match=message):
            load_user_data(f"tensors:{tmp_path / name}")
    np.savez(tmp_path / "fine.npz", x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    train, test = load_user_data(f"tensors:{tmp_path / 'fine.npz'}")
    assert len(train) == 4 and len(test) == 2
