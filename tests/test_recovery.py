"""The widget's recovery file (``widgets/recovery.py``): written while the widget trains and when training ends,
offered by the next widget, loaded by Recover, removed by Save and Discard; writes never make the GUI wait."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_unet.io import load_model, save_model
from napari_unet.training import Trainer, TrainingSettings
from napari_unet.widgets import UNetWidget, unet_widget
from napari_unet.widgets.recovery import RECORD_KEY, RecoveryFile, read_offer, recovery_path

TINY = dict(depth=1, base_filters=4, patch_size=16, batch_size=2, device="cpu", cpu_threads=1, specks=0.0)


def _image_and_strokes(shape=(64, 64)):
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 1.0, shape).astype(np.float32)
    image[:, shape[1] // 2 :] += 4.0
    labels = np.zeros(shape, np.uint8)
    labels[4:-4, 4:7], labels[4:-4, -7:-4] = 1, 2
    return image, labels


def _tiny_widget(viewer, seconds=3):
    widget = UNetWidget(viewer)
    widget.training.form["depth"].value = 1
    widget.training.form["base_filters"].value = 4
    widget.training.form["patch_size"].value = 24
    widget.training.form["batch_size"].value = 2
    widget.training.basic["time_budget"].value = seconds
    widget.training.preview_check.setChecked(False)
    widget.device_combo.setCurrentText("cpu")
    return widget


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_recovery_path_follows_the_variable_or_the_user_state_folder(monkeypatch, tmp_path):
    import platformdirs

    monkeypatch.setenv("NAPARI_UNET_CONFIG_DIR", str(tmp_path))
    assert recovery_path() == tmp_path / "recovery.safetensors"
    monkeypatch.delenv("NAPARI_UNET_CONFIG_DIR")
    assert str(recovery_path().parent) == platformdirs.user_state_dir("napari-unet", appauthor=False)


def test_an_offer_is_read_from_the_header_and_nothing_unreadable_is_offered(tmp_path, make_model):
    path = tmp_path / "recovery.safetensors"
    assert read_offer(path) is None
    path.write_bytes(b"\x00" * 40)
    assert read_offer(path) is None
    save_model(make_model(), path, {RECORD_KEY: {"saved": 1.8e9, "iterations": 42, "image": "cells"}})
    offer = read_offer(path)
    assert (offer.saved, offer.iterations, offer.image) == (1.8e9, 42, "cells")
    text = offer.describe()
    assert text.startswith("Recover last unsaved model (") and text.endswith(", 42 iterations on 'cells')")
    save_model(make_model(), path)  # no record of its own: the file's time, iterations unknown
    offer = read_offer(path)
    assert offer.iterations is None and abs(offer.saved - path.stat().st_mtime) < 1e-6


def test_a_checkpoint_is_written_on_the_writer_thread(qtbot, tmp_path, monkeypatch):
    image, labels = _image_and_strokes()
    trainer = Trainer([image], [labels], TrainingSettings(**TINY, iterations=1))
    saving, writes = Trainer.save, []

    def slow_save(self, path, extra=None):
        writes.append(path)
        time.sleep(1.0)  # a slow disk
        saving(self, path, extra)

    monkeypatch.setattr(Trainer, "save", slow_save)
    recovery = RecoveryFile(path=tmp_path / "state" / "recovery.safetensors")
    recovery.start(trainer, "cells")
    started = time.perf_counter()
    recovery.checkpoint()
    assert time.perf_counter() - started < 0.2  # the GUI thread does not wait for the write
    assert not recovery.path.exists()
    recovery.checkpoint()  # the first write still runs: no second one queued behind it
    recovery.wait(timeout=10)
    assert len(writes) == 1
    model, metadata = load_model(recovery.path)
    assert metadata[RECORD_KEY]["iterations"] == 0 and metadata[RECORD_KEY]["image"] == "cells"
    assert _same_weights(model, trainer.model)
    written = recovery.path.stat().st_mtime_ns
    recovery.finish()  # a run that never trained writes nothing more
    recovery.wait(timeout=10)
    assert recovery.path.stat().st_mtime_ns == written and recovery.model is None


def test_the_widget_keeps_the_unsaved_model_offers_it_and_save_removes_it(
    make_napari_viewer, qtbot, tmp_path, make_model
):
    viewer = make_napari_viewer()
    image, labels = _image_and_strokes()
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="cells labels")
    widget = _tiny_widget(viewer, seconds=4)
    assert widget.model_panel.recover_button.isHidden()  # nothing to recover in a fresh folder
    widget.recovery.interval = 0.3
    path = widget.recovery.path
    widget.train()
    qtbot.waitUntil(lambda: path.exists(), timeout=30_000)
    assert widget.busy  # written while training runs
    during, metadata = load_model(path)
    assert metadata[RECORD_KEY]["image"] == "cells" and metadata[RECORD_KEY]["iterations"] >= 1
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    widget.recovery.wait(timeout=10)
    trained = widget.model
    _, final = load_model(path)
    assert final[RECORD_KEY]["iterations"] == final["training"]["history"][-1]["iterations"]  # the final model
    assert _same_weights(load_model(path)[0], trained)

    # napari closed (or crashed) without Save: the next widget offers the model
    other = _tiny_widget(make_napari_viewer())
    button = other.model_panel.recover_button
    assert not button.isHidden() and "Recover last unsaved model" in button.text()
    assert f"{final[RECORD_KEY]['iterations']} iterations on 'cells'" in button.text()
    assert other.model is None
    other.set_model(make_model(n_classes=2), {"class_ids": [1, 2]}, "another")
    other.save_model(str(tmp_path / "another.safetensors"))
    other.recovery.wait(timeout=10)
    assert path.exists() and not button.isHidden()  # saving another model leaves the unsaved one
    button.click()
    assert button.isHidden() and _same_weights(other.model, trained)
    assert RECORD_KEY not in other.metadata and other.metadata["class_ids"] == [1, 2]
    assert path.exists()  # recovered is not saved yet
    saved = other.save_model(str(tmp_path / "kept.safetensors"))
    other.recovery.wait(timeout=10)
    assert not path.exists() and RECORD_KEY not in load_model(saved)[1]
    assert _tiny_widget(make_napari_viewer()).model_panel.recover_button.isHidden()
    widget.shutdown()


def test_discard_removes_the_offer_and_its_file(make_napari_viewer, qtbot, make_model):
    path = recovery_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(make_model(), path, {RECORD_KEY: {"saved": time.time(), "iterations": 5, "image": "x"}})
    widget = _tiny_widget(make_napari_viewer())
    assert not widget.model_panel.discard_recovery_button.isHidden()
    widget.model_panel.discard_recovery_button.click()
    widget.recovery.wait(timeout=10)
    assert widget.model_panel.recover_button.isHidden() and not path.exists() and widget.model is None


def test_a_recovery_file_that_cannot_be_written_is_a_warning_and_training_goes_on(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    blocked = tmp_path / "not a folder"
    blocked.write_text("")
    monkeypatch.setenv("NAPARI_UNET_CONFIG_DIR", str(blocked))
    warnings = []
    monkeypatch.setattr(unet_widget, "show_warning", warnings.append)
    viewer = make_napari_viewer()
    image, labels = _image_and_strokes()
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="cells labels")
    widget = _tiny_widget(viewer, seconds=2)
    widget.train()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    widget.recovery.wait(timeout=10)
    qtbot.waitUntil(lambda: any("cannot write the recovery file" in w for w in warnings), timeout=5_000)
    assert widget.model is not None and widget.last_error is None


def test_closing_the_viewer_while_training_keeps_the_model_trained_so_far(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    image, labels = _image_and_strokes()
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="cells labels")
    widget = _tiny_widget(viewer, seconds=600)  # the interval (120 s) never comes: only the end writes
    viewer.window.add_dock_widget(widget)
    widget.train()
    qtbot.waitUntil(lambda: widget._trainer is not None and widget._trainer.iteration > 0, timeout=60_000)
    trainer = widget._trainer
    assert not widget.recovery.path.exists()
    started = time.perf_counter()
    viewer.close()
    print(f"closed in {time.perf_counter() - started:.1f} s")
    widget.recovery.wait(timeout=10)
    model, metadata = load_model(widget.recovery.path)
    assert metadata[RECORD_KEY]["iterations"] == trainer.iteration > 0
    assert _same_weights(model, trainer.model)
