"""Whole-image percentile normalization."""

import warnings

import numpy as np
import pytest
from scipy import ndimage

import napari_unet.normalization as normalization
from napari_unet.normalization import (
    DEFAULT_RECIPE,
    PERCENTILE_RECIPE,
    normalize,
    normalize_image,
    normalized_view,
    percentile_params,
    robust_params,
)


def test_percentiles_map_to_zero_and_one():
    image = np.arange(10_000, dtype=np.uint16).reshape(100, 100)
    params = percentile_params(image, low=1, high=99)
    lo, hi = np.percentile(image, [1, 99])
    assert params["low_values"] == [pytest.approx(lo)] and params["high_values"] == [pytest.approx(hi)]
    out = normalize(image, params)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(normalize(np.array([lo, hi]), params), [0, 1], atol=1e-6)
    # no clipping: values beyond the percentiles go beyond [0, 1]
    assert out.min() < 0 and out.max() > 1


def test_per_channel_on_any_axis():
    rng = np.random.default_rng(0)
    image = np.stack([rng.random((30, 40)) * 10, rng.random((30, 40)) * 1000 + 500], axis=-1)
    for axis, data in ((-1, image), (0, np.moveaxis(image, -1, 0))):
        params = percentile_params(data, channel_axis=axis)
        assert len(params["low_values"]) == 2
        out = np.moveaxis(normalize(data, params), axis, 0)
        for channel in out:
            assert -0.05 < channel.min() <= 0 and 1 <= channel.max() < 1.05
    with pytest.raises(ValueError, match="channels"):
        normalize(image[..., :1].repeat(3, axis=-1), percentile_params(image, channel_axis=-1))


def test_nan_and_inf_are_ignored_then_zero():
    rng = np.random.default_rng(1)
    clean = rng.random((50, 50)).astype(np.float32)
    dirty = clean.copy()
    dirty[0, :5] = [np.nan, np.inf, -np.inf, np.nan, np.inf]
    reference = percentile_params(clean[np.isfinite(dirty)])
    params = percentile_params(dirty)
    assert params["low_values"] == pytest.approx(reference["low_values"])
    assert params["high_values"] == pytest.approx(reference["high_values"])
    out = normalize(dirty, params)
    assert np.isfinite(out).all()
    assert (out[0, :5] == 0).all()
    np.testing.assert_allclose(out[1:], normalize(clean, params)[1:])


def test_degenerate_images_do_not_warn_or_divide_by_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (normalize_image(np.full((8, 8), 7.0)) == 0).all()
        assert (normalize_image(np.full((8, 8), np.nan)) == 0).all()
        assert np.isfinite(normalize_image(np.array([[0, 1e39]]))).all()  # float32 overflow -> 0
    with pytest.raises(ValueError, match="empty"):
        percentile_params(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="percentiles"):
        percentile_params(np.zeros((4, 4)), low=50, high=10)
    with pytest.raises(ValueError, match="complex"):
        percentile_params(np.zeros((4, 4), complex))


def test_recipe_is_recomputed_per_image_and_input_untouched():
    image = np.arange(100, dtype=np.float64).reshape(10, 10)
    copy = image.copy()
    stored = {**DEFAULT_RECIPE, "low_values": [1e6], "high_values": [2e6]}  # another image's values
    np.testing.assert_array_equal(normalize_image(image, stored), normalize(image, percentile_params(image)))
    np.testing.assert_array_equal(image, copy)
    np.testing.assert_array_equal(normalize_image(image, {"method": "none"}), image.astype(np.float32))
    np.testing.assert_array_equal(normalize_image(image, None), normalize_image(image, DEFAULT_RECIPE))
    with pytest.raises(ValueError, match="unknown normalization"):
        normalize_image(image, {"method": "zscore"})


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int8])
def test_streamed_percentiles_of_a_lazy_image_equal_numpys(dtype, monkeypatch):
    """Lazy 8/16-bit images: exact percentiles from a histogram built slab by slab (small slabs here)."""
    import dask.array as da

    import napari_unet.normalization as normalization

    monkeypatch.setattr(normalization, "_SLAB_PIXELS", 5000)
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    image = rng.integers(info.min, info.max, size=(7, 61, 53), endpoint=True).astype(dtype)
    image[2, :10] = rng.integers(0, 5, size=(10, 53))  # ties and a lumpy histogram
    lazy = da.from_array(image, chunks=(2, 30, 30))
    for low, high in [(1.0, 99.8), (0.0, 100.0), (37.3, 62.1)]:
        streamed = percentile_params(lazy, low, high)
        expected = np.percentile(image, [low, high])
        assert streamed["low_values"] == [expected[0]] and streamed["high_values"] == [expected[1]]


