"""`card-agent check`: the fix line of a listen address that cannot be had fits why. Every error
got "stop what listens there (`ss -ltnp`) or choose another listen address", also a socket directory
with the wrong mode, where nothing listens and the message itself says `chmod 700`. Real sockets and
directories, the SoftHSM module of the test PKI."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent_runner import tunnel, write_config
from conftest import USER_PIN, ProvisionedPki, run_card_agent

TAKEN_FIX = "     fix: stop what listens there (`ss -ltnp`) or choose another listen address"


def _listen_finding(test_pki: ProvisionedPki, config: Path, name: str) -> list[str]:
    """The `fail NAME: ...` line of ``check`` and the fix line under it, if any."""
    result = run_card_agent("check", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"fail {name}: "))
    return lines[at:at + 2] if at + 1 < len(lines) and lines[at + 1].startswith("     fix: ") else lines[at:at + 1]


@pytest.mark.parametrize("case", ["directory mode 0755", "a file at the path", "no parent directory"])
def test_a_unix_listen_path_that_is_not_usable_gets_its_own_fix(test_pki: ProvisionedPki, tmp_path: Path,
                                                               case: str) -> None:
    directory = tmp_path / "sockets"
    if case == "directory mode 0755":
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)  # whatever the umask
        problem = (f"the socket directory {directory} has mode 0755, so other users may reach the agent's sockets; "
                   f"it must be a directory owned by uid {os.geteuid()} (the agent's user) with mode 0700 (or 0711): "
                   f"run `chmod 700 {directory}`")
        fix = ("     fix: make the socket's directory the agent's user's own with mode 0700, as the message says, "
               "or choose another socket path")
    elif case == "a file at the path":
        directory.mkdir(mode=0o700)
        (directory / "pacs.sock").write_text("not a socket")
        problem = (f"{directory}/pacs.sock exists and is not a socket; it was left alone: remove it or choose "
                   "another socket path")
        fix = "     fix: remove that file, or choose another socket path"
    else:
        directory = tmp_path / "missing" / "sockets"
        problem = (f"cannot create the socket directory {directory}: its parent {tmp_path}/missing does not exist "
                   f"(the agent creates only the socket's own directory): create {tmp_path}/missing, or put the "
                   f"socket in a directory that exists, e.g. unix:/run/user/{os.getuid()}/card-agent/NAME.sock")
        fix = "     fix: correct what the message names, or choose another listen address"
    with socket.create_server(("127.0.0.1", 0)) as pacs:
        config = write_config(tmp_path / "agent.toml", test_pki,
                              [tunnel("pacs", pacs.getsockname()[1], listen=f"unix:{directory}/pacs.sock")])
        finding = _listen_finding(test_pki, config, "listen pacs")
    assert finding == [f"fail listen pacs: tunnel pacs: {problem}", fix]
    assert TAKEN_FIX not in finding


def test_an_address_in_use_keeps_the_fix_to_stop_what_listens_there(test_pki: ProvisionedPki,
                                                                    tmp_path: Path) -> None:
    sockets = tmp_path / "sockets"
    sockets.mkdir(mode=0o700)
    with socket.create_server(("127.0.0.1", 0)) as taken, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix_taken:
        unix_taken.bind(str(sockets / "ct.sock"))
        unix_taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "agent.toml", test_pki,
                              [tunnel("pacs", port, listen=f"127.0.0.1:{port}"),
                               tunnel("ct", port, listen=f"unix:{sockets}/ct.sock")])
        tcp = _listen_finding(test_pki, config, "listen pacs")
        unix = _listen_finding(test_pki, config, "listen ct")
    assert tcp[0].startswith(f"fail listen pacs: tunnel pacs: cannot listen on 127.0.0.1:{port}: "), tcp
    assert tcp[1:] == [TAKEN_FIX]  # one place ([agent] runtime_dir set): no XDG_RUNTIME_DIR hint
    assert unix == [f"fail listen ct: tunnel ct: another process is already listening on {sockets}/ct.sock "
                    "(another card agent?); stop it or choose another socket path", TAKEN_FIX]


def test_a_metrics_socket_directory_with_the_wrong_mode_gets_its_own_fix(test_pki: ProvisionedPki,
                                                                        tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    directory.chmod(0o750)
    with socket.create_server(("127.0.0.1", 0)) as pacs:
        config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", pacs.getsockname()[1])],
                              metrics={"listen": f"unix:{directory}/metrics.sock"})
        finding = _listen_finding(test_pki, config, "metrics listen")
    assert finding == [
        f"fail metrics listen: [metrics].listen: the socket directory {directory} has mode 0750, so other users may "
        f"reach the agent's sockets; it must be a directory owned by uid {os.geteuid()} (the agent's user) with mode "
        f"0700 (or 0711): run `chmod 700 {directory}`",
        "     fix: make the socket's directory the agent's user's own with mode 0700, as the message says, or "
        "choose another socket path"]
