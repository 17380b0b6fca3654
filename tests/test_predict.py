"""The one prediction pipeline (``predict.predict_image``) and its settings."""

import dataclasses

import numpy as np
import pytest
import tifffile
import torch

from napari_unet import UNet, predict_tiled
from napari_unet.class_ids import segmentation_from_probabilities
from napari_unet.demo import sample_paths
from napari_unet.normalization import normalize_image
from napari_unet.predict import (
    PredictionOutputs,
    PredictionSettings,
    model_class_ids,
    normalized_entropy,
    predict_image,
    predict_region,
)
from napari_unet.refine import AUTO, DEFAULT_EPS, DEFAULT_RADIUS

RECIPE = {"method": "percentile", "low": 1.0, "high": 99.8}
SETTINGS = [
    PredictionSettings(device="cpu", uncertainty=True),  # the defaults: flips, refinement "auto"
    PredictionSettings(device="cpu", test_time_flips=False, refine_radius=2, refine_eps=0.05, uncertainty=True),
    PredictionSettings(device="cpu", test_time_flips=False, refine_radius=0, tile_shape=(32, 48), batch_size=3),
]


def _model(seed=0, **config):
    torch.manual_seed(seed)
    return UNet(**{"n_classes": 2, "depth": 2, "base_filters": 4, **config}).eval()


def _composed(model, metadata, image, settings):
    """What every caller wrote before ``predict_image``: normalize the whole image, predict_tiled, class ids,
    entropy."""
    channel_axis = 0 if model.in_channels > 1 else None
    normalized = normalize_image(image, metadata.get("normalization"), channel_axis=channel_axis)
    probabilities = predict_tiled(
        model,
        normalized,
        tile_shape=settings.tile_shape,
        batch_size=settings.batch_size,
        device=settings.device,
        test_time_flips=settings.test_time_flips,
        refine_radius=settings.refine_radius,
        refine_eps=settings.refine_eps,
        tile_tuning=settings.tile_tuning,
    )
    class_ids = metadata.get("class_ids") or list(range(1, model.n_classes + 1))
    labels = segmentation_from_probabilities(probabilities, class_ids)
    p = np.clip(probabilities, 1e-7, 1.0)
    entropy = None
    if settings.uncertainty:
        entropy = (-(p * np.log(p)).sum(axis=0) * (1.0 / np.log(model.n_classes))).astype(np.float32)
    return probabilities, labels, entropy


def _assert_same(outputs: PredictionOutputs, expected, what):
    probabilities, labels, entropy = expected
    assert outputs.probabilities.dtype == np.float32 and outputs.labels.dtype == labels.dtype, what
    np.testing.assert_array_equal(outputs.probabilities, probabilities, err_msg=what)
    np.testing.assert_array_equal(outputs.labels, labels, err_msg=what)
    if entropy is None:
        assert outputs.uncertainty is None, what
    else:
        assert outputs.uncertainty.dtype == np.float32, what
        np.testing.assert_array_equal(outputs.uncertainty, entropy, err_msg=what)


@pytest.mark.parametrize("settings", SETTINGS, ids=["defaults", "one-pass-radius-2", "raw-tiles"])
def test_predict_image_is_the_old_composition_bit_for_bit_on_the_demo_images(settings):
    model = _model(n_classes=3)
    metadata = {"class_ids": [1, 3, 7], "normalization": RECIPE}
    for path in sample_paths()["images"][1:3]:
        image = tifffile.imread(path)
        _assert_same(
            predict_image(model, metadata, image, settings),
            _composed(model, metadata, image, settings),
            f"{path.name} {settings}",
        )


