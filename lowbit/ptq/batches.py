"""Turn whatever the user passes as calibration data into a list of input batches."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from torch.utils.data import Dataset, IterableDataset

from lowbit.errors import DataMismatchError, LowbitError


def _input_of(item: Any) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    if isinstance(item, dict) and "input" in item:
        return item["input"]
    raise LowbitError(
        f"calibration data yielded a {type(item).__name__}; expected input tensors or (input, label) pairs"
    )


def _dataset_batches(ds: Dataset, samples: int | None, batch_size: int, seed: int | None) -> Iterable[torch.Tensor]:
    n = len(ds) if samples is None else min(samples, len(ds))
    if seed is not None and n < len(ds):  # the seeded subset `lowbit quantize` draws from a training split
        from lowbit.data import calibration_subset

        indices = calibration_subset(ds, n, seed).indices
    else:
        indices = list(range(n))
    for start in range(0, n, batch_size):
        items = [_input_of(ds[i]) for i in indices[start:start + batch_size]]
        shapes = {tuple(t.shape) for t in items}
        if len(shapes) > 1:
            raise DataMismatchError(f"the calibration Dataset yields samples of different shapes {sorted(shapes)[:3]}")
        yield torch.stack(items)


def as_batches(calib: Any, samples: int | None = None, batch_size: int = 128,
               seed: int | None = None) -> list[torch.Tensor]:
    """A DataLoader, an iterable of input batches or (input, label) batch pairs, a map-style
    Dataset of single (input, label) samples (stacked into batches), or one tensor → at
    most ``samples`` inputs as a list of batches. From a larger Dataset, ``seed`` draws them
    as ``calibration_subset`` does (so the API and the CLI calibrate on the same images);
    without it, and from the other kinds, the first ``samples`` are taken in order."""
    if calib is None:
        raise LowbitError("no calibration data given: pass calib= (a DataLoader, batches or a tensor)")
    if isinstance(calib, torch.Tensor):
        chunks: Iterable[Any] = torch.split(calib, batch_size)
    elif isinstance(calib, Dataset) and not isinstance(calib, IterableDataset) and hasattr(calib, "__len__"):
        # A map-style Dataset yields single samples: stack them into batches.
        chunks = _dataset_batches(calib, samples, batch_size, seed)
    else:
        try:
            chunks = iter(calib)
        except TypeError:
            raise LowbitError(f"calibration data of type {type(calib).__name__} is not iterable") from None
    out: list[torch.Tensor] = []
    seen = 0
    for item in chunks:
        x = _input_of(item)
        if not x.is_floating_point():
            raise LowbitError(f"calibration inputs must be float tensors, got {x.dtype}")
        if samples is not None and seen + x.shape[0] > samples:
            x = x[: samples - seen]
        if x.shape[0]:
            out.append(x)
            seen += x.shape[0]
        if samples is not None and seen >= samples:
            break
    if not out:
        raise LowbitError("calibration data is empty")
    for i, x in enumerate(out):
        if x.shape[1:] != out[0].shape[1:]:
            raise DataMismatchError(f"calibration batch {i} has shape {tuple(x.shape)} but batch 0 has "
                                    f"{tuple(out[0].shape)}: every input must have the same shape")
    # Re-cut into equal batches so the result does not depend on how the caller batched
    # the same inputs (observers subsample per batch).
    return list(torch.split(torch.cat(out), batch_size))


def on_model_device(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """``batches`` on the device of ``model``'s parameters (the same list when they are there already): a model
    moved to the GPU read CPU calibration batches and failed deep inside torch."""
    device = next(model.parameters()).device
    if all(b.device == device for b in batches):
        return batches
    return [b.to(device) for b in batches]
