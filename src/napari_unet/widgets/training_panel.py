"""The "Training" panel: the time budget, live preview, and the advanced training settings as a magicgui form
generated from ``TrainingSettings`` (``settings_form``). Main thread only."""

from __future__ import annotations

import dataclasses

from qtpy.QtWidgets import QCheckBox, QGroupBox, QVBoxLayout, QWidget
from superqt import QCollapsible

from ..devices import cpu_has_native_bfloat16
from ..training_settings import TrainingSettings
from .settings_form import SettingsForm

BASIC_FIELDS = ("time_budget",)
"""Training settings shown above the fold; every other form field of ``TrainingSettings`` is in *Advanced*."""


class TrainingPanel(QGroupBox):
    """``settings(device)`` is the ``TrainingSettings`` the panel shows (a ``ValueError`` names a bad value);
    ``values()``/``set_values()`` read and restore what the user set (remembered between napari runs)."""

    def __init__(self, parent=None):
        super().__init__("Training", parent)
        layout = QVBoxLayout(self)
        others = [f.name for f in dataclasses.fields(TrainingSettings) if f.name not in BASIC_FIELDS]
        self.basic = SettingsForm(TrainingSettings, exclude=others)
        self.form = SettingsForm(TrainingSettings, exclude=BASIC_FIELDS)
        self.form["cpu_bfloat16"].enabled = cpu_has_native_bfloat16()
        self.preview_check = QCheckBox("Live preview while training")
        self.preview_check.setChecked(True)
        layout.addWidget(self.basic.native)
        layout.addWidget(self.preview_check)
        self.advanced = QCollapsible("Advanced settings")
        inner = QWidget()
        QVBoxLayout(inner).addWidget(self.form.native)
        self.advanced.addWidget(inner)
        layout.addWidget(self.advanced)

    def settings(self, device: str) -> TrainingSettings:
        """The settings shown, to run on ``device``; the fields without a widget keep their defaults."""
        return dataclasses.replace(TrainingSettings(), **self.values(), device=device)

    def values(self) -> dict:
        """Field values of both forms."""
        return {**self.basic.values(), **self.form.values()}

    def set_values(self, values: dict) -> list[str]:
        """Show remembered field values (unknown names and values out of range are left out); the labels of the
        fields whose value was refused."""
        return self.basic.set_values(values) + self.form.set_values(values)
