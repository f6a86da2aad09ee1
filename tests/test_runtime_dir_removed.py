"""The runtime directory removed while the agent runs (logind removes /run/user/UID at the user's
last logout and makes it again, empty, at the next login; tmpfiles cleans directories).

Before, nothing noticed: `card-agent status` and `card-agent lock` (the desktop's "Lock DICOM
session") found no agent until a restart, the unix socket listener was gone (ENOENT) and neither a
SIGHUP nor a new card session made them again. Now the agent looks at its socket files every
SOCKET_FILE_CHECK_SECONDS, makes them again, refusing a directory another user made meanwhile, and
says so in its log (and, for a listener it cannot make again, in `status`)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from agent_runner import agent_status, card_session_pid, log_lines, running_agent, tunnel, wait_for
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.dicom.pdu import a_release_rp
from peers.dcmtk import storescp
from peers.pki_files import TlsServerFiles
from test_tunnel_agent import whole_store_association

OTHER_UID = 65534  # the user who makes a directory of the same name meanwhile
WITHIN = 10.0  # seconds: two periodic looks (SOCKET_FILE_CHECK_SECONDS), and then some


def _agent_with_unix_tunnel(test_pki: ProvisionedPki, tmp_path: Path, scp_port: int, xdg: Path):
    """The agent with its runtime directory and one tunnel's unix socket under ``xdg``, as a desktop
    user's configuration puts them under XDG_RUNTIME_DIR."""
    unix_tunnel = {**tunnel("pacs", scp_port), "listen": f"unix:{xdg / 'dicom' / 'pacs.sock'}"}
    return running_agent(test_pki, tmp_path / "agent", [unix_tunnel], agent={"runtime_dir": str(xdg / "card-agent")})


def _logout_and_login(xdg: Path) -> None:
    """What logind does at the last logout and the next login: the directory goes, and comes back empty."""
    shutil.rmtree(xdg)
    xdg.mkdir(mode=0o700)


def _store_over_unix_socket(path: Path, patient: str) -> tuple[bytes, str]:
    """An application's whole association (A-ASSOCIATE-RQ, C-STORE-RQ, A-RELEASE-RQ) on the unix
    socket: what came back, and the stored instance's SOP Instance UID."""
    association, instance_uid = whole_store_association(patient)
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(15)
        client.connect(str(path))
        client.sendall(association)
        answers = b""
        while a_release_rp() not in answers and (chunk := client.recv(65536)):
            answers += chunk
    return answers, instance_uid


def _holders_of_listener(path: Path) -> set[int]:
    """The pids of the processes holding the unix socket listening at ``path`` (ss -xlp)."""
    listing = subprocess.run(["ss", "-xlpn"], capture_output=True, text=True, check=True).stdout
    lines = [line for line in listing.splitlines() if f" {path} " in line]
    return {int(pid) for line in lines for pid in re.findall(r"pid=(\d+)", line)}


def test_a_removed_runtime_directory_is_made_again_and_status_lock_and_the_unix_listener_work(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    control, listener = xdg / "card-agent" / "control.sock", xdg / "dicom" / "pacs.sock"
    env = test_pki.env()
    with storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki)) as scp:
        with _agent_with_unix_tunnel(test_pki, tmp_path, scp.port, xdg) as agent:
            assert agent_status(tmp_path / "agent", env)["state"] == "signed in"

            _logout_and_login(xdg)
            wait_for(lambda: control.is_socket() and listener.is_socket(), timeout=WITHIN)
            wait_for(lambda: card_session_pid(agent.process.pid) in _holders_of_listener(listener), timeout=WITHIN)
            status = agent_status(tmp_path / "agent", env)
            answers, instance_uid = _store_over_unix_socket(listener, "AFTER^THE^LOGOUT")
            locked = run_card_agent("lock", "--config", tmp_path / "agent" / "agent.toml", env=env)
            log = log_lines(agent.log())
    assert status["state"] == "signed in" and status["tunnels"][0]["listen_error"] is None, status
    assert answers.endswith(a_release_rp()), answers
    assert [p.name.endswith(f".{instance_uid}") for p in scp.stored_files()] == [True]
    assert locked.returncode == 0, locked
    assert locked.stdout.startswith("locked: every connection of the card session was closed"), locked.stdout
    assert (f"card-agent: WARNING: control socket {control} was removed with its directory {control.parent} while "
            "the agent ran (a login session's end, or a clean-up, removes runtime directories): made it again; "
            "`card-agent status` and `card-agent lock` reach the agent again") in log, log
    assert (f"card-agent: WARNING: tunnel pacs: its socket file {listener} was removed with its directory "
            f"{listener.parent} while the agent listened on it (a login session's end, or a clean-up, removes "
            "runtime directories): listening on a new one there; applications can connect again") in log, log
    assert not control.exists() and not listener.exists()  # the files made again are removed at the stop


