"""The bundled sample data and the headless demo."""

import numpy as np
import tifffile

from napari_unet.demo import dice, run_demo, sample_paths


def test_sample_files_are_bundled_and_consistent():
    paths = sample_paths()
    assert len(paths["images"]) == len(paths["truths"]) == 4
    for image_path, truth_path in zip(paths["images"], paths["truths"]):
        image, truth = tifffile.imread(image_path), tifffile.imread(truth_path)
        assert image.shape == truth.shape == (256, 256)
        assert truth.max() >= 5
    strokes = tifffile.imread(paths["strokes"])
    truth = tifffile.imread(paths["truths"][0]) > 0
    assert set(np.unique(strokes)) == {0, 1, 2}
    assert not (strokes == 2)[~truth].any() and not (strokes == 1)[truth].any()  # strokes stay inside their class
    assert (paths["images"][0].parent / "README.md").read_text().count("CC0") >= 1


def test_dice():
    a = np.array([1, 1, 0, 0], bool)
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_demo_runs_headless_and_writes_outputs(tmp_path):
    lines = []
    result = run_demo(
        1.0,
        tmp_path,
        device="cpu",
        log=lines.append,
        depth=1,
        base_filters=4,
        patch_size=32,
        cpu_threads=1,
    )
    assert result["model"].is_file()
    assert set(result["dice"]) == {"nuclei2.tif", "nuclei3.tif", "nuclei4.tif"}
    assert all(0.0 <= d <= 1.0 for d in result["dice"].values())
    for name in ("nuclei2", "nuclei3", "nuclei4"):
        labels = tifffile.imread(tmp_path / f"{name}_labels.tif")
        assert labels.shape == (256, 256) and set(np.unique(labels)) <= {1, 2}
        assert tifffile.imread(tmp_path / f"{name}_probabilities.tif").shape == (2, 256, 256)
    assert any("Dice" in line for line in lines)
