"""Asking the running agent over its control socket: ``card-agent status``, ``lock`` and ``check``.

The socket is in the agent's private runtime directory (0600 in 0700) and answers one JSON
request per connection (agent/session/control_server.py)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_card_agent.config.tables import read_config_file, toml_of
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.session.runtime_dir import (
    is_private_runtime_directory,
    runtime_directories,
    runtime_directories_for,
    runtime_directory,
)
from dicom_card_agent.tunnel.peer import identify_server

if TYPE_CHECKING:
    from dicom_card_agent.config.model import AgentConfig

SOCKET_NAME = "control.sock"


class ControlError(CardAgentError):
    """The control socket cannot be reached or answered with an error."""


class NoAgentError(ControlError):
    """No agent answers on the control socket."""


class AgentSuspendedError(ControlError):
    """The agent holding the control socket is stopped (Ctrl-Z, SIGSTOP): it cannot answer until it
    is continued."""


def control_socket_path(config: AgentConfig) -> Path:
    return runtime_directory(config) / SOCKET_NAME


def request(config: AgentConfig, command: str, socket_path: Path | None = None) -> dict:
    """Ask the running agent of this configuration; at ``socket_path`` when given (one found in
    another of :func:`runtime_directories`), else where this process's environment puts it."""
    path = socket_path or control_socket_path(config)
    try:
        answer = _ask(path, command, config.source)
    except (OSError, ValueError) as error:
        raise NoAgentError(f"no agent answers on {path} ({error}): is `card-agent run --config {config.source}` "
                           f"running as this user?{_where_else(config, command, path)}") from None
    if "error" in answer:
        raise ControlError(answer["error"])
    return answer


def request_without_loading(path: Path, command: str, error: CardAgentError) -> dict:
    """Ask the running agent of the configuration file ``path``, which does not load now (``error``):
    an edit with a mistake, which the agent refused at its reload and runs without, must not keep
    `status` or `lock` (the desktop's "Lock DICOM session") from reaching it. Its control socket is
    looked for where the file's [agent] runtime_dir says, if the file can still be read safely, else
    in the default runtime directories; only the agent running this very file answers (it checks).
    Raises ``error`` when none does."""
    source = path.resolve()
    for directory in runtime_directories_for(_runtime_dir_as_written(path)):
        socket_path = directory / SOCKET_NAME
        if not (is_private_runtime_directory(directory) and socket_path.is_socket()):
            continue
        try:
            answer = _ask(socket_path, command, source)
        except (OSError, ValueError):
            continue
        if "error" not in answer:
            return answer
    raise error


def _runtime_dir_as_written(path: Path) -> Path | None:
    """[agent] runtime_dir of the configuration file ``path`` as far as it can be read (safe to
    read, valid TOML), resolved as the configuration resolves it; None otherwise."""
    try:
        value = toml_of(read_config_file(path), path).get("agent", {}).get("runtime_dir")
    except CardAgentError:
        return None
    return (path.resolve().parent / value).resolve() if isinstance(value, str) and value else None


def _ask(socket_path: Path, command: str, source: Path) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(socket_path))
        _refuse_if_suspended(client, socket_path)
        client.sendall(json.dumps({"command": command, "config": str(source)}).encode() + b"\n")
        answer: dict = json.loads(client.makefile("rb").readline() or b"{}")
    return answer


def _refuse_if_suspended(client: socket.socket, socket_path: Path) -> None:
    """A stopped agent's socket still takes connections (the kernel queues them): the question then
    waited 10 s and ended as `no agent answers ... (timed out): is card-agent run ... running?`, of
    an agent that was running, suspended by Ctrl-Z in its terminal or by SIGSTOP."""
    pid = identify_server(client).pid
    if pid is None:  # in a PID namespace this process cannot see
        return
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return
    if state in ("T", "t"):
        raise AgentSuspendedError(
            f"the agent on {socket_path} (pid {pid}) is suspended and answers nothing until it is continued: it "
            f"was stopped (Ctrl-Z in the terminal it runs in, or SIGSTOP); `fg` in that terminal's shell, or "
            f"`kill -CONT {pid}`, brings it back")


def other_control_sockets(config: AgentConfig, tried: Path) -> list[Path]:
    """Control sockets of this user other than ``tried``, in the runtime directories an agent
    started in another environment (XDG_RUNTIME_DIR set or not) would use; private ones only, so
    that no other user's socket can pose as the agent."""
    sockets = [directory / SOCKET_NAME for directory in runtime_directories(config)]
    return [path for path in sockets if path != tried and is_private_runtime_directory(path.parent)
            and path.is_socket()]


def _where_else(config: AgentConfig, command: str, tried: Path) -> str:
    """Where else an agent of this user may answer, and how to ask it there. Its default runtime
    directory follows the environment it started in: a systemd user unit has XDG_RUNTIME_DIR, an
    administrator's ssh or sudo shell often has not, or another one."""
    if config.runtime_dir is not None:
        return ""  # one place, whatever the environment
    retry = f"card-agent {command} --config {config.source}"
    found = [f"Another control socket of this user is at {path}: to ask the agent there, run "
             f"`XDG_RUNTIME_DIR={path.parent.parent} {retry}`" for path in other_control_sockets(config, tried)]
    if not found:
        found = [f"The agent's runtime directory follows the XDG_RUNTIME_DIR of the environment it started in "
                 f"(here: {_xdg_here()}): run `XDG_RUNTIME_DIR=DIR {retry}` with the agent's DIR (a systemd user "
                 f"unit's is /run/user/{os.getuid()})"]
    return " " + "; ".join(found) + "; or set [agent] runtime_dir, which every environment shares"


def _xdg_here() -> str:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if not xdg:
        return "unset"
    return xdg if os.path.isdir(xdg) else f"{xdg}, a directory that does not exist"
