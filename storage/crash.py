"""Named crash points, so tests can kill -9 an operation at each of its steps in turn.

VERITAS_CRASH_TRACE=FILE appends every point passed to FILE (to learn an operation's steps);
VERITAS_CRASH_AT=NAME sends SIGKILL to this process when it reaches NAME. Unset, both cost one dict
lookup.
"""

from __future__ import annotations

import os
import signal


def point(name: str) -> None:
    trace = os.environ.get("VERITAS_CRASH_TRACE")
    if trace:
        with open(trace, "a") as fh:
            fh.write(name + "\n")
    if os.environ.get("VERITAS_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
