"""VCS script-agent front end: ``ENTRY RESNAME [extra] ArgList values...`` in, VCS exit codes out.

Entry points: online, offline, monitor, clean (extra: the clean reason 0-5), info, action (extra: the
action token). ArgList values come in the order of the type's ArgList in <Type>Types.cf, which is the
order of the attribute table. Monitor exits 100 offline (also faulted: VCS faults a resource that went
offline unexpectedly), 101-110 online with confidence 10-100 %, 99 unknown; the others 0 done, 1 not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from agents.errors import ArgsError
from agents.fronts import agent_type, describe, say
from agents.result import ActionResult, MonitorResult, State

VCS_OFFLINE = 100
VCS_UNKNOWN = 99
ENTRIES = ("online", "offline", "monitor", "clean", "info", "action")


def monitor_code(r: MonitorResult) -> int:
    if r.state is State.ONLINE:
        return VCS_OFFLINE + max(1, min(10, -(-r.confidence // 10)))
    if r.state in (State.OFFLINE, State.FAULTED):
        return VCS_OFFLINE
    return VCS_UNKNOWN


def action_code(r: ActionResult) -> int:
    return 0 if r.ok else 1


def main(kind: str, entry: str, argv: Sequence[str]) -> int:
    t = agent_type(kind)
    prefix = f"VCS {kind} {entry}"
    fail = VCS_UNKNOWN if entry == "monitor" else 1
    try:
        if entry not in ENTRIES:
            raise ArgsError(f"unknown entry point {entry!r}")
        if not argv:
            raise ArgsError("the resource name is required")
        resource, rest = argv[0], list(argv[1:])
        extra = ""
        if entry in ("clean", "action"):
            if not rest:
                raise ArgsError(f"{entry} needs {'the clean reason' if entry == 'clean' else 'an action token'}"
                                " after the resource name")
            extra = rest.pop(0)
        if len(rest) > len(t.params):
            raise ArgsError(f"{len(rest)} ArgList values given, {kind} has {len(t.params)}")
        given = {p.key: v for p, v in zip(t.params, rest, strict=False)}
        agent = t.build(resource, given)
        if entry == "monitor":
            r = agent.monitor()
            print(f"{r.state.value} {r.confidence} {r.reason}")
            return monitor_code(r)
        if entry == "online":
            res = agent.online()
        elif entry == "offline":
            res = agent.offline()
        elif entry == "clean":
            if not extra.isdigit() or int(extra) > 5:
                raise ArgsError(f"clean reason {extra!r} must be 0-5")
            res = agent.clean(int(extra))
        elif entry == "info":
            for k, v in agent.info().items():
                print(f"{k} {v}")
            return 0
        else:
            if extra not in t.actions:
                raise ArgsError(f"action {extra!r} is not supported; {kind} supports {', '.join(t.actions)}")
            if extra == "status":
                r = agent.monitor()
                print(json.dumps({"state": r.state.value, "confidence": r.confidence, "reason": r.reason}))
                return 0
            if extra == "inspect":
                print(json.dumps(agent.info()))
                return 0
            pids, cgroups = agent.leftovers(agent.pid())
            print(json.dumps({"pids": pids, "cgroups": [str(c) for c in cgroups]}))
            return 0
        print(res.reason)
        return action_code(res)
    except Exception as exc:
        if not hasattr(exc, "exit_code"):
            import traceback

            traceback.print_exc()
        say(prefix, describe(exc))
        return fail
