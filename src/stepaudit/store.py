"""RunStore: one embedded SQLite file per run folder (WAL), and ``load`` to read it back.

Tables:
  ``runs``   one row: ``name``, ``created`` and ``meta`` (JSON: model, optimizer, versions, seed).
  ``steps``  one row per audited step; a column per scalar field, added as fields first appear.
  ``layers`` one row per (step, kind, name): kind is ``module`` or ``group``, with norms and ratio.
  ``extras`` non-scalar fields (lists, matrices) as JSON, keyed by (step, field).
Each step is committed as soon as it is written, so a killed process loses nothing already written
(WAL with ``synchronous=NORMAL`` is durable against process crashes, not against power loss).
No pickle anywhere: reading a run never executes code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sqlite3
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

STORE_FILE = "stepaudit.sqlite"
LAYER_FIELDS = ("grad_norm", "update_norm", "weight_norm", "update_ratio")
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def new_run_dir(root: str | os.PathLike = "stepaudit-runs", name: str | None = None) -> Path:
    """A fresh folder ``root/<name or timestamp>[-N]`` that did not exist before."""
    base = Path(root) / (name or time.strftime("%Y%m%d-%H%M%S"))
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir()  # atomic: of several processes asking at once, each gets its own folder
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


class RunStoreError(ValueError):
    """A run's ``stepaudit.sqlite`` exists but cannot be read as a run store (corrupt, truncated, not ours)."""


def _store_path(run: str | os.PathLike) -> Path:
    path = Path(run)
    return path if path.suffix == ".sqlite" else path / STORE_FILE


def run_folder(run: str | os.PathLike) -> Path:
    """The run folder of ``run``, given as the folder itself or as its ``.sqlite`` file."""
    return _store_path(run).parent


def output_file(path: str | os.PathLike, default_name: str) -> Path:
    """Where to write an output file: ``path`` itself, or ``path/default_name`` when ``path`` is a folder.

    A folder is an existing directory or a path written with a trailing slash (created if missing).
    """
    text = os.fspath(path)
    folder = Path(text)
    if folder.is_dir() or text.endswith(("/", os.sep)):
        return folder / default_name
    return folder


def _unreadable(path: Path, error: Exception) -> None:
    """Raise a corrupt or foreign store as one clear error; a busy/locked database stays what it is."""
    message = str(error) if isinstance(error, sqlite3.DatabaseError) else f"{type(error).__name__}: {error}"
    if isinstance(error, sqlite3.OperationalError) and ("locked" in message or "busy" in message):
        raise error
    raise RunStoreError(
        f"{path} is not a stepaudit run store (corrupt or truncated?): {message}; "
        "record the run again, or pass another run folder"
    ) from error


