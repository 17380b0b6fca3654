"""`napari-unet predict`: round trips and every bad-input case."""

import io as stdio
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_unet import __version__
from napari_unet.cli import main, output_stem, progress_bar
from napari_unet.io import read_image, read_tiff_record, save_model, write_tiff
from napari_unet.normalization import normalize_image
from napari_unet.tiling import predict_tiled

CLASS_IDS = [1, 3, 7]
ROLES = ("labels", "probabilities")


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
    expected = predict_tiled(model, normalize_image(image), test_time_flips=True, refine_radius="auto")  # default
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.asarray(CLASS_IDS)[np.argmax(probabilities, axis=0)])
    captured = capsys.readouterr()
    assert "cells_labels.tif" in captured.out
    # A model saved without a training profile (class ids only): no domain check, no warning; the record holds
    # only the output marker.
    assert "warning" not in captured.err
    for role in ("labels", "probabilities"):
        assert read_tiff_record(out / f"cells_{role}.tif") == {"output": role, "napari_unet_version": __version__}


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


def test_the_scratch_files_of_a_killed_predict_are_removed_by_the_next(tmp_path, model_file, image_file):
    """A predict killed mid-image (SIGKILL, the out-of-memory killer, a cluster's time limit) leaves its scratch
    memory maps behind: another process of this host finds them by their names (the host and the dead process's
    id) and removes them; scratch files of a live process stay."""
    import sys

    model_path, _ = model_file
    image_path, _ = image_file
    out = tmp_path / "o"
    out.mkdir()
    killed = subprocess.run(  # a process that creates scratch files as predict does, then dies without cleaning up
        [
            sys.executable,
            "-c",
            "import sys, os; from napari_unet.io import temporary_file; "
            "print(temporary_file(sys.argv[1])); os._exit(9)",
            str(out / "cells_probabilities.npy"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    left = Path(killed.stdout.strip())
    assert killed.returncode == 9 and left.parent == out and left.exists()
    from napari_unet.io import temporary_file

    alive = temporary_file(out / "other_probabilities.npy")  # this process's: alive
    assert main(["predict", "-m", str(model_path), str(image_path), "-o", str(out), "--no-test-time-flips"]) == 0
    assert not left.exists() and alive.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([alive.name, "cells_labels.tif", "cells_probabilities.tif"])


def test_a_full_disk_is_one_line_not_a_crash(tmp_path, model_file, image_file, monkeypatch, capsys):
    """The scratch memory maps are sparse files: on a full disk the first write to one of their pages was a SIGBUS
    that killed the process without a word. Their space is reserved first, so a full disk is a one-line error
    (here posix_fallocate says so), and nothing is left in the output folder."""
    import errno

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate here: nothing is reserved")
    model_path, _ = model_file
    image_path, _ = image_file
    out = tmp_path / "o"

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert main(["predict", "-m", str(model_path), str(image_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cells: no room for its probabilities while predicting" in err
    assert "No space left on device" in err and str(out) in err
    assert list(out.iterdir()) == []


def test_predict_flips_and_refinement_on_request(tmp_path, model_file, image_file):
    """The default averages the 8 flips/transpositions and snaps to edges (radius "auto"); ``--no-test-time-flips``
    and ``--refine-radius 0`` turn each off, ``--refine-radius``/``--refine-eps`` set the guided filter."""
    model_path, model = model_file
    image_path, image = image_file
    normalized = normalize_image(image)
    args = ["predict", "--model", str(model_path), str(image_path), "--tile", "32", "32"]
    runs = {
        "default": ([], dict(test_time_flips=True, refine_radius="auto")),
        "auto": (["--refine-radius", "auto"], dict(test_time_flips=True, refine_radius="auto")),
        "one": (["--refine-radius", "1"], dict(test_time_flips=True, refine_radius=1)),
        "raw": (["--no-test-time-flips", "--refine-radius", "0"], {}),
        "flips": (["--refine-radius", "0"], dict(test_time_flips=True)),
        "wide": (
            ["--refine-radius", "3", "--refine-eps", "0.05"],
            dict(test_time_flips=True, refine_radius=3, refine_eps=0.05),
        ),
    }
    results = {}
    for name, (extra, expected) in runs.items():
        assert main(args + extra + ["--out", str(tmp_path / name)]) == 0
        results[name], labels, _, _ = _outputs(tmp_path / name, "cells")
        np.testing.assert_allclose(results[name], predict_tiled(model, normalized, **expected), atol=1e-5)
        np.testing.assert_array_equal(labels, np.asarray(CLASS_IDS)[np.argmax(results[name], axis=0)])
    for a, b in (("raw", "flips"), ("flips", "default"), ("one", "wide")):
        assert np.abs(results[a] - results[b]).max() > 1e-3, (a, b)
    np.testing.assert_array_equal(results["default"], results["auto"])


@pytest.mark.parametrize(
    "bad",
    [
        ["--refine-radius", "-1"],
        ["--refine-radius", "1.5"],
        ["--refine-radius", "Auto"],
        ["--refine-eps", "0"],
        ["--refine-eps", "-1"],
        ["--refine-eps", "nan"],
        ["--refine-eps", "inf"],
        ["--refine-eps", "x"],
    ],
)
def test_bad_refinement_options_are_usage_errors(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model", "m.safetensors", "--out", "x", "image.tif", *bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert bad[0] in err and "Traceback" not in err
    if bad[0] == "--refine-eps" and bad[1] != "x":  # the bound it names is the one it applies
        assert "must be a finite number greater than 0" in err


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_predict_reads_a_stack_tile_by_tile(tmp_path, model_file, monkeypatch, dtype):
    """Neither the image nor any whole-size result is held in memory: peak traced memory stays below half
    the size of the stack itself (the image read whole and its float32 normalized copy took 3x the stack),
    and the outputs are the in-memory prediction's. Float images too: their percentiles are selected in
    streaming passes (they were read whole for them)."""
    import tracemalloc

    import napari_unet.normalization as normalization
    import napari_unet.refine as refine

    monkeypatch.setattr(normalization, "_SLAB_PIXELS", 1 << 15)  # a constant (8 MiB by default): small here
    monkeypatch.setattr(normalization, "_SELECTION_KEEP", 1 << 14)  # values held by the float percentile search
    monkeypatch.setattr(refine, "_BAND_PIXELS", 1 << 14)  # the same for the edge refinement's bands
    model_path, model = model_file
    stack = (np.random.default_rng(1).random((96, 256, 256)) * 60000).astype(dtype)
    path = write_tiff(tmp_path / "stack.tif", stack, axes="ZYX")
    small = write_tiff(tmp_path / "small.tif", stack[:2, :64, :64], axes="ZYX")
    options = ["--tile", "256", "256", "--batch-size", "2", "--no-test-time-flips", "--refine-radius", "1"]
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
    expected = predict_tiled(model, normalize_image(stack)[planes], refine_radius=1)  # refined slice by slice
    np.testing.assert_allclose(probabilities[:, planes], expected, atol=1e-5)
    np.testing.assert_array_equal(labels, np.asarray(CLASS_IDS)[probabilities.argmax(0)])


def test_folders_shards_skip_existing_and_keep_going(tmp_path, model_file, capsys):
    """A folder stands for its TIFFs (sorted); --shard I/N predicts every N-th of them from I (cluster arrays);
    --skip-existing leaves images whose outputs exist; --keep-going predicts the rest when one fails."""
    model_path, _ = model_file
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("a", "b", "c"):
        write_tiff(folder / f"{name}.tif", (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8))
    (folder / "notes.txt").write_text("not an image")
    run = ["predict", "-m", str(model_path), str(folder), "-o", str(out), "--no-test-time-flips"]
    assert main([*run, "--shard", "1/2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["b_labels.tif", "b_probabilities.tif"]
    assert main([*run, "--shard", "0/2"]) == 0
    assert sorted(p.name for p in out.iterdir())[::2] == ["a_labels.tif", "b_labels.tif", "c_labels.tif"]
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main([*run, "--skip-existing"]) == 0
    assert "skipping 3 image(s)" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written

    (folder / "b.tif").write_bytes(b"II*\x00 broken")
    (out / "a_labels.tif").unlink()
    assert main([*run, "--keep-going"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "b.tif" in err[0] and err[-1].endswith(f"1 of 3 image(s) failed: {folder / 'b.tif'}")
    assert (out / "a_labels.tif").is_file()  # predicted again after the failure of b
    with pytest.raises(SystemExit) as exit_info:  # I must be below N: a usage error
        main([*run, "--shard", "2/2"])
    assert exit_info.value.code == 2 and "--shard" in capsys.readouterr().err
    assert main(["predict", "-m", str(model_path), str(tmp_path / "empty"), "-o", str(out)]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["predict", "-m", str(model_path), str(tmp_path / "empty"), "-o", str(out)]) == 2
    assert "no TIFF images in folder" in capsys.readouterr().err


def test_skip_existing_predicts_again_an_output_cut_short(tmp_path, model_file, capsys):
    """An output cut short after napari-unet wrote it (a failed copy or sync) still holds its marker on the first
    page: --skip-existing looks at its pages too (how many, and where their data ends), so it predicts that image
    again and replaces the file; the complete outputs are left."""
    model_path, _ = model_file
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("a", "b"):
        write_tiff(folder / f"{name}.tif", (np.random.default_rng(1).random((40, 50)) * 255).astype(np.uint8))
    run = ["predict", "-m", str(model_path), str(folder), "-o", str(out), "--no-test-time-flips", "--skip-existing"]
    assert main(run) == 0
    whole = (out / "a_probabilities.tif").read_bytes()
    (out / "a_probabilities.tif").write_bytes(whole[: len(whole) // 2])  # 3 pages: the later ones lost
    kept = (out / "b_labels.tif").stat().st_mtime_ns
    capsys.readouterr()
    assert main(run) == 0
    assert "skipping 1 image(s)" in capsys.readouterr().err
    assert read_image(out / "a_probabilities.tif")[0].shape == (3, 40, 50)  # predicted again, whole
    assert (out / "b_labels.tif").stat().st_mtime_ns == kept


def test_predict_refuses_a_corrupt_image_in_one_line(tmp_path, model_file, capsys):
    model_path, _ = model_file
    image = (np.random.default_rng(2).random((64, 256, 256)) * 4000).astype(np.uint16)
    path = write_tiff(tmp_path / "broken.tif", image, axes="ZYX")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[40].dataoffsets[0], tif.pages[40].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(count)  # zeroes for one compressed strip of plane 40
    path.write_bytes(bytes(data))
    assert main(["predict", "-m", str(model_path), str(path), "-o", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "not a readable TIFF" in error[0]


def test_stacks_channels_and_nan(tmp_path, make_model):
    rng = np.random.default_rng(2)
    two_d = save_model(make_model(), tmp_path / "gray.safetensors")
    stack = rng.random((3, 40, 50)).astype(np.float32)
    stack[1, 5:9, 5:9] = np.nan
    stack[2, 0, 0] = np.inf
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")

    rgb_model = save_model(make_model(in_channels=3, n_classes=2), tmp_path / "rgb.safetensors")
    rgb = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "photo.tif", rgb, photometric="rgb")
    write_tiff(tmp_path / "planes.tif", np.moveaxis(rgb, -1, 0), axes="CYX")

    out = tmp_path / "out"
    assert main(["predict", "-m", str(two_d), str(tmp_path / "stack.tif"), "-o", str(out), "--batch-size", "2"]) == 0
    probabilities, labels, _, l_info = _outputs(out, "stack")
    assert probabilities.shape == (3, 3, 40, 50) and labels.shape == (3, 40, 50) and l_info["axes"] == "ZYX"
    assert np.isfinite(probabilities).all()

    args = ["predict", "-m", str(rgb_model), str(tmp_path / "photo.tif"), str(tmp_path / "planes.tif"), "-o", str(out)]
    assert main(args) == 0
    photo, photo_labels, _, _ = _outputs(out, "photo")
    planes, _, _, _ = _outputs(out, "planes")
    assert photo.shape == (2, 40, 50) and photo_labels.max() <= 2
    np.testing.assert_allclose(photo, planes, atol=1e-6)


def test_3d_model_on_a_volume(tmp_path, make_model):
    model = save_model(make_model(ndim=3, depth=1, base_filters=2, n_classes=2), tmp_path / "m3.safetensors")
    volume = np.random.default_rng(3).random((9, 20, 24)).astype(np.float32)
    write_tiff(tmp_path / "vol.tif", volume, axes="ZYX")
    out = tmp_path / "out"
    assert main(["predict", "-m", str(model), str(tmp_path / "vol.tif"), "-o", str(out), "--tile", "8", "8", "8"]) == 0
    probabilities, labels, _, _ = _outputs(out, "vol")
    assert probabilities.shape == (2, 9, 20, 24) and labels.shape == (9, 20, 24)


def _disks(seed=0, shape=(96, 96)):
    """12-bit disks at 600 (one at 1200) on 100 with noise, and strokes (1 = background, 2 = disk)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image, labels = np.full(shape, 100.0), np.zeros(shape, np.uint8)
    for i, (y, x) in enumerate((y, x) for y in range(16, shape[0] - 8, 32) for x in range(16, shape[1] - 8, 32)):
        y, x = y + rng.integers(-3, 4), x + rng.integers(-3, 4)
        image[(yy - y) ** 2 + (xx - x) ** 2 <= 64] = 1200 if i == 0 else 600
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= 9] = 2
    labels[2:5, 4:-4] = 1
    labels[46:48, 4:-4][image[46:48, 4:-4] < 300] = 1
    return np.clip(image + rng.normal(0, 40, shape), 0, 4095).astype(np.uint16), labels


def test_an_image_unlike_the_training_images_is_a_warning_and_both_outputs_hold_the_figures(tmp_path, capsys):
    """A model trained here records its training images' profile; predicting an image whose upper percentile sits
    on bright saturated specks warns on stderr (exit code 0) and writes the check into both TIFFs' metadata."""
    from napari_unet.training import train

    image, labels = _disks()
    trainer = train(
        image, labels, iterations=80, time_budget=None, depth=2, base_filters=4, patch_size=24, device="cpu", seed=0
    )
    model_path = save_model(trainer.model, tmp_path / "m.safetensors", trainer.metadata)
    debris = image.copy()
    debris[np.random.default_rng(1).random(image.shape) < 0.02] = 4095  # 2 %: the disks land near 0.12, not 0.45
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    write_tiff(folder / "img_01.tif", image)
    write_tiff(folder / "img_17.tif", debris)
    capsys.readouterr()
    assert main(["predict", "-m", str(model_path), str(folder), "-o", str(out), "--no-test-time-flips"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1, captured.err
    assert warnings[0].startswith("napari-unet: warning: 'img_17' looks unlike the training images (score ")
    assert warnings[0].endswith("): paint a few strokes on it and train on") and "class 2" in warnings[0]
    assert "img_17_labels.tif" in captured.out  # predicted all the same
    for stem, unlike in (("img_01", False), ("img_17", True)):
        records = [read_tiff_record(out / f"{stem}_{role}.tif") for role in ROLES]
        assert [record.pop("output") for record in records] == list(ROLES)  # the marker, then the same figures
        assert records[0] == records[1]
        domain = records[0]["domain"]
        assert domain["unlike"] is unlike and (domain["score"] > domain["threshold"]) is unlike
        assert domain["reason"] and domain["profile"]["class_fractions"]
        assert read_image(out / f"{stem}_labels.tif")[1]["axes"] == "YX"


def test_tile_option_before_images_and_output_stems(tmp_path, model_file, image_file):
    model_path, _ = model_file
    image_path, _ = image_file
    ome = image_path.with_name("copy.ome.tif")
    shutil.copy(image_path, ome)
    out = tmp_path / "o"
    assert (
        main(["predict", "-m", str(model_path), "-o", str(out), "--tile", "48", "48", str(image_path), str(ome)]) == 0
    )
    assert (out / "cells_labels.tif").exists() and (out / "copy_labels.tif").exists()
    assert output_stem(image_path) == "cells" and output_stem(ome) == "copy"


def test_console_script(tmp_path, model_file, image_file):
    script = shutil.which("napari-unet")
    assert script, "the napari-unet console script is not installed (pip install -e .)"
    model_path, _ = model_file
    image_path, _ = image_file
    out = tmp_path / "script_out"
    done = subprocess.run(
        [script, "predict", "--model", str(model_path), str(image_path), "--out", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "cells_probabilities.tif").exists() and (out / "cells_labels.tif").exists()

    bad = subprocess.run(
        [script, "predict", "--model", str(image_path), str(image_path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    _assert_one_line_error(bad.stderr, "not a valid safetensors")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, make_model, malicious_pickle):
    """Files for the bad-input cases, made once: (folder, model path, good image path)."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    model_path = save_model(make_model(), folder / "model.safetensors")
    image_path = write_tiff(folder / "cells.tif", np.zeros((40, 40), np.uint16))
    (folder / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning):
        tifffile.imwrite(folder / "empty.tif", np.zeros((0, 4), np.uint8))
    good = model_path.read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    malicious_pickle(folder / "evil.safetensors", folder / "pwned")
    torch.save(make_model().state_dict(), folder / "weights.pt")
    save_model(make_model(in_channels=3), folder / "rgb.safetensors")
    write_tiff(folder / "two_channels.tif", np.zeros((2, 30, 30), np.float32), axes="CYX")
    return folder, model_path, image_path


BAD_CASES = {  # name -> (argv after 'predict', with {d} the bad_inputs folder; expected message fragment)
    "missing image": ("-m {d}/model.safetensors {d}/nope.tif", "image not found"),
    "non-TIFF image": ("-m {d}/model.safetensors {d}/notes.txt", "not a readable TIFF"),
    "empty image": ("-m {d}/model.safetensors {d}/empty.tif", "empty image"),
    "no image": ("-m {d}/model.safetensors", "at least one IMAGE"),
    "missing model": ("-m {d}/none.safetensors {d}/cells.tif", "model file not found"),
    "corrupt model": ("-m {d}/truncated.safetensors {d}/cells.tif", "corrupt or truncated"),
    "malicious model": ("-m {d}/evil.safetensors {d}/cells.tif", "refused"),
    "torch pickle model": ("-m {d}/weights.pt {d}/cells.tif", "PyTorch"),
    "image as model": ("-m {d}/cells.tif {d}/cells.tif", "not a valid safetensors"),
    "too few channels": ("-m {d}/rgb.safetensors {d}/cells.tif", "expects 3 channel(s), the image has 1"),
    "too many channels": ("-m {d}/model.safetensors {d}/two_channels.tif", "expects 1 channel(s), the image has 2"),
    "bad tile": ("-m {d}/model.safetensors {d}/cells.tif --tile 32", "--tile needs 2"),
    "3D tile for 2D model": ("-m {d}/model.safetensors {d}/cells.tif --tile 8 32 32", "needs 2 sizes"),
    "duplicate stems": ("-m {d}/model.safetensors {d}/cells.tif {d}/cells.tif", "same outputs"),
    "unknown device": ("-m {d}/model.safetensors {d}/cells.tif --device tpu", "unknown device"),
}


def _assert_one_line_error(err, fragment):
    assert err.startswith("napari-unet: error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_line_error(tmp_path, bad_inputs, capsys, case):
    folder = bad_inputs[0]
    args, fragment = BAD_CASES[case]
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["predict", *args.format(d=folder).split(), "-o", str(out)]) == 2
    _assert_one_line_error(capsys.readouterr().err, fragment)
    assert not (folder / "pwned").exists()
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(("out", "fragment"), [("notes.txt", "not a folder"), ("notes.txt/sub", "not writable")])
def test_unwritable_output_folder(bad_inputs, capsys, out, fragment):
    folder, model_path, image_path = bad_inputs
    assert main(["predict", "-m", str(model_path), str(image_path), "-o", str(folder / out)]) == 2
    _assert_one_line_error(capsys.readouterr().err, fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_device_is_one_line_error(tmp_path, bad_inputs, capsys):
    _, model_path, image_path = bad_inputs
    argv = ["predict", "-m", str(model_path), str(image_path), "-o", str(tmp_path / "o"), "--device", "cuda"]
    assert main(argv) == 2
    _assert_one_line_error(capsys.readouterr().err, "'cuda' is not available")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--out", "x", "image.tif"])  # --model is required
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_progress_bar_shows_only_on_long_runs():
    """A run shorter than the delay prints nothing; a longer one prints, on a stream that is not a terminal, a line
    per update with the tile counts and the time left, and ends when the last tile is done."""
    import re
    import time

    stream = stdio.StringIO()
    with progress_bar("a.tif", stream=stream, delay=60) as quick:
        quick(1, 2)
        quick(2, 2)
    assert stream.getvalue() == ""
    with progress_bar("b.tif", stream=stream, delay=0.001, log_interval=0) as slow:
        time.sleep(0.01)  # past the delay
        slow(1, 4)
        slow(4, 4)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("b.tif") and "tiles" in line for line in lines), lines
    assert re.search(r" 1/4 \[\d\d:\d\d<\d\d:\d\d", lines[0]), lines  # elapsed < time left
    assert " 4/4 " in lines[1] and "\r" not in stream.getvalue()


def _one_line_error(capsys) -> str:
    """The error of a run: one line (after the notes a run may print first, such as what it skips)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "Traceback" not in err and sum(line.startswith("napari-unet: error: ") for line in lines) == 1, err
    assert lines[-1].startswith("napari-unet: error: "), err
    return lines[-1]


def test_predict_never_replaces_a_file_it_did_not_write(tmp_path, model_file, image_file, capsys):
    """An existing file at an output path without napari-unet's output marker (the user's ground truth, saved by
    napari or another tool, or not an image at all) is refused before any prediction, in one line naming it and
    ``--overwrite``; --overwrite replaces it, and napari-unet's own outputs are replaced without asking."""
    model_path, _ = model_file
    image_path, _ = image_file
    out = tmp_path / "out"
    out.mkdir()
    truth = write_tiff(out / "cells_labels.tif", np.ones((70, 90), np.uint8))  # like napari's Save: no marker
    (out / "cells_probabilities.tif").write_text("my notes")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    run = ["predict", "-m", str(model_path), str(image_path), "-o", str(out), "--no-test-time-flips"]
    assert main(run) == 2
    err = _one_line_error(capsys)
    assert (
        f"2 files at the output paths are not napari-unet outputs (other files, or too damaged to read): {truth}" in err
    )
    assert "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused before anything was written
    (out / "cells_probabilities.tif").unlink()
    assert main(run) == 2
    assert (
        f"{truth} exists and is not a napari-unet output (another file, or one too damaged to read): not replaced"
        in (_one_line_error(capsys))
    )
    assert truth.read_bytes() == before["cells_labels.tif"]

    assert main([*run, "--overwrite"]) == 0
    assert read_tiff_record(truth)["output"] == "labels" and read_image(truth)[0].max() > 1
    written = truth.stat().st_mtime_ns
    assert main(run) == 0  # its own output: replaced without --overwrite
    assert truth.stat().st_mtime_ns != written


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path, model_file, capsys):
    """``predict data/ -o data/`` next to a ground truth ``X_labels.tif`` (which is itself an input image of the
    folder) would replace it with the labels of ``X.tif``: refused, with or without --overwrite; also when the
    output path reaches an input another way (a hard link, the model file)."""
    model_path, _ = model_file
    data = tmp_path / "data"
    data.mkdir()
    image = (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)
    write_tiff(data / "X.tif", image)
    truth = write_tiff(data / "X_labels.tif", (image > 128).astype(np.uint8))
    before = truth.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert main(["predict", "-m", str(model_path), str(data), "-o", str(data), *extra]) == 2
        err = _one_line_error(capsys)
        assert f"the labels of {data / 'X.tif'} would replace {truth}, an input" in err and "--out" in err
    assert truth.read_bytes() == before and sorted(p.name for p in data.iterdir()) == ["X.tif", "X_labels.tif"]

    other = tmp_path / "other"
    other.mkdir()
    os.link(data / "X.tif", other / "Y_labels.tif")  # the same file as the input X.tif
    write_tiff(other / "Y.tif", image)
    argv = ["predict", "-m", str(model_path), str(data / "X.tif"), str(other / "Y.tif"), "-o", str(other)]
    assert main([*argv, "--overwrite"]) == 2
    assert f"would replace {data / 'X.tif'}, an input" in _one_line_error(capsys)
    shutil.copy(model_path, other / "M_probabilities.tif")
    write_tiff(other / "M.tif", image)
    argv = ["predict", "-m", str(other / "M_probabilities.tif"), str(other / "M.tif"), "-o", str(other)]
    assert main([*argv, "--overwrite"]) == 2
    assert "an input" in _one_line_error(capsys)
    np.testing.assert_array_equal(read_image(data / "X.tif")[0], image)


def test_predicting_into_the_image_folder_again_leaves_its_outputs_out(tmp_path, model_file, capsys):
    """The outputs of a first ``predict data/ -o data/`` are not inputs of the second (known by their marker, not
    their name: a renamed output is left out too, an unmarked ``*_labels.tif`` is an image); --skip-existing
    counts only outputs napari-unet wrote."""
    model_path, _ = model_file
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        write_tiff(data / f"{name}.tif", (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8))
    run = ["predict", "-m", str(model_path), str(data), "-o", str(data), "--no-test-time-flips"]
    assert main(run) == 0
    first = sorted(p.name for p in data.iterdir())
    assert first == ["a.tif", "a_labels.tif", "a_probabilities.tif", "b.tif", "b_labels.tif", "b_probabilities.tif"]
    shutil.copy(data / "a_labels.tif", data / "renamed.tif")
    capsys.readouterr()
    assert main(run) == 0
    predicted = [line.split(" -> ")[0] for line in capsys.readouterr().out.splitlines()]
    assert predicted == [str(data / "a.tif"), str(data / "b.tif")]
    assert sorted(p.name for p in data.iterdir()) == sorted([*first, "renamed.tif"])

    assert main([*run, "--skip-existing"]) == 0
    assert "skipping 2 image(s)" in capsys.readouterr().err
    mine = write_tiff(data / "b_labels.tif", np.zeros((40, 50), np.uint8))  # the user's file, same name
    named = ["predict", "-m", str(model_path), str(data / "a.tif"), str(data / "b.tif"), "-o", str(data)]
    assert main([*named, "--skip-existing"]) == 2  # b is not done: its labels are not napari-unet's
    assert f"{mine} exists and is not a napari-unet output" in _one_line_error(capsys)
    assert main([*run, "--skip-existing", "--overwrite"]) == 2  # in the folder, that file is an image: an input
    assert f"would replace {mine}, an input" in _one_line_error(capsys)
    assert read_image(mine)[0].max() == 0
    mine.unlink()

    (data / "c_labels.tif").write_bytes((data / "a_labels.tif").read_bytes())  # marked: left out
    user = write_tiff(data / "c_probabilities.tif", np.zeros((40, 50), np.uint8))  # unmarked: an image
    assert main(["predict", "-m", str(model_path), str(data / "c_labels.tif"), "-o", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    assert main([*run, "--overwrite"]) == 0
    predicted = [line.split(" -> ")[0] for line in capsys.readouterr().out.splitlines()]
    assert predicted == [str(data / "a.tif"), str(data / "b.tif"), str(user)]


def test_scratch_and_probe_files_never_follow_a_planted_symlink(tmp_path, model_file, image_file):
    """Symbolic links planted in the output folder at the names the scratch memory maps and the write probe had
    (predictable: the stem, the role and the process id) pointing at someone else's files: those files are
    untouched (the scratch and probe files get unpredictable names, created exclusively)."""
    model_path, _ = model_file
    image_path, _ = image_file
    out, victims = tmp_path / "out", tmp_path / "victims"
    out.mkdir()
    victims.mkdir()
    names = [f".napari-unet-write-test-{os.getpid()}", *(f".cells_{r}.{os.getpid()}.npy" for r in ROLES)]
    for name in names:
        (victims / name).write_bytes(b"precious")
        (out / name).symlink_to(victims / name)
    assert main(["predict", "-m", str(model_path), str(image_path), "-o", str(out), "--no-test-time-flips"]) == 0
    assert all((victims / name).read_bytes() == b"precious" for name in names)
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "cells_labels.tif", "cells_probabilities.tif"])
