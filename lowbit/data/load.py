"""``load_dataset``: name + split -> in-memory ImageDataset."""

from __future__ import annotations

import os

from lowbit.data.cifar import read_cifar_bin
from lowbit.data.dataset import ImageDataset
from lowbit.data.idx import read_idx_pair
from lowbit.data.locate import locate
from lowbit.data.registry import check_split, get_info
from lowbit.errors import LowbitError


def load_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> ImageDataset:
    """Load ``split`` ("train"/"test") of dataset ``name`` into memory.

    Looks in ``data_dir``, ``$LOWBIT_DATA_DIR``, the cache, then downloads into the cache if
    ``download``; raises DatasetNotFoundError (listing where it looked) otherwise.
    """
    info = get_info(name)
    check_split(split)
    files = locate(info, split, data_dir=data_dir, download=download)
    if info.fmt == "cifar-bin":
        images, labels = read_cifar_bin(files, info.num_classes)
    else:
        images, labels = read_idx_pair(files[0], files[1], info.num_classes)
    expected = info.split_sizes.get(split)
    if expected is not None and len(labels) != expected:
        raise LowbitError(
            f"{info.name} {split} split: {', '.join(map(str, files))} hold {len(labels)} examples, the official "
            f"release has {expected}; a file is truncated (cut at a record boundary) or not the official one. "
            "Delete it and download again."
        )
    return ImageDataset(images, labels, info.mean, info.std, name=info.name, split=split, classes=info.classes)
