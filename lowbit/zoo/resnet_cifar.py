"""CIFAR ResNets of He et al. 2016 (sec. 4.2): 6n+2 layers, 16/32/64 channels, option-A shortcuts.

Parameter and buffer names match the widely used akamaster release (after stripping
``module.``), so its pretrained checkpoints load with strict=True. The parameter-free
shortcut (subsample by strided slicing, zero-pad the new channels) is written inline in
``forward`` rather than as a lambda module, so ``torch.fx.symbolic_trace`` sees plain ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus an identity or option-A shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Plain Python ints/bools: fx treats them as constants, so the branch is resolved at trace time.
        self.stride = stride
        self.downsample = stride != 1 or in_planes != planes
        extra = planes - in_planes
        self.pad_lo = extra // 2
        self.pad_hi = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample:
            shortcut = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad_lo, self.pad_hi))
        else:
            shortcut = x
        return F.relu(out + shortcut)


class ResNetCifar(nn.Module):
    """conv-BN-ReLU stem, three stages of ``n`` BasicBlocks, global average pool, linear head."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise LowbitError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.in_planes = width
        self.layer1 = self._make_layer(width, n, stride=1)
        self.layer2 = self._make_layer(2 * width, n, stride=2)
        self.layer3 = self._make_layer(4 * width, n, stride=2)
        self.linear = nn.Linear(4 * width, num_classes)
        self.reset_parameters()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        """Kaiming-normal conv/linear weights (He et al.), as in the original training recipe."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


def resnet_cifar(depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNetCifar:
    """Untrained CIFAR ResNet of the given depth."""
    return ResNetCifar(depth=depth, num_classes=num_classes, in_channels=in_channels, width=width)


def resnet20(**kwargs: int) -> ResNetCifar:
    return resnet_cifar(depth=20, **kwargs)


def resnet32(**kwargs: int) -> ResNetCifar:
    return resnet_cifar(depth=32, **kwargs)


def resnet44(**kwargs: int) -> ResNetCifar:
    return resnet_cifar(depth=44, **kwargs)


def resnet56(**kwargs: int) -> ResNetCifar:
    return resnet_cifar(depth=56, **kwargs)


def resnet110(**kwargs: int) -> ResNetCifar:
    return resnet_cifar(depth=110, **kwargs)
