"""What the audit trail says about a PACS that is down and about an agent stopped by an error
(issue 10): neither is a false alarm nor a false success at the audit repository."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

from agent_runner import associate_rq, running_agent, s_server, send_and_close, tunnel, write_config
from conftest import USER_PIN, ProvisionedPki
from dicom_card_agent.tunnel.relay import reject_pdu
from peers.ports import free_port
from test_agent_audit import event_ids


def audit_messages(audit_file: Path) -> list[ET.Element]:
    return [ET.fromstring(line) for line in audit_file.read_bytes().splitlines()]


def test_a_pacs_that_is_down_is_no_security_alert_an_untrusted_one_is(test_pki: ProvisionedPki,
                                                                     tmp_path: Path) -> None:
    closed_port = free_port()  # nothing listens there: the TCP connection is refused
    audit_file = tmp_path / "audit" / "audit.log"
    with s_server(test_pki, tmp_path, "-naccept", "1", cert="untrusted-server-chain.pem",
                  key="untrusted-server.key") as (untrusted_port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("down", closed_port), tunnel("rogue", untrusted_port)],
                           audit={"file": str(audit_file)}) as agent:
            down_answer = send_and_close(agent.port("down"), associate_rq())
            rogue_answer = send_and_close(agent.port("rogue"), associate_rq())
            log = agent.wait_for_log("tunnel down: uid 0 pid unknown from 127.0.0.1:")
    messages = audit_messages(audit_file)
    ids = event_ids(messages)
    alerts = [ET.tostring(m, encoding="unicode") for m, i in zip(messages, ids, strict=True) if i.startswith("110113/")]
    assert down_answer == reject_pdu(transient=True) and rogue_answer == reject_pdu(transient=False)
    assert f"cannot reach the PACS at 127.0.0.1:{closed_port}: connection refused" in log, log
    assert len(alerts) == 1 and ids.count("110113/110126") == 1, ids  # Node Authentication: the rogue only
    assert f"{untrusted_port}" in alerts[0] and "is not trusted" in alerts[0], alerts[0]
    assert not any(f"{closed_port}" in ET.tostring(m, encoding="unicode") for m in messages)


# The agent as `card-agent run` runs it, with one fault no real part produces after start-up (the
# card loop is built not to raise): its loop fails at once with an error.
FAILING_AGENT = textwrap.dedent("""
    import sys
    from dicom_card_agent.errors import CardAgentError
    from dicom_card_agent.session.manager import SessionManager
    def fail(self, stop):
        raise CardAgentError("the card loop failed (fault injected by the test)")
    SessionManager.run = fail
    from dicom_card_agent.cli.main import main
    sys.exit(main())
""")


def test_an_agent_stopped_by_an_error_records_application_stop_as_a_failure(test_pki: ProvisionedPki,
                                                                          tmp_path: Path) -> None:
    audit_file = tmp_path / "audit" / "audit.log"
    (tmp_path / "agent").mkdir()
    config = write_config(tmp_path / "agent" / "agent.toml", test_pki, [tunnel("pacs", 104)],
                          audit={"file": str(audit_file)})
    result = subprocess.run([sys.executable, "-c", FAILING_AGENT, "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, env=test_pki.env(CARD_PIN=USER_PIN))
    assert result.returncode == 2, result.stdout + result.stderr
    messages = audit_messages(audit_file)
    ids = event_ids(messages)
    assert ids[0] == "110100/110120" and ids[-1] == "110100/110121", ids
    stop = messages[-1].find("EventIdentification")
    assert stop.get("EventOutcomeIndicator") == "12"  # major failure: the application is now unavailable
    assert stop.findtext("EventOutcomeDescription") == (
        "stopped by an error: the card loop failed (fault injected by the test)")


def test_an_agent_asked_to_stop_records_application_stop_as_a_success(test_pki: ProvisionedPki,
                                                                    tmp_path: Path) -> None:
    audit_file = tmp_path / "audit" / "audit.log"
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)], audit={"file": str(audit_file)}):
        pass  # stopped with SIGTERM
    stop = audit_messages(audit_file)[-1].find("EventIdentification")
    assert stop.find("EventID").get("csd-code") == "110100" and stop.get("EventOutcomeIndicator") == "0"
    assert stop.findtext("EventOutcomeDescription") == "SIGTERM"
