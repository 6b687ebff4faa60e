"""Run a generator a few items ahead of its consumer, in a thread of its own.

Why: replication's data path is a chain of steps that each release the GIL (pread, hashing, socket
send, pwrite) but ran one after the other, so each waited for the others; with the producing steps in
a thread they overlap. Bounded: at most ``depth`` items are held, so memory stays a few chunks.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def ahead(items: Iterator[T], depth: int = 4) -> Generator[T, None, None]:
    """``items``, produced in a thread up to ``depth`` ahead. An exception raised by the producer is
    raised here, at the item it stopped at; when the consumer stops early (an exception, or close), the
    producer stops at its next item and the generator it ran is closed."""
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(x: object) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not offer(x):
                    return
            offer(_END)
        except BaseException as exc:  # handed to the consumer, which raises it
            offer(_Failed(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    t = threading.Thread(target=produce, name="pipeline", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is _END:
                return
            if isinstance(x, _Failed):
                raise x.exc
            yield x  # type: ignore[misc]
    finally:
        stop.set()
        t.join()
