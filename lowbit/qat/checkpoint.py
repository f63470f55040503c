"""QAT checkpoints: a folder of safetensors + JSON, written atomically after every epoch.

``state-<epoch>.safetensors``: model (weights, quantizer and BN state), optimizer tensors and
the weight average when one is kept (``state.safetensors`` in folders written before 2026-12-06);
``best.safetensors``: the model at the best validation epoch; ``state.json``: epoch, history,
the optimizer's scalars, the RNG state, the fingerprint of the recipe that wrote it and the
name of the state tensors file (the commit point: written last, and the previous tensors
file is removed only after it, so a run killed mid-save resumes from the previous epoch;
lowbit.state_io.commit_state);
``metrics.jsonl``: one line per finished epoch. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.state_io import (atomic_save_tensors, atomic_write_text, commit_state, committed_tensors, optimizer_state,
                             optimizer_tensors)

FORMAT = "lowbit-qat-checkpoint"
LOCATION_KEYS = ("checkpoint", "branch_from")  # where runs are kept, not how they train
# qat options added after the first checkpoints were written, with the value that means "off":
# a fingerprint holds one only when it is set otherwise, and comparisons read an absent one as
# off, so older checkpoints resume, also under a recipe that spells the off value out.
LATER_OPTIONS: dict[str, Any] = {"clip_grad_norm": 0.0, "ema": 0.0, "snap_at_freeze": False, "precision": "fp32",
                                 "channels_last": False, "dampen": 0.0,
                                 "select": "best", "mix": "none", "mix_alpha": 1.0}
# quantizer settings (recipe ``weights``/``activations`` sections) added after the first checkpoints
# were written, with the value every earlier run had: an absent one reads as that value
LATER_SPEC_OPTIONS: dict[str, Any] = {"narrow_range": True}
# quantizer state added after the first checkpoints were written: a checkpoint without it still
# loads, the quantizer rebuilding it on its own (lowbit.quant.learned.inq: the frozen levels)
LATER_STATE = ("frozen_codes", "captured")
VERSION = 1


@dataclass
class TrainingState:
    epoch: int = 0
    best_val: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, torch.Tensor] | None = None
    ema: dict[str, torch.Tensor] | None = None  # the weight average (qat ema > 0)
    branched_from: dict[str, Any] | None = None  # {folder, epoch}: the run this one continues (qat branch_from)
    data: dict[str, int] | None = None  # {train_samples, val_samples}: what the epochs ran over


def metrics_path(folder: Path) -> Path:
    return folder / "metrics.jsonl"


def save_state(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, state: TrainingState,
               fingerprint: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    optim, scalars, groups = optimizer_tensors(opt)
    tensors = {**{f"model/{k}": v for k, v in model.state_dict().items()}, **optim, "rng/torch": torch.get_rng_state(),
               **{f"ema/{k}": v for k, v in (state.ema or {}).items()}}
    stamp = {"format": FORMAT, "epoch": str(state.epoch)}
    if state.best is not None and (state.best_epoch == state.epoch or _best_epoch_on_disk(folder) != state.best_epoch):
        # a new best, or one this folder never held (a branch's best from before its branch point)
        atomic_save_tensors(state.best, folder / "best.safetensors", {**stamp, "epoch": str(state.best_epoch)})
    side = {"format": FORMAT, "version": VERSION, "epoch": state.epoch, "best_val": state.best_val,
            "best_epoch": state.best_epoch, "history": state.history, "fingerprint": fingerprint,
            "param_groups": groups,
            "state_scalars": scalars}
    if state.branched_from is not None:
        side["branched_from"] = state.branched_from
    if state.data is not None:
        side["data"] = state.data
    commit_state(folder, "state", state.epoch, tensors, "state.json", side, stamp)
    atomic_write_text(metrics_path(folder), _metrics_text(state.history))


def _metrics_text(history: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in history)


def sync_metrics(folder: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` from a loaded checkpoint's history when it says otherwise.

    Why: save_state writes it after the state.json commit, so a run killed between the two
    leaves it an epoch behind, and when that was the last epoch no rerun writes it again."""
    path = metrics_path(folder)
    want = _metrics_text(history)
    try:
        if path.read_text() == want:
            return
    except (OSError, UnicodeDecodeError):
        pass  # missing or torn: written below
    atomic_write_text(path, want)


