"""A package upgrade under a running agent: the supervisor keeps running the code it started with,
while each card-session process is started from the files on disk, of the new release. The two
must be of one version and one build; a card-session process of another one refuses before it
touches the card, and the sign-in fails saying what to do. One version, another build is the
project's own upgrade path (0.1.0-1 -> 0.1.0-2), and every build from main is 0.1.0: a report
whose fields the new build renamed was then lost from the audit trail without notice.

The upgrade here is what dpkg does to what the version and build are read from: the distribution's
metadata of another build (its METADATA, and the RECORD that lists its files) appears on the path
both processes import from (PYTHONPATH, first), after the supervisor started. Real agent and
card-session processes, SoftHSM tokens behind the fault module (to pull and re-insert the card), a
real pynetdicom PACS over TLS.
"""

from __future__ import annotations

import hashlib
import re
import time
import urllib.request
from pathlib import Path

import pytest

from agent_runner import agent_status, log_lines, running_agent, tunnel
from conftest import ProvisionedPki
from dicom_card_agent.version import agent_version
from fault_pkcs11 import FaultControl
from peers.ports import free_port
from peers.pynetdicom_scp import echo, tls_scp

NEWER = "99.0.0"


def logins(card: FaultControl) -> int:
    return sum(line.startswith("C_Login") for line in card.log_lines())


# What pip writes of a build whose session/audit.py is not the running one's (its hash differs).
OTHER_BUILD_RECORD = ("dicom_card_agent/session/audit.py,sha256=Ue3M7c9vO0bq1y2WqzS4o8b1qk9XbZb8l1sQeJ2p3hA,12071\n"
                      "dicom_card_agent-{version}.dist-info/RECORD,,\n")


def install_metadata(site: Path, version: str, record: str | None = None) -> None:
    """The installed distribution's metadata, as a build of ``version`` installs it (with its RECORD
    when given: pip writes one, which lists every file installed with its hash)."""
    dist_info = site / f"dicom_card_agent-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: dicom-card-agent\nVersion: {version}\n")
    if record is not None:
        (dist_info / "RECORD").write_text(record)


def install_code_that_cannot_start(site: Path) -> None:
    """A release whose package the card-session process cannot even import (it needs something the
    old one did not): it exits before it can say which version it is."""
    package = site / "dicom_card_agent"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("this release needs a newer python3-cryptography")\n')


@pytest.mark.parametrize("release", ["checks the version", "cannot start", "same version, another build"])
def test_a_card_session_process_of_another_release_fails_the_sign_in_saying_to_restart_the_agent(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, release: str) -> None:
    site = tmp_path / "site"
    site.mkdir()
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    metrics = free_port()
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], module=str(fault_module),
                          env={**card.env(), "PYTHONPATH": str(site)},
                          metrics={"listen": f"127.0.0.1:{metrics}"}) as agent:
        agent.wait_for_log('event=sign-in subject="CN=Alice Example')
        assert echo(agent.port())
        logins_before = logins(card)
        assert logins_before == 1
        running = agent_version()
        if release == "same version, another build":  # 0.1.0-1 -> 0.1.0-2: the version stays
            other_record = OTHER_BUILD_RECORD.format(version=running)
            install_metadata(site, running, other_record)  # the upgrade, while the agent runs
        else:
            install_metadata(site, NEWER)  # the upgrade, while the agent runs
        if release == "cannot start":
            install_code_that_cannot_start(site)

        card.remove_card()
        agent.wait_for_log('event=sign-out reason="card removed"')
        card.insert_card()
        log = agent.wait_for_log(" failed: the agent was upgraded ")
        status = agent_status(tmp_path / "agent", test_pki.env(**card.env()))
        assert not echo(agent.port())
        logins_after = logins(card)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
            scraped = response.read().decode()
    # The version and build the metrics give are the running code's, which the admin must restart to change.
    build_info = re.search(r'^card_agent_build_info\{build="([^"]*)",version="([^"]*)"\} 1\.0$', scraped, re.M)
    assert build_info is not None, scraped
    running_build = build_info[1]
    assert build_info[2] == running and running != NEWER
    if release == "same version, another build":
        other_build = hashlib.sha256(other_record.encode()).hexdigest()[:12]
        assert re.fullmatch("[0-9a-f]{12}", running_build) and running_build != other_build, running_build
        upgrade = f"{running} (build {running_build}) to {running} (build {other_build})"
    else:
        upgrade = f"{running} to {NEWER}"
    message = f"the agent was upgraded from {upgrade} while running: restart it: systemctl --user restart card-agent"
    assert re.search(rf"card-agent: ERROR: sign-in to 'alice' \(serial \w+\) failed: {re.escape(message)}\n", log), log
    assert status["state"] == f"card present, not signed in: {message}"
    assert status["last_error"] == message
    assert logins_after == logins_before  # the process of the new release did not log in to the card
    assert log.count('event=sign-in subject="CN=Alice Example') == 1


