"""Typed errors of replication (storage.errors style: what went wrong and what to do)."""

from __future__ import annotations

from storage.errors import NotFound, VeritasError


class ReplicationError(VeritasError):
    exit_code = 11


class DeltaCorrupt(ReplicationError):
    """A delta failed a checksum or a structural check: it was damaged on the way or on disk."""


class DeltaTruncated(DeltaCorrupt):
    """The delta ends before its trailer."""


class DeltaVersion(ReplicationError):
    """A delta in a format version this build does not read."""


class DeltaMismatch(ReplicationError):
    """A sound delta that does not fit the replica: another RVG, or a base checkpoint it does not have."""


class SrlOverflow(ReplicationError):
    """The SRL has no room for the delta: track changed extents instead (DCM) and resync later."""


class NoSuchCheckpoint(NotFound):
    pass


class NoCommonCheckpoint(ReplicationError):
    """Fast-failback needs a checkpoint both sites hold (kept from the takeover); there is none."""


class OutOfDate(ReplicationError):
    """The secondary does not hold the primary's last checkpoint: a planned migrate would lose data."""


class NoSuchRvg(NotFound):
    pass


class LinkError(ReplicationError):
    """The replication link failed: the peer is unreachable, refused us, or broke off."""


class PeerUnreachable(LinkError):
    """The peer's link service cannot be reached: connection refused, timed out, reset or closed. The
    only LinkError that lets a takeover assume its primary is gone."""


class PeerError(LinkError):
    """The peer answered a request with an error (it is up, and refused or failed the request)."""


class AuthFailed(LinkError):
    """The peer did not prove it holds the pre-shared key (or we could not prove it to the peer)."""


class ProtocolError(LinkError):
    """A frame that is not what the protocol allows here: damaged, too big, or from another version."""
