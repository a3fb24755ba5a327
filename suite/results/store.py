"""The results store: one SQLite file, one row per (trial, environment).

Why SQLite: it is embedded (no server), every write is a transaction, and WAL mode lets a report
read the file while a sweep is still writing it. Each finished trial is committed on its own, so a
sweep killed at any moment (even `kill -9`) loses only the trials in flight, and `--resume` reruns
exactly the missing ones (`done_ids`).

Layout:
    trials   one row per (trial_id, env_key); columns are `TrialRecord.flat()` keys.
    columns  name -> kind (bool|int|float|str|json) for every column of `trials`, so values come
             back with their Python types (SQLite has no bool; `pretrained` is bool or str).
    meta     key -> JSON value: experiment name, its select block, compare thresholds, ...

This module must stay light: no torch.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterable

from suite.core.errors import SuiteError
from suite.core.options import OPTIONS
from suite.core.records import STATUSES, Env, MeasureResult, ProbeResult

DEFAULT_NAME = "results.sqlite"
KINDS = ("bool", "int", "float", "str", "json")
_SQL_TYPE = {"bool": "INTEGER", "int": "INTEGER", "float": "REAL", "str": "TEXT", "json": "TEXT"}


def _kind_of_annotation(annotation: str) -> str:
    """Kind of a records field from its annotation string, e.g. 'float | None' -> 'float'."""
    for kind in ("bool", "int", "float", "str"):
        if annotation.replace(" ", "").split("|")[0] == kind:
            return kind
    return "json"


def _known_kinds() -> dict[str, str]:
    """Kinds of every column the contract files declare, in `TrialRecord.flat()` order."""
    kinds = {"trial_id": "str", "env_key": "str"}
    for o in OPTIONS:
        if len(o.types) == 1 and o.types[0] in (bool, int, float, str):
            kinds[o.name] = o.types[0].__name__
        else:  # e.g. pretrained: bool or str -> JSON keeps both losslessly
            kinds[o.name] = "json"
    kinds.update(status="str", reason="str", started_at="float", finished_at="float")
    for cls in (MeasureResult, ProbeResult, Env):
        for f in dataclasses.fields(cls):
            kinds[f.name] = _kind_of_annotation(str(f.type))
    return kinds


KNOWN_KINDS = _known_kinds()
CONFIG_COLUMNS = tuple(o.name for o in OPTIONS)


def _kind_of_value(value: Any) -> str:
    """Kind of a column nobody declared (a field added later), from its first value."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "json"


