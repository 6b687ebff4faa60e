"""storage.replication.pipeline.ahead: the items in order, the producer's error where it stopped, and
a producer stopped (and its generator closed) when the consumer stops early."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest

from storage.replication import pipeline


def test_items_arrive_in_order_and_at_most_depth_are_held() -> None:
    made: list[int] = []

    def gen() -> Iterator[int]:
        for i in range(50):
            made.append(i)
            yield i

    got = []
    for x in pipeline.ahead(gen(), depth=3):
        time.sleep(0.001)
        assert len(made) - len(got) <= 3 + 2  # queued, plus one in the producer's hand, plus this one
        got.append(x)
    assert got == list(range(50))


def test_the_producers_error_is_raised_after_the_items_before_it() -> None:
    def gen() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("short read")

    got = []
    with pytest.raises(OSError, match="short read"):
        for x in pipeline.ahead(gen()):
            got.append(x)
    assert got == [1, 2]


def test_a_consumer_that_stops_stops_the_producer_and_closes_its_generator() -> None:
    closed = threading.Event()

    def gen() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    with contextlib.closing(pipeline.ahead(gen(), depth=2)) as it:
        assert next(it) == 0
    assert closed.is_set()  # closing() returned only once the producer had stopped
    assert not [t for t in threading.enumerate() if t.name == "pipeline"]
