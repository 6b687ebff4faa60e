"""Typed errors of the storage core.

Every error a user can cause or meet derives from VeritasError and carries a message that says what
went wrong and what to do; callers translate them at one boundary (CLI exit code, plugin ``Err``).
"""

from __future__ import annotations


class VeritasError(Exception):
    """Root of all storage-core errors; ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(VeritasError):
    """The request is malformed: a bad size, name, option or layout."""

    exit_code = 2


class BadName(InvalidArgument):
    pass


class BadSize(InvalidArgument):
    pass


class UnknownOption(InvalidArgument):
    pass


class Unsupported(InvalidArgument):
    """A valid-looking request the product refuses on purpose (e.g. raid5)."""


class SharedFailureDomain(InvalidArgument):
    """A redundant layout would keep copies on disks that fail together (directories of one filesystem)."""


class NotFound(VeritasError):
    exit_code = 3


class NoSuchDiskGroup(NotFound):
    pass


class NoSuchDisk(NotFound):
    pass


class NoSuchVolume(NotFound):
    pass


class AlreadyExists(VeritasError):
    exit_code = 4


class InUse(VeritasError):
    """The object is busy: mounted, has snapshots, holds volumes, or is imported elsewhere."""

    exit_code = 5


class SecondaryVolume(InUse):
    """The volume is replicated here as an RVG's secondary: replication owns its data until this site
    becomes primary (takeover or migrate)."""


class ReplicatedVolume(InUse):
    """The volume is one of an RVG's volumes on its primary: removing or reshaping it here alone would
    silently break replication (the secondary keeps the old volume and shape)."""


class AttachedElsewhere(InUse):
    """The volume is attached on another node whose lease is live: it may be released, or that lease
    may run out, at any moment (by the time the caller looks again, the attachment may be gone)."""


class LeaseStale(InUse):
    """This node's own lease has not been renewed lately: it may not attach until its plugin renews."""


class IntentPending(InUse):
    """Another operation's intent is recorded on the key: finish (recover) it first, under its locks."""


class NoSpace(VeritasError):
    """Not enough free space or not enough disks with room for the requested layout."""

    exit_code = 6


class Degraded(VeritasError):
    """A redundant volume lost a disk; it can still be mounted degraded and repaired."""

    exit_code = 7


class CommandFailed(VeritasError):
    """A system command failed; the message carries the command and its stderr."""

    exit_code = 8

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        lines = [" ".join(ln.split()) for ln in stderr.strip().splitlines()]
        detail = [ln for ln in lines if ln][-3:]
        msg = f"{argv[0]} failed (exit {returncode})"
        if detail:
            msg += ": " + " / ".join(detail)
        super().__init__(msg)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class FsckFailed(CommandFailed):
    """e2fsck left errors uncorrected (exit 4) or could not run (8 and above): the filesystem is not
    fit to resize or to get a new identity."""


class CatalogError(VeritasError):
    """The catalog's backend failed (a corrupt or unreadable database, a full disk under it)."""


class LockTimeout(VeritasError):
    exit_code = 9


class SnapshotInvalid(VeritasError):
    """A space-optimised snapshot whose cache ran out: its data was released; only removal is left."""

    exit_code = 10