class RunStore:
    """Append-only writer for one run's SQLite file; safe to read from another process meanwhile."""

    def __init__(
        self,
        run: str | os.PathLike,
        meta: dict | None = None,
        name: str | None = None,
        keep_hint: str = "pass run=None, or a new folder, to keep them",
    ) -> None:
        """Open (or create) the run's store; with ``meta``, start a new run there (``keep_hint`` ends the warning
        that an earlier run's steps are replaced, in the caller's language: an argument or a command-line flag)."""
        self.path = _store_path(run)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            blocker = next((p for p in (self.path.parent, *self.path.parent.parents) if p.exists()), self.path.parent)
            raise ValueError(
                f"run={os.fspath(run)!r}: {blocker} is a file, not a folder; pass a folder for "
                "the run (created if missing), e.g. run='runs/exp1', or run=None for a new one "
                "under stepaudit-runs/"
            ) from None
        if self.path.is_dir():
            raise ValueError(
                f"{self.path} is a folder; pass the run folder that holds it: run={str(self.path.parent)!r}"
            )
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            # NORMAL syncs only at checkpoints; one every 8192 pages (~32 MiB of WAL, ~2,700 MLP steps) instead of
            # every 1000 took the store's mean cost per step from ~105 to ~45 µs (bench/overhead.py's MLP record)
            self.db.execute("PRAGMA wal_autocheckpoint=8192")
            self.db.executescript(
                """
                CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, name TEXT, created REAL, meta TEXT);
                CREATE TABLE IF NOT EXISTS steps (step INTEGER PRIMARY KEY);
                CREATE TABLE IF NOT EXISTS layers (step INTEGER, kind TEXT, name TEXT, grad_norm REAL,
                    update_norm REAL, weight_norm REAL, update_ratio REAL, PRIMARY KEY (step, kind, name));
                CREATE TABLE IF NOT EXISTS extras (step INTEGER, field TEXT, value TEXT, PRIMARY KEY (step, field));
                CREATE TABLE IF NOT EXISTS metrics (step INTEGER, name TEXT, value REAL, PRIMARY KEY (step, name));
                """
            )
            self._columns = {row[1] for row in self.db.execute("PRAGMA table_info(steps)")}
        except sqlite3.DatabaseError as error:
            self.db.close()
            _unreadable(self.path, error)
        self._inserts: dict[tuple[str, ...], str] = {}  # INSERT statement per set of scalar fields
        if meta is not None:
            earlier = self.db.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
            self.db.execute("DELETE FROM metrics")  # a new run: an earlier run's logged metrics are not its own
            if earlier:  # a new run in an old folder: never mix the two runs' steps
                warnings.warn(
                    f"{self.path.parent} held {earlier} steps of an earlier run; they are replaced ({keep_hint})",
                    stacklevel=3,
                )
                self.db.executescript("DELETE FROM steps; DELETE FROM layers; DELETE FROM extras; DELETE FROM metrics;")
            self.db.execute("DELETE FROM runs")
            self.db.execute(
                "INSERT INTO runs (id, name, created, meta) VALUES (1, ?, ?, ?)",
                (name or self.path.parent.name, time.time(), json.dumps(meta, default=str)),
            )

    def update_meta(self, **fields: Any) -> None:
        """Merge fields into the run's metadata (e.g. a summary written at close)."""
        row = self.db.execute("SELECT meta FROM runs WHERE id = 1").fetchone()
        meta = json.loads(row[0]) if row and row[0] else {}
        meta.update(fields)
        self.db.execute("UPDATE runs SET meta = ? WHERE id = 1", (json.dumps(meta, default=str),))

    def _ensure_column(self, field: str, value: Any) -> None:
        """Add the ``steps`` column for ``field``, typed by the record schema (an unknown field: by ``value``)."""
        if field in self._columns:
            return
        if not _COLUMN.match(field):
            raise ValueError(f"field name {field!r} is not a valid identifier")
        from .schema import sql_type  # here, not at the top: `python -m stepaudit.schema` runs it as a fresh module

        kind = sql_type(field, value)
        self.db.execute(f'ALTER TABLE steps ADD COLUMN "{field}" {kind}')
        self._columns.add(field)

    def append(self, record: dict) -> None:
        """Write one step (its scalar fields, layer rows and extras) in a single committed transaction."""
        names, values, extras = [], [], []
        for key, value in record.items():
            if key == "layers":
                continue
            if value is None or isinstance(value, (bool, int, float, str)):
                names.append(key)
                values.append(value)  # SQLite stores NaN as NULL and bools as integers by itself
            else:
                extras.append((key, value))
        shape = tuple(names)
        statement = self._inserts.get(shape)
        step = record["step"]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if statement is None:  # a new set of fields: add missing columns, build the statement once
                for name, value in zip(names, values):
                    self._ensure_column(name, value)
                columns = ", ".join(f'"{n}"' for n in names)
                statement = self._inserts[shape] = (
                    f"INSERT OR REPLACE INTO steps ({columns}) VALUES ({', '.join('?' for _ in names)})"
                )
            self.db.execute(statement, values)
            layers = record.get("layers")
            if layers:
                self.db.executemany(
                    "INSERT OR REPLACE INTO layers VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(step, row["kind"], row["name"], *map(row.get, LAYER_FIELDS)) for row in layers],
                )
            if extras:
                self.db.executemany(
                    "INSERT OR REPLACE INTO extras VALUES (?, ?, ?)",
                    [(step, k, json.dumps(v, default=_json_default)) for k, v in extras],
                )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")  # also undoes columns added above: forget them and the statement
            self._columns = {row[1] for row in self.db.execute("PRAGMA table_info(steps)")}
            self._inserts.pop(shape, None)
            raise

    def log_metric(self, step: int, name: str, value: float) -> None:
        """A metric the user logged at a step (accuracy, validation loss …); the last value per step and name wins."""
        self.db.execute(
            "INSERT OR REPLACE INTO metrics (step, name, value) VALUES (?, ?, ?)", (int(step), str(name), float(value))
        )

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close."""
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.db.close()


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _rows(db: sqlite3.Connection, sql: str) -> list[dict]:
    cursor = db.execute(sql)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _connect_read_only(run: str | os.PathLike) -> sqlite3.Connection:
    path = _store_path(run)
    if not path.exists():
        raise FileNotFoundError(f"no stepaudit run at {path.parent} (expected {path.name}); pass a run folder")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _meta(db: sqlite3.Connection) -> dict:
    run_rows = _rows(db, "SELECT name, created, meta FROM runs")
    meta = json.loads(run_rows[0]["meta"]) if run_rows and run_rows[0]["meta"] else {}
    if run_rows:
        meta.setdefault("name", run_rows[0]["name"])
        meta.setdefault("created", run_rows[0]["created"])
    return meta


@contextlib.contextmanager
def _reading(run: str | os.PathLike) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the run's store; a corrupt or foreign file raises ``RunStoreError``."""
    db = _connect_read_only(run)
    try:
        yield db
    except sqlite3.DatabaseError as error:
        _unreadable(_store_path(run), error)
    except json.JSONDecodeError as error:  # tables of the right names holding something else
        _unreadable(_store_path(run), error)
    finally:
        db.close()


