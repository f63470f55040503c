"""Finding a dataset on disk, and downloading it into the cache when allowed.

Search order: explicit ``data_dir``; ``$LOWBIT_DATA_DIR`` (may list several dirs separated
by ``os.pathsep``); the cache (``$LOWBIT_CACHE_DIR/data`` or ``~/.cache/lowbit/data``);
OS-package locations (Fashion-MNIST's Debian package); then download into the cache.
Each dir may contain the dataset folder (``<dir>/cifar-10-batches-bin``) or be it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from lowbit.data import download as _dl
from lowbit.data.registry import DatasetInfo
from lowbit.errors import ChecksumError, DatasetNotFoundError, LowbitError


def cache_root() -> Path:
    """Root of lowbit's cache: ``$LOWBIT_CACHE_DIR`` or ``~/.cache/lowbit``."""
    env = os.environ.get("LOWBIT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowbit"


def data_cache_dir() -> Path:
    """Where downloaded datasets go."""
    return cache_root() / "data"


def search_dirs(explicit: str | os.PathLike[str] | None, explicit_label: str, env_var: str,
                cache: Path) -> list[tuple[str, Path]]:
    """(origin, directory) pairs in priority order: the explicit argument, then every
    directory in ``$env_var`` (os.pathsep-separated), then the cache. Shared by datasets
    and pretrained weights so both resolve files the same way."""
    out: list[tuple[str, Path]] = []
    if explicit is not None:
        path = Path(explicit).expanduser()
        # A directory named on purpose that is not there is a typo, not a hint: refuse it
        # rather than quietly reading the data from somewhere else.
        if not path.is_dir():
            raise LowbitError(f"{explicit_label} {str(explicit)!r} " + ("is a file, not a directory" if path.exists()
                                                                         else "does not exist"))
        out.append((explicit_label, path))
    env = os.environ.get(env_var)
    if env:
        for p in (Path(p).expanduser() for p in env.split(os.pathsep) if p):
            if not p.is_dir():
                warnings.warn(f"${env_var} names {str(p)!r}, which is not a directory; skipping it", stacklevel=3)
            out.append((env_var, p))
    out.append(("cache", cache))
    return out


def candidate_dirs(info: DatasetInfo, data_dir: str | os.PathLike[str] | None) -> list[tuple[str, Path]]:
    """(origin, directory) pairs to search, in priority order."""
    out = search_dirs(data_dir, "data_dir argument", "LOWBIT_DATA_DIR", data_cache_dir())
    out.extend(("system", Path(p)) for p in info.system_dirs)
    return out


def _split_files(folder: Path, names: tuple[str, ...]) -> list[Path] | None:
    """The split's files inside ``folder`` (accepting un-gzipped idx files), or None if any is missing."""
    found = []
    for n in names:
        p = folder / n
        if not p.is_file() and n.endswith(".gz") and (folder / n[:-3]).is_file():
            p = folder / n[:-3]
        if not p.is_file():
            return None
        found.append(p)
    return found


def _name_is_shared(info: DatasetInfo, split: str) -> bool:
    """Whether another known dataset's split has the same file names (MNIST and Fashion-MNIST do)."""
    from lowbit.data.registry import DATASETS

    return any(other.name != info.name and set(other.files.get(split, ())) == set(info.files[split])
               for other in DATASETS.values())


def find_in(info: DatasetInfo, split: str, directory: Path) -> list[Path] | None:
    """Files of ``split`` if ``directory`` holds the dataset folder or is it. A directory holding the files itself
    counts only when its name says which dataset they are, if another dataset's files have the same names (the
    MNIST folder passed for Fashion-MNIST loaded MNIST under Fashion-MNIST's name and statistics)."""
    candidates = [directory / info.folder]
    if directory.name == info.folder or not _name_is_shared(info, split):
        candidates.append(directory)
    for folder in candidates:
        files = _split_files(folder, info.files[split])
        if files is not None:
            return files
    return None


def not_found_message(info: DatasetInfo, split: str, looked: list[tuple[str, Path]], reason: str = "") -> str:
    """Name the dataset, every directory searched, and the ways to fix it."""
    lines = [f"dataset {info.name!r} ({split} split) not found. Looked in:"]
    lines += [f"  - {p}  [{origin}]" for origin, p in looked]
    if not any(origin == "LOWBIT_DATA_DIR" for origin, _ in looked):
        lines.append("  (LOWBIT_DATA_DIR is not set)")
    needed = ", ".join(info.files[split])
    lines.append(
        f"Fix: set LOWBIT_DATA_DIR (or pass --data-dir / data_dir=) to a directory containing "
        f"{info.folder}/ with {needed}; or allow downloading (download=True, i.e. drop --no-download) "
        f"to fetch it from {info.resources[0].urls[0]} into {data_cache_dir()}."
    )
    if reason:
        lines.append(f"Download failed: {reason}")
    return "\n".join(lines)


def download_dataset(info: DatasetInfo, *, progress: bool = True) -> Path:
    """Download and verify ``info`` into the cache; returns the dataset folder."""
    root = data_cache_dir()
    target = root / info.folder
    if info.archive:
        res = info.resources[0]
        archive = _dl.download_file(res.urls, root / res.filename, md5=res.md5, progress=progress)
        wanted = {n for names in info.files.values() for n in names}
        _dl.safe_extract_tar(archive, root, only_under=info.folder, names=wanted | {"batches.meta.txt"})
        archive.unlink(missing_ok=True)  # 160 MB we no longer need
    else:
        for res in info.resources:
            dest = target / res.filename
            if dest.is_file():
                try:
                    _dl.verify_file(dest, md5=res.md5, raw_md5=res.raw_md5)
                    continue
                except LowbitError:  # stale or corrupt: fetch again
                    dest.unlink()
            _dl.download_file(res.urls, dest, md5=res.md5, raw_md5=res.raw_md5, progress=progress)
    return target


def locate(
    info: DatasetInfo, split: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> list[Path]:
    """Paths of the files of ``split``, downloading into the cache if needed and allowed."""
    looked = candidate_dirs(info, data_dir)
    for _, d in looked:
        files = find_in(info, split, d)
        if files is not None:
            return files
    if not download:
        raise DatasetNotFoundError(not_found_message(info, split, looked))
    try:
        folder = download_dataset(info)
    except ChecksumError:
        raise
    except LowbitError as e:
        raise DatasetNotFoundError(not_found_message(info, split, looked, str(e))) from e
    files = _split_files(folder, info.files[split])
    if files is None:
        raise DatasetNotFoundError(
            not_found_message(info, split, looked, f"the download did not contain {info.files[split]}")
        )
    return files
