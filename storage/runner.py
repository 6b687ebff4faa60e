"""Running system commands: argument lists only, stderr captured into a typed error.

The runner is injected so unit tests can fake the kernel and integration tests run the real thing.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import Protocol

from storage.errors import CommandFailed


class Runner(Protocol):
    def __call__(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]: ...


def command_env() -> dict[str, str]:
    """The environment commands run in: ours, in the C locale, because their output is parsed in
    English (btrfs, losetup, mount, e2fsck messages) and numbers must not carry local separators."""
    env = dict(os.environ)
    for name in ("LANGUAGE", "LC_MESSAGES", "LC_NUMERIC", "LC_CTYPE"):
        env.pop(name, None)
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` and return its result; raise CommandFailed on a non-zero exit when ``check``."""
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False,
                              env=command_env())
    except FileNotFoundError:
        raise CommandFailed(args, 127, f"{args[0]}: command not found; install it first") from None
    except subprocess.TimeoutExpired:
        raise CommandFailed(args, -1, f"timed out after {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        raise CommandFailed(args, proc.returncode, proc.stderr or proc.stdout)
    return proc
