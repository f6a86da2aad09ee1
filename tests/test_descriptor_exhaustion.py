"""The supervisor out of file descriptors: what `status` says, and what comes back once they do.

The limit is the real one (``prlimit`` on the running supervisor, as a descriptor leak or another
user's flood of connections would leave it); SoftHSM behind the fault module, a pynetdicom PACS."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from agent_runner import (
    agent_status,
    card_session_pid,
    log_lines,
    run_card_agent,
    running_agent,
    signed_in_through_fault_module,
    tunnel,
    wait_for,
)
from conftest import ProvisionedPki
from dicom_card_agent.session.channel import LEASE_SECONDS
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import echo, tls_scp

SIGNED_IN = 'event=sign-in subject="CN=Alice Example'
NO_DESCRIPTOR_LEFT = "no file descriptor left (another process's connections may hold them)"


@contextlib.contextmanager
def descriptors_nearly_exhausted(pid: int, spare: int = 2) -> Iterator[None]:
    """``pid`` may open only ``spare`` more descriptors (enough to answer `status`, too few for a
    look at the reader) for the block."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    # The limit is on descriptor numbers, not on their count: a new descriptor takes the lowest free
    # number, and fails once none is below the limit. A process whose numbers have gaps (one it
    # closed) could open as many more as the gaps below a limit set from the count.
    taken = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    free = [number for number in range(len(taken) + spare + 1) if number not in taken]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (free[spare], hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def holds_listener(pid: int, port: int) -> bool:
    """Process ``pid`` holds the socket listening on 127.0.0.1:``port`` (the card session was lent it)."""
    local = f"0100007F:{port:04X}"
    inodes = {fields[9] for fields in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
              if fields[1] == local and fields[3] == "0A"}
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            held.add(os.readlink(fd))
    return any(f"socket:[{inode}]" in held for inode in inodes)


def test_status_says_the_reader_cannot_be_looked_at_and_that_new_associations_are_refused(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """The card loop takes the card to be still there while it cannot look (another user's flood
    must not sign the clinician out), and past the lease the card session refuses new associations.
    `status` said only "signed in"; the reason was in the log alone."""
    card = FaultControl(tmp_path / "reader.ctl")
    with signed_in_through_fault_module(test_pki, tmp_path / "agent", fault_module, card) as (agent, _):
        env = test_pki.env(**card.env())
        with descriptors_nearly_exhausted(agent.process.pid):
            agent.wait_for_log(f"cannot look at the card reader: {NO_DESCRIPTOR_LEFT}; the card is taken to be "
                               "still there")
            time.sleep(LEASE_SECONDS + 1)
            answer = agent_status(tmp_path / "agent", env)
            text = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=env,
                                  check=True).stdout
        wait_for(lambda: agent_status(tmp_path / "agent", env)["reader_trouble"] is None, timeout=10)
    assert answer["state"] == "signed in"
    assert re.fullmatch(rf"cannot be looked at for \d+ s: {re.escape(NO_DESCRIPTOR_LEFT)}; new associations are "
                        "refused until it can", answer["reader_trouble"]), answer
    assert f"\nreader:   {answer['reader_trouble'][:24]}" in text, text


def test_a_process_out_of_descriptors_is_not_told_to_install_the_pkcs11_provider(tmp_path: Path) -> None:
    """Running `openssl version -m` failed with EMFILE, which was taken for a missing provider: a
    sign-in under a descriptor flood told the admin to install a package that was installed."""
    script = tmp_path / "look.py"
    script.write_text(
        "import os, resource\n"
        "from dicom_card_agent.tls.provider import ProviderError, provider_module_path\n"
        "print(provider_module_path())\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir('/proc/self/fd')), hard))\n"
        "try:\n"
        "    provider_module_path()\n"
        "except ProviderError as error:\n"
        "    print(error)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    installed, error = result.stdout.splitlines()
    assert installed.endswith("/pkcs11.so")
    assert error == "cannot run `openssl version -m` to find the pkcs11-provider: Too many open files", error


def test_a_sign_in_that_finds_no_descriptor_left_is_tried_again_once_there_are(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A reload that signs the card in again while the supervisor is out of descriptors: the
    sign-in cannot start. It is tried again until it does, so the SoftHSM token (which cannot be
    re-inserted) signs in by itself once descriptors are back. It used to wait for a re-insertion
    for good, with "not signed in: the OpenSSL pkcs11-provider is not installed" in `status`."""
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
            agent.wait_for_log(SIGNED_IN)
            config = tmp_path / "agent" / "agent.toml"
            config.write_text(config.read_text().replace("[trust]\n", '[trust]\ncrl_expired = "warn"\n', 1))
            with descriptors_nearly_exhausted(agent.process.pid):
                agent.process.send_signal(signal.SIGHUP)
                agent.wait_for_log("could not start: ", timeout=15)
                waiting = agent_status(tmp_path / "agent", test_pki.env())["state"]
            wait_for(lambda: agent.log().count(SIGNED_IN) == 2, timeout=20)
            assert echo(agent.port()), agent.log()
            log = agent.log()
    retried = [line for line in log_lines(log) if "could not start: " in line]
    assert re.fullmatch(r"card-agent: WARNING: sign-in to 'alice' \(serial \w+\) could not start: .*"
                        r"(Too many open files|EMFILE).*: trying again in \d+ s", retried[0]), retried
    assert "event=sign-in-failed" not in log, log
    assert re.fullmatch(r"card present, the sign-in could not start \(.*Too many open files.*\): trying again",
                        waiting), waiting


def test_a_card_session_that_ran_out_of_descriptors_signs_again_once_there_are(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A full handshake with three descriptors to spare in the card session: the association is
    refused for want of descriptors, and once they are back the clinician's next associations work.

    SoftHSM, once it failed for want of files, answers GeneralError for good in that process while
    the card loop (another process) goes on seeing the token. The check after the failed signature
    took that for a pulled card, which the card loop would act on: it never did, and every full
    handshake failed with "the card was removed" until the agent was restarted."""
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        tunnels = [tunnel("pacs", pacs.port, session_resumption=False)]
        with running_agent(test_pki, tmp_path / "agent", tunnels) as agent:
            agent.wait_for_log(SIGNED_IN)
            session = card_session_pid(agent.process.pid)
            assert session is not None
            wait_for(lambda: holds_listener(session, agent.port()))
            # Before its first signature: the pkcs11-provider and SoftHSM still open files for it.
            with descriptors_nearly_exhausted(session, spare=3):
                refused = echo(agent.port())
            deadline = time.monotonic() + 20
            while not echo(agent.port()) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert echo(agent.port()), agent.log()
            log = agent.log()
    assert not refused, log
    assert ("the card did not sign the TLS handshake: no file descriptor left in the card session (are connections "
            "being held open?)") in log, log
    assert "the card was removed" not in log, log
    lost = [line for line in log_lines(log) if "ERROR: the card no longer signs" in line]
    assert all(line.endswith("the module cannot say whether the card is in its reader: GeneralError; the card "
                             "session ends") for line in lost), lost


def test_listeners_lent_to_a_card_session_out_of_descriptors_are_taken_back_not_its_end(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A reload lends the tunnels' listening sockets to the card session again; with no descriptor
    to spare there, the kernel drops them from the message. The card-session process ended on that
    ("zip() argument 2 is shorter than argument 1", exit status 1): a lost session, the PIN asked
    again. It says so and the supervisor takes the sockets back, accepting (and handing connections
    over) itself: once descriptors are back, the same session serves the next association."""
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
            agent.wait_for_log(SIGNED_IN)
            session = card_session_pid(agent.process.pid)
            assert session is not None
            wait_for(lambda: holds_listener(session, agent.port()))
            with descriptors_nearly_exhausted(session, spare=0):
                agent.process.send_signal(signal.SIGHUP)  # nothing changed: the listeners are lent again
                agent.wait_for_log("could not take over the tunnels' listening sockets", timeout=10)
            wait_for(lambda: not holds_listener(session, agent.port()))
            served = echo(agent.port())
            log = agent.log()
    assert served, log
    assert "event=sign-out" not in log and "exited with status" not in log, log
    assert re.search(r"card-agent\[session\]: ERROR: could not take over the tunnels' listening sockets: 0 of 1 "
                     r"arrived \(no file descriptor left in the card session\?\); the agent accepts on them itself",
                     log), log
    assert f"(pid {session})" in log and log.count(SIGNED_IN) == 1, log
