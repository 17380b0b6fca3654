"""The background batch producer: order, errors, closing."""

import itertools
import threading

import pytest

from napari_unet.prefetch import Prefetcher


def test_results_come_in_production_order():
    counter = itertools.count()
    with Prefetcher(lambda: next(counter), depth=2) as prefetcher:
        assert [prefetcher.get() for _ in range(20)] == list(range(20))


def test_an_error_in_the_thread_is_raised_by_get():
    counter = itertools.count()

    def produce():
        value = next(counter)
        if value == 3:
            raise ValueError("bad labels")
        return value

    with Prefetcher(produce, depth=1) as prefetcher:
        assert [prefetcher.get() for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="bad labels"):
            prefetcher.get()


def test_close_stops_the_thread_even_when_nobody_takes_results():
    prefetcher = Prefetcher(lambda: 1, depth=1, name="test prefetch")
    prefetcher.get()
    prefetcher.close()
    assert not any(t.name == "test prefetch" for t in threading.enumerate())
