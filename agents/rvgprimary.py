"""RVGPrimary: the resource is online where this site is the primary of a replicated volume group (RVG).

Online makes the local site primary: nothing to do when it is; a planned migrate when the peer's link
service answers as primary (the peer runs it: storage.replication.failover.request_migrate), retried
while the primary refuses because its secondary is not up to date yet or its volumes are still in use;
a takeover (with fast-failback on its return when AutoResync) when the peer does not answer, if
AutoTakeover allows it. Never a takeover while the peer answers as primary.

As the vendor's agent does, offline and clean change no role (the other site's online decides that):
they drop this resource's online mark (agents.registry, the vendor's lock file). Monitor answers
online only where the site is primary and the resource was brought online here, so a stop is seen as
offline while the role stays.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agents import registry
from agents.errors import ConfigError, NotInstalled
from agents.params import Param, check_abs_path, check_name, parse_bool, parse_int, values
from agents.result import CLEAN_REASONS, ActionResult, MonitorResult
from storage.config import Config, load_config
from storage.errors import InUse, InvalidArgument, NotFound, VeritasError
from storage.replication.errors import AuthFailed, LinkError, NoSuchRvg, OutOfDate, ReplicationError

KIND = "RVGPrimary"
RETRY_SECONDS = 1.0  # between tries of a refused migrate
PROBES = 2  # the peer counts as gone after this many failed probes in a row, RETRY_SECONDS apart

PARAMS = [
    Param("rvg", "RVG", "string", "", True, "RVG name",
          "Name of the replicated volume group (veritas rvg createpri made it on the first primary)."),
    Param("diskgroup", "DiskGroup", "string", "", False, "disk group",
          "Disk group holding the RVG on this site (veritas rvg -g); empty: the configuration's default "
          "disk group."),
    Param("config", "ConfigFile", "string", "", False, "veritas configuration",
          "Absolute path of the veritas configuration file (VERITAS_CONFIG); empty: VERITAS_CONFIG or the "
          "standard places."),
    Param("key_file", "KeyFile", "string", "", False, "replication key file",
          "Pre-shared key file of the replication link; empty: the configuration's [replication] key_file."),
    Param("auto_takeover", "AutoTakeover", "boolean", "true", False, "take over when the peer is gone",
          "Whether online takes over (veritas rvg takeover) when the primary's link service does not "
          "answer; when false such an online fails and an administrator decides."),
    Param("autofb", "AutoResync", "boolean", "true", False, "fast-failback automatically",
          "Whether a takeover makes the old primary a secondary automatically when it returns "
          "(takeover --autofb); when false run veritas rvg fbsync by hand."),
    Param("wait_timeout", "WaitTimeout", "integer", "60", False, "online timeout",
          "Seconds online keeps trying a migrate the primary refuses (secondary not up to date yet, "
          "volumes still in use there) before it fails; Pacemaker's start timeout bounds it too."),
]


@dataclass(frozen=True)
class RvgSpec:
    rvg: str
    diskgroup: str
    config: str
    key_file: str
    auto_takeover: bool
    autofb: bool
    wait_timeout: int

    @classmethod
    def parse(cls, given: Mapping[str, str]) -> RvgSpec:
        v = values(PARAMS, given)
        return cls(rvg=check_name("rvg", v["rvg"]),
                   diskgroup=check_name("diskgroup", v["diskgroup"]) if v["diskgroup"] else "",
                   config=check_abs_path("config", v["config"]) if v["config"] else "",
                   key_file=check_abs_path("key_file", v["key_file"]) if v["key_file"] else "",
                   auto_takeover=parse_bool("auto_takeover", v["auto_takeover"]),
                   autofb=parse_bool("autofb", v["autofb"]),
                   wait_timeout=parse_int("wait_timeout", v["wait_timeout"], 1, 86400))


class Site(Protocol):
    """This site's side of the RVG, as the decisions need it (storage.replication behind it; faked in
    the unit tests)."""

    def role(self) -> str: ...  # primary | secondary; ConfigError: no such RVG

    def peer_role(self) -> str | None: ...  # the peer's answer, None: unreachable (LinkError: it answers wrongly)

    def migrate(self) -> dict[str, Any]: ...  # ask the peer to migrate the role here

    def takeover(self, autofb: bool) -> dict[str, Any]: ...


class StorageSite:
    """The real one: the disk group opened as the CLI opens it, the calls the CLI's commands make."""

    def __init__(self, spec: RvgSpec) -> None:
        from storage import diskgroup
        from storage.replication import protocol

        cfg = load(spec)
        try:
            self.key = protocol.load_key(Path(spec.key_file) if spec.key_file else cfg.replication.key_file)
        except InvalidArgument as exc:
            raise ConfigError(str(exc)) from None
        try:
            self.dg = diskgroup.open_dg(cfg, spec.diskgroup or cfg.diskgroup)
        except NotFound as exc:
            raise NotInstalled(f"{exc} on this site") from None
        self.name = spec.rvg

    def close(self) -> None:
        self.dg.close()

    def _rvg(self) -> Any:
        from storage.replication import rvg

        try:
            return rvg.get(self.dg, self.name)
        except NoSuchRvg as exc:
            raise ConfigError(str(exc)) from None

    def role(self) -> str:
        return str(self._rvg().role)

    def peer_role(self) -> str | None:
        from storage.replication import failover

        return failover.peer_role(self._rvg(), self.key)

    def migrate(self) -> dict[str, Any]:
        from storage.replication import failover

        return failover.request_migrate(self.dg, self.name, self.key)

    def takeover(self, autofb: bool) -> dict[str, Any]:
        from storage.replication import failover

        return failover.takeover(self.dg, self.name, self.key, autofb=autofb)


