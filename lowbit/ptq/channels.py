"""Where a layer's output channels are: dim 1 for a convolution, the last dim for a Linear.

Per-channel corrections (bias correction, moment matching, EasyQuant's per-channel score) took dim 1 for
every layer; a Linear applied to [batch, tokens, features] has its channels last, and dim 1 (the tokens)
was corrected instead, or the shapes clashed.
"""
from __future__ import annotations

import torch
from torch import nn


def channel_dim(module: nn.Module, out: torch.Tensor) -> int:
    """The dimension of ``out`` (the module's output) that holds its output channels."""
    return out.dim() - 1 if isinstance(module, nn.Linear) and out.dim() > 2 else min(1, out.dim() - 1)


def channels_first(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """``out`` with its channels at dim 1 (a view), the layout the per-channel statistics assume."""
    return out.movedim(channel_dim(module, out), 1) if out.dim() > 2 else out


def channel_shape(module: nn.Module, out: torch.Tensor) -> list[int]:
    """The shape a per-channel vector takes to broadcast over ``out``."""
    shape = [1] * out.dim()
    shape[channel_dim(module, out)] = -1
    return shape
