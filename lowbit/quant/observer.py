"""Collects what range estimators need from activations seen during calibration."""
from __future__ import annotations

import torch

from lowbit.errors import DataMismatchError
from lowbit.quant.estimators import check_finite


class SampleObserver:
    """Exact min/max plus a seeded uniform sample of the values a tensor took.

    Search-based estimators (MSE, cosine, KL, percentile) score candidate ranges on the
    sample; a quarter million values pins a per-tensor range far more finely than the grid of
    candidates, at a fraction of the memory of keeping every activation.
    """

    def __init__(self, name: str, max_samples: int = 1 << 18, per_batch: int = 1 << 16, seed: int = 0) -> None:
        self.name = name
        self.max_samples = max_samples
        self.per_batch = per_batch
        self.generator = torch.Generator().manual_seed(seed)
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.chunks: list[torch.Tensor] = []
        self.count = 0
        self.largest_batch = 0

    def __call__(self, x: torch.Tensor) -> None:
        batch = int(x.shape[0]) if x.dim() > 1 else 1
        x = x.detach().float().reshape(-1)
        lo, hi = torch.aminmax(x)
        check_finite(x, f"activation at {self.name!r}", extremes=(lo, hi))
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        # a batch smaller than the largest seen (the calibration set's remainder) keeps a proportional share: at a
        # fixed count one remainder image weighed as much as a full batch of 128 in the sample
        self.largest_batch = max(self.largest_batch, batch)
        keep = max(1, self.per_batch * batch // self.largest_batch)
        if x.numel() > keep:
            idx = torch.randint(0, x.numel(), (keep,), generator=self.generator)
            x = x[idx]
        self.chunks.append(x.clone())
        self.count += 1

    def sample(self) -> torch.Tensor:
        """All kept values as a [1, N] row, with the exact extremes included."""
        if self.min is None:
            raise DataMismatchError(f"activation {self.name!r} saw no data: the calibration inputs never reach it "
                                    "(a branch the data does not take?); calibrate with inputs that run it, or keep "
                                    "the layer it feeds float (recipe `keep_float: [layer name]`)")
        values = torch.cat(self.chunks)
        if values.numel() > self.max_samples:
            idx = torch.randperm(values.numel(), generator=self.generator)[: self.max_samples]
            values = values[idx]
        return torch.cat([values, self.min.reshape(1), self.max.reshape(1)]).reshape(1, -1)
