"""In-memory image dataset: uint8 storage, normalisation applied on access.

uint8 keeps CIFAR-10 train at 150 MB instead of 600 MB as float32; ``tensors`` turns a whole
index set into one normalised batch with a few vectorised ops, which is what evaluation and
calibration want (per-item ``__getitem__`` through a DataLoader is ~100x slower).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lowbit.errors import LowbitError


def _kind(values: np.ndarray | torch.Tensor) -> tuple[str, str]:
    """(numpy kind letter, dtype name) of an array or tensor: "u"/"i" integer, "b" bool, "f" float, ..."""
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool:
            return "b", str(values.dtype)
        if values.is_floating_point() or values.is_complex():
            return "f", str(values.dtype)
        return ("u" if values.dtype == torch.uint8 else "i"), str(values.dtype)
    dtype = np.asarray(values).dtype
    return dtype.kind, str(dtype)


def _pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 storage of ``images``. Why a check and not a cast: a cast turned float pixels in [0, 1] into
    zeros and wrapped 16-bit values (300 -> 44), a silently wrong data set."""
    kind, name = _kind(images)
    if kind not in ("u", "i"):
        raise LowbitError(f"images must be uint8 pixels 0..255, got dtype {name}; scale float images to 0..255 "
                          "and convert them with .astype(np.uint8) (or pass normalised floats as a TensorDataset)")
    if name in ("uint8", "torch.uint8"):
        return torch.as_tensor(images)
    a = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if a.size and (a.min() < 0 or a.max() > 255):
        raise LowbitError(f"images of dtype {name} hold values {a.min()}..{a.max()}, outside the pixel range "
                          "0..255: scale them to 8 bits first (16-bit images: value >> 8)")
    return torch.from_numpy(a.astype(np.uint8))


def _labels(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """int64 class indices; float labels were truncated (1.7 -> 1) by the cast, so they are refused."""
    kind, name = _kind(labels)
    if kind not in ("u", "i"):
        raise LowbitError(f"labels must be integer class indices, got dtype {name}")
    return torch.as_tensor(labels).to(torch.long)


class ImageDataset(Dataset):
    """A labelled image split yielding ``(normalised float32 CHW tensor, int label)``."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        name: str = "",
        split: str = "",
        classes: Sequence[str] = (),
    ) -> None:
        self.images = _pixels(images)
        self.labels = _labels(labels)
        if self.labels.ndim != 1:
            raise LowbitError(f"labels must be one class index per image, shape (N,), got {tuple(self.labels.shape)}")
        if self.images.ndim != 4 or self.images.shape[0] != self.labels.shape[0]:
            raise LowbitError(
                f"images must be N×C×H×W matching {self.labels.shape[0]} labels, got {tuple(self.images.shape)}"
            )
        c = self.images.shape[1]
        if len(mean) != c or len(std) != c:
            raise LowbitError(f"mean/std need {c} channel values, got {len(mean)}/{len(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(c, 1, 1)
        self.name = name
        self.split = split
        self.classes = tuple(classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = int(index)
        x = self.images[i].to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)
        return x, int(self.labels[i])

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    @property
    def targets(self) -> torch.Tensor:
        """Labels as an int64 tensor (same name torchvision datasets use)."""
        return self.labels

    def tensors(self, indices: Sequence[int] | torch.Tensor | np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole batch at once: ``(float32 N×C×H×W normalised, int64 N)``."""
        if indices is None:
            imgs, labels = self.images, self.labels
        else:
            idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
            imgs, labels = self.images[idx], self.labels[idx]
        x = imgs.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)
        return x, labels.clone()

    def __repr__(self) -> str:
        shape = tuple(self.images.shape[1:])
        return f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, shape={shape})"
