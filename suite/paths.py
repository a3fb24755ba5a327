"""Where the suite keeps caches. Light: no torch."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(sub: str = "") -> Path:
    """The cache root (`$SUITE_CACHE_DIR`, else `~/.cache/timm-tower-suite`), or a folder below it.

    Holds the device-peak (roofline) measurements and extracted probe features. Safe to delete.
    """
    root = Path(os.environ.get("SUITE_CACHE_DIR") or Path.home() / ".cache" / "timm-tower-suite")
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path
