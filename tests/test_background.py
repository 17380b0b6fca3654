"""The smooth background field (background.py) and the normalization that subtracts it (``background_grid``):
it removes a ramp and a haze, leaves objects smaller than a cell alone, and every part, view and path gives the
numbers of the whole image."""

import numpy as np
import pytest

from napari_unet.background import estimate_field, field_window
from napari_unet.normalization import (
    BACKGROUND_RECIPE,
    ROBUST_RECIPE,
    NormalizedView,
    check_recipe,
    image_params,
    normalize,
    normalize_image,
    normalized_view,
)


def _nuclei(shape=(192, 224), seed=0):
    """Bright discs (radius 6-9 px, about a tenth of the plane) on a dark noisy background of 12 counts."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    objects = np.zeros(shape, bool)
    for _ in range(30):
        cy, cx, r = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10), rng.integers(6, 10)
        objects |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    image = 12.0 + rng.normal(0, 2.0, shape) + 140.0 * objects
    return image.astype(np.float32), objects


def _ramp(shape, low, high):
    return np.add.outer(np.linspace(0, 0.5, shape[0]), np.linspace(0, 0.5, shape[1])) * (high - low) + low


def test_the_field_follows_a_ramp_and_ignores_objects():
    image, objects = _nuclei()
    ramp = _ramp(image.shape, 0, 60).astype(np.float32)
    field = estimate_field(image + ramp, 4, 1.0)
    whole = field_window(field, np.arange(image.shape[0]), np.arange(image.shape[1]))
    residual = (image + ramp - whole)[~objects]
    # the ramp (0-60 counts) is gone: the background is as flat as its noise, everywhere, up to the border
    corners = [residual[: image.shape[0] // 4 * image.shape[1]].mean(), residual[-2000:].mean()]
    assert abs(corners[0] - corners[1]) < 1.5 and residual.std() < 3.0
    # the field lies at the dim end of the background (noise and the ramp within a cell), not in the objects (+140)
    assert 0 < np.median(residual) < 15


def test_subtracting_the_background_undoes_an_additive_ramp_and_a_haze():
    image, objects = _nuclei()
    shifted = image + _ramp(image.shape, 0, 60).astype(np.float32) + 25.0  # a ramp and a uniform haze
    plain = [normalize_image(x, ROBUST_RECIPE) for x in (image, shifted)]
    flat = [normalize_image(x, BACKGROUND_RECIPE) for x in (image, shifted)]
    background = ~objects
    # without the subtraction the ramp stays in the background (its bright corner far above its dim one) ...
    assert plain[1][background][-2000:].mean() - plain[1][background][:2000].mean() > 0.15
    # ... with it both images normalize alike, background and objects
    assert np.abs(flat[1] - flat[0])[background].mean() < 0.02
    assert abs(flat[1][objects].mean() - flat[0][objects].mean()) < 0.03
    assert abs(flat[0][background].mean()) < 0.05 and 0.8 < flat[0][objects].mean() < 1.1


def test_a_view_of_any_window_equals_that_window_of_the_whole_image():
    image, _ = _nuclei((150, 131))
    params = image_params(image, BACKGROUND_RECIPE)
    whole = normalize(image, params)
    view = NormalizedView(image, params)
    for key in [(slice(10, 77), slice(3, 120)), (5, slice(None)), (slice(None, None, 3), 7), (slice(140, 150),)]:
        np.testing.assert_array_equal(view[key], whole[key])


def test_lazy_stack_and_channels_give_the_same_numbers():
    import dask.array as da

    image, _ = _nuclei((96, 100))
    stack = np.stack([image, image * 0.5 + 3, image[::-1]])
    params = image_params(stack, BACKGROUND_RECIPE)
    whole = normalize(stack, params)
    lazy = normalized_view(da.from_array(stack, chunks=(1, 32, 32)), BACKGROUND_RECIPE)
    assert lazy.params["low_values"] == params["low_values"] and lazy.params["high_values"] == params["high_values"]
    assert lazy.params["background"] == params["background"]
    np.testing.assert_array_equal(lazy[1:3, 20:70, ::2], whole[1:3, 20:70, ::2])
    np.testing.assert_array_equal(normalize(stack[1], params), whole[1])  # a slice keeps the whole plane
    channels = np.stack([image, image * 3 + 7])
    first = image_params(channels, BACKGROUND_RECIPE, channel_axis=0)
    last = image_params(np.moveaxis(channels, 0, -1), BACKGROUND_RECIPE, channel_axis=-1)
    by_first, by_last = normalize(channels, first), normalize(np.moveaxis(channels, 0, -1), last)
    np.testing.assert_allclose(np.moveaxis(by_last, -1, 0), by_first, atol=1e-6)
    np.testing.assert_allclose(by_first[1], by_first[0], atol=1e-5)  # a gain and an offset cancel per channel
    np.testing.assert_array_equal(NormalizedView(channels, first)[:, 9:50, 30:], by_first[:, 9:50, 30:])


def test_a_plane_of_the_wrong_size_is_refused():
    image, _ = _nuclei((64, 64))
    with pytest.raises(ValueError, match="plane"):
        normalize(image[:32], image_params(image, BACKGROUND_RECIPE))


@pytest.mark.parametrize("grid", [-1, 65, 2.5, True, "4"])
def test_a_bad_grid_is_refused(grid):
    with pytest.raises(ValueError, match="background_grid"):
        check_recipe({**ROBUST_RECIPE, "background_grid": grid})
    check_recipe({**ROBUST_RECIPE, "background_grid": 8})


def test_a_saturated_plateau_stays_one_plateau_after_the_subtraction():
    """Clipped debris larger than the speck area, on a ramp: its pixels all keep one top level, so the robust
    upper value still leaves them out and the objects normalize as they do without the debris."""
    image, objects = _nuclei()
    image = image + _ramp(image.shape, 0, 60).astype(np.float32)
    dirty = image.copy()
    dirty[150:175, 20:45] = 1000.0  # 625 px at the image's maximum, far brighter than the nuclei
    params = image_params(dirty, BACKGROUND_RECIPE)
    flat = normalize(dirty, params)
    assert np.unique(flat[150:175, 20:45]).size == 1 and flat[150:175, 20:45][0, 0] == flat.max()
    clean = normalize_image(image, BACKGROUND_RECIPE)
    objects[150:175, 20:45] = False
    assert abs(flat[objects].mean() - clean[objects].mean()) < 0.03


def test_the_field_stays_within_its_cells_next_to_a_dark_one():
    """A dark region filling one cell (0 counts among cells at 50): extrapolated to the border beside it, the field
    would overshoot the cells' range (above 50 on the far side, below 0 on this side); it is held within it, so the
    flattened image holds nothing outside the image's own range less the field's."""
    rng = np.random.default_rng(1)
    image = (50.0 + rng.normal(0, 1.0, (128, 128))).clip(49).astype(np.float32)
    image[32:64, 32:64] = 0.0  # cell (1, 1) of a 4 x 4 grid
    field = estimate_field(image, 4, 1.0)
    values = np.asarray(field["values"])
    assert values.min() == 0.0 and values.max() >= 49.0
    whole = field_window(field, np.arange(128), np.arange(128))
    assert whole.min() >= values.min() and whole.max() <= values.max()
    flat = image - whole
    assert flat.max() <= image.max() - values.min() and flat.min() >= image.min() - values.max()
