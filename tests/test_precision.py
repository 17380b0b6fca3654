"""Prediction precision (issue 19): the automatic choice, the measurement kept per machine, exact tiling in every
precision."""

import json

import numpy as np
import pytest
import torch
from test_tiling import _model

from napari_unet import devices, machine_cache
from napari_unet.devices import prediction_dtype
from napari_unet.predict import PredictionSettings, predict_image
from napari_unet.tiling import predict_tiled


def test_named_precisions_and_refusals():
    assert prediction_dtype("float32", "cpu") is None
    assert prediction_dtype("bfloat16", "cpu") is torch.bfloat16
    assert prediction_dtype("float16", torch.device("cuda")) is torch.float16
    with pytest.raises(ValueError, match="not supported on MPS"):
        prediction_dtype("bfloat16", "mps")
    with pytest.raises(ValueError, match="precision must be one of"):
        prediction_dtype("half", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        PredictionSettings(precision="fp8")


@pytest.mark.parametrize(
    "native, speedup, expected", [(True, 2.4, torch.bfloat16), (True, 1.1, None), (False, 9, None)]
)
def test_auto_uses_bfloat16_on_a_cpu_only_where_it_measured_faster(cache_dir, monkeypatch, native, speedup, expected):
    calls = []
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: native)
    monkeypatch.setattr(devices, "measure_cpu_bfloat16_speedup", lambda: calls.append(1) or speedup)
    assert prediction_dtype("auto", "cpu") is expected
    assert prediction_dtype("auto", "cpu") is expected
    assert len(calls) == (1 if native else 0)  # measured once, and only where oneDNN runs bfloat16 natively
    assert prediction_dtype("auto", torch.device("cuda")) is torch.float16
    assert prediction_dtype("auto", "mps") is None


def test_the_measurement_is_kept_in_the_cache_file_across_processes(cache_dir, monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: True)
    monkeypatch.setattr(devices, "measure_cpu_bfloat16_speedup", lambda: 2.0)
    assert devices.cpu_bfloat16_pays()
    records = json.loads((cache_dir / machine_cache.FILE_NAME).read_text())
    (key,) = records
    assert records[key] == 2.0 and devices.cpu_model() in key and torch.__version__ in key
    machine_cache.forget()  # a new process: the file answers, nothing is measured
    monkeypatch.setattr(devices, "measure_cpu_bfloat16_speedup", lambda: pytest.fail("measured again"))
    assert devices.cpu_bfloat16_pays()


def test_a_damaged_or_unwritable_cache_means_measuring_again(cache_dir):
    path = cache_dir / machine_cache.FILE_NAME
    path.write_text("{not json")
    assert machine_cache.cached("k", lambda: 3) == 3
    assert json.loads(path.read_text()) == {"k": 3}  # replaced by a good file
    machine_cache.forget()
    path.write_text("[1, 2]")  # JSON, but not ours
    assert machine_cache.cached("k", lambda: 4) == 4
    machine_cache.forget()
    path.unlink()
    path.mkdir()  # the file's place is taken: nothing can be written, the answer is kept in memory
    assert machine_cache.cached("k", lambda: 5) == 5
    assert machine_cache.cached("k", lambda: pytest.fail("measured twice")) == 5


@pytest.mark.real_bfloat16_measurement
def test_the_real_measurement_is_a_positive_ratio():
    torch.set_num_threads(1)
    assert devices.measure_cpu_bfloat16_speedup(repeats=1) > 0


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
@pytest.mark.parametrize("block", ["plain", "residual"])
def test_tiles_stay_exact_in_reduced_precision(precision, block):
    """A tiled pass equals a whole-image pass in the same precision; the precision is really applied (it differs
    from float32 by far more than the tiling does)."""
    model = _model(block=block)
    image = np.random.default_rng(1).normal(size=(61, 97)).astype(np.float32)
    whole = predict_tiled(model, image, tile_shape=(64, 112), precision=precision)
    tiled = predict_tiled(model, image, tile_shape=8, batch_size=3, precision=precision)
    flipped = predict_tiled(model, image, tile_shape=16, test_time_flips=True, precision=precision)
    flipped_whole = predict_tiled(model, image, tile_shape=(64, 112), test_time_flips=True, precision=precision)
    reference = predict_tiled(model, image)
    assert whole.dtype == np.float32 and np.allclose(whole.sum(0), 1, atol=1e-5)
    assert np.abs(tiled - whole).max() < 1e-3 and np.abs(flipped - flipped_whole).max() < 1e-3
    assert np.abs(whole - reference).max() > 1e-3


def test_predict_image_passes_the_precision_on(monkeypatch):
    from napari_unet import tiling

    seen = []
    original = tiling.prediction_dtype
    monkeypatch.setattr(tiling, "prediction_dtype", lambda p, d: seen.append(p) or original(p, d))
    model = _model(n_classes=2)
    image = np.random.default_rng(0).normal(size=(30, 30)).astype(np.float32)
    metadata = {"normalization": {"method": "none"}}
    settings = PredictionSettings(device="cpu", precision="bfloat16", test_time_flips=False, refine_radius=0)
    out = predict_image(model, metadata, image, settings)
    assert seen == ["bfloat16"] and out.labels.shape == (30, 30)
    assert PredictionSettings().precision == "auto"
