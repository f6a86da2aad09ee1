"""Where the agent's configuration is, when no ``--config`` names it.

The search order (docs/configuration.md, "Where the configuration is"):

1. ``--config FILE`` on the command line;
2. the ``CARD_AGENT_CONFIG`` environment variable;
3. the user's ``$XDG_CONFIG_HOME/dicom-card-agent/agent.toml`` (``~/.config/...`` by default);
4. the workstation's ``/etc/dicom-card-agent/agent.toml``.

The first one given or present is used: a named file that is missing is an error, never a reason to
try the next place (a typo must not silently select another identity's configuration).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from dicom_card_agent.errors import ConfigError

ENVIRONMENT_VARIABLE = "CARD_AGENT_CONFIG"
APPLICATION_DIRECTORY = "dicom-card-agent"
FILE_NAME = "agent.toml"
SYSTEM_CONFIG = Path("/etc") / APPLICATION_DIRECTORY / FILE_NAME


class ConfigNotFoundError(ConfigError):
    """No configuration was named and none is in the places searched."""


def user_config(environ: Mapping[str, str] = os.environ) -> Path:
    """The user's own configuration file (which may not exist)."""
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".config")
    return Path(base) / APPLICATION_DIRECTORY / FILE_NAME


def search_path(environ: Mapping[str, str] = os.environ) -> list[Path]:
    """The files looked at when neither ``--config`` nor the environment variable names one."""
    return [user_config(environ), SYSTEM_CONFIG]


def locate_config(explicit: Path | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The configuration file to use, by the search order above."""
    if explicit is not None:
        return explicit
    named = environ.get(ENVIRONMENT_VARIABLE)
    if named:
        path = Path(named)
        if not path.exists():
            raise ConfigNotFoundError(f"{ENVIRONMENT_VARIABLE}={named}: no such file")
        return path
    for candidate in search_path(environ):
        if candidate.exists():
            return candidate
    looked = ", ".join(str(path) for path in search_path(environ))
    raise ConfigNotFoundError(f"no configuration found: give --config FILE, set {ENVIRONMENT_VARIABLE}, or create "
                              f"one of {looked}")
