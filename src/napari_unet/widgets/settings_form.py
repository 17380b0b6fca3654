"""magicgui forms generated from the engine's settings dataclasses (``TrainingSettings``, ``PredictionSettings``).

A dataclass field whose ``metadata`` holds a ``"label"`` gets a widget, so a new setting is one field with its label
and tooltip, not five places in the widget. The widget follows the field: ``"choices"`` (``(text, value)`` pairs)
make a combo box, otherwise the default's type decides (bool: check box, int: spin box, float: float spin box);
``"widget_type"`` overrides that choice (``"SpinBox"`` for a float shown in whole units), ``"min"``/``"max"``/``"step"``
bound it, and ``"none"`` names the spin box value that stands for ``None`` (e.g. 0
iterations = no limit, shown as ``"none_text"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from magicgui.widgets import Container, Widget, create_widget

_OPTIONS = ("min", "max", "step", "tooltip", "choices")


def form_fields(settings_type) -> list[dataclasses.Field]:
    """The fields of ``settings_type`` that have a form widget (their metadata has a label)."""
    return [f for f in dataclasses.fields(settings_type) if "label" in f.metadata]


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _widget(f: dataclasses.Field) -> Widget:
    meta = f.metadata
    value = _default(f)
    if value is None:
        value = meta.get("none")
    if isinstance(value, tuple):  # a per-axis size given as one number in the form
        value = max(value)
    options = {key: meta[key] for key in _OPTIONS if key in meta}
    widget_type = meta.get("widget_type") or ("ComboBox" if "choices" in meta else None)
    if widget_type == "SpinBox":  # a float setting shown in whole units (seconds)
        value = int(value)
    if widget_type == "ComboBox":  # its choices bound it (a range may be there for the command line)
        options = {key: options[key] for key in ("tooltip", "choices") if key in options}
        return create_widget(value=value, name=f.name, label=meta["label"], widget_type=widget_type, options=options)
    return create_widget(
        value=value, annotation=type(value), name=f.name, label=meta["label"], widget_type=widget_type, options=options
    )


class SettingsForm:
    """A magicgui ``Container`` with one widget per form field of ``settings_type`` (``exclude``: field names
    left out, e.g. those another part of the interface sets).

    ``values()`` reads the form as field values (``None`` where a field's ``"none"`` value is shown),
    ``set_values(values)`` writes known fields (for remembered settings; values a widget cannot take are skipped),
    ``form[name]`` is a field's widget and ``form.changed`` its container's change signal.
    """

    def __init__(self, settings_type, *, exclude=()):
        self.settings_type = settings_type
        self._fields = {f.name: f for f in form_fields(settings_type) if f.name not in exclude}
        self.container = Container(widgets=[_widget(f) for f in self._fields.values()])
        for f in self._fields.values():
            if "none_text" in f.metadata:
                self[f.name].native.setSpecialValueText(f.metadata["none_text"])
        self.changed = self.container.changed

    def __getitem__(self, name: str) -> Widget:
        return getattr(self.container, name)

    @property
    def native(self):
        """The Qt widget of the form."""
        return self.container.native

    def values(self) -> dict[str, Any]:
        """Field name -> value as the settings dataclass takes it."""
        values = {}
        for name, f in self._fields.items():
            value = self[name].value
            values[name] = None if "none" in f.metadata and value == f.metadata["none"] else value
        return values

    def set_values(self, values: dict) -> list[str]:
        """Show ``values`` (field name -> value); unknown names and values a widget refuses are left out. Returns
        the labels of this form's fields whose value was refused (they keep what they showed)."""
        refused = []
        for name, value in values.items():
            f = self._fields.get(name)
            if f is None:
                continue
            if value is None:
                value = f.metadata.get("none")
            try:
                self[name].value = value
            except (TypeError, ValueError):
                refused.append(f.metadata.get("label", name))
        return refused
