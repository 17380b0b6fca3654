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

:func:`refine_probabilities` works band by band along the first spatial axis with a halo of
``2 r`` rows, so arrays larger than memory (memory maps, lazy normalized views) are refined in
bounded memory, with exactly the result of refining the whole array at once.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DEFAULT_RADIUS = 1
DEFAULT_EPS = 0.01
_BAND_PIXELS = 1 << 18  # pixels per band: the band's classes twice, plus ~8 float32 band-sized temporaries


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


def refine_probabilities(
    probabilities,
    image,
    *,
    spatial_ndim: int,
    radius: int = DEFAULT_RADIUS,
    eps: float = DEFAULT_EPS,
    out=None,
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
    radius : int
        Window half-width in pixels (0 returns the probabilities unchanged).
    eps : float
        Regularization on the normalized intensity scale: edges with a local intensity variance
        well below ``eps`` are smoothed over, stronger ones are followed.
    out : array-like, optional
        Where to write ``(n_classes, *spatial)`` float32; may be ``probabilities`` itself (refined in
        place). Default: a new array.
    """
    if radius < 0 or eps <= 0:
        raise ValueError(f"refinement needs radius >= 0 and eps > 0, got radius={radius}, eps={eps}")
    shape = tuple(probabilities.shape)
    spatial = shape[1:]
    if len(spatial) not in (spatial_ndim, spatial_ndim + 1):
        raise ValueError(f"probabilities of shape {shape} do not fit a {spatial_ndim}D model")
    if tuple(image.shape[-len(spatial):]) != spatial or image.ndim not in (len(spatial), len(spatial) + 1):
        raise ValueError(f"image of shape {tuple(image.shape)} does not match probabilities of shape {shape}")
    if out is None:
        out = np.empty(shape, np.float32)
    if radius == 0:
        if out is not probabilities:
            out[...] = probabilities
        return out

    stacked = len(spatial) > spatial_ndim
    sizes = (1,) * stacked + (2 * radius + 1,) * spatial_ndim
    halo = 0 if stacked else 2 * radius  # rows of context each band needs along the banded (first) axis
    rows = spatial[0]
    band = max(halo, 1, _BAND_PIXELS // max(1, int(np.prod(spatial[1:]))))
    channels = image.ndim > len(spatial)
    original_tail = None  # unrefined rows just before the band, when refining in place
    for start in range(0, rows, band):
        stop = min(start + band, rows)
        low, high = max(start - halo, 0), min(stop + halo, rows)
        slab = np.array(probabilities[:, low:high], dtype=np.float32)
        if original_tail is not None and start > low:
            slab[:, : start - low] = original_tail[:, -(start - low):]
        original_tail = slab[:, stop - halo - low : stop - low].copy() if halo else None
        guide = np.asarray(image[:, low:high] if channels else image[low:high], np.float32)
        if channels:
            guide = guide.mean(axis=0)
        refined = guided_filter(guide, slab, radius, eps, sizes)
        np.clip(refined, 0.0, 1.0, out=refined)
        refined /= np.maximum(refined.sum(axis=0, keepdims=True), np.float32(1e-6))
        out[:, start:stop] = refined[:, start - low : stop - low]
    return out

