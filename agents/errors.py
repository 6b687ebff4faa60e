"""Typed errors of the agents. Each says what is wrong and what to do; the front ends map the class to an
exit code (OCF: 6 not configured, 2 bad arguments, 5 not installed, 1 generic)."""

from __future__ import annotations

from storage.errors import InvalidArgument, VeritasError


class AgentError(VeritasError):
    """An action could not be done (OCF_ERR_GENERIC)."""


class ConfigError(InvalidArgument):
    """A resource attribute is missing or invalid: the configuration is wrong everywhere (OCF 6)."""

    exit_code = 6


class ArgsError(InvalidArgument):
    """The agent was called wrongly (unknown entry point, missing migration target): OCF 2."""

    exit_code = 2


class NotInstalled(AgentError):
    """Something the resource needs is missing on this node (binary, image, docker SDK): OCF 5."""

    exit_code = 5
