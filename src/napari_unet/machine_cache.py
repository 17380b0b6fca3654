"""What this machine measured once and keeps: small JSON records in the user cache folder.

Some choices are best made by measuring the machine (does bfloat16 pay on this CPU?) and cost a second to
measure, so they are measured on first use and kept in ``measurements.json`` of
``platformdirs.user_cache_dir("napari-unet")`` (``$NAPARI_UNET_CACHE_DIR`` overrides the folder), under a key that
names everything the answer depends on (the CPU model, the torch version, the thread count...). A missing,
unreadable or malformed file means measuring again; a folder that cannot be written keeps the answer for this
process only. Values are JSON numbers, strings, booleans or lists of them.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

CACHE_DIR_VARIABLE = "NAPARI_UNET_CACHE_DIR"
FILE_NAME = "measurements.json"
MAX_FILE_BYTES = 1 << 20
"""A cache file larger than this is not read (it is not ours, or it is damaged): the machine is measured again."""

_lock = threading.Lock()
_memory: dict[str, object] = {}


def cache_path() -> Path:
    """The measurements file: in ``$NAPARI_UNET_CACHE_DIR`` when set, else in the user cache folder."""
    folder = os.environ.get(CACHE_DIR_VARIABLE)
    if not folder:
        import platformdirs

        folder = platformdirs.user_cache_dir("napari-unet", appauthor=False)
    return Path(folder) / FILE_NAME


def _read(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return {}
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def cached(key: str, measure: Callable[[], object]) -> object:
    """The value kept for ``key``, or ``measure()``'s, kept from then on (in the file and in this process).

    Threads of one process measure a key once; two processes measuring at the same moment both measure and the
    last write wins (the file is replaced atomically, never left half-written).
    """
    with _lock:
        if key in _memory:
            return _memory[key]
        path = cache_path()
        records = _read(path)
        if key in records:
            _memory[key] = records[key]
            return records[key]
        value = measure()
        _memory[key] = value
        records[key] = value
        try:
            from .io import atomic_write

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1), encoding="utf-8"))
        except OSError:
            pass  # a read-only or full cache folder: kept for this process only
        return value


def forget() -> None:
    """Drop what this process keeps in memory (the file stays): the next :func:`cached` reads the file again."""
    with _lock:
        _memory.clear()
