"""Model zoo: names -> architectures, default kwargs, dataset, and pretrained weights.

``model_info`` is what other code stores (e.g. next to a quantized model) to rebuild the
float architecture later with ``build``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from lowbit.data import download as _dl
from lowbit.data.locate import cache_root, search_dirs
from lowbit.errors import ChecksumError, LowbitError
from lowbit.zoo.resnet_cifar import resnet_cifar
from lowbit.zoo.lenet import LeNet5
from lowbit.zoo.small_cnn import SmallCNN
from lowbit.zoo.weights import load_state_dict_strict, read_state_dict

_AKAMASTER_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"

# Constructors by architecture family name (the ``arch`` of ModelInfo).
CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {
    "resnet_cifar": resnet_cifar,
    "small_cnn": SmallCNN,
    "lenet5": LeNet5,
}


@dataclass(frozen=True)
class PretrainedWeights:
    """A published checkpoint. ``sha256`` is the full digest where we know it, else the
    prefix the release puts in the file name."""

    filename: str
    sha256: str
    url: str


@dataclass(frozen=True)
class ArchSpec:
    """How to build a named model and which dataset it is for."""

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "cifar10"
    weights: PretrainedWeights | None = None

    @property
    def constructor(self) -> Callable[..., nn.Module]:
        return CONSTRUCTORS[self.arch]


class ModelInfo(NamedTuple):
    """(architecture family, constructor kwargs, dataset): enough to rebuild the model."""

    arch: str
    kwargs: dict[str, Any]
    dataset: str


def _aka(depth: int, sha: str) -> ArchSpec:
    fname = f"resnet{depth}-{sha[:8]}.th"
    return ArchSpec("resnet_cifar", {"depth": depth, "num_classes": 10}, "cifar10", PretrainedWeights(fname, sha, _AKAMASTER_URL + fname))


ARCHITECTURES: dict[str, ArchSpec] = {
    # Full sha256 known for resnet20/32 (checked against local copies); the prefix otherwise.
    "resnet20": _aka(20, "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"),
    "resnet32": _aka(32, "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850"),
    "resnet44": _aka(44, "014dd654"),
    "resnet56": _aka(56, "4bfd9763"),
    "resnet110": _aka(110, "1d1ed7c2"),
    "small_cnn": ArchSpec("small_cnn", {"num_classes": 10, "in_channels": 1}, "mnist"),
    "lenet5": ArchSpec("lenet5", {"num_classes": 10, "in_channels": 1}, "mnist"),
    "small_cnn_fashion": ArchSpec("small_cnn", {"num_classes": 10, "in_channels": 1}, "fashion-mnist"),
}


def list_models() -> list[str]:
    """Names accepted by ``build`` / ``pretrained``."""
    return sorted(ARCHITECTURES)


def _spec(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise LowbitError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def model_info(name: str) -> ModelInfo:
    """(arch, kwargs, dataset) of a named model; ``CONSTRUCTORS[arch](**kwargs)`` rebuilds it."""
    s = _spec(name)
    return ModelInfo(s.arch, dict(s.kwargs), s.dataset)


def build(name: str, **kwargs: Any) -> nn.Module:
    """Untrained (Kaiming-initialised) model; ``kwargs`` override the defaults."""
    s = _spec(name)
    merged = {**s.kwargs, **kwargs}
    try:
        model = s.constructor(**merged)
    except TypeError as e:
        raise LowbitError(f"bad arguments for model {name!r}: {e}") from e
    # Lets a quantized copy name its architecture, so saved artifacts rebuild themselves.
    model.lowbit_arch = {"name": name, "kwargs": kwargs}
    return model


def models_cache_dir() -> Path:
    """Where downloaded checkpoints go: ``$LOWBIT_CACHE_DIR/models`` or ``~/.cache/lowbit/models``."""
    return cache_root() / "models"


def _weight_dirs(models_dir: str | os.PathLike[str] | None) -> list[tuple[str, Path]]:
    return search_dirs(models_dir, "models_dir argument", "LOWBIT_MODELS_DIR", models_cache_dir())


def pretrained_path(name: str, models_dir: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """Verified local path of a named model's published checkpoint (downloading if allowed)."""
    s = _spec(name)
    w = s.weights
    if w is None:
        have = ", ".join(n for n in list_models() if ARCHITECTURES[n].weights is not None)
        raise LowbitError(
            f"model {name!r} has no published weights (ones that have: {have}); train it with "
            "lowbit.zoo.train_classifier and load the result with lowbit.zoo.load_weights"
        )
    dirs = _weight_dirs(models_dir)
    for _, d in dirs:
        p = d / w.filename
        if p.is_file():
            _dl.verify_file(p, sha256=w.sha256)  # a corrupt local copy must not load silently
            return p
    if not download:
        looked = "; ".join(f"{d} [{origin}]" for origin, d in dirs)
        raise LowbitError(
            f"pretrained weights {w.filename} for {name!r} not found. Looked in: {looked}. "
            f"Set LOWBIT_MODELS_DIR (or pass models_dir / --models-dir) to a directory holding it, "
            f"or allow download to fetch {w.url}"
        )
    dest = models_cache_dir() / w.filename
    try:
        return _dl.download_file([w.url], dest, sha256=w.sha256)
    except ChecksumError:
        raise
    except LowbitError as e:
        raise LowbitError(
            f"{e}. Download {w.url} by hand and put it in a directory named by LOWBIT_MODELS_DIR"
        ) from e


def pretrained(name: str, models_dir: str | os.PathLike[str] | None = None, download: bool = True) -> nn.Module:
    """Model with its published weights, in eval mode."""
    path = pretrained_path(name, models_dir=models_dir, download=download)
    model = build(name)
    load_state_dict_strict(model, read_state_dict(path), source=str(path))
    return model.eval()
