"""Output arrays that may not fit in memory (pure numpy): in memory when small, memory maps of temporary files
beyond a limit, so that the outputs of an image larger than memory live on disk."""

from __future__ import annotations

import errno
import os
import tempfile

import numpy as np

IN_MEMORY_OUTPUT_BYTES = 1 << 30
"""Output arrays larger than this (in bytes) are memory maps of temporary files instead of memory."""


def output_array(shape, dtype) -> np.ndarray:
    """Zeros of ``shape``/``dtype`` (the widget's outputs, a painting layer): in memory up to
    ``IN_MEMORY_OUTPUT_BYTES``, beyond that a memory map of an anonymous temporary file in the temporary folder
    (``TMPDIR``), which the operating system deletes when the last view of it goes."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    if size <= IN_MEMORY_OUTPUT_BYTES:
        return np.zeros(shape, dtype)
    with tempfile.TemporaryFile(prefix="napari-unet-") as file:  # the map keeps its own handle
        reserve_space(file.fileno(), size, tempfile.gettempdir())
        return np.memmap(file, dtype=dtype, mode="w+", shape=tuple(shape))


def reserve_space(fd: int, size: int, where) -> None:
    """Allocate the first ``size`` bytes of the open file ``fd`` on disk now (``os.posix_fallocate``), before it is
    memory-mapped: a map of a sparse file takes its disk blocks when a page is first written, and on a full disk
    that write is a SIGBUS that kills the process (napari, a batch) with no message. Here it is an ``OSError`` that
    names ``where`` and the size instead. Where the call does not exist (macOS, Windows) or the file system cannot
    allocate ahead (some network file systems), nothing is reserved and the old risk remains."""
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None or size <= 0:
        return
    try:
        allocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return
        raise OSError(e.errno, f"cannot reserve {size / 2**20:.1f} MiB in {where}: {e.strerror}") from None
