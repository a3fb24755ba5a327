"""Where the suite keeps caches, and the check of an output path a user gives. Light: no torch."""
from __future__ import annotations

import os
from pathlib import Path

from suite.core.errors import SuiteError


def cache_dir(sub: str = "") -> Path:
    """The cache root (`$SUITE_CACHE_DIR`, else `~/.cache/timm-tower-suite`), or a folder below it.

    Holds the device-peak (roofline) measurements and extracted probe features. Safe to delete.
    """
    root = Path(os.environ.get("SUITE_CACHE_DIR") or Path.home() / ".cache" / "timm-tower-suite")
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path


_SQLITE_MAGIC = b"SQLite format 3\x00"


def check_output(path: str | Path, *, protect=(), folder_name: str | None = None) -> Path:
    """The file a user's `-o PATH` names, checked before any work; nothing is created or written.

    Args:
        protect: input files the output must never be (the results database, a compared store).
        folder_name: the file written inside PATH when PATH is a folder; None: a folder is refused.

    Raises:
        SuiteError: PATH is a folder (and `folder_name` is None), one of `protect`, an existing SQLite
            database (a results store), or not writable (its folder, or the nearest existing one).
    """
    path = Path(path)
    if path.is_dir():
        if folder_name is None:
            raise SuiteError(f"-o {path} is a folder; give a file name (e.g. {path / 'compare.md'})")
        path = path / folder_name
        if path.is_dir():
            raise SuiteError(f"cannot write {path}: it is a folder; choose another output path")
    for keep in protect:
        if _same_file(path, Path(keep)):
            raise SuiteError(f"-o {path} is an input of this command ({keep}); writing it would destroy it: "
                             "choose another output path")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC:
                raise SuiteError(f"-o {path} is a database (a results store?); it is never overwritten by an "
                                 "output: choose another path")
        if not os.access(path, os.W_OK):
            raise SuiteError(f"cannot write {path}: permission denied; choose another output path")
    parent = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise SuiteError(f"cannot write {path}: {parent} is a file, not a folder; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SuiteError(f"cannot write {path}: the folder {parent} is not writable; choose another output path")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


def output_file(path: str | Path, default_name: str) -> Path:
    """The file to write for a user's `-o PATH`: inside PATH when it is a folder; its folder created.

    Raises:
        SuiteError: a parent of PATH is a file, or the folder cannot be created (the message names it).
    """
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise SuiteError(f"cannot write {path}: {parent} is a file, not a folder; choose another output path")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SuiteError(f"cannot create the folder {path.parent} for {path}: {e.strerror or e}") from None
    return path


def write_text(path: Path, text: str) -> None:
    """Write a text file, a failure (full disk, no permission) raised as a SuiteError naming the file."""
    try:
        path.write_text(text)
    except OSError as e:
        raise SuiteError(f"cannot write {path}: {e.strerror or e}; choose another output path") from None
