"""Ambiguous images: a stack that a TIFF without axis metadata calls channels, read right with an axes override
(``io.read_image(axes=...)``, ``--axes`` of predict / train / export-bioimageio), and errors that name the fix."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile

from napari_unet.cli import main
from napari_unet.io import ImageFileError, open_image, parse_axes, read_image, save_model, write_tiff

TINY_TRAIN = ["--iterations", "2", "--depth", "1", "--filters", "4", "--patch-size", "16", "--device", "cpu"]


def _script_stack(path, shape=(4, 40, 48), dtype=np.uint16, seed=0):
    """What a script writes with ``tifffile.imwrite(path, array)`` and no metadata (tifffile stores 3 or 4 planes
    as the samples of one RGB(A) page, and warns about it)."""
    array = (np.random.default_rng(seed).random(shape) * 1000).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tifffile.imwrite(path, array)
    return array


@pytest.mark.parametrize(
    ("text", "axes"), [("zyx", "ZYX"), ("CYX", "CYX"), ("YXC", "YXC"), ("TYX", "TYX"), (" zcyx ", "ZCYX"), ("YX", "YX")]
)
def test_parse_axes_accepts_what_the_engine_reads(text, axes):
    assert parse_axes(text) == axes


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "one letter per axis"),
        ("ZQX", "one letter per axis"),
        ("CCYX", "at most one C"),
        ("ZTYX", "at most one stack axis"),
        ("YXZ", "must end with YX"),
        ("XY", "must end with YX"),
        ("ZYXY", "must end with YX"),
    ],
)
def test_parse_axes_says_what_is_wrong(text, why):
    with pytest.raises(ValueError, match=why):
        parse_axes(text)


def test_a_script_written_stack_reads_as_channels_unless_axes_say_z(tmp_path):
    path = tmp_path / "stack.tif"
    stack = _script_stack(path)
    _, info = read_image(path)
    assert info["axes"] == "CYX" and info["channel_axis"] == 0  # what the file says (samples of an RGB page)
    array, info = read_image(path, axes="ZYX")
    np.testing.assert_array_equal(array, stack)
    assert info == {"axes": "ZYX", "channel_axis": None, "scale": (1.0, 1.0, 1.0), "unit": None}
    with open_image(path, axes="zyx") as (lazy, lazy_info):
        assert lazy_info == info
        np.testing.assert_array_equal(np.asarray(lazy[2, 5:9]), stack[2, 5:9])
    _, info = read_image(path, axes="TYX")
    assert info["axes"] == "ZYX"  # a time series is a stack to the engine


def test_axes_override_keeps_the_files_pixel_size_and_reads_channels_where_told(tmp_path):
    path = write_tiff(tmp_path / "vol.tif", np.zeros((3, 10, 12), np.uint16), axes="ZYX", scale=(2.0, 0.5, 0.25))
    _, info = read_image(path, axes="CYX")
    assert info["axes"] == "CYX" and info["channel_axis"] == 0 and info["scale"] == (0.5, 0.25)
    _, info = read_image(path, axes="ZYX")
    assert info["scale"] == (2.0, 0.5, 0.25) and info["unit"] == "um"


def test_axes_of_the_wrong_length_are_refused_naming_the_shape(tmp_path):
    path = tmp_path / "stack.tif"
    _script_stack(path)
    with pytest.raises(ImageFileError, match=r"axes ZCYX name 4 axes, the image has 3 \(shape \(4, 40, 48\)"):
        read_image(path, axes="ZCYX")
    with pytest.raises(ImageFileError, match="at most one C"):
        read_image(path, axes="CCX")


@pytest.fixture
def gray_model(tmp_path, make_model):
    return save_model(make_model(n_classes=2), tmp_path / "gray.safetensors")


def test_predict_refuses_a_stack_read_as_channels_and_names_the_axes_that_fix_it(tmp_path, gray_model, capsys):
    path = tmp_path / "stack.tif"
    _script_stack(path)
    out = tmp_path / "out"
    assert main(["predict", "-m", str(gray_model), str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "the model expects 1 channel(s), the image has 4 (axes CYX, shape (4, 40, 48))" in err
    assert err.endswith("if the first axis is Z, give --axes ZYX")

    assert main(["predict", "-m", str(gray_model), str(path), "-o", str(out), "--axes", "ZYX"]) == 0
    labels, info = read_image(out / "stack_labels.tif")
    probabilities, _ = read_image(out / "stack_probabilities.tif")
    assert labels.shape == (4, 40, 48) and info["axes"] == "ZYX" and probabilities.shape == (2, 4, 40, 48)


def test_a_hint_only_where_another_reading_fits(tmp_path, gray_model, make_model, capsys):
    rgb = tmp_path / "photo.tif"
    tifffile.imwrite(rgb, np.zeros((40, 48, 3), np.uint8), photometric="rgb")  # channels last: no stack reading
    assert main(["predict", "-m", str(gray_model), str(rgb), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the image has 3 (axes YXC" in err and "--axes" not in err

    two_channel = save_model(make_model(in_channels=2, n_classes=2), tmp_path / "two.safetensors")
    hyper = write_tiff(tmp_path / "zc.tif", np.zeros((2, 3, 40, 48), np.uint16), axes="ZCYX")
    assert main(["predict", "-m", str(two_channel), str(hyper), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the model expects 2 channel(s), the image has 3 (axes ZCYX" in err
    assert err.strip().endswith("if the first axis is C and the second axis is Z, give --axes CZYX")


@pytest.mark.parametrize("bad", ["ZQX", "CCYX", "XY"])
def test_bad_axes_are_usage_errors(tmp_path, gray_model, capsys, bad):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "-m", str(gray_model), str(tmp_path / "a.tif"), "-o", str(tmp_path), "--axes", bad])
    assert exit_info.value.code == 2
    assert "--axes" in capsys.readouterr().err


def test_axes_of_the_wrong_length_are_one_line(tmp_path, gray_model, capsys):
    path = tmp_path / "stack.tif"
    _script_stack(path)
    assert main(["predict", "-m", str(gray_model), str(path), "-o", str(tmp_path / "out"), "--axes", "YX"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "axes YX name 2 axes, the image has 3" in err


def test_train_on_a_script_written_stack(tmp_path, capsys):
    image = tmp_path / "stack.tif"
    labels_path = tmp_path / "stack_labels.tif"
    _script_stack(image, shape=(4, 32, 32))
    labels = np.zeros((4, 32, 32), np.uint8)
    labels[1, 4:28, 4:7], labels[2, 4:28, 20:23] = 1, 2
    tifffile.imwrite(labels_path, labels, photometric="minisblack")
    out = tmp_path / "model.safetensors"
    args = ["train", "--images", str(image), "--labels", str(labels_path), "--out", str(out), *TINY_TRAIN]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "labels shape (4, 32, 32) does not match" in err
    assert "(axes CYX); if the first axis is Z, give --axes ZYX" in err
    assert not out.exists()

    assert main([*args, "--axes", "ZYX"]) == 0
    assert "with 1 channel(s)" in capsys.readouterr().err
    assert main(["predict", "-m", str(out), str(image), "-o", str(tmp_path / "out"), "--axes", "ZYX"]) == 0
    predicted, _ = read_image(tmp_path / "out" / "stack_labels.tif")
    assert predicted.shape == (4, 32, 32)
