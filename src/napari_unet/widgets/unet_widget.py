"""The "U-Net" dock widget: the panels composed, the Train / Stop / Predict / Segment all buttons, and the worker
that runs one of them at a time.

Threading: only the main thread touches layers and widgets. Training and prediction run on
``napari.qt.threading`` workers (generators in :mod:`napari_unet._workers`) that get views of the layers' data and
yield typed messages, dispatched here with ``match``. Output layers carry ``metadata["napari_unet"] = {"role": ...,
"source": <image name>}``; re-running replaces the data of those layers only, never of layers the user made.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from pathlib import Path

from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, Signal
from qtpy.QtWidgets import QComboBox, QFormLayout, QGridLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from .._layers import layer_data, output_layer
from .._workers import (
    ImageDone,
    ImageFailed,
    ImageStarted,
    LabelsRefused,
    PredictJob,
    Preview,
    Progress,
    Ready,
    dataset_train_steps,
    predict_steps,
    train_steps,
)
from ..devices import DEVICE_CHOICES, default_cpu_threads, describe_device
from ..predict import model_class_ids
from .data_panel import DataPanel
from .layer_watch import LayerWatch
from .live_training import LiveTraining
from .loss_plot import LossPlot
from .model_panel import ModelPanel
from .prediction_panel import PredictionPanel
from .recovery import RecoveryFile
from .remembered import SettingsMemory
from .settings_scroll import SettingsScroll
from .training_panel import TrainingPanel

PREVIEW_INTERVAL = 3.0
"""Seconds between live previews (at least; slow previews space themselves out)."""
STATUS_INTERVAL = 0.2
"""Seconds between updates of the status text, progress bar and preview region while training."""
DOMAIN_KEY = "napari_unet_domain"
"""Output layers' ``metadata`` key of the figures of their image's domain check (``domain.DomainCheck.as_metadata``;
beside the ``"napari_unet"`` role marker, which ``_layers.find_output`` compares whole)."""


class _Relay(QObject):
    """Carries per-tile progress from a worker thread to the main thread (a queued Qt signal)."""

    tiles = Signal(int, int)


class UNetWidget(QWidget):
    """Dock widget for training a U-Net from painted labels and segmenting images with it.

    ``data``, ``model_panel``, ``training`` and ``prediction`` are its panels; ``model``/``metadata`` the current
    network (CPU, eval mode) and its metadata; ``busy`` whether a worker runs; ``last_error`` the message of the
    last failure (also shown as a napari notification)."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.model = None
        self.metadata: dict | None = None
        self._model_origin = ""
        self._worker = None
        self._task: str | None = None
        self._stop = threading.Event()
        self._resume = threading.Event()
        self._last_status = 0.0
        self._froze_gc = False
        self._run: LiveTraining | None = None
        self._pbar = None
        self._window = None
        self._predict_sources: dict = {}
        self._predict_outputs: dict[int, list] = {}  # id(source layer): the output layers this prediction showed
        self._watch: LayerWatch | None = None
        self._relay = _Relay(self)
        self._relay.tiles.connect(self._on_tiles)
        self.last_error: str | None = None
        self.validation_text = ""
        """The last epoch's validation scores of a dataset training, as the status line showed them."""
        self.last_warning: str | None = None
        """The last out-of-memory retry of a worker (``memory.OutOfMemoryRetry``), also a napari notification."""
        self.preview_interval = PREVIEW_INTERVAL
        """Seconds between live previews while training."""
        self._build_ui()
        self.memory = SettingsMemory(self)
        """The settings remembered between napari runs (``remembered``): restored now, written on changes."""
        self.recovery = RecoveryFile(self)
        """The unsaved model trained here, kept on disk (``recovery``); an earlier one is offered now."""
        self.recovery.failed.connect(lambda message: show_warning(f"U-Net: {message}"))
        self._offer_recovery()
        self._show_device()
        self._set_busy(None)

    # --- layout -----------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        root = QVBoxLayout(self)
        self.data = DataPanel(self.viewer)
        self.model_panel = ModelPanel()
        self.model_panel.load_requested.connect(self.load_model)
        self.model_panel.save_requested.connect(self.save_model)
        self.model_panel.export_requested.connect(self.export_bioimageio)
        self.model_panel.recover_requested.connect(self.recover_model)
        self.model_panel.discard_recovery_requested.connect(self.discard_recovery)
        self.training = TrainingPanel()
        self.prediction = PredictionPanel()
        device_row = QFormLayout()
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICE_CHOICES)
        self.device_combo.setToolTip("Where Train and Predict run; auto: CUDA GPU, then Apple MPS, then CPU")
        self.device_label = QLabel()
        self.device_label.setToolTip("The device that runs, for the choice above")
        self.device_combo.currentTextChanged.connect(self._show_device)
        device_row.addRow("Device", self.device_combo)
        device_row.addRow("Runs on", self.device_label)
        settings = QWidget()
        settings_layout = QVBoxLayout(settings)
        settings_layout.setContentsMargins(0, 0, 0, 0)
        for panel in (self.data, self.model_panel, self.training, self.prediction):
            settings_layout.addWidget(panel)
        settings_layout.addLayout(device_row)
        settings_layout.addStretch(1)
        self.settings_area = SettingsScroll(settings)
        """The panels above the buttons, scrolled when the dock is shorter than they are (a laptop screen, the
        *Advanced settings* open), so the buttons, status and loss curve below stay in view."""
        root.addWidget(self.settings_area, 1)

        buttons = QGridLayout()
        self.train_button = QPushButton("Train")
        self.train_button.clicked.connect(self.train)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop)
        self.predict_button = QPushButton("Predict")
        self.predict_button.setToolTip("Segment the chosen image with the current model")
        self.predict_button.clicked.connect(self.predict)
        self.segment_all_button = QPushButton("Segment all")
        self.segment_all_button.setToolTip("Segment every open image layer that fits the model")
        self.segment_all_button.clicked.connect(self.segment_all)
        buttons.addWidget(self.train_button, 0, 0)
        buttons.addWidget(self.stop_button, 0, 1)
        buttons.addWidget(self.predict_button, 1, 0)
        buttons.addWidget(self.segment_all_button, 1, 1)
        self.dataset_button = QPushButton("Train from a dataset folder...")
        self.dataset_button.setToolTip(
            "Train on a folder of annotated images (VOC layout, or images/ + masks/; mask value k is class k, 255 no "
            "label), epochs validated on held-out images; the best model by mean IoU is kept"
        )
        self.dataset_button.clicked.connect(self.choose_dataset)
        buttons.addWidget(self.dataset_button, 2, 0, 1, 2)
        root.addLayout(buttons)
        self.status_label = QLabel("Idle")
        self.status_label.setWordWrap(True)
        root.addWidget(self.status_label)
        self.loss_plot = LossPlot()
        root.addWidget(self.loss_plot)

    def _show_device(self, *args) -> None:
        """Say which device the choice runs on (``devices.describe_device``), e.g. ``cpu, 1 thread``."""
        try:
            self.device_label.setText(describe_device(self.device_combo.currentText(), default_cpu_threads()))
        except ValueError as e:
            self.device_label.setText(f"not available: {e}")

    # --- model ------------------------------------------------------------------------------------

    def set_model(self, model, metadata: dict, origin: str) -> None:
        """Make ``model`` (with its ``metadata``) the current model; later Train calls fine-tune it."""
        self.model, self.metadata, self._model_origin = model, dict(metadata), origin
        self._show_model()
        self.model_panel.finetune_check.setChecked(True)

    def _show_model(self) -> None:
        self.model_panel.show_model(self.model, self.metadata, self._model_origin)
        self.model_panel.set_idle(not self.busy, self.model is not None)

    def load_model(self, path) -> None:
        """Load a model file (see :func:`napari_unet.io.load_model`); any failure becomes a notification, never
        an exception out of the button's slot."""
        from ..io import load_model

        try:
            model, metadata = load_model(path)
        except Exception as e:  # ModelFileError for a bad file; whatever else goes wrong: the current model stays
            show_error(f"U-Net: cannot load {path}: {e}")
            return
        self.set_model(model, metadata, Path(path).name)
        show_info(f"U-Net: loaded {path}")

    def save_model(self, path) -> Path | None:
        """Save the current model and its metadata (atomic write)."""
        from ..io import save_model

        if self.model is None:
            show_warning("U-Net: there is no model to save yet: Train first")
            return None
        try:
            written = save_model(self.model, path, self.metadata)
        except OSError as e:
            show_error(f"U-Net: cannot save the model to {path}: {e}")
            return None
        self._model_origin = Path(written).name
        self._show_model()
        if self.model is self.recovery.model:
            self.discard_recovery()  # the model is safe in its file now
        show_info(f"U-Net: model saved to {written}")
        return Path(written)

    def _offer_recovery(self) -> None:
        offer = self.recovery.offer()
        self.model_panel.show_recovery(offer.describe() if offer is not None else None)

    def recover_model(self) -> None:
        """Make the model of the recovery file the current one (button "Recover last unsaved model"); it stays
        there until the model is saved."""
        if self.busy:
            return
        try:
            model, metadata = self.recovery.load()
        except (OSError, ValueError) as e:  # ModelFileError is a ValueError
            show_error(f"U-Net: cannot recover the unsaved model: {e}")
            return
        self.model_panel.show_recovery(None)
        self.set_model(model, metadata, "recovered, not saved")
        show_info("U-Net: the unsaved model is back; Save... keeps it")

    def discard_recovery(self) -> None:
        """Delete the recovery file and its offer (button "Discard"; done too when the model is saved)."""
        self.recovery.discard()
        self.model_panel.show_recovery(None)

    def export_bioimageio(self, path) -> None:
        """Write the current model as a BioImage.IO package at ``path`` (a zip) on a worker, with the chosen image
        as its test input (button "Export...")."""
        from napari.qt.threading import create_worker

        if self.busy:
            return
        image = self.data.image_layer
        problem = (
            "there is no model to export yet: Train first"
            if self.model is None
            else "choose an image layer: a crop of it becomes the package's test input"
            if image is None
            else self.fit_problem(image)
        )
        if problem:
            self._refuse(problem)
            return
        self.last_error = None
        name = Path(path).stem
        # The export reads the one crop it needs on the worker.
        worker = create_worker(
            _export_package,
            self.model,
            dict(self.metadata),
            self.data.input_image(image),
            Path(path),
            name,
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.returned.connect(self._on_exported)
        self.status_label.setText(f"Exporting {name} for BioImage.IO...")
        self._start("export", worker, 1, "U-Net BioImage.IO export")

    def _on_exported(self, path) -> None:
        self.status_label.setText(f"Exported to {path}")
        show_info(f"U-Net: BioImage.IO package written to {path}")

    # --- state ------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether a training, prediction or export worker is running."""
        return self._task is not None

    @property
    def previews_shown(self) -> int:
        """Live previews pushed to the output layers during the current (or last) training."""
        return self._run.previews_shown if self._run is not None else 0

    @property
    def _trainer(self):
        """The running trainer, once the training worker has built it (else None)."""
        return self._run.trainer if self._run is not None else None

    def _set_busy(self, task: str | None) -> None:
        self._task = task
        idle = task is None
        for button in (
            self.train_button,
            self.dataset_button,
            self.predict_button,
            self.segment_all_button,
            self.data.new_labels_button,
            self.data.axes_button,  # it replaces layers a worker may be reading
        ):
            button.setEnabled(idle)
        self.stop_button.setEnabled(not idle)
        self.model_panel.set_idle(idle, self.model is not None)
        if idle:
            self._worker = None

    def _start(self, task: str, worker, total: int, description: str) -> None:
        self._stop.clear()
        self._freeze_gc()
        self._set_busy(task)
        self._worker = worker
        self._pbar = progress(total=total, desc=description)
        worker.errored.connect(self._on_error)
        worker.warned.connect(self._on_warned)
        worker.finished.connect(self._on_finished)
        worker.start()

    def stop(self) -> None:
        """Stop the running training or prediction; a trained model is kept."""
        self._stop.set()
        self._resume.set()
        if self._trainer is not None:
            self._trainer.request_stop()
        if self.busy:
            self.status_label.setText(f"Stopping {self._task}...")

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop any worker and wait for it (used when the widget or the viewer closes)."""
        worker = self._worker
        self.stop()
        if worker is None:
            return True
        for signal in (worker.yielded, worker.returned, worker.errored, worker.finished):
            with contextlib.suppress(TypeError, RuntimeError):
                signal.disconnect()
        worker.quit()
        deadline = time.monotonic() + timeout
        while worker.is_running and time.monotonic() < deadline:
            time.sleep(0.02)
        self._on_finished()
        return not worker.is_running

    def closeEvent(self, event):  # noqa: N802 (Qt API)
        self.memory.flush()
        self.shutdown()
        super().closeEvent(event)

    def showEvent(self, event):  # noqa: N802 (Qt API)
        # Watch the top-level window (the napari main window once docked): closing it stops our worker.
        window = self.window()
        if window is not self and window is not self._window:
            if self._window is not None:
                self._window.removeEventFilter(self)
            window.installEventFilter(self)
            self._window = window
        super().showEvent(event)

    def event(self, event):
        # napari's dock close button takes the widget out of its dock (parent None): stop our worker.
        if event.type() == QEvent.Type.ParentChange and self.parent() is None and self.busy:
            self.shutdown()
        return super().event(event)

    def eventFilter(self, watched, event):  # noqa: N802 (Qt API)
        # Qt still calls this while the viewer closes and Python has already cleared this widget's attributes: an
        # exception here would abort the process (PyQt6 without napari's exception hook), so nothing is assumed.
        if event.type() == QEvent.Type.Close and watched is getattr(self, "_window", None) and self.busy:
            self.shutdown()
        return super().eventFilter(watched, event)

    def _refuse(self, message: str) -> None:
        """A button that cannot start (no model, a bad setting, an image that does not fit): the message as a
        notification, on the status line and as ``last_error``, so an earlier failure's text does not stay there."""
        self.last_error = f"U-Net: {message}"
        show_error(self.last_error)
        self.status_label.setText(self.last_error)

    def _on_error(self, exc: Exception) -> None:
        what = {"train": "training", "predict": "prediction", "export": "export"}.get(self._task, "work")
        self.last_error = f"U-Net {what} failed: {exc}"
        if self._task == "train" and self._run is not None:
            self._run.failed()
        show_error(self.last_error)
        self.status_label.setText(self.last_error)

    def _on_warned(self, warning: tuple) -> None:
        """A warning from the worker (napari shows it as a notification): an out-of-memory retry is also the status."""
        from ..memory import OutOfMemoryRetry

        message, category = warning[0], warning[1]
        if issubclass(category, OutOfMemoryRetry):
            self.last_warning = f"U-Net: {message}"
            self.status_label.setText(self.last_warning)

    def _on_finished(self) -> None:
        if self._task == "predict" and self._stop.is_set():
            self.status_label.setText("Prediction stopped")
            show_info("U-Net: prediction stopped; the images finished before it keep their outputs")
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._task == "train" and self._run is not None:  # a prediction or export has no run to end
            self.recovery.finish()
            self._run.end()
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._unfreeze_gc()
        self._set_busy(None)

    def _freeze_gc(self) -> None:
        """Move the objects that exist now out of the garbage collector's view while a worker runs.

        A full collection of napari's + torch's ~400k objects takes ~0.4 s holding the GIL; triggered
        from the worker it froze the GUI for that long. Frozen, a collection scans only new objects.
        Called again when training is prepared (to include what preparing it imported and built).
        Skipped when someone else froze already; :meth:`_unfreeze_gc` undoes it when the worker ends.
        """
        if self._froze_gc or gc.get_freeze_count() == 0:
            gc.freeze()
            self._froze_gc = True

    def _unfreeze_gc(self) -> None:
        if self._froze_gc:
            gc.unfreeze()
            self._froze_gc = False

    # --- training ---------------------------------------------------------------------------------

    def train(self) -> None:
        """Start training on the chosen image and labels (button "Train")."""
        from napari.qt.threading import create_worker

        if self.busy:
            return
        image, labels = self.data.image_layer, self.data.labels_layer
        finetune = self.model_panel.finetune_check.isChecked() and self.model is not None
        problem = self.data.training_problem(image, labels, self.model.config if finetune else None)
        if problem:
            self._refuse(problem)
            return
        image = self.data.input_layers(image)[0]  # a channel group's previews and results go with its first layer
        try:
            settings = self.training.settings(self.device_combo.currentText())
        except ValueError as e:
            self._refuse(str(e))
            return
        pairs = self.data.training_pairs(image, labels)
        self.last_error = None
        previews = self.training.preview_check.isChecked()
        self._run = run = LiveTraining(self.viewer, image, [lab for _, lab in pairs], previews=previews, parent=self)
        run.follow_view(settings.ndim)
        images = list({id(im): im for im in [image, *(im for im, _ in pairs)]}.values())
        self._watch = LayerWatch(
            self.viewer, "training", images, [lab for _, lab in pairs], on_removed=run.source_removed
        )
        worker = create_worker(
            train_steps,
            [self.data.input_image(im) for im, _ in pairs],
            [layer_data(lab) for _, lab in pairs],  # read on the worker: the GUI never waits for a copy
            settings,
            init=(self.model, self.metadata) if finetune else None,
            class_names=self.data.class_names(labels),
            view=run.view if previews else None,
            preview_interval=self.preview_interval,
            stop=self._stop,
            resume=self._resume,
            dense_labels=self.data.dense_check.isChecked(),
            _start_thread=False,
            _ignore_errors=True,
        )
        self._resume.clear()
        worker.yielded.connect(self._on_train_message)
        worker.returned.connect(self._on_trained)
        self.loss_plot.clear()
        others = f" and {len(pairs) - 1} more image(s)" if len(pairs) > 1 else ""
        self.status_label.setText(f"Preparing training data ({image.name}{others})...")
        self._start("train", worker, int(settings.time_budget), f"U-Net training on {image.name}{others} (seconds)")

    def choose_dataset(self) -> None:
        """Ask for a dataset folder, then :meth:`train_dataset` on it (button "Train from a dataset folder...")."""
        from qtpy.QtWidgets import QFileDialog

        folder = QFileDialog.getExistingDirectory(self, "Dataset folder (images/ + masks/, or VOC)")
        if folder:
            self.train_dataset(folder)

    def train_dataset(self, folder, epochs: int = 50, patience: int | None = 10) -> None:
        """Train on the annotated dataset in ``folder`` on a worker (``_workers.dataset_train_steps``) with the
        training form's settings (its time budget ends it early); each epoch's validation shows on the status line."""
        from napari.qt.threading import create_worker

        if self.busy:
            return
        try:
            settings = self.training.settings(self.device_combo.currentText())
        except ValueError as e:
            self._refuse(str(e))
            return
        self.last_error = None
        self._run = None
        worker = create_worker(
            dataset_train_steps,
            folder,
            settings,
            epochs=epochs,
            patience=patience,
            stop=self._stop,
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.yielded.connect(self._on_dataset_message)
        worker.returned.connect(self._on_trained)
        self.loss_plot.clear()
        self.status_label.setText(f"Opening the dataset {folder}...")
        self._start("train", worker, int(settings.time_budget), f"U-Net training on {Path(folder).name} (seconds)")

    def _on_dataset_message(self, message) -> None:
        match message:
            case Ready(trainer=trainer):
                self._freeze_gc()
                if self._stop.is_set():
                    trainer.request_stop()
                d = trainer.dataset
                self.status_label.setText(
                    f"Training on {len(d.train)} image(s), validating on {len(d.val)}: "
                    f"{trainer.epoch_iterations} iterations per epoch"
                )
            case Progress(event=event) if event.validation is not None:
                v = event.validation
                self.loss_plot.add(event.iteration, event.loss)
                self.validation_text = (
                    f"Epoch {v['epoch']}: validation mean IoU {v['mean_iou']:.3f}, loss {v['val_loss']:.4f}"
                )
                self.status_label.setText(self.validation_text)
            case Progress(event=event) if event.done:
                self._on_progress(event)
            case Progress(event=event):
                self.loss_plot.add(event.iteration, event.loss)
                if self._pbar is not None:
                    self._pbar.n = min(int(event.elapsed), self._pbar.total)
                    self._pbar.update(0)

    def _on_train_message(self, message) -> None:
        run = self._run
        match message:
            case Ready():
                try:
                    self._freeze_gc()
                    if self._stop.is_set():
                        message.trainer.request_stop()
                    run.ready(message)
                    self.model_panel.show_recovery(None)  # this run's model replaces the one offered
                    self.recovery.start(message.trainer, run.image.name)
                finally:
                    self._resume.set()
            case Progress(event=event):
                self._on_progress(event)
            case Preview():
                run.show_preview(message)
            case LabelsRefused():
                run.labels_refused(message)

    def _on_progress(self, event) -> None:
        if event.done:
            self.status_label.setText(
                f"Training ended ({event.reason}) after {event.iteration} iterations, "
                f"{event.elapsed:.1f} s; loss {event.loss:.4f}"
            )
            if event.message:  # e.g. the loss became NaN: what the model keeps
                show_warning(f"U-Net: {event.message}")
            return
        self.loss_plot.add(event.iteration, event.loss)
        now = time.monotonic()
        if now - self._last_status < STATUS_INTERVAL:
            return
        self._last_status = now
        self.status_label.setText(
            f"Training: iteration {event.iteration}, loss {event.loss:.4f}, {event.elapsed:.1f} s"
        )
        if self._pbar is not None:
            self._pbar.n = min(int(event.elapsed), self._pbar.total)
            self._pbar.update(0)
        if self._trainer is not None:
            self._run.follow_view(self._trainer.settings.ndim)

    def _on_trained(self, trainer) -> None:
        record = (trainer.metadata.get("training") or {}).get("history", [{}])[-1]
        if record.get("iterations") == 0:  # stopped before its first step: a new network learned nothing
            kept = "the current model is kept" if self.model is not None else "no model was made"
            show_info(f"U-Net: training stopped before its first iteration; {kept}")
            return
        self.set_model(trainer.model, trainer.metadata, "trained here")
        if record.get("stop_reason") == "stopped":
            show_info(f"U-Net: training stopped after {trainer.iteration} iterations; the model is kept")

    # --- prediction -------------------------------------------------------------------------------

    def predict(self) -> None:
        """Segment the chosen image (button "Predict")."""
        image = self.data.image_layer
        if image is None:
            self._refuse("choose an image layer to predict")
            return
        self._predict([image])

    def segment_all(self) -> None:
        """Segment every open image layer that fits the model (button "Segment all")."""
        if self.model is None:
            self._refuse("there is no model yet: Train or load one first")
            return
        fitting = [
            la
            for la in self.data.image_layers()
            if self.data.input_layers(la)[0] is la and self.fit_problem(la) is None
        ]
        if not fitting:
            self._refuse("no open image fits the model")
            return
        self._predict(fitting)

    def fit_problem(self, layer) -> str | None:
        """Why the current model cannot predict ``layer`` (``DataPanel.fit_problem``), or None."""
        return self.data.fit_problem(layer, self.model.config)

    def _predict(self, layers) -> None:
        from napari.qt.threading import create_worker

        if self.busy:
            return
        if self.model is None:
            self._refuse("there is no model yet: Train or load one first")
            return
        for layer in layers:
            problem = self.fit_problem(layer)
            if problem:
                self._refuse(problem)
                return
        try:
            settings = self.prediction.settings(self.device_combo.currentText())
        except ValueError as e:
            self._refuse(str(e))
            return
        self.last_error = None
        sources = list({id(la): la for la in (self.data.input_layers(layer)[0] for layer in layers)}.values())
        self._predict_sources = {layer.name: layer for layer in sources}
        self._predict_outputs = {}
        self._watch = LayerWatch(self.viewer, "prediction", sources, on_removed=self._prediction_source_removed)
        jobs = [PredictJob(layer.name, self.data.input_image(layer)) for layer in sources]
        worker = create_worker(
            predict_steps,
            self.model,
            self.metadata,
            jobs,
            settings,
            progress=self._relay.tiles.emit,
            stop=self._stop,
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.yielded.connect(self._on_predict_message)
        self.status_label.setText(f"Predicting {len(jobs)} image(s)...")
        self._start("predict", worker, 0, "U-Net prediction")

    def _on_tiles(self, done: int, total: int) -> None:
        if self._pbar is not None and self._task == "predict":
            self._pbar.total = total
            self._pbar.n = done
            self._pbar.update(0)

    def _on_predict_message(self, message) -> None:
        match message:
            case ImageStarted(index=index, count=count, name=name):
                self.status_label.setText(f"Predicting {name} ({index + 1} of {count})...")
                if self._pbar is not None:
                    self._pbar.set_description(f"U-Net: {name} ({index + 1}/{count})")
            case ImageFailed(name=name, reason=reason):  # the other images go on
                self.last_error = f"U-Net prediction of {name} failed: {reason}"
                show_warning(self.last_error)
            case ImageDone(result=result):
                try:
                    self._show_prediction(result)
                except Exception as e:  # napari cannot show it: say so (in a Qt slot it would abort or vanish)
                    self.last_error = f"U-Net: cannot show the prediction of {result.name}: {type(e).__name__}: {e}"
                    show_error(self.last_error)
                    self.status_label.setText(self.last_error)

    def _prediction_source_removed(self, source) -> None:
        """``source`` left the viewer during the prediction: the outputs this run already showed for it go too, as
        the warning says (its prediction is not shown), and none is left without its image."""
        for layer in self._predict_outputs.pop(id(source), []):
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)

    def _show_prediction(self, result) -> None:
        """The output layers of one predicted image, with its domain check (``domain.py``) in their
        ``metadata[DOMAIN_KEY]``; a notification when the image looks unlike the training images."""
        source = self._predict_sources.get(result.name)
        if source is None or source not in self.viewer.layers:
            return
        layers = [output_layer(self.viewer, source, "probabilities", data=result.probabilities)]
        layers.append(
            output_layer(
                self.viewer,
                source,
                "segmentation",
                data=result.segmentation,
                class_ids=model_class_ids(self.model, self.metadata),
                class_names=self.metadata.get("class_names") or (),
            )
        )
        if result.uncertainty is not None:
            layers.append(output_layer(self.viewer, source, "uncertainty", data=result.uncertainty))
        self._predict_outputs.setdefault(id(source), []).extend(layers)
        domain = result.domain
        for layer in layers:  # a layer kept from an earlier prediction drops that prediction's figures
            layer.metadata.pop(DOMAIN_KEY, None)
            if domain is not None:
                layer.metadata[DOMAIN_KEY] = domain.as_metadata()
        self.status_label.setText(f"Predicted {result.name}")
        if domain is not None and domain.unlike:
            show_warning(f"U-Net: {domain.message(result.name, surface='widget')}")
            self.status_label.setText(f"Predicted {result.name}; it looks unlike the training images")


def _export_package(model, metadata: dict, image, path: Path, name: str) -> Path:
    """The export, run on a worker thread (``bioimageio_export`` imports bioimageio.spec, an optional extra)."""
    try:
        from ..bioimageio_export import export_bioimageio
    except ImportError:
        raise RuntimeError('exporting needs bioimageio.spec: pip install "bioimageio.spec>=0.5.12"') from None
    return export_bioimageio(model, metadata, image, path, name=name)
