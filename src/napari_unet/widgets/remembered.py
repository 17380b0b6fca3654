"""The dock widget's settings remembered between napari runs: a small JSON file in the user's configuration folder
(``platformdirs.user_config_dir("napari-unet")``, or ``$NAPARI_UNET_CONFIG_DIR``), written atomically on every
change. A missing, unreadable or malformed file means the defaults; values the widget cannot take are skipped
where they are shown, so an old file never stops the widget from opening."""

from __future__ import annotations

import json
import os
from pathlib import Path

from qtpy.QtCore import QObject, QTimer

FILE_NAME = "widget.json"
WRITE_DELAY_MS = 500
"""Settings are written this long after the last change."""
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


class SettingsMemory(QObject):
    """What a ``UNetWidget`` remembers: the training and prediction forms, the device, the class names and the live
    preview choice. Restores them from :func:`settings_path` at construction and writes them back there (the same
    file, even if the variable changes later) shortly after every change."""

    def __init__(self, widget):
        super().__init__(widget)
        self.widget = widget
        self.path = settings_path()
        self._restore(load_settings(self.path))
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(WRITE_DELAY_MS)
        self._timer.timeout.connect(self.write)
        for changed in (
            widget.training.basic.changed,
            widget.training.form.changed,
            widget.prediction.form.changed,
            widget.device_combo.currentTextChanged,
            widget.data.class_names_edit.textChanged,
            widget.training.preview_check.toggled,
        ):
            changed.connect(self._later)

    def settings(self) -> dict:
        """The settings shown now, as they are written."""
        w = self.widget
        return {
            "training": w.training.values(),
            "prediction": w.prediction.values(),
            "widget": {
                "device": w.device_combo.currentText(),
                "class_names": w.data.class_names_edit.text(),
                "live_preview": w.training.preview_check.isChecked(),
            },
        }

    def _restore(self, remembered: dict) -> None:
        from ..devices import DEVICE_CHOICES

        w = self.widget
        refused = w.training.set_values(remembered.get("training", {}))
        refused += w.prediction.set_values(remembered.get("prediction", {}))
        if refused:  # e.g. a choice an earlier version offered: say so rather than change a recipe silently
            from napari.utils.notifications import show_info

            show_info(
                f"U-Net: remembered {', '.join(refused)} not restored (not offered by this version, or out of range): "
                "the default is shown"
            )
        shown = remembered.get("widget", {})
        if shown.get("device") in DEVICE_CHOICES:
            w.device_combo.setCurrentText(shown["device"])
        if isinstance(shown.get("class_names"), str):
            w.data.class_names_edit.setText(shown["class_names"])
        if isinstance(shown.get("live_preview"), bool):
            w.training.preview_check.setChecked(shown["live_preview"])

    def _later(self, *args) -> None:  # psygnal passes the new value; a slot of our own takes any
        self._timer.start()

    def write(self) -> None:
        """Write the settings shown now (also done shortly after each change)."""
        self._timer.stop()
        save_settings(self.settings(), self.path)

    def flush(self) -> None:
        """Write now if a change is waiting (the widget closes)."""
        if self._timer.isActive():
            self.write()