def _encode(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "json":
        return json.dumps(value, sort_keys=True)
    if kind == "bool":
        return int(bool(value))
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if math.isnan(value) else float(value)
    return value


def _decode(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "json":
        return json.loads(value)
    if kind == "bool":
        return bool(value)
    return value


class ResultStore:
    """Read-write access to a results database; the sweep driver is its only writer.

    Args:
        path: the SQLite file; parent folders are created.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we open and commit every transaction ourselves.
        self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed trial survives even a power cut, not only a killed process; one fsync
        # per finished trial is noise next to the trial itself.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS columns (name TEXT PRIMARY KEY, kind TEXT NOT NULL, position INTEGER)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS trials (trial_id TEXT NOT NULL, env_key TEXT NOT NULL, "
            "PRIMARY KEY (trial_id, env_key))"
        )
        self._columns = self._read_columns()
        # Every declared column exists from the start, so even an empty store loads with its schema.
        self._ensure_columns(dict.fromkeys(KNOWN_KINDS))
        self._db.execute("COMMIT")

    # --- columns ---------------------------------------------------------------------------

    def _read_columns(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT name, kind FROM columns ORDER BY position").fetchall())

    def _ensure_columns(self, row: dict[str, Any]) -> None:
        """Add the row's new columns (inside the caller's transaction)."""
        for name, value in row.items():
            if name in self._columns:
                continue
            kind = KNOWN_KINDS.get(name) or _kind_of_value(value)
            if name not in ("trial_id", "env_key"):  # created with the table
                self._db.execute(f'ALTER TABLE trials ADD COLUMN "{name}" {_SQL_TYPE[kind]}')
            self._db.execute(
                "INSERT INTO columns (name, kind, position) VALUES (?, ?, ?)", (name, kind, len(self._columns))
            )
            self._columns[name] = kind

    # --- trials ----------------------------------------------------------------------------

    def write(self, record) -> None:
        """Store one finished trial, replacing an earlier row of the same trial and environment.

        Args:
            record: a `suite.core.records.TrialRecord`.

        Raises:
            ValueError: the record's status is not one of `records.STATUSES`.
        """
        if record.status not in STATUSES:
            raise ValueError(f"status {record.status!r} is not one of {', '.join(STATUSES)}")
        row = record.flat()
        for name in row:
            if '"' in name:
                raise ValueError(f"column name {name!r} must not contain a double quote")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._ensure_columns(row)
            names = list(row)
            values = [_encode(row[n], self._columns[n]) for n in names]
            cols = ", ".join(f'"{n}"' for n in names)
            marks = ", ".join("?" for _ in names)
            # REPLACE deletes the old (trial_id, env_key) row first: a rerun never duplicates.
            self._db.execute(f"INSERT OR REPLACE INTO trials ({cols}) VALUES ({marks})", values)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._columns = self._read_columns()  # forget columns the rollback removed
            raise

    def done_ids(self, env_key: str, statuses: Iterable[str] | None = None) -> set[str]:
        """Trial ids already stored for `env_key`, optionally only those with one of `statuses`."""
        sql, args = "SELECT trial_id FROM trials WHERE env_key = ?", [env_key]
        if statuses is not None:
            statuses = list(statuses)
            unknown = [s for s in statuses if s not in STATUSES]
            if unknown:
                raise ValueError(f"unknown status {unknown[0]!r}; statuses are {', '.join(STATUSES)}")
            if not statuses:
                return set()
            sql += f" AND status IN ({', '.join('?' for _ in statuses)})"
            args += statuses
        return {r[0] for r in self._db.execute(sql, args)}

    # --- meta ------------------------------------------------------------------------------

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under `key` (replacing any earlier one)."""
        try:
            text = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise ValueError(f"meta {key!r}: value must be JSON-serialisable ({e})") from None
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, text))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def stored_trials(self) -> dict[str, dict[str, Any]]:
        """trial_id -> its configuration (the `Trial` fields), over every environment."""
        names = [n for n in CONFIG_COLUMNS if n in self._columns]
        cols = ", ".join(f'"{n}"' for n in ["trial_id", *names])
        rows = self._db.execute(f"SELECT {cols} FROM trials").fetchall()
        return {r[0]: {n: _decode(v, self._columns[n]) for n, v in zip(names, r[1:])} for r in rows}

    def close(self) -> None:
        """Close; the finished file goes back to a plain rollback journal, so readers of a read-only
        copy never need to create `-wal`/`-shm` files beside it (skipped while a reader holds it)."""
        try:
            self._db.execute("PRAGMA journal_mode=DELETE")
        except sqlite3.OperationalError:  # a report is reading it right now: it stays in WAL mode
            pass
        self._db.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StoreLocked(SuiteError):
    """Another process is writing this results store (its PID is in the message)."""


