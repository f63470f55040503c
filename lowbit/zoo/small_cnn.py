"""A small CNN for 28×28 grayscale digits/clothes: quick to train on CPU, still has every
layer kind a quantizer must handle (conv, BN, ReLU, max-pool, flatten, linear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """conv-BN-ReLU-maxpool ×2, conv-BN-ReLU, flatten, linear (~55k params at width 16).

    The flattened 7×7 head (rather than global pooling) keeps spatial detail and reaches
    >90% MNIST accuracy after one epoch on 2000 images.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, input_size: int = 28) -> None:
        super().__init__()
        if input_size % 4:
            raise ValueError(f"input_size must be divisible by 4 (two 2× poolings), got {input_size}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.linear = nn.Linear(4 * width * (input_size // 4) ** 2, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # 28 -> 14
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 14 -> 7
        x = F.relu(self.bn3(self.conv3(x)))
        return self.linear(torch.flatten(x, 1))
