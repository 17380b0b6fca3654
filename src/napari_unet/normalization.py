"""Whole-image intensity normalization (pure numpy).

Normalization is computed once over the WHOLE image (per channel when the image has one)
and then applied to every tile, never per tile: per-tile statistics would give each tile a
different intensity scale and produce visible seams.

A model stores a normalization *recipe* in its metadata, e.g.
``{"method": "percentile", "low": 1.0, "high": 99.8}``; :func:`normalize_image` computes the
recipe's parameters on a new image and applies them.

Non-finite pixels: NaN and +/-Inf are ignored when the percentiles are computed, and every
pixel that is not finite after normalization (NaN/Inf input, or float32 overflow) is set to 0,
so a few bad pixels neither shift the intensity scale nor poison the prediction.
"""

from __future__ import annotations

import numpy as np

DEFAULT_RECIPE = {"method": "percentile", "low": 1.0, "high": 99.8}
METHODS = ("percentile", "none")


def percentile_params(image, low=1.0, high=99.8, channel_axis=None) -> dict:
    """Percentile normalization parameters of a whole image.

    Parameters
    ----------
    image : array-like
        The whole image, any shape, integer or float.
    low, high : float
        Percentiles (0-100) that :func:`normalize` maps to 0 and 1.
    channel_axis : int, optional
        When given, percentiles are computed separately for each channel along this axis.

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
    image = np.asarray(image)
    if image.size == 0:
        raise ValueError("cannot compute normalization parameters of an empty image")
    if channel_axis is None:
        channels = [image]
    else:
        channel_axis = channel_axis % image.ndim
        channels = [np.take(image, c, axis=channel_axis) for c in range(image.shape[channel_axis])]
    low_values, high_values = [], []
    for channel in channels:
        lo, hi = _finite_percentiles(channel, low, high)
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


def _finite_percentiles(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    values = values.ravel()
    if np.issubdtype(values.dtype, np.complexfloating):
        raise ValueError("complex images are not supported")
    if np.issubdtype(values.dtype, np.floating):
        finite = np.isfinite(values)
        if not finite.all():
            values = values[finite]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [low, high])
    return float(lo), float(hi)


def normalize(image, params: dict) -> np.ndarray:
    """Apply normalization parameters; returns a new float32 array of the image's shape.

    ``params`` comes from :func:`percentile_params` (maps ``low_values`` to 0 and
    ``high_values`` to 1, no clipping; a channel with ``high == low`` is only shifted) or is
    ``{"method": "none"}`` (a float32 copy). Pixels that are not finite afterwards become 0.
    """
    method = params.get("method", "percentile")
    if method == "none":
        out = np.array(image, dtype=np.float32, copy=True)
    elif method == "percentile":
        image = np.asarray(image)
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
    return out


def normalize_image(image, recipe: dict | None = None, channel_axis=None) -> np.ndarray:
    """Normalize a whole image with a model's normalization recipe (float32 result).

    ``recipe`` is a model's stored ``normalization`` metadata (``DEFAULT_RECIPE`` when None):
    ``{"method": "percentile", "low": ..., "high": ...}`` computes fresh percentiles on this
    image (any stored ``low_values``/``high_values`` are ignored), ``{"method": "none"}``
    only converts to float32. Non-finite pixels become 0.
    """
    recipe = DEFAULT_RECIPE if recipe is None else recipe
    method = recipe.get("method", "percentile")
    if method == "none":
        return normalize(image, recipe)
    if method != "percentile":
        raise ValueError(f"unknown normalization method {method!r}; expected one of {METHODS}")
    params = percentile_params(
        image,
        low=recipe.get("low", DEFAULT_RECIPE["low"]),
        high=recipe.get("high", DEFAULT_RECIPE["high"]),
        channel_axis=channel_axis,
    )
    return normalize(image, params)