class StoreLock:
    """An exclusive lock on a results store for one writer (a sweep), held until `release` or exit.

    A lock file beside the database (`results.sqlite.lock`) holds the owner's PID; the lock itself is
    `flock`, so the kernel drops it when the owner dies (even by `kill -9`): no stale lock to clean up.

    Raises:
        StoreLocked: another live process holds it.
    """

    def __init__(self, db_path: str | Path):
        self.path = Path(str(db_path) + ".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise StoreLocked(
                f"{db_path} is being written by another `suite run` (PID {owner}); wait for it to finish "
                "(then --resume runs what it left), stop it, or give this run another --out"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

    def __enter__(self) -> "StoreLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --- reading ---------------------------------------------------------------------------------


def resolve_path(path: str | Path) -> Path:
    """The database file for `path`: the file itself, or `results.sqlite` inside a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / DEFAULT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no results store at {path} (expected the {DEFAULT_NAME} written by `suite run`)")
    return path


def _connect_readonly(path: str | Path) -> tuple[Path, sqlite3.Connection]:
    path = resolve_path(path)
    # Read-only URI: reading never creates or alters a file (and works while a sweep writes).
    db = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=30.0)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        db.close()
        raise SuiteError(f"{path} is not a results store: {e}") from None
    if not {"trials", "columns", "meta"} <= tables:
        db.close()
        raise SuiteError(
            f"{path} is not a results store: it has no 'trials'/'columns'/'meta' tables "
            f"(expected the {DEFAULT_NAME} written by `suite run`)"
        )
    return path, db


def _damaged(path: Path, exc: sqlite3.DatabaseError) -> SuiteError:
    return SuiteError(f"{path} is damaged and cannot be read ({exc}); restore it from a copy, or rerun the "
                      "experiment into a new --out (`sqlite3 FILE .recover` may save the rows that are intact)")


def load_meta(path: str | Path) -> dict[str, Any]:
    """Every meta entry of a results store, as a dict."""
    path, db = _connect_readonly(path)
    try:
        return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta ORDER BY key")}
    except sqlite3.DatabaseError as e:
        raise _damaged(path, e) from None
    finally:
        db.close()


def load_results(path: str | Path):
    """Every stored trial as a pandas DataFrame, one row per (trial_id, env_key).

    Types come back as written: config columns (the `Trial` fields) hold their Python values
    (`None` stays `None`, `pretrained` is bool or str); result bools are bool (object with None
    when some are missing); numeric results are numbers with NaN where missing. Rows are sorted
    by environment, model and trial_id, so the same database always gives the same frame.

    Args:
        path: a results.sqlite file, or the folder that holds one.

    Raises:
        FileNotFoundError / SuiteError: naming the path, when it is not a results store.
    """
    import pandas as pd  # only when reading: the sweep driver writes without ever loading pandas

    path, db = _connect_readonly(path)
    try:
        kinds = dict(db.execute("SELECT name, kind FROM columns ORDER BY position").fetchall())
        names = list(kinds)
        cols = ", ".join(f'"{n}"' for n in names)
        order = ", ".join(f'"{c}"' for c in ("env_key", "model", "trial_id") if c in kinds)
        rows = db.execute(f"SELECT {cols} FROM trials ORDER BY {order}").fetchall()
    except sqlite3.DatabaseError as e:
        raise _damaged(path, e) from None
    finally:
        db.close()
    data = {}
    for i, name in enumerate(names):
        kind = kinds[name]
        try:
            values = [_decode(r[i], kind) for r in rows]
            data[name] = _column(values, kind, config=name in CONFIG_COLUMNS, pd=pd)
        except (TypeError, ValueError) as e:  # a value edited by hand into a typed column ('abc' as a float)
            bad = next((r[i] for r in rows if not _fits(r[i], kind)), "?")
            raise SuiteError(f"{path}: column {name!r} ({kind}) holds {bad!r}, which is not a {kind} ({e}); "
                             "the store was changed outside the suite: restore it from a copy, or rerun the "
                             "experiment into a new --out") from None
    return pd.DataFrame(data, columns=names)


def _fits(value: Any, kind: str) -> bool:
    """Whether a stored value can be read as `kind` (None always can)."""
    if value is None or kind not in ("int", "float"):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _column(values: list, kind: str, *, config: bool, pd):
    """A typed Series for one column's decoded values."""
    has_none = any(v is None for v in values)
    if kind == "bool":
        return pd.Series(values, dtype=object if has_none else bool)
    if kind in ("int", "float") and not config:
        if kind == "int" and not has_none:
            return pd.Series(values, dtype="int64")
        return pd.Series([float("nan") if v is None else v for v in values], dtype="float64")
    if kind == "int" and not has_none:
        return pd.Series(values, dtype="int64")
    if kind == "float" and not has_none:
        return pd.Series(values, dtype="float64")
    # Strings, JSON and config values with None: keep the exact Python objects.
    return pd.Series(values, dtype=object)
