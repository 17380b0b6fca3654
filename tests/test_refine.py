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
    np.testing.assert_allclose(
        guided_filter(guide, (0.2 + 0.5 * guide)[None], 2, 1e-6)[0], 0.2 + 0.5 * guide, atol=1e-3
    )


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


def _two_classes(foreground: np.ndarray) -> np.ndarray:
    """Confident probabilities ``(2, *shape)`` whose argmax is ``foreground``."""
    p = np.where(foreground, 0.9, 0.1).astype(np.float32)
    return np.stack([1 - p, p])


def _discs(shape, diameter: float, spacing: int) -> np.ndarray:
    """Discs (balls for a 3D ``shape``) about ``diameter`` pixels across, one per ``spacing``-wide cell."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g % spacing) - spacing // 2) ** 2 for g in grid) <= (diameter / 2) ** 2


@pytest.mark.parametrize("width, radius", [(2, 1), (6, 1), (11, 2), (14, 3), (40, 3)])
def test_auto_radius_fits_the_window_to_the_thinnest_structures(width, radius):
    """Bands ``width`` px wide between 60-px gaps: the thinnest class sets the width, the radius is the widest
    window covering at most about half of it (``2 r + 1 <= (width + 1) / 2``), 1 to 3 px."""
    columns = np.arange(400) % (width + 60) < width
    probabilities = _two_classes(np.broadcast_to(columns, (300, 400)))
    measured = refine.structure_width(probabilities, spatial_ndim=2)
    assert abs(measured - width) <= 1, measured  # an even width has no centre pixel: one less
    assert refine.auto_radius(probabilities, spatial_ndim=2) == radius
    # the same in every slice of a stack
    assert refine.auto_radius(np.broadcast_to(probabilities[:, None], (2, 5, 300, 400)), spatial_ndim=2) == radius


def test_auto_radius_of_blobs_and_of_a_single_class():
    assert refine.auto_radius(_two_classes(_discs((256, 256), 16, 32)), spatial_ndim=2) == 3  # nuclei
    assert refine.auto_radius(_two_classes(_discs((256, 256), 10, 32)), spatial_ndim=2) == 2
    assert refine.auto_radius(_two_classes(_discs((256, 256), 5, 32)), spatial_ndim=2) == 1  # small spots
    for diameter, radius in ((5, 1), (12, 2), (20, 3)):  # balls (their 3D skeletons read ~2 px narrow)
        assert refine.auto_radius(_two_classes(_discs((64, 96, 96), diameter, 32)), spatial_ndim=3) == radius
    assert refine.structure_width(_two_classes(np.ones((30, 40), bool)), spatial_ndim=2) is None
    assert refine.auto_radius(_two_classes(np.ones((30, 40), bool)), spatial_ndim=2) == 1


def test_auto_radius_reads_a_bounded_sample(monkeypatch):
    """Whatever the image size, the width is measured on a centred crop (a few slices of a stack)."""
    reads = []

    class Recording:
        def __init__(self, array):
            self.array, self.shape = array, array.shape

        def __getitem__(self, index):
            part = self.array[index]
            reads.append(part.size // len(part))
            return part

    monkeypatch.setattr(refine, "_SAMPLE_PIXELS", 128 * 128)
    plane = _two_classes(np.broadcast_to(np.arange(300) % 40 < 14, (200, 300)))
    assert refine.auto_radius(Recording(plane), spatial_ndim=2) == 3
    assert reads == [128 * 128]
    reads.clear()
    stack = np.broadcast_to(plane[:, None], (2, 9, 200, 300))
    assert refine.auto_radius(Recording(stack), spatial_ndim=2) == 3
    assert reads == [64 * 64] * 4  # 4 evenly spaced slices, a quarter of the budget each


def test_auto_refinement_equals_the_radius_it_picks():
    rng = np.random.default_rng(5)
    image = rng.random((120, 130)).astype(np.float32)
    probabilities = _two_classes(_discs((120, 130), 16, 30))
    radius = refine.auto_radius(probabilities, spatial_ndim=2)
    np.testing.assert_array_equal(
        refine_probabilities(probabilities, image, spatial_ndim=2, radius="auto"),
        refine_probabilities(probabilities, image, spatial_ndim=2, radius=radius),
    )
    with pytest.raises(ValueError, match="radius"):
        refine_probabilities(probabilities, image, spatial_ndim=2, radius="wide")


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
        np.testing.assert_allclose(
            predict_tiled(model, normalized, tile_shape=tile, refine_radius=2), expected, atol=1e-5
        )
    lazy = predict_tiled(model, normalized_view(image), tile_shape=(32, 32), refine_radius=2)
    np.testing.assert_allclose(lazy, expected, atol=1e-5)
