"""`napari-unet predict`: round trips and every bad-input case."""

import io as stdio
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_unet.cli import ProgressBar, main, output_stem
from napari_unet.io import read_image, save_model, write_tiff
from napari_unet.normalization import normalize_image
from napari_unet.tiling import predict_tiled

CLASS_IDS = [1, 3, 7]


@pytest.fixture
def model_file(tmp_path, make_model):
    model = make_model()
    path = save_model(model, tmp_path / "model.safetensors", {"class_ids": CLASS_IDS})
    return path, model


@pytest.fixture
def image_file(tmp_path):
    image = (np.random.default_rng(0).random((70, 90)) * 4000).astype(np.uint16)
    return write_tiff(tmp_path / "cells.tif", image, scale=(0.5, 0.5)), image


def _outputs(out, stem):
    probabilities, p_info = read_image(out / f"{stem}_probabilities.tif")
    labels, l_info = read_image(out / f"{stem}_labels.tif")
    return probabilities, labels, p_info, l_info


def test_predict_round_trip(tmp_path, model_file, image_file, capsys):
    model_path, model = model_file
    image_path, image = image_file
    out = tmp_path / "results" / "nested"
    assert main(["predict", "--model", str(model_path), str(image_path), "--out", str(out), "--tile", "32", "32"]) == 0

    probabilities, labels, p_info, l_info = _outputs(out, "cells")
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, 70, 90)
    assert p_info["axes"] == "CYX" and l_info["axes"] == "YX"
    assert p_info["scale"] == (0.5, 0.5) and l_info["scale"] == (0.5, 0.5)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1, atol=1e-5)
    expected = predict_tiled(model, normalize_image(image), test_time_flips=True)  # the default
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.asarray(CLASS_IDS)[np.argmax(probabilities, axis=0)])
    assert "cells_labels.tif" in capsys.readouterr().out


def test_predict_streams_probabilities_through_a_scratch_file(tmp_path, model_file, image_file, monkeypatch):
    """The class probabilities are predicted into a memory-mapped file in the output folder, not RAM,
    and that file is gone afterwards, also when prediction fails."""
    import napari_unet.tiling as tiling

    model_path, _ = model_file
    image_path, _ = image_file
    out = tmp_path / "o"
    targets, real = [], tiling.predict_tiled

    def recording(model, image, *, out=None, **kwargs):
        targets.append(out)
        return real(model, image, out=out, **kwargs)

    monkeypatch.setattr(tiling, "predict_tiled", recording)
    assert main(["predict", "-m", str(model_path), str(image_path), "-o", str(out)]) == 0
    assert isinstance(targets[0], np.memmap) and targets[0].shape == (3, 70, 90)
    assert Path(targets[0].filename).parent == out
    assert sorted(p.name for p in out.iterdir()) == ["cells_labels.tif", "cells_probabilities.tif"]

    def failing(model, image, *, out=None, **kwargs):
        out[:] = 0.5
        raise ValueError("tile does not fit")

    monkeypatch.setattr(tiling, "predict_tiled", failing)
    failed = tmp_path / "failed"
    assert main(["predict", "-m", str(model_path), str(image_path), "-o", str(failed)]) == 2
    assert list(failed.iterdir()) == []


def test_predict_one_pass_on_request(tmp_path, model_file, image_file):
    """``--no-test-time-flips`` predicts one pass; the default averages the 8 flips/transpositions."""
    model_path, model = model_file
    image_path, image = image_file
    args = ["predict", "--model", str(model_path), str(image_path), "--tile", "32", "32"]
    assert main(args + ["--out", str(tmp_path / "default")]) == 0
    assert main(args + ["--out", str(tmp_path / "one"), "--no-test-time-flips"]) == 0
    flipped, _, _, _ = _outputs(tmp_path / "default", "cells")
    one_pass, _, _, _ = _outputs(tmp_path / "one", "cells")
    np.testing.assert_allclose(one_pass, predict_tiled(model, normalize_image(image)), atol=1e-5)
    np.testing.assert_allclose(flipped, predict_tiled(model, normalize_image(image), test_time_flips=True), atol=1e-5)
    assert np.abs(flipped - one_pass).max() > 1e-3


def test_predict_reads_a_stack_tile_by_tile(tmp_path, model_file, monkeypatch):
    """Neither the image nor any whole-size result is held in memory: peak traced memory stays below half
    the size of the stack itself (the image read whole and its float32 normalized copy took 3x the stack),
    and the outputs are the in-memory prediction's."""
    import tracemalloc

    import napari_unet.normalization as normalization

    monkeypatch.setattr(normalization, "_SLAB_PIXELS", 1 << 15)  # a constant (8 MiB by default): small here
    model_path, model = model_file
    stack = (np.random.default_rng(1).random((96, 256, 256)) * 60000).astype(np.uint16)
    path = write_tiff(tmp_path / "stack.tif", stack, axes="ZYX")
    small = write_tiff(tmp_path / "small.tif", stack[:2, :64, :64], axes="ZYX")
    options = ["--tile", "256", "256", "--batch-size", "2", "--no-test-time-flips"]
    assert main(["predict", "-m", str(model_path), str(small), "-o", str(tmp_path / "warm-up"), *options]) == 0
    tracemalloc.start()  # after the warm-up: the imports are not what is measured
    try:
        code = main(["predict", "-m", str(model_path), str(path), "-o", str(tmp_path / "o"), *options])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 0
    assert peak < stack.nbytes / 2, f"peak {peak / 2**20:.1f} MiB for a {stack.nbytes / 2**20:.1f} MiB stack"
    probabilities, labels, _, _ = _outputs(tmp_path / "o", "stack")
    planes = [0, 50, 95]  # normalized with the whole stack's percentiles, predicted in memory
    expected = predict_tiled(model, normalize_image(stack)[planes])
    np.testing.assert_allclose(probabilities[:, planes], expected, atol=1e-5)
    np.testing.assert_array_equal(labels, np.asarray(CLASS_IDS)[probabilities.argmax(0)])


def test_predict_refuses_a_corrupt_image_in_one_line(tmp_path, model_file, capsys):
    model_path, _ = model_file
    image = (np.random.default_rng(2).random((64, 256, 256)) * 4000).astype(np.uint16)
    path = write_tiff(tmp_path / "broken.tif", image, axes="ZYX")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[40].dataoffsets[0], tif.pages[40].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes(count)  # zeroes for one compressed strip of plane 40
    path.write_bytes(bytes(data))
    assert main(["predict", "-m", str(model_path), str(path), "-o", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "not a readable TIFF" in error[0]
