"""The U-Net dock widget in a real napari viewer (pytest-qt, run under Xvfb by pytest-xvfb).

Tiny models and short time budgets keep these fast on a 2-core CPU.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari.utils.notifications import NotificationSeverity, notification_manager

from napari_unet import UNet
from napari_unet._layers import output_role
from napari_unet._workers import ImageDone, ImageStarted, Progress
from napari_unet.widgets import UNetWidget


def blobs(seed=0, shape=(96, 96)):
    """A bright square on noise and strokes: id 1 = background, id 2 = square."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 1.0, shape).astype(np.float32)
    image[shape[0] // 4 : 3 * shape[0] // 4, shape[1] // 4 : 3 * shape[1] // 4] += 4.0
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:5, 4:-4] = 1
    labels[shape[0] // 2 - 1 : shape[0] // 2 + 2, shape[1] // 3 : 2 * shape[1] // 3] = 2
    return image, labels


def tiny(widget: UNetWidget, seconds: int = 3) -> UNetWidget:
    widget.training.form["depth"].value = 1
    widget.training.form["base_filters"].value = 4
    widget.training.form["patch_size"].value = 24
    widget.training.form["batch_size"].value = 2
    widget.training.basic["time_budget"].value = seconds
    widget.device_combo.setCurrentText("cpu")
    return widget


def learns_the_square(widget: UNetWidget) -> UNetWidget:
    """Tests that need a model that has learned the square train a fixed number of iterations (a time budget learns
    less on a loaded machine); the budget is only a safety net."""
    widget.training.form["iterations"].value = 300
    widget.training.basic["time_budget"].value = 120
    return widget


@pytest.fixture
def setup(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image, labels = blobs()
    viewer.add_image(image, name="cells", scale=(0.5, 0.25), translate=(3.0, 4.0))
    viewer.add_labels(labels, name="cells labels", scale=(0.5, 0.25), translate=(3.0, 4.0))
    widget = tiny(UNetWidget(viewer))
    viewer.window.add_dock_widget(widget)
    yield viewer, widget
    widget.shutdown()


def wait_idle(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def test_pickers_follow_layers(setup):
    viewer, widget = setup
    assert widget.data.image_combo.currentText() == "cells"
    assert widget.data.labels_combo.currentText() == "cells labels"
    viewer.add_image(np.zeros((10, 10)), name="other")
    assert "other" in [widget.data.image_combo.itemText(i) for i in range(widget.data.image_combo.count())]
    viewer.layers.remove("cells labels")
    assert widget.data.labels_combo.currentText() == ""
    layer = widget.data.new_labels_layer()
    assert widget.data.labels_combo.currentText() == layer.name
    assert layer.data.shape == viewer.layers[widget.data.image_combo.currentText()].data.shape
    assert layer.metadata["class_names"] == {1: "background", 2: "foreground"}
    for text in ("Train", "Stop", "Predict", "Segment all"):
        assert [
            b
            for b in (widget.train_button, widget.stop_button, widget.predict_button, widget.segment_all_button)
            if b.text() == text
        ]


def test_the_panels_scroll_in_a_short_dock_and_the_buttons_stay_in_view(make_napari_viewer, qtbot):
    """napari makes a docked widget's minimum height the window's: the panels with *Advanced settings* open are
    taller than a laptop screen, so they scroll, and the buttons below them stay on screen."""
    viewer = make_napari_viewer(show=True)
    widget = UNetWidget(viewer)
    viewer.window.add_dock_widget(widget)
    try:
        collapsed = widget.settings_area.widget().sizeHint().height()
        widget.training.advanced.expand(animate=False)
        qtbot.waitUntil(lambda: widget.settings_area.widget().sizeHint().height() > collapsed + 200)
        assert widget.minimumSizeHint().height() < 500
        viewer.window._qt_window.resize(1200, 600)
        qtbot.waitUntil(lambda: widget.settings_area.verticalScrollBar().maximum() > 0)
        assert widget.height() < 600
        for button in (widget.train_button, widget.stop_button, widget.segment_all_button):
            top = button.mapTo(widget, button.rect().topLeft()).y()
            assert top >= 0 and top + button.height() <= widget.height()
        widget.settings_area.ensureWidgetVisible(widget.prediction)
        assert widget.settings_area.verticalScrollBar().value() > 0  # the panels below the fold: scrolled to
    finally:
        widget.shutdown()


def test_train_previews_predict_and_labels_untouched(setup, qtbot, tmp_path):
    viewer, widget = setup
    labels_before = viewer.layers["cells labels"].data.copy()
    widget.preview_interval = 0.5
    learns_the_square(widget).train()
    assert widget.busy and not widget.train_button.isEnabled() and widget.stop_button.isEnabled()
    wait_idle(qtbot, widget)
    assert widget.last_error is None
    assert widget.train_button.isEnabled() and not widget.stop_button.isEnabled()
    assert widget.previews_shown >= 2
    probabilities = viewer.layers["cells probabilities"]
    segmentation = viewer.layers["cells segmentation"]
    assert probabilities.data.shape == (2, 96, 96)
    assert set(np.unique(segmentation.data)) <= {1, 2}
    assert widget.model is not None and widget.metadata["class_ids"] == [1, 2]
    assert widget.metadata["class_names"] == ["background", "foreground"]  # the widget's names by painted id

    widget.prediction.form["uncertainty"].value = True
    widget.predict()
    wait_idle(qtbot, widget)
    assert widget.last_error is None
    segmentation = viewer.layers["cells segmentation"]
    assert output_role(segmentation) == {"role": "segmentation", "source": "cells"}
    np.testing.assert_allclose(segmentation.scale, (0.5, 0.25))
    np.testing.assert_allclose(segmentation.translate, (3.0, 4.0))
    np.testing.assert_allclose(viewer.layers["cells probabilities"].scale, (1.0, 0.5, 0.25))
    assert viewer.layers["cells uncertainty"].data.shape == (96, 96)
    # The square is learned: the segmentation agrees with it on most pixels.
    truth = np.ones((96, 96), np.uint8)
    truth[24:72, 24:72] = 2
    assert (segmentation.data == truth).mean() > 0.8

    # Save, load into a fresh widget state, predict again: the same segmentation, replacing our own layers.
    first = segmentation.data.copy()
    path = widget.save_model(tmp_path / "model.safetensors")
    widget.model = widget.metadata = None
    widget.load_model(path)
    assert widget.metadata["class_ids"] == [1, 2] and widget.model_panel.finetune_check.isChecked()
    n_layers = len(viewer.layers)
    widget.predict()
    wait_idle(qtbot, widget)
    assert len(viewer.layers) == n_layers
    np.testing.assert_array_equal(viewer.layers["cells segmentation"].data, first)
    np.testing.assert_array_equal(viewer.layers["cells labels"].data, labels_before)
    assert viewer.layers["cells labels"].data.dtype == labels_before.dtype

    # Test-time flips and edge refinement (radius "auto") are on by default: the probabilities layer holds their
    # prediction; with "Snap to edges" off the flips alone, unticked flips one pass.
    from napari_unet import normalize_image, predict_tiled

    normalized = normalize_image(viewer.layers["cells"].data, widget.metadata["normalization"])
    assert widget.prediction.form["test_time_flips"].value and widget.prediction.form["refine_radius"].value == "auto"
    np.testing.assert_allclose(
        viewer.layers["cells probabilities"].data,
        predict_tiled(widget.model, normalized, test_time_flips=True, refine_radius="auto"),
        atol=1e-5,
    )
    for flips, radius in ((True, 0), (False, 0), (False, 2)):
        widget.prediction.form["test_time_flips"].value = flips
        widget.prediction.form["refine_radius"].value = radius
        widget.predict()
        wait_idle(qtbot, widget)
        np.testing.assert_allclose(
            viewer.layers["cells probabilities"].data,
            predict_tiled(widget.model, normalized, test_time_flips=flips, refine_radius=radius),
            atol=1e-5,
        )


def test_lazy_layer_predicts_tile_by_tile_into_memory_maps(setup, qtbot, tmp_path, monkeypatch):
    """A large image as the reader opens it (a dask view of its file) is predicted without a copy, and
    outputs above the memory limit are memory maps; both give what the in-memory layer gives."""
    import tifffile

    from napari_unet import _layers, _reader, arrays

    viewer, widget = setup
    widget.train()
    wait_idle(qtbot, widget)
    widget.prediction.form["uncertainty"].value = True
    widget.predict()
    wait_idle(qtbot, widget)
    expected = {
        role: np.array(viewer.layers[f"cells {role}"].data) for role in ("probabilities", "segmentation", "uncertainty")
    }

    tifffile.imwrite(tmp_path / "big.tif", viewer.layers["cells"].data)
    monkeypatch.setattr(_reader, "LAZY_READ_BYTES", 0)
    monkeypatch.setattr(arrays, "IN_MEMORY_OUTPUT_BYTES", 0)
    [(data, kwargs, _)] = _reader.read_tiff(str(tmp_path / "big.tif"))
    lazy = viewer.add_image(data, **kwargs)
    assert not isinstance(lazy.data, np.ndarray) and _layers.image_array(lazy) is lazy.data
    widget.data.image_combo.setCurrentText("big")
    widget.predict()
    wait_idle(qtbot, widget)
    assert widget.last_error is None
    for role, values in expected.items():
        output = viewer.layers[f"big {role}"].data
        assert isinstance(output, np.memmap), role
        np.testing.assert_allclose(output, values, atol=1e-5, err_msg=role)


def test_a_painting_layer_beyond_the_memory_limit_is_a_memory_map_the_trainer_reads(setup, qtbot, monkeypatch):
    from napari_unet import arrays

    viewer, widget = setup
    monkeypatch.setattr(arrays, "IN_MEMORY_OUTPUT_BYTES", 0)
    layer = widget.data.new_labels_layer()
    assert isinstance(layer.data, np.memmap)
    layer.data[:] = viewer.layers["cells labels"].data  # painted into the map
    widget.data.labels_combo.setCurrentText(layer.name)
    widget.train()
    wait_idle(qtbot, widget)
    assert widget.last_error is None and widget.metadata["class_ids"] == [1, 2]


def test_segment_all_goes_on_past_an_image_whose_file_cannot_be_read(setup, qtbot, tmp_path, monkeypatch):
    import tifffile

    from napari_unet import UNet, _reader
    from napari_unet.io import write_tiff

    viewer, widget = setup
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    widget.set_model(UNet(n_classes=2, depth=1, base_filters=4).eval(), {"class_ids": [1, 2]}, "test")
    path = write_tiff(tmp_path / "broken.tif", (np.random.default_rng(0).random((8, 64, 64)) * 255).astype(np.uint8))
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[5].dataoffsets[0], tif.pages[5].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(count)  # zeroes for plane 5's compressed strip
    path.write_bytes(bytes(data))
    monkeypatch.setattr(_reader, "LAZY_READ_BYTES", 0)  # opened lazily: nothing read yet
    [(lazy, kwargs, _)] = _reader.read_tiff(str(path))
    viewer.add_image(lazy, **kwargs)
    viewer.layers.move(len(viewer.layers) - 1, 0)  # first in line: the images after it must still be segmented
    assert [la.name for la in widget.data.image_layers()] == ["broken", "cells"]
    widget.segment_all()
    wait_idle(qtbot, widget)
    assert "broken" in widget.last_error and "not a readable TIFF" in widget.last_error
    assert "cells segmentation" in viewer.layers and "broken segmentation" not in viewer.layers


def test_stop_returns_to_idle_quickly_and_keeps_model(setup, qtbot):
    viewer, widget = setup
    widget.training.basic["time_budget"].value = 600
    widget.train()
    qtbot.waitUntil(lambda: widget._trainer is not None and widget._trainer.iteration > 2, timeout=30_000)
    started = time.monotonic()
    qtbot.mouseClick(widget.stop_button, __import__("qtpy").QtCore.Qt.MouseButton.LeftButton)
    wait_idle(qtbot, widget, timeout=10_000)
    took = time.monotonic() - started
    assert took < 2.0, f"Stop took {took:.2f} s"
    assert widget.model is not None
    assert widget.train_button.isEnabled()


def test_a_run_stopped_before_its_first_step_keeps_the_current_model(setup, qtbot):
    """Train a fresh network (fine-tuning off) and Stop at once: nothing was learned, so the model trained before
    stays current (an untrained network replaced it, and Predict painted every pixel one class)."""
    viewer, widget = setup
    torch.manual_seed(0)
    earlier = UNet(n_classes=2, depth=1, base_filters=4).eval()
    widget.set_model(earlier, {"class_ids": [1, 2]}, "test")
    widget.model_panel.finetune_check.setChecked(False)
    start = len(notification_manager.records)
    widget.train()
    widget.stop()
    wait_idle(qtbot, widget, timeout=30_000)
    assert widget.model is earlier and widget.last_error is None
    assert any("stopped before its first iteration; the current model is kept" in m for m in _messages(start))


def test_a_button_that_cannot_start_replaces_an_earlier_failure_on_the_status_line(setup):
    """A refusal (no model, a setting out of range) said so in a notification only: the status line and
    ``last_error`` kept the previous run's failure, which then read as the reason for this one."""
    viewer, widget = setup
    widget.last_error = "U-Net training failed: an earlier problem"
    widget.status_label.setText(widget.last_error)
    widget.predict()  # no model yet
    assert widget.last_error == "U-Net: there is no model yet: Train or load one first"
    assert widget.status_label.text() == widget.last_error and not widget.busy
    widget.status_label.setText("Idle")
    widget.segment_all()
    assert widget.status_label.text() == widget.last_error == "U-Net: there is no model yet: Train or load one first"


def test_a_prediction_napari_cannot_show_is_an_error_not_a_silent_stall(setup, qtbot, monkeypatch):
    """An exception while the outputs become layers (napari refusing a colormap, say) left the status line on
    "Predicting ..." with no message; now it names the image and the cause, and the widget is idle again."""
    import napari_unet.widgets.unet_widget as unet_widget

    viewer, widget = setup
    widget.set_model(UNet(n_classes=2, depth=1, base_filters=4).eval(), {"class_ids": [1, 2]}, "test")

    def refusing(*args, **kwargs):
        raise RuntimeError("cannot draw these labels")

    monkeypatch.setattr(unet_widget, "output_layer", refusing)
    widget.predict()
    wait_idle(qtbot, widget)
    assert widget.last_error == "U-Net: cannot show the prediction of cells: RuntimeError: cannot draw these labels"
    assert widget.status_label.text() == widget.last_error and widget.predict_button.isEnabled()


def test_strokes_painted_while_training_reach_the_trainer(setup, qtbot, monkeypatch):
    viewer, widget = setup
    widget.training.basic["time_budget"].value = 600
    sent = []
    widget.train()
    qtbot.waitUntil(lambda: widget._trainer is not None, timeout=30_000)
    trainer = widget._trainer
    original = trainer.update_labels_later
    monkeypatch.setattr(trainer, "update_labels_later", lambda i, lab: (sent.append(lab), original(i, lab)))
    layer = viewer.layers["cells labels"]
    layer.paint((80, 80), 2, refresh=True)
    qtbot.waitUntil(lambda: bool(sent), timeout=5_000)
    assert sent[-1] is layer.data  # no copy on the GUI thread: the trainer reads the layer on its own thread
    painted = (layer.data == 2).sum()
    qtbot.waitUntil(lambda: trainer.sampler.class_counts(2)[1] == painted, timeout=10_000)
    from napari_unet.widgets import live_training

    warnings = []
    monkeypatch.setattr(live_training, "show_warning", warnings.append)
    layer.paint((20, 20), 7, refresh=True)  # a class the model being trained does not have
    qtbot.waitUntil(lambda: any("does not know" in w for w in warnings), timeout=10_000)
    assert "'cells labels'" in warnings[-1]  # names the layer
    assert trainer.sampler.class_counts(2)[1] == painted  # the strokes before it are still used
    widget.stop()
    wait_idle(qtbot, widget)


def test_segment_all_three_images(setup, qtbot):
    viewer, widget = setup
    widget.train()
    wait_idle(qtbot, widget)
    viewer.add_image(blobs(1, (64, 80))[0], name="second", scale=(2.0, 2.0))
    viewer.add_image(np.stack([blobs(2, (50, 60))[0]] * 3), name="stack", scale=(3.0, 1.0, 1.0))
    before = viewer.layers["cells labels"].data.copy()
    widget.segment_all()
    wait_idle(qtbot, widget)
    assert widget.last_error is None
    for name, shape, scale in (
        ("cells", (96, 96), (0.5, 0.25)),
        ("second", (64, 80), (2.0, 2.0)),
        ("stack", (3, 50, 60), (3.0, 1.0, 1.0)),
    ):
        seg = viewer.layers[f"{name} segmentation"]
        prob = viewer.layers[f"{name} probabilities"]
        assert seg.data.shape == shape and prob.data.shape == (2, *shape)
        np.testing.assert_allclose(seg.scale, scale)
        np.testing.assert_allclose(prob.scale, (1.0, *scale))
        np.testing.assert_allclose(prob.data.sum(axis=0), 1.0, atol=1e-4)
    # Our own outputs are not segmented again, and the user's labels are untouched.
    assert not any("probabilities probabilities" in layer.name for layer in viewer.layers)
    np.testing.assert_array_equal(viewer.layers["cells labels"].data, before)


OUTPUTS = ("probabilities", "segmentation")


def test_an_image_unlike_the_training_images_is_a_notification_and_its_outputs_hold_the_figures(
    setup, qtbot, monkeypatch
):
    """Segment all after training: the image whose upper percentile sits on bright specks (its square lands near
    the background level) gets one warning naming its layer; every output layer holds its image's figures."""
    from napari_unet.widgets import unet_widget

    viewer, widget = setup
    learns_the_square(widget).train()
    wait_idle(qtbot, widget)
    assert widget.metadata["training_profile"]["images"][0]["class_fractions"]
    specks = viewer.layers["cells"].data.copy()
    specks[np.random.default_rng(1).random(specks.shape) < 0.02] = 100.0
    viewer.add_image(specks, name="specks")
    warnings = []
    monkeypatch.setattr(unet_widget, "show_warning", warnings.append)
    widget.segment_all()
    wait_idle(qtbot, widget)
    assert widget.last_error is None
    assert len(warnings) == 1 and warnings[0].startswith("U-Net: 'specks' looks unlike the training images (score")
    assert warnings[0].endswith("paint a few strokes on it and train on")
    for name, unlike in (("cells", False), ("specks", True)):
        records = [viewer.layers[f"{name} {role}"].metadata[unet_widget.DOMAIN_KEY] for role in OUTPUTS]
        assert all(r == records[0] for r in records) and records[0]["unlike"] is unlike
        assert (records[0]["score"] > records[0]["threshold"]) is unlike and records[0]["reason"]
        assert output_role(viewer.layers[f"{name} segmentation"]) == {"role": "segmentation", "source": name}

    # A model file from before the check (no training profile): no warning, and the old figures go.
    n_layers = len(viewer.layers)
    widget.set_model(widget.model, {k: v for k, v in widget.metadata.items() if k != "training_profile"}, "old")
    warnings.clear()
    widget.segment_all()
    wait_idle(qtbot, widget)
    assert warnings == [] and len(viewer.layers) == n_layers  # the same output layers, replaced
    assert not any(unet_widget.DOMAIN_KEY in viewer.layers[f"specks {role}"].metadata for role in OUTPUTS)


def test_worker_error_becomes_notification(setup, qtbot):
    viewer, widget = setup
    layer = viewer.layers["cells labels"]
    layer.data = np.where(layer.data == 2, 0, layer.data).astype(np.uint8)  # one class only
    count = len(notification_manager.records)
    widget.train()
    wait_idle(qtbot, widget)
    errors = [n for n in notification_manager.records[count:] if n.severity == NotificationSeverity.ERROR]
    assert errors and "training failed" in errors[-1].message and "one class" in errors[-1].message
    assert widget.train_button.isEnabled() and not widget.busy


def test_event_loop_stays_responsive_while_training(setup, qtbot, record_property):
    """A 10 ms QTimer heartbeat: the largest gap between beats while training runs on the CPU."""
    from qtpy.QtCore import QTimer

    viewer, widget = setup
    widget.training.form["depth"].value = 2
    widget.training.form["base_filters"].value = 8
    widget.training.form["patch_size"].value = 64
    widget.training.basic["time_budget"].value = 8
    widget.preview_interval = 1.0
    beats, training = [], []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: beats.append(time.perf_counter()))
    timer.start()
    widget.train()
    widget._worker.yielded.connect(lambda m: isinstance(m, Progress) and training.append(time.perf_counter()))
    wait_idle(qtbot, widget)
    timer.stop()
    beats = np.asarray(beats)
    start, end = training[0], training[-1]
    during = np.diff(beats[(beats >= start) & (beats <= end)])
    worst = float(during.max()) * 1000
    overall = float(np.diff(beats).max()) * 1000
    record_property("max_gap_ms", worst)
    print(
        f"heartbeat while training: {during.size} gaps, max {worst:.1f} ms, 99th percentile "
        f"{np.percentile(during, 99) * 1000:.1f} ms; including preparation and layer creation: "
        f"max {overall:.1f} ms; {len(training)} iterations, {widget.previews_shown} previews"
    )
    assert widget.previews_shown >= 2
    assert worst < 100, f"the event loop stalled for {worst:.0f} ms while training"


def test_closing_the_viewer_stops_training(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    image, labels = blobs()
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="cells labels")
    widget = tiny(UNetWidget(viewer), seconds=600)
    viewer.window.add_dock_widget(widget)
    widget.train()
    qtbot.waitUntil(lambda: widget._trainer is not None and widget._trainer.iteration > 0, timeout=30_000)
    worker = widget._worker
    started = time.monotonic()
    viewer.close()
    assert not worker.is_running and not widget.busy
    assert time.monotonic() - started < 5.0


def test_closing_a_shown_viewer_with_the_widget_docked_raises_nothing(make_napari_viewer, qtbot):
    """The viewer's window closes while Python clears the widget (the window's event filter still installed): an
    exception there aborts a PyQt6 process that has no exception hook (a script, a notebook)."""
    viewer = make_napari_viewer(show=True)
    widget = UNetWidget(viewer)
    viewer.window.add_dock_widget(widget)
    qtbot.wait(50)
    del widget
    viewer.close()
    gc.collect()
    qtbot.wait(50)


def test_removing_the_dock_widget_stops_training(setup, qtbot):
    viewer, widget = setup
    widget.training.basic["time_budget"].value = 600
    widget.train()
    qtbot.waitUntil(lambda: widget._trainer is not None and widget._trainer.iteration > 0, timeout=30_000)
    worker = widget._worker
    viewer.window.remove_dock_widget(widget)
    assert not worker.is_running and not widget.busy


def test_rgb_image_trains_predicts_and_segment_all_skips_other_channel_counts(make_napari_viewer, qtbot):
    """An RGB layer whose square differs from the background only in hue: training sees the three colour
    channels and learns it; Segment all then leaves a grey image (one channel) alone."""
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    rgb = rng.normal(100, 10, (96, 96, 3))
    square = np.zeros((96, 96), bool)
    square[24:72, 24:72] = True
    rgb[..., 0] += np.where(square, 0, 100)
    rgb[..., 1] += np.where(square, 100, 0)
    viewer.add_image(np.clip(rgb, 0, 255).astype(np.uint8), name="colour", rgb=True)
    viewer.add_labels(blobs()[1], name="colour labels")
    viewer.add_image(rgb.mean(-1), name="grey")
    widget = tiny(UNetWidget(viewer), seconds=5)
    viewer.window.add_dock_widget(widget)
    try:
        widget.data.image_combo.setCurrentText("colour")
        widget.data.labels_combo.setCurrentText("colour labels")
        widget.train()
        wait_idle(qtbot, widget)
        assert widget.last_error is None and widget.model.in_channels == 3
        widget.segment_all()
        wait_idle(qtbot, widget)
        assert widget.last_error is None
        segmentation = viewer.layers["colour segmentation"].data
        assert segmentation.shape == (96, 96) and viewer.layers["colour probabilities"].data.shape == (2, 96, 96)
        assert (segmentation == np.where(square, 2, 1)).mean() > 0.8
        assert "grey segmentation" not in viewer.layers
        assert "1 channel" in widget.fit_problem(viewer.layers["grey"])
    finally:
        widget.shutdown()


def test_channel_layers_of_a_file_train_and_segment_as_one_image(make_napari_viewer, qtbot, tmp_path):
    """A two-channel TIFF opens as 'name [ch0]' / 'name [ch1]'; with 'Combine channel layers' they train as one
    two-channel image (the square shows only in channel 1), Predict puts results on the [ch0] layer, and Segment
    all segments each channel group once and leaves single-channel images alone."""
    import tifffile

    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    square = np.zeros((96, 96), bool)
    square[24:72, 24:72] = True
    for name in ("a", "b"):
        channels = np.stack([rng.normal(100, 10, (96, 96)), rng.normal(100, 10, (96, 96)) + 80 * square])
        tifffile.imwrite(tmp_path / f"{name}.tif", channels.astype(np.float32), imagej=True, metadata={"axes": "CYX"})
        viewer.open(str(tmp_path / f"{name}.tif"), plugin="napari-unet")
    assert [la.name for la in viewer.layers] == ["a [ch0]", "a [ch1]", "b [ch0]", "b [ch1]"]
    viewer.add_image(rng.normal(100, 10, (96, 96)), name="grey")
    viewer.add_labels(blobs()[1], name="a labels")
    widget = learns_the_square(tiny(UNetWidget(viewer)))
    viewer.window.add_dock_widget(widget)
    try:
        widget.data.image_combo.setCurrentText("a [ch1]")
        widget.data.labels_combo.setCurrentText("a labels")
        assert widget.data.input_layers(viewer.layers["a [ch1]"]) == [viewer.layers["a [ch1]"]]  # not ticked
        widget.data.channels_check.setChecked(True)
        assert widget.data.channels_check.text() == "Combine channel layers (2 channels)"
        assert widget.data.input_layers(viewer.layers["a [ch1]"]) == [
            viewer.layers["a [ch0]"],
            viewer.layers["a [ch1]"],
        ]
        combined = widget.data.input_image(viewer.layers["a [ch1]"])
        assert not isinstance(combined, np.ndarray)  # stacked lazily: the GUI thread copies nothing
        np.testing.assert_array_equal(
            np.asarray(combined), np.stack([viewer.layers[f"a [ch{c}]"].data for c in (0, 1)])
        )
        widget.train()
        wait_idle(qtbot, widget)
        assert widget.last_error is None and widget.model.in_channels == 2
        widget.predict()
        wait_idle(qtbot, widget)
        assert (viewer.layers["a [ch0] segmentation"].data == np.where(square, 2, 1)).mean() > 0.8
        widget.segment_all()
        wait_idle(qtbot, widget)
        assert widget.last_error is None
        outputs = sorted(la.name for la in viewer.layers if (output_role(la) or {}).get("role") == "segmentation")
        assert outputs == ["a [ch0] segmentation", "b [ch0] segmentation"]
        assert (viewer.layers["b [ch0] segmentation"].data == np.where(square, 2, 1)).mean() > 0.8
        widget.data.channels_check.setChecked(False)
        assert "tick 'Combine channel layers'" in widget.fit_problem(viewer.layers["b [ch1]"])
        assert "1 channel" in widget.fit_problem(viewer.layers["grey"])
    finally:
        widget.shutdown()


def test_train_on_every_painted_image_pairs_labels_by_name_and_takes_new_strokes(setup, qtbot):
    """With 'Train on every painted image', the chosen pair comes first and each other painted labels layer trains
    with the image its name starts with; strokes painted in any of them during training reach the trainer."""
    from napari_unet._layers import painted_pairs

    viewer, widget = setup
    image2, labels2 = blobs(seed=1)
    viewer.add_image(image2, name="cells2")
    viewer.add_labels(labels2, name="cells2 strokes")
    viewer.add_labels(np.zeros_like(labels2), name="cells2 empty")  # nothing painted: left out
    viewer.add_image(np.zeros((50, 50)), name="other")
    viewer.add_labels(labels2[:50, :50], name="other labels")  # pairs with "other"
    pairs = painted_pairs(widget.data.image_layers(), widget.data.labels_layers())
    assert [(im.name, lab.name) for im, lab in pairs] == [
        ("cells", "cells labels"),
        ("cells2", "cells2 strokes"),
        ("other", "other labels"),
    ]
    widget.data.image_combo.setCurrentText("cells")
    widget.data.labels_combo.setCurrentText("cells labels")
    widget.data.all_images_check.setChecked(True)
    widget.training.basic["time_budget"].value = 6
    widget.train()
    qtbot.waitUntil(lambda: widget._trainer is not None, timeout=30_000)
    trainer = widget._trainer
    assert trainer._shapes == [(96, 96), (96, 96), (50, 50)]
    more = viewer.layers["cells2 strokes"].data.copy()
    more[80:90, 10:60] = 1
    viewer.layers["cells2 strokes"].data = more
    wait_idle(qtbot, widget)
    assert widget.last_error is None
    painted = sum(
        np.bincount(viewer.layers[name].data.ravel(), minlength=3)[1:3]
        for name in ("cells labels", "cells2 strokes", "other labels")
    )
    np.testing.assert_array_equal(trainer.sampler.class_counts(2), painted)
    assert "cells probabilities" in viewer.layers and "cells2 probabilities" not in viewer.layers  # previews


def test_export_for_bioimageio_runs_on_a_worker(setup, qtbot, tmp_path):
    pytest.importorskip("bioimageio.spec")
    from bioimageio.spec import load_description
    from bioimageio.spec.model.v0_5 import ModelDescr

    viewer, widget = setup
    assert not widget.model_panel.export_button.isEnabled()  # no model yet
    widget.train()
    wait_idle(qtbot, widget)
    assert widget.model_panel.export_button.isEnabled()
    widget.export_bioimageio(tmp_path / "cells.zip")
    assert widget.busy and not widget.model_panel.export_button.isEnabled()
    wait_idle(qtbot, widget)
    assert widget.last_error is None
    description = load_description(tmp_path / "cells.zip")
    assert isinstance(description, ModelDescr) and description.name == "cells"
    assert description.config.napari_unet["class_ids"] == widget.metadata["class_ids"]


# --- layers renamed or removed while a run uses them; stop and close during prediction --------------------------


def _outputs_without_source(viewer) -> list[str]:
    names = {layer.name for layer in viewer.layers}
    return [la.name for la in viewer.layers if output_role(la) and output_role(la)["source"] not in names]


def _messages(start: int, severity=None) -> list[str]:
    return [n.message for n in notification_manager.records[start:] if severity is None or n.severity == severity]


def _training_with_a_preview(widget, qtbot) -> int:
    """Start a long training with frequent previews and wait for the first; the notification count before it."""
    widget.training.basic["time_budget"].value = 600
    widget.preview_interval = 0.2
    count = len(notification_manager.records)
    widget.train()
    qtbot.waitUntil(lambda: widget.previews_shown >= 1, timeout=30_000)
    return count


def test_renaming_the_image_while_training_takes_its_previews_along(setup, qtbot):
    viewer, widget = setup
    count = _training_with_a_preview(widget, qtbot)
    viewer.layers["cells"].name = "renamed"
    shown = widget.previews_shown
    qtbot.waitUntil(lambda: widget.previews_shown > shown + 1, timeout=30_000)
    widget.stop()
    wait_idle(qtbot, widget)
    names = [la.name for la in viewer.layers]
    assert "renamed probabilities" in names and "renamed segmentation" in names
    assert not any(name.startswith("cells ") and name != "cells labels" for name in names)  # no orphan previews
    assert output_role(viewer.layers["renamed segmentation"]) == {"role": "segmentation", "source": "renamed"}
    assert any("'cells' was renamed 'renamed' during training" in m for m in _messages(count))
    assert widget.model is not None and widget.last_error is None


def test_new_image_data_of_another_shape_while_training_ends_the_previews_with_a_warning(setup, qtbot):
    """``layer.data = other`` of another shape mid-run: every preview raised a broadcast error in a Qt slot (and the
    preview layers were remade at the new shape). Now one warning, no more previews, the run goes on to its end."""
    viewer, widget = setup
    count = _training_with_a_preview(widget, qtbot)
    shown = widget.previews_shown
    viewer.layers["cells"].data = np.zeros((120, 130), np.float32)
    qtbot.wait(1500)  # several preview intervals
    widget.stop()
    wait_idle(qtbot, widget)
    assert widget.previews_shown == shown and widget.model is not None and widget.last_error is None
    warned = [m for m in _messages(count) if "'cells' changed shape during training ((96, 96) -> (120, 130))" in m]
    assert len(warned) == 1 and viewer.layers["cells segmentation"].data.shape == (96, 96)


@pytest.mark.parametrize("removed", ["cells", "cells labels"])
def test_removing_the_image_or_labels_while_training_keeps_training_and_says_so(setup, qtbot, removed):
    viewer, widget = setup
    widget.training.basic["time_budget"].value = 600
    widget.preview_interval = 0.2
    count = len(notification_manager.records)
    widget.train()
    qtbot.waitUntil(lambda: widget.previews_shown >= 1, timeout=30_000)
    viewer.layers.remove(removed)
    iteration = widget._trainer.iteration
    qtbot.waitUntil(lambda: widget._trainer is not None and widget._trainer.iteration > iteration + 3, timeout=30_000)
    widget.stop()
    wait_idle(qtbot, widget)
    warnings = _messages(count, NotificationSeverity.WARNING)
    assert any(f"'{removed}' was removed during training" in m for m in warnings)
    assert _outputs_without_source(viewer) == []
    if removed == "cells":
        assert [la.name for la in viewer.layers] == ["cells labels"]  # its previews went with it
    assert widget.model is not None and widget.last_error is None and not widget.busy


def _predict_with(viewer, widget, qtbot, monkeypatch, act):
    """Segment all open images (the trained 'cells' and a second one, 'other'), calling ``act(message)`` after the
    widget's own handler for every message of the worker (connected before it starts: none is missed)."""
    widget.train()
    wait_idle(qtbot, widget)
    for layer in [la for la in viewer.layers if output_role(la)]:
        viewer.layers.remove(layer)
    viewer.add_image(blobs(seed=1)[0], name="other")
    count = len(notification_manager.records)
    handle = widget._on_predict_message

    def both(message):
        handle(message)
        act(message)

    monkeypatch.setattr(widget, "_on_predict_message", both)
    widget.segment_all()
    wait_idle(qtbot, widget)
    return [la.name for la in viewer.layers], count


def test_renaming_or_removing_images_while_predicting(setup, qtbot, monkeypatch):
    viewer, widget = setup

    def change(message):  # while 'cells' is predicted, 'other' waits its turn
        if isinstance(message, ImageStarted) and message.name == "cells":
            viewer.layers["cells"].name = "renamed"
            viewer.layers.remove("other")

    names, count = _predict_with(viewer, widget, qtbot, monkeypatch, change)
    assert names.count("renamed segmentation") == 1 and not any(n.startswith(("cells s", "cells p")) for n in names)
    assert output_role(viewer.layers["renamed segmentation"])["source"] == "renamed"
    assert not any(n.startswith("other") for n in names) and _outputs_without_source(viewer) == [], names
    assert any("'other' was removed during prediction" in m for m in _messages(count, NotificationSeverity.WARNING))
    assert widget.last_error is None


def test_an_image_removed_after_its_outputs_were_shown_takes_them_along(setup, qtbot, monkeypatch):
    viewer, widget = setup

    def remove(message):  # 'cells' is done and shown; 'other' is still to come
        if isinstance(message, ImageDone) and message.result.name == "cells":
            viewer.layers.remove("cells")

    names, count = _predict_with(viewer, widget, qtbot, monkeypatch, remove)
    assert not any(n.startswith("cells ") and n != "cells labels" for n in names), names
    assert "other segmentation" in names and _outputs_without_source(viewer) == []
    assert any("'cells' was removed during prediction" in m for m in _messages(count, NotificationSeverity.WARNING))
    assert widget.last_error is None


def _long_prediction(viewer, widget, monkeypatch):
    """A tiny model on a 2000 x 2000 image with flips: many seconds on a 2-core CPU. Returns a list that holds
    the time the network began (the first tile read)."""
    from napari_unet import UNet, tiling
    from napari_unet.normalization import PERCENTILE_RECIPE

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    viewer.add_image(np.random.default_rng(0).random((2000, 2000), dtype=np.float32), name="large")
    widget.data.image_combo.setCurrentText("large")
    metadata = {"class_ids": [1, 2], "normalization": dict(PERCENTILE_RECIPE)}
    widget.set_model(UNet(n_classes=2, depth=2, base_filters=8).eval(), metadata, "test")
    widget.prediction.form["test_time_flips"].value = True
    started, read_tile = [], tiling.read_tile
    monkeypatch.setattr(tiling, "read_tile", lambda *a: started.append(time.monotonic()) or read_tile(*a))
    widget.predict()
    return started


def test_stop_during_prediction_is_a_stop_within_a_second(setup, qtbot, monkeypatch):
    viewer, widget = setup
    count = len(notification_manager.records)
    started = _long_prediction(viewer, widget, monkeypatch)
    qtbot.waitUntil(lambda: bool(started), timeout=60_000)
    qtbot.wait(300)  # in the middle of the first (flipped) batch
    asked = time.monotonic()
    widget.stop()
    wait_idle(qtbot, widget, timeout=10_000)
    took = time.monotonic() - asked
    assert took < 1.0, f"Stop took {took:.2f} s"
    assert widget.last_error is None and not _messages(count, NotificationSeverity.ERROR)
    assert widget.status_label.text() == "Prediction stopped"
    assert "large segmentation" not in viewer.layers


def test_closing_the_viewer_during_a_long_prediction_ends_the_worker(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer(show=True)
    widget = tiny(UNetWidget(viewer))
    viewer.window.add_dock_widget(widget)
    started = _long_prediction(viewer, widget, monkeypatch)
    qtbot.waitUntil(lambda: bool(started), timeout=60_000)
    qtbot.wait(300)
    worker = widget._worker
    closing = time.monotonic()
    viewer.close()
    assert not worker.is_running and not widget.busy
    assert time.monotonic() - closing < 3.0


def test_training_sizes_beyond_the_memory_are_a_message_and_leave_no_empty_previews(setup, qtbot, monkeypatch):
    from napari_unet import memory

    viewer, widget = setup
    widget.training.form["patch_size"].value = 512
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 8 * 1024**2)
    count = len(notification_manager.records)
    widget.train()
    wait_idle(qtbot, widget)
    errors = _messages(count, NotificationSeverity.ERROR)
    assert errors and "training failed" in errors[-1] and "more than the 8.0 MiB free on cpu" in errors[-1]
    assert "patch size" in errors[-1]
    assert [la.name for la in viewer.layers] == ["cells", "cells labels"]


def test_out_of_memory_while_predicting_is_retried_and_said(setup, qtbot):
    import math

    import torch

    from napari_unet import UNet, predict_tiled
    from napari_unet.normalization import normalize_image

    class OutOfMemoryAbove(UNet):
        limit = 0

        def forward(self, x):
            if x.numel() > self.limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
            return super().forward(x)

    viewer, widget = setup
    torch.manual_seed(0)
    model = OutOfMemoryAbove(n_classes=2, depth=1, base_filters=4).eval()
    OutOfMemoryAbove.limit = math.prod(model.legal_input_shape(40))
    widget.set_model(model, {"class_ids": [1, 2]}, "test")
    widget.prediction.form["test_time_flips"].value = False
    widget.prediction.form["refine_radius"].value = 0
    widget.predict()
    wait_idle(qtbot, widget)
    assert widget.last_error is None
    assert widget.last_warning.startswith("U-Net: out of memory on cpu")
    plain = UNet(n_classes=2, depth=1, base_filters=4).eval()
    plain.load_state_dict(model.state_dict())
    image = normalize_image(viewer.layers["cells"].data, None)
    expected = predict_tiled(plain, image).argmax(0) + 1
    np.testing.assert_array_equal(viewer.layers["cells segmentation"].data, expected)


def test_labels_are_complete_option_trains_with_0_as_a_class(setup, qtbot):
    """A dense Labels layer (an imported ground truth): with the option, 0 is a class and the model's classes are
    the layer's values, so its predictions come back with them."""
    viewer, widget = setup
    image, _ = blobs()
    dense = np.zeros(image.shape, np.uint8)
    dense[24:72, 24:72] = 1
    dense[22:26, 22:74] = 255  # a band with no label
    viewer.layers["cells labels"].data = dense
    widget.data.dense_check.setChecked(True)
    widget.training.form["iterations"].value = 5
    widget.train()
    wait_idle(qtbot, widget)
    assert widget.metadata["class_ids"] == [0, 1] and widget.metadata["dense_labels"] is True


def test_train_from_a_dataset_folder_shows_validation_and_keeps_the_best_model(setup, qtbot, tmp_path):
    from test_datasets import make_plain

    viewer, widget = setup
    make_plain(tmp_path, count=3, suffix=".png")
    widget.train_dataset(tmp_path, epochs=2)
    assert widget.busy and not widget.dataset_button.isEnabled()
    wait_idle(qtbot, widget)
    assert widget.last_error is None
    assert widget.validation_text.startswith("Epoch 2: validation mean IoU")
    assert widget.metadata["class_ids"] == [0, 1] and "dataset_training" in widget.metadata
    assert widget.dataset_button.isEnabled()
    (tmp_path / "masks" / "cell0.png").unlink()
    widget.train_dataset(tmp_path)
    wait_idle(qtbot, widget)
    assert "cell0.png has no mask" in widget.last_error


def test_the_background_choice_is_stored_and_applied_by_predict(setup, qtbot):
    """*Normalization* "robust, uneven background subtracted" on an image with a ramp: training stores the recipe,
    and Predict gives what the engine gives on the image normalized with it (the fields subtracted), not what the
    robust recipe alone gives."""
    from napari_unet import predict_tiled
    from napari_unet.normalization import BACKGROUND_RECIPE, ROBUST_RECIPE, normalize_image

    viewer, widget = setup
    image = viewer.layers["cells"].data
    ramped = (image + np.linspace(0.0, 2.0, image.shape[1])[None, :]).astype(np.float32)
    viewer.layers["cells"].data = ramped
    widget.training.form["normalization"].value = BACKGROUND_RECIPE
    widget.training.form["iterations"].value = 5
    widget.train()
    wait_idle(qtbot, widget)
    assert widget.last_error is None and widget.metadata["normalization"] == BACKGROUND_RECIPE
    widget.prediction.form["test_time_flips"].value = False
    widget.prediction.form["refine_radius"].value = 0
    widget.predict()
    wait_idle(qtbot, widget)
    predicted = viewer.layers["cells probabilities"].data
    np.testing.assert_allclose(
        predicted, predict_tiled(widget.model, normalize_image(ramped, BACKGROUND_RECIPE)), atol=1e-5
    )
    without = predict_tiled(widget.model, normalize_image(ramped, ROBUST_RECIPE))
    assert np.abs(predicted - without).max() > 0.01


def test_training_the_same_strokes_again_gives_the_same_model(setup, qtbot):
    """Seeded: two trainings of a new model that their iteration count ends are the same model, bit for bit, though
    the live preview runs beside them and a time budget is set (it does not end them)."""
    viewer, widget = setup
    widget.training.form["iterations"].value = 12
    widget.training.basic["time_budget"].value = 600
    weights = []
    for _ in range(2):
        widget.model_panel.finetune_check.setChecked(False)
        widget.train()
        wait_idle(qtbot, widget)
        weights.append({k: v.clone() for k, v in widget.model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_class_ids_beyond_what_direct_colours_draw_get_a_colormap_napari_can_draw():
    """Painted ids above 65,536 (uint32 labels): without numba (optional in napari) a direct colormap raised at every
    draw of the preview and segmentation layers, and Predict showed no segmentation. Such ids get napari's default
    colours; small ids keep their class colours and a transparent background class."""
    from napari.utils.colormaps import DirectLabelColormap

    from napari_unet._layers import segmentation_colormap

    values = np.array([0, 1, 70_000], np.uint32)
    colours = segmentation_colormap([1, 70_000], ["background", "cell"]).map(values)
    assert colours.shape == (3, 4) and np.isfinite(colours).all()
    small = segmentation_colormap([1, 2], ["background", "nucleus"])
    assert isinstance(small, DirectLabelColormap)
    assert small.map(np.array([1], np.uint32))[0, 3] == 0 and small.map(np.array([2], np.uint32))[0, 3] == 1
