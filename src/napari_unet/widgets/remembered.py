"""The dock widget's settings remembered between napari runs: a small JSON file in the user's configuration folder
(``platformdirs.user_config_dir("napari-unet")``, or ``$NAPARI_UNET_CONFIG_DIR``), written atomically on every
change. A missing, unreadable or malformed file means the defaults; values the widget cannot take are skipped
where they are shown, so an old file never stops the widget from opening."""

from __future__ import annotations

import json
import os
from pathlib import Path

FILE_NAME = "widget.json"
CONFIG_DIR_VARIABLE = "NAPARI_UNET_CONFIG_DIR"


def settings_path() -> Path:
    """Where the widget's settings are kept."""
    folder = os.environ.get(CONFIG_DIR_VARIABLE)
    if not folder:
        import platformdirs

        folder = platformdirs.user_config_dir("napari-unet", appauthor=False)
    return Path(folder) / FILE_NAME


def load_settings(path: Path | None = None) -> dict:
    """The remembered settings (section name -> values) in ``path`` (default :func:`settings_path`), ``{}`` when
    there are none or the file is unusable."""
    try:
        loaded = json.loads((path or settings_path()).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in loaded.items() if isinstance(v, dict)} if isinstance(loaded, dict) else {}


def save_settings(settings: dict, path: Path | None = None) -> None:
    """Write ``settings`` (JSON-serialisable sections) to ``path`` (default :func:`settings_path`); a failure to
    write (read-only home) is ignored: remembering is a convenience, never a reason for an error."""
    from ..io import atomic_write

    path = path or settings_path()
    text = json.dumps(settings, indent=1, sort_keys=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda target: Path(target).write_text(text, encoding="utf-8"))
    except OSError:
        pass
