"""``napari-unet predict`` into OME-Zarr (cli_volume.py): equal to the TIFF outputs, in this process and with
``--workers 2`` (a LocalCluster on 127.0.0.1), refusals in one line; napari opens the stores lazily."""

import numpy as np
import pytest

from napari_unet.cli import main
from napari_unet.io import read_image, save_model, write_tiff

METADATA = {"class_ids": [1, 4], "normalization": {"method": "percentile", "low": 1.0, "high": 99.8}}


@pytest.fixture
def files(make_model, tmp_path):
    from scipy import ndimage

    model = make_model(n_classes=2)
    save_model(model, tmp_path / "m.safetensors", METADATA)
    rng = np.random.default_rng(1)
    image = (ndimage.gaussian_filter(rng.random((75, 90)), 2) * 4000).astype(np.uint16)
    write_tiff(tmp_path / "img.tif", image, scale=(0.5, 0.25), unit="um")
    return tmp_path


def _predict(files, out, *extra):
    flags = ["--device", "cpu", "--no-test-time-flips", "--refine-radius", "1"]
    return main(["predict", str(files / "img.tif"), "-m", str(files / "m.safetensors"), "-o", str(out), *flags, *extra])


def test_zarr_outputs_equal_tiff_outputs(files, capsys):
    assert _predict(files, files / "tif") == 0
    assert _predict(files, files / "zarr", "--block", "32", "--out-format", "zarr", "--zarr-version", "0.5") == 0
    assert "9 blocks predicted" in capsys.readouterr().out
    for role in ("probabilities", "labels"):
        expected, expected_info = read_image(files / "tif" / f"img_{role}.tif")
        got, info = read_image(files / "zarr" / f"img_{role}.zarr")
        assert np.abs(got.astype(np.float32) - expected).max() < 1e-5
        assert info["scale"] == expected_info["scale"] == (0.5, 0.25) and info["unit"] == "um"
    assert _predict(files, files / "zarr", "--block", "32", "--out-format", "zarr", "--zarr-version", "0.5") == 0
    assert "0 blocks predicted, 9 were done before" in capsys.readouterr().out  # the same command again


def test_an_input_written_again_or_another_zarr_version_is_predicted_anew(files, capsys):
    """The same command after the image was overwritten in place (same path, same shape) said "0 blocks predicted"
    and kept the old result; so did another --zarr-version. Both are another run now: predicted anew."""
    from scipy import ndimage

    run = ("--block", "32", "--out-format", "zarr")
    assert _predict(files, files / "z", *run) == 0
    assert _predict(files, files / "z", *run) == 0
    assert "0 blocks predicted, 9 were done before" in capsys.readouterr().out
    other = (ndimage.gaussian_filter(np.random.default_rng(7).random((75, 90)), 2) * 4000).astype(np.uint16)
    write_tiff(files / "img.tif", other, scale=(0.5, 0.25), unit="um")
    assert _predict(files, files / "z", *run) == 0
    assert "9 blocks predicted" in capsys.readouterr().out
    assert _predict(files, files / "fresh", *run) == 0  # the edited image into new stores: what "z" must hold
    for role in ("probabilities", "labels"):
        got, _ = read_image(files / "z" / f"img_{role}.zarr")
        np.testing.assert_array_equal(got, read_image(files / "fresh" / f"img_{role}.zarr")[0])
    assert _predict(files, files / "z", *run, "--zarr-version", "0.5") == 0
    assert "9 blocks predicted" in capsys.readouterr().out


def test_workers_equal_in_process(files, capsys):
    assert _predict(files, files / "here.zarr", "--block", "32", "40") == 0  # --out ending in .zarr: zarr
    assert _predict(files, files / "cluster", "--block", "32", "40", "--workers", "2") == 0
    captured = capsys.readouterr()
    assert "Dask LocalCluster: 2 worker process(es)" in captured.err and "dashboard http://127.0.0.1:" in captured.err
    for role in ("probabilities", "labels"):
        here, _ = read_image(files / "here.zarr" / f"img_{role}.zarr")
        there, _ = read_image(files / "cluster" / f"img_{role}.zarr")
        np.testing.assert_array_equal(here, there)


