"""Whole-image intensity normalization (pure numpy).

Normalization is computed once over the WHOLE image (per channel when the image has one)
and then applied to every tile, never per tile: per-tile statistics would give each tile a
different intensity scale and produce visible seams.

A model stores a normalization *recipe* in its metadata, e.g.
``{"method": "percentile", "low": 1.0, "high": 99.8}``; :func:`normalize_image` computes the
recipe's parameters on a new image and applies them.

Non-finite pixels: NaN and +/-Inf are ignored when the percentiles are computed, and every
pixel that is not finite after normalization (NaN/Inf input, or float32 overflow) is set to 0,
so a few bad pixels neither shift the intensity scale nor poison the prediction. Finite pixels
far outside the scale (a hot pixel of 1e20 in an image of 0-1) are held within
+/-``NORMALIZED_LIMIT``: squared by the edge refinement or summed through the network they
would overflow float32 (or float16) and turn the outputs around them into NaN.

Images larger than memory: :func:`normalized_view` takes a lazy array (anything sliceable with a
``shape`` and ``dtype``, e.g. :func:`napari_unet.io.open_image`'s) and returns a
:class:`NormalizedView` that normalizes what is read from it. The percentiles of 8- and 16-bit
integer images are computed exactly from a histogram accumulated slab by slab (the same values as
``np.percentile`` on the whole image); those of other types (float, 32/64-bit integers) by exact selection
in a few streaming passes (:func:`_selected_percentiles`), so no image is ever read whole.

Why own code for the streamed percentiles: ``dask.array.percentile`` (and ``da.nanpercentile``) merge per-chunk
estimates and are not exact, and a NumPy percentile needs the whole image in memory; a prediction of a lazily read
file must normalize exactly as the same image in memory does (the CLI and the widget must agree bit for bit).
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

METHODS = ("percentile", "robust", "dataset", "fixed", "none")
SPECK_AREA = 100
"""Default ``speck_area`` of the "robust" method: bright components smaller than this (pixels, in-plane: discs
narrower than about 11 px) do not set the upper percentile."""
PERCENTILE_RECIPE = {"method": "percentile", "low": 1.0, "high": 99.8}
"""Each image's 1st and 99.8th percentiles (CSBDeep's choice); a few per cent of bright debris moves the upper one."""
ROBUST_RECIPE = {"method": "robust", "low": 1.0, "high": 99.8, "speck_area": SPECK_AREA}
"""The same with the upper percentile taken without bright components under ``speck_area`` pixels."""
DATASET_RECIPE = {"method": "dataset", "low": 1.0, "high": 99.8, "speck_area": SPECK_AREA}
"""One mapping for every image, fixed from the training images' robust values (acquisitions known to be alike)."""
BACKGROUND_RECIPE = {**ROBUST_RECIPE, "background_grid": 8}
"""The robust percentiles of each image after subtracting its smooth background (:mod:`napari_unet.background`: the
low percentile of 8 x 8 cells of the plane, interpolated): for uneven illumination and hazy backgrounds under objects
smaller than a cell. 8 and not 4: a linear field between 4 x 4 cell centres leaves a fifth to a third of a haze
bump in place (docs/benchmarks.md); the price is the size of the objects it leaves alone."""
DEFAULT_RECIPE = ROBUST_RECIPE
"""What new models use (docs/benchmarks.md: robustness across images)."""
EMPTIED_FRACTION = 0.15
"""When leaving out the small components takes the upper value below this fraction of the plain percentile range
and nothing but background is left (``BACKGROUND_SPREAD``), the image's objects themselves are that small (spots):
the "robust" method then keeps the plain percentile."""
BACKGROUND_SPREAD = 2.0
"""The opened image holds nothing but background (noise, texture) when its upper value lies less than this many
times as far above its median as the median lies above the low percentile. Noise and texture stay within about
one such distance (a Gaussian background: 1.24), objects larger than ``speck_area`` on a background stand several
such distances above it (the DSB and ISBI images measured: docs/benchmarks.md)."""
MAX_SPECK_AREA = 1 << 20
"""Largest ``speck_area`` (pixels) a recipe may ask for (:func:`check_recipe`)."""
MAX_BACKGROUND_GRID = 64
"""Most cells per axis of a background field a recipe may ask for (``background_grid``, :func:`check_recipe`)."""
NORMALIZED_LIMIT = 1000.0
"""Normalized values are held within +/- this (the scaled methods; "none" keeps the image's own values): a thousand
times the objects' range is an artifact whatever its value, and the network never saw more than a few."""
_OPENING_LEVELS = 1024
"""Grey levels of the image the area opening sees when it has more than 8 bits (its cost grows with the levels)."""