def load(spec: RvgSpec) -> Config:
    """The veritas configuration the resource names (or the CLI's default one)."""
    try:
        return load_config(spec.config or None)
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from None


class Retry(Exception):
    """This try did not make the site primary, a later one may (the reason is the message)."""


def _try(site: Site, spec: RvgSpec, gone: int) -> tuple[str, int]:
    """One try at making this secondary primary: what was done, and the peer's failed probes so far.
    :raises Retry: not now; :raises Refused: not without an administrator."""
    peer = site.peer_role()
    if peer == "primary":
        out = site.migrate()
        return f"migrated from the primary at checkpoint {out.get('seq', '?')}", 0
    if peer == "secondary":
        raise Retry("the peer answers as secondary too (a role change under way there?)")
    if gone + 1 < PROBES:
        raise Unreachable("the peer's link service does not answer")
    if not spec.auto_takeover:
        raise Refused(f"the primary's link service does not answer and AutoTakeover is false: take over by"
                      f" hand (veritas rvg takeover {spec.rvg}) or bring the primary back")
    out = site.takeover(spec.autofb)
    fb = "; the old primary becomes secondary when it returns" if spec.autofb else f"; fbsync {spec.rvg} later"
    return f"took over from checkpoint {out.get('seq', '?')}{fb}", 0


class Unreachable(Retry):
    """The peer did not answer this probe."""


class Refused(Exception):
    """Online cannot make this site primary without an administrator (the message says why)."""