def test_a_chunked_image_is_counted_in_parts_of_whole_chunks(tmp_path, monkeypatch):
    """A chunked volume (zarr) is read in blocks of whole chunks, each chunk once (not once per plane, which read a
    128-plane chunk 128 times), the parts covering it exactly; the percentiles are numpy's. Chunks larger than a
    part are read in planes of them."""
    import math

    import zarr

    import napari_unet.normalization as normalization
    from napari_unet.normalization import part_bounds

    shape, chunks = (40, 50, 60), (16, 16, 16)
    image = np.random.default_rng(2).integers(0, 4000, shape).astype(np.uint16)
    stored = zarr.create_array(str(tmp_path / "v.zarr"), shape=shape, chunks=chunks, dtype=np.uint16)
    stored[...] = image
    monkeypatch.setattr(normalization, "_SLAB_PIXELS", 16 * 16 * 20)  # parts of two chunks
    parts = part_bounds(stored)
    covered = np.zeros(shape, np.int64)
    for part in parts:
        covered[part] += 1
        assert math.prod(s.stop - s.start for s in part) <= 16 * 16 * 40
        for s, c, n in zip(part, chunks, shape):
            assert s.start % c == 0 and (s.stop % c == 0 or s.stop == n)  # whole chunks
    assert (covered == 1).all() and len(parts) < 40  # fewer parts than planes
    for low, high in [(1.0, 99.8), (0.0, 100.0)]:
        params = percentile_params(stored, low, high)
        assert [params["low_values"][0], params["high_values"][0]] == list(np.percentile(image, [low, high]))
    monkeypatch.setattr(normalization, "_SLAB_PIXELS", 16 * 16 * 4)  # a chunk is larger than a part
    planes = part_bounds(stored)
    assert {p[0].stop - p[0].start for p in planes} == {8}  # 8 planes of 16 x 16: the budget
    assert all(
        p[1].stop - p[1].start == p[2].stop - p[2].start == 16 for p in planes if p[1].stop < 50 and p[2].stop < 60
    )
    assert percentile_params(stored)["high_values"] == [np.percentile(image, 99.8)]


def _other_type_images():
    rng = np.random.default_rng(3)
    shape = (9, 70, 50)
    with_bad = rng.normal(size=shape).astype(np.float32)
    with_bad[0, :3], with_bad[4, 5], with_bad[5, 6] = np.nan, np.inf, -np.inf
    one_ulp = np.finfo(np.float32).eps * rng.integers(0, 3, size=shape)  # values one float32 step apart
    return {
        "float32": rng.normal(size=shape).astype(np.float32),
        "float32 with NaN and Inf": with_bad,
        "float32 ties": np.round(rng.normal(size=shape), 1).astype(np.float32),
        "float32 one ulp apart": (1 + one_ulp).astype(np.float32),
        "float64 over 30 decades": np.exp(rng.normal(size=shape) * 8),
        "float16": rng.normal(size=shape).astype(np.float16),
        "int32": rng.integers(-(2**31), 2**31 - 1, size=shape).astype(np.int32),
        "uint32 constant": np.full(shape, 7, np.uint32),
    }


