"""The napari reader and writers: TIFF round trips keep data, scale and layer type; layers carry the file's axes
(``axis_labels``) and unit (``units``)."""

from __future__ import annotations

import numpy as np
import pint
import pytest
import tifffile
from napari.components import ViewerModel

from napari_unet._reader import is_labels_file, napari_get_reader, read_tiff
from napari_unet._writer import write_image, write_labels

UM, PIXEL = pint.get_application_registry().micrometer, pint.get_application_registry().pixel


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
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "CYX", "unit": "um"}, resolution=(1 / 0.4, 1 / 0.4))
    [(array, kwargs, kind)] = read_tiff(str(path))
    assert kind == "image" and kwargs["channel_axis"] == 0
    assert kwargs["name"] == ["two_channels [ch0]", "two_channels [ch1]"]
    np.testing.assert_allclose(kwargs["scale"], (0.4, 0.4))
    assert kwargs["axis_labels"] == ("y", "x") and kwargs["units"] == ("um", "um")
    # napari splits the channels with the spatial labels and units on every layer (two channels, two axes: the
    # per-axis tuples must not be taken for per-channel values)
    viewer = ViewerModel()
    layers = viewer.add_image(array, **kwargs)
    assert [layer.axis_labels for layer in layers] == 2 * [("y", "x")]
    assert [layer.units for layer in layers] == 2 * [(UM, UM)]


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
    assert kwargs["axis_labels"] == ("y", "x")


def test_layers_carry_the_files_axes_and_units(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path,
        np.zeros((3, 8, 9), np.uint16),
        imagej=True,
        resolution=(1 / 0.5, 1 / 0.5),
        metadata={"axes": "ZYX", "unit": "micron", "spacing": 2.0},
    )
    [(data, kwargs, _)] = read_tiff(str(path))
    assert kwargs["axis_labels"] == ("z", "y", "x") and kwargs["units"] == ("um", "um", "um")
    np.testing.assert_allclose(kwargs["scale"], (2.0, 0.5, 0.5))
    layer = ViewerModel().add_image(data, **kwargs)
    assert layer.axis_labels == ("z", "y", "x") and layer.units == (UM, UM, UM)
    nm = tmp_path / "nm_labels.tif"
    tifffile.imwrite(nm, np.zeros((8, 9), np.uint8), imagej=True, resolution=(1 / 20, 1 / 20), metadata={"unit": "nm"})
    [(data, kwargs, kind)] = read_tiff(str(nm))
    assert kind == "labels" and kwargs["axis_labels"] == ("y", "x") and kwargs["units"] == ("nm", "nm")
    assert ViewerModel().add_labels(data, **kwargs).units == 2 * (pint.get_application_registry().nanometer,)


def test_a_file_without_a_usable_unit_keeps_napari_default_units(tmp_path):
    plain, bogus = tmp_path / "plain.tif", tmp_path / "bogus.tif"
    tifffile.imwrite(plain, np.zeros((5, 8, 9), np.float32), photometric="minisblack")  # no resolution, no unit
    tifffile.imwrite(bogus, np.zeros((8, 9), np.uint8), imagej=True, resolution=(2.0, 2.0), metadata={"unit": "bogus"})
    [(data, kwargs, _)] = read_tiff(str(plain))
    assert kwargs["axis_labels"] == ("z", "y", "x") and "units" not in kwargs
    assert ViewerModel().add_image(data, **kwargs).units == 3 * (PIXEL,)
    [(data, kwargs, _)] = read_tiff(str(bogus))  # a unit pint does not know: the file still opens
    assert "units" not in kwargs and kwargs["axis_labels"] == ("y", "x")
    np.testing.assert_allclose(kwargs["scale"], (0.5, 0.5))
    assert ViewerModel().add_image(data, **kwargs).units == 2 * (PIXEL,)


def test_sample_data_layers_are_labelled_like_the_readers():
    from napari_unet._sample_data import nuclei, nuclei_with_strokes

    for _, kwargs, _ in [*nuclei(), *nuclei_with_strokes()]:
        assert kwargs["axis_labels"] == ("y", "x") and "units" not in kwargs  # the bundled files have no pixel size


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
    assert opened.axis_labels == opened_labels.axis_labels == ("y", "x")
