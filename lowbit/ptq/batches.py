"""Turn whatever the user passes as calibration data into a list of input batches."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from lowbit.errors import LowbitError


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


def as_batches(calib: Any, samples: int | None = None, batch_size: int = 128) -> list[torch.Tensor]:
    """A DataLoader, an iterable of tensors or (input, label) pairs, or one tensor → at most
    ``samples`` inputs as a list of batches."""
    if calib is None:
        raise LowbitError("no calibration data given: pass calib= (a DataLoader, batches or a tensor)")
    if isinstance(calib, torch.Tensor):
        chunks: Iterable[Any] = torch.split(calib, batch_size)
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
    # Re-cut into equal batches so the result does not depend on how the caller batched
    # the same inputs (observers subsample per batch).
    return list(torch.split(torch.cat(out), batch_size))
