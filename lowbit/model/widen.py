"""WRPN's model transform (Mishra et al. 2018, seed 001): widen every conv by an integer factor.

A wide low-precision network can match a narrow float one; to start QAT from the pretrained
model rather than from scratch, the widened model computes exactly the pretrained function:

- each old channel keeps its place (``out_map``) and its pretrained weights, BN affine and
  running statistics, so the pretrained network is a slice of the wide one;
- each new output channel starts as a copy of an old one plus small noise (so the new
  channels see realistic activations and their quantizer ranges calibrate like the old);
- every weight from a new input channel starts at zero, so nothing new reaches an old
  channel or the output until training grows it.

The option-A shortcut of the CIFAR ResNets pads channels on both sides, so a downsampling
block places the shortcut's old channels in the middle of the wide tensor; the channel map
follows that layout instead of assuming "old channels first".
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lowbit.errors import LowbitError

NOISE = 1e-2  # new channels: a copy of an old channel plus this fraction of the layer's weight std


@dataclass
class _Pair:
    """One layer of the narrow model, its wide counterpart, and where the old channels go."""

    old: nn.Module
    new: nn.Module
    out_map: torch.Tensor  # wide index of each old output channel
    in_map: torch.Tensor | None  # wide index of each old input feature (None: BN)


def _plain(n: int) -> torch.Tensor:
    return torch.arange(n)


def _flat(channel_map: torch.Tensor, spatial: int) -> torch.Tensor:
    """Map of a flattened C×H×W tensor (PyTorch flattens channel-major)."""
    return (channel_map[:, None] * spatial + torch.arange(spatial)).reshape(-1)


def _sources(out_map: torch.Tensor, wide: int) -> torch.Tensor:
    """For each wide output channel, the old channel it starts from (itself, or a copy's source)."""
    src = torch.arange(wide) % out_map.numel()
    src[out_map] = torch.arange(out_map.numel())
    return src


@torch.no_grad()
def _copy(p: _Pair, gen: torch.Generator) -> None:
    src = _sources(p.out_map, _out_channels(p.new))
    fresh = torch.ones(src.numel(), dtype=torch.bool)
    fresh[p.out_map] = False
    if isinstance(p.new, nn.modules.batchnorm._BatchNorm):
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(p.new, name).copy_(getattr(p.old, name)[src])
        p.new.num_batches_tracked.copy_(p.old.num_batches_tracked)
        return
    rows = p.old.weight[src].clone()
    noise = torch.randn(rows[fresh].shape, generator=gen) * (NOISE * float(p.old.weight.std()))
    rows[fresh] += noise
    w = torch.zeros_like(p.new.weight)
    w[:, p.in_map] = rows
    p.new.weight.copy_(w)
    if p.old.bias is not None:
        p.new.bias.copy_(p.old.bias[src])


def _out_channels(m: nn.Module) -> int:
    return m.weight.shape[0]


def _resnet_cifar(model: nn.Module, k: int) -> tuple[nn.Module, list[_Pair]]:
    from lowbit.zoo.resnet_cifar import ResNetCifar

    width, classes = model.conv1.out_channels, model.linear.out_features
    wide = ResNetCifar(model.depth, classes, model.conv1.in_channels, width * k)
    pairs = [_Pair(model.conv1, wide.conv1, _plain(width), _plain(model.conv1.in_channels)),
             _Pair(model.bn1, wide.bn1, _plain(width), None)]
    cur = _plain(width)  # where the old channels of the running residual tensor sit
    for stage in ("layer1", "layer2", "layer3"):
        for ob, nb in zip(getattr(model, stage), getattr(wide, stage)):
            mid = _plain(ob.conv1.out_channels)
            if ob.downsample:
                out = torch.empty(ob.conv2.out_channels, dtype=torch.long)
                c_in, w_in = ob.conv1.in_channels, nb.conv1.in_channels
                for j in range(out.numel()):
                    if j < ob.pad_lo:  # zero padding in both: stays in the wide low padding
                        out[j] = j
                    elif j < ob.pad_lo + c_in:  # carries the shortcut's old channel j - pad_lo
                        out[j] = nb.pad_lo + cur[j - ob.pad_lo]
                    else:  # high padding
                        out[j] = nb.pad_lo + w_in + (j - ob.pad_lo - c_in)
            else:
                out = cur
            pairs += [_Pair(ob.conv1, nb.conv1, mid, cur), _Pair(ob.bn1, nb.bn1, mid, None),
                      _Pair(ob.conv2, nb.conv2, out, mid), _Pair(ob.bn2, nb.bn2, out, None)]
            cur = out
    pairs.append(_Pair(model.linear, wide.linear, _plain(classes), cur))
    return wide, pairs


def _lenet5(model: nn.Module, k: int) -> tuple[nn.Module, list[_Pair]]:
    from lowbit.zoo.lenet import LeNet5

    w, classes = model.conv1.out_channels, model.fc2.out_features
    wide = LeNet5(classes, model.conv1.in_channels, width=w * k)
    hidden = model.fc1.out_features
    spatial = model.fc1.in_features // model.conv2.out_channels
    return wide, [
        _Pair(model.conv1, wide.conv1, _plain(w), _plain(model.conv1.in_channels)),
        _Pair(model.bn1, wide.bn1, _plain(w), None),
        _Pair(model.conv2, wide.conv2, _plain(2 * w), _plain(w)),
        _Pair(model.bn2, wide.bn2, _plain(2 * w), None),
        _Pair(model.fc1, wide.fc1, _plain(hidden), _flat(_plain(2 * w), spatial)),  # fully connected: not widened
        _Pair(model.bn3, wide.bn3, _plain(hidden), None),
        _Pair(model.fc2, wide.fc2, _plain(classes), _plain(hidden)),
    ]


def _small_cnn(model: nn.Module, k: int) -> tuple[nn.Module, list[_Pair]]:
    from lowbit.zoo.small_cnn import SmallCNN

    w, classes = model.conv1.out_channels, model.linear.out_features
    spatial = model.linear.in_features // model.conv3.out_channels
    side = round(spatial ** 0.5) * 4
    wide = SmallCNN(classes, model.conv1.in_channels, width=w * k, input_size=side)
    pairs = []
    prev = _plain(model.conv1.in_channels)
    for i, c in ((1, w), (2, 2 * w), (3, 4 * w)):
        pairs += [_Pair(getattr(model, f"conv{i}"), getattr(wide, f"conv{i}"), _plain(c), prev),
                  _Pair(getattr(model, f"bn{i}"), getattr(wide, f"bn{i}"), _plain(c), None)]
        prev = _plain(c)
    pairs.append(_Pair(model.linear, wide.linear, _plain(classes), _flat(prev, spatial)))
    return wide, pairs


def _handlers() -> dict[type, Callable[[nn.Module, int], tuple[nn.Module, list[_Pair]]]]:
    from lowbit.zoo.lenet import LeNet5
    from lowbit.zoo.resnet_cifar import ResNetCifar
    from lowbit.zoo.small_cnn import SmallCNN

    return {ResNetCifar: _resnet_cifar, LeNet5: _lenet5, SmallCNN: _small_cnn}


def widen(model: nn.Module, factor: int, seed: int = 0) -> nn.Module:
    """A ``factor``× wider copy of ``model`` (every conv's channels) computing the same function.

    ``model`` is not changed. Supported: the zoo's CIFAR ResNets, LeNet-5 and the small CNN;
    the channel bookkeeping of residual layouts is architecture knowledge, so another model
    is refused by name rather than widened wrongly.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise LowbitError(f"widen factor must be an integer >= 1, got {factor!r}")
    if factor == 1:
        return copy.deepcopy(model)
    handlers = _handlers()
    handler = handlers.get(type(model))
    if handler is None:
        names = ", ".join(sorted(t.__name__ for t in handlers))
        raise LowbitError(f"WRPN widening knows {names}; {type(model).__name__} is not one of them: "
                          "build the wide model yourself and start from its weights")
    wide, pairs = handler(model, factor)
    gen = torch.Generator().manual_seed(seed)
    for p in pairs:
        _copy(p, gen)
    if hasattr(model, "lowbit_arch"):  # artifacts rebuild the narrow model, and the recipe widens it again
        wide.lowbit_arch = model.lowbit_arch
    return wide.train(model.training)