def _best_epoch_on_disk(folder: Path) -> int:
    """The epoch whose model ``best.safetensors`` holds (its stamp); -1 when there is none."""
    path = folder / "best.safetensors"
    if not path.is_file():
        return -1
    try:
        return _stamped_epoch(path)
    except (OSError, ValueError, SafetensorError):
        return -1


def _stamped_epoch(path: Path) -> int:
    """The epoch a best-model file is stamped with (-1: no stamp); raises when it cannot be read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return int((f.metadata() or {}).get("epoch", -1))


def _kept_model(folder: Path, best_epoch: int) -> dict[str, torch.Tensor] | None:
    """The model of ``best_epoch`` (state.json's kept epoch) from ``best.safetensors``; None when no
    epoch is kept yet, or when the file holds another epoch (a run killed after writing a new best
    but before committing state.json: the next epoch becomes the kept one).

    A missing or unreadable file is refused: the run would go on without it and return the last
    epoch's weights under the kept epoch's name."""
    if best_epoch <= 0:
        return None
    path = folder / "best.safetensors"
    if not path.is_file():
        raise LowbitError(f"QAT checkpoint {folder}: {path.name} is missing, yet state.json keeps epoch {best_epoch}'s "
                          f"model, which only that file holds: put {path} back, or delete {folder} to start over")
    try:
        if _stamped_epoch(path) != best_epoch:
            return None
        return load_file(str(path), device="cpu")
    except (OSError, ValueError, SafetensorError) as e:
        why = " ".join(str(e).split())[:200]
        raise LowbitError(f"QAT checkpoint {folder}: cannot read {path.name} ({type(e).__name__}: {why}), which holds "
                          f"the kept epoch {best_epoch}'s model: restore {path} (e.g. from a backup), or delete "
                          f"{folder} to start over") from e


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: checkpoint {a!r}, now {b!r}"]


def _without(fingerprint: Any, keys: tuple[str, ...]) -> Any:
    """The fingerprint less the parameters ``keys`` names, in the ``qat`` settings and in every
    recipe step. Always left out: where runs are kept (LOCATION_KEYS), which is not how they
    train, so a checkpoint folder that was moved or copied (another disk, a GPU machine's run
    brought back) still resumes."""
    if not isinstance(fingerprint, dict):
        return fingerprint
    keys = LOCATION_KEYS + keys
    out = dict(fingerprint)
    out["qat"] = _params_without(out.get("qat"), keys)
    recipe = out.get("recipe")
    if isinstance(recipe, dict):
        recipe = {**recipe, **{side: {**LATER_SPEC_OPTIONS, **recipe[side]} for side in ("weights", "activations")
                               if isinstance(recipe.get(side), dict)}}
        if isinstance(recipe.get("steps"), list):
            recipe["steps"] = [_step_without(s, keys) for s in recipe["steps"]]
        out["recipe"] = recipe
    return out


def _step_without(step: Any, keys: tuple[str, ...]) -> Any:
    """One recipe step ({name: params} or a bare name) without the parameters ``keys`` (a qat
    step with the later options it leaves out at their off value)."""
    if not isinstance(step, dict):
        return step
    return {name: _params_without(params, keys) if name == "qat" else
            {k: v for k, v in params.items() if k not in keys} if isinstance(params, dict) else params
            for name, params in step.items()}


def _params_without(params: Any, keys: tuple[str, ...]) -> Any:
    """qat parameters less ``keys``, with every LATER_OPTIONS entry they leave out at its off value."""
    if not isinstance(params, dict):
        return params
    return {**{k: v for k, v in LATER_OPTIONS.items() if k not in keys},
            **{k: v for k, v in params.items() if k not in keys}}


def read_summary(folder: Path) -> dict[str, Any] | None:
    """A checkpoint folder's state.json (epoch, fingerprint, history); None when it holds none."""
    side_path = folder / "state.json"
    if not side_path.is_file():
        return None
    try:
        side = json.loads(side_path.read_text())
        if not isinstance(side, dict):
            raise ValueError("state.json is not a JSON object")
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot read QAT checkpoint {folder}: {e}; delete the folder to start over") from e
    return side


def load_state(folder: Path, model: nn.Module, opt: torch.optim.Optimizer,
               fingerprint: dict[str, Any], may_differ: tuple[str, ...] = (),
               data: dict[str, int] | None = None) -> TrainingState | None:
    """The saved state, restored into ``model``/``opt``; None when ``folder`` holds none.
    A checkpoint written by another recipe or other QAT settings is refused, except in the
    qat parameters ``may_differ`` names (e.g. ``freeze_bn_after``: the caller checks that the
    difference has not acted yet); so is one whose epochs ran over another number of training or
    validation samples than ``data`` (the schedule and the held-out choice would silently change;
    checkpoints written before the sizes were kept do not say, and resume)."""
    side_path = folder / "state.json"
    if folder.exists() and not folder.is_dir():
        raise LowbitError(f"checkpoint {folder} is a file; QAT checkpoints are folders")
    side = read_summary(folder)
    if side is None:
        return None
    try:
        tensors = load_file(str(committed_tensors(folder, side, "state.safetensors")), device="cpu")
    except (OSError, ValueError, SafetensorError) as e:
        raise LowbitError(f"cannot read QAT checkpoint {folder}: {e}; delete the folder to start over") from e
    if side.get("format") != FORMAT:
        raise LowbitError(f"{side_path} is not a lowbit QAT checkpoint")
    now = json.loads(json.dumps(fingerprint, default=str))
    diffs = [d for d in _differences(_without(side.get("fingerprint"), may_differ), _without(now, may_differ))
             if not d.startswith("recipe.description")]  # prose: rewording a recipe changes no result
    if diffs:
        raise LowbitError(f"checkpoint {folder} was written with another recipe or other qat settings ("
                          + "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")
                          + "): use another --checkpoint folder, or delete this one to start over")
    saved_data = side.get("data")
    if data is not None and isinstance(saved_data, dict):
        changed = [f"{k}: checkpoint {saved_data[k]}, now {v}" for k, v in data.items()
                   if k in saved_data and saved_data[k] != v]
        if changed:
            raise LowbitError(f"checkpoint {folder} was trained on other data (" + "; ".join(changed)
                              + "): give the same training data (and val_samples / --train-limit), use another "
                              "--checkpoint folder, or delete this one to start over")
    model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    missing = {k for k in set(model.state_dict()) - set(model_sd) if k.rsplit(".", 1)[-1] not in LATER_STATE}
    if missing:
        raise LowbitError(f"checkpoint {folder} does not fit this model (missing {sorted(missing)[:3]})")
    # torch's own errors (unexpected or reshaped tensors, another optimizer layout, a field missing from
    # state.json) say nothing of the folder, nor that deleting it starts the run over
    try:
        return _restore(folder, side, tensors, model_sd, model, opt, saved_data)
    except LowbitError:
        raise  # already names the folder and the fix
    except (RuntimeError, KeyError, ValueError, TypeError, OSError, SafetensorError) as e:
        why = " ".join(str(e).split())[:300]
        raise LowbitError(f"checkpoint {folder} does not fit this run ({type(e).__name__}: {why}): use "
                          "another --checkpoint folder, or delete this one to start over") from e


