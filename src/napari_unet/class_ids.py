"""From network class indices back to the ids the user painted (numpy only, no torch).

A model file keeps ``class_ids``: network class ``k`` is painted id ``class_ids[k]`` (ids need not be contiguous).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CLASS_COLOURS = ("#4f8fe6", "#ffb000", "#e6194b", "#3cb44b", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")
"""Colours of class ids 1, 2, 3... (cycled): the widget's painting and segmentation layers, the exported cover."""


def class_colour(class_id: int) -> str:
    """The colour of a painted class id (``CLASS_COLOURS``, cycled), as ``#rrggbb``."""
    return CLASS_COLOURS[(int(class_id) - 1) % len(CLASS_COLOURS)]


def labels_dtype(class_ids: Sequence[int]) -> np.dtype:
    """The smallest unsigned dtype holding every class id."""
    return np.min_scalar_type(max(int(i) for i in class_ids))


def segmentation_from_probabilities(probabilities, class_ids: Sequence[int], out=None) -> np.ndarray:
    """Labels holding the user's class ids: ``class_ids[argmax]`` per pixel (dtype :func:`labels_dtype`).

    ``probabilities`` is ``(n_classes, *spatial)`` (numpy, memmap, zarr...); it is read one index of the first
    spatial axis at a time, so no full-size integer index array is ever allocated. ``out``: an array of shape
    ``spatial`` to write into (e.g. a memmap); default a new one.
    """
    ids = np.asarray(class_ids).astype(labels_dtype(class_ids))
    segmentation = np.empty(probabilities.shape[1:], dtype=ids.dtype) if out is None else out
    for index in range(segmentation.shape[0]):
        segmentation[index] = ids[np.argmax(np.asarray(probabilities[:, index]), axis=0)]
    return segmentation