# The fault injected below: a card-session process whose association reports name a field otherwise
# (what build 0.1.0-2 did to calling_ae_title), which the build check now keeps from ever running
# under the supervisor, so no real part can produce it any more. Only the card-session process is
# changed: it is the one started with -P (session/supervisor.py _popen), the supervisor is not.
RENAMES_A_REPORT_FIELD = '''
import sys

if sys.flags.safe_path:
    from dicom_card_agent.session import channel

    _send = channel.send

    def send(to, message, fds=None):
        fields = message.get("fields")
        if isinstance(fields, dict) and "calling_ae_title" in fields:
            fields = {("calling_ae" if key == "calling_ae_title" else key): value for key, value in fields.items()}
            message = {**message, "fields": fields}
        return _send(to, message, fds)

    channel.send = send
'''


@pytest.mark.parametrize("on_failure", ["continue", "refuse"])
def test_a_report_the_supervisor_cannot_record_is_an_audit_failure(test_pki: ProvisionedPki, tmp_path: Path,
                                                                   on_failure: str) -> None:
    """It was logged with a traceback and nothing else: `status` and the metrics said no event was
    lost, and under on_failure = "refuse" every association went on unrecorded."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(RENAMES_A_REPORT_FIELD)
    audit_file = tmp_path / "audit.log"
    metrics = free_port()
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], env={"PYTHONPATH": str(site)},
                          audit={"file": str(audit_file), "on_failure": on_failure},
                          metrics={"listen": f"127.0.0.1:{metrics}"}) as agent:
        agent.wait_for_log("event=sign-in ")
        first = echo(agent.port())
        log = agent.wait_for_log(" could not be recorded ")
        second = echo(agent.port())
        time.sleep(0.5)  # the reports of the second association, if it was let through
        status = agent_status(tmp_path / "agent", test_pki.env())["audit"]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
            scraped = response.read().decode()
        rejections = [line for line in log_lines(agent.log()) if ": rejected: " in line]
    refused = on_failure == "refuse"
    consequence = '; [audit] on_failure = "refuse": new associations are refused until the agent is restarted'
    assert ("card-agent: ERROR: audit: the card session's report association-begin could not be recorded "
            "(KeyError: 'calling_ae_title'); what it said is missing from the audit trail"
            f"{consequence if refused else ''}\n") in log, log
    assert "Traceback" not in log
    assert first
    assert second is not refused
    assert status["failures"] == status["lost"] >= 2, status  # the first association's begin and end at least
    assert (status["refusing"], status["refusal"]) == (refused, (
        "the audit trail cannot record what the card session reports (association-begin: KeyError: "
        "'calling_ae_title'): restart the agent") if refused else ""), status
    if refused:  # the application's rejection says what to do: not to free space, as for a full disk
        assert [line.split(": rejected: ", 1)[1] for line in rejections] == [
            "the audit trail cannot record what the card session reports (association-begin: KeyError: "
            "'calling_ae_title'): restart the agent"], rejections
    failures = re.search(r"^card_agent_audit_failures_total (\S+)$", scraped, re.M)
    assert failures is not None and float(failures[1]) == status["failures"], scraped