@pytest.mark.parametrize("name", list(_other_type_images()))
def test_selected_percentiles_of_a_lazy_image_equal_numpys(name, monkeypatch):
    """Lazy float and 32/64-bit images: exact percentiles by streaming selection, with slabs and the number of
    values held at once far smaller than the image here, so several narrowing passes run."""
    import dask.array as da

    import napari_unet.normalization as normalization

    monkeypatch.setattr(normalization, "_SLAB_PIXELS", 5000)
    monkeypatch.setattr(normalization, "_SELECTION_KEEP", 3000)
    image = _other_type_images()[name]
    lazy = da.from_array(image, chunks=(2, 30, 30))
    for low, high in [(1.0, 99.8), (0.0, 100.0), (37.3, 62.1), (50.0, 50.0001)]:
        assert percentile_params(lazy, low, high) == percentile_params(image, low, high), (low, high)


def test_selected_percentiles_hold_a_bounded_part_of_the_image(monkeypatch):
    """Peak traced memory of the percentiles of a lazy float32 image is a small part of the image: it is never
    read whole (it was before: the whole image and its float64 copy)."""
    import tracemalloc

    import dask.array as da

    import napari_unet.normalization as normalization

    monkeypatch.setattr(normalization, "_SLAB_PIXELS", 1 << 15)
    monkeypatch.setattr(normalization, "_SELECTION_KEEP", 1 << 14)
    image = np.random.default_rng(4).gamma(2.0, 300.0, size=(64, 256, 256)).astype(np.float32)
    lazy = da.from_array(image, chunks=(1, 256, 256))
    percentile_params(lazy[:1, :8])  # warm-up: imports and caches are not what is measured
    tracemalloc.start()
    try:
        params = percentile_params(lazy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < image.nbytes / 4, f"peak {peak / 2**20:.1f} MiB for a {image.nbytes / 2**20:.1f} MiB image"
    assert params == percentile_params(image)


def test_normalized_view_reads_what_normalize_image_computes():
    import dask.array as da

    rng = np.random.default_rng(1)
    image = (rng.random((5, 40, 30)) * 3000).astype(np.uint16)
    view = normalized_view(da.from_array(image, chunks=(1, 20, 30)))
    assert view.shape == image.shape and view.dtype == np.float32
    np.testing.assert_array_equal(view[2, 5:17, ::3], normalize_image(image)[2, 5:17, ::3])

    channels = rng.random((2, 40, 30)).astype(np.float32) * [[[1.0]], [[50.0]]]
    view = normalized_view(da.from_array(channels), channel_axis=0)
    np.testing.assert_array_equal(view[:, 3:9], normalize_image(channels, channel_axis=0)[:, 3:9])
    with pytest.raises(IndexError, match="all channels"):
        view[0]


def _nuclei(seed=0, shape=(256, 256), debris=0.0, radii=(1, 4)):
    """Discs of radius 10-16 at ~100 over a background of ~20 (uint8), with bright saturated specks of radius
    ``radii`` (1-3) covering ``debris`` of the pixels."""
    rng = np.random.default_rng(seed)
    image = rng.normal(20, 3, shape)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    for _ in range(25):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(10, 17)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] += rng.normal(80, 5)
    image = np.clip(image, 0, 200)
    nuclei = image > 60
    covered = np.zeros(shape, bool)
    while covered.mean() < debris:
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(*radii)
        covered |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    image[covered] = 255
    return image.astype(np.uint8), nuclei & ~covered


