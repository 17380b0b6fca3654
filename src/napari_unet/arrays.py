"""Output arrays that may not fit in memory (pure numpy): in memory when small, memory maps of temporary files
beyond a limit, so that the outputs of an image larger than memory live on disk."""

from __future__ import annotations

import tempfile

import numpy as np

IN_MEMORY_OUTPUT_BYTES = 1 << 30
"""Output arrays larger than this (in bytes) are memory maps of temporary files instead of memory."""


def output_array(shape, dtype) -> np.ndarray:
    """Zeros of ``shape``/``dtype`` (the widget's outputs, a painting layer): in memory up to
    ``IN_MEMORY_OUTPUT_BYTES``, beyond that a memory map of an anonymous temporary file in the temporary folder
    (``TMPDIR``), which the operating system deletes when the last view of it goes."""
    dtype = np.dtype(dtype)
    if int(np.prod(shape)) * dtype.itemsize <= IN_MEMORY_OUTPUT_BYTES:
        return np.zeros(shape, dtype)
    with tempfile.TemporaryFile(prefix="napari-unet-") as file:  # the map keeps its own handle
        return np.memmap(file, dtype=dtype, mode="w+", shape=tuple(shape))