def _restore(folder: Path, side: dict[str, Any], tensors: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor],
             model: nn.Module, opt: torch.optim.Optimizer, saved_data: Any) -> TrainingState:
    """load_state's restore, once the checkpoint is known to be this run's."""
    model.load_state_dict(model_sd)
    opt.load_state_dict(optimizer_state(tensors, side.get("state_scalars", {}), side["param_groups"]))
    # The saved generator state ("rng/torch") is not restored: every training step reseeds, and
    # setting it here would change the caller's generator, outside train_qat's fork_rng.
    best_epoch, best_val = int(side["best_epoch"]), float(side["best_val"])
    best = _kept_model(folder, best_epoch)
    if best is None:  # nothing kept (or killed between the two writes): the next epoch becomes the kept one
        best_val = -1.0  # (best_epoch stays as recorded: lowbit.qat.engine.check_kept reads it)
    ema = {k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")} or None
    if ema is not None:  # state added later: the average starts it where the model's loader did
        live = model.state_dict()
        ema.update({k: v.detach().clone() for k, v in live.items()
                    if k not in ema and k.rsplit(".", 1)[-1] in LATER_STATE})
        if set(ema) != set(live):
            raise ValueError(f"its weight average holds other tensors than the model (e.g. "
                             f"{sorted(set(ema) ^ set(live))[:3]})")
    return TrainingState(epoch=int(side["epoch"]), best_val=best_val, best_epoch=best_epoch,
                         history=list(side["history"]), best=best, ema=ema, branched_from=side.get("branched_from"),
                         data=saved_data if isinstance(saved_data, dict) else None)