def test_robust_normalization_ignores_bright_debris():
    """An image with and without 1 % saturated specks: the plain percentiles squash its objects (the upper one lies
    in the debris), the robust ones map them to the same range."""
    from napari_unet.normalization import robust_params

    clean, nuclei = _nuclei()
    dirty, kept = _nuclei(debris=0.01)
    robust = {"method": "robust", "low": 1.0, "high": 99.8, "speck_area": 100}
    plain_clean, plain_dirty = normalize_image(clean, PERCENTILE_RECIPE), normalize_image(dirty, PERCENTILE_RECIPE)
    assert np.median(plain_dirty[kept]) < 0.8 * np.median(plain_clean[nuclei])  # the failure being fixed
    robust_clean, robust_dirty = normalize_image(clean, robust), normalize_image(dirty, robust)
    np.testing.assert_allclose(np.median(robust_dirty[kept]), np.median(robust_clean[nuclei]), rtol=0.03)
    # Without artifacts robust and plain agree closely, and the low value is the plain one.
    assert abs(np.median(robust_clean[nuclei]) - np.median(plain_clean[nuclei])) < 0.05
    assert robust_params(dirty)["low_values"] == percentile_params(dirty)["low_values"]
    assert robust_params(dirty, speck_area=0)["high_values"] == percentile_params(dirty)["high_values"]  # no opening
    with pytest.raises(ValueError, match="speck_area"):
        robust_params(dirty, speck_area=-1)
    # Objects all smaller than the area (spots): the opening would empty the image, the plain value is kept.
    spots = np.full((128, 128), 10, np.uint8)
    spots[::16, ::16] = 200
    assert robust_params(spots)["high_values"] == percentile_params(spots)["high_values"]
    # A thin bright filament is no speck: it sets the upper value.
    filament = np.full((128, 128), 10, np.uint8)
    filament[60:62, :] = 200
    assert robust_params(filament)["high_values"] == [200.0]


def test_debris_far_brighter_than_the_objects_does_not_pass_for_spots(monkeypatch):
    """Specks at 30x the nuclei's level (nuclei at 2,000 counts of a 16-bit camera, debris saturating it): the plain
    upper value lies so far above the objects that the opening alone takes the range below ``EMPTIED_FRACTION`` of
    it, which is also what an image of spots does; the nuclei left in the opened image tell the two apart. Spots on
    a noisy background still keep the plain value."""
    clean, nuclei = _nuclei()
    dirty, kept = _nuclei(debris=0.01)
    bright = dirty.astype(np.float32)
    rng = np.random.default_rng(3)
    bright[dirty == 255] = rng.uniform(2500.0, 3500.0, np.count_nonzero(dirty == 255))  # no plateau at the maximum
    robust_clean = normalize_image(clean)
    np.testing.assert_allclose(np.median(normalize_image(bright)[kept]), np.median(robust_clean[nuclei]), rtol=0.03)
    with monkeypatch.context() as patched:  # the spots rule alone (before BACKGROUND_SPREAD) kept the plain value
        patched.setattr(normalization, "BACKGROUND_SPREAD", np.inf)
        assert np.median(normalize_image(bright)[kept]) < 0.2 * np.median(robust_clean[nuclei])
    for background in (rng.normal(100.0, 5.0, (256, 256)), rng.poisson(20.0, (256, 256)).astype(np.float64)):
        spots = background.copy()
        for y, x in rng.integers(2, 254, (300, 2)):
            spots[y - 1 : y + 2, x - 1 : x + 2] += 200.0
        spots = spots.astype(np.float32)
        assert robust_params(spots)["high_values"] == percentile_params(spots)["high_values"]


def test_saturated_debris_on_an_image_of_spots_does_not_set_the_upper_value(monkeypatch):
    """Spots (smaller than ``speck_area``, so the opening empties the image) and a saturated disc larger than a speck
    at 15x their level: the spots rule keeps the plain percentile, which the disc would hold; taken without the
    pixels at the image's maximum it is the spots' value again, in memory and streamed alike."""
    import dask.array as da

    rng = np.random.default_rng(5)
    spots = rng.normal(100.0, 5.0, (256, 256))
    for y, x in rng.integers(2, 254, (300, 2)):
        spots[y - 1 : y + 2, x - 1 : x + 2] += 200.0
    spots = spots.astype(np.float32)
    dirty = spots.copy()
    yy, xx = np.ogrid[:256, :256]
    dirty[(yy - 128) ** 2 + (xx - 128) ** 2 <= 64] = 4500.0  # ~200 px, over speck_area and over 0.2 % of the pixels
    assert percentile_params(dirty)["high_values"] == [4500.0]  # what the plain value is
    upper = robust_params(spots)["high_values"][0]
    np.testing.assert_allclose(robust_params(dirty)["high_values"][0], upper, rtol=0.02)
    monkeypatch.setattr(normalization, "_SLAB_PIXELS", 3000)
    assert robust_params(da.from_array(dirty, chunks=(40, 256))) == robust_params(dirty)


