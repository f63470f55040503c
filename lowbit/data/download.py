"""Fetching files over the network with checksums, and extracting archives safely.

Shared by the dataset loaders and the model zoo. ``fetch_url`` is a module-level function so
tests (and air-gapped users) can replace it, and it accepts ``file://`` URLs.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import IO

from tqdm import tqdm

from lowbit.errors import ChecksumError, LowbitError
from lowbit.state_io import write_atomically

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


def file_hash(path: str | os.PathLike[str], algorithm: str = "md5", *, decompress: bool = False) -> str:
    """Hex digest of a file read in chunks (so large archives need no RAM).

    With ``decompress`` a damaged gzip stream (bad header, bad deflate data, truncation) raises
    ChecksumError: it is bad bytes like a digest mismatch, so a download falls back to the next
    mirror and a corrupt cached copy is fetched again.
    """
    h = hashlib.new(algorithm)
    opener = gzip.open if decompress else open
    try:
        with opener(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ChecksumError(f"{path}: corrupt gzip file ({e}); delete it to fetch it again") from e
    return h.hexdigest()


def fetch_url(url: str, dest: Path, *, progress: bool = True) -> None:
    """Stream ``url`` into ``dest`` with a progress bar; raises OSError on network failure."""
    req = urllib.request.Request(url, headers={"User-Agent": "lowbit"})
    with urllib.request.urlopen(req, timeout=_TIMEOUT_S) as resp, open(dest, "wb") as out:
        total = resp.headers.get("Content-Length")
        with tqdm(
            total=int(total) if total else None,
            unit="B",
            unit_scale=True,
            desc=f"download {PurePosixPath(url).name}",
            disable=not progress,
            leave=False,
        ) as bar:
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                out.write(chunk)
                bar.update(len(chunk))


def verify_file(
    path: Path,
    *,
    md5: str | None = None,
    raw_md5: str | None = None,
    sha256: str | None = None,
    source: str | None = None,
) -> None:
    """Raise ChecksumError unless ``path`` matches the published digest.

    ``sha256`` may be a full digest or a prefix (some releases only publish the prefix in the
    file name). ``raw_md5`` is accepted as an alternative to ``md5`` for gzip files whose
    content is right but which were re-compressed by a mirror.
    """
    where = f" (from {source})" if source else ""
    if sha256 is not None:
        got = file_hash(path, "sha256")
        if not got.startswith(sha256.lower()):
            raise ChecksumError(f"{path}{where}: sha256 {got} does not match the published {sha256}")
    if md5 is not None:
        got = file_hash(path, "md5")
        if got != md5.lower():
            if raw_md5 is not None:  # gzip content check (path may be a ".part" file)
                try:
                    raw = file_hash(path, "md5", decompress=True)
                except LowbitError:
                    raw = None
                if raw == raw_md5.lower():
                    return
            raise ChecksumError(f"{path}{where}: md5 {got} does not match the published {md5}")


def download_file(
    urls: Sequence[str],
    dest: str | os.PathLike[str],
    *,
    md5: str | None = None,
    raw_md5: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Download the first working mirror into ``dest`` and verify it.

    Writes to a temporary file of its own beside ``dest`` (``<name>.<random>.part``) and renames it
    only after the checksum passed, so an interrupted or corrupt download never looks like a valid
    file. Why not one fixed ``<name>.part``: two processes fetching the same file (the ranks of a
    torchrun job) wrote into it together and one renamed it from under the other (a raw
    FileNotFoundError). If no mirror yields a valid file but another process has meanwhile put a
    verified ``dest`` in place, that one is used. Otherwise raises ChecksumError when a mirror served
    bad bytes, else LowbitError listing the network errors.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    bad: ChecksumError | None = None

    def fetch_verified(url: str) -> Callable[[Path], None]:
        def write(part: Path) -> None:  # raising here removes the temporary file (write_atomically)
            fetch_url(url, part, progress=progress)
            verify_file(part, md5=md5, raw_md5=raw_md5, sha256=sha256, source=url)
        return write

    for url in urls:
        try:
            write_atomically(dest, fetch_verified(url))
        except ChecksumError as e:
            bad = e
            failures.append(f"{url}: {e}")
            continue
        except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as e:
            # HTTPException: a connection dropped mid-response (IncompleteRead) is a network failure too
            failures.append(f"{url}: {e}")
            continue
        return dest
    if (md5 or sha256) and dest.is_file():  # another process finished it meanwhile: fine if it verifies
        try:
            verify_file(dest, md5=md5, raw_md5=raw_md5, sha256=sha256)
            return dest
        except ChecksumError:
            pass
    if bad is not None:
        raise ChecksumError(f"could not get a valid {dest.name}: " + "; ".join(failures)) from bad
    raise LowbitError(f"could not download {dest.name}: " + "; ".join(failures))


def _copy_to(src: IO[bytes], part: Path) -> None:
    """Copy an archive member's stream into ``part`` (the temporary file write_atomically renames)."""
    with open(part, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def _safe_member_path(name: str) -> PurePosixPath:
    """Reject absolute names and ``..`` so an archive cannot write outside its target."""
    p = PurePosixPath(name.replace("\\", "/"))
    unsafe = not p.parts or p.is_absolute() or ".." in p.parts or ":" in p.parts[0]
    if unsafe:
        raise LowbitError(f"refusing to extract unsafe archive member {name!r} (path traversal)")
    return p


def _contained_target(dest: Path, rel: PurePosixPath, name: str) -> Path:
    """Where member ``rel`` is written: inside ``dest``, or inside the folder its top-level directory links to.

    ``dest``'s own top-level entries may be symlinks the user made (a dataset folder in the cache that
    links to a bigger disk), so each member is checked against its resolved top-level folder rather
    than against ``dest``; anything a link below that leads elsewhere is still refused.
    """
    top = (dest / rel.parts[0]).resolve() if len(rel.parts) > 1 else dest
    target = (dest / Path(*rel.parts)).resolve()
    if top not in target.parents:
        raise LowbitError(f"refusing to extract {name!r}: it would land outside {top}")
    return target


def safe_extract_tar(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    only_under: str | None = None,
    names: Iterable[str] | None = None,
) -> list[Path]:
    """Extract regular files of a tar archive into ``dest``, refusing anything unsafe.

    Links, devices and paths escaping ``dest`` raise LowbitError before anything is written; a
    top-level folder of ``dest`` that is a symlink (a dataset folder on another disk) is written through.
    ``only_under``/``names`` restrict extraction to the files we actually need.
    """
    dest = Path(dest).resolve()
    wanted = set(names) if names is not None else None
    written: list[Path] = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            plan: list[tuple[tarfile.TarInfo, Path]] = []
            for m in members:
                if m.isdir():  # never created from the archive; parents come from file paths
                    continue
                rel = _safe_member_path(m.name)
                if not m.isfile():
                    raise LowbitError(f"refusing to extract {m.name!r}: not a regular file (link or device)")
                if only_under is not None and (not rel.parts or rel.parts[0] != only_under):
                    continue
                if wanted is not None and rel.name not in wanted:
                    continue
                plan.append((m, _contained_target(dest, rel, m.name)))
            for m, target in plan:
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                if src is None:  # pragma: no cover - isfile() members always have data
                    raise LowbitError(f"cannot read {m.name!r} from {archive}")
                with src:  # a file of its own per writer: two processes extracting one archive (torchrun
                    write_atomically(target, lambda part: _copy_to(src, part))  # ranks) shared a fixed .part
                written.append(target)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile) as e:
        raise LowbitError(f"{archive}: corrupt or truncated archive ({e})") from e
    return written
