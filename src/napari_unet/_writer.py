"""napari writers: image and labels layers to TIFF with :func:`napari_unet.io.write_tiff`.

The layer's ``scale`` is stored as the pixel size (ImageJ/tifffile metadata), so
:mod:`napari_unet._reader` reads it back. Labels are read back as Labels layers by the reader's
name rule: save them under a name containing ``label``/``mask``/``seg``/``annot``/``stroke``.
"""

from __future__ import annotations

import numpy as np

from .io import write_tiff


def _tiff_path(path: str) -> str:
    return path if path.lower().endswith((".tif", ".tiff")) else f"{path}.tif"


def write_image(path: str, data, meta: dict) -> list[str]:
    """Write one image layer (grayscale 2D/3D, or RGB(A)) to ``path``; returns the written paths.

    RGB(A) samples are stored as a channel axis before Y, X (``CYX``/``ZCYX``, ImageJ order), so the
    file opens in Fiji and the reader gives one layer per colour channel.
    """
    array = np.asarray(data[0] if meta.get("multiscale") else data)
    rgb = bool(meta.get("rgb"))
    spatial = array.ndim - rgb
    scale = list(meta.get("scale") or [1.0] * spatial)[-spatial:]
    axes = None
    if rgb:
        array = np.moveaxis(array, -1, -3)
        axes = "CYX" if spatial == 2 else "ZCYX"
    return [str(write_tiff(_tiff_path(path), array, scale=scale, axes=axes))]


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Write one labels layer (2D/3D integer ids) to ``path``; returns the written paths."""
    array = np.asarray(data[0] if meta.get("multiscale") else data)
    if array.dtype.kind in "iu" and array.itemsize > 2 and array.size:
        # Wide ids that fit are stored as uint8/uint16, which Fiji reads as well.
        low, top = int(array.min()), int(array.max())
        if low >= 0 and top < 65536:
            array = array.astype(np.uint8 if top < 256 else np.uint16)
    scale = list(meta.get("scale") or [1.0] * array.ndim)[: array.ndim]
    return [str(write_tiff(_tiff_path(path), array, scale=scale))]
