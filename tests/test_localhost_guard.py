"""A tunnel on one address of `localhost` keeps the other from other users (agent/tunnel/localhost_guard.py).

Debian's /etc/hosts names ::1 and 127.0.0.1 `localhost`, ::1 first, and an application told
`localhost` may try ::1 first (Python's socket.create_connection, Go, .NET). While a tunnel
listened on 127.0.0.1:PORT alone, uid 65534 could listen on [::1]:PORT and receive those
applications' associations in plain text. The real Listeners and sockets, the kernel judging the
binds of uid 65534 (setpriv); the whole agent in test_local_attacker.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from agent_runner import NOBODY, port_of, running_agent, tunnel, write_config
from conftest import USER_PIN, ProvisionedPki, run_card_agent
from dicom_card_agent.config.model import load_config
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.tunnel.server import Listeners
from peers.ports import free_port
from test_check import findings
from test_local_attacker import SQUATTER, as_nobody, end

# Binds HOST:PORT and listens, as uid 65534 would to wait for the applications of `localhost`:
# plainly, with SO_REUSEADDR, SO_REUSEPORT or both, and the wildcard of HOST's family (IPv6 only);
# prints what each got as JSON ("listening", or the error's text).
BINDS = textwrap.dedent("""
    import json, socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    results = {}
    for name, options in (("plain", ()), ("SO_REUSEADDR", (socket.SO_REUSEADDR,)),
                          ("SO_REUSEPORT", (socket.SO_REUSEPORT,)),
                          ("both", (socket.SO_REUSEADDR, socket.SO_REUSEPORT))):
        for bound in (host, "::" if family == socket.AF_INET6 else "0.0.0.0"):
            with socket.socket(family) as sock:
                for option in options:
                    sock.setsockopt(socket.SOL_SOCKET, option, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind((bound, port))
                    sock.listen()
                    results[f"{bound} {name}"] = "listening"
                except OSError as error:
                    results[f"{bound} {name}"] = error.strerror
    print(json.dumps(results))
""")

OTHER = {"127.0.0.1": "::1", "localhost": "::1", "::1": "127.0.0.1"}


def binds_of_another_user(host: str, port: int) -> dict[str, str]:
    result = subprocess.run([*NOBODY, BINDS, host, str(port)], capture_output=True, text=True, timeout=30, cwd="/")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_a_tunnel_keeps_the_other_localhost_address_from_other_users(test_pki: ProvisionedPki, tmp_path: Path,
                                                                      host: str) -> None:
    """No way of binding the other address of the tunnel's port (any socket option, or the
    family's wildcard) works for uid 65534 while the tunnel listens; a connection there is refused
    at once, so the application goes on to the tunnel's address; the agent's close lets it go."""
    port = free_port()
    table = {**tunnel("pacs", 104), "listen": listen(host, port)}
    listeners = Listeners(load_config(write_config(tmp_path / "agent.toml", test_pki, [table])))
    try:
        taken = binds_of_another_user(OTHER[host], port)
        assert set(taken.values()) == {"Address already in use"}, taken
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((OTHER[host], port), timeout=5)
        socket.create_connection(("127.0.0.1" if host == "localhost" else host, port), timeout=5).close()
    finally:
        listeners.close()
    assert binds_of_another_user(OTHER[host], port)[f"{OTHER[host]} plain"] == "listening"


def test_a_tunnel_on_each_localhost_address_of_one_port_listens_on_both(test_pki: ProvisionedPki,
                                                                       tmp_path: Path) -> None:
    """Two tunnels on 127.0.0.1:PORT and [::1]:PORT (two PACS behind one port number): each is the
    other's other address, and both listen; the agent keeps neither from itself."""
    port = free_port()
    tables = [{**tunnel("v4", 104), "listen": f"127.0.0.1:{port}"}, {**tunnel("v6", 105), "listen": f"[::1]:{port}"}]
    listeners = Listeners(load_config(write_config(tmp_path / "agent.toml", test_pki, tables)))
    try:
        for host in ("127.0.0.1", "::1"):
            socket.create_connection((host, port), timeout=5).close()
    finally:
        listeners.close()


def test_a_reload_moves_the_kept_address_with_the_tunnel(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A tunnel moved to another port keeps the other address of its new port, and lets go of the old one."""
    old, new = free_port(), free_port()
    config = write_config(tmp_path / "agent.toml", test_pki, [{**tunnel("pacs", 104), "listen": f"127.0.0.1:{old}"}])
    listeners = Listeners(load_config(config))
    try:
        write_config(config, test_pki, [{**tunnel("pacs", 104), "listen": f"127.0.0.1:{new}"}])
        assert listeners.prepare(load_config(config))()
        assert binds_of_another_user("::1", new)["::1 plain"] == "Address already in use"
        assert binds_of_another_user("::1", old)["::1 plain"] == "listening"
    finally:
        listeners.close()


def reload_refused(listeners: Listeners, config: Path) -> str:
    """Why :meth:`Listeners.prepare` refuses the configuration now in ``config``."""
    with pytest.raises(CardAgentError) as refused:
        listeners.prepare(load_config(config))
    return str(refused.value)


def test_a_reload_cannot_swap_a_kept_address_for_a_listener(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A reload that adds a tunnel where the agent keeps the other address of another tunnel's port,
    or removes the one of a pair whose address the other then needs kept, is refused naming both
    (releasing one socket and binding the other would leave a moment for another user); the
    listeners stay as they were."""
    port = free_port()
    v4 = {**tunnel("v4", 104), "listen": f"127.0.0.1:{port}"}
    v6 = {**tunnel("v6", 105), "listen": f"[::1]:{port}"}
    config = write_config(tmp_path / "agent.toml", test_pki, [v4])
    listeners = Listeners(load_config(config))
    try:
        write_config(config, test_pki, [v4, v6])
        assert reload_refused(listeners, config) == (
            f"cannot listen on [::1]:{port} (tunnel 'v6') at a reload: the agent keeps that address from other "
            f"users as the other address of `localhost` beside 127.0.0.1:{port} (tunnel 'v4'); restart the agent "
            "to listen there")
        assert binds_of_another_user("::1", port)["::1 plain"] == "Address already in use"
    finally:
        listeners.close()
    listeners = Listeners(load_config(config))  # both, from the start
    try:
        write_config(config, test_pki, [v4])
        assert reload_refused(listeners, config) == (
            f"cannot keep [::1]:{port} from other users at a reload (the other address of `localhost` beside "
            f"127.0.0.1:{port}, where tunnel 'v4' listens): a listener the reload removes holds it until then; "
            "restart the agent")
        socket.create_connection(("::1", port_of(v6)), timeout=5).close()  # still listening
    finally:
        listeners.close()


def test_check_names_another_user_on_the_other_localhost_address(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """`card-agent check` fails the tunnel whose other `localhost` address uid 65534 listens on, as
    `run` would refuse to start, naming the holder."""
    port = free_port()
    config = write_config(tmp_path / "agent.toml", test_pki, [{**tunnel("pacs", 104), "listen": f"127.0.0.1:{port}"}])
    squatter = as_nobody(SQUATTER, "::1", str(port))
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "listening\n"
        checked = run_card_agent("check", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    finally:
        end(squatter)
    failed = [line for line in findings(checked.stdout) if line.startswith("fail")]
    assert checked.returncode == 2, checked.stdout
    assert failed == [
        f"fail listen pacs: tunnel pacs: cannot keep [::1]:{port} from other users (the other address of `localhost` "
        f"beside 127.0.0.1:{port}, where the agent listens: applications told `localhost` may try it first): it is "
        "already in use by uid 65534 (nobody): another user may be waiting for your applications' associations, to "
        f"read what they send (in plain text) to this port; find the program with `ss -ltnpe 'sport = :{port}'` and "
        "stop it, and do not send anything there until the agent listens again. Until then, use the address the "
        "agent listens on, not `localhost`; to keep both across restarts, listen on a unix socket or a port below "
        "1024 (docs/security.md)"], checked.stdout


def test_the_metrics_port_keeps_its_other_localhost_address_too(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A scraper told `localhost:PORT` (Prometheus, in Go, tries ::1 first) must read the agent's
    numbers, not another user's: uid 65534 cannot listen on [::1] at the metrics port while the
    agent serves it on 127.0.0.1, and can once the agent has stopped."""
    port = free_port()
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)],
                       metrics={"listen": f"127.0.0.1:{port}"}):
        assert set(binds_of_another_user("::1", port).values()) == {"Address already in use"}
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("::1", port), timeout=5)
    assert binds_of_another_user("::1", port)["::1 plain"] == "listening"
