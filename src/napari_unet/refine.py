"""Edge-aware refinement of class probabilities: the guided filter (pure numpy/scipy).

Sparse strokes never reach a class boundary, so a network trained on them places each boundary
where its own features happen to change, not where the image's edge is (see docs/benchmarks.md:
nuclei boundaries land at one fixed normalized intensity, whatever each nucleus's brightness).
The guided filter of He, Sun and Tang (IEEE TPAMI 2013) fits, in every ``(2r+1)``-wide window,
the probabilities as a linear function of the image, ``p ~ a * I + b``, and averages the fits
of the windows covering each pixel. Where the window holds an edge, the probabilities follow it;
where the image is flat (variance well below ``eps``) they are smoothed. It is linear in the
probabilities, so the refined class maps still sum to 1 (they are clipped to [0, 1] and
renormalised afterwards); a structure thinner than the window can be thinned by it.

Why own code: the filter is a few box means (``scipy.ndimage.uniform_filter``); the implementations in libraries
(OpenCV's ``ximgproc.guidedFilter``, scikit-image has none) filter one whole 2D array with one guide and cannot work
band by band on a memory-mapped probability map of any size and class count with exactly the whole-array result.

The window therefore has to fit the structures: :func:`auto_radius` (the default, ``radius="auto"``) measures
the width of the thinnest class's structures in the network's own argmax (pixels across at each skeleton
point, median) and takes the widest window that covers at most about half of it, ``2 r + 1 <= (width + 1) / 2``,
between 1 and 3 pixels: thin membranes (~5 px) keep radius 1, nuclei 15 px across get 3.

:func:`refine_probabilities` works band by band along the first spatial axis with a halo of
``2 r`` rows, so arrays larger than memory (memory maps, lazy normalized views) are refined in
bounded memory, with exactly the result of refining the whole array at once.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

AUTO = "auto"
DEFAULT_RADIUS = AUTO
DEFAULT_EPS = 0.01
MAX_AUTO_RADIUS = 3  # wider windows also smooth real detail away; on validation images 4 gained nothing over 3
_BAND_PIXELS = 1 << 18  # pixels per band: the band's classes twice, plus ~8 float32 band-sized temporaries
_SAMPLE_PIXELS = 1 << 22  # pixels (voxels: half as many) of the argmax that structure_width measures


def sample_crops(spatial: tuple[int, ...], spatial_ndim: int) -> list[tuple[slice, ...]]:
    """Index tuples of the spatial axes that :func:`structure_width` reads: a centred crop of at most
    ``_SAMPLE_PIXELS`` (2D) or half as many voxels (3D); in a stack (one axis more than the model's), up to 4
    evenly spaced slices, each cropped to a quarter of it."""
    stacked = len(spatial) > spatial_ndim
    plane = spatial[stacked:]
    budget = _SAMPLE_PIXELS // (4 if stacked else 1) // (2 if spatial_ndim == 3 else 1)
    side = round(budget ** (1.0 / spatial_ndim))
    crop = tuple(slice(max(0, (n - side) // 2), max(0, (n - side) // 2) + min(n, side)) for n in plane)
    if not stacked:
        return [crop]
    slices = np.unique(np.linspace(0, spatial[0] - 1, min(4, spatial[0])).round().astype(int))
    return [(int(z), *crop) for z in slices]


def structure_width(probabilities, spatial_ndim: int) -> float | None:
    """Median width in pixels of the thinnest class's structures in the argmax of ``probabilities``.

    ``probabilities`` is ``(n_classes, *spatial)`` as :func:`refine_probabilities` takes it. Per class, the
    width at each point of the class's skeleton is ``2 d - 1`` pixels, ``d`` its distance to the nearest pixel
    of another class; the class's width is the median over its skeleton points whose inscribed ball lies inside
    the sample, and the smallest class width is returned. Measured on a bounded sample (a centred crop; a few slices
    of a stack), so it costs the same for any image size. None when nothing can be measured (e.g. one class everywhere).
    In 3D the skeleton of a ball is a short segment off its centre, so balls read about 2 voxels narrow: the
    radius errs on the narrow side.
    """
    spatial = tuple(probabilities.shape[1:])
    crops = sample_crops(spatial, spatial_ndim)
    return samples_width(np.asarray(probabilities[(slice(None), *crop)]) for crop in crops)


def samples_width(samples) -> float | None:
    """:func:`structure_width` of the probabilities of its sample crops (:func:`sample_crops`, in order), however
    they were computed (``blockwise.resolve_radius`` predicts just those crops of a volume)."""
    from skimage.morphology import skeletonize

    widths: dict[int, list[np.ndarray]] = {}
    for sample in samples:
        classes = sample.argmax(axis=0)
        # a skeleton point counts only where its inscribed ball, and a pixel more, fits in the sample: a
        # structure cut by the sample's edge (the crop's or the image's) has its skeleton next to that edge
        room = np.full(classes.shape, np.inf)
        for axis, n in enumerate(classes.shape):
            index = np.arange(n).reshape([-1 if a == axis else 1 for a in range(classes.ndim)])
            room = np.minimum(room, np.minimum(index + 1, n - index))
        for c in np.unique(classes):
            mask = classes == c
            if mask.all():
                continue
            distance = ndimage.distance_transform_edt(mask)
            points = skeletonize(mask) & (distance + 1 < room)
            if points.any():
                widths.setdefault(int(c), []).append(2 * distance[points] - 1)
    if not widths:
        return None
    return float(min(np.median(np.concatenate(w)) for w in widths.values()))


def auto_radius(probabilities, spatial_ndim: int) -> int:
    """The guided-filter radius that fits the structures of ``probabilities``: the largest ``r`` whose window
    ``2 r + 1`` is at most ``(w + 1) / 2`` for the width ``w`` of :func:`structure_width`, i.e.
    ``(w - 1) // 4``, clipped to 1..``MAX_AUTO_RADIUS`` (1 when no width can be measured)."""
    return radius_for_width(structure_width(probabilities, spatial_ndim))


def radius_for_width(width: float | None) -> int:
    """:func:`auto_radius` of a measured structure width (None: nothing measured, radius 1)."""
    if width is None:
        return 1
    return int(np.clip(np.floor((width - 1) / 4), 1, MAX_AUTO_RADIUS))


def guided_filter(guide: np.ndarray, sources: np.ndarray, radius: int, eps: float, sizes=None) -> np.ndarray:
    """Guided filter of each map in ``sources`` (``(n, *guide.shape)``) with ``guide``, windows ``2 radius + 1`` wide.

    ``sizes`` overrides the window size per axis (1 leaves an axis unfiltered, e.g. the slice axis of a
    stack). Borders are mirrored (``scipy.ndimage`` "reflect"). Returns float32 ``(n, *guide.shape)``.
    """
    size = tuple(sizes) if sizes is not None else (2 * radius + 1,) * guide.ndim

    def mean(a):
        return ndimage.uniform_filter(a, size, mode="reflect")

    guide = np.asarray(guide, np.float32)
    mean_i = mean(guide)
    inverse_variance = 1.0 / (mean(guide * guide) - mean_i * mean_i + np.float32(eps))
    result = np.empty((len(sources), *guide.shape), np.float32)
    for source, target in zip(sources, result):  # one map at a time: a few guide-sized temporaries
        source = np.asarray(source, np.float32)
        mean_p = mean(source)
        a = (mean(guide * source) - mean_i * mean_p) * inverse_variance
        target[...] = mean(a) * guide + mean(mean_p - a * mean_i)
    return result


def band_rows(spatial: tuple[int, ...], radius: int, spatial_ndim: int) -> tuple[int, int]:
    """``(rows, halo)``: how :func:`refine_probabilities` cuts ``spatial`` (the first axis) into bands of about
    ``_BAND_PIXELS`` pixels, each read with ``halo`` rows of context on either side (none in a stack, refined slice
    by slice)."""
    halo = 0 if len(spatial) > spatial_ndim else 2 * radius
    return max(halo, 1, _BAND_PIXELS // max(1, int(np.prod(spatial[1:])))), halo


def refine_probabilities(
    probabilities,
    image,
    *,
    spatial_ndim: int,
    radius: int = DEFAULT_RADIUS,
    eps: float = DEFAULT_EPS,
    out=None,
    should_stop=None,
):
    """Snap class probabilities to the image's edges with a guided filter; returns ``out``.

    Parameters
    ----------
    probabilities : array-like
        ``(n_classes, *spatial)`` softmax probabilities (numpy array, memory map...).
    image : array-like
        The normalized image the probabilities were predicted from: ``(*spatial)``, or
        ``(channels, *spatial)`` (their mean is the guide). A :class:`~napari_unet.normalization.NormalizedView`
        is read band by band.
    spatial_ndim : int
        The model's ``ndim``: the windows span the last ``spatial_ndim`` axes; a leading stack axis
        (a 2D model over a stack) is refined slice by slice.
    radius : int or "auto"
        Window half-width in pixels (0 returns the probabilities unchanged); "auto": :func:`auto_radius`.
    eps : float
        Regularization on the normalized intensity scale: edges with a local intensity variance
        well below ``eps`` are smoothed over, stronger ones are followed.
    out : array-like, optional
        Where to write ``(n_classes, *spatial)`` float32; may be ``probabilities`` itself (refined in
        place). Default: a new array.
    should_stop : callable, optional
        Polled before every band; when it returns True, ``tiling.PredictionStopped`` is raised (``out`` is then
        partly refined).
    """
    if (radius != AUTO and not (isinstance(radius, (int, np.integer)) and radius >= 0)) or eps <= 0:
        raise ValueError(f"refinement needs radius >= 0 (or 'auto') and eps > 0, got radius={radius}, eps={eps}")
    shape = tuple(probabilities.shape)
    spatial = shape[1:]
    if len(spatial) not in (spatial_ndim, spatial_ndim + 1):
        raise ValueError(f"probabilities of shape {shape} do not fit a {spatial_ndim}D model")
    if tuple(image.shape[-len(spatial) :]) != spatial or image.ndim not in (len(spatial), len(spatial) + 1):
        raise ValueError(f"image of shape {tuple(image.shape)} does not match probabilities of shape {shape}")
    if radius == AUTO:
        radius = auto_radius(probabilities, spatial_ndim)
    if out is None:
        out = np.empty(shape, np.float32)
    if radius == 0:
        if out is not probabilities:
            out[...] = probabilities
        return out

    stacked = len(spatial) > spatial_ndim
    sizes = (1,) * stacked + (2 * radius + 1,) * spatial_ndim
    band, halo = band_rows(spatial, radius, spatial_ndim)  # halo: context rows each band needs along the first axis
    rows = spatial[0]
    channels = image.ndim > len(spatial)
    original_tail = None  # unrefined rows just before the band, when refining in place
    for start in range(0, rows, band):
        if should_stop is not None and should_stop():
            from .tiling import PredictionStopped

            raise PredictionStopped(f"prediction stopped during the edge refinement, at row {start} of {rows}")
        stop = min(start + band, rows)
        low, high = max(start - halo, 0), min(stop + halo, rows)
        slab = np.array(probabilities[:, low:high], dtype=np.float32)
        if original_tail is not None and start > low:
            slab[:, : start - low] = original_tail[:, -(start - low) :]
        original_tail = slab[:, stop - halo - low : stop - low].copy() if halo else None
        guide = np.asarray(image[:, low:high] if channels else image[low:high], np.float32)
        if channels:
            guide = guide.mean(axis=0)
        refined = guided_filter(guide, slab, radius, eps, sizes)
        np.clip(refined, 0.0, 1.0, out=refined)
        refined /= np.maximum(refined.sum(axis=0, keepdims=True), np.float32(1e-6))
        out[:, start:stop] = refined[:, start - low : stop - low]
    return out
