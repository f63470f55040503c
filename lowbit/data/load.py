"""``load_dataset``: name + split -> in-memory ImageDataset."""

from __future__ import annotations

import os

from lowbit.data.cifar import RECORD_BYTES, read_cifar_bin
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
    expected = info.split_sizes.get(split)
    if info.fmt == "cifar-bin":
        if expected is not None:  # the official batch files hold equal shares of the split
            per_file = expected // len(files) * RECORD_BYTES
            for f in files:
                if f.stat().st_size != per_file:
                    raise LowbitError(f"{f}: {f.stat().st_size} bytes, the official file has {per_file} "
                                      f"({per_file // RECORD_BYTES} records); it is truncated or not the official "
                                      "one. Delete it and download again.")
        images, labels = read_cifar_bin(files, info.num_classes)
    else:
        images, labels = read_idx_pair(files[0], files[1], info.num_classes)
    if expected is not None and len(labels) != expected:
        raise LowbitError(
            f"{info.name} {split} split: {', '.join(map(str, files))} hold {len(labels)} examples, the official "
            f"release has {expected}; a file is truncated (cut at a record boundary) or not the official one. "
            "Delete it and download again."
        )
    return ImageDataset(images, labels, info.mean, info.std, name=info.name, split=split, classes=info.classes)
