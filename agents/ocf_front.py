"""OCF front end (ocf:veritas:DockerContainer, ocf:veritas:DockerDaemon): OCF_RESKEY_* in, exit codes out.

Only mapping lives here: attributes from the environment, the core's result or error to an OCF code.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from agents.errors import ArgsError
from agents.fronts import AgentType, agent_type, describe, error_kind, say
from agents.result import ActionResult, MonitorResult, State

OCF_SUCCESS = 0
OCF_ERR_GENERIC = 1
OCF_ERR_ARGS = 2
OCF_ERR_UNIMPLEMENTED = 3
OCF_ERR_PERM = 4
OCF_ERR_INSTALLED = 5
OCF_ERR_CONFIGURED = 6
OCF_NOT_RUNNING = 7

ERROR_CODES = {"config": OCF_ERR_CONFIGURED, "args": OCF_ERR_ARGS, "installed": OCF_ERR_INSTALLED,
               "generic": OCF_ERR_GENERIC}
MONITOR_CODES = {State.ONLINE: OCF_SUCCESS, State.OFFLINE: OCF_NOT_RUNNING, State.FAULTED: OCF_ERR_GENERIC,
                 State.UNKNOWN: OCF_ERR_GENERIC}
VERSION = "0.1.0"


def monitor_code(r: MonitorResult) -> int:
    return MONITOR_CODES[r.state]


def action_code(r: ActionResult) -> int:
    return OCF_SUCCESS if r.ok else OCF_ERR_GENERIC


def metadata(t: AgentType) -> str:
    """OCF 1.0 meta-data (ra-api-1.dtd) listing every attribute with its default."""
    def esc(s: str) -> str:  # not xml.sax.saxutils: it imports urllib.request, 60 ms of every monitor
        return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")

    def quoteattr(s: str) -> str:
        return f'"{esc(s)}"'

    lines = ['<?xml version="1.0"?>', '<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">',
             f'<resource-agent name="{t.kind}" version="{VERSION}">', "<version>1.0</version>",
             f'<longdesc lang="en">{esc(t.longdesc)}</longdesc>',
             f'<shortdesc lang="en">{esc(t.shortdesc)}</shortdesc>',
             "<parameters>"]
    for p in t.params:
        unique = "1" if p.key in ("name", "pidfile", "socket") else "0"
        lines += [f'<parameter name="{p.key}" unique="{unique}" required="{1 if p.required else 0}">',
                  f'<longdesc lang="en">{esc(p.long)} (VCS attribute {p.vcs})</longdesc>',
                  f'<shortdesc lang="en">{esc(p.short)}</shortdesc>',
                  f"<content type={quoteattr(p.kind)} default={quoteattr(p.default)} />", "</parameter>"]
    lines += ["</parameters>", "<actions>",
              '<action name="start" timeout="90s" />', '<action name="stop" timeout="120s" />',
              '<action name="monitor" timeout="30s" interval="10s" depth="0" />',
              '<action name="validate-all" timeout="30s" />', '<action name="meta-data" timeout="5s" />']
    if t.migrates:
        lines += ['<action name="migrate_to" timeout="120s" />', '<action name="migrate_from" timeout="90s" />']
    lines += ["</actions>", "</resource-agent>"]
    return "\n".join(lines) + "\n"


def _given(t: AgentType, env: Mapping[str, str]) -> dict[str, str]:
    return {p.key: env[f"OCF_RESKEY_{p.key}"] for p in t.params if f"OCF_RESKEY_{p.key}" in env}


def _timeout(env: Mapping[str, str]) -> float | None:
    """The operation's timeout from Pacemaker (ms), less a margin to report before being killed."""
    try:
        ms = int(env.get("OCF_RESKEY_CRM_meta_timeout", ""))
    except ValueError:
        return None
    return max(1.0, ms / 1000 - 2)


def main(kind: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    e = os.environ if env is None else env
    t = agent_type(kind)
    prefix = f"ocf:veritas:{kind}"
    action = argv[0] if argv else ""
    if action == "meta-data":
        sys.stdout.write(metadata(t))
        return OCF_SUCCESS
    if action in ("usage", "help", "--help"):
        acts = "start|stop|monitor|validate-all|meta-data" + ("|migrate_to|migrate_from" if t.migrates else "")
        print(f"usage: {kind} {{{acts}}}")
        return OCF_SUCCESS
    known = {"start", "stop", "monitor", "validate-all"} | ({"migrate_to", "migrate_from"} if t.migrates else set())
    if action not in known:
        if not action:
            say(prefix, "an action is required (start, stop, monitor, validate-all, meta-data)")
            return OCF_ERR_ARGS
        return OCF_ERR_UNIMPLEMENTED
    try:
        agent = t.build(e.get("OCF_RESOURCE_INSTANCE", ""), _given(t, e))
        if action == "validate-all":
            agent.validate()
            return OCF_SUCCESS
        if action == "monitor":
            r = agent.monitor()
            if r.state is not State.OFFLINE and r.state is not State.ONLINE:
                say(prefix, f"{r.state.value}: {r.reason}")
            return monitor_code(r)
        if action == "migrate_to":
            if not e.get("OCF_RESKEY_CRM_meta_migrate_target"):
                raise ArgsError("migrate_to needs OCF_RESKEY_CRM_meta_migrate_target (set by Pacemaker)")
            res = agent.offline()  # offline migration: stopped here, its volumes released, started there
        elif action == "migrate_from":
            if not e.get("OCF_RESKEY_CRM_meta_migrate_source"):
                raise ArgsError("migrate_from needs OCF_RESKEY_CRM_meta_migrate_source (set by Pacemaker)")
            res = agent.online(_timeout(e))
        elif action == "start":
            res = agent.online(_timeout(e))
        else:
            res = agent.offline()
        if not res.ok:
            say(prefix, f"{action} failed: {res.reason}")
        return action_code(res)
    except Exception as exc:
        kind_ = error_kind(exc)
        if kind_ == "generic" and not hasattr(exc, "exit_code"):
            import traceback

            traceback.print_exc()
        say(prefix, f"{action}: {describe(exc)}")
        return ERROR_CODES[kind_]
