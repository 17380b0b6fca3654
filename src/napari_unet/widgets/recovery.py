"""The widget's recovery file: the model trained in the widget, kept on disk until the user saves it.

While the widget trains, the model trained so far is written every :data:`RECOVERY_INTERVAL` seconds (the default
of the command line's ``--checkpoint-every``) and once more when training ends, to one file in the user's state
folder (``platformdirs.user_state_dir("napari-unet")``, or ``$NAPARI_UNET_CONFIG_DIR`` as for the remembered
settings): a crash, a killed napari or a viewer closed with an unsaved model loses at most that interval of
training. Each write is ``Trainer.save`` (``io.save_model``: atomic, so the file holds the previous model or the new
one, never part of one) on a thread of its own, one write at a time and in order, so the GUI thread never waits for
one: measured with the default model (0.5 M parameters, 2 MB), a write takes 0.04 s and the event loop's longest
pause during one was 13 ms, against 8 ms idle. Saving the model the file holds (*Save...*) removes the file; loading
or saving another model keeps it (the unsaved model stays recoverable until the next training replaces it). When a
widget opens and the file exists, the model panel offers it with a button (never a dialog that blocks).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qtpy.QtCore import QObject, QTimer, Signal

from ..training_settings import CHECKPOINT_SECONDS
from .remembered import CONFIG_DIR_VARIABLE

FILE_NAME = "recovery.safetensors"
RECOVERY_INTERVAL = CHECKPOINT_SECONDS
"""Seconds between writes of the recovery file while the widget trains (the CLI's checkpoint interval)."""
RECORD_KEY = "recovery"
"""The recovery file's metadata entry (when it was written, the iterations of that training run, the image); a
recovered model drops it, so it never reaches a model file the user saves."""


def recovery_path() -> Path:
    """Where the widget keeps its recovery file."""
    folder = os.environ.get(CONFIG_DIR_VARIABLE)
    if not folder:
        import platformdirs

        folder = platformdirs.user_state_dir("napari-unet", appauthor=False)
    return Path(folder) / FILE_NAME


@dataclass(frozen=True)
class RecoveryOffer:
    """A recovery file found on disk: when it was written, after how many iterations, on which image."""

    path: Path
    saved: float
    """When the file was written (seconds since the epoch)."""
    iterations: int | None
    image: str | None

    def describe(self) -> str:
        """The offer as the model panel's button says it."""
        details = [time.strftime("%Y-%m-%d %H:%M", time.localtime(self.saved))]
        if self.iterations is not None:
            details.append(f"{self.iterations} iterations")
        on = f" on '{self.image}'" if self.image else ""
        return f"Recover last unsaved model ({', '.join(details)}{on})"


def read_offer(path: Path) -> RecoveryOffer | None:
    """The recovery file at ``path`` described from its header (the weights are not read), or None when there is
    none or it is not a readable napari-unet model file (the next training replaces it)."""
    import json

    from safetensors import safe_open

    from ..io import METADATA_KEY

    try:
        modified = path.stat().st_mtime
        with safe_open(str(path), framework="numpy") as f:
            record = json.loads((f.metadata() or {})[METADATA_KEY])
    except Exception:  # missing, unreadable, or damaged (safetensors and json raise kinds of their own)
        return None
    entry = record.get(RECORD_KEY) if isinstance(record, dict) else None
    entry = entry if isinstance(entry, dict) else {}
    saved, iterations, image = entry.get("saved"), entry.get("iterations"), entry.get("image")
    return RecoveryOffer(
        path,
        float(saved) if isinstance(saved, (int, float)) else modified,
        iterations if isinstance(iterations, int) else None,
        image if isinstance(image, str) else None,
    )


class RecoveryFile(QObject):
    """The recovery file of a ``UNetWidget``: :meth:`start` when a training run has its trainer, :meth:`finish`
    when it ends, :meth:`discard` when the model is saved, :meth:`offer` and :meth:`load` to recover. Writes and
    removals run on one writer thread, in the order asked; ``failed`` carries the message of one that failed (the
    widget shows it; training goes on). ``interval``: seconds between writes while training."""

    failed = Signal(str)

    def __init__(self, parent=None, path: Path | None = None):
        super().__init__(parent)
        self.path = path or recovery_path()
        self.interval = RECOVERY_INTERVAL
        self.model = None
        """The model whose weights the file holds (the last training's, or the one recovered from it), or None:
        saving another model leaves the file."""
        self._trainer = None
        self._image: str | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-unet-recovery")
        self._last = None  # the last write or removal asked for (done: all of them are)
        self._timer = QTimer(self)
        self._timer.timeout.connect(self.checkpoint)

    def offer(self) -> RecoveryOffer | None:
        """The recovery file on disk, if there is one, once the writes asked for are done."""
        self.wait()
        return read_offer(self.path)

    def start(self, trainer, image: str | None = None) -> None:
        """Write ``trainer``'s model every ``interval`` seconds from now on (``image``: what it trains on)."""
        self._trainer, self._image = trainer, image
        self._timer.start(max(1, int(self.interval * 1000)))

    def finish(self) -> None:
        """The training run ended: write its final model (unsaved so far), unless it did not train at all."""
        self._timer.stop()
        trainer, self._trainer = self._trainer, None
        if trainer is not None and trainer.iteration > 0:
            self.model = trainer.model
            self._submit(self._write, trainer, self._image)

    def discard(self) -> None:
        """Remove the recovery file (the model was saved), after any write already asked for."""
        self.model = None
        self._submit(self._remove)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the writes and removals asked for so far are done."""
        if self._last is not None:
            self._last.result(timeout)

    def load(self) -> tuple:
        """``(model, metadata)`` of the recovery file (``io.load_model``; its errors), without the recovery entry."""
        from ..io import load_model

        self.wait()
        model, metadata = load_model(self.path)
        metadata.pop(RECORD_KEY, None)
        self.model = model
        return model, metadata

    def checkpoint(self) -> None:
        """Write the running trainer's model now (on the writer thread; the caller does not wait); skipped while
        the previous write still runs (a disk slower than the interval does not pile writes up)."""
        if self._trainer is not None and (self._last is None or self._last.done()):
            self._submit(self._write, self._trainer, self._image)

    def _submit(self, task, *args) -> None:
        self._last = self._writer.submit(task, *args)

    def _write(self, trainer, image: str | None) -> None:
        record = {"saved": time.time(), "iterations": trainer.iteration, "image": image}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            trainer.save(self.path, {RECORD_KEY: record})
        except Exception as e:  # a full disk, a read-only home, a torch error: said, and training goes on
            self.failed.emit(f"cannot write the recovery file {self.path}: {e}")

    def _remove(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as e:
            self.failed.emit(f"cannot remove the recovery file {self.path}: {e.strerror or e}")
