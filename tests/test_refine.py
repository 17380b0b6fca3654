"""Edge-aware refinement (guided filter) of class probabilities."""

import numpy as np
import pytest

import napari_unet.refine as refine
from napari_unet import UNet, normalize_image, predict_tiled
from napari_unet.normalization import normalized_view
from napari_unet.refine import guided_filter, refine_probabilities


def _probabilities(rng, n_classes, spatial):
    p = rng.random((n_classes, *spatial)).astype(np.float32) + 0.05
    return p / p.sum(axis=0)


@pytest.mark.parametrize(
    "image_shape, spatial_ndim",
    [((50, 37), 2), ((6, 20, 30), 2), ((12, 20, 30), 3), ((3, 40, 33), 2)],
    ids=["2d", "stack", "volume", "channels"],
)
def test_band_by_band_and_in_place_equal_the_whole_array(image_shape, spatial_ndim, monkeypatch):
    rng = np.random.default_rng(0)
    image = rng.random(image_shape).astype(np.float32)
    spatial = image_shape[1:] if image_shape == (3, 40, 33) else image_shape
    probabilities = _probabilities(rng, 3, spatial)
    whole = refine_probabilities(probabilities, image, spatial_ndim=spatial_ndim, radius=2)
    monkeypatch.setattr(refine, "_BAND_PIXELS", 40)  # bands of a few rows (at least the 4-row halo)
    banded = refine_probabilities(probabilities, image, spatial_ndim=spatial_ndim, radius=2)
    in_place = probabilities.copy()
    assert refine_probabilities(in_place, image, spatial_ndim=spatial_ndim, radius=2, out=in_place) is in_place
    np.testing.assert_array_equal(banded, whole)
    np.testing.assert_array_equal(in_place, whole)
    np.testing.assert_allclose(whole.sum(axis=0), 1, atol=1e-5)
    assert whole.min() >= 0 and whole.max() <= 1
    assert np.abs(whole - probabilities).max() > 1e-2  # it did something


def test_stack_slices_are_refined_independently():
    rng = np.random.default_rng(1)
    image = rng.random((4, 24, 24)).astype(np.float32)
    probabilities = _probabilities(rng, 2, image.shape)
    stack = refine_probabilities(probabilities, image, spatial_ndim=2)
    for z in range(4):
        single = refine_probabilities(probabilities[:, z], image[z], spatial_ndim=2)
        np.testing.assert_allclose(stack[:, z], single, atol=1e-6)


def test_boundary_moves_to_the_image_edge():
    """A foreground map whose 0.5 crossing sits 1.3 px before a step edge is snapped onto the edge by the default
    refinement (its steepest rise moves onto the edge); on a flat image the crossing stays."""
    x = np.arange(64)
    image = np.tile((x >= 32).astype(np.float32), (16, 1))
    foreground = np.tile(1 / (1 + np.exp(-(x - 30.7))), (16, 1)).astype(np.float32)
    probabilities = np.stack([1 - foreground, foreground])
    first_foreground = lambda p: int((p.argmax(0)[0] == 1).argmax())  # noqa: E731
    assert first_foreground(probabilities) == 31
    refined = refine_probabilities(probabilities, image, spatial_ndim=2)
    assert first_foreground(refined) == 32
    assert np.argmax(np.diff(refined[1, 0])) == 31  # the rise is between x = 31 and 32, across the edge
    flat = refine_probabilities(probabilities, np.zeros_like(image), spatial_ndim=2)
    assert first_foreground(flat) == 31  # no edge to follow: only smoothed


def test_guided_filter_keeps_a_map_that_is_a_linear_function_of_the_guide():
    rng = np.random.default_rng(2)
    guide = rng.random((30, 30)).astype(np.float32)
    np.testing.assert_allclose(guided_filter(guide, (0.2 + 0.5 * guide)[None], 2, 1e-6)[0], 0.2 + 0.5 * guide,
                               atol=1e-3)


def test_radius_zero_copies_and_bad_arguments_raise():
    rng = np.random.default_rng(3)
    image = rng.random((10, 12)).astype(np.float32)
    probabilities = _probabilities(rng, 2, image.shape)
    np.testing.assert_array_equal(refine_probabilities(probabilities, image, spatial_ndim=2, radius=0), probabilities)
    with pytest.raises(ValueError, match="radius"):
        refine_probabilities(probabilities, image, spatial_ndim=2, radius=-1)
    with pytest.raises(ValueError, match="eps"):
        refine_probabilities(probabilities, image, spatial_ndim=2, eps=0)
    with pytest.raises(ValueError, match="does not match"):
        refine_probabilities(probabilities, image[:, :-1], spatial_ndim=2)
    with pytest.raises(ValueError, match="3D model"):
        refine_probabilities(probabilities, image, spatial_ndim=3)


def test_predict_tiled_refines_exactly_whatever_the_tiles():
    """Refinement is the last step of predict_tiled: the result is the refinement of the unrefined prediction,
    the same for any tile shape, and the same with a lazily normalized image as the guide."""
    import torch

    torch.manual_seed(0)
    model = UNet(ndim=2, in_channels=1, n_classes=3, depth=2, base_filters=4).eval()
    image = (np.random.default_rng(4).random((70, 90)) * 255).astype(np.uint8)
    normalized = normalize_image(image)
    raw = predict_tiled(model, normalized, tile_shape=(32, 32))
    expected = refine_probabilities(raw, normalized, spatial_ndim=2, radius=2)
    for tile in ((32, 32), (48, 64), None):
        np.testing.assert_allclose(predict_tiled(model, normalized, tile_shape=tile, refine_radius=2), expected,
                                   atol=1e-5)
    lazy = predict_tiled(model, normalized_view(image), tile_shape=(32, 32), refine_radius=2)
    np.testing.assert_allclose(lazy, expected, atol=1e-5)
