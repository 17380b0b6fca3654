"""napari reader for TIFF files (``.tif``, ``.tiff``, ``.ome.tif``) and OME-Zarr stores (``.zarr`` folders, level 0
of the multiscale image, always lazily: ``ome_zarr_io.open_ome_zarr``), built on :func:`napari_unet.io.read_image`.

What it keeps from the file: the axes (a channel axis becomes one layer per channel, an RGB(A) uint8
image an RGB layer; the spatial axes name the layer's ``axis_labels``, e.g. ``("z", "y", "x")``), and the pixel
size as the layer's ``scale``, with the file's unit as its ``units`` when the file names one that napari (pint)
understands, e.g. ``"um"``; otherwise napari's default, ``pixel``.

Large images open lazily: an image whose pixels take more than ``LAZY_READ_BYTES`` becomes a dask array over
the file (:func:`napari_unet.io.lazy_image`: memory-mapped when uncompressed), so napari reads only the planes it
shows and the widget's Predict / Segment all read tiles as they need them. Labels files are always read into
memory (painting writes into them).

Axes: napari's reader cannot ask how to read an ambiguous file. A stack that a script wrote without axis metadata
(``tifffile.imwrite(path, stack)`` stores 3 or 4 planes as the samples of one RGB page) opens as channel layers
``name [ch0]``...; the U-Net widget's *Channel layers are Z slices* makes them one stack, and *Z slices are channels*
does the opposite (``widgets/data_panel.py``). From a script, ``read_tiff(path, axes="ZYX")`` reads a file with the
axes given (``io.parse_axes``), as the command line's ``--axes`` does.

Labels rule: a file opens as a **Labels** layer when its pixels are integers (or bool) and its file
name contains ``label``, ``mask``, ``seg``, ``annot`` or ``stroke`` (any case), e.g.
``cells_labels.tif``, ``nucleus-mask.tiff``, ``img01_strokes.tif``. Everything else opens as an Image.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")
LAZY_READ_BYTES = 1 << 30
"""Images larger than this (decoded, in bytes) open as lazy views of their file instead of being read."""
LABELS_NAME = re.compile(r"label|mask|seg|annot|stroke", re.IGNORECASE)


def napari_get_reader(path):
    """Return :func:`read_tiff` when ``path`` (or every path of a list) is a TIFF file or an OME-Zarr store, else
    None."""
    from .ome_zarr_io import is_zarr_path

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(str(p).lower().endswith(TIFF_SUFFIXES) or is_zarr_path(p) for p in paths):
        return None
    return read_tiff


def is_labels_file(path, pixels) -> bool:
    """The labels rule: integer (or bool) pixels (an array or its dtype) and a file name matching ``LABELS_NAME``."""
    dtype = np.dtype(getattr(pixels, "dtype", pixels))
    integer = np.issubdtype(dtype, np.integer) or dtype.kind == "b"
    return integer and LABELS_NAME.search(Path(path).name) is not None


def read_tiff(path, axes: str | None = None) -> list[tuple]:
    """Read one or several TIFF files into napari layer data tuples ``(data, kwargs, layer_type)``; with ``axes``
    (e.g. ``"ZYX"``, one letter per axis, ``io.parse_axes``) each file's axes are those instead of what it says."""
    from .io import read_image

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers = []
    for p in paths:
        array, info = read_image(p, lazy=partial(_read_lazily, p), axes=axes)
        name = _layer_name(p)
        kwargs = {"name": name, **layer_geometry(info), "metadata": {"axes": info["axes"], "source": str(p)}}
        channel_axis = info["channel_axis"]
        if channel_axis is None and is_labels_file(p, array):
            layers.append((array.astype(np.uint8) if array.dtype == bool else array, kwargs, "labels"))
            continue
        if channel_axis is not None:
            if channel_axis == array.ndim - 1 and array.shape[-1] in (3, 4) and array.dtype == np.uint8:
                kwargs["rgb"] = True
            else:
                kwargs["channel_axis"] = channel_axis
                kwargs["name"] = [f"{name} [ch{c}]" for c in range(array.shape[channel_axis])]
        layers.append((array, kwargs, "image"))
    return layers


def layer_geometry(info: dict) -> dict:
    """Layer kwargs from :func:`napari_unet.io.read_image`'s ``info``: ``scale``, ``axis_labels`` (the spatial axes,
    lower case: ``("y", "x")``, ``("z", "y", "x")``) and, when the file names a usable unit, ``units`` (one per
    spatial axis; without it napari's default, ``pixel``)."""
    spatial_axes = info["axes"].replace("C", "")
    kwargs = {"scale": tuple(info["scale"]), "axis_labels": tuple(spatial_axes.lower())}
    unit = _napari_unit(info.get("unit"))
    if unit is not None:
        kwargs["units"] = (unit,) * len(spatial_axes)
    return kwargs


def _read_lazily(path, nbytes: int, dtype) -> bool:
    """``read_image``'s ``lazy`` rule: images over ``LAZY_READ_BYTES`` open as views of the file, labels never;
    OME-Zarr stores always (volumes that outgrow memory live there; labels too, read-only then)."""
    from .ome_zarr_io import is_zarr_path

    if is_zarr_path(path):
        return True
    return nbytes > LAZY_READ_BYTES and not is_labels_file(path, dtype)


def _napari_unit(unit) -> str | None:
    """The file's unit when napari can use it as a pixel size's (a length that pint parses, e.g. ``"um"``, ``"nm"``,
    ``"micron"``, or ``"pixel"``), else None: napari refuses a layer whose units pint does not know, and an unusable
    unit should not stop the file from opening."""
    if not unit or not isinstance(unit, str):
        return None
    import pint

    registry = pint.get_application_registry()
    try:
        parsed = registry.parse_expression(unit)
        usable = isinstance(parsed, pint.Quantity) and (parsed.check("[length]") or parsed.units == registry.pixel)
    except Exception:  # pint raises many kinds on text it cannot parse (UndefinedUnitError, TokenError, ...)
        return None
    return unit if usable else None


def _layer_name(path) -> str:
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
