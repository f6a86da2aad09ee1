"""A package upgrade under a running agent: the supervisor keeps running the code it started with,
while each card-session process is started from the files on disk, of the new release. The two
must be of one version; a card-session process of another one refuses before it touches the card,
and the sign-in fails saying what to do.

The upgrade here is what dpkg does to what the version is read from: the distribution's metadata
of a newer release appears on the path both processes import from (PYTHONPATH, first), after the
supervisor started. Real agent and card-session processes, SoftHSM tokens behind the fault module
(to pull and re-insert the card), a real pynetdicom PACS over TLS.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

from agent_runner import agent_status, running_agent, tunnel
from conftest import ProvisionedPki
from dicom_card_agent.version import agent_version
from fault_pkcs11 import FaultControl
from peers.ports import free_port
from peers.pynetdicom_scp import echo, tls_scp

NEWER = "99.0.0"


def logins(card: FaultControl) -> int:
    return sum(line.startswith("C_Login") for line in card.log_lines())


def install_metadata(site: Path, version: str) -> None:
    """The installed distribution's metadata, as a release of ``version`` installs it."""
    dist_info = site / f"dicom_card_agent-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: dicom-card-agent\nVersion: {version}\n")


def install_code_that_cannot_start(site: Path) -> None:
    """A release whose package the card-session process cannot even import (it needs something the
    old one did not): it exits before it can say which version it is."""
    package = site / "dicom_card_agent"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("this release needs a newer python3-cryptography")\n')


@pytest.mark.parametrize("release", ["checks the version", "cannot start"])
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
    running = agent_version()
    assert running != NEWER
    message = f"the agent was upgraded from {running} to {NEWER} while running: restart it: " \
              "systemctl --user restart card-agent"
    assert re.search(rf"card-agent: ERROR: sign-in to 'alice' \(serial \w+\) failed: {re.escape(message)}\n", log), log
    assert status["state"] == f"card present, not signed in: {message}"
    assert status["last_error"] == message
    assert logins_after == logins_before  # the process of the new release did not log in to the card
    assert log.count('event=sign-in subject="CN=Alice Example') == 1
    # The version the metrics give is the running code's, which the admin must restart to change.
    assert f'card_agent_build_info{{version="{running}"}} 1.0' in scraped, scraped