def test_small_saturated_debris_on_an_image_without_a_dark_background_does_not_set_the_upper_value():
    """EM-like: dark membranes on a bright cytoplasm (no dark background for ``BACKGROUND_SPREAD`` to find objects
    above) and specks smaller than ``speck_area`` at 8x the upper value on 2 % of the pixels. The opening removes
    them and passes the image for one of spots, whose plain value the saturated plateau holds; taken without it the
    upper value is the clean image's."""
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[:256, :256]
    clean = rng.normal(150.0, 15.0, (256, 256))
    clean[(yy % 32 < 3) | (xx % 40 < 3)] = 40.0
    clean = clean.astype(np.float32)
    dirty, covered = clean.copy(), np.zeros(clean.shape, bool)
    while covered.mean() < 0.02:
        cy, cx, r = rng.integers(0, 256), rng.integers(0, 256), rng.integers(1, 6)
        covered |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    dirty[covered] = 8.0 * float(np.percentile(clean, 99.8))
    upper = robust_params(clean)["high_values"][0]
    # within 5 %: the opening flattens each speck to the level of its brightest surroundings
    np.testing.assert_allclose(robust_params(dirty)["high_values"][0], upper, rtol=0.05)
    assert percentile_params(dirty)["high_values"][0] > 5 * upper  # what the plain value is


def _opened_upper(image) -> float:
    """The robust upper value with the plateau at the maximum taken in (the opening alone)."""
    return float(np.percentile(normalization._open_planes(image, normalization.SPECK_AREA), 99.8))


def test_saturated_debris_larger_than_the_area_does_not_set_the_upper_value():
    """Saturated debris of radius 6-9 px (over ``speck_area``: the opening keeps it) on 1.5 % of the pixels: the
    plateau at the image's maximum would hold the upper percentile and is left out, so the objects keep their
    range; saturated objects that shade into unsaturated rims keep an upper value close to saturation."""
    clean, nuclei = _nuclei()
    dirty, kept = _nuclei(debris=0.015, radii=(6, 10))
    robust_clean, robust_dirty = normalize_image(clean), normalize_image(dirty)
    np.testing.assert_allclose(np.median(robust_dirty[kept]), np.median(robust_clean[nuclei]), rtol=0.03)
    low = robust_params(dirty)["low_values"][0]  # the opening alone keeps the debris, which sets the upper value
    assert np.median((dirty[kept] - low) / (_opened_upper(dirty) - low)) < 0.8 * np.median(robust_clean[nuclei])
    # the same in other units: 16-bit and float images are opened on quantized levels
    for scaled in (dirty.astype(np.uint16) * 200, dirty.astype(np.float32) / 255):
        np.testing.assert_allclose(np.median(normalize_image(scaled)[kept]), np.median(robust_dirty[kept]), rtol=0.01)
    # overexposed nuclei: clipped cores inside blurred rims; the upper value stays near the clipping level

    overexposed = np.clip(ndimage.gaussian_filter(clean.astype(np.float64) * 3.0, 2.0), 0, 255).astype(np.uint8)
    assert np.mean(overexposed == 255) > 0.05
    assert robust_params(overexposed)["high_values"][0] >= 0.95 * 255


