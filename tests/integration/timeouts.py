"""A whole-test time limit for tests that drive long external builds (mmdebstrap, apt, docker plugin
create): a hung step fails the test with a clear message instead of stalling the suite."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def overall_timeout(seconds: int) -> Iterator[None]:
    """Raise TimeoutError in the main thread once ``seconds`` have passed (SIGALRM); restored after."""
    def expired(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"test exceeded {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
