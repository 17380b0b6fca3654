"""Ambiguous images in napari: the reader takes an axes override from a script, and the widget's data panel turns
channel layers into a Z stack (and a short stack into channel layers) when the file's axes were read wrong."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_unet._reader import read_tiff
from napari_unet.widgets import UNetWidget
from napari_unet.widgets.data_panel import SPLIT_SLICES, STACK_CHANNELS


def _script_stack(path, shape=(4, 40, 48)):
    """A stack as ``tifffile.imwrite(path, array)`` writes it without metadata: 3 or 4 planes become the samples
    of one RGB page (tifffile warns)."""
    array = (np.random.default_rng(0).random(shape) * 1000).astype(np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tifffile.imwrite(path, array)
    return array


def test_the_reader_takes_axes_from_a_script(tmp_path):
    path = tmp_path / "stack.tif"
    stack = _script_stack(path)
    assert [kwargs["name"] for _, kwargs, _ in read_tiff(str(path))] == [[f"stack [ch{c}]" for c in range(4)]]
    [(data, kwargs, kind)] = read_tiff(str(path), axes="ZYX")
    assert kind == "image" and "channel_axis" not in kwargs and kwargs["axis_labels"] == ("z", "y", "x")
    np.testing.assert_array_equal(data, stack)


def test_channel_layers_of_a_stack_become_one_stack_that_predicts(make_napari_viewer, qtbot, tmp_path, make_model):
    path = tmp_path / "stack.tif"
    stack = _script_stack(path)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-unet")
    assert [la.name for la in viewer.layers] == [f"stack [ch{c}]" for c in range(4)]
    widget = UNetWidget(viewer)
    widget.device_combo.setCurrentText("cpu")
    data = widget.data
    data.image_combo.setCurrentText("stack [ch2]")
    assert not data.axes_button.isHidden() and data.axes_button.text() == STACK_CHANNELS
    widget.set_model(make_model(n_classes=2), {"class_ids": [1, 2], "class_names": ["a", "b"]}, "test")
    data.channels_check.setChecked(True)
    assert widget.fit_problem(data.image_layer).endswith(
        f"the model takes 1: if its channel layers are Z slices, click '{STACK_CHANNELS}'"
    )

    data.axes_button.click()
    assert [la.name for la in viewer.layers] == ["stack"]
    layer = viewer.layers["stack"]
    np.testing.assert_array_equal(np.asarray(layer.data), stack)
    assert layer.axis_labels == ("z", "y", "x") and tuple(layer.scale) == (1.0, 1.0, 1.0)
    assert data.image_combo.currentText() == "stack" and widget.fit_problem(layer) is None
    assert data.axes_button.text() == SPLIT_SLICES  # and back, if that was wrong

    widget.predict()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert widget.last_error is None
    assert viewer.layers["stack segmentation"].data.shape == stack.shape


def test_a_short_stack_becomes_channel_layers_for_a_multichannel_model(make_napari_viewer, make_model):
    viewer = make_napari_viewer()
    two = np.random.default_rng(1).random((2, 30, 40)).astype(np.float32)
    viewer.add_image(two, name="two", scale=(3.0, 0.5, 0.5))
    viewer.add_image(np.zeros((20, 30, 40), np.float32), name="long stack")
    widget = UNetWidget(viewer)
    data = widget.data
    data.image_combo.setCurrentText("long stack")
    assert data.axes_button.isHidden()  # 20 slices: no channel reading offered
    data.image_combo.setCurrentText("two")
    widget.set_model(make_model(in_channels=2, n_classes=2), {"class_ids": [1, 2]}, "test")
    assert widget.fit_problem(viewer.layers["two"]).endswith(f"if its 2 slices are channels, click '{SPLIT_SLICES}'")

    labels = viewer.add_labels(np.zeros((2, 30, 40), np.uint8), name="two strokes")
    assert widget.data.training_problem(viewer.layers["two"], labels, widget.model.config).endswith(
        f"to train a new one; or, if its 2 slices are channels, click '{SPLIT_SLICES}'"
    )
    viewer.layers.remove(labels)
    data.axes_button.click()
    assert [la.name for la in viewer.layers] == ["two [ch0]", "two [ch1]", "long stack"]
    first, second = viewer.layers["two [ch0]"], viewer.layers["two [ch1]"]
    assert np.shares_memory(second.data, two) and np.array_equal(second.data, two[1])  # views, not copies
    assert tuple(first.scale) == (0.5, 0.5) and data.channels_check.isChecked()
    assert data.image_combo.currentText() == "two [ch0]" and data.input_channels(first) == 2
    assert widget.fit_problem(first) is None
    assert data.axes_button.text() == STACK_CHANNELS
