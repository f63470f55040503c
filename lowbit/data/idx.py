"""Reader for the idx format of MNIST and Fashion-MNIST (optionally gzip-compressed).

Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
big-endian uint32 per dimension. We check all of it so a truncated download fails loudly
instead of producing garbage images.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError

_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (``.gz`` or raw) into a uint8 array of the declared shape."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise LowbitError(f"{path}: corrupt or truncated gzip file ({e}); delete it and re-download") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _UBYTE or not 1 <= data[3] <= 4:
        raise LowbitError(
            f"{path}: bad idx magic {data[:4].hex() or '(empty)'}; expected 000008 followed by 1-4 "
            "dimensions (is this an MNIST-style idx file?)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise LowbitError(f"{path}: truncated idx header ({len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise LowbitError(
            f"{path}: idx header declares shape {shape} ({expected} bytes) but the file holds "
            f"{len(data) - header}; the file is truncated or corrupt. Delete it and re-download."
        )
    # bytearray -> writable array, so torch.from_numpy needs no extra copy or warning.
    return np.frombuffer(bytearray(data[header:]), dtype=np.uint8).reshape(shape)


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Read matching image/label idx files -> (uint8 N×1×H×W, int64 N)."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise LowbitError(
            f"{images_path} / {labels_path}: expected 3-d images and 1-d labels, got shapes "
            f"{images.shape} and {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise LowbitError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= num_classes:
        raise LowbitError(f"{labels_path}: label {int(labels.max())} >= {num_classes}")
    return images[:, None, :, :], labels.astype(np.int64)