def test_saturated_debris_under_its_share_of_the_pixels_does_not_raise_the_upper_value():
    """Merged saturated debris on fewer pixels than the 0.2 % above the upper percentile: taken in, it fills the
    top ranks and pushes the percentile into the brightest objects' tail (domes of mixed brightness here); left
    out, the upper value is the clean image's."""
    rng = np.random.default_rng(4)
    shape = (256, 256)
    clean = rng.normal(20, 3, shape)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    for _ in range(25):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(10, 17)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        dome = rng.uniform(60, 200) * (1.0 - ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
        clean[disc] = np.maximum(clean[disc], 20 + dome[disc])
    clean = np.clip(clean, 0, 254).astype(np.uint8)
    dirty = clean.copy()
    dirty[(yy - 40) ** 2 + (xx - 40) ** 2 <= 22] = 255  # two touching discs of ~70 px: one speck over speck_area
    dirty[(yy - 40) ** 2 + (xx - 47) ** 2 <= 22] = 255
    assert 100 <= np.count_nonzero(dirty == 255) < 0.002 * dirty.size
    upper = robust_params(clean)["high_values"][0]
    np.testing.assert_allclose(robust_params(dirty)["high_values"][0], upper, rtol=0.01)
    assert _opened_upper(dirty) > 1.02 * upper  # what taking the plateau in gives


@pytest.mark.parametrize("radii", [(1, 4), (6, 10)])
@pytest.mark.parametrize("shape", [(200, 150), (5, 60, 70)])
def test_robust_parameters_of_a_lazy_image_equal_the_in_memory_ones(shape, radii, monkeypatch):
    """Streamed in slabs (a 2D image in bands of rows with a halo): the same values as the whole-image opening."""
    import dask.array as da

    import napari_unet.normalization as normalization
    from napari_unet.normalization import robust_params

    monkeypatch.setattr(normalization, "_SLAB_PIXELS", 3000)
    image, _ = _nuclei(1, (shape[-2] * (shape[0] if len(shape) == 3 else 1), shape[-1]), debris=0.01, radii=radii)
    image = image.reshape(shape)
    lazy = da.from_array(image, chunks=(7,) + image.shape[1:])
    assert robust_params(lazy) == robust_params(image)
    floats = image.astype(np.float32) * 10.0  # quantized with the whole image's extremes, band by band alike
    assert robust_params(da.from_array(floats, chunks=(7,) + image.shape[1:])) == robust_params(floats)
    floats[image == 255] = 30.0 * 255  # debris far brighter than the objects: the opened median decides (streamed)
    assert robust_params(da.from_array(floats, chunks=(7,) + image.shape[1:])) == robust_params(floats)
    with_nan = image.astype(np.float32)
    with_nan[..., 3, 4] = np.nan
    assert np.isfinite(robust_params(with_nan)["high_values"]).all()


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_lazy_parameters_counted_elsewhere_equal_those_counted_here(dtype, monkeypatch):
    """``reduce_slabs`` through a mapper, as ``distributed_predict.ClusterSlabs`` runs it on a cluster (what it is
    given pickled, the slabs in another order): the same parameters as in memory, NaN pixels included."""
    import functools
    import pickle

    import dask.array as da

    import napari_unet.normalization as normalization
    from napari_unet.normalization import percentile_params, robust_params

    slabs_counted = []

    def mapper(function, combine, values, bounds):
        function, combine, values = pickle.loads(pickle.dumps((function, combine, values)))
        slabs_counted.extend(bounds)
        return functools.reduce(combine, [function(values, b) for b in reversed(bounds)])

    monkeypatch.setattr(normalization, "_SLAB_PIXELS", 3000)
    image, _ = _nuclei(2, (4 * 60, 70), debris=0.01)
    image = (image.astype(np.float64) * (200 if dtype == "uint16" else 1)).astype(dtype).reshape(4, 60, 70)
    if dtype == "float32":
        image[1, 3, 4] = np.nan
    lazy = da.from_array(image, chunks=(1, 60, 70))
    assert robust_params(lazy, mapper=mapper) == robust_params(image)
    assert percentile_params(lazy, mapper=mapper) == percentile_params(image)
    assert len(slabs_counted) >= 4  # the mapper counted them (float percentiles are selected here, unmapped)


def test_a_dataset_recipe_fixes_the_mapping_from_the_training_images():
    from napari_unet.normalization import dataset_recipe

    images = [_nuclei(seed)[0] for seed in range(3)]
    recipe = dataset_recipe(images, {"method": "dataset", "low": 1.0, "high": 99.8})
    assert recipe["method"] == "fixed" and len(recipe["low_values"]) == 1
    dirty, kept = _nuclei(0, debris=0.02)
    np.testing.assert_array_equal(normalize_image(dirty, recipe)[kept], normalize_image(images[0], recipe)[kept])
    brighter = normalize_image(images[0].astype(np.float32) * 2, recipe)
    assert np.median(brighter) > 1.5 * np.median(normalize_image(images[0], recipe))  # follows no gain change
    two = dataset_recipe([np.stack([im, im // 2]) for im in images], {"method": "dataset"}, channel_axis=0)
    assert len(two["high_values"]) == 2 and two["high_values"][1] < two["high_values"][0]
    assert normalize_image(np.stack([images[0], images[0]]), two, channel_axis=0).shape == (2, 256, 256)


def test_training_with_a_dataset_recipe_stores_fixed_values_that_every_prediction_applies(tmp_path):
    from napari_unet.io import load_model
    from napari_unet.predict import PredictionSettings, predict_image
    from napari_unet.tiling import predict_tiled
    from napari_unet.training import train

    images = [_nuclei(seed, (96, 96))[0] for seed in range(2)]
    strokes = [
        np.where(_nuclei(seed, (96, 96))[1], 2, 1).astype(np.uint8) * (np.arange(96) % 9 == 0) for seed in (0, 1)
    ]
    trainer = train(
        images,
        strokes,
        iterations=3,
        time_budget=None,
        depth=1,
        base_filters=4,
        patch_size=16,
        batch_size=2,
        device="cpu",
        normalization={"method": "dataset", "low": 1.0, "high": 99.8},
    )
    assert trainer.normalization["method"] == "fixed"
    trainer.save(tmp_path / "m.safetensors")
    model, metadata = load_model(tmp_path / "m.safetensors")
    assert metadata["normalization"] == trainer.normalization
    other = (images[0].astype(np.float32) * 1.7).astype(np.float32)  # brighter: the fixed values apply as they are
    settings = PredictionSettings(device="cpu", test_time_flips=False, refine_radius=0)
    expected = predict_tiled(model, normalize_image(other, metadata["normalization"]))
    np.testing.assert_array_equal(predict_image(model, metadata, other, settings).probabilities, expected)
    fixed = metadata["normalization"]
    np.testing.assert_allclose(
        normalize_image(other, fixed),
        (other - fixed["low_values"][0]) / (fixed["high_values"][0] - fixed["low_values"][0]),
        rtol=1e-5,
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_the_area_opening_equals_scikit_images(dtype):
    """``_area_opening`` (Higra's max-tree) gives scikit-image's ``area_opening`` plane by plane: on noise, on a
    smooth image with plateaus, with bright specks, in a stack."""
    from scipy import ndimage
    from skimage.morphology import area_opening

    from napari_unet.normalization import _area_opening

    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max if dtype == np.uint8 else 1023
    noise = rng.normal(size=(3, 96, 80))
    smooth = ndimage.gaussian_filter(noise, (0, 3, 3))
    for source in (noise, smooth):
        levels = np.round((source - source.min()) / np.ptp(source) * top).astype(dtype)
        levels[:, rng.integers(0, 96, 30), rng.integers(0, 80, 30)] = top  # specks at the brightest level
        for area in (1, 7, 100):
            expected = np.stack([area_opening(plane, area_threshold=area) for plane in levels])
            np.testing.assert_array_equal(_area_opening(levels, area), expected)
            np.testing.assert_array_equal(_area_opening(levels[0], area), expected[0])
