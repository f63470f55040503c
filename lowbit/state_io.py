"""Training state on disk: safetensors for tensors, JSON for the rest, each file written
atomically (to a ``.part`` file of its own, flushed to disk, then renamed), so a killed run
never leaves a half-written file where a good one was. Shared by float training, QAT
checkpoints, saved weights and .lowbit artifacts."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors.torch import save_file


def blocking_file(path: Path) -> Path | None:
    """The regular file among ``path``'s parents, if any: a path under it can never be written, and
    found only when the results are written, it lost the work before (a search, an epoch, an export)."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def usual_permissions(path: Path) -> None:
    """Give a file the mode a plain ``open()`` would (0666 minus the umask): safetensors
    creates its files 0600, which hides a saved model from everyone else on a shared machine."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_atomically(path: Path, write: Callable[[Path], None], prefix: str = "", suffix: str = ".part") -> None:
    """Run ``write(tmp)`` on a fresh file beside ``path``, flush it to disk, give it the usual
    permissions and rename it over ``path``; on any failure remove it and re-raise.

    Why a unique name (``<prefix><name>.<random><suffix>``) and not a fixed ``<name>.part``:
    two processes saving to one path (two runs sharing a checkpoint folder) wrote into the same
    temporary file and renamed it from under each other (a raw FileNotFoundError, or one's bytes
    under the other's name). Why the fsync: a rename can reach the disk before the data it
    names, so a crash just after it could leave an empty file where the good one was."""
    # NAME_MAX is 255 bytes: keep room for the random part and the suffix
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{prefix}{path.name[:200]}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            usual_permissions(tmp)  # mkstemp creates 0600, as safetensors does
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_tensors(tensors: Mapping[str, torch.Tensor], path: Path,
                        metadata: Mapping[str, str] | None = None) -> None:
    """Save ``tensors`` as safetensors at ``path`` (see :func:`write_atomically`)."""
    owned = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = dict(metadata) if metadata is not None else None
    write_atomically(Path(path), lambda tmp: save_file(owned, str(tmp), metadata=meta))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` at ``path`` (see :func:`write_atomically`)."""
    write_atomically(Path(path), lambda tmp: tmp.write_text(text))


def commit_state(folder: Path, stem: str, tag: int | str, tensors: Mapping[str, torch.Tensor], side_name: str,
                 side: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """A tensors file and the JSON that describes it, saved as one commit.

    Why not two atomic files: with one fixed tensors name, a run killed between the two
    writes would leave new tensors beside the old JSON, and a resume would pair them. Here
    the tensors go to a file of their own (``<stem>-<tag>.safetensors``), the JSON, written
    last, names it under ``"tensors"``, and only then is the previous tensors file removed: at
    every moment the JSON and the file it names come from the same save."""
    name = f"{stem}-{tag}.safetensors"
    atomic_save_tensors(tensors, folder / name, metadata)
    atomic_write_text(folder / side_name, json.dumps({**side, "tensors": name}, indent=1, sort_keys=True, default=str))
    for old in folder.glob(f"{stem}*.safetensors"):  # this function's own earlier files only (and the legacy
        tag_part = old.name[len(stem):-len(".safetensors")]  # fixed name), never e.g. a user's state_backup
        if old.name != name and (tag_part == "" or (tag_part.startswith("-") and tag_part[1:].isdigit())):
            old.unlink(missing_ok=True)


def committed_tensors(folder: Path, side: Mapping[str, Any], legacy: str) -> Path:
    """The tensors file a JSON written by :func:`commit_state` names (``legacy``: the fixed
    name of folders written before it). A name with a directory part is refused: a folder
    received from someone else must not point outside itself."""
    name = side.get("tensors", legacy)
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"names its tensors file {name!r}, not a file in the folder")
    return folder / name


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]],
                                                          list[dict[str, Any]]]:
    """The optimizer's state split for storage: ``optim/<idx>/<key>`` tensors, the scalar
    entries (e.g. Adam's step counts as numbers), and the param groups (JSON)."""
    osd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in osd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return tensors, scalars, osd["param_groups"]


def optimizer_state(tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Mapping[str, Any]],
                    param_groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The optimizer state dict back from what :func:`optimizer_tensors` stored."""
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, key = k.split("/", 2)
            state.setdefault(int(idx), {})[key] = v
    for idx, sc in scalars.items():
        state.setdefault(int(idx), {}).update(sc)
    return {"state": state, "param_groups": param_groups}


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 (16 hex) over each tensor's name and bytes: the same weights or data, the same digest (no
    arithmetic on them, so no thread count can change it; any dtype, bf16 and bool included)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
