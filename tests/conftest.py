"""Shared fixtures: real data slices from ../shared (next to the repository) and a small
trained network, built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWBIT_SHARED_DIR", ROOT.parent / "shared")).resolve()
DATA_DIR = SHARED / "data"
MODELS_DIR = SHARED / "models"

THREADS = max(1, min(2, os.cpu_count() or 1))
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True, scope="session")
def _runs_recorded_in_a_scratch_registry(tmp_path_factory):
    """CLI tests record runs: never into the user's own registry."""
    old = os.environ.get("LOWBIT_REGISTRY")
    os.environ["LOWBIT_REGISTRY"] = str(tmp_path_factory.mktemp("registry") / "runs.sqlite3")
    yield
    if old is None:
        os.environ.pop("LOWBIT_REGISTRY", None)
    else:
        os.environ["LOWBIT_REGISTRY"] = old


@pytest.fixture(autouse=True)
def _same_threads_for_every_test():
    """CLI tests pass --threads, which sets torch's process-wide thread count; restore it so
    a later test's float summation order (and so its numbers) does not depend on test order."""
    yield
    torch.set_num_threads(THREADS)


def _int8_kernels_exact() -> bool:
    """x86 CPUs without VNNI run ORT's and OpenVINO's u8s8 kernels through 16-bit pair sums
    (vpmaddubsw), which saturate: there, int8 ResNet-20 logits differ from fake-quant by
    0.77 (ORT) / 0.87 (OpenVINO) on average and 97.7% / 96.7% of argmaxes agree (measured
    on an AVX2-only EPYC); with VNNI, or off x86, they agree on 99%+ with 0.05 apart."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_vnni" in flags or "avx_vnni" in flags


INT8_EXACT = _int8_kernels_exact()


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.fail(f"{what} not found at {path}: set LOWBIT_SHARED_DIR to the folder holding data/ and models/")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(DATA_DIR, "shared datasets")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return _require(MODELS_DIR, "shared pretrained weights")


@pytest.fixture(scope="session")
def cifar_slices(data_dir):
    """(calibration inputs from train, (x, y) of the first 1000 test images)."""
    from lowbit.data import calibration_subset, dataset_tensors, load_dataset

    train = load_dataset("cifar10", "train", data_dir=data_dir, download=False)
    test = load_dataset("cifar10", "test", data_dir=data_dir, download=False)
    calib, _ = dataset_tensors(calibration_subset(train, 256, seed=0))
    xt, yt = dataset_tensors(test, torch.arange(1000))
    return calib, (xt, yt)


@pytest.fixture(scope="session")
def resnet20(models_dir):
    from lowbit.zoo import pretrained

    return pretrained("resnet20", models_dir=models_dir, download=False)


@pytest.fixture(scope="session")
def mnist_cnn(data_dir):
    """A SmallCNN trained for one epoch on 4000 MNIST images, with train/test slices."""
    from lowbit.data import dataset_tensors, load_dataset
    from lowbit.zoo import SmallCNN, train_classifier

    torch.manual_seed(0)
    train = load_dataset("mnist", "train", data_dir=data_dir, download=False)
    test = load_dataset("mnist", "test", data_dir=data_dir, download=False)
    x, y = dataset_tensors(train, torch.arange(4000))
    loader = list(zip(torch.split(x, 32), torch.split(y, 32)))
    model = train_classifier(SmallCNN(), loader, epochs=1, lr=0.02, progress=False)
    xt, yt = dataset_tensors(test, torch.arange(2000))
    calib, _ = dataset_tensors(train, torch.arange(4000, 4512))
    return model.eval(), calib, (xt, yt)


def batches(xy, size: int = 500):
    x, y = xy
    return list(zip(torch.split(x, size), torch.split(y, size)))