def percentile_params(image, low=1.0, high=99.8, channel_axis=None, mapper=None) -> dict:
    """Percentile normalization parameters of a whole image.

    Parameters
    ----------
    image : array-like
        The whole image, any shape, integer or float.
    low, high : float
        Percentiles (0-100) that :func:`normalize` maps to 0 and 1.
    channel_axis : int, optional
        When given, percentiles are computed separately for each channel along this axis.
    mapper : callable, optional
        Where the slabs of a lazy integer image are counted (:func:`reduce_slabs`); None: here, one by one.

    Returns
    -------
    dict
        ``{"method": "percentile", "low": low, "high": high, "channel_axis": channel_axis,
        "low_values": [...], "high_values": [...]}`` with one value per channel (a single value
        without ``channel_axis``). Percentiles ignore NaN and Inf; an image without any finite
        pixel gives 0 and 1.
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}")
    if not is_lazy(image):
        image = np.asarray(image)
    if math.prod(image.shape) == 0:
        raise ValueError("cannot compute normalization parameters of an empty image")
    if channel_axis is None:
        channels = [image]
    else:
        channel_axis = channel_axis % len(image.shape)
        before = (slice(None),) * channel_axis
        channels = [image[before + (c,)] for c in range(image.shape[channel_axis])]
    low_values, high_values = [], []
    for channel in channels:
        lo, hi = _finite_percentiles(channel, low, high, mapper)
        low_values.append(lo)
        high_values.append(hi)
    return {
        "method": "percentile",
        "low": float(low),
        "high": float(high),
        "channel_axis": channel_axis,
        "low_values": low_values,
        "high_values": high_values,
    }


def robust_params(image, low=1.0, high=99.8, speck_area=SPECK_AREA, channel_axis=None, mapper=None) -> dict:
    """Percentile parameters that small bright artifacts cannot move: ``low`` is the ``low`` percentile of the image,
    ``high`` the ``high`` percentile of the image after an area opening (plane by plane, the last two axes) that
    flattens every bright component smaller than ``speck_area`` pixels (debris, hot pixels, saturated specks,
    reflections) to its surroundings and keeps larger objects, thin long ones (filaments) included. On an image
    without such artifacts the values are close to :func:`percentile_params`'s; on one whose upper percentile lies
    in its debris (0.2-2 % of the pixels, several times brighter than the objects) they follow the objects instead.
    When the opening empties the image (its upper value falls below ``EMPTIED_FRACTION`` of the plain range and no
    object stands out of the background of the opened image, ``BACKGROUND_SPREAD``: the objects are spots smaller
    than ``speck_area``), the plain percentile is kept (taken without the pixels at the image's maximum where a
    plateau of them survives the opening or holds that percentile itself, and anything but them rises above the low
    value: a plateau larger than a speck is clipped debris, not spots, and one on more pixels than the percentile
    leaves above it says only "this much or more"); the second condition keeps debris many times brighter than the
    objects (which alone takes the upper value below that fraction of the plain range) from passing for spots.
    Pixels at the image's maximum that survive the opening are left out of both percentiles of the opened image: a
    plateau of ``speck_area`` pixels or more at the maximum is clipped (saturated) signal, whose value says only
    "this much or more", typically debris larger than ``speck_area`` (specks that touch merge into larger
    components); taken in, it holds the upper percentile when it covers more than its share of the pixels, and
    pushes it into the objects' brightest tail when it covers less. Where saturated objects shade into their
    unsaturated rims, the percentile of the rest lies just below the plateau and little changes. (Only the image's
    own maximum: the opening itself leaves plateaus at lower levels, where it flattened the tops of objects.)

    Why components and not a higher/lower percentile or a histogram rule: which percentile falls on the objects
    depends on how much of the image they cover, and a few per cent of debris moves any upper percentile and fools
    a histogram split (Otsu puts its threshold between objects and debris), while an artifact's size does not depend
    on either. Bright artifacts as large as the objects cannot be told from them by intensity and size and are not
    removed. The opening is Higra's max-tree (``_area_opening``), on ``_OPENING_LEVELS`` grey levels for images of more
    than 8 bits (between the image's finite extremes); the percentiles are this module's own, streamed for lazy
    arrays (a 2D image in bands of rows with ``speck_area`` rows of context, so that each band equals the
    whole-image opening; the opened planes' grey levels counted in one pass, by ``mapper`` where given:
    :func:`reduce_slabs`). Returns :func:`percentile_params`'s dict with ``method`` "robust" and ``speck_area``.
    """
    if not (isinstance(speck_area, int) and speck_area >= 0):
        raise ValueError(f"speck_area must be an integer >= 0 (pixels), got {speck_area!r}")
    params = percentile_params(image, low, high, channel_axis, mapper)
    if speck_area > 1:
        channels = _channels(image if is_lazy(image) else np.asarray(image), params["channel_axis"])
        for c, channel in enumerate(channels):
            lo, plain = params["low_values"][c], params["high_values"][c]
            middle, opened, clipped = _opened_percentiles(channel, speck_area, high, mapper)
            background_only = opened - middle <= BACKGROUND_SPREAD * max(middle - lo, 0.0)
            emptied = opened - lo < EMPTIED_FRACTION * (plain - lo)
            if emptied and background_only and (clipped or plain >= _extremes(channel, mapper)[1]):
                below = _percentile_below_top(channel, high, mapper)  # the plain value without a saturated plateau
                if below > lo:
                    plain = params["high_values"][c] = below
                    emptied = opened - lo < EMPTIED_FRACTION * (plain - lo)
            if not (emptied and background_only):
                params["high_values"][c] = opened
    return {**params, "method": "robust", "speck_area": speck_area}


def _channels(image, channel_axis) -> list:
    if channel_axis is None:
        return [image]
    before = (slice(None),) * channel_axis
    return [image[before + (c,)] for c in range(image.shape[channel_axis])]


def _open_planes(array: np.ndarray, area: int, extremes: tuple[float, float] | None = None) -> np.ndarray:
    """Area opening of each plane (last two axes) of ``array``: bright components of fewer than ``area`` pixels
    flattened. Images of more than 8 bits are first mapped linearly to ``_OPENING_LEVELS`` levels between
    ``extremes`` (the whole image's finite minimum and maximum, so that every part of an image is quantized alike)
    and back; non-finite pixels become the lowest level for the opening and keep their value."""
    array = np.asarray(array)
    if array.ndim < 2 or min(array.shape[-2:]) < 2:
        return array
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype == np.uint8:
        return _area_opening(array, area)
    values = array.astype(np.float64)
    lo, step = _quantization(extremes if extremes is not None else _extremes(values))
    opened = _opened_levels(values, area, lo, step)
    return np.where(opened != _NOT_FINITE, opened.astype(np.float64) * step + lo, values)


_NOT_FINITE = np.uint16(65535)
"""The level :func:`_opened_levels` gives a pixel that is not finite (never one of the ``_OPENING_LEVELS``)."""


def _quantization(extremes: tuple[float, float]) -> tuple[float, float]:
    """``(lo, step)``: level ``k`` of the area opening stands for ``k * step + lo``."""
    lo, hi = extremes
    return lo, (hi - lo) / (_OPENING_LEVELS - 1) or 1.0


def _opened_levels(values: np.ndarray, area: int, lo: float, step: float) -> np.ndarray:
    """The area opening of each plane of ``values`` (float64) on its ``_OPENING_LEVELS`` levels (uint16; the
    non-finite pixels are the lowest level for the opening and ``_NOT_FINITE`` in the result)."""
    finite = np.isfinite(values)
    levels = np.where(finite, np.clip(np.round((values - lo) / step), 0, _OPENING_LEVELS - 1), 0).astype(np.uint16)
    return np.where(finite, _area_opening(levels, area), _NOT_FINITE).astype(np.uint16)


def _opened_percentiles(channel, area: int, q: float, mapper=None) -> tuple[float, float, bool]:
    """The median and the ``q`` percentile of ``channel`` after the plane-wise area opening (finite pixels only;
    the image's maximum left out where some of it survives the opening and other values lie below it). Of a lazy
    array they are taken from the histogram of the opened planes' levels (one pass, through ``mapper`` where
    given), which gives the same values as ``np.percentile`` of the opened image in memory."""
    if not is_lazy(channel):
        values = np.asarray(channel)
        extremes = None if values.dtype in (np.uint8, np.bool_) else _extremes(values)
        opened = np.asarray(_open_planes(values, area, extremes), np.float64).ravel()
        opened = opened[np.isfinite(opened)]
        if opened.size == 0:
            return 0.0, 1.0, False
        if extremes is None:
            top = float(values.max())
        else:
            lo, step = _quantization(extremes)
            top = float(np.float64(_top_level(extremes)) * step + lo)  # the value _open_planes gives that level
        clipped = 0 < np.count_nonzero(opened == top) < opened.size
        if clipped:
            opened = opened[opened != top]
        middle, upper = np.percentile(opened, [50.0, q])
        return float(middle), float(upper), bool(clipped)
    if np.dtype(channel.dtype) in (np.uint8, np.bool_):
        top = int(_extremes(channel, mapper)[1])
        return _histogram_percentiles(_OpenedSlabs(channel, area, None), 50.0, q, mapper, clipped=top, report=True)
    extremes = _extremes(channel, mapper)
    lo, step = _quantization(extremes)
    levels = _OpenedSlabs(channel, area, (lo, step))
    return _histogram_percentiles(
        levels, 50.0, q, mapper, exclude=int(_NOT_FINITE), scale=(lo, step), clipped=_top_level(extremes), report=True
    )


class _WithoutTop:
    """A lazy array read as float64 with its value ``top`` (its maximum) made NaN, so percentiles leave it out."""

    dtype = np.dtype(np.float64)

    def __init__(self, source, top: float):
        self.source, self.top = source, top
        self.shape = tuple(source.shape)
        self.ndim = len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        values = np.asarray(self.source[key], np.float64)
        return np.where(values == self.top, np.nan, values)


def _percentile_below_top(channel, q: float, mapper=None) -> float:
    """The ``q`` percentile of ``channel``'s finite pixels below its maximum (streamed for a lazy array)."""
    top = _extremes(channel, mapper)[1]
    if is_lazy(channel):
        return _finite_percentiles(_WithoutTop(channel, top), q, q)[1]
    return _finite_percentiles(_WithoutTop(np.asarray(channel), top)[...], q, q)[1]


def _top_level(extremes: tuple[float, float]) -> int:
    """The opening level of an image's maximum (the last level; 0 for a constant image)."""
    return _OPENING_LEVELS - 1 if extremes[1] > extremes[0] else 0


def _extremes(values, mapper=None) -> tuple[float, float]:
    """The finite minimum and maximum of an array (numpy, or lazy: read in slabs, through ``mapper`` where given,
    :func:`reduce_slabs`); (0, 1) when none is finite."""
    if is_lazy(values):
        smallest, largest = reduce_slabs(_slab_extremes, _wider, values, mapper)
    else:
        smallest, largest = _slab_extremes(np.asarray(values), (slice(None),))
    return (smallest, largest) if smallest <= largest else (0.0, 1.0)


def _slab_extremes(values, bounds: tuple[slice, ...]) -> tuple[float, float]:
    finite = np.asarray(values[bounds], np.float64).ravel()
    finite = finite[np.isfinite(finite)]
    return (float(finite.min()), float(finite.max())) if finite.size else (math.inf, -math.inf)


def _wider(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return min(a[0], b[0]), max(a[1], b[1])


def _area_opening(array: np.ndarray, area: int) -> np.ndarray:
    """The area opening of each plane (last two axes, 4-connected): the max-tree of the plane (Higra's
    ``component_tree_max_tree``), its nodes of fewer than ``area`` pixels given their parent's level. It equals
    scikit-image's ``area_opening``, whose max-tree construction grows much faster than the pixel count
    (docs/benchmarks.md, "The robust normalization's area opening")."""
    import higra as hg

    planes = np.ascontiguousarray(array.reshape(-1, *array.shape[-2:]))
    graph = hg.get_4_adjacency_graph(planes.shape[1:])
    opened = np.empty_like(planes)
    for plane, target in zip(planes, opened):
        tree, levels = hg.component_tree_max_tree(graph, plane)
        target[...] = hg.reconstruct_leaf_data(tree, levels, hg.attribute_area(tree) < area)
    return opened.reshape(array.shape)


class _OpenedSlabs:
    """A lazy array's plane-wise area opening, read along the first axis as :func:`slabs` does: the slices of a
    stack are opened one by one; a 2D image is read in bands of rows with ``area`` rows of context on each side (a
    component of fewer than ``area`` pixels spans fewer rows), so every band equals that part of the whole-image
    opening. 8-bit and boolean images (``quantization`` None) give the opened image; images of more than 8 bits its
    levels (``_opened_levels``, with the whole image's ``quantization``: ``(lo, step)``)."""

    def __init__(self, source, area: int, quantization: tuple[float, float] | None):
        self.source, self.area, self.quantization = source, area, quantization
        self.shape = tuple(source.shape)
        self.dtype = np.dtype(np.uint8) if quantization is None else np.dtype(np.uint16)
        self.ndim = len(self.shape)

    def _opened(self, array: np.ndarray) -> np.ndarray:
        if self.quantization is None:
            return _open_planes(array, self.area)
        return _opened_levels(array.astype(np.float64), self.area, *self.quantization)

    def __getitem__(self, key: slice | tuple[slice]) -> np.ndarray:
        (key,) = key if isinstance(key, tuple) else (key,)  # a part of reduce_slabs: one slice of the first axis
        start, stop, _ = key.indices(self.shape[0])
        if self.ndim != 2:
            return self._opened(np.asarray(self.source[start:stop]))
        lo, hi = max(0, start - self.area), min(self.shape[0], stop + self.area)
        return self._opened(np.asarray(self.source[lo:hi]))[start - lo : stop - lo]


def is_lazy(image) -> bool:
    """Whether ``image`` is an array-like other than numpy (dask, zarr, a ``NormalizedView``...), read in parts."""
    return not isinstance(image, np.ndarray) and hasattr(image, "shape") and hasattr(image, "dtype")


_SLAB_PIXELS = 1 << 20  # 8 MiB of histogram indices per slab


def slab_bounds(shape) -> list[tuple[int, int]]:
    """``(start, stop)`` along the first axis of the slabs of an array of ``shape`` (about ``_SLAB_PIXELS`` pixels
    each, at least one plane)."""
    step = max(1, _SLAB_PIXELS // max(1, math.prod(tuple(shape)[1:])))
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def slabs(values):
    """An array (numpy, memory map or lazy) read as numpy arrays, a slab of the first axis (about
    ``_SLAB_PIXELS`` pixels) at a time."""
    for start, stop in slab_bounds(values.shape):
        yield np.asarray(values[start:stop])


_PART_SLABS = 2  # a part of a chunked array holds at most this many slabs' pixels (a 128³ chunk is 2 slabs)


def chunk_shape(values) -> tuple[int, ...] | None:
    """The chunk shape of a chunked array (zarr: ``chunks``; dask: the first chunk's size on each axis), None for
    other arrays."""
    chunks = getattr(values, "chunks", None)
    if chunks is None or len(chunks) != len(tuple(values.shape)):
        return None
    sizes = tuple(int(c[0]) if isinstance(c, tuple) else int(c) for c in chunks)
    return sizes if all(s > 0 for s in sizes) else None


def part_bounds(values) -> list[tuple[slice, ...]]:
    """Index tuples that cover ``values`` once, as :func:`reduce_slabs` reads it: for a chunked array of two or more
    axes (:func:`chunk_shape`), blocks of whole chunks of at most ``_PART_SLABS`` slabs' pixels (grown along the last
    axes first), so that every chunk is read and decompressed once, not once per plane (a chunk larger than that:
    in planes of it); otherwise the slabs of :func:`slab_bounds`."""
    shape = tuple(int(n) for n in values.shape)
    chunks = chunk_shape(values)
    if chunks is None or len(shape) < 2:
        return [(slice(a, b),) for a, b in slab_bounds(shape)]
    budget = _PART_SLABS * _SLAB_PIXELS
    block = [min(c, n) for c, n in zip(chunks, shape)]
    if math.prod(block) > budget:  # chunks larger than a part: planes of them along the first axis
        block[0] = max(1, budget // math.prod(block[1:]))
    unit = list(block)  # what a part grows by: whole chunks (planes of one, where a chunk is larger than a part)
    for axis in reversed(range(len(shape))):
        fits = budget // (math.prod(block) // block[axis])
        block[axis] = max(block[axis], min(shape[axis], fits // unit[axis] * unit[axis]))
    starts = itertools.product(*(range(0, n, b) for n, b in zip(shape, block)))
    return [tuple(slice(o, min(o + b, n)) for o, b, n in zip(origin, block, shape)) for origin in starts]


def reduce_slabs(function, combine, values, mapper=None):
    """``function(values, bounds)`` of every part of ``values`` (:func:`part_bounds`: index tuples) combined with
    ``combine(a, b)`` (associative and commutative: histograms are added, extremes widened). ``mapper``, when given,
    is called as ``mapper(function, combine, values, bounds)`` and returns the combined result computed elsewhere
    (``distributed_predict.ClusterSlabs``: on a Dask cluster's workers); ``function``, ``combine`` and ``values``
    are then pickled. None: here, one part after another."""
    bounds = part_bounds(values)
    if mapper is not None:
        return mapper(function, combine, values, bounds)
    return functools.reduce(combine, (function(values, b) for b in bounds))


def _slab_counts(values, bounds: tuple[slice, ...], offset: int, size: int) -> np.ndarray:
    """Histogram (one bin per integer value, from ``offset``) of one part of an integer array, counted
    ``_SLAB_PIXELS`` at a time (the int64 indices of a whole part would take 8 bytes a pixel)."""
    flat = np.asarray(values[bounds]).ravel()
    counts = np.zeros(size, np.int64)
    for start in range(0, flat.size, _SLAB_PIXELS):
        indices = flat[start : start + _SLAB_PIXELS].astype(np.int64)
        indices -= offset
        counts += np.bincount(indices, minlength=size)
    return counts


def _histogram_percentiles(
    values,
    low: float,
    high: float,
    mapper=None,
    exclude: int | None = None,
    scale: tuple[float, float] | None = None,
    clipped: int | None = None,
    report: bool = False,
) -> tuple:
    """Exact linear-interpolation percentiles (``np.percentile``'s) of an 8/16-bit integer lazy array,
    from a histogram accumulated over slabs of the first axis (:func:`reduce_slabs`, through ``mapper`` where
    given). ``exclude``: a value left out (not counted); ``scale``: ``(lo, step)``, the values stand for
    ``value * step + lo`` (opened levels, :func:`_opened_percentiles`); ``clipped``: a value (the image's maximum)
    left out when it is the largest counted and other values are counted too; (0, 1) when
    nothing is counted. ``report``: a third value says whether ``clipped`` was left out."""
    dtype = np.dtype(values.dtype)
    offset = int(np.iinfo(dtype).min)
    count = functools.partial(_slab_counts, offset=offset, size=1 << (8 * dtype.itemsize))
    counts = reduce_slabs(count, np.add, values, mapper)
    if exclude is not None:
        counts[exclude - offset] = 0
    left_out = (
        clipped is not None
        and counts.any()
        and int(np.flatnonzero(counts)[-1]) == clipped - offset
        and int(counts[clipped - offset]) < int(counts.sum())
    )
    if left_out:
        counts[clipped - offset] = 0
    cumulative = np.cumsum(counts)
    last = int(cumulative[-1]) - 1
    if last < 0:
        return (0.0, 1.0, False) if report else (0.0, 1.0)
    lo, step = scale or (0.0, 1.0)

    def order_statistic(k: int) -> float:
        value = int(np.searchsorted(cumulative, k, side="right") + offset)
        return float(value) if scale is None else float(np.float64(value) * step + lo)

    result = []
    for q in (low, high):
        position = q / 100.0 * last
        below = math.floor(position)
        a, b = order_statistic(below), order_statistic(min(below + 1, last))
        result.append(float(np.percentile([a, b], 100.0 * (position - below))))  # numpy's own interpolation
    return (result[0], result[1], bool(left_out)) if report else (result[0], result[1])


_SELECTION_BINS = 1 << 12  # bins of each narrowing pass of _selected_percentiles
_SELECTION_KEEP = 1 << 20  # values _selected_percentiles may hold at once (8 MiB of float64)


def _finite_slabs(values):
    """The finite values of a lazy array as float64 vectors, one slab at a time."""
    for slab in slabs(values):
        slab = slab.astype(np.float64).ravel()
        yield slab[np.isfinite(slab)]


class _RankSearch:
    """Finds order statistics (0-based ranks) of the finite values of a lazy array by histogram narrowing:
    each pass splits the values still in play into ``_SELECTION_BINS`` ordered bins of equal width and keeps the
    bin holding the ranks, until the values left fit in memory (then they are sorted) or are all equal. Ranks
    that fall in different bins continue as separate searches. A value's bin at every level is recomputed from
    the same arithmetic, so which values are in play never depends on rounded bin edges."""

    def __init__(self, ranks: list[int], origin: float, per_unit: float, below: int = 0, chain: tuple = ()):
        self.ranks, self.below = ranks, below  # below: how many values rank before those in play
        self.origin, self.per_unit = origin, per_unit  # bin = floor((value - origin) * per_unit)
        self.chain = chain  # (origin, per_unit, bin kept) of the earlier passes

    @staticmethod
    def _bins(values: np.ndarray, origin: float, per_unit: float) -> np.ndarray:
        # Monotone in the value (a subtraction, a positive scale, a floor), so the bins are ordered.
        return np.clip(np.floor((values - origin) * per_unit), 0, _SELECTION_BINS - 1).astype(np.intp)

    def start_pass(self) -> None:
        self.counts = np.zeros(_SELECTION_BINS, np.int64)
        self.kept: list[np.ndarray] | None = []
        self.held, self.smallest, self.largest = 0, math.inf, -math.inf

    def add(self, finite: np.ndarray) -> None:
        for origin, per_unit, kept_bin in self.chain:
            finite = finite[self._bins(finite, origin, per_unit) == kept_bin]
        if finite.size == 0:
            return
        self.counts += np.bincount(self._bins(finite, self.origin, self.per_unit), minlength=_SELECTION_BINS)
        self.smallest, self.largest = min(self.smallest, finite.min()), max(self.largest, finite.max())
        self.held += finite.size
        if self.kept is not None:
            self.kept = self.kept + [finite] if self.held <= _SELECTION_KEEP else None

    def end_pass(self, found: dict[int, float]) -> list[_RankSearch]:
        """Record the ranks this pass resolved in ``found``; return the searches that go on."""
        within = [rank - self.below for rank in self.ranks]
        if self.kept is not None:
            ordered = np.partition(np.concatenate(self.kept), within)
            found.update({rank: float(ordered[w]) for rank, w in zip(self.ranks, within)})
            return []
        if self.smallest == self.largest:
            found.update(dict.fromkeys(self.ranks, float(self.smallest)))
            return []
        cumulative = np.cumsum(self.counts)
        by_bin: dict[int, list[int]] = {}
        for rank, w in zip(self.ranks, within):
            by_bin.setdefault(int(np.searchsorted(cumulative, w, side="right")), []).append(rank)
        return [
            _RankSearch(
                ranks,
                self.origin + kept_bin / self.per_unit,
                self.per_unit * _SELECTION_BINS,
                self.below + (int(cumulative[kept_bin - 1]) if kept_bin else 0),
                self.chain + ((self.origin, self.per_unit, kept_bin),),
            )
            for kept_bin, ranks in by_bin.items()
        ]


def _selected_percentiles(values, low: float, high: float) -> tuple[float, float]:
    """Exact ``np.percentile`` (linear interpolation, NaN/Inf ignored) of a lazy array of any real type, with
    bounded memory: one pass counts the finite values and finds their range, then the needed order statistics
    are selected by histogram narrowing (:class:`_RankSearch`; two more passes for most images)."""
    count, smallest, largest = 0, math.inf, -math.inf
    for finite in _finite_slabs(values):
        if finite.size:
            count += finite.size
            smallest, largest = min(smallest, finite.min()), max(largest, finite.max())
    if count == 0:
        return 0.0, 1.0
    last = count - 1
    positions = [q / 100.0 * last for q in (low, high)]
    ranks = sorted({r for p in positions for r in (math.floor(p), min(math.floor(p) + 1, last))})
    per_unit = _SELECTION_BINS / (largest - smallest) if largest > smallest else 0.0
    searches, found = [_RankSearch(ranks, float(smallest), per_unit)], {}
    while searches:
        for search in searches:
            search.start_pass()
        for finite in _finite_slabs(values):
            for search in searches:
                search.add(finite)
        searches = [after for search in searches for after in search.end_pass(found)]
    result = []
    for position in positions:
        below = math.floor(position)
        a, b = found[below], found[min(below + 1, last)]
        result.append(float(np.percentile([a, b], 100.0 * (position - below))))  # numpy's own interpolation
    return result[0], result[1]


def _finite_percentiles(values, low: float, high: float, mapper=None) -> tuple[float, float]:
    """The ``low`` and ``high`` percentiles of the finite values: of a lazy 8/16-bit integer array from its histogram
    (through ``mapper`` where given), of another lazy array by streamed exact selection here (``mapper`` unused),
    of a numpy array by ``np.percentile``."""
    dtype = np.dtype(values.dtype)
    if np.issubdtype(dtype, np.complexfloating):
        raise ValueError("complex images are not supported")
    if is_lazy(values):
        if np.issubdtype(dtype, np.integer) and dtype.itemsize <= 2:
            return _histogram_percentiles(values, low, high, mapper)
        return _selected_percentiles(values, low, high)
    values = np.asarray(values).ravel()
    if np.issubdtype(values.dtype, np.floating):
        finite = np.isfinite(values)
        if not finite.all():
            values = values[finite]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [low, high])
    return float(lo), float(hi)


def normalize(image, params: dict, key=None) -> np.ndarray:
    """Apply normalization parameters; returns a new float32 array of the image's shape.

    ``key``: where ``image`` lies in the image the parameters are of (``image = whole[key]``, ints and slices),
    needed only by parameters with background fields (:func:`napari_unet.background.field_like`; None: the whole
    image, or a part that keeps the whole plane, e.g. one slice of a stack).

    ``params`` comes from :func:`percentile_params` or :func:`robust_params` (or is a "fixed" recipe: maps
    ``low_values`` to 0 and ``high_values`` to 1, no clipping; a channel with ``high == low`` is only shifted) or is
    ``{"method": "none"}`` (a float32 copy). Pixels that are not finite afterwards become 0; the scaled methods hold
    the others within +/-``NORMALIZED_LIMIT``.
    """
    method = params.get("method", "percentile")
    if method == "none":
        out = np.array(image, dtype=np.float32, copy=True)
    elif method in ("percentile", "robust", "fixed"):
        image = np.asarray(image)
        if params.get("background"):
            from .background import subtract_fields

            ndim = params.get("ndim", image.ndim) if key is not None else image.ndim
            image = subtract_fields(image, params["background"], params.get("channel_axis"), ndim, key)
        lo = np.asarray(params["low_values"], dtype=np.float64)
        hi = np.asarray(params["high_values"], dtype=np.float64)
        scale = np.divide(1.0, hi - lo, out=np.ones_like(lo), where=hi > lo)
        channel_axis = params.get("channel_axis")
        if channel_axis is not None:
            if image.shape[channel_axis] != lo.size:
                raise ValueError(
                    f"normalization parameters are for {lo.size} channels, "
                    f"the image has {image.shape[channel_axis]} along axis {channel_axis}"
                )
            shape = [1] * image.ndim
            shape[channel_axis] = lo.size
            lo, scale = lo.reshape(shape), scale.reshape(shape)
        elif lo.size != 1:
            raise ValueError("per-channel normalization parameters need a channel_axis")
        else:
            lo, scale = lo.reshape(()), scale.reshape(())
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite results become 0 below
            out = np.subtract(image, lo.astype(np.float32), dtype=np.float32)
            out *= scale.astype(np.float32)
    else:
        raise ValueError(f"unknown normalization method {method!r}; expected one of {METHODS}")
    out[~np.isfinite(out)] = 0.0
    if method != "none":
        np.clip(out, -NORMALIZED_LIMIT, NORMALIZED_LIMIT, out=out)
    return out


def image_params(image, recipe: dict | None = None, channel_axis=None, mapper=None) -> dict:
    """The normalization parameters of ``image`` under a model's recipe (see :func:`normalize_image`); ``mapper``:
    where the slabs of a lazy image are counted (:func:`reduce_slabs`)."""
    recipe = DEFAULT_RECIPE if recipe is None else recipe
    method = recipe.get("method", "percentile")
    if method == "none":
        return {"method": "none"}
    grid = recipe.get("background_grid", 0)
    if grid:
        return _background_params(image, recipe, grid, channel_axis, mapper)
    if method == "fixed":
        return {**recipe, "channel_axis": None if channel_axis is None else channel_axis % len(image.shape)}
    low, high = recipe.get("low", DEFAULT_RECIPE["low"]), recipe.get("high", DEFAULT_RECIPE["high"])
    if method == "percentile":
        return percentile_params(image, low=low, high=high, channel_axis=channel_axis, mapper=mapper)
    if method in ("robust", "dataset"):  # "dataset" before training has fixed it: each image its own robust values
        return robust_params(image, low, high, recipe.get("speck_area", SPECK_AREA), channel_axis, mapper)
    raise ValueError(f"unknown normalization method {method!r}; expected one of {METHODS}")


def _background_params(image, recipe: dict, grid: int, channel_axis, mapper) -> dict:
    """:func:`image_params` of a recipe with ``background_grid``: each channel's background field
    (:func:`napari_unet.background.estimate_field`, its ``low`` percentile per cell), then the recipe's
    parameters of the image less its fields; the fields go with them (``"background"``, one per channel), for
    :func:`normalize` to subtract."""
    from .background import FlattenedView, estimate_field, subtract_fields, with_top

    ndim = len(image.shape)
    if channel_axis is not None:
        channel_axis %= ndim
    if ndim - (channel_axis is not None) < 2:
        raise ValueError("a background field needs an image of at least two spatial axes")
    lazy = is_lazy(image)
    source = image if lazy else np.asarray(image)
    low = recipe.get("low", DEFAULT_RECIPE["low"])
    fields = [
        with_top(estimate_field(channel, grid, low), _extremes(channel, mapper)[1])
        for channel in _channels(source, channel_axis)
    ]
    if lazy:
        flattened = FlattenedView(source, fields, channel_axis)
    else:
        flattened = subtract_fields(source, fields, channel_axis, ndim)
    params = image_params(flattened, {**recipe, "background_grid": 0}, channel_axis, mapper)
    return {**params, "background_grid": grid, "background": fields, "ndim": ndim}


def dataset_recipe(images, recipe: dict, channel_axis=None) -> dict:
    """The "fixed" recipe a "dataset" recipe becomes once its training images are known: the median over
    ``images`` of their robust low and high values (:func:`robust_params`), then applied unchanged to every image
    predicted. For acquisitions known to be alike (same exposure and gain): it follows no per-image change at all,
    neither an artifact's nor a real change of brightness."""
    per_image = [image_params(image, {**recipe, "method": "robust"}, channel_axis) for image in images]
    return {
        "method": "fixed",
        "from": "dataset",
        "low": recipe.get("low", DEFAULT_RECIPE["low"]),
        "high": recipe.get("high", DEFAULT_RECIPE["high"]),
        "speck_area": recipe.get("speck_area", SPECK_AREA),
        "background_grid": recipe.get("background_grid", 0),
        "low_values": np.median([p["low_values"] for p in per_image], axis=0).tolist(),
        "high_values": np.median([p["high_values"] for p in per_image], axis=0).tolist(),
    }


def normalize_image(image, recipe: dict | None = None, channel_axis=None) -> np.ndarray:
    """Normalize a whole image with a model's normalization recipe (float32 result).

    ``recipe`` is a model's stored ``normalization`` metadata (``DEFAULT_RECIPE`` when None):
    ``{"method": "percentile", "low": ..., "high": ...}`` computes fresh percentiles on this
    image (any stored ``low_values``/``high_values`` are ignored), ``"robust"`` the same with the upper one taken
    without small bright artifacts (:func:`robust_params`), ``"fixed"`` applies its stored values to every image
    (what a ``"dataset"`` recipe becomes in training, :func:`dataset_recipe`), ``{"method": "none"}``
    only converts to float32. Non-finite pixels become 0.
    """
    return normalize(image, image_params(image, recipe, channel_axis))


class NormalizedView:
    """Read-only lazy normalized image: ``view[key]`` is ``normalize(source[key], params)`` (float32).

    With per-channel ``params`` the channels must be the first axis and every key must keep all of them
    (start with ``slice(None)``), as :func:`napari_unet.tiling.predict_tiled` reads multi-channel tiles.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, source, params: dict):
        if params.get("channel_axis") not in (None, 0):
            raise ValueError("a NormalizedView needs the channels first (channel_axis 0)")
        self.source, self.params = source, params
        self.shape = tuple(source.shape)
        self.ndim = len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        if self.params.get("channel_axis") == 0:
            first = key[0] if isinstance(key, tuple) and key else key
            if not (isinstance(first, slice) and first == slice(None)):
                raise IndexError("a per-channel NormalizedView is read with all channels (key starting with ':')")
        return normalize(np.asarray(self.source[key]), self.params, key if self.params.get("background") else None)


def normalized_view(image, recipe: dict | None = None, channel_axis=None) -> NormalizedView:
    """:func:`normalize_image` for images larger than memory: the parameters are computed now (streaming
    for 8/16-bit integers), the normalization when a part of the returned view is read."""
    return NormalizedView(image, image_params(image, recipe, channel_axis))


def check_recipe(recipe, channels: int | None = None) -> None:
    """ValueError unless ``recipe`` is a normalization recipe this module applies: a known method, percentiles
    ``0 <= low < high <= 100``, an integer ``speck_area`` from 0 to :data:`MAX_SPECK_AREA`, and for "fixed" finite
    ``low_values``/``high_values`` (one per channel when ``channels`` is given). For recipes from outside (a model
    file, settings): checked before any image is read."""

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not isinstance(recipe, dict):
        raise ValueError(f"a normalization recipe is an object (dict), got {_brief(recipe)}")
    method = recipe.get("method", "percentile")
    if method not in METHODS:
        raise ValueError(f"unknown normalization method {_brief(method)}; expected one of {METHODS}")
    if method == "none":
        return
    low, high = recipe.get("low", DEFAULT_RECIPE["low"]), recipe.get("high", DEFAULT_RECIPE["high"])
    if not (number(low) and number(high) and 0.0 <= low < high <= 100.0):
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got low={_brief(low)}, high={_brief(high)}")
    area = recipe.get("speck_area", SPECK_AREA)
    if not (isinstance(area, int) and not isinstance(area, bool) and 0 <= area <= MAX_SPECK_AREA):
        raise ValueError(f"speck_area must be an integer from 0 to {MAX_SPECK_AREA} (pixels), got {_brief(area)}")
    grid = recipe.get("background_grid", 0)
    if not (isinstance(grid, int) and not isinstance(grid, bool) and 0 <= grid <= MAX_BACKGROUND_GRID):
        raise ValueError(
            f"background_grid must be an integer from 0 to {MAX_BACKGROUND_GRID} (cells), got {_brief(grid)}"
        )
    if method == "fixed":
        for key in ("low_values", "high_values"):
            values = recipe.get(key)
            if not (
                isinstance(values, list)
                and values
                and (channels is None or len(values) == channels)
                and all(map(number, values))
            ):
                count = "" if channels is None else f"{channels} "
                raise ValueError(f"{key} of a fixed recipe must be {count}finite number(s), got {_brief(values)}")


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
