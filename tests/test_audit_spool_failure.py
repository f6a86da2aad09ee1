"""A spool that fails under the repository sender (docs/audit.md, "Delivery guarantees").

The repository confirmed a message and the spool could not delete it (permissions here; a
read-only remount or a failing disk give the same error): the sender thread ended on that error,
nothing was delivered again until a restart, and ``card-agent status`` went on saying
"connected". The sender now treats it as an outage: one warning, ``status`` says why, it retries
with backoff, and once the spool works every message is delivered (the ones whose removal failed
perhaps twice), and the outage ends."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent_runner import SYSTEM_PYTHON, pki_for_user, running_agent, tunnel, wait_for, with_virtualenv_packages
from conftest import ProvisionedPki
from peers.pki_files import TlsServerFiles
from peers.ports import free_port
from peers.rsyslog import rsyslog_relp, rsyslog_tls
from test_audit_failure import delivered_xml, local_messages

USER = 65534  # not root: the permission of the spool directory must bind the agent


def status_as(user: int, pki: ProvisionedPki, config: Path, *options: str) -> subprocess.CompletedProcess:
    """``card-agent status`` as the agent's user (its control socket is that user's)."""
    command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", SYSTEM_PYTHON, "-c",
               "import sys; from dicom_card_agent.cli.entry import main; sys.exit(main())",
               "status", *options, "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, env=with_virtualenv_packages(pki.env()),
                          timeout=30, check=True)


def audit_line(status: str) -> str:
    return next(line for line in status.splitlines() if line.startswith("audit:"))


@pytest.mark.parametrize("transport", ["relp", "tls"])
def test_a_delivered_message_the_spool_cannot_remove_pauses_delivery_and_loses_nothing(
        transport: str, test_pki: ProvisionedPki, tmp_path: Path) -> None:
    opener = rsyslog_relp if transport == "relp" else rsyslog_tls
    with pki_for_user(test_pki, USER) as (pki, work), \
            opener(tmp_path / "rsyslog", TlsServerFiles.from_pki(test_pki.pki), start=False) as repository:
        spool, audit_file, config = work / "spool", work / "log" / "audit.log", work / "agent" / "agent.toml"
        syslog = {"address": repository.address, "ca": str(pki.ca_bundle), "server_name": "localhost",
                  "retry_max": 0.5, "transport": transport}
        audit = {"file": str(audit_file), "spool": str(spool), "syslog": syslog}
        with running_agent(pki, work / "agent", [tunnel("pacs", free_port())], user=USER, audit=audit,
                           agent={"runtime_dir": str(work / "runtime")}) as agent:
            wait_for(lambda: len(list(spool.glob("*.msg"))) == 2)  # Application Start and Login wait
            # The real permission check of the kernel makes the fault: the agent's unlink gets EACCES.
            spool.chmod(0o500)
            try:
                repository.start()
                agent.wait_for_log("cannot remove a delivered message from the audit spool")
                deadline = time.monotonic() + 10
                while len(repository.messages()) < 6 and time.monotonic() < deadline:
                    time.sleep(0.1)
                during = json.loads(status_as(USER, pki, config, "--json").stdout)["audit"]
                text = status_as(USER, pki, config).stdout
                resent = len(repository.messages())
            finally:
                spool.chmod(0o700)
            reason = f"cannot remove a delivered message from the audit spool {spool}: Permission denied"
            assert during["connected"] is False and during["last_error"] == reason, during
            assert audit_line(text) == (f"audit:    to {audit_file} and {repository.address}, repository not "
                                        f"connected, 2 waiting ({reason})"), text
            assert resent >= 6, agent.log()  # the sender went on trying: the 2 messages, 3 times at least
            agent.process.send_signal(signal.SIGHUP)  # one more event, recorded once the spool works again
            agent.wait_for_log("confirms messages again", timeout=20)
            wait_for(lambda: not list(spool.glob("*.msg")), 20)
            # a message's file goes a moment before the sender counts it delivered
            deadline = time.monotonic() + 10
            while "0 waiting" not in (after := status_as(USER, pki, config).stdout) and time.monotonic() < deadline:
                time.sleep(0.2)
            log = agent.log()
        local = local_messages(audit_file)
        repository.wait_for_messages(len(local))
        time.sleep(0.3)
        delivered = delivered_xml(repository)
    warnings = re.findall(r"WARNING: audit: .*", log)
    assert warnings[0].startswith(f"WARNING: audit: audit repository {repository.address}: cannot connect"), log
    assert warnings[1] == (f"WARNING: audit: {reason}; delivery to the audit repository {repository.address} is "
                           "retried until the spool works again (a message confirmed but not removed is sent "
                           "again); check that file system and the directory's permissions"), log
    assert len(warnings) == 2, log  # once per outage, not per attempt
    assert re.search(rf"INFO: audit: the audit repository {re.escape(repository.address)} confirms messages again "
                     rf"\(TLSv1\.[23]{', RELP' if transport == 'relp' else ''}\); \d+ messages? to deliver", log), log
    assert "the repository sender stopped" not in log
    assert audit_line(after) == f"audit:    to {audit_file} and {repository.address}, repository connected, 0 waiting"
    assert set(delivered) == set(local)  # every event reached the repository ...
    assert [line for line in dict.fromkeys(delivered)] == local  # ... in order (the first two more than once)
    assert len(local) >= 5  # Start, Login, the SIGHUP's alert, Logout, Stop
