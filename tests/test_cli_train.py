"""`napari-unet train` and `napari-unet demo` from the command line: round trip and one-line errors."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_unet.cli import main
from napari_unet.devices import cpu_has_native_bfloat16
from napari_unet.io import load_model

TINY = ["--iterations", "3", "--depth", "1", "--filters", "4", "--patch-size", "16", "--device", "cpu"]


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (48, 48)).astype(np.float32)
    image[:, 24:] += 100
    labels = np.zeros((48, 48), np.uint8)
    labels[5:40, 6:9] = 1
    labels[8:44, 36:39] = 3
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    return tmp_path, image, labels


def test_train_writes_a_model_and_prints_its_path(pair, capsys):
    folder, image, _ = pair
    out = folder / "model.safetensors"
    assert (
        main(
            [
                "train",
                "--images",
                str(folder / "img.tif"),
                "--labels",
                str(folder / "lab.tif"),
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "iteration 3" in captured.err and "loss" in captured.err and "on cpu, " in captured.err
    model, meta = load_model(out)
    assert meta["class_ids"] == [1, 3] and model.config["depth"] == 1
    # fine-tune from it, then predict with the CLI: labels come back with the painted ids
    tuned = folder / "tuned.safetensors"
    assert (
        main(
            [
                "train",
                "--images",
                str(folder / "img.tif"),
                "--labels",
                str(folder / "lab.tif"),
                "--out",
                str(tuned),
                "--init",
                str(out),
                "--float32",
                *TINY,
            ]
        )
        == 0
    )
    assert "on cpu, float32" in capsys.readouterr().err
    bf16 = folder / "bf16.safetensors"
    assert (
        main(
            [
                "train",
                "--images",
                str(folder / "img.tif"),
                "--labels",
                str(folder / "lab.tif"),
                "--out",
                str(bf16),
                "--cpu-bfloat16",
                *TINY,
            ]
        )
        == 0
    )
    expected = "mixed bfloat16" if cpu_has_native_bfloat16() else "float32"
    assert load_model(bf16)[1]["training"]["history"][-1]["precision"] == expected
    assert main(["predict", "--model", str(tuned), str(folder / "img.tif"), "--out", str(folder / "pred")]) == 0
    assert set(np.unique(tifffile.imread(folder / "pred" / "img_labels.tif"))) <= {1, 3}


def test_train_on_a_stack_reads_it_lazily_and_learns_its_painted_slices(tmp_path, monkeypatch, capsys):
    """The image of `napari-unet train` is a lazy view of its file (never read whole): a stack with strokes on
    two of its slices trains a 2D model that segments the other slices."""
    from napari_unet import io

    rng = np.random.default_rng(1)
    stack = rng.normal(100, 10, (6, 48, 48)).astype(np.float32)
    stack[:, :, 24:] += 100
    labels = np.zeros(stack.shape, np.uint8)
    labels[[1, 4], 5:40, 6:9] = 1
    labels[[1, 4], 8:44, 36:39] = 2
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "stack_labels.tif", labels, imagej=True, metadata={"axes": "ZYX"})
    read = io.read_image
    monkeypatch.setattr(io, "read_image", lambda path: read(path) if "labels" in str(path) else pytest.fail(path))
    out = tmp_path / "model.safetensors"
    args = [
        "train",
        "--images",
        str(tmp_path / "stack.tif"),
        "--labels",
        str(tmp_path / "stack_labels.tif"),
        "--out",
        str(out),
        *TINY,
        "--iterations",
        "250",
        "--seed",
        "0",
    ]
    assert main(args) == 0, capsys.readouterr().err
    monkeypatch.setattr(io, "read_image", read)
    assert main(["predict", "--model", str(out), str(tmp_path / "stack.tif"), "--out", str(tmp_path / "pred")]) == 0
    predicted = tifffile.imread(tmp_path / "pred" / "stack_labels.tif")
    truth = np.broadcast_to(np.where(np.arange(48) >= 24, 2, 1), stack.shape)
    assert (predicted == truth).mean() > 0.9


def _bad_labels(folder, labels, kind):
    path = folder / f"{kind}.tif"
    if kind == "shape":
        tifffile.imwrite(path, labels[:40])
    elif kind == "nothing":
        tifffile.imwrite(path, np.zeros_like(labels))
    elif kind == "one_class":
        tifffile.imwrite(path, (labels == 1).astype(np.uint8))
    elif kind == "float":
        tifffile.imwrite(path, labels.astype(np.float32) + 0.5)
    elif kind == "unreadable":
        path.write_text("not a tiff")
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("shape", "does not match"),
        ("nothing", "nothing is painted"),
        ("one_class", "only one class"),
        ("float", "integer"),
        ("unreadable", "not a readable TIFF"),
        ("missing", "not found"),
    ],
)
def test_train_errors_are_one_line(pair, capsys, kind, message):
    folder, _, labels = pair
    bad = _bad_labels(folder, labels, kind)
    code = main(
        [
            "train",
            "--images",
            str(folder / "img.tif"),
            "--labels",
            str(bad),
            "--out",
            str(folder / "m.safetensors"),
            *TINY,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("napari-unet: error:") and message in err and "\n" not in err
    assert not (folder / "m.safetensors").exists()


def test_float_labels_holding_whole_numbers_are_accepted(pair):
    folder, _, labels = pair
    tifffile.imwrite(folder / "lab_float.tif", labels.astype(np.float32))
    out = folder / "m.safetensors"
    assert (
        main(
            [
                "train",
                "--images",
                str(folder / "img.tif"),
                "--labels",
                str(folder / "lab_float.tif"),
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )


def test_train_count_mismatch_and_class_mismatch_with_init(pair, capsys):
    folder, _, labels = pair
    args = [
        "train",
        "--images",
        str(folder / "img.tif"),
        str(folder / "img.tif"),
        "--labels",
        str(folder / "lab.tif"),
        "--out",
        str(folder / "m.safetensors"),
        *TINY,
    ]
    assert main(args) == 2
    assert "one labels file per image" in capsys.readouterr().err
    out = folder / "m.safetensors"
    main(["train", "--images", str(folder / "img.tif"), "--labels", str(folder / "lab.tif"), "--out", str(out), *TINY])
    tifffile.imwrite(folder / "lab3.tif", np.where(labels == 1, 2, labels).astype(np.uint8))
    code = main(
        [
            "train",
            "--images",
            str(folder / "img.tif"),
            "--labels",
            str(folder / "lab3.tif"),
            "--out",
            str(folder / "t.safetensors"),
            "--init",
            str(out),
            *TINY,
        ]
    )
    assert code == 2 and "classes" in capsys.readouterr().err


def test_demo_cli_rejects_bad_budget(tmp_path, capsys):
    assert main(["demo", "--time-budget", "0", "--out", str(tmp_path)]) == 2
    assert "time-budget" in capsys.readouterr().err


def test_train_and_predict_rgb_images(tmp_path, capsys):
    """An RGB TIFF trains a 3-channel model whose classes differ only in hue; predict reads RGB alike; an
    image with another channel count is a one-line error."""
    rng = np.random.default_rng(0)
    rgb = rng.normal(100, 10, (48, 48, 3)).astype(np.float32)
    rgb[:, :24, 0] += 100  # red left, green right: the same brightness
    rgb[:, 24:, 1] += 100
    labels = np.zeros((48, 48), np.uint8)
    labels[5:40, 6:9], labels[8:44, 36:39] = 1, 3
    tifffile.imwrite(tmp_path / "rgb.tif", rgb.astype(np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    out = tmp_path / "rgb.safetensors"
    args = ["train", "--images", str(tmp_path / "rgb.tif"), "--labels", str(tmp_path / "lab.tif"), "--out", str(out)]
    assert main([*args, "--iterations", "60", *TINY[2:]]) == 0
    assert "with 3 channel(s)" in capsys.readouterr().err
    assert load_model(out)[0].config["in_channels"] == 3
    assert (
        main(
            [
                "predict",
                "--model",
                str(out),
                str(tmp_path / "rgb.tif"),
                "--out",
                str(tmp_path / "pred"),
                "--no-test-time-flips",
            ]
        )
        == 0
    )
    predicted = tifffile.imread(tmp_path / "pred" / "rgb_labels.tif")
    assert predicted.shape == (48, 48) and ((predicted == 3) == (np.arange(48) >= 24)[None]).mean() > 0.95
    tifffile.imwrite(tmp_path / "gray.tif", rgb[..., 0].astype(np.uint8))
    capsys.readouterr()
    code = main(
        [
            "train",
            "--images",
            str(tmp_path / "rgb.tif"),
            str(tmp_path / "gray.tif"),
            "--labels",
            str(tmp_path / "lab.tif"),
            str(tmp_path / "lab.tif"),
            "--out",
            str(tmp_path / "m.safetensors"),
            *TINY,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "images alike" in err and "\n" not in err
    code = main(
        [
            "train",
            "--images",
            str(tmp_path / "gray.tif"),
            "--labels",
            str(tmp_path / "lab.tif"),
            "--out",
            str(tmp_path / "m.safetensors"),
            "--init",
            str(out),
            *TINY,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "3 channel(s)" in err and "\n" not in err


def test_train_normalization_choice_reaches_the_model(tmp_path):
    """``--normalization`` picks the recipe stored in the model (robust by default; dataset: fixed values)."""
    import numpy as np

    from napari_unet.cli import main
    from napari_unet.io import load_model, read_image, write_tiff
    from napari_unet.normalization import BACKGROUND_RECIPE, DEFAULT_RECIPE
    from napari_unet.predict import PredictionSettings, predict_image

    rng = np.random.default_rng(0)
    image = (rng.random((48, 48)) * 200).astype(np.uint8)
    labels = np.zeros((48, 48), np.uint8)
    labels[5:8, 5:40], labels[30:33, 5:40] = 1, 2
    write_tiff(tmp_path / "i.tif", image)
    write_tiff(tmp_path / "l.tif", labels)
    common = [
        "train",
        "--images",
        str(tmp_path / "i.tif"),
        "--labels",
        str(tmp_path / "l.tif"),
        "--iterations",
        "2",
        "--depth",
        "1",
        "--filters",
        "4",
        "--patch-size",
        "16",
        "--device",
        "cpu",
    ]
    assert main([*common, "--out", str(tmp_path / "a.safetensors")]) == 0
    assert load_model(tmp_path / "a.safetensors")[1]["normalization"] == DEFAULT_RECIPE
    assert main([*common, "--out", str(tmp_path / "b.safetensors"), "--normalization", "dataset"]) == 0
    fixed = load_model(tmp_path / "b.safetensors")[1]["normalization"]
    assert fixed["method"] == "fixed" and fixed["from"] == "dataset" and len(fixed["high_values"]) == 1
    # background: the recipe with its grid; the CLI's predict (a lazy file) equals the in-memory prediction
    assert main([*common, "--out", str(tmp_path / "e.safetensors"), "--normalization", "background"]) == 0
    model, metadata = load_model(tmp_path / "e.safetensors")
    assert metadata["normalization"] == BACKGROUND_RECIPE
    predict = ["predict", "--model", str(tmp_path / "e.safetensors"), "--device", "cpu", "--out", str(tmp_path / "p")]
    assert main([*predict, str(tmp_path / "i.tif")]) == 0
    settings = PredictionSettings(device="cpu")
    expected = predict_image(model, metadata, image, settings)
    saved = [p for p in (tmp_path / "p").iterdir() if "prob" in p.name]
    np.testing.assert_allclose(read_image(saved[0])[0], expected.probabilities, atol=1e-5)
    # --consistency reaches the settings the model records
    assert main([*common, "--out", str(tmp_path / "c.safetensors"), "--consistency", "0.3"]) == 0
    assert load_model(tmp_path / "c.safetensors")[1]["training"]["history"][-1]["settings"]["consistency"] == 0.3
    with pytest.raises(SystemExit):  # argparse: a negative weight is refused before anything runs
        main([*common, "--out", str(tmp_path / "d.safetensors"), "--consistency", "-1"])


def _train_args(folder, out, *extra):
    images = ["--images", str(folder / "img.tif"), "--labels", str(folder / "lab.tif")]
    return ["train", *images, "--out", str(out), *extra]


def test_a_bad_model_path_is_found_before_training(pair, capsys, monkeypatch):
    """``--out`` naming an image or labels file (by any path: a hard link, ``..``), a folder, a file in a missing
    folder or in one where no file can be created: one line, before any training (the trainer is never built),
    and the inputs are untouched."""
    import os

    from napari_unet import training

    folder, _, _ = pair
    monkeypatch.setattr(training.Trainer, "__init__", lambda *a, **k: pytest.fail("training started"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    os.link(folder / "lab.tif", folder / "hard.safetensors")
    (folder / "sub").mkdir()
    cases = {
        folder / "img.tif": f"--out {folder / 'img.tif'} is the input {folder / 'img.tif'}",
        folder / "sub" / ".." / "lab.tif": f"is the input {folder / 'lab.tif'}",
        folder / "hard.safetensors": f"is the input {folder / 'lab.tif'}",
        folder / "sub": "is a folder",
        folder / "missing" / "m.safetensors": f"output folder {folder / 'missing'} does not exist",
        Path("/proc/m.safetensors"): "output folder /proc is not writable",
    }
    for out, message in cases.items():
        assert main(_train_args(folder, out, *TINY)) == 2
        err = capsys.readouterr().err
        assert err.startswith("napari-unet: error: ") and err.count("\n") == 1 and message in err, (out, err)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in before} == before


@pytest.mark.parametrize(
    "bad",
    [
        ["--checkpoint-every", "-1"],
        ["--checkpoint-every", "nan"],
        ["--checkpoint-every", "inf"],
        ["--checkpoint-every", "often"],
        ["--time-budget", "nan"],
        ["--time-budget", "0"],
        ["--time-budget", "inf"],
    ],
)
def test_bad_checkpoint_and_budget_options_are_usage_errors(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--images", "i.tif", "--labels", "l.tif", "--out", "m.safetensors", *bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert bad[0] in err and "Traceback" not in err


def test_checkpoints_write_the_model_trained_so_far(pair, capsys, monkeypatch):
    """With --checkpoint-every the model file is written during training (each a whole model, by the trainer's
    atomic save), and once more at the end; 0 writes it only at the end. The signal handlers are as before."""
    import signal

    from napari_unet import training

    folder, _, _ = pair
    saves, real = [], training.Trainer.save

    def recording(trainer, path):
        real(trainer, path)
        saves.append((trainer.iteration, load_model(path)[0]))

    monkeypatch.setattr(training.Trainer, "save", recording)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    out = folder / "m.safetensors"
    args = _train_args(folder, out, *TINY[2:], "--iterations", "40")
    assert main([*args, "--checkpoint-every", "0.000001"]) == 0
    assert [i for i, _ in saves] == list(range(1, 41))  # after each iteration, then the final save
    assert capsys.readouterr().err.count("checkpoint at iteration") == 40
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    first, last = saves[0][1].state_dict(), saves[-1][1].state_dict()
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the weights trained so far, each time
    saves.clear()
    assert main([*args, "--checkpoint-every", "0"]) == 0
    assert saves == [] and "checkpoint" not in capsys.readouterr().err
    load_model(out)
