"""A smooth background field of an image, for normalizations that subtract it (pure numpy).

The field is what an uneven illumination or a haze adds to every pixel of a plane: a grid of ``gy x gx`` cells over
the plane (the last two spatial axes; each cell spans every plane of a stack), each cell's value the ``low``
percentile of its finite pixels (the dim end of the cell, its background wherever objects leave some of it
uncovered), interpolated linearly between the cells' centres (and extrapolated beyond the outermost ones, to the
border, within the range of the cells' values). A ramp or a vignette across the field of view becomes a field that
follows it; objects smaller than a cell do not.

Why not rolling-ball (ImageJ's "Subtract Background", ``skimage.restoration.rolling_ball``) or a large grey
opening: their radius must exceed the largest object, a property of the data that a model trained on one image
cannot know for the next, and their cost grows with it; a grid tied to the field of view needs no object scale
(only that objects are smaller than a cell) and is estimated from a subsample. Why linear and not a spline: the
field of any window (a tile, a block on a cluster) is then exactly the same numbers as that window of the
whole-image field (:func:`field_window`), which keeps tiled, lazy and distributed predictions identical to a
whole-image one.

Estimation reads a deterministic subsample (every ``stride``-th pixel on every axis, at most about
``SAMPLE_PIXELS`` pixels), the same for an array in memory and a lazy one, so both give the same field.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLE_PIXELS = 1 << 22
"""At most about this many pixels per channel are read to estimate a field."""


def _stride(shape: tuple[int, ...]) -> int:
    """The sampling stride (every axis alike) that reads at most about ``SAMPLE_PIXELS`` of ``shape``."""
    return max(1, math.ceil((math.prod(shape) / SAMPLE_PIXELS) ** (1.0 / len(shape))))


def _subsample(values, stride: int) -> np.ndarray:
    """``values[::stride, ::stride, ...]`` as a numpy array; a lazy array is read a plane (3D or more) or a band of
    rows (2D) at a time, so that no more than one such part is in memory beside the subsample."""
    every = (slice(None, None, stride),) * (len(values.shape) - 1)
    if isinstance(values, np.ndarray):
        return values[(slice(None, None, stride), *every)]
    if len(values.shape) >= 3:
        return np.stack([np.asarray(values[z])[every] for z in range(0, values.shape[0], stride)])
    band = max(stride, (1 << 20) // max(1, values.shape[1]) // stride * stride)  # whole multiples of the stride
    parts = [np.asarray(values[y : y + band])[::stride, ::stride] for y in range(0, values.shape[0], band)]
    return np.concatenate(parts)


def cell_edges(size: int, cells: int) -> np.ndarray:
    """Edges of ``cells`` (at most ``size``) equal cells along an axis of ``size`` pixels."""
    return np.round(np.linspace(0, size, min(cells, size) + 1)).astype(np.int64)


def estimate_field(values, grid: int, low: float) -> dict:
    """The background field of one channel (any array-like with ``shape``; spatial axes only, at least two):
    ``{"plane": [H, W], "values": [[...], ...]}``, the grid's cell values (``grid`` cells per axis, fewer on an
    axis shorter than that). A cell without a finite pixel takes the mean of the others (0 when none has one)."""
    shape = tuple(int(n) for n in values.shape)
    if len(shape) < 2:
        raise ValueError("a background field needs at least two spatial axes")
    stride = _stride(shape)
    sample = np.asarray(_subsample(values, stride), np.float64)
    rows, cols = cell_edges(shape[-2], grid), cell_edges(shape[-1], grid)
    field = np.full((rows.size - 1, cols.size - 1), np.nan)
    for i in range(field.shape[0]):
        for j in range(field.shape[1]):
            rs = slice(-(-rows[i] // stride), -(-rows[i + 1] // stride))  # sampled rows inside the cell
            cs = slice(-(-cols[j] // stride), -(-cols[j + 1] // stride))
            cell = sample[..., rs, cs]
            cell = cell[np.isfinite(cell)]
            if cell.size:
                field[i, j] = np.percentile(cell, low)
    known = np.isfinite(field)
    field[~known] = field[known].mean() if known.any() else 0.0
    return {"plane": [shape[-2], shape[-1]], "values": field.tolist()}


def _weights(indices: np.ndarray, size: int, cells: int) -> np.ndarray:
    """Linear-interpolation weights ``(len(indices), cells)`` of pixel ``indices`` between the centres of the
    cells of an axis of ``size`` pixels, extrapolated linearly beyond the first and last centre (half a cell: a
    ramp stays a ramp up to the border)."""
    edges = cell_edges(size, cells)
    centres = (edges[:-1] + edges[1:] - 1) / 2.0
    weights = np.zeros((indices.size, centres.size))
    if centres.size == 1:
        weights[:, 0] = 1.0
        return weights
    left = np.clip(np.searchsorted(centres, indices) - 1, 0, centres.size - 2)
    frac = (indices - centres[left]) / (centres[left + 1] - centres[left])
    rows = np.arange(indices.size)
    weights[rows, left] = 1.0 - frac
    weights[rows, left + 1] = frac
    return weights


def field_window(field: dict, rows, cols) -> np.ndarray:
    """The field at pixel ``rows`` x ``cols`` (integer index arrays of the plane, e.g. ``np.arange(y0, y1)``):
    a float64 array ``(len(rows), len(cols))``, bit for bit that part of the whole plane's field (the sums are
    taken term by term in the grid's order, so no pixel's arithmetic depends on the window's size), held within
    the range of the cells' values (the extrapolation to the border would otherwise overshoot it next to a cell much
    darker than its neighbour, and lift the flattened border above anything the image holds)."""
    grid = np.asarray(field["values"], np.float64)
    height, width = field["plane"]
    wy = _weights(np.asarray(rows, np.float64), height, grid.shape[0])
    wx = _weights(np.asarray(cols, np.float64), width, grid.shape[1])
    along = np.zeros((wy.shape[0], grid.shape[1]))
    for k in range(grid.shape[0]):
        along += wy[:, k : k + 1] * grid[k]
    out = np.zeros((wy.shape[0], wx.shape[0]))
    for m in range(grid.shape[1]):
        out += along[:, m : m + 1] * wx[:, m]
    return np.clip(out, grid.min(), grid.max())


def _full_key(key, ndim: int) -> tuple:
    """``key`` (None, an int, a slice or a tuple of them) as one int or slice per axis of an ``ndim``-axis array."""
    key = () if key is None else key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis or k is None for k in key) or len(key) > ndim:
        raise IndexError(f"a background-subtracted image is indexed by ints and slices (at most {ndim}), got {key!r}")
    return tuple(key) + (slice(None),) * (ndim - len(key))


def field_like(array: np.ndarray, fields: list, channel_axis: int | None, ndim: int, key=None) -> np.ndarray:
    """The fields (one per channel) of the part ``image[key]`` of an ``ndim``-axis image (channels on
    ``channel_axis``), shaped to broadcast against ``array`` (that part; ``key`` None: the whole image, or a part
    that keeps every pixel of the plane, e.g. one slice of a stack). The plane is the image's last two axes other
    than the channel axis."""
    plane = [a for a in range(ndim) if a != channel_axis][-2:]
    full = _full_key(key, ndim)
    kept = [a for a in range(ndim) if not isinstance(full[a], (int, np.integer))]
    if key is None:  # the array's own last two non-channel axes are the plane
        own = [a for a in range(array.ndim) if a != channel_axis][-2:]
        if [array.shape[a] for a in own] != list(fields[0]["plane"]):
            raise ValueError(
                f"the background field is of a {tuple(fields[0]['plane'])} plane, the image's is "
                f"{tuple(array.shape[a] for a in own)}"
            )
        positions = {"c": channel_axis, "y": own[0], "x": own[1]}
        rows, cols = np.arange(array.shape[own[0]]), np.arange(array.shape[own[1]])
    else:
        height, width = fields[0]["plane"]
        rows, cols = np.arange(height)[full[plane[0]]], np.arange(width)[full[plane[1]]]
        positions = {
            "c": kept.index(channel_axis) if channel_axis in kept else None,
            "y": kept.index(plane[0]) if plane[0] in kept else None,
            "x": kept.index(plane[1]) if plane[1] in kept else None,
        }
    windows = [field_window(f, np.atleast_1d(rows), np.atleast_1d(cols)) for f in fields]
    if channel_axis is None:
        stacked, axes = windows[0], ["y", "x"]
    else:
        stacked, axes = np.stack(windows), ["c", "y", "x"]
        if positions["c"] is None:  # one channel of the image read (an int on its axis)
            stacked, axes = stacked[full[channel_axis]], ["y", "x"]
    for name, axis in (("y", -2), ("x", -1)):
        if positions[name] is None:
            stacked = np.take(stacked, 0, axis=axis)
            axes.remove(name)
    order = sorted(range(len(axes)), key=lambda i: positions[axes[i]])
    stacked = stacked.transpose(order)
    shape = [1] * array.ndim
    for size, i in zip(stacked.shape, order):
        shape[positions[axes[i]]] = size
    return stacked.reshape(shape)


class FlattenedView:
    """Read-only lazy image minus its background fields: ``view[key]`` is ``source[key]`` (float32) less the
    fields there. What the percentiles of a background-subtracted image are streamed from."""

    dtype = np.dtype(np.float32)

    def __init__(self, source, fields: list, channel_axis: int | None):
        self.source, self.fields, self.channel_axis = source, fields, channel_axis
        self.shape = tuple(source.shape)
        self.ndim = len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        part = np.asarray(self.source[key])
        return subtract_fields(part, self.fields, self.channel_axis, self.ndim, key)


def with_top(field: dict, top: float) -> dict:
    """``field`` with the image's maximum ``top`` and the level its pixels keep once the field is subtracted:
    ``top`` less the field's minimum over the plane (its least cell value: :func:`field_window` holds it within
    their range), so that a saturated plateau stays one plateau at the top of the flattened image."""
    floor = float(np.min(field["values"]))
    return {**field, "top": float(top), "top_level": float(np.float32(top) - np.float32(floor))}


def subtract_fields(array, fields: list, channel_axis: int | None, ndim: int, key=None) -> np.ndarray:
    """``array`` (the part ``image[key]`` of an ``ndim``-axis image, see :func:`field_like`) less its background
    fields, float32. Pixels at the image's maximum (``with_top``) all become its ``top_level`` instead: clipped
    signal says only "this much or more", and the normalization's rule for saturated plateaus
    (``normalization.robust_params``) must still see them as one."""
    array = np.asarray(array)
    with np.errstate(over="ignore", invalid="ignore"):
        field = field_like(array, fields, channel_axis, ndim, key).astype(np.float32)
        out = np.subtract(array, field, dtype=np.float32)
    if all("top" in f for f in fields):
        constant = [{"plane": f["plane"], "values": [[f["top"]]]} for f in fields]
        levels = [{"plane": f["plane"], "values": [[f["top_level"]]]} for f in fields]
        at_top = array >= field_like(array, constant, channel_axis, ndim, key)
        out = np.where(at_top, field_like(array, levels, channel_axis, ndim, key).astype(np.float32), out)
    return out
