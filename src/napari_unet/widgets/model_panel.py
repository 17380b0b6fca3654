"""The "Model" panel: what the current model is, Load / Save / Export buttons, whether Train fine-tunes it, and the
offer of an unsaved model to recover (``recovery.py``).

The panel only asks for paths (file dialogs) and emits them; the composing widget owns the model and does the
loading, saving and exporting. Main thread only."""

from __future__ import annotations

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QCheckBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton


class ModelPanel(QGroupBox):
    """Shows the current model; ``load_requested``, ``save_requested`` and ``export_requested`` carry the path
    the user chose; ``recover_requested`` and ``discard_recovery_requested`` answer the recovery offer."""

    load_requested = Signal(str)
    save_requested = Signal(str)
    export_requested = Signal(str)
    recover_requested = Signal()
    discard_recovery_requested = Signal()

    def __init__(self, parent=None):
        super().__init__("Model", parent)
        form = QFormLayout(self)
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        form.addRow(self.model_label)
        row = QHBoxLayout()
        self.load_button = QPushButton("Load...")
        self.load_button.setToolTip("Load a model file (.safetensors)")
        self.save_button = QPushButton("Save...")
        self.save_button.setToolTip("Save the model to a file (.safetensors)")
        self.export_button = QPushButton("Export...")
        self.export_button.setToolTip(
            "Export the model as a BioImage.IO package (zip) for ilastik, deepImageJ, "
            "QuPath...; the chosen image provides its test input"
        )
        for button in (self.load_button, self.save_button, self.export_button):
            row.addWidget(button)
        form.addRow(row)
        self.finetune_check = QCheckBox("Train on from the current model (fine-tune)")
        self.finetune_check.setToolTip("Unchecked: Train starts a new network with the training settings")
        form.addRow(self.finetune_check)
        recovery = QHBoxLayout()
        self.recover_button = QPushButton()
        self.recover_button.setToolTip(
            "A model trained here that was not saved (napari closed or crashed): load it as the current model. "
            "The next training replaces it."
        )
        self.discard_recovery_button = QPushButton("Discard")
        self.discard_recovery_button.setToolTip("Delete the unsaved model")
        recovery.addWidget(self.recover_button, 1)
        recovery.addWidget(self.discard_recovery_button)
        form.addRow(recovery)
        self.recover_button.clicked.connect(self.recover_requested)
        self.discard_recovery_button.clicked.connect(self.discard_recovery_requested)
        self.show_recovery(None)
        self.load_button.clicked.connect(self._ask_load)
        self.save_button.clicked.connect(self._ask_save)
        self.export_button.clicked.connect(self._ask_export)
        self.show_model(None, None, "")

    def show_model(self, model, metadata: dict | None, origin: str) -> None:
        """Describe ``model`` (None: no model yet) and enable what it allows."""
        self.save_button.setEnabled(model is not None)
        self.export_button.setEnabled(model is not None)
        self.finetune_check.setEnabled(model is not None)
        if model is None:
            self.model_label.setText("No model yet: Train makes one, or load a model file.")
            self.finetune_check.setChecked(False)
            return
        config = model.config
        classes = ", ".join(
            f"{n} ({i})" for n, i in zip(metadata.get("class_names") or [], metadata.get("class_ids") or [])
        )
        self.model_label.setText(
            f"Model ({origin}): {config['ndim']}D, depth {config['depth']}, "
            f"{config['base_filters']} filters, {config['block']} blocks; classes: {classes}"
            + _calibration_text(model, metadata)
        )

    def show_recovery(self, offer: str | None) -> None:
        """Offer an unsaved model to recover (``offer``: the button's text, ``RecoveryOffer.describe``), or no
        longer (None)."""
        self.recover_button.setText(offer or "")
        for button in (self.recover_button, self.discard_recovery_button):
            button.setVisible(offer is not None)

    def set_idle(self, idle: bool, has_model: bool) -> None:
        """Enable the buttons that may run now: none of them while a worker runs."""
        self.load_button.setEnabled(idle)
        self.recover_button.setEnabled(idle)
        self.save_button.setEnabled(idle and has_model)
        self.export_button.setEnabled(idle and has_model)

    def _ask_load(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load U-Net model", "", "U-Net models (*.safetensors);;All files (*)"
        )
        if path:
            self.load_requested.emit(path)

    def _ask_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save U-Net model", "unet.safetensors", "U-Net models (*.safetensors)"
        )
        if path:
            self.save_requested.emit(path if path.endswith(".safetensors") else f"{path}.safetensors")

    def _ask_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export U-Net model for BioImage.IO", "unet.zip", "BioImage.IO packages (*.zip)"
        )
        if path:
            self.export_requested.emit(path if path.endswith(".zip") else f"{path}.zip")


def _calibration_text(model, metadata: dict) -> str:
    """The model's softmax temperature and what it did to the expected calibration error of the pixels it was
    fitted on (``metadata["calibration"]``), or "" for an uncalibrated model."""
    fit = metadata.get("calibration")
    if isinstance(fit, dict) and all(isinstance(fit.get(k), (int, float)) for k in ("ece_before", "ece_after")):
        return (
            f"; probabilities calibrated: temperature {model.temperature:.2f}, calibration error "
            f"{fit['ece_before']:.3f} -> {fit['ece_after']:.3f} on held-out pixels"
        )
    return "" if model.temperature == 1.0 else f"; softmax temperature {model.temperature:.2f}"
