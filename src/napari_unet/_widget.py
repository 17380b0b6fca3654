"""The "U-Net" dock widget: paint, Train (with a live preview), Stop, Predict, Segment all.

Threading: only the main thread touches layers and widgets. Training and prediction run on
``napari.qt.threading`` workers (generators in :mod:`napari_unet._workers`) that get copies of the layer
data and yield small messages; the handlers here apply them to layers. Strokes painted while training are
sent to the trainer (a copy of the labels, debounced) with ``Trainer.update_labels``.

Output layers carry ``metadata["napari_unet"] = {"role": ..., "source": <image name>}``; re-running
replaces the data of those layers only, never of layers the user made.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from .arrays import output_array
from .class_ids import labels_dtype
from .predict import PredictionSettings, model_class_ids
from .refine import AUTO, DEFAULT_RADIUS
from ._layers import (
    channel_group,
    image_array,
    image_channels,
    layer_data,
    output_layer,
    output_role,
    painted_pairs,
    painting_layer_kwargs,
    spatial_shape,
    stacked_channels,
)
from ._loss_plot import LossPlot
from ._workers import (
    PREVIEW_MAX_SIZE,
    ImageDone,
    ImageFailed,
    ImageStarted,
    LabelsRefused,
    PredictJob,
    Preview,
    Progress,
    Ready,
    ViewRegion,
    predict_steps,
    train_steps,
)

DEFAULT_CLASS_NAMES = "background, foreground"
PREVIEW_INTERVAL = 3.0
"""Seconds between live previews (at least; slow previews space themselves out)."""
STATUS_INTERVAL = 0.2
"""Seconds between updates of the status text, progress bar and preview region while training."""
LABELS_DEBOUNCE_MS = 300
"""Strokes are sent to the trainer this long after the last paint event."""


def parse_class_names(text: str) -> list[str]:
    """``"background, nuclei"`` -> ``["background", "nuclei"]`` (class ids 1, 2, ...)."""
    return [name.strip() for name in text.split(",") if name.strip()]


class _Relay(QObject):
    """Carries per-tile progress from a worker thread to the main thread (a queued Qt signal)."""

    tiles = Signal(int, int)


class UNetWidget(QWidget):
    """Dock widget for training a U-Net from painted labels and segmenting images with it."""

    def __init__(self, napari_viewer):
        super().__init__()
        from .training import TrainingSettings

        self.viewer = napari_viewer
        self._defaults = TrainingSettings()
        self.model = None
        """The current network (CPU, eval mode) or None."""
        self.metadata: dict | None = None
        self._model_origin = ""
        self._worker = None
        self._task: str | None = None
        self._trainer = None
        self._stop = threading.Event()
        self._resume = threading.Event()
        self._last_status = 0.0
        self._froze_gc = False
        self._view = ViewRegion()
        self._train_image = None
        self._train_labels: list[Labels] = []
        self._dirty_labels: set[int] = set()
        self._pbar = None
        self._window = None
        self._predict_sources: dict[str, Image] = {}
        self._relay = _Relay(self)
        self._relay.tiles.connect(self._on_tiles)
        self._labels_timer = QTimer(self)
        self._labels_timer.setSingleShot(True)
        self._labels_timer.setInterval(LABELS_DEBOUNCE_MS)
        self._labels_timer.timeout.connect(self._send_labels)
        self.last_error: str | None = None
        """The message of the last worker error (also shown as a napari notification)."""
        self.preview_interval = PREVIEW_INTERVAL
        """Seconds between live previews while training."""
        self.previews_shown = 0
        """Live previews pushed to the output layers during the last training."""

        self._build_ui()
        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layer_inserted)
        layers.events.removed.connect(self._refresh_layer_choices)
        layers.events.moved.connect(self._refresh_layer_choices)
        for layer in layers:
            layer.events.name.connect(self._refresh_layer_choices)
        self._refresh_layer_choices()
        self._set_busy(None)
        self._update_model_label()

    # --- layout -----------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        d = self._defaults
        root = QVBoxLayout(self)

        data = QGroupBox("Data")
        form = QFormLayout(data)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Image to train on and to predict (2D or 3D; one channel, RGB, or with "
                                    "'Combine channel layers' the channels of a file)")
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("Painted labels: 0 = unpainted, 1, 2, ... = classes")
        self.labels_combo.currentIndexChanged.connect(self._on_labels_changed)
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        form.addRow("Image", self.image_combo)
        self.channels_check = QCheckBox("Combine channel layers")
        self.channels_check.setToolTip(
            "Treat the layers of a multi-channel file (named 'name [ch0]', 'name [ch1]'... as napari-unet's reader "
            "opens them) as one image with all its channels: Train, Predict and Segment all then use every "
            "channel (results go with the [ch0] layer)")
        self.channels_check.toggled.connect(self._update_channels_label)
        self.image_combo.currentIndexChanged.connect(self._update_channels_label)
        form.addRow(self.channels_check)
        form.addRow("Labels", self.labels_combo)
        self.class_names_edit = QLineEdit(DEFAULT_CLASS_NAMES)
        self.class_names_edit.setToolTip("Class names for label ids 1, 2, ... (comma separated)")
        form.addRow("Classes", self.class_names_edit)
        self.new_labels_button = QPushButton("New labels layer")
        self.new_labels_button.setToolTip("Add an empty labels layer for painting, with the class colours and names")
        self.new_labels_button.clicked.connect(self.new_labels_layer)
        form.addRow(self.new_labels_button)
        self.all_images_check = QCheckBox("Train on every painted image")
        self.all_images_check.setToolTip(
            "Train one model on the chosen image and every other image with a painted labels layer (a labels layer "
            "pairs with the image whose name starts its name, e.g. 'cells2 strokes' with 'cells2'); "
            "previews follow the chosen image, and strokes painted in any of them during training are used")
        form.addRow(self.all_images_check)
        root.addWidget(data)

        model = QGroupBox("Model")
        form = QFormLayout(model)
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        form.addRow(self.model_label)
        row = QHBoxLayout()
        self.load_button = QPushButton("Load...")
        self.load_button.setToolTip("Load a model file (.safetensors)")
        self.load_button.clicked.connect(self._load_clicked)
        self.save_button = QPushButton("Save...")
        self.save_button.setToolTip("Save the model to a file (.safetensors)")
        self.save_button.clicked.connect(self._save_clicked)
        self.export_button = QPushButton("Export...")
        self.export_button.setToolTip("Export the model as a BioImage.IO package (zip) for ilastik, deepImageJ, "
                                      "QuPath...; the chosen image provides its test input")
        self.export_button.clicked.connect(self._export_clicked)
        for button in (self.load_button, self.save_button, self.export_button):
            row.addWidget(button)
        form.addRow(row)
        self.finetune_check = QCheckBox("Train on from the current model (fine-tune)")
        self.finetune_check.setToolTip("Unchecked: Train starts a new network with the settings below")
        form.addRow(self.finetune_check)
        self.time_spin = QSpinBox()
        self.time_spin.setRange(1, 24 * 3600)
        self.time_spin.setValue(int(d.time_budget or 60))
        self.time_spin.setSuffix(" s")
        self.time_spin.setToolTip("Training time budget; Stop ends earlier and keeps the model")
        form.addRow("Time budget", self.time_spin)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.device_combo.setToolTip("auto: CUDA GPU, then Apple MPS, then CPU")
        form.addRow("Device", self.device_combo)
        self.preview_check = QCheckBox("Live preview while training")
        self.preview_check.setChecked(True)
        form.addRow(self.preview_check)
        self.uncertainty_check = QCheckBox("Uncertainty layer (where to paint next)")
        form.addRow(self.uncertainty_check)
        self.flips_check = QCheckBox("Test-time flips (8x slower, a little more accurate)")
        self.flips_check.setToolTip("Predict and Segment all average the 8 flips/transpositions of each image")
        self.flips_check.setChecked(True)
        form.addRow(self.flips_check)
        self.refine_combo = QComboBox()
        self.refine_combo.addItem("auto (fits the objects' width)", AUTO)
        self.refine_combo.addItem("off", 0)
        for radius in range(1, 9):
            self.refine_combo.addItem(f"{radius} px", radius)
        self.refine_combo.setCurrentIndex(self.refine_combo.findData(DEFAULT_RADIUS))
        self.refine_combo.setToolTip(
            "Predict and Segment all snap the probabilities to the image's edges with a guided filter of this "
            "window half-width; auto takes the widest window (1-3 px) that fits the thinnest predicted "
            "structures, off keeps the network's probabilities as they are. Windows wider than a structure "
            "thin it."
        )
        form.addRow("Snap to edges", self.refine_combo)
        root.addWidget(model)

        advanced = QCollapsible("Advanced settings")
        inner = QWidget()
        form = QFormLayout(inner)
        self.ndim_combo = QComboBox()
        self.ndim_combo.addItems(["2D (stacks slice by slice)", "3D"])
        self.ndim_combo.setCurrentIndex(d.ndim - 2)
        form.addRow("Network", self.ndim_combo)
        self.depth_spin = self._spin(1, 6, d.depth, "Poolings; more = more context, larger halo")
        form.addRow("Depth", self.depth_spin)
        self.filters_spin = self._spin(2, 256, d.base_filters, "Filters of the first level (doubling per level)")
        form.addRow("Base filters", self.filters_spin)
        self.block_combo = QComboBox()
        self.block_combo.addItems(["plain", "residual", "vgg"])
        self.block_combo.setCurrentText(d.block)
        form.addRow("Blocks", self.block_combo)
        patch = d.patch_size if isinstance(d.patch_size, int) else max(d.patch_size)
        self.patch_spin = self._spin(8, 1024, patch, "Output tile size per axis used for training patches")
        form.addRow("Patch size", self.patch_spin)
        self.batch_spin = self._spin(1, 256, d.batch_size, "Patches per iteration")
        form.addRow("Batch size", self.batch_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 1.0)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(d.learning_rate)
        form.addRow("Learning rate", self.lr_spin)
        self.iterations_spin = self._spin(0, 10_000_000, d.iterations or 0, "0: no limit (time budget only)")
        self.iterations_spin.setSpecialValueText("no limit")
        form.addRow("Max iterations", self.iterations_spin)
        self.border_check = QCheckBox("Border weights between touching objects")
        self.border_check.setChecked(d.border_weight)
        form.addRow(self.border_check)
        from .devices import cpu_has_native_bfloat16

        self.bfloat16_check = QCheckBox("bfloat16 on this CPU (1.5x faster)")
        self.bfloat16_check.setChecked(d.cpu_bfloat16)
        self.bfloat16_check.setEnabled(cpu_has_native_bfloat16())
        self.bfloat16_check.setToolTip(
            "Mixed bfloat16 precision when training on a CPU that runs it natively (AVX512-BF16 or AMX): "
            "1.5x faster steps, slightly less accurate on fine structures (docs/benchmarks.md)"
        )
        form.addRow(self.bfloat16_check)
        advanced.addWidget(inner)
        root.addWidget(advanced)
        self.advanced = advanced

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
        root.addLayout(buttons)

        self.status_label = QLabel("Idle")
        self.status_label.setWordWrap(True)
        root.addWidget(self.status_label)
        self.loss_plot = LossPlot()
        root.addWidget(self.loss_plot)
        root.addStretch(1)

    @staticmethod
    def _spin(low, high, value, tip) -> QSpinBox:
        spin = QSpinBox()
        spin.setRange(low, high)
        spin.setValue(int(value))
        spin.setToolTip(tip)
        return spin

    # --- layer pickers ----------------------------------------------------------------------------

    def image_layers(self) -> list[Image]:
        """Image layers the user can train on or predict (not this widget's outputs)."""
        return [la for la in self.viewer.layers if isinstance(la, Image) and output_role(la) is None]

    def labels_layers(self) -> list[Labels]:
        """Labels layers the user painted (not this widget's segmentations)."""
        return [la for la in self.viewer.layers if isinstance(la, Labels) and output_role(la) is None]

    @property
    def image_layer(self) -> Image | None:
        """The chosen image layer."""
        return self._layer_named(self.image_combo.currentText(), Image)

    @property
    def labels_layer(self) -> Labels | None:
        """The chosen labels layer."""
        return self._layer_named(self.labels_combo.currentText(), Labels)

    def _layer_named(self, name: str, kind):
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        return layer if isinstance(layer, kind) else None

    def input_layers(self, layer) -> list[Image]:
        """The layers ``layer``'s image is made of: its channel group (``_layers.channel_group``) when *Combine
        channel layers* is ticked and it has one, else ``[layer]``. The first is where results go."""
        group = channel_group(layer, self.image_layers()) if self.channels_check.isChecked() else None
        return group or [layer]

    def _input_channels(self, layer) -> int:
        return sum(image_channels(la) for la in self.input_layers(layer))

    def _input_image(self, layer):
        """The image a worker reads for ``layer``: a view of its data (``_layers.image_array``), or a channel
        group's layers stacked channels first, lazily (``_layers.stacked_channels``: the GUI copies nothing)."""
        layers = self.input_layers(layer)
        return image_array(layers[0]) if len(layers) == 1 else stacked_channels([image_array(la) for la in layers])

    def _update_channels_label(self, *args) -> None:
        layer = self.image_layer
        group = channel_group(layer, self.image_layers()) if layer is not None else None
        self.channels_check.setText(f"Combine channel layers ({len(group)} channels)" if group
                                    else "Combine channel layers")

    def _on_layer_inserted(self, event) -> None:
        event.value.events.name.connect(self._refresh_layer_choices)
        self._refresh_layer_choices()

    def _refresh_layer_choices(self, event=None) -> None:
        images = self.image_layers()
        self._fill(self.image_combo, images, self._preferred_image(images))
        self._fill_labels()
        self._update_channels_label()

    def _on_image_changed(self, index=None) -> None:
        self._fill_labels()

    def _on_labels_changed(self, index=None) -> None:
        """Show the class names a painting layer carries (``metadata["class_names"]``)."""
        layer = self.labels_layer
        names = layer.metadata.get("class_names") if layer is not None else None
        if isinstance(names, dict) and names:
            self.class_names_edit.setText(", ".join(str(names[k]) for k in sorted(names)))

    def _fill_labels(self) -> None:
        labels = self.labels_layers()
        image = self.image_layer
        matching = [la for la in labels if image is not None and la.data.shape == spatial_shape(image)]
        self._fill(self.labels_combo, labels, (matching or labels or [None])[0])

    def _preferred_image(self, images):
        active = self.viewer.layers.selection.active
        if active in images:
            return active
        return images[0] if images else None

    @staticmethod
    def _fill(combo: QComboBox, layers, preferred) -> None:
        """Refill ``combo``; keep its current choice when it still exists, else choose ``preferred``."""
        names = [la.name for la in layers]
        current = combo.currentText()
        if [combo.itemText(i) for i in range(combo.count())] == names and current in names:
            return
        combo.blockSignals(True)
        combo.clear()
        combo.addItems(names)
        keep = current if current in names else (preferred.name if preferred is not None else "")
        combo.setCurrentIndex(names.index(keep) if keep in names else -1)
        combo.blockSignals(False)
        combo.currentIndexChanged.emit(combo.currentIndex())

    def new_labels_layer(self) -> Labels | None:
        """Add an empty uint8 labels layer matching the chosen image, with class colours and names."""
        image = self.image_layer
        if image is None:
            show_warning("U-Net: open or choose an image first")
            return None
        names = parse_class_names(self.class_names_edit.text()) or parse_class_names(DEFAULT_CLASS_NAMES)
        shape = spatial_shape(image)
        layer = self.viewer.add_labels(
            output_array(shape, np.uint8),  # beyond 1 GiB a memory-mapped temporary file: paint a huge stack
            name=f"{image.name} strokes",
            scale=image.scale[-len(shape):],
            translate=image.translate[-len(shape):],
            **painting_layer_kwargs(names),
        )
        layer.brush_size = 4
        layer.selected_label = 1
        layer.mode = "paint"
        self.labels_combo.setCurrentText(layer.name)
        self.viewer.layers.selection.active = layer
        return layer

    # --- model ------------------------------------------------------------------------------------

    def set_model(self, model, metadata: dict, origin: str) -> None:
        """Make ``model`` (with its ``metadata``) the current model; later Train calls fine-tune it."""
        self.model, self.metadata, self._model_origin = model, dict(metadata), origin
        self.finetune_check.setChecked(True)
        self._update_model_label()

    def _update_model_label(self) -> None:
        if self.model is None:
            self.model_label.setText("No model yet: Train makes one, or load a model file.")
            self.finetune_check.setChecked(False)
            self.finetune_check.setEnabled(False)
            self.save_button.setEnabled(False)
            self.export_button.setEnabled(False)
            return
        config = self.model.config
        names = self.metadata.get("class_names") or []
        ids = self.metadata.get("class_ids") or []
        classes = ", ".join(f"{n} ({i})" for n, i in zip(names, ids))
        self.model_label.setText(
            f"Model ({self._model_origin}): {config['ndim']}D, depth {config['depth']}, "
            f"{config['base_filters']} filters, {config['block']} blocks; classes: {classes}"
        )
        self.finetune_check.setEnabled(True)
        self.save_button.setEnabled(not self.busy)
        self.export_button.setEnabled(not self.busy)

    def load_model(self, path) -> None:
        """Load a model file (see :func:`napari_unet.io.load_model`); errors become notifications."""
        from .io import ModelFileError, load_model

        try:
            model, metadata = load_model(path)
        except ModelFileError as e:
            show_error(f"U-Net: {e}")
            return
        self.set_model(model, metadata, Path(path).name)
        show_info(f"U-Net: loaded {path}")

    def save_model(self, path) -> Path | None:
        """Save the current model and its metadata (atomic write)."""
        from .io import save_model

        if self.model is None:
            show_warning("U-Net: there is no model to save yet: Train first")
            return None
        try:
            written = save_model(self.model, path, self.metadata)
        except OSError as e:
            show_error(f"U-Net: cannot save the model to {path}: {e}")
            return None
        self._model_origin = Path(written).name
        self._update_model_label()
        show_info(f"U-Net: model saved to {written}")
        return Path(written)

    def export_bioimageio(self, path) -> None:
        """Write the current model as a BioImage.IO package at ``path`` (a zip) on a worker, with the chosen image
        as its test input (button "Export...")."""
        from napari.qt.threading import create_worker

        if self.busy:
            return
        image = self.image_layer
        problem = ("there is no model to export yet: Train first" if self.model is None
                   else "choose an image layer: a crop of it becomes the package's test input" if image is None
                   else self._fit_problem(image))
        if problem:
            show_error(f"U-Net: {problem}")
            return
        self.last_error = None
        name = Path(path).stem
        # The export reads the one crop it needs on the worker.
        worker = create_worker(_export_package, self.model, dict(self.metadata), self._input_image(image),
                               Path(path), name, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_exported)
        self.status_label.setText(f"Exporting {name} for BioImage.IO...")
        self._start("export", worker, 1, "U-Net BioImage.IO export")

    def _on_exported(self, path) -> None:
        self.status_label.setText(f"Exported to {path}")
        show_info(f"U-Net: BioImage.IO package written to {path}")

    def _export_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export U-Net model for BioImage.IO", "unet.zip",
                                              "BioImage.IO packages (*.zip)")
        if path:
            self.export_bioimageio(path if path.endswith(".zip") else f"{path}.zip")

    def _load_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load U-Net model", "", "U-Net models (*.safetensors);;All files (*)")
        if path:
            self.load_model(path)

    def _save_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save U-Net model", "unet.safetensors",
                                              "U-Net models (*.safetensors)")
        if path:
            self.save_model(path if path.endswith(".safetensors") else f"{path}.safetensors")

    def training_settings(self):
        """A ``TrainingSettings`` from the widget's fields (the rest keep their defaults)."""
        return dataclasses.replace(
            self._defaults,
            ndim=2 + self.ndim_combo.currentIndex(),
            depth=self.depth_spin.value(),
            base_filters=self.filters_spin.value(),
            block=self.block_combo.currentText(),
            patch_size=self.patch_spin.value(),
            batch_size=self.batch_spin.value(),
            learning_rate=self.lr_spin.value(),
            iterations=self.iterations_spin.value() or None,
            time_budget=float(self.time_spin.value()),
            border_weight=self.border_check.isChecked(),
            cpu_bfloat16=self.bfloat16_check.isChecked(),
            device=self.device_combo.currentText(),
        )

    # --- state ------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether a training or prediction worker is running."""
        return self._task is not None

    def _set_busy(self, task: str | None) -> None:
        self._task = task
        idle = task is None
        for button in (self.train_button, self.predict_button, self.segment_all_button,
                       self.load_button, self.new_labels_button):
            button.setEnabled(idle)
        self.stop_button.setEnabled(not idle)
        self.save_button.setEnabled(idle and self.model is not None)
        self.export_button.setEnabled(idle and self.model is not None)
        if idle:
            self._worker = None
            self._trainer = None

    def _start(self, task: str, worker, total: int, description: str) -> None:
        self._stop.clear()
        self._freeze_gc()
        self._set_busy(task)
        self._worker = worker
        self._pbar = progress(total=total, desc=description)
        worker.errored.connect(self._on_error)
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
            try:
                signal.disconnect()
            except (TypeError, RuntimeError):
                pass
        worker.quit()
        deadline = time.monotonic() + timeout
        while worker.is_running and time.monotonic() < deadline:
            time.sleep(0.02)
        self._disconnect_painting()
        self._finish_progress()
        self._unfreeze_gc()
        self._set_busy(None)
        return not worker.is_running

    def closeEvent(self, event):  # noqa: N802 (Qt API)
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
        if watched is self._window and event.type() == QEvent.Type.Close and self.busy:
            self.shutdown()
        return super().eventFilter(watched, event)

    def _on_error(self, exc: Exception) -> None:
        what = {"train": "training", "predict": "prediction", "export": "export"}.get(self._task, "work")
        self.last_error = f"U-Net {what} failed: {exc}"
        show_error(self.last_error)
        self.status_label.setText(self.last_error)

    def _on_finished(self) -> None:
        self._disconnect_painting()
        self._finish_progress()
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

    def _finish_progress(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    # --- training ---------------------------------------------------------------------------------

    def train(self) -> None:
        """Start training on the chosen image and labels (button "Train")."""
        from napari.qt.threading import create_worker

        if self.busy:
            return
        image, labels = self.image_layer, self.labels_layer
        problem = self._training_problem(image, labels)
        if problem:
            show_error(f"U-Net: {problem}")
            return
        image = self.input_layers(image)[0]  # a channel group's previews and results go with its first layer
        try:
            settings = self.training_settings()
        except ValueError as e:
            show_error(f"U-Net: {e}")
            return
        init = (self.model, self.metadata) if self.finetune_check.isChecked() and self.model is not None else None
        pairs = self._training_pairs(image, labels)
        self.last_error = None
        self._train_image, self._train_labels = image, [lab for _, lab in pairs]
        self._dirty_labels = set()
        self.previews_shown = 0
        self._update_view_region(settings.ndim)
        worker = create_worker(
            train_steps,
            [self._input_image(im) for im, _ in pairs],
            [layer_data(lab) for _, lab in pairs],  # read on the worker: the GUI never waits for a copy
            settings,
            init=init,
            class_names=self._class_names(labels),
            view=self._view if self.preview_check.isChecked() else None,
            preview_interval=self.preview_interval,
            stop=self._stop,
            resume=self._resume,
            _start_thread=False,
            _ignore_errors=True,
        )
        self._resume.clear()
        worker.yielded.connect(self._on_train_message)
        worker.returned.connect(self._on_trained)
        for layer in self._train_labels:
            layer.events.paint.connect(self._on_paint)
            layer.events.data.connect(self._on_paint)
        self.loss_plot.clear()
        others = f" and {len(pairs) - 1} more image(s)" if len(pairs) > 1 else ""
        self.status_label.setText(f"Preparing training data ({image.name}{others})...")
        self._start("train", worker, int(settings.time_budget), f"U-Net training on {image.name}{others} (seconds)")

    def _training_pairs(self, image, labels) -> list[tuple]:
        """The chosen (image, labels) pair first, then with *Train on every painted image* the other painted pairs
        (``_layers.painted_pairs``; a channel group once, by its first layer) that fit the first one."""
        pairs = [(image, labels)]
        if self.all_images_check.isChecked():
            for other, other_labels in painted_pairs(self.image_layers(), self.labels_layers()):
                other = self.input_layers(other)[0]
                if other_labels is labels or any(other is im for im, _ in pairs):
                    continue
                if self._input_channels(other) != self._input_channels(image):
                    show_warning(f"U-Net: '{other_labels.name}' left out: '{other.name}' has other channels than "
                                 f"'{image.name}'")
                    continue
                pairs.append((other, other_labels))
        return pairs

    def _training_problem(self, image, labels) -> str | None:
        if image is None:
            return "choose an image layer to train on"
        if labels is None:
            return "choose a labels layer (or click 'New labels layer' and paint a few strokes)"
        if labels.data.shape != spatial_shape(image):
            return (f"labels '{labels.name}' {labels.data.shape} and image '{image.name}' "
                    f"{spatial_shape(image)} differ in shape")
        if self.finetune_check.isChecked() and self.model is not None:
            channels, model_channels = self._input_channels(image), self.model.config["in_channels"]
            if channels != model_channels:
                return (f"the model to fine-tune takes {model_channels} channel(s), '{image.name}' has {channels}: "
                        "untick \"Train on from the current model\" to train a new one")
        return None

    def _class_names(self, labels) -> dict[int, str]:
        names = labels.metadata.get("class_names") if isinstance(labels.metadata, dict) else None
        if isinstance(names, dict) and names:
            return {int(k): str(v) for k, v in names.items()}
        return dict(enumerate(parse_class_names(self.class_names_edit.text()), start=1))

    def _on_train_message(self, message) -> None:
        match message:
            case Ready(trainer=trainer):
                self._on_ready(trainer)
            case Progress(event=event):
                self._on_progress(event)
            case Preview(result=result):
                self._apply_preview(result)
            case LabelsRefused(index=index, reason=reason):
                name = self._train_labels[index].name if index < len(self._train_labels) else f"labels {index}"
                show_warning(f"U-Net: new strokes in '{name}' not used: {reason}")

    def _on_ready(self, trainer) -> None:
        """The trainer is built: send it the strokes painted meanwhile, make the preview layers, let it go on."""
        self._trainer = trainer
        self._freeze_gc()
        if self._stop.is_set():
            trainer.request_stop()
        if self._dirty_labels:
            self._send_labels()
        try:
            if self.preview_check.isChecked() and self._train_image in self.viewer.layers:
                # Make the preview layers now, while the worker waits, not in the middle of training.
                source = self._train_image
                shape = spatial_shape(source)
                output_layer(self.viewer, source, "probabilities", (len(trainer.class_ids), *shape), np.float32)
                output_layer(self.viewer, source, "segmentation", shape, labels_dtype(trainer.class_ids),
                             class_ids=trainer.class_ids, class_names=trainer.class_names)
        finally:
            self._resume.set()

    def _on_progress(self, event) -> None:
        if event.done:
            self.status_label.setText(
                f"Training ended ({event.reason}) after {event.iteration} iterations, "
                f"{event.elapsed:.1f} s; loss {event.loss:.4f}"
            )
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
            self._update_view_region(self._trainer.settings.ndim)

    def _on_trained(self, trainer) -> None:
        self.set_model(trainer.model, trainer.metadata, "trained here")
        record = (trainer.metadata.get("training") or {}).get("history", [{}])[-1]
        if record.get("stop_reason") == "stopped":
            show_info(f"U-Net: training stopped after {trainer.iteration} iterations; the model is kept")

    def _on_paint(self, event=None) -> None:
        source = getattr(event, "source", None)
        indices = [i for i, layer in enumerate(self._train_labels) if layer is source]
        self._dirty_labels.update(indices or range(len(self._train_labels)))
        self._labels_timer.start()

    def _send_labels(self) -> None:
        """Tell the running trainer which labels layers were painted since the last call (main thread); it reads
        them on its own thread, so painting never waits for a copy of a large layer."""
        if self._trainer is None:
            return
        dirty, self._dirty_labels = self._dirty_labels, set()
        for index in sorted(dirty):
            self._trainer.update_labels_later(index, layer_data(self._train_labels[index]))

    def _disconnect_painting(self) -> None:
        self._labels_timer.stop()
        for layer in self._train_labels:
            for emitter in (layer.events.paint, layer.events.data):
                emitter.disconnect(self._on_paint)
        self._train_labels = []

    def _update_view_region(self, model_ndim: int) -> None:
        """Record the part of the training image in view (current slice, visible field) for previews."""
        layer = self._train_image
        if layer is None or layer not in self.viewer.layers:
            return
        shape = spatial_shape(layer)
        point = np.asarray(layer.world_to_data(self.viewer.dims.point))
        offset = self.viewer.dims.ndim - layer.ndim
        displayed = [a - offset for a in self.viewer.dims.displayed if a >= offset]
        corners = np.asarray(layer.corner_pixels)
        region = []
        for axis, size in enumerate(shape):
            centre = int(np.clip(np.round(point[axis]), 0, size - 1))
            if axis < len(shape) - model_ndim:  # a stack axis a 2D net predicts slice by slice
                region.append(slice(centre, centre + 1))
                continue
            low, high = 0, size
            if axis in displayed and self.viewer.dims.ndisplay == 2 and corners[1, axis] - corners[0, axis] >= 2:
                low, high = int(corners[0, axis]), int(corners[1, axis]) + 1
            elif axis not in displayed:  # the slice axis of a 3D net: a slab around the current slice
                low, high = max(0, centre - 4), min(size, centre + 4)
            if high - low > PREVIEW_MAX_SIZE:
                middle = (low + high) // 2
                low = max(0, min(middle - PREVIEW_MAX_SIZE // 2, size - PREVIEW_MAX_SIZE))
                high = low + PREVIEW_MAX_SIZE
            region.append(slice(low, min(high, size)))
        self._view.region = tuple(region)

    def _apply_preview(self, result) -> None:
        source = self._train_image
        if source is None or source not in self.viewer.layers:
            return
        shape = spatial_shape(source)
        n_classes = result.probabilities.shape[0]
        probabilities = output_layer(self.viewer, source, "probabilities", (n_classes, *shape), np.float32)
        segmentation = output_layer(self.viewer, source, "segmentation", shape, result.segmentation.dtype,
                                          class_ids=result.class_ids)
        probabilities.data[(slice(None), *result.region)] = result.probabilities
        segmentation.data[result.region] = result.segmentation
        probabilities.refresh()
        segmentation.refresh()
        self.previews_shown += 1

    # --- prediction -------------------------------------------------------------------------------

    def predict(self) -> None:
        """Segment the chosen image (button "Predict")."""
        image = self.image_layer
        if image is None:
            show_error("U-Net: choose an image layer to predict")
            return
        self._predict([image])

    def segment_all(self) -> None:
        """Segment every open image layer that fits the model (button "Segment all")."""
        if self.model is None:
            show_error("U-Net: there is no model yet: Train or load one first")
            return
        fitting = [la for la in self.image_layers()
                   if self.input_layers(la)[0] is la and self._fit_problem(la) is None]
        if not fitting:
            show_error("U-Net: no open image fits the model")
            return
        self._predict(fitting)

    def _fit_problem(self, layer) -> str | None:
        channels, model_channels = self._input_channels(layer), self.model.config["in_channels"]
        if channels != model_channels:
            group = channel_group(layer, self.image_layers())
            hint = (f": tick 'Combine channel layers' to use its file's {len(group)} channels"
                    if group and len(group) == model_channels and not self.channels_check.isChecked() else "")
            return (f"'{layer.name}' has {channels} channel{'s' * (channels > 1)} (RGB: 3); "
                    f"the model takes {model_channels}{hint}")
        ndim = len(spatial_shape(layer))
        model_ndim = self.model.config["ndim"]
        allowed = (2, 3) if model_ndim == 2 else (3,)
        if ndim not in allowed:
            return f"'{layer.name}' has {ndim} dimensions; a {model_ndim}D model takes {' or '.join(map(str, allowed))}"
        return None

    def _predict(self, layers) -> None:
        from napari.qt.threading import create_worker

        if self.busy:
            return
        if self.model is None:
            show_error("U-Net: there is no model yet: Train or load one first")
            return
        for layer in layers:
            problem = self._fit_problem(layer)
            if problem:
                show_error(f"U-Net: {problem}")
                return
        self.last_error = None
        sources = list({id(la): la for la in (self.input_layers(layer)[0] for layer in layers)}.values())
        self._predict_sources = {layer.name: layer for layer in sources}
        jobs = [PredictJob(layer.name, self._input_image(layer)) for layer in sources]
        worker = create_worker(
            predict_steps,
            self.model,
            self.metadata,
            jobs,
            self.prediction_settings(),
            progress=self._relay.tiles.emit,
            stop=self._stop,
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.yielded.connect(self._on_predict_message)
        self.status_label.setText(f"Predicting {len(jobs)} image(s)...")
        self._start("predict", worker, 0, "U-Net prediction")

    def prediction_settings(self) -> PredictionSettings:
        """The prediction controls as ``predict.PredictionSettings``."""
        return PredictionSettings(
            device=self.device_combo.currentText(),
            test_time_flips=self.flips_check.isChecked(),
            refine_radius=self.refine_combo.currentData(),
            uncertainty=self.uncertainty_check.isChecked(),
        )

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
                self._show_prediction(result)

    def _show_prediction(self, result) -> None:
        source = self._predict_sources.get(result.name)
        if source is None or source not in self.viewer.layers:
            return
        output_layer(self.viewer, source, "probabilities", data=result.probabilities)
        output_layer(self.viewer, source, "segmentation", data=result.segmentation,
                     class_ids=model_class_ids(self.model, self.metadata),
                     class_names=self.metadata.get("class_names") or ())
        if result.uncertainty is not None:
            output_layer(self.viewer, source, "uncertainty", data=result.uncertainty)
        self.status_label.setText(f"Predicted {result.name}")


def _export_package(model, metadata: dict, image, path: Path, name: str) -> Path:
    """The export, run on a worker thread (``bioimageio_export`` imports bioimageio.spec, an optional extra)."""
    try:
        from .bioimageio_export import export_bioimageio
    except ImportError:
        raise RuntimeError('exporting needs bioimageio.spec: pip install "napari-unet[bioimageio]"') from None
    return export_bioimageio(model, metadata, image, path, name=name)
