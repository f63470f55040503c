"""Run registry: every quantize/train/export/search/bench/analyze/eval run in one SQLite file.

So that "which recipe gave 90.8 last week, on which weights, with which lowbit" has an answer
without loose JSON files. Embedded (stdlib ``sqlite3``), WAL mode so several processes can write
at once (each write is one short transaction; a busy database is waited on, not failed).
Location: ``--registry PATH``, else ``$LOWBIT_REGISTRY``, else ``<cache dir>/runs.sqlite3``.
"""
from __future__ import annotations

import json
import os
import platform
import sqlite3
import time
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.state_io import blocking_file

STATUSES = ("running", "done", "failed", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    command TEXT NOT NULL,
    argv TEXT NOT NULL,
    model TEXT,
    recipe TEXT,
    dataset TEXT,
    model_fingerprint TEXT,
    data_fingerprint TEXT,
    weights TEXT,
    status TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    seconds REAL,
    metrics TEXT,
    artifacts TEXT,
    versions TEXT,
    error TEXT,
    pid INTEGER
)
"""


def default_path() -> Path:
    from lowbit.data.locate import cache_root

    env = os.environ.get("LOWBIT_REGISTRY")
    return Path(env).expanduser() if env else cache_root() / "runs.sqlite3"


def versions() -> dict[str, str]:
    import torch

    import lowbit

    return {"lowbit": lowbit.__version__, "torch": torch.__version__, "python": platform.python_version()}


class Registry:
    """One SQLite file of runs; open it per process (connections are not shared across forks)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout: float = 30.0) -> None:
        self.path = Path(path) if path is not None else default_path()
        if self.path.is_dir():
            raise LowbitError(f"run registry {self.path} is a directory; give a file path (e.g. {self.path}/runs.sqlite3)")
        try:  # a parent that is a file (or unwritable) is the user's path problem, not a lowbit bug
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            blocker = blocking_file(self.path)
            why = f"{blocker} is not a folder" if blocker else f"cannot create {self.path.parent} ({err.strerror or err})"
            raise LowbitError(f"run registry {self.path} cannot be created: {why}") from None
        try:
            self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
            _add_missing_columns(self._db)
        except sqlite3.DatabaseError as err:
            raise LowbitError(f"run registry {self.path} cannot be opened as SQLite: {err}") from None
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        self._db.close()

    def start(self, command: str, argv: list[str], *, model: str | None = None, recipe: str | None = None,
              dataset: str | None = None) -> int:
        cur = self._db.execute(
            "INSERT INTO runs (command, argv, model, recipe, dataset, status, started, versions, pid) "
            "VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?)",
            (command, json.dumps(argv), model, recipe, dataset, time.time(), json.dumps(versions()), os.getpid()))
        return int(cur.lastrowid)

    def update(self, run_id: int, **fields: Any) -> None:
        """Set columns of a run (dicts and lists are stored as JSON)."""
        allowed = {"model", "recipe", "dataset", "model_fingerprint", "data_fingerprint", "weights", "metrics",
                   "artifacts"}
        bad = sorted(set(fields) - allowed)
        if bad:
            raise LowbitError(f"registry update: unknown field(s) {bad}")
        if not fields:
            return
        cols = ", ".join(f"{k} = ?" for k in fields)
        vals = [json.dumps(v, default=str) if isinstance(v, (dict, list)) else v for v in fields.values()]
        self._db.execute(f"UPDATE runs SET {cols} WHERE id = ?", (*vals, run_id))

    def finish(self, run_id: int, status: str, error: str | None = None) -> None:
        if status not in STATUSES[1:]:
            raise LowbitError(f"a run finishes as one of {STATUSES[1:]}, not {status!r}")
        now = time.time()
        self._db.execute("UPDATE runs SET status = ?, finished = ?, seconds = ? - started, error = ? WHERE id = ?",
                         (status, now, now, error, run_id))

    def get(self, run_id: int) -> dict[str, Any]:
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise LowbitError(f"no run {run_id} in {self.path}")
        return _decode(row)

    def list(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_decode(r) for r in rows]


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Columns added after a registry file was made (``weights``: the float weights file a run
    read, so ``lowbit report`` draws those and not the zoo's) are added in place; old rows hold NULL."""
    have = {r[1] for r in db.execute("PRAGMA table_info(runs)").fetchall()}
    for column in ("weights",):
        if column not in have:
            try:
                db.execute(f"ALTER TABLE runs ADD COLUMN {column} TEXT")
            except sqlite3.OperationalError as err:  # another process added it first
                if "duplicate column" not in str(err):
                    raise


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    for key in ("argv", "metrics", "artifacts", "versions"):
        if d.get(key):
            d[key] = json.loads(d[key])
    return d


def headline(metrics: dict[str, Any] | None) -> str:
    """The one line of a run's metrics a list shows (top-1s where there are some)."""
    if not metrics:
        return ""
    parts = []
    if "float_top1" in metrics and isinstance(metrics["float_top1"], (int, float)):
        f = metrics["float_top1"]
        parts.append(f"float {100 * f if f <= 1 else f:.2f}")
    for r in (metrics.get("results") or [])[:4]:
        if isinstance(r, dict) and "recipe" in r and "top1" in r:
            parts.append(f"{r['recipe']} {r['top1']}")
    if "quantized_top1" in metrics:
        parts.append(f"quantized {metrics['quantized_top1']:.2f}")
    if "top1" in metrics and isinstance(metrics["top1"], (int, float)):
        t = metrics["top1"]
        parts.append(f"top-1 {100 * t if t <= 1 else t:.2f}")
    return ", ".join(parts)
