"""Build the next training batches on a background thread while the optimizer works on the current one.

Sampling and augmentation are numpy/scipy work, much of which releases the GIL, so a thread overlaps it with
the network's step. Items are produced in order by one thread, so a seeded run draws the same batches as without
prefetching.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """Call ``produce()`` on a daemon thread, keeping up to ``depth`` results ready for :meth:`get`.

    An exception raised by ``produce`` is re-raised by the :meth:`get` that would have returned its result.
    :meth:`close` stops the thread (after the ``produce()`` call in progress) and waits for it.
    """

    def __init__(self, produce: Callable[[], T], depth: int = 2, name: str = "napari-unet prefetch"):
        self._produce = produce
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, name=name, daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while not self._closed.is_set():
            try:
                item = (True, self._produce())
            except BaseException as error:  # handed to the consumer, who decides
                item = (False, error)
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return

    def get(self) -> T:
        """The next result, waiting for it if the thread has not produced it yet."""
        while True:
            try:
                ok, value = self._queue.get(timeout=0.05)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the prefetch thread has stopped") from None
                continue
            if not ok:
                raise value
            return value

    def close(self) -> None:
        """Stop producing and wait for the thread to end (results not taken are dropped)."""
        self._closed.set()
        self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
