"""The napari reader and writers: TIFF round trips keep data, scale and layer type."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_unet._reader import is_labels_file, napari_get_reader, read_tiff
from napari_unet._writer import write_image, write_labels


def test_reader_accepts_tiff_only(tmp_path):
    assert napari_get_reader(str(tmp_path / "a.tif")) is read_tiff
    assert napari_get_reader(str(tmp_path / "a.OME.TIF")) is read_tiff
    assert napari_get_reader([str(tmp_path / "a.tiff"), str(tmp_path / "b.tif")]) is read_tiff
    assert napari_get_reader(str(tmp_path / "a.png")) is None
    assert napari_get_reader([str(tmp_path / "a.tif"), str(tmp_path / "b.png")]) is None


def test_labels_rule():
    ints, floats = np.zeros((4, 4), np.uint16), np.zeros((4, 4), np.float32)
    assert is_labels_file("cells_labels.tif", ints)
    assert is_labels_file("Nucleus-MASK.tiff", ints)
    assert is_labels_file("img01_strokes.tif", ints)
    assert not is_labels_file("cells.tif", ints)
    assert not is_labels_file("cells_labels.tif", floats)


def test_image_round_trip_keeps_data_and_scale(tmp_path):
    image = np.random.default_rng(0).random((5, 20, 30)).astype(np.float32)
    [path] = write_image(str(tmp_path / "stack.tif"), image, {"scale": (2.0, 0.5, 0.25), "rgb": False})
    [(data, kwargs, kind)] = read_tiff(path)
    assert kind == "image"
    np.testing.assert_array_equal(data, image)
    np.testing.assert_allclose(kwargs["scale"], (2.0, 0.5, 0.25))
    assert kwargs["name"] == "stack"


def test_labels_round_trip_keeps_ids_scale_and_type(tmp_path):
    labels = np.random.default_rng(1).integers(0, 300, (20, 30)).astype(np.int32)
    [path] = write_labels(str(tmp_path / "cells_labels"), labels, {"scale": (0.5, 0.5)})
    assert path.endswith("cells_labels.tif")
    [(data, kwargs, kind)] = read_tiff(path)
    assert kind == "labels"
    np.testing.assert_array_equal(data, labels)
    np.testing.assert_allclose(kwargs["scale"], (0.5, 0.5))


def test_channels_become_layers_with_spatial_scale(tmp_path):
    path = tmp_path / "two_channels.tif"
    data = np.arange(2 * 8 * 9, dtype=np.uint16).reshape(2, 8, 9)
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "CYX", "unit": "um"},
                     resolution=(1 / 0.4, 1 / 0.4))
    [(array, kwargs, kind)] = read_tiff(str(path))
    assert kind == "image" and kwargs["channel_axis"] == 0
    assert kwargs["name"] == ["two_channels [ch0]", "two_channels [ch1]"]
    np.testing.assert_allclose(kwargs["scale"], (0.4, 0.4))


def test_large_images_open_lazily_labels_in_memory(tmp_path, monkeypatch):
    from napari_unet import _reader

    image = np.random.default_rng(3).integers(0, 4000, (4, 20, 30)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", image, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "stack_labels.tif", image, imagej=True, metadata={"axes": "ZYX"})
    [(small, _, _)] = read_tiff(str(tmp_path / "stack.tif"))
    assert isinstance(small, np.ndarray)
    monkeypatch.setattr(_reader, "LAZY_READ_BYTES", image.nbytes - 1)
    [(lazy, kwargs, kind)] = read_tiff(str(tmp_path / "stack.tif"))
    assert kind == "image" and not isinstance(lazy, np.ndarray) and kwargs["name"] == "stack"
    np.testing.assert_array_equal(np.asarray(lazy), image)
    [(labels, _, kind)] = read_tiff(str(tmp_path / "stack_labels.tif"))
    assert kind == "labels" and isinstance(labels, np.ndarray)  # painted into: always in memory


def test_rgb_round_trip(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 255, (12, 14, 3)).astype(np.uint8)
    [path] = write_image(str(tmp_path / "photo.tif"), rgb, {"scale": (1.5, 1.5), "rgb": True})
    [(array, kwargs, kind)] = read_tiff(path)
    np.testing.assert_array_equal(np.moveaxis(array, 0, -1), rgb)
    np.testing.assert_allclose(kwargs["scale"], (1.5, 1.5))


def test_viewer_round_trip_through_the_plugin(make_napari_viewer, tmp_path):
    pytest.importorskip("npe2")
    viewer = make_napari_viewer()
    image = np.random.default_rng(3).random((16, 18)).astype(np.float32)
    labels = np.zeros((16, 18), np.uint8)
    labels[2:5, 3:9] = 2
    viewer.add_image(image, name="img", scale=(0.3, 0.6))
    viewer.add_labels(labels, name="img labels", scale=(0.3, 0.6))
    viewer.layers["img"].save(str(tmp_path / "img.tif"), plugin="napari-unet")
    viewer.layers["img labels"].save(str(tmp_path / "img_labels.tif"), plugin="napari-unet")
    viewer.layers.clear()
    [opened] = viewer.open(str(tmp_path / "img.tif"), plugin="napari-unet")
    [opened_labels] = viewer.open(str(tmp_path / "img_labels.tif"), plugin="napari-unet")
    assert opened._type_string == "image" and opened_labels._type_string == "labels"
    np.testing.assert_array_equal(opened.data, image)
    np.testing.assert_array_equal(opened_labels.data, labels)
    np.testing.assert_allclose(opened.scale, (0.3, 0.6))
    np.testing.assert_allclose(opened_labels.scale, (0.3, 0.6))
