"""The training loop's read-ahead thread (`Prefetched`) for loaders without workers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from csc.data.loaders import Prefetched


def test_items_come_in_order_and_end() -> None:
    assert list(Prefetched(iter(range(50)))) == list(range(50))


def test_reading_runs_ahead_of_the_caller() -> None:
    """While the caller works on an item, the next one is read: the caller waits for the
    slower of the two, not for both."""
    started = time.perf_counter()
    for _ in Prefetched(slow(range(6), seconds=0.05)):
        time.sleep(0.05)  # the caller's step
    assert time.perf_counter() - started < 6 * 0.1 * 0.8  # in turn it would take 0.6 s


def slow(items: range, *, seconds: float) -> Iterator[int]:
    for item in items:
        time.sleep(seconds)
        yield item


def test_an_error_while_reading_is_raised_to_the_caller() -> None:
    def failing() -> Iterator[int]:
        yield 1
        raise OSError("chunk unreadable: s3://bucket/raw/0.0.0")

    batches = Prefetched(failing())
    assert next(batches) == 1
    with pytest.raises(OSError, match="chunk unreadable"):
        next(batches)


def test_close_stops_the_thread_of_an_endless_stream() -> None:
    def endless() -> Iterator[int]:
        n = 0
        while True:
            n += 1
            yield n

    before = threading.active_count()
    batches = Prefetched(endless(), depth=2)
    assert [next(batches) for _ in range(3)] == [1, 2, 3]
    batches.close()
    assert threading.active_count() == before
