"""`napari-unet train` under signals, in child processes: SIGTERM and Ctrl-C save the model trained so far (exit
codes 143 and 130), and a SIGKILL at any moment leaves the last checkpoint a loadable model."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

import napari_unet
from napari_unet.io import load_model

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")

SRC = Path(napari_unet.__file__).parents[1]
LONG = ["--iterations", "1000000", "--time-budget", "600", "--depth", "1", "--filters", "4", "--patch-size", "16"]


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (48, 48)).astype(np.float32)
    image[:, 24:] += 100
    labels = np.zeros((48, 48), np.uint8)
    labels[5:40, 6:9], labels[8:44, 36:39] = 1, 2
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    return tmp_path


def _start(folder: Path, out: Path, *extra: str, name: str = "run") -> tuple[subprocess.Popen, Path, Path]:
    """A ``napari-unet train`` child process (this checkout's code) with its stdout and stderr in files."""
    stdout, stderr = folder / f"{name}.out", folder / f"{name}.err"
    argv = [sys.executable, "-m", "napari_unet.cli", "train", "--images", str(folder / "img.tif")]
    argv += ["--labels", str(folder / "lab.tif"), "--out", str(out), "--device", "cpu", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    with open(stdout, "w") as o, open(stderr, "w") as e:
        child = subprocess.Popen(argv, stdout=o, stderr=e, env=env)
    return child, stdout, stderr


def _wait_until(condition, child: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            child.wait(timeout=60)
            pytest.fail(f"{what}: not reached (exit code {child.returncode})")
        time.sleep(0.05)


def _said(stderr: Path, text: str):
    return lambda: text in stderr.read_text()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_training_and_saves_the_model_trained_so_far(pair, signum, code):
    out = pair / "m.safetensors"
    child, stdout, stderr = _start(pair, out, *LONG, "--checkpoint-every", "0")
    _wait_until(_said(stderr, "iteration "), child, "training")
    time.sleep(0.5)
    child.send_signal(signum)
    assert child.wait(timeout=120) == code, stderr.read_text()
    err = stderr.read_text()
    assert f"stopped by {signal.Signals(signum).name} at iteration" in err and "Traceback" not in err, err
    assert stdout.read_text().strip() == str(out)
    _, metadata = load_model(out)
    run = metadata["training"]["history"][-1]
    assert run["stop_reason"] == "stopped" and run["iterations"] > 0  # the whole run's end: weight average, profile


def test_sigkill_at_any_moment_leaves_a_loadable_model(pair):
    """``kill -9`` of a training with checkpoints each 0.2 s, five times at random moments (during start-up, between
    and in checkpoint writes): after the first checkpoint the model file always loads; the temporary files killed
    writes leave are removed by the next save."""
    out = pair / "m.safetensors"
    moments = random.Random(18)
    for attempt in range(5):
        child, _, stderr = _start(pair, out, *LONG, "--checkpoint-every", "0.2", name=f"kill{attempt}")
        if attempt == 0:
            _wait_until(_said(stderr, "checkpoint at iteration"), child, "the first checkpoint")
        elif attempt > 1:  # attempt 1 dies starting up (or soon after), the others while training
            _wait_until(_said(stderr, "iteration "), child, "training")
        time.sleep(moments.uniform(0, 1.5))
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
        model, metadata = load_model(out)  # the last checkpoint, whole
        assert metadata["class_ids"] == [1, 2]
    child, _, stderr = _start(pair, out, "--iterations", "3", "--depth", "1", "--filters", "4", "--patch-size", "16")
    assert child.wait(timeout=180) == 0, stderr.read_text()
    load_model(out)
    assert [p.name for p in pair.iterdir() if p.name.endswith(".tmp")] == []


def test_sigterm_during_prediction_exits_143_and_leaves_no_scratch_files(tmp_path, make_model):
    """SIGTERM ends ``predict`` as Ctrl-C does: exit code 143, one line, and the scratch memory maps it was
    predicting into are removed (no hidden file left in the output folder)."""
    from napari_unet.io import save_model, write_tiff

    model = save_model(make_model(), tmp_path / "m.safetensors")
    image = write_tiff(tmp_path / "im.tif", (np.random.default_rng(0).random((256, 256)) * 255).astype(np.uint8))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "napari_unet.cli", "predict", "-m", str(model), str(image), "-o", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "err", "w") as err:
        child = subprocess.Popen([*argv, "--tile", "8", "8", "--device", "cpu"], stderr=err, env=env)  # slow
    scratch = lambda: [p for p in out.iterdir() if p.name.startswith(".im_probabilities.npy.")]  # noqa: E731
    _wait_until(lambda: out.is_dir() and scratch(), child, "prediction")
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=120) == 143
    err = (tmp_path / "err").read_text()
    assert err.endswith("\nnapari-unet: error: interrupted (SIGTERM)\n") or err.startswith("napari-unet: error: int")
    assert "Traceback" not in err and err.count("error") == 1, err
    assert list(out.iterdir()) == []
