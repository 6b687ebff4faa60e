"""What the two front ends share: the agent types (DockerContainer, DockerDaemon, RVGPrimary), their
attribute tables, the core's errors as codes.

Kept free of the docker SDK so meta-data and usage work anywhere (ocf-tester runs meta-data as nobody).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from agents.errors import ArgsError, ConfigError, NotInstalled
from agents.params import Param
from agents.record import Frozen
from storage.errors import InvalidArgument, VeritasError

TYPE_CHECKING = False  # typing is ~9 ms of a monitor process (agents.record); mypy reads the block
if TYPE_CHECKING:
    from typing import Any


class AgentType(Frozen):
    __slots__ = ("kind", "params", "shortdesc", "longdesc", "migrates", "actions")
    kind: str
    params: list[Param]
    shortdesc: str
    longdesc: str
    migrates: bool
    actions: tuple[str, ...]  # VCS SupportedActions

    def __init__(self, kind: str, params: list[Param], shortdesc: str, longdesc: str, migrates: bool,
                 actions: tuple[str, ...]) -> None:
        self._init(kind=kind, params=params, shortdesc=shortdesc, longdesc=longdesc, migrates=migrates,
                   actions=actions)

    def build(self, resource: str, given: Mapping[str, str]) -> Any:
        if self.kind == "DockerContainer":
            from agents import container

            return container.from_attributes(resource, given)
        if self.kind == "RVGPrimary":
            from agents import rvgprimary

            return rvgprimary.from_attributes(resource, given)
        from agents import daemon

        return daemon.from_attributes(resource, given)


def agent_type(kind: str) -> AgentType:
    """The type's description; only its own module is imported (a monitor of one type loads one)."""
    if kind == "DockerContainer":
        from agents.container import PARAMS as container_params

        return AgentType("DockerContainer", container_params, "One Docker container on veritas volumes",
                         "Manages one Docker container through the engine's API: creates it from its "
                         "attributes when absent, with its veritas volumes mounted through the veritas volume "
                         "driver, starts, stops and kills it, and maps Docker's state and health to the "
                         "resource's state.", True, ("status", "inspect"))
    if kind == "DockerDaemon":
        from agents.daemon import PARAMS as daemon_params

        return AgentType("DockerDaemon", daemon_params, "The Docker daemon (dockerd)",
                         "Manages dockerd: starts it with its arguments (such as a data root on a veritas "
                         "volume), monitors its process and API, stops it, and on clean kills it and every "
                         "process it left running.", False, ("status", "leftovers"))
    if kind == "RVGPrimary":
        from agents.rvgprimary import PARAMS as rvg_params

        return AgentType("RVGPrimary", rvg_params, "This site as primary of a replicated volume group",
                         "Makes the local site the primary of an RVG when it comes online: a planned migrate "
                         "when the primary's link service answers (retried until its secondary is up to date "
                         "and its volumes unused), a takeover when it does not (if AutoTakeover). Offline "
                         "changes no role. Monitor: online where the site is primary and the resource online.",
                         False, ("status", "inspect"))
    raise KeyError(kind)


def error_kind(exc: BaseException) -> str:
    """config | args | installed | generic, for a front end's exit-code table."""
    if isinstance(exc, ConfigError):
        return "config"
    if isinstance(exc, ArgsError | InvalidArgument):
        return "args"
    if isinstance(exc, NotInstalled):
        return "installed"
    return "generic"


def say(prefix: str, msg: str) -> None:
    print(f"{prefix}: {msg}", file=sys.stderr)


def describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, VeritasError) else f"{type(exc).__name__}: {exc}"
