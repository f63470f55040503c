"""Reader for the CIFAR-10 *binary* release (``cifar-10-batches-bin``).

Each record is 1 label byte followed by 3072 pixel bytes (R, G, B planes, row-major 32x32).
The whole file is read with one call and reshaped, which takes well under a second for the
full training set; no pickle is involved (the Python release uses pickle, we avoid it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError

RECORD_BYTES = 1 + 3 * 32 * 32


def read_cifar_bin(paths: Sequence[Path], num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate CIFAR binary batch files -> (uint8 N×3×32×32, int64 N)."""
    sizes = []
    for p in paths:
        size = p.stat().st_size
        if size == 0 or size % RECORD_BYTES:
            raise LowbitError(
                f"{p}: size {size} bytes is not a positive multiple of the {RECORD_BYTES}-byte CIFAR "
                "record; the file is truncated or not a CIFAR-10 binary batch. Delete it and re-download."
            )
        sizes.append(size)
    buf = np.empty(sum(sizes), dtype=np.uint8)
    offset = 0
    for p, size in zip(paths, sizes):
        with open(p, "rb") as f:
            got = f.readinto(memoryview(buf)[offset : offset + size])
        if got != size:
            raise LowbitError(f"{p}: read {got} of {size} bytes; the file changed or is unreadable")
        offset += size
    records = buf.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.size and int(labels.max()) >= num_classes:
        raise LowbitError(
            f"{', '.join(map(str, paths))}: label {int(labels.max())} >= {num_classes}; "
            "not a CIFAR-10 binary batch (CIFAR-100 uses a different layout)"
        )
    images = np.ascontiguousarray(records[:, 1:]).reshape(-1, 3, 32, 32)
    return images, labels