@pytest.mark.parametrize("ndim", [2, 3])
def test_predict_image_on_a_stack_is_the_old_composition_bit_for_bit(ndim):
    """A small 3D stack under a 2D model (slice by slice) and under a 3D model; a multi-channel stack too."""
    rng = np.random.default_rng(0)
    stack = (rng.random((5, 40, 44)) * 4000).astype(np.uint16)
    model = _model(seed=1, ndim=ndim, depth=1)
    metadata = {"class_ids": [1, 2], "normalization": RECIPE}
    for settings in SETTINGS[:2]:
        _assert_same(
            predict_image(model, metadata, stack, settings),
            _composed(model, metadata, stack, settings),
            f"{ndim}D {settings}",
        )
    channels = _model(seed=2, ndim=ndim, depth=1, in_channels=2)
    image = (rng.random((2, 5, 40, 44)) * 255).astype(np.uint8)
    _assert_same(
        predict_image(channels, {}, image, SETTINGS[0]),
        _composed(channels, {}, image, SETTINGS[0]),
        f"{ndim}D, 2 channels",
    )


def _profile_of(n_classes: int, channels: int = 1) -> dict:
    """A training profile (``domain.training_profile``) of one image with ``n_classes`` classes."""
    from napari_unet.domain import training_profile

    entry = {
        "pixels": 1000,
        "intensity": [[0.0, 0.01, 0.1, 0.3, 0.5, 0.8, 0.95]] * channels,
        "class_fractions": [1.0 / n_classes] * n_classes,
        "class_intensity": [[[0.1 * k, 0.1 * k + 0.05, 0.1 * k + 0.1]] * channels for k in range(n_classes)],
        "entropy": 0.2,
    }
    return training_profile([entry])


@pytest.mark.parametrize("settings", SETTINGS[1:], ids=["one-pass-radius-2", "raw-tiles"])
def test_the_domain_check_leaves_the_outputs_bit_for_bit(settings):
    """With a training profile in the metadata ``outputs.domain`` is the image's check; the arrays do not change."""
    from napari_unet.domain import DomainCheck

    model = _model(n_classes=3)
    metadata = {"class_ids": [1, 3, 7], "normalization": RECIPE}
    image = tifffile.imread(sample_paths()["images"][1])
    outputs = predict_image(model, {**metadata, "training_profile": _profile_of(3)}, image, settings)
    _assert_same(outputs, _composed(model, metadata, image, settings), str(settings))
    assert isinstance(outputs.domain, DomainCheck) and outputs.domain.profile["pixels"] == image.size
    channels = _model(seed=2, depth=1, in_channels=2)
    rgb = (np.random.default_rng(0).random((2, 40, 44)) * 255).astype(np.uint8)
    outputs = predict_image(channels, {"training_profile": _profile_of(2, channels=2)}, rgb, settings)
    _assert_same(outputs, _composed(channels, {}, rgb, settings), f"2 channels {settings}")
    assert len(outputs.domain.profile["intensity"]) == 2


def test_a_lazy_image_gives_what_the_array_gives():
    dask = pytest.importorskip("dask.array")
    image = tifffile.imread(sample_paths()["images"][1])
    model = _model()
    lazy = dask.from_array(image, chunks=(64, 256))
    settings = PredictionSettings(device="cpu", uncertainty=True)
    _assert_same(predict_image(model, {}, lazy, settings), _composed(model, {}, image, settings), "dask")


def test_outputs_go_where_out_puts_them(tmp_path):
    """``out(role, shape, dtype)`` makes every output (here memory maps of files), and the values do not change."""
    image = tifffile.imread(sample_paths()["images"][1])
    model = _model(n_classes=3)
    metadata = {"class_ids": [2, 4, 300]}
    made = {}

    def memmaps(role, shape, dtype):
        made[role] = np.lib.format.open_memmap(tmp_path / f"{role}.npy", mode="w+", dtype=dtype, shape=shape)
        return made[role]

    settings = PredictionSettings(device="cpu", uncertainty=True)
    outputs = predict_image(model, metadata, image, settings, out=memmaps)
    assert {role: (a.shape, a.dtype) for role, a in made.items()} == {
        "probabilities": ((3, 256, 256), np.float32),
        "labels": ((256, 256), np.uint16),
        "uncertainty": ((256, 256), np.float32),
    }
    assert outputs.probabilities is made["probabilities"] and outputs.labels is made["labels"]
    assert outputs.uncertainty is made["uncertainty"]
    _assert_same(outputs, _composed(model, metadata, image, settings), "memmaps")
    made.clear()
    predict_image(model, metadata, image, PredictionSettings(device="cpu"), out=memmaps)
    assert set(made) == {"probabilities", "labels"}  # no uncertainty unless asked


