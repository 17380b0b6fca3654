"""The dock widget's panels and settings forms on their own (pytest-qt; the forms need a QApplication, not a viewer),
and the settings the widget remembers between napari runs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_unet.predict import PredictionSettings
from napari_unet.training import TrainingSettings
from napari_unet.widgets.settings_form import SettingsForm, form_fields


@dataclass
class _Knobs:
    size: int = field(default=3, metadata={"label": "Size", "min": 1, "max": 9})
    rate: float = field(default=0.5, metadata={"label": "Rate", "min": 0.0, "max": 1.0, "step": 0.1})
    on: bool = field(default=True, metadata={"label": "On"})
    limit: int | None = field(
        default=None, metadata={"label": "Limit", "min": 0, "max": 100, "none": 0, "none_text": "none"}
    )
    mode: str = field(default="b", metadata={"label": "Mode", "choices": [("first", "a"), ("second", "b")]})
    hidden: int = 7


def test_a_form_has_a_widget_per_labelled_field_showing_its_default(qtbot):
    form = SettingsForm(_Knobs)
    assert [f.name for f in form_fields(_Knobs)] == ["size", "rate", "on", "limit", "mode"]
    assert form.values() == {"size": 3, "rate": 0.5, "on": True, "limit": None, "mode": "b"}
    assert form["limit"].native.specialValueText() == "none" and form["mode"].native.currentText() == "second"
    form["limit"].value = 40
    form["mode"].value = "a"
    assert form.values()["limit"] == 40 and form.values()["mode"] == "a"
    form["limit"].value = 0
    assert form.values()["limit"] is None  # the "none" value stands for None
    assert "hidden" not in form.values()  # no label, no widget


def test_set_values_skips_unknown_names_and_values_a_widget_refuses(qtbot):
    form = SettingsForm(_Knobs)
    form.set_values({"size": 5, "mode": "no such mode", "nonsense": 1, "on": False, "limit": None})
    assert form.values() == {"size": 5, "rate": 0.5, "on": False, "limit": None, "mode": "b"}
    form.set_values({"size": 50})  # beyond the range: refused, the shown value stays
    assert form.values()["size"] == 5


def test_exclude_leaves_fields_out(qtbot):
    assert set(SettingsForm(_Knobs, exclude=("rate", "on")).values()) == {"size", "limit", "mode"}


def test_training_panel_gives_the_default_settings_and_follows_its_forms(qtbot):
    from napari_unet.widgets.training_panel import TrainingPanel

    panel = TrainingPanel()
    qtbot.addWidget(panel)
    assert panel.settings("cpu") == TrainingSettings(device="cpu")
    labelled = {f.name for f in form_fields(TrainingSettings)}
    assert set(panel.values()) == labelled  # every labelled field is in one of the two forms
    panel.form["depth"].value = 2
    panel.form["ndim"].value = 3
    panel.form["iterations"].value = 0
    panel.basic["time_budget"].value = 90
    panel.form["consistency"].value = 0.3  # for acquisitions that vary in intensity
    settings = panel.settings("cpu")
    assert (settings.depth, settings.ndim, settings.iterations, settings.time_budget) == (2, 3, None, 90)
    assert settings.consistency == pytest.approx(0.3)
    others = {f.name for f in dataclasses.fields(TrainingSettings)} - labelled
    assert all(getattr(settings, n) == getattr(TrainingSettings(), n) for n in others - {"device"})


def test_prediction_panel_gives_the_default_settings(qtbot):
    from napari_unet.widgets.prediction_panel import PredictionPanel

    panel = PredictionPanel()
    qtbot.addWidget(panel)
    assert panel.settings("cpu") == PredictionSettings(device="cpu")
    panel.form["refine_radius"].value = 0
    panel.form["test_time_flips"].value = False
    settings = panel.settings("cpu")
    assert settings.refine_radius == 0 and settings.test_time_flips is False


def test_model_panel_describes_the_model_and_enables_what_it_allows(qtbot):
    from napari_unet import UNet
    from napari_unet.widgets.model_panel import ModelPanel

    panel = ModelPanel()
    qtbot.addWidget(panel)
    assert "No model yet" in panel.model_label.text()
    assert not panel.save_button.isEnabled() and not panel.finetune_check.isEnabled()
    model = UNet(n_classes=2, depth=1, base_filters=4)
    panel.show_model(model, {"class_ids": [1, 3], "class_names": ["bg", "cell"]}, "cells.safetensors")
    panel.set_idle(True, True)
    assert "cells.safetensors" in panel.model_label.text() and "cell (3)" in panel.model_label.text()
    assert panel.save_button.isEnabled() and panel.export_button.isEnabled() and panel.finetune_check.isEnabled()
    panel.set_idle(False, True)
    assert not panel.save_button.isEnabled() and not panel.load_button.isEnabled()


def test_the_widget_remembers_its_settings_between_runs(make_napari_viewer, qtbot):
    from napari_unet.widgets import UNetWidget, remembered

    viewer = make_napari_viewer()
    first = UNetWidget(viewer)
    first.training.form["depth"].value = 2
    first.training.basic["time_budget"].value = 123
    first.prediction.form["test_time_flips"].value = False
    first.data.class_names_edit.setText("bg, nuclei, debris")
    first.device_combo.setCurrentText("cpu")
    qtbot.waitUntil(lambda: remembered.settings_path().is_file(), timeout=5_000)
    qtbot.waitUntil(
        lambda: remembered.load_settings().get("widget", {}).get("class_names") == "bg, nuclei, debris", timeout=5_000
    )
    second = UNetWidget(viewer)
    assert second.training.settings("cpu").depth == 2 and second.training.settings("cpu").time_budget == 123
    assert second.prediction.settings("cpu").test_time_flips is False
    assert second.data.class_names_edit.text() == "bg, nuclei, debris"
    assert second.device_combo.currentText() == "cpu"
    for widget in (first, second):
        widget.shutdown()


def test_an_unusable_settings_file_means_the_defaults(make_napari_viewer, qtbot):
    from napari_unet.widgets import UNetWidget, remembered

    path = remembered.settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    for text in (
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"training": {"depth": "deep", "ndim": 7}, "widget": {"device": "tpu"}}),
    ):
        path.write_text(text)
        widget = UNetWidget(make_napari_viewer())
        assert widget.training.settings("cpu") == TrainingSettings(device="cpu")
        assert widget.device_combo.currentText() == "auto"
        widget.shutdown()


def test_a_remembered_choice_this_version_does_not_offer_is_said_not_dropped_silently(make_napari_viewer, qtbot):
    from napari.utils.notifications import notification_manager

    from napari_unet.normalization import BACKGROUND_RECIPE
    from napari_unet.widgets import UNetWidget, remembered

    older = {**BACKGROUND_RECIPE, "background_grid": 4}  # what an earlier version offered
    path = remembered.settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"training": {"normalization": older, "depth": 2}}))
    start = len(notification_manager.records)
    widget = UNetWidget(make_napari_viewer())
    settings = widget.training.settings("cpu")
    assert settings.depth == 2 and settings.normalization == TrainingSettings().normalization
    said = [n.message for n in notification_manager.records[start:]]
    assert any("remembered Normalization not restored" in m and "default is shown" in m for m in said), said
    widget.shutdown()
    path.write_text(json.dumps({"training": {"normalization": BACKGROUND_RECIPE, "depth": 2}}))
    start = len(notification_manager.records)
    widget = UNetWidget(make_napari_viewer())
    assert widget.training.settings("cpu").normalization == BACKGROUND_RECIPE
    assert not [n for n in notification_manager.records[start:] if "not restored" in n.message]
    widget.shutdown()


def test_the_device_line_says_what_runs(make_napari_viewer, qtbot):
    from napari_unet.devices import default_cpu_threads
    from napari_unet.widgets import UNetWidget

    widget = UNetWidget(make_napari_viewer())
    widget.device_combo.setCurrentText("cpu")
    threads = default_cpu_threads()
    assert widget.device_label.text() == f"cpu, {threads} thread{'s' * (threads > 1)}"
    widget.shutdown()


def test_settings_are_written_where_they_were_read(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_unet.widgets import UNetWidget, remembered

    monkeypatch.setenv(remembered.CONFIG_DIR_VARIABLE, str(tmp_path / "first"))
    widget = UNetWidget(make_napari_viewer())
    monkeypatch.setenv(remembered.CONFIG_DIR_VARIABLE, str(tmp_path / "second"))  # e.g. a test's folder, gone
    widget.training.form["depth"].value = 2
    widget.memory.write()
    assert remembered.load_settings(tmp_path / "first" / remembered.FILE_NAME)["training"]["depth"] == 2
    assert not (tmp_path / "second").exists()
    widget.shutdown()
