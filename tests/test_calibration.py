"""Temperature scaling: the fit lowers the NLL and the calibration error of a miscalibrated case, the model file keeps
the temperature, and every prediction path applies it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_datasets import make_plain

from napari_unet.bioimageio_export import _Probabilities, grid_shift
from napari_unet.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    flip_logits,
    nll,
    softmax,
)
from napari_unet.dataset_training import DatasetTrainer
from napari_unet.datasets import open_dataset
from napari_unet.io import load_model, save_model
from napari_unet.model import UNet
from napari_unet.predict import PredictionSettings, predict_image, predict_region
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


def test_flip_logits_are_the_passes_that_test_time_flips_average():
    model = _model(1.0)
    yy, xx = np.mgrid[:61, :70]
    image = (3 * np.sin(yy / 5.0) * np.cos(xx / 3.0) + yy / 10.0).astype(np.float32)
    indices = np.arange(0, image.size, 7)
    passes = flip_logits(model, image, indices)
    assert passes.shape == (8, indices.size, 3)
    averaged = predict_tiled(model, image, test_time_flips=True).reshape(3, -1)[:, indices].T
    np.testing.assert_allclose(softmax(passes), averaged, atol=1e-5)
    (one,) = flip_logits(model, image, indices, flips=False)
    np.testing.assert_allclose(np.exp(one), predict_tiled(model, image).reshape(3, -1)[:, indices].T, atol=1e-6)


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