def test_refusals_are_one_line(files, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _predict(files, files / "o", "--scheduler", f"tcp://127.0.0.1:{port}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"napari-unet: error: cannot reach the Dask scheduler at tcp://127.0.0.1:{port} within")
    assert len(err.splitlines()) == 1
    (files / "f" / "img_probabilities.zarr").mkdir(parents=True)  # someone else's folder
    (files / "f" / "img_probabilities.zarr" / "data.txt").write_text("keep me")
    assert _predict(files, files / "f", "--out-format", "zarr") == 2
    assert "img_probabilities.zarr exists and is not a napari-unet probabilities output" in capsys.readouterr().err
    assert (files / "f" / "img_probabilities.zarr" / "data.txt").read_text() == "keep me"
    assert _predict(files, files / "g", "--out-format", "tif", "--workers", "2") == 2


def test_a_full_disk_under_the_stores_is_one_line(files, capsys, monkeypatch):
    """A block write that finds the disk full: the image, the folder and the cause in one line (it was "unexpected
    OSError" without a path), exit 2; the blocks written stay for the same command to resume."""
    import errno
    import os

    import napari_unet.distributed_predict as distributed_predict

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(distributed_predict, "predict_volume", full)
    assert _predict(files, files / "z", "--out-format", "zarr") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "img.tif: cannot write its outputs in" in err and str(files / "z") in err
    assert "No space left on device" in err and "resumes" in err


def test_a_lost_cluster_is_one_line_that_says_the_command_resumes(files, capsys, monkeypatch):
    """The scheduler went away mid-run: "unexpected FutureCancelledError" (exit 1) before; now one line, exit 2."""
    from distributed.client import FutureCancelledError

    import napari_unet.distributed_predict as distributed_predict

    def lost(*args, **kwargs):
        raise FutureCancelledError("block-3", "scheduler-connection-lost")

    monkeypatch.setattr(distributed_predict, "predict_volume", lost)
    assert _predict(files, files / "z", "--out-format", "zarr") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "img.tif: the Dask cluster failed (FutureCancelledError" in err
    assert err.endswith("the same command resumes")


def test_zarr_options_with_tiff_outputs_are_refused_not_ignored(files, capsys):
    """--block, --pyramid, --zarr-version or --probabilities-dtype with TIFF outputs were ignored without a word
    (and --pyramid -1 everywhere): a one-line error that says how to get OME-Zarr outputs, nothing written."""
    assert _predict(files, files / "t", "--block", "32", "--pyramid") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--block, --pyramid: for OME-Zarr outputs" in err
    assert "--out-format zarr" in err
    assert _predict(files, files / "t", "--out-format", "tif", "--zarr-version", "0.5") == 2
    assert "--zarr-version: for OME-Zarr outputs" in capsys.readouterr().err
    assert _predict(files, files / "z", "--out-format", "zarr", "--pyramid", "-1") == 2
    assert "--pyramid must be at least 0 levels, got -1" in capsys.readouterr().err
    assert not (files / "t").exists() and not (files / "z").exists()


def test_napari_opens_the_stores_lazily(files, make_napari_viewer):
    import dask.array as da

    assert _predict(files, files / "z", "--out-format", "zarr", "--block", "32", "--pyramid", "1") == 0
    viewer = make_napari_viewer()
    [labels] = viewer.open(str(files / "z" / "img_labels.zarr"), plugin="napari-unet")
    probabilities = viewer.open(str(files / "z" / "img_probabilities.zarr"), plugin="napari-unet")
    assert labels.__class__.__name__ == "Labels" and isinstance(labels.data, da.Array)
    assert tuple(labels.scale) == (0.5, 0.25)
    assert [layer.name for layer in probabilities] == ["img_probabilities [ch0]", "img_probabilities [ch1]"]
    assert all(isinstance(layer.data, da.Array) for layer in probabilities)


def test_train_reads_an_ome_zarr_image_and_labels(tmp_path, capsys):
    from ome_zarr.writer import write_image

    from napari_unet.io import load_model

    rng = np.random.default_rng(0)
    image = (rng.random((48, 48)) * 100).astype(np.uint8)
    image[12:36, 12:36] += 120
    labels = np.zeros((48, 48), np.uint8)
    labels[2:4, 4:44], labels[23:25, 16:32] = 1, 3
    write_image(image, str(tmp_path / "img.zarr"), axes="yx", scale_factors=())
    write_image(labels, str(tmp_path / "img_labels.zarr"), axes="yx", scale_factors=())
    tiny = ["--iterations", "2", "--depth", "1", "--filters", "4", "--patch-size", "16", "--device", "cpu"]
    out = tmp_path / "m.safetensors"
    args = ["train", "--images", str(tmp_path / "img.zarr"), "--labels", str(tmp_path / "img_labels.zarr")]
    assert main([*args, "--out", str(out), *tiny]) == 0
    assert load_model(out)[1]["class_ids"] == [1, 3]