def test_progress_and_stop_reach_the_tiles():
    from napari_unet.tiling import PredictionStopped

    image = tifffile.imread(sample_paths()["images"][1])
    calls = []
    settings = PredictionSettings(device="cpu", test_time_flips=False, tile_shape=(64, 64))
    predict_image(_model(), {}, image, settings, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1] > 1
    with pytest.raises(PredictionStopped):
        predict_image(_model(), {}, image, settings, should_stop=lambda: True)


def test_model_class_ids_fall_back_to_one_to_n():
    model = _model(n_classes=3)
    assert model_class_ids(model, {"class_ids": [1, 3, 7]}) == [1, 3, 7]
    assert model_class_ids(model, {}) == model_class_ids(model, {"class_ids": None}) == [1, 2, 3]


def test_settings_defaults_are_the_cli_and_widget_defaults():
    settings = PredictionSettings()
    assert (settings.device, settings.tile_shape, settings.batch_size) == ("auto", None, None)
    assert settings.test_time_flips and not settings.uncertainty
    assert (settings.refine_radius, settings.refine_eps) == (DEFAULT_RADIUS, DEFAULT_EPS)
    assert PredictionSettings(tile_shape=[64, 96]).tile_shape == (64, 96)  # any sequence, kept as a tuple
    assert PredictionSettings(refine_radius=np.int64(2), batch_size=np.int32(4)).refine_radius == 2


def test_every_setting_has_a_label_a_tooltip_and_integer_ranges():
    for f in dataclasses.fields(PredictionSettings):
        assert isinstance(f.metadata["label"], str) and f.metadata["label"], f.name
        assert isinstance(f.metadata["tooltip"], str) and f.metadata["tooltip"].endswith("."), f.name
        if f.name in ("tile_shape", "batch_size", "refine_radius"):
            assert isinstance(f.metadata["min"], int) and f.metadata["max"] > f.metadata["min"], f.name
        plain = {k: v for k, v in f.metadata.items() if k != "choices"}
        assert all(isinstance(v, (str, int, float)) for v in plain.values()), f.name
        for text, value in f.metadata.get("choices", ()):  # (text, value) pairs a combo box shows
            assert isinstance(text, str) and PredictionSettings(**{f.name: value}), f.name


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"device": ""}, "device"),
        ({"device": None}, "device"),
        ({"tile_shape": (64,)}, "tile_shape needs 2"),
        ({"tile_shape": (64, 64, 64, 64)}, "tile_shape needs 2"),
        ({"tile_shape": (64, 0)}, "positive"),
        ({"tile_shape": (64, 32.5)}, "tile_shape"),
        ({"tile_shape": 64}, "tile_shape"),
        ({"tile_shape": "64"}, "tile_shape"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": 2.0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"test_time_flips": 1}, "test_time_flips must be True or False"),
        ({"uncertainty": "yes"}, "uncertainty"),
        ({"refine_radius": -1}, "refine_radius must be an integer >= 0"),
        ({"refine_radius": 1.5}, "refine_radius"),
        ({"refine_radius": "Auto"}, "'auto'"),
        ({"refine_eps": 0}, "refine_eps must be a finite number greater than 0"),
        ({"refine_eps": -0.1}, "refine_eps"),
        ({"refine_eps": float("nan")}, "refine_eps"),
        ({"refine_eps": float("inf")}, "refine_eps"),
        ({"refine_eps": "0.01"}, "refine_eps"),
    ],
)
def test_bad_settings_are_refused_with_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        PredictionSettings(**bad)
    assert PredictionSettings(refine_radius=AUTO).refine_radius == AUTO


