"""Training a float classifier (for models without published weights), resumable.

The checkpoint is a safetensors file (model, optimizer state, RNG state) plus a JSON
sidecar for epoch counters and hyper-parameters, so resuming never unpickles anything.
Given ``torch.manual_seed`` and a loader from ``lowbit.data.make_loader``, an interrupted
and resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm  # std: tqdm.auto calls iter() twice on loaders

from lowbit.errors import LowbitError, NumericalError
from lowbit.state_io import (atomic_save_tensors, atomic_write_text, blocking_file, optimizer_state,
                             optimizer_tensors)

_FORMAT = "lowbit-train-checkpoint"
_VERSION = 1


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def remove_checkpoint(path: Path) -> None:
    """Delete a finished training's checkpoint and its JSON sidecar (absent ones are fine)."""
    for f in (path, _sidecar(path)):
        f.unlink(missing_ok=True)


def _make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise LowbitError(f"unknown optimizer {name!r}; use 'sgd' or 'adam'")


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """One atomic file: the tensors, with the sidecar's content in their metadata, so the epoch counter
    and the weights can never come from different saves (a run killed between two files could pair new
    weights with the old epoch and train that epoch twice). The sidecar is written after it as well,
    for people and for readers of older checkpoints."""
    optim, scalars, groups = optimizer_tensors(opt)
    tensors = {**{f"model/{k}": v for k, v in model.state_dict().items()}, **optim, "rng/torch": torch.get_rng_state()}
    path.parent.mkdir(parents=True, exist_ok=True)
    side = dict(meta, format=_FORMAT, version=_VERSION, param_groups=groups, state_scalars=scalars)
    text = json.dumps(side, indent=1, sort_keys=True)
    atomic_save_tensors(tensors, path, {"format": _FORMAT, "epoch": str(meta["epoch"]), "side": text})
    atomic_write_text(_sidecar(path), text)


def _load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, settings: dict[str, Any]) -> int:
    """Restore model/optimizer/RNG from ``path``; returns the number of finished epochs. A checkpoint
    written with other ``settings`` (the schedule and the update depend on them: epochs, lr, weight
    decay, optimizer, momentum, batches per epoch; and the run's identity the caller passes: model,
    dataset, seed, batch size) is refused; one from before a setting was kept does not say, and resumes."""
    from safetensors import safe_open

    side_path = _sidecar(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            stamped = (f.metadata() or {}).get("side")
        if stamped is None and not side_path.is_file():
            raise LowbitError(f"checkpoint {path} has no sidecar {side_path}; delete the checkpoint to start over")
        side = json.loads(stamped if stamped is not None else side_path.read_text())  # (older: the sidecar)
        tensors = load_file(str(path), device="cpu")
    except (OSError, ValueError, SafetensorError) as e:
        raise LowbitError(f"cannot read training checkpoint {path}: {e}") from e
    if not isinstance(side, dict) or side.get("format") != _FORMAT:
        raise LowbitError(f"{path} is not a lowbit training checkpoint")
    changed = [f"{k}: checkpoint {side[k]!r}, now {v!r}" for k, v in settings.items() if k in side and side[k] != v]
    if changed:
        raise LowbitError(f"checkpoint {path} was written with other training settings or data ("
                          + "; ".join(changed) + "): use another checkpoint path, or delete this one to start over")
    from lowbit.zoo.weights import load_state_dict_strict  # local: avoid import cycle at module import

    model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    load_state_dict_strict(model, model_sd, source=f"training checkpoint {path}")
    try:
        opt.load_state_dict(optimizer_state(tensors, side.get("state_scalars", {}), side["param_groups"]))
    except (ValueError, KeyError) as e:
        raise LowbitError(f"optimizer state in {path} does not fit this model: {e}") from e
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    return int(side["epoch"])


def check_checkpoint_target(path: Path, what: str = "checkpoint") -> None:
    """Refuse a checkpoint path that can never be written, before any training: found at the
    first save, it cost an epoch and ended in a raw FileExistsError or "No such device"."""
    if path.is_dir():
        raise LowbitError(f"{what} {path} is a directory; training writes one state file there: give a "
                          f"file path, e.g. {path / 'train.safetensors'}")
    blocker = blocking_file(path)
    if blocker is not None:
        raise LowbitError(f"{what} {path} cannot be created: {blocker} is a file, not a folder")
    if _sidecar(path).is_dir():
        raise LowbitError(f"{what} {path} cannot be written: its sidecar {_sidecar(path)} is a directory")


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from ``base_lr`` to 0 over ``total_steps`` (per-step, no restarts)."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def train_classifier(
    model: nn.Module,
    train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    *,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    run: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Train with cross-entropy, SGD+Nesterov momentum (or Adam) and a per-step cosine schedule.

    If ``checkpoint`` is given, state is saved there after every epoch and, when the file
    already exists, training resumes after its last finished epoch. ``run`` names what else
    the checkpoint must match to be resumed (e.g. model, dataset, seed, batch size: JSON values);
    a checkpoint that does not say (written without them) resumes. Returns the model in eval mode.
    """
    if epochs < 0:
        raise LowbitError(f"epochs must be >= 0, got {epochs}")
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None:
        check_checkpoint_target(ckpt)
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise LowbitError("train_loader yields no batches")
    device = next(model.parameters()).device
    opt = _make_optimizer(model, optimizer, lr, weight_decay, momentum)
    settings = {**dict(run or {}), "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "optimizer": optimizer,
                "momentum": momentum, "steps_per_epoch": steps_per_epoch}
    start = 0
    if ckpt is not None and ckpt.exists():
        start = _load_checkpoint(ckpt, model, opt, settings)
    total = epochs * steps_per_epoch
    sampler = getattr(train_loader, "sampler", None)
    for epoch in range(start, epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]
        model.train()
        loss_sum, seen = 0.0, 0
        bar = tqdm(train_loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for i, (x, y) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = cosine_lr(lr, step, total)
            x, y = x.to(device), torch.as_tensor(y).to(device)
            loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise NumericalError(f"training loss became {loss.item()} at epoch {epoch + 1}, step {i}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * y.shape[0]
            seen += y.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{opt.param_groups[0]['lr']:.4g}", refresh=False)
        bar.close()
        if ckpt is not None:
            meta = {"epoch": epoch + 1, **settings, "train_loss": loss_sum / max(seen, 1)}
            _save_checkpoint(ckpt, model, opt, meta)
    return model.eval()
