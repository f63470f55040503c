"""Static description of the datasets lowbit knows: shapes, normalisation, files, sources.

Kept as plain data so the CLI, recipes and tests can inspect a dataset (number of classes,
input shape) without touching the disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowbit.errors import LowbitError

SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class Resource:
    """One downloadable file: where it lives and how to recognise a good copy.

    ``raw_md5`` is the md5 of the *decompressed* content of a ``.gz`` file; it lets us accept a
    mirror that re-compressed the same bytes (the gzip header differs, the data does not).
    """

    filename: str
    urls: tuple[str, ...]
    md5: str
    raw_md5: str | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """Everything needed to find, check, download and normalise one dataset."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    folder: str  # name of the dataset's folder inside a data dir
    files: dict[str, tuple[str, ...]]  # split -> files that split needs (inside ``folder``)
    fmt: str  # "cifar-bin" or "idx"
    resources: tuple[Resource, ...]  # what to download
    archive: bool = False  # True: ``resources[0]`` is a tar.gz that contains ``folder``
    classes: tuple[str, ...] = field(default=())
    system_dirs: tuple[str, ...] = field(default=())  # OS-package install locations
    # split -> number of examples the official release holds; a file that holds fewer is
    # an error, never a smaller dataset (every accuracy would silently change meaning)
    split_sizes: dict[str, int] = field(default_factory=dict)


_CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))

_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_FASHION_MIRRORS = (
    # The official site (S3 website endpoints serve http only; md5 protects integrity) and
    # the official repository as an https fallback.
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# (filename, md5 of the official .gz, md5 of its decompressed content). The decompressed md5s
# were checked against the local copies in /work/shared/data, whose content matches the
# official files.
_MNIST_MD5 = (
    ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
    ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
    ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
    ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
)
_FASHION_MD5 = (
    ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
)


def _idx_resources(table: tuple[tuple[str, str, str], ...], mirrors: tuple[str, ...]) -> tuple[Resource, ...]:
    return tuple(Resource(f, tuple(m + f for m in mirrors), md5, raw) for f, md5, raw in table)


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        name="cifar10",
        num_classes=10,
        input_shape=(3, 32, 32),
        # ImageNet statistics: what the pretrained akamaster ResNets were trained with.
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        folder="cifar-10-batches-bin",
        files={"train": _CIFAR_TRAIN, "test": ("test_batch.bin",)},
        fmt="cifar-bin",
        resources=(
            Resource(
                "cifar-10-binary.tar.gz",
                ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
                "c32a1d4ab5d03f1284b67883e8d87530",
            ),
        ),
        archive=True,
        split_sizes={"train": 50000, "test": 10000},
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
    "mnist": DatasetInfo(
        name="mnist",
        num_classes=10,
        input_shape=(1, 28, 28),
        mean=(0.1307,),
        std=(0.3081,),
        folder="mnist",
        files=_IDX_FILES,
        fmt="idx",
        resources=_idx_resources(_MNIST_MD5, _MNIST_MIRRORS),
        split_sizes={"train": 60000, "test": 10000},
        classes=tuple(str(i) for i in range(10)),
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        num_classes=10,
        input_shape=(1, 28, 28),
        mean=(0.2860,),
        std=(0.3530,),
        folder="fashion-mnist",
        files=_IDX_FILES,
        fmt="idx",
        resources=_idx_resources(_FASHION_MD5, _FASHION_MIRRORS),
        split_sizes={"train": 60000, "test": 10000},
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
}


def get_info(name: str) -> DatasetInfo:
    """Look a dataset up by name, failing with the list of known names."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise LowbitError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}") from None


def check_split(split: str) -> str:
    """Reject anything but the two splits every dataset has."""
    if split not in SPLITS:
        raise LowbitError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    return split