def test_a_directory_another_user_made_meanwhile_is_refused_and_said_until_it_is_gone(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The directory checks of the start apply: a socket directory of another user's is never used
    (they could replace the agent's socket). The log and `status` say why; once it is gone the
    listener is made again."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    listener = xdg / "dicom" / "pacs.sock"
    env = test_pki.env()
    with storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki)) as scp:
        with _agent_with_unix_tunnel(test_pki, tmp_path, scp.port, xdg) as agent:
            others = xdg / "made-by-another-user"
            others.mkdir(mode=0o700)
            os.chown(others, OTHER_UID, OTHER_UID)
            listener.parent.rename(xdg / "removed")  # then the other user's takes its name (no look between)
            others.rename(listener.parent)
            shutil.rmtree(xdg / "removed")
            refused = (f"card-agent: ERROR: tunnel pacs: its socket file {listener} was removed and cannot be made "
                       f"again: the socket directory {listener.parent} is owned by uid {OTHER_UID}, who could "
                       "replace the agent's socket; it must be a directory owned by uid 0 (the agent's user) with "
                       "mode 0700 (or 0711): remove it so that the agent creates it, or choose another path; "
                       "applications cannot connect there until it is (tried again every 2 s)")
            agent.wait_for_log(refused.removeprefix("card-agent: ERROR: "), timeout=WITHIN)
            status = agent_status(tmp_path / "agent", env)
            text = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=env).stdout

            shutil.rmtree(listener.parent)
            agent.process.send_signal(signal.SIGHUP)  # an administrator's: the look is made at once
            agent.wait_for_log("SIGHUP: configuration ")
            made_again_at_the_reload = listener.is_socket()
            answers, instance_uid = _store_over_unix_socket(listener, "ONCE^IT^IS^GONE")
            after = agent_status(tmp_path / "agent", env)
            log = log_lines(agent.log())
    assert status["tunnels"][0]["listen_error"] == refused.removeprefix("card-agent: ERROR: "), status
    assert f"\n  not reachable: {refused.removeprefix('card-agent: ERROR: ')}\n" in text, text
    assert log.count(refused) == 1, log  # said once, not at every look
    assert made_again_at_the_reload
    assert after["tunnels"][0]["listen_error"] is None, after
    assert answers.endswith(a_release_rp()), answers
    assert [p.name.endswith(f".{instance_uid}") for p in scp.stored_files()] == [True]
    made_again = (f"card-agent: WARNING: tunnel pacs: its socket file {listener} was removed with its directory "
                  f"{listener.parent} while the agent listened on it (a login session's end, or a clean-up, removes "
                  "runtime directories): listening on a new one there; applications can connect again")
    assert made_again in log, log
    assert log.index(made_again) < next(i for i, line in enumerate(log) if line.startswith("card-agent: INFO: SIGHUP"))


def test_a_runtime_directory_another_user_made_meanwhile_is_refused_until_it_is_gone(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The control socket is never made in a runtime directory another user made (they could put a
    socket of theirs in its place and answer `status` and `lock`): the log says why, until it is gone."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    control = xdg / "card-agent" / "control.sock"
    env = test_pki.env()
    with storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki)) as scp:
        with _agent_with_unix_tunnel(test_pki, tmp_path, scp.port, xdg) as agent:
            others = xdg / "made-by-another-user"
            others.mkdir(mode=0o700)
            os.chown(others, OTHER_UID, OTHER_UID)
            control.parent.rename(xdg / "removed")  # then the other user's takes its name (no look between)
            others.rename(control.parent)
            shutil.rmtree(xdg / "removed")
            refused = (f"card-agent: ERROR: control socket {control} was removed and cannot be made again: the "
                       f"runtime directory {control.parent} is not a private directory of uid 0 (this agent's user, "
                       f"mode 0700, no symbolic link) but owned by uid {OTHER_UID} with mode 0700: another user may "
                       "have made it; remove it and the agent makes it again; `card-agent status` and `card-agent "
                       "lock` cannot reach this agent until it is (tried again every 2 s)")
            agent.wait_for_log(refused.removeprefix("card-agent: ERROR: "), timeout=WITHIN)
            unreachable = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=env)

            shutil.rmtree(control.parent)
            wait_for(lambda: control.is_socket(), timeout=WITHIN)
            status = agent_status(tmp_path / "agent", env)
            log = log_lines(agent.log())
    # `status` itself refuses to ask there (agent/session/identity.py), as before.
    assert unreachable.returncode == 2 and f"{control.parent} belongs to uid {OTHER_UID}" in unreachable.stderr, \
        unreachable
    assert log.count(refused) == 1, log
    assert status["state"] == "signed in", status
    assert (f"card-agent: WARNING: control socket {control} was removed with its directory {control.parent} while "
            "the agent ran (a login session's end, or a clean-up, removes runtime directories): made it again; "
            "`card-agent status` and `card-agent lock` reach the agent again") in log, log
