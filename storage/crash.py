"""Named crash points, so tests can kill -9 (or pause) an operation at each of its steps in turn.

VERITAS_CRASH_TRACE=FILE appends every point passed to FILE (to learn an operation's steps);
VERITAS_CRASH_AT=NAME sends SIGKILL to this process when it reaches NAME;
VERITAS_FAIL_AT=NAME raises InjectedFailure at NAME (an operation's rollback is tested with it);
VERITAS_PAUSE_AT=NAME with VERITAS_PAUSE_FILE=PATH blocks at NAME: the process writes its pid to
PATH.reached and waits, holding every lock it holds, until PATH exists (tests run a second process
against the live operation meanwhile). Unset, all cost a few dict lookups.
"""

from __future__ import annotations

import os
import signal
import time

from storage.errors import VeritasError

PAUSE_LIMIT = 600.0  # a paused process nobody releases kills itself rather than hang a test run


class InjectedFailure(VeritasError):
    """Raised at the point VERITAS_FAIL_AT names: a failure for a test, undone like any other."""


def point(name: str) -> None:
    trace = os.environ.get("VERITAS_CRASH_TRACE")
    if trace:
        with open(trace, "a") as fh:
            fh.write(name + "\n")
    if os.environ.get("VERITAS_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("VERITAS_FAIL_AT") == name:
        raise InjectedFailure(f"failure injected at {name} (VERITAS_FAIL_AT)")
    if os.environ.get("VERITAS_PAUSE_AT") == name:
        _pause(os.environ["VERITAS_PAUSE_FILE"])


def _pause(release: str) -> None:
    with open(release + ".reached", "w") as fh:
        fh.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + PAUSE_LIMIT
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.01)