def test_normalized_entropy_bounds():
    certain = np.zeros((3, 4, 5), np.float32)
    certain[1] = 1.0
    np.testing.assert_allclose(normalized_entropy(certain), 0.0, atol=1e-5)
    np.testing.assert_allclose(normalized_entropy(np.full((3, 4, 5), 1 / 3, np.float32)), 1.0, atol=1e-6)


def test_preview_region_equals_whole_image_prediction():
    """Predicting only a region (with its context) gives exactly the whole-image result there."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cases = [
        (UNet(n_classes=3, depth=2, base_filters=4), (3, 70, 90)),  # a 2D net on a stack
        (UNet(n_classes=2, depth=3, base_filters=4), (75, 61)),
        (UNet(n_classes=2, ndim=3, depth=1, base_filters=2), (13, 20, 22)),
        (UNet(n_classes=2, in_channels=3, depth=2, base_filters=4), (4, 70, 90)),
    ]  # RGB stack, channels first
    for model, shape in cases:
        model.eval()
        channels = (3,) if model.in_channels == 3 else ()
        image = rng.random(channels + shape).astype(np.float32)
        whole = predict_tiled(model, image)
        lead = len(shape) - model.config["ndim"]
        for _ in range(4):
            region = []
            for axis, size in enumerate(shape):
                start = int(rng.integers(0, size))
                stop = start + 1 if axis < lead else int(rng.integers(start + 1, size + 1))
                region.append(slice(start, stop))
            part = predict_region(model, image, tuple(region))
            np.testing.assert_allclose(part, whole[(slice(None), *region)], atol=1e-4, err_msg=str(region))


@pytest.mark.parametrize("recipe", ["percentile", "robust"])
def test_a_huge_finite_pixel_leaves_every_output_finite(recipe):
    """A hot pixel of 1e20 and a speck at float32's largest in an image of 0-1: normalized they would be squared by
    the edge refinement and summed through the network, both overflow and NaN spreads around them; they are held
    at ``NORMALIZED_LIMIT`` instead."""
    from napari_unet.normalization import NORMALIZED_LIMIT, PERCENTILE_RECIPE, ROBUST_RECIPE

    rng = np.random.default_rng(0)
    image = rng.random((64, 64)).astype(np.float32)
    image[16:40, 16:40] += 1.0
    hot = image.copy()
    hot[50, 50] = 1e20
    hot[5:7, 5:7] = np.finfo(np.float32).max
    metadata = {"normalization": PERCENTILE_RECIPE if recipe == "percentile" else ROBUST_RECIPE}
    normalized = normalize_image(hot, metadata["normalization"])
    assert normalized.max() == NORMALIZED_LIMIT and np.isfinite(normalized).all()
    settings = PredictionSettings(device="cpu", uncertainty=True)  # flips and the edge refinement
    outputs = predict_image(_model(), metadata, hot, settings)
    assert np.isfinite(outputs.probabilities).all() and np.isfinite(outputs.uncertainty).all()
    np.testing.assert_allclose(outputs.probabilities.sum(axis=0), 1.0, atol=1e-5)


def test_the_api_takes_a_bool_mask_a_nested_list_and_no_settings():
    """From a script: a bool array is 0 and 1 (numpy refused to subtract it), a nested list is its array, and
    ``settings=None`` means the defaults (it raised AttributeError)."""
    model = _model()
    image = np.zeros((40, 40), bool)
    image[10:25, 12:30] = True
    expected = predict_image(model, {}, image.astype(np.uint8), PredictionSettings())
    for given in (image, image.astype(np.uint8).tolist()):
        outputs = predict_image(model, {}, given, None)
        np.testing.assert_array_equal(outputs.probabilities, expected.probabilities)
        np.testing.assert_array_equal(outputs.labels, expected.labels)
