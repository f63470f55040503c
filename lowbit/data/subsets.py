"""Deterministic subsets and loaders, so calibration and training runs are reproducible."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from lowbit.errors import LowbitError


def run_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th draw (epoch, step) of a run seeded ``seed``.

    ``seed + index`` made seed s's epoch k the same shuffle as seed 0's epoch k + s, so runs of
    "different" seeds shared all but one epoch's orders; spacing seeds by a prime larger than any
    epoch or step count a run reaches (below 10⁶ no two (seed, index) pairs meet), and leaves seed
    0's draws as they were. Reduced modulo 2⁶⁴, the range torch's generators take (a seed the schema
    allows, up to 2⁶³ − 1, overflowed it).
    """
    return (int(seed) * 1000003 + int(index)) % 2**64


def calibration_subset(dataset: Dataset, n: int = 1024, seed: int = 0) -> Subset:
    """``n`` distinct samples of ``dataset`` chosen by ``seed`` (pass the TRAIN split).

    Same (dataset length, n, seed) -> same indices on every machine: the permutation comes
    from a dedicated torch.Generator, independent of the global RNG state.
    """
    total = len(dataset)  # type: ignore[arg-type]
    if not isinstance(n, int) or n <= 0:
        raise LowbitError(f"calibration subset size must be a positive integer, got {n!r}")
    if n > total:
        raise LowbitError(f"calibration subset of {n} samples requested but the dataset has only {total}")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(total, generator=g)[:n].sort().values
    return Subset(dataset, idx.tolist())


class EpochSampler(Sampler[int]):
    """Random permutation seeded by (``seed``, epoch) through ``run_seed``.

    Unlike RandomSampler with a shared generator, the order of epoch k does not depend on how
    many epochs ran before in this process, so a resumed training run sees the same batches.
    The training loop calls ``set_epoch`` (the DistributedSampler convention).
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(run_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def make_loader(dataset: Dataset, batch_size: int = 256, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Single-process DataLoader whose order depends only on ``seed`` (and the epoch).

    A shuffled (training) loader leaves out a final batch of a single sample: BatchNorm cannot
    train on one value per channel (LeNet-5's BatchNorm1d raised a raw ValueError on it), and one
    image differs each epoch. An unshuffled (evaluation) loader keeps every image.
    """
    if batch_size <= 0:
        raise LowbitError(f"batch_size must be positive, got {batch_size}")
    n = len(dataset)  # type: ignore[arg-type]
    sampler = EpochSampler(n, seed) if shuffle else None
    drop_single = shuffle and n > 1 and n % batch_size == 1
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=0,
                      drop_last=drop_single)


def dataset_tensors(
    dataset: Dataset, indices: Sequence[int] | torch.Tensor | np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` for a whole dataset or index set, fast for ImageDataset and Subsets of it.

    Falls back to stacking items one by one for any other map-style dataset.
    """
    if isinstance(dataset, Subset):
        base_idx = np.asarray(dataset.indices, dtype=np.int64)
        sel = base_idx if indices is None else base_idx[np.asarray(indices, dtype=np.int64)]
        return dataset_tensors(dataset.dataset, sel)
    fast = getattr(dataset, "tensors", None)
    if callable(fast):
        return fast(indices)
    idx = range(len(dataset)) if indices is None else [int(i) for i in np.asarray(indices).reshape(-1)]  # type: ignore[arg-type]
    items = [dataset[i] for i in idx]
    if not items:
        raise LowbitError("cannot build tensors from an empty dataset")
    xs = torch.stack([torch.as_tensor(x) for x, _ in items])
    ys = torch.as_tensor([_class_index(y, pos) for pos, (_, y) in enumerate(items)], dtype=torch.long)
    return xs, ys


def _class_index(label: object, position: int) -> int:
    """One item's label as a class index (as int() reads it); a one-hot vector failed in int() with
    "only one element tensors can be converted", naming neither the item nor the problem."""
    try:
        value = torch.as_tensor(label)
    except (TypeError, ValueError, RuntimeError):
        raise LowbitError(f"the label of item {position} of this batch is a {type(label).__name__}, not a class "
                          "index") from None
    if value.numel() != 1:
        raise LowbitError(f"the label of item {position} of this batch has shape {tuple(value.shape)}, not one class "
                          "index (for one-hot or soft labels, their argmax)")
    return int(value)
