"""Where Fovea keeps its files: ``$FOVEA_HOME`` (default ``~/.fovea``)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("FOVEA_HOME", Path.home() / ".fovea")).expanduser()


def cache_dir() -> Path:
    return home() / "cache"
