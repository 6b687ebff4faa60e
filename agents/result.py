"""What the agent core answers; the front ends turn these into exit codes and nothing else."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    ONLINE = "online"
    OFFLINE = "offline"
    FAULTED = "faulted"  # was or is running but broken (unhealthy, failed deep check, hung daemon)
    UNKNOWN = "unknown"  # cannot tell, or the object is not the one configured


@dataclass(frozen=True)
class MonitorResult:
    """A resource state with the confidence (0-100, meaningful when online) and why."""

    state: State
    confidence: int
    reason: str

    @classmethod
    def online(cls, confidence: int, reason: str) -> MonitorResult:
        return cls(State.ONLINE, max(0, min(100, confidence)), reason)

    @classmethod
    def offline(cls, reason: str) -> MonitorResult:
        return cls(State.OFFLINE, 0, reason)

    @classmethod
    def faulted(cls, reason: str) -> MonitorResult:
        return cls(State.FAULTED, 0, reason)

    @classmethod
    def unknown(cls, reason: str) -> MonitorResult:
        return cls(State.UNKNOWN, 0, reason)


@dataclass(frozen=True)
class ActionResult:
    """The outcome of online / offline / clean / migrate: done or not, and why."""

    ok: bool
    reason: str


# VCS clean reason codes (the agent framework passes one to clean)
CLEAN_REASONS = {
    0: "offline hung",
    1: "offline ineffective",
    2: "online hung",
    3: "online ineffective",
    4: "unexpected offline",
    5: "monitor hung",
}
