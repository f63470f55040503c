"""Seed 002: activation ranges from the preceding BatchNorm's coefficients, not from data.

A BN output channel c is distributed as N(β_c, γ_c²) (the normalised input is N(0, 1)); a
following ReLU rectifies it. We draw a seeded sample from that per-channel mixture and
pick the clip that minimises the quantization MSE on it, so no calibration image is
needed for these tensors.
"""
from __future__ import annotations

import torch

from lowbit.model.fold_bn import BNPrior


def bn_implied_sample(prior: BNPrior, rectified: bool, total: int = 1 << 18, seed: int = 0) -> torch.Tensor:
    """A [1, N] sample of the activation the BN coefficients predict."""
    g = torch.Generator().manual_seed(seed)
    channels = prior.beta.numel()
    per_channel = max(1, total // channels)
    # drawn on the CPU generator (the same sample on any device), then put with the BN coefficients
    z = torch.randn(channels, per_channel, generator=g).to(prior.beta.device)
    x = prior.beta.float()[:, None] + prior.gamma.float().abs()[:, None] * z
    if rectified:
        x = torch.relu(x)
    return x.reshape(1, -1)
