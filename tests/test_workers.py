"""The widget's worker generators driven without Qt: the typed messages they yield, in order."""

import threading

import numpy as np
import pytest
import tifffile
import torch

from napari_unet import UNet, arrays, devices
from napari_unet._workers import (
    ImageDone,
    ImageFailed,
    ImageStarted,
    LabelsRefused,
    PredictJob,
    Preview,
    Progress,
    Ready,
    ViewRegion,
    gui_friendly_threads,
    predict_steps,
    train_steps,
)
from napari_unet.io import lazy_image, write_tiff
from napari_unet.predict import PredictionSettings, predict_image
from napari_unet.training import Trainer, TrainingSettings


def _blobs(seed=0, shape=(64, 64)):
    """A bright square on noise with strokes: id 1 = background, id 2 = square."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 1.0, shape).astype(np.float32)
    image[16:48, 16:48] += 4.0
    labels = np.zeros(shape, np.uint8)
    labels[2:5, 4:-4] = 1
    labels[31:34, 20:44] = 2
    return image, labels


def _settings(**overrides):
    return TrainingSettings(
        **{
            "iterations": 6,
            "time_budget": None,
            "depth": 1,
            "base_filters": 4,
            "patch_size": 16,
            "batch_size": 2,
            "device": "cpu",
            "cpu_threads": 1,
            **overrides,
        }
    )


def _drain(steps):
    """Every message a generator yields, and what it returns."""
    messages = []
    while True:
        try:
            messages.append(next(steps))
        except StopIteration as end:
            return messages, end.value


def test_train_steps_yield_ready_progress_previews_and_refused_labels():
    image, labels = _blobs()
    view = ViewRegion((slice(8, 40), slice(0, 64)))
    steps = train_steps([image], [labels], _settings(), view=view, preview_interval=0.0)
    ready = next(steps)
    assert isinstance(ready, Ready) and isinstance(ready.trainer, Trainer)
    ready.trainer.update_labels_later(0, np.zeros((5, 5), np.uint8))  # read, and refused, on the training side
    messages, returned = _drain(steps)
    assert returned is ready.trainer
    assert {type(m) for m in messages} == {Progress, Preview, LabelsRefused}
    progress = [m.event for m in messages if isinstance(m, Progress)]
    assert [e.iteration for e in progress[:-1]] == list(range(1, 7)) and not any(e.done for e in progress[:-1])
    assert progress[-1].done and progress[-1].reason == "iterations"
    [refused] = [m for m in messages if isinstance(m, LabelsRefused)]
    assert refused.index == 0 and "does not match" in refused.reason
    previews = [m.result for m in messages if isinstance(m, Preview)]
    assert len(previews) >= 2 and isinstance(messages[-1], Preview)  # the last one from the final weights
    assert previews[-1].iteration == ready.trainer.iteration == 6
    for preview in previews:
        assert preview.region == view.region and preview.class_ids == (1, 2)
        assert preview.probabilities.shape == (2, 32, 64) and preview.segmentation.shape == (32, 64)
        assert set(np.unique(preview.segmentation)) <= {1, 2}


def test_train_steps_without_a_view_yield_no_previews():
    image, labels = _blobs()
    messages, _ = _drain(train_steps([image], [labels], _settings(iterations=2)))
    assert isinstance(messages[0], Ready) and all(isinstance(m, Progress) for m in messages[1:])
    assert len(messages) == 4


def test_stop_ends_training_within_an_iteration():
    image, labels = _blobs()
    stop = threading.Event()
    steps = train_steps([image], [labels], _settings(iterations=10_000), view=ViewRegion(), stop=stop)
    assert isinstance(next(steps), Ready)
    for message in steps:
        if isinstance(message, Progress) and message.event.iteration == 2:
            stop.set()
        if isinstance(message, Progress) and message.event.done:
            break
    assert message.event.reason == "stopped" and message.event.iteration <= 4
    assert list(steps) == []  # no preview after a stop


def _broken_lazy_image(tmp_path):
    """A lazy view of a TIFF whose plane 5 cannot be decoded (only reading it finds out)."""
    path = write_tiff(tmp_path / "broken.tif", (np.random.default_rng(0).random((8, 64, 64)) * 255).astype(np.uint8))
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[5].dataoffsets[0], tif.pages[5].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(count)
    path.write_bytes(bytes(data))
    return lazy_image(path)[0]


def test_predict_steps_yield_each_image_and_go_on_past_an_unreadable_one(tmp_path, monkeypatch):
    """Outputs over ``arrays.IN_MEMORY_OUTPUT_BYTES`` are memory maps (the widget's layers), equal to what
    ``predict_image`` gives; the device's memory is released at the end."""
    torch.manual_seed(0)
    model = UNet(n_classes=2, depth=1, base_filters=4).eval()
    metadata = {"class_ids": [1, 2]}
    image, _ = _blobs()
    stack = np.stack([_blobs(seed)[0] for seed in range(3)])
    jobs = [PredictJob("broken", _broken_lazy_image(tmp_path)), PredictJob("a", image), PredictJob("b", stack)]
    settings = PredictionSettings(device="cpu", uncertainty=True)
    tiles, released = [], []
    monkeypatch.setattr(arrays, "IN_MEMORY_OUTPUT_BYTES", 0)
    monkeypatch.setattr(devices, "release_device_memory", released.append)
    messages, done = _drain(
        predict_steps(model, metadata, jobs, settings, progress=lambda *counts: tiles.append(counts))
    )
    assert done == 2 and [str(d) for d in released] == ["cpu"]
    assert [type(m) for m in messages] == [ImageStarted, ImageFailed, ImageStarted, ImageDone, ImageStarted, ImageDone]
    assert [(m.index, m.count, m.name) for m in messages if isinstance(m, ImageStarted)] == [
        (0, 3, "broken"),
        (1, 3, "a"),
        (2, 3, "b"),
    ]
    assert messages[1].name == "broken" and "not a readable TIFF" in messages[1].reason
    assert tiles and all(done_tiles <= total for done_tiles, total in tiles)
    for message, job in zip((messages[3], messages[5]), jobs[1:]):
        result = message.result
        assert result.name == job.name
        with gui_friendly_threads():  # as many torch threads as the worker: the same float rounding
            expected = predict_image(model, metadata, job.image, settings)
        for got, want in (
            (result.probabilities, expected.probabilities),
            (result.segmentation, expected.labels),
            (result.uncertainty, expected.uncertainty),
        ):
            assert isinstance(got, np.memmap)
            np.testing.assert_array_equal(got, want)
        assert result.domain is None  # a model without a training profile: no check


def test_predict_steps_carry_each_image_s_domain_check():
    """A trained model's metadata holds its training images' profile: each ImageDone carries the image's check."""
    image, labels = _blobs()
    trainer = Trainer(image, labels, _settings(iterations=30))
    for _ in trainer.run():
        pass
    bright = image.copy()
    bright[np.random.default_rng(1).random(image.shape) < 0.02] = 100.0  # specks move the upper percentile
    jobs = [PredictJob("same", image), PredictJob("specks", bright)]
    messages, done = _drain(predict_steps(trainer.model, trainer.metadata, jobs, PredictionSettings(device="cpu")))
    results = {m.result.name: m.result for m in messages if isinstance(m, ImageDone)}
    assert done == 2 and set(results) == {"same", "specks"}
    with gui_friendly_threads():
        expected = predict_image(trainer.model, trainer.metadata, bright, PredictionSettings(device="cpu")).domain
    assert results["specks"].domain == expected and expected is not None
    assert results["same"].domain.score < results["specks"].domain.score


def test_predict_steps_stop_is_an_end_not_an_error_even_within_a_flipped_pass():
    """A stop set during the first network layer of a flip-averaged image ends the generator there: no result for
    that image, no later image, no error."""
    torch.manual_seed(0)
    model = UNet(n_classes=2, depth=1, base_filters=4).eval()
    stop = threading.Event()
    layers = []

    def set_stop(*_):
        layers.append(1)
        stop.set()

    next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_hook(set_stop)
    jobs = [PredictJob("a", _blobs()[0]), PredictJob("b", _blobs()[0])]
    settings = PredictionSettings(device="cpu", test_time_flips=True)
    steps = predict_steps(model, {}, jobs, settings, stop=stop)
    assert next(steps) == ImageStarted(0, 2, "a")
    with pytest.raises(StopIteration) as ended:
        next(steps)
    assert ended.value.value == 0 and len(layers) == 1  # stopped within the first of 8 flipped passes


def test_an_output_memory_map_on_a_full_disk_is_an_error_not_a_crash(monkeypatch):
    """Beyond ``arrays.IN_MEMORY_OUTPUT_BYTES`` the widget's outputs are memory maps of sparse temporary files; on a
    full disk the first write to a page would kill napari with a SIGBUS. The space is reserved first: an OSError
    that says where and how much (the worker's error, a notification), and a map that fits is zeros."""
    import errno
    import os
    import tempfile

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate here: nothing is reserved")
    monkeypatch.setattr(arrays, "IN_MEMORY_OUTPUT_BYTES", 0)
    mapped = arrays.output_array((4, 256, 256), np.float32)
    assert isinstance(mapped, np.memmap) and mapped.shape == (4, 256, 256) and not mapped.any()

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"cannot reserve 1\.0 MiB in .*: No space left on device") as raised:
        arrays.output_array((4, 256, 256), np.float32)
    assert raised.value.errno == errno.ENOSPC and tempfile.gettempdir() in str(raised.value)
