"""Temperature scaling: the fit lowers the NLL and the calibration error of a miscalibrated case, the model file keeps
the temperature, and every prediction path applies it."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_datasets import make_plain

from napari_unet.bioimageio_export import _Probabilities, grid_shift
from napari_unet.calibration import (
    FlipPasses,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    held_out_patch,
    nll,
    sample_window,
    softmax,
)
from napari_unet.dataset_training import DatasetTrainer
from napari_unet.datasets import open_dataset
from napari_unet.io import load_model, save_model
from napari_unet.model import UNet
from napari_unet.predict import PredictionSettings, predict_image, predict_region
from napari_unet.refine import MAX_AUTO_RADIUS
from napari_unet.tiling import predict_tiled
from napari_unet.training import TrainingSettings


def miscalibrated(scale: float, n: int = 20000, k: int = 3, seed: int = 0):
    """Logits whose softmax is the true class distribution, multiplied by ``scale`` (> 1: overconfident)."""
    rng = np.random.default_rng(seed)
    true = rng.normal(0, 1.5, (n, k))
    p = softmax(true)
    targets = np.array([rng.choice(k, p=row) for row in p])
    return true * scale, targets


@pytest.mark.parametrize("scale", [3.0, 0.4])
def test_fit_recovers_the_temperature_and_lowers_nll_and_ece(scale):
    logits, targets = miscalibrated(scale)
    temperature = fit_temperature(logits, targets)
    assert temperature == pytest.approx(scale, rel=0.1)
    result = calibrate(logits, targets)
    assert result["nll_after"] < result["nll_before"] and result["ece_after"] < result["ece_before"]
    assert result["ece_after"] < 0.02
    assert nll(logits, targets, temperature) <= nll(logits, targets, temperature * 1.1)
    fixed = calibrate(logits, targets, 2.0)
    assert fixed["temperature"] == 2.0


def test_the_fit_goes_through_the_average_of_the_flip_passes():
    """Passes that disagree (as test-time flips do) are softer on average than each one: fitted through their mean,
    the temperature is lower than the one a single pass asks for, and the mean's NLL is the lower one with it."""
    logits, targets = miscalibrated(1.0, n=20000)
    rng = np.random.default_rng(3)
    passes = np.stack([3.0 * (logits + rng.normal(0, 1.5, logits.shape)) for _ in range(8)])
    through, single = fit_temperature(passes, targets), fit_temperature(passes[0], targets)
    assert through < single
    assert nll(passes, targets, through) < nll(passes, targets, single)
    result = calibrate(passes, targets)
    assert result["passes"] == 8 and result["nll_after"] < result["nll_before"]