def read_meta(run: str | os.PathLike) -> dict:
    """A run's metadata alone (no step or layer rows are read)."""
    with _reading(run) as db:
        return _meta(db)


def read_run(run: str | os.PathLike) -> tuple[dict, list[dict], list[dict]]:
    """(meta, step records with extras merged in, layer rows) of a run, read-only."""
    with _reading(run) as db:
        meta = _meta(db)
        real_columns = {r[1] for r in db.execute("PRAGMA table_info(steps)") if r[2] == "REAL"}
        steps = _rows(db, "SELECT * FROM steps ORDER BY step")
        by_step = {s["step"]: s for s in steps}
        for row in _rows(db, "SELECT step, field, value FROM extras"):
            if row["step"] in by_step:
                by_step[row["step"]][row["field"]] = json.loads(row["value"])
        layers = _rows(db, "SELECT * FROM layers ORDER BY step, kind, name")
    for record in steps:  # a NULL in a numeric column was a NaN
        for key in real_columns:
            if record.get(key) is None:
                record[key] = math.nan
    return meta, steps, layers


def read_metrics(run: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """The metrics logged with ``Audit.log``: name → (steps, values), in step order ({} for older runs)."""
    with _reading(run) as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='metrics'").fetchone():
            return {}
        found: dict[str, tuple[list[int], list[float]]] = {}
        for step, name, value in db.execute("SELECT step, name, value FROM metrics ORDER BY name, step"):
            steps, values = found.setdefault(name, ([], []))
            steps.append(step)
            values.append(math.nan if value is None else value)
        return found


def load(run: str | os.PathLike, table: str = "steps") -> Any:
    """Read a run's ``steps`` (default), ``layers`` or ``meta``: a pandas DataFrame when pandas is installed.

    Works while another process is still writing the run (SQLite WAL readers never block).
    """
    if table not in ("steps", "layers", "meta"):
        raise ValueError(f"table must be 'steps', 'layers' or 'meta', not {table!r}")
    if table == "meta":
        return read_meta(run)
    meta, steps, layers = read_run(run)
    rows = steps if table == "steps" else layers
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)


def iter_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run folders among the given paths (a folder containing runs expands to its runs)."""
    found = []
    for p in map(Path, paths):
        if _store_path(p).exists():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(c for c in p.iterdir() if _store_path(c).exists()))
    return found
