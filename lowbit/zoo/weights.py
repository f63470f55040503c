"""Loading and saving weights without pickle code execution.

Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors; the
``module.`` prefix that DataParallel adds is stripped; loading is strict and a mismatch
names the missing / unexpected / wrongly shaped keys instead of a bare RuntimeError.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.state_io import atomic_save_tensors

_TORCH_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".ckpt")
_MAX_LISTED = 12


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Drop ``prefix`` from every key that has it (DataParallel checkpoints)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def _unpickling_message(p: Path, err: pickle.UnpicklingError) -> str:
    """Why the weights-only unpickler refused ``p``, in one line: torch's own message is a page of
    advice to unpickle with code execution, which lowbit never does."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if found:  # a pickled object, most often the whole model (torch.save(model))
        return (f"{p} holds pickled Python objects ({found.group(1)}), not a state dict of tensors: it looks like "
                "a whole model saved with torch.save(model); save model.state_dict() instead (or a .safetensors "
                "file), which loads without running code from the file")
    reason = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(err))
    first = (reason.group(1) if reason else str(err).strip().split("\n")[0] or type(err).__name__)[:200]
    return f"{p}: cannot read weights ({first}); it is not a weights checkpoint, or it is damaged"


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a weights-only torch checkpoint.

    Accepts a bare state dict or the common ``{"state_dict": ...}`` / ``{"model": ...}``
    wrappers; returns keys with any ``module.`` prefix removed.
    """
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"weights file {p} does not exist")
    if p.suffix != ".safetensors" and p.suffix not in _TORCH_SUFFIXES:
        raise LowbitError(f"{p}: unknown weights format {p.suffix!r}; use .safetensors or {'/'.join(_TORCH_SUFFIXES)}")
    try:
        if p.suffix == ".safetensors":
            obj: object = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise LowbitError(_unpickling_message(p, e)) from e
    except (SafetensorError, RuntimeError, EOFError, OSError, KeyError, ValueError, AttributeError, IndexError,
            TypeError) as e:  # a non-checkpoint fed to the unpickler fails in any of these (KeyError: a text file)
        raise LowbitError(f"{p}: cannot read weights ({type(e).__name__}: {str(e)[:200]}); it is not a weights "
                          "checkpoint, or it is damaged") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LowbitError(f"{p}: does not contain a state dict of tensors")
    return strip_prefix(obj)  # type: ignore[arg-type]


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> nn.Module:
    """``model.load_state_dict(strict=True)`` with an error that lists what differs.

    BatchNorm's ``num_batches_tracked`` may be absent (old checkpoints); torch fills it in.
    """
    own = model.state_dict()
    shape_bad = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected or shape_bad:
        parts = [f"{source} does not fit {type(model).__name__}:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if shape_bad:
            parts.append(f"shape mismatches ({len(shape_bad)}): {_listing(shape_bad)}")
        parts.append("(is it the right architecture/depth/num_classes?)")
        raise LowbitError(" ".join(parts))
    model.load_state_dict(dict(state_dict), strict=True)
    return model


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load user weights (``.safetensors``, or ``.pt/.pth/.th`` read weights-only) strictly."""
    return load_state_dict_strict(model, read_state_dict(path), source=str(path))


def save_weights(model: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> Path:
    """Write the model's state dict as safetensors (no pickle; safe to share)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        raise LowbitError(f"{p}: save_weights writes safetensors; use a .safetensors file name")
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(model.state_dict(), p, {"format": "pt", "producer": "lowbit", **dict(metadata or {})})
    return p
