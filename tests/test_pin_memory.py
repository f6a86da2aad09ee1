"""Where the PIN is left in memory: a same-user process must not find it (docs/pin-handling.md).

The agent runs on its own SoftHSM tokens, whose user PIN is changed to a distinctive one (the test
PIN 123456 could occur in memory by chance), and without CAP_SYS_PTRACE. The test, with that
capability, reads /proc/PID/mem of the supervisor and of the card-session process and counts the
PIN's bytes; a process of the agent's user without it must not be able to read them at all.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent_runner import WITHOUT_PTRACE, running_agent, tunnel, wait_for
from conftest import HELPERS, USER_PIN, ProvisionedPki, provisioned, run_card_agent
from peers.ports import free_port
from peers.pynetdicom_scp import associate, tls_scp

PIN = "Vq7-pin-k3ZmW9x"
VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture
def private_pki(tmp_path: Path) -> ProvisionedPki:
    """Tokens of this test alone, alice's user PIN changed to PIN."""
    pki = provisioned(tmp_path / "pki")
    subprocess.run([sys.executable, "-c", (
        "from dicom_card_agent.token.module import load_module; "
        "from dicom_card_agent.token.discovery import find_token\n"
        "token = find_token(load_module('softhsm2'), 'alice')\n"
        f"with token.open(rw=True, user_pin={USER_PIN!r}) as s: s.set_pin({USER_PIN!r}, {PIN!r})")],
        env={**os.environ, "SOFTHSM2_CONF": str(pki.softhsm_conf)}, check=True, timeout=60)
    return pki


def scripted_pinentry(directory: Path) -> tuple[Path, Path]:
    """A pinentry program that types PIN; returns it and the transcript of what it was asked."""
    pin_file, transcript, program = directory / "typed-pin", directory / "pinentry.log", directory / "pinentry"
    pin_file.write_text(PIN + "\n")
    program.write_text(f"#!/bin/sh\nexec {HELPERS / 'scripted_pinentry.sh'} {pin_file} {transcript}\n")
    program.chmod(0o755)
    return program, transcript


def occurrences(pid: int, needle: bytes) -> int:
    """How often ``needle`` is in the process's readable memory (read as root)."""
    count = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        for line in maps:
            addresses, permissions = line.split()[:2]
            if not permissions.startswith("r"):
                continue
            start, end = (int(a, 16) for a in addresses.split("-"))
            try:
                memory.seek(start)
                count += memory.read(end - start).count(needle)
            except (OSError, ValueError, OverflowError):  # [vvar] and other special mappings
                continue
    return count


def card_session_pid(supervisor: int) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == supervisor and b"agent.session.worker" in cmdline:
            return int(entry)
    raise AssertionError(f"no card-session process under {supervisor}")


def readable_by_its_own_user(pid: int) -> bool:
    """Whether another process of the agent's user can open its memory (a dumpable process: yes)."""
    probe = subprocess.run([*WITHOUT_PTRACE, sys.executable, "-c", f"open('/proc/{pid}/mem', 'rb')"],
                           capture_output=True, text=True, timeout=30)
    return probe.returncode == 0


def echo(port: int) -> None:
    association = associate(port, sop_classes=[VERIFICATION])
    assert association.is_established and association.send_c_echo().Status == 0
    association.release()


def test_no_pin_left_in_the_supervisor_and_none_anywhere_after_lock(private_pki: ProvisionedPki) -> None:
    workdir = private_pki.directory.parent / "agent"
    program, transcript = scripted_pinentry(private_pki.directory.parent)
    needle = PIN.encode()
    with tls_scp(pki_dir=private_pki.pki) as pacs:
        with running_agent(private_pki, workdir, [tunnel("pacs", pacs.port, allowed_uids=[os.getuid()])],
                           pin="unused", prefix=WITHOUT_PTRACE, identity={"pin": f"pinentry:{program}"}) as agent:
            agent.wait_for_log('event=sign-in subject="CN=Alice Example')
            echo(agent.port())
            supervisor, session = agent.process.pid, card_session_pid(agent.process.pid)
            assert transcript.read_text().count("GETPIN") == 1
            assert not any(needle in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in (supervisor, session))
            # Neither process can be read by another process of the same user (nor dumped), and the
            # PIN went to the card-session process and was wiped in the supervisor. The card-session
            # process wiped its buffer once logged in; SoftHSM keeps no copy of its own (other modules
            # may, until the process ends: docs/pin-handling.md).
            seen = {"supervisor readable": readable_by_its_own_user(supervisor),
                    "card session readable": readable_by_its_own_user(session),
                    "PIN copies in the supervisor": occurrences(supervisor, needle),
                    "PIN copies in the card session": occurrences(session, needle)}
            assert seen == {"supervisor readable": False, "card session readable": False,
                            "PIN copies in the supervisor": 0, "PIN copies in the card session": 0}

            run_card_agent("lock", "--config", workdir / "agent.toml", env=private_pki.env(), check=True)
            agent.wait_for_log('event=sign-out reason="locked"')
            wait_for(lambda: not Path(f"/proc/{session}").exists())
            assert occurrences(supervisor, needle) == 0
            log = agent.log()
    assert PIN not in log


@pytest.mark.parametrize("metrics", [False, True], ids=["plain", "with metrics"])
def test_env_pin_lives_in_one_locked_copy_and_in_no_environment(private_pki: ProvisionedPki, metrics: bool) -> None:
    """With [metrics] too: prometheus_client imports wsgiref, which copies the whole environment at
    import; the agent imports it only after taking the PIN out."""
    workdir = private_pki.directory.parent / f"agent-{metrics}"
    needle = PIN.encode()
    with tls_scp(pki_dir=private_pki.pki) as pacs:
        with running_agent(private_pki, workdir, [tunnel("pacs", pacs.port, allowed_uids=[os.getuid()])],
                           pin=PIN, prefix=WITHOUT_PTRACE,
                           metrics={"listen": f"127.0.0.1:{free_port()}"} if metrics else None) as agent:
            agent.wait_for_log('event=sign-in subject="CN=Alice Example')
            echo(agent.port())
            supervisor, session = agent.process.pid, card_session_pid(agent.process.pid)
            # Not in the environment the supervisor started with (/proc/PID/environ shows that block),
            # the card-session process never had the variable, and exactly one copy is kept for the
            # next sign-in: the buffer locked in memory.
            seen = {"PIN in the supervisor's environ": needle in Path(f"/proc/{supervisor}/environ").read_bytes(),
                    "variable in the card session's environ": bool(re.search(
                        rb"(^|\0)CARD_PIN=", Path(f"/proc/{session}/environ").read_bytes())),
                    "PIN copies in the supervisor": occurrences(supervisor, needle),
                    "memory locked": "VmLck:\t       0 kB" not in Path(f"/proc/{supervisor}/status").read_text()}
            assert seen == {"PIN in the supervisor's environ": False, "variable in the card session's environ": False,
                            "PIN copies in the supervisor": 1, "memory locked": True}
            run_card_agent("lock", "--config", workdir / "agent.toml", env=private_pki.env(), check=True)
            agent.wait_for_log('event=sign-out reason="locked"')
            assert occurrences(supervisor, needle) == 1