def _wavy(shape=(61, 70)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (3 * np.sin(yy / 5.0) * np.cos(xx / 3.0) + yy / 10.0).astype(np.float32)


def _every(step: int, shape) -> tuple[np.ndarray, ...]:
    return np.unravel_index(np.arange(0, int(np.prod(shape)), step), shape)


@pytest.mark.parametrize("radius", [0, 2, "auto"])
def test_held_out_pixels_are_what_the_default_prediction_returns(radius):
    """At any temperature, a patch's held-out pixels get the probabilities that ``predict_tiled`` with test-time
    flips and the edge refinement gives a model of that temperature (pixels all over the image: the patch is it)."""
    image = _wavy()
    coordinates = _every(7, image.shape)
    patch = held_out_patch(_model(1.0), image, coordinates, radius=radius)
    assert patch.passes.shape == (8, 3, *image.shape)
    assert patch.radius == radius if radius != "auto" else 1 <= patch.radius <= MAX_AUTO_RADIUS
    for temperature in (1.0, 2.5):
        whole = predict_tiled(_model(temperature), image, test_time_flips=True, refine_radius=radius)
        np.testing.assert_allclose(patch.probabilities(temperature), whole[(slice(None), *coordinates)].T, atol=1e-5)
    (one,) = held_out_patch(_model(1.0), image, coordinates, flips=False, radius=0).passes
    np.testing.assert_allclose(np.exp(one), predict_tiled(_model(1.0), image), atol=1e-6)


def test_a_patch_inside_the_image_carries_the_context_the_refinement_reads():
    """Pixels in the middle of a larger image: the patch is their box grown by the refinement's reach and the
    network's context, and its unflipped, refined probabilities there equal the whole image's."""
    image = _wavy((150, 160))
    model = _model(1.0)
    coordinates = tuple(c + 60 for c in _every(3, (20, 25)))
    patch = held_out_patch(model, image, coordinates, flips=False, radius=3)
    assert patch.passes.shape[2] < image.shape[0] and patch.passes.shape[3] < image.shape[1]
    whole = predict_tiled(model, image, refine_radius=3)
    np.testing.assert_allclose(patch.probabilities(), whole[(slice(None), *coordinates)].T, atol=1e-5)


def test_the_fit_goes_through_the_refinement():
    """An overconfident prediction whose edge lies 3 pixels off the image's: the refinement moves it towards the
    image's edge, so the refined probabilities need another temperature than the raw ones, and the one fitted
    through the refinement gives them the lower NLL."""
    x = np.broadcast_to(np.arange(64, dtype=np.float32), (48, 64))
    guide = (x >= 30).astype(np.float32)
    logit = 6.0 * np.tanh((x - 33) / 2.0)
    passes = np.stack([-logit, logit])[None] / 2  # (F=1, K=2, Y, X) log-probabilities up to a constant
    targets = (x >= 30).astype(np.int64).ravel()
    indices = np.arange(x.size)
    refined = FlipPasses(passes, guide, 3, 0.01, 2, indices)
    unrefined = FlipPasses(passes, guide, 0, 0.01, 2, indices)
    through, before = fit_temperature([refined], targets), fit_temperature([unrefined], targets)
    assert abs(math.log(through / before)) > 0.1
    assert nll([refined], targets, through) < nll([refined], targets, before)
    result = calibrate([refined], targets)
    assert result["refined"] and result["passes"] == 1 and result["nll_after"] < result["nll_before"]
    assert not calibrate([unrefined], targets)["refined"]


def test_sample_window_is_bounded_contiguous_and_seeded():
    shape = (300, 200)
    window = sample_window(shape, 6000, np.random.default_rng(0))
    sides = [w.stop - w.start for w in window]
    assert np.prod(sides) <= 6000 and all(w.start >= 0 and w.stop <= n for w, n in zip(window, shape))
    assert sides[0] > sides[1]  # the image's aspect ratio
    assert window == sample_window(shape, 6000, np.random.default_rng(0))
    assert sample_window(shape, 10**6, np.random.default_rng(0)) == (slice(0, 300), slice(0, 200))


def test_ece_of_a_calibrated_and_an_overconfident_predictor():
    logits, targets = miscalibrated(1.0, n=50000)
    assert expected_calibration_error(softmax(logits), targets) < 0.01
    assert expected_calibration_error(softmax(logits * 4), targets) > 0.1


def _model(temperature: float) -> UNet:
    torch.manual_seed(0)
    return UNet(depth=2, base_filters=4, n_classes=3, temperature=temperature).eval()


def test_every_prediction_path_applies_the_temperature(tmp_path):
    image = np.random.default_rng(1).normal(size=(50, 60)).astype(np.float32)
    plain, hot = _model(1.0), _model(2.5)
    expected = torch.softmax(torch.log(torch.from_numpy(predict_tiled(plain, image))) / 2.5, 0).numpy()
    np.testing.assert_allclose(predict_tiled(hot, image), expected, atol=1e-5)  # tiles (CLI, widget, demo)
    # saved and loaded: the file keeps it; predict_image (CLI predict, the widget's Predict/Segment all)
    save_model(hot, tmp_path / "m.safetensors", {"class_ids": [1, 2, 3], "normalization": {"method": "none"}})
    loaded, meta = load_model(tmp_path / "m.safetensors")
    assert loaded.temperature == 2.5
    settings = PredictionSettings(device="cpu", test_time_flips=False, refine_radius=0)
    np.testing.assert_allclose(predict_image(loaded, meta, image, settings).probabilities, expected, atol=1e-5)
    # the live preview
    region = (slice(10, 30), slice(5, 45))
    np.testing.assert_allclose(
        predict_region(loaded.inference_copy(), image, region), expected[:, 10:30, 5:45], atol=1e-5
    )
    # the BioImage.IO export's network (traced as it is)
    shift = grid_shift(hot)
    size = hot.legal_input_shape(1)[0]
    x = torch.randn(1, 1, size + shift, size + shift)
    exported = _Probabilities(hot.inference_copy(), shift).eval()
    reference = _Probabilities(plain.inference_copy(), shift).eval()
    with torch.no_grad():
        traced = torch.jit.trace(exported, x)
        want = torch.softmax(torch.log(reference(x)) / 2.5, 1)
        torch.testing.assert_close(traced(x), want, atol=1e-5, rtol=1e-4)


def test_dataset_training_fits_and_stores_the_temperature(tmp_path):
    make_plain(tmp_path, count=4, suffix=".png")
    settings = TrainingSettings(
        depth=1, base_filters=4, patch_size=24, batch_size=2, time_budget=None, device="cpu", amp=False
    )
    trainer = DatasetTrainer(open_dataset(tmp_path, val_fraction=0.25), settings, epochs=2)
    list(trainer.run())
    c = trainer.calibration
    assert c["nll_after"] <= c["nll_before"] and trainer.model.temperature == c["temperature"] != 1.0
    trainer.save(tmp_path / "m.safetensors")
    model, meta = load_model(tmp_path / "m.safetensors")
    assert model.temperature == c["temperature"] and meta["calibration"]["ece_before"] == c["ece_before"]
    off = DatasetTrainer(open_dataset(tmp_path, val_fraction=0.25), replace(settings, temperature="off"), epochs=1)
    list(off.run())
    assert off.model.temperature == 1.0 and off.calibration is None
    given = DatasetTrainer(open_dataset(tmp_path, val_fraction=0.25), replace(settings, temperature=1.7), epochs=1)
    list(given.run())
    assert given.model.temperature == 1.7 and given.calibration["temperature"] == 1.7
