"""LeNet-5 as seed 000 (μL2Q) uses it on MNIST: conv32-conv64-fc512 with BN.

No published weights exist for this variant, so lowbit trains it (``pretrained_lenet5``:
3 epochs of SGD on the MNIST training split, cached as safetensors) — the float baseline of
the μL2Q rows.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


class LeNet5(nn.Module):
    """conv5x5(32)-BN-ReLU-pool, conv5x5(64)-BN-ReLU-pool, fc512-BN-ReLU, fc(classes); ``width`` scales the convs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 5, padding=2, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * 7 * 7, 512, bias=False)
        self.bn3 = nn.BatchNorm1d(512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


def pretrained_lenet5(data_dir: str | os.PathLike[str] | None = None, epochs: int = 3, seed: int = 0,
                      cache: str | os.PathLike[str] | None = None, progress: bool = True) -> LeNet5:
    """LeNet-5 trained here on MNIST's training split (cached after the first call)."""
    from lowbit.zoo.trained_here import trained_here

    return trained_here("lenet5", data_dir, epochs=epochs, seed=seed, cache=cache, progress=progress)  # type: ignore[return-value]
