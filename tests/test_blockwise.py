"""Block-wise prediction equals the whole-image prediction (blockwise.py, tiling.predict_tiled(region=...))."""

import numpy as np
import pytest

from napari_unet.blockwise import plan_blocks, predict_block, resolve_radius, volume_settings
from napari_unet.class_ids import segmentation_from_probabilities
from napari_unet.normalization import NormalizedView
from napari_unet.predict import PredictionSettings, predict_image


def _image(shape, seed=0):
    """Blobs on noise (something for the refinement's auto radius to measure), uint16."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random(shape), 2.0)
    return ((smooth > np.median(smooth)) * 1500 + rng.integers(0, 400, shape)).astype(np.uint16)


METADATA = {"class_ids": [1, 2, 3], "normalization": {"method": "percentile", "low": 1.0, "high": 99.8}}


def _blockwise(model, image, settings, block):
    """Every block predicted on its own, assembled: what the distributed run writes."""
    spatial = image.shape[1:] if model.in_channels > 1 else image.shape
    chosen = volume_settings(model, METADATA, image, settings)
    normalized = NormalizedView(image, chosen.params)
    plan = plan_blocks(model, spatial, block)
    probabilities = np.full((model.n_classes, *spatial), np.nan, np.float32)
    for index in plan.indices():
        region = plan.region(index)
        probabilities[(slice(None), *region)] = predict_block(model, normalized, region, chosen)
    return probabilities, len(plan)


@pytest.mark.parametrize(
    ("ndim", "shape", "block", "flips", "radius"),
    [
        (2, (70, 93), (32, 40), False, 0),
        (2, (70, 93), (32, 40), True, "auto"),
        (2, (5, 37, 45), (2, 16, 24), False, 2),  # a 2D model over a stack
        (3, (21, 30, 27), (12, 16, 12), False, 0),
        (3, (21, 30, 27), (12, 16, 12), True, 1),
    ],
)
def test_blocks_equal_whole_image(make_model, ndim, shape, block, flips, radius):
    model = make_model(ndim=ndim)
    image = _image(shape)
    settings = PredictionSettings(device="cpu", test_time_flips=flips, refine_radius=radius)
    whole = predict_image(model, METADATA, image, settings)
    probabilities, blocks = _blockwise(model, image, settings, block)
    assert blocks > 4
    assert np.abs(probabilities - whole.probabilities).max() < 1e-5
    np.testing.assert_array_equal(segmentation_from_probabilities(probabilities, [1, 2, 3]), whole.labels)


def test_auto_radius_is_the_whole_image_one(make_model):
    from napari_unet.normalization import image_params
    from napari_unet.refine import auto_radius
    from napari_unet.tiling import predict_tiled

    model = make_model()
    image = _image((90, 80), seed=3)
    normalized = NormalizedView(image, image_params(image, METADATA["normalization"]))
    settings = volume_settings(model, METADATA, image, PredictionSettings(device="cpu", test_time_flips=False))
    expected = auto_radius(predict_tiled(model, normalized), 2)
    assert resolve_radius(model, normalized, "auto", settings) == expected == settings.radius


def test_plan_blocks_on_the_grid(make_model):
    model = make_model(depth=3)
    plan = plan_blocks(model, (100, 50), (30, 500))
    assert plan.block == (32, 56)  # rounded up to the 8-pixel grid; no larger than the image on the grid
    assert plan.counts == (4, 1)
    assert plan.region((3, 0)) == (slice(96, 100), slice(0, 50))
    assert plan_blocks(model, (5, 100, 50), (30, 30)).block == (5, 32, 32)  # 8 slices, cut to the stack
    with pytest.raises(ValueError, match="positive"):
        plan_blocks(model, (100, 50), (0, 8))
