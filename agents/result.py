"""What the agent core answers; the front ends turn these into exit codes and nothing else."""

from __future__ import annotations

import enum

from agents.record import Frozen


class State(enum.Enum):
    ONLINE = "online"
    OFFLINE = "offline"
    FAULTED = "faulted"  # was or is running but broken (unhealthy, failed deep check, hung daemon)
    UNKNOWN = "unknown"  # cannot tell, or the object is not the one configured


class MonitorResult(Frozen):
    """A resource state with the confidence (0-100, meaningful when online) and why."""

    __slots__ = ("state", "confidence", "reason")
    state: State
    confidence: int
    reason: str

    def __init__(self, state: State, confidence: int, reason: str) -> None:
        self._init(state=state, confidence=confidence, reason=reason)

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


class ActionResult(Frozen):
    """The outcome of online / offline / clean / migrate: done or not, and why."""

    __slots__ = ("ok", "reason")
    ok: bool
    reason: str

    def __init__(self, ok: bool, reason: str) -> None:
        self._init(ok=ok, reason=reason)


# VCS clean reason codes (the agent framework passes one to clean)
CLEAN_REASONS = {
    0: "offline hung",
    1: "offline ineffective",
    2: "online hung",
    3: "online ineffective",
    4: "unexpected offline",
    5: "monitor hung",
}