def make_primary(site: Site, spec: RvgSpec, deadline: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> ActionResult:
    """Online's decisions: until the site is primary or ``deadline`` passes (see the module's doc)."""
    gone = 0
    why = ""
    while True:
        if site.role() == "primary":
            return ActionResult(True, f"this site is primary of RVG {spec.rvg}" + (f": {why}" if why else ""))
        try:
            why, gone = _try(site, spec, gone)
            if site.role() == "primary":
                continue  # done
            why += ", yet this site's record is not primary"
        except Unreachable as exc:
            why = str(exc)
            gone += 1
        except Retry as exc:
            why = str(exc)
            gone = 0
        except AuthFailed as exc:  # it answers, so it may be a live primary: never a takeover
            return ActionResult(False, f"RVG {spec.rvg}: the peer's link service answers but the key does not"
                                       f" match (KeyFile / [replication] key_file on both sites): {exc}")
        except (InUse, OutOfDate, LinkError) as exc:
            why = str(exc)  # refused for now (not up to date, in use, the peer answered meanwhile, broke off)
            gone = 0
        except Refused as exc:
            return ActionResult(False, f"RVG {spec.rvg}: {exc}")
        except ConfigError:
            raise
        except (InvalidArgument, ReplicationError, NotFound) as exc:
            return ActionResult(False, f"RVG {spec.rvg}: this site is still secondary: {exc}")
        if clock() + RETRY_SECONDS > deadline:
            return ActionResult(False, f"RVG {spec.rvg}: this site is still secondary after the online timeout:"
                                       f" {why}")
        sleep(RETRY_SECONDS)


class RVGPrimary:
    """The agent core for one RVGPrimary resource."""

    def __init__(self, resource: str, spec: RvgSpec, site: Callable[[RvgSpec], Any] = StorageSite) -> None:
        self.resource = resource
        self.spec = spec
        self._site = site

    def _mark(self) -> dict[str, Any] | None:
        rec = registry.read(self.resource)
        ok = rec is not None and rec.get("kind") == KIND and rec.get("expect") == "online" \
            and rec.get("rvg") == self.spec.rvg and rec.get("diskgroup") == self.spec.diskgroup
        return rec if ok else None

    def validate(self) -> None:
        """The configuration loads, the key reads, the disk group is here and holds the RVG."""
        s = self._site(self.spec)
        try:
            s.role()
        finally:
            s.close()

    def monitor(self) -> MonitorResult:
        """Read only: this site's role from the RVG record (no link traffic, no lock), and the mark."""
        from storage.group import DiskGroup
        from storage.replication import rvg

        cfg = load(self.spec)
        try:
            dg = DiskGroup(cfg, self.spec.diskgroup or cfg.diskgroup)
        except NotFound as exc:
            raise NotInstalled(f"{exc} on this site") from None
        except VeritasError as exc:
            return MonitorResult.unknown(f"cannot read the disk group: {exc}")
        try:
            r = rvg.get(dg, self.spec.rvg)
            missing = [v for v in r.volumes if dg.catalog.volume(v) is None] if r.role == "primary" else []
        except NoSuchRvg as exc:
            raise ConfigError(str(exc)) from None
        except (VeritasError, OSError, ValueError, KeyError, TypeError) as exc:
            return MonitorResult.unknown(f"cannot read RVG {self.spec.rvg}'s record: {exc}")
        finally:
            dg.close()
        if r.role != "primary":
            return MonitorResult.offline(f"this site is secondary of RVG {r.name} (primary: {r.peer_addr or '-'})")
        if missing:
            return MonitorResult.unknown(f"this site is primary of RVG {r.name} but its volume(s) "
                                         f"{', '.join(missing)} are missing here")
        if self._mark() is None:
            return MonitorResult.offline(f"this site is primary of RVG {r.name}, but the resource is not online"
                                         " here (no online was run, or offline since)")
        return MonitorResult.online(100, f"this site is primary of RVG {r.name} ({r.state})")

    def online(self, timeout: float | None = None) -> ActionResult:
        wait = self.spec.wait_timeout if timeout is None else min(timeout, self.spec.wait_timeout)
        deadline = time.monotonic() + wait
        s = self._site(self.spec)
        try:
            res = make_primary(s, self.spec, deadline)
        finally:
            s.close()
        if res.ok:
            registry.register(self.resource, KIND, "online", rvg=self.spec.rvg, diskgroup=self.spec.diskgroup)
        return res

    def offline(self) -> ActionResult:
        """No role change (the vendor's RVGPrimary too): the other site's online decides it."""
        registry.expect_offline(self.resource)
        return ActionResult(True, f"RVG {self.spec.rvg}: resource offline here; the site's role is unchanged")

    def clean(self, reason: int = 0) -> ActionResult:
        why = CLEAN_REASONS.get(reason, f"reason {reason}")
        registry.expect_offline(self.resource)
        return ActionResult(True, f"clean ({why}): RVG {self.spec.rvg}'s role is unchanged")

    def info(self) -> dict[str, str]:
        m = self.monitor()
        return {"RVG": self.spec.rvg, "DiskGroup": self.spec.diskgroup or "(default)", "State": m.state.value,
                "Reason": m.reason}


def from_attributes(resource: str, given: Mapping[str, str]) -> RVGPrimary:
    from agents.params import check_resource

    return RVGPrimary(check_resource(resource), RvgSpec.parse(given))
