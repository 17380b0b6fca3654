"""The "Prediction" panel: the settings of Predict and Segment all as a magicgui form generated from
``PredictionSettings`` (``settings_form``). Main thread only."""

from __future__ import annotations

import dataclasses

from qtpy.QtWidgets import QGroupBox, QVBoxLayout

from ..predict import PredictionSettings
from .settings_form import SettingsForm

LEFT_OUT = ("device", "tile_shape", "batch_size", "tile_tuning", "refine_eps")
"""Prediction settings not in this form: the device is the composing widget's (one for training and prediction);
tile and batch size and the tile tuning change speed and memory, not the result, and the edge threshold is an
expert's knob, so they are the command line's (``napari-unet predict --tile/--batch-size/--no-tile-tuning/
--refine-eps``) and keep their defaults here."""


class PredictionPanel(QGroupBox):
    """``settings(device)`` is the ``PredictionSettings`` the panel shows; ``values()``/``set_values()`` read and
    restore what the user set."""

    def __init__(self, parent=None):
        super().__init__("Prediction", parent)
        self.form = SettingsForm(PredictionSettings, exclude=LEFT_OUT)
        QVBoxLayout(self).addWidget(self.form.native)

    def settings(self, device: str) -> PredictionSettings:
        """The settings shown, to run on ``device``."""
        return dataclasses.replace(PredictionSettings(), **self.form.values(), device=device)

    def values(self) -> dict:
        return self.form.values()

    def set_values(self, values: dict) -> list[str]:
        return self.form.set_values(values)
