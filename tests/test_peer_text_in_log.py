"""What an application's A-ASSOCIATE-RQ puts in the agent's log is bounded (docs/administration.md):
128 abstract syntaxes of 8 KB of control characters (an A-ASSOCIATE-RQ just under the relay's
1 MiB) made the card session log one pydicom warning per abstract syntax, each quoting it whole
(~8 KB of escapes), and the "association ... accepted" line quoted six of them whole: about 1 MB
of journal per association, at an application's will (a reviewer). The real agent on SoftHSM, a
TLS PACS that accepts every presentation context."""

from __future__ import annotations

from pathlib import Path

from agent_runner import running_agent, tunnel
from conftest import ProvisionedPki
from dicom_card_agent.dicom.pdu import A_ASSOCIATE_AC
from test_report_size import accepting_pacs, associate, widest_rq


def test_an_association_of_huge_abstract_syntaxes_adds_little_to_the_log(test_pki: ProvisionedPki,
                                                                         tmp_path: Path) -> None:
    with accepting_pacs(test_pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs)]) as agent:
        agent.wait_for_log("event=sign-in ")
        before = len(agent.log())
        assert associate(agent.port(), widest_rq()) == A_ASSOCIATE_AC
        log = agent.wait_for_log("MODALITY -> PACS, ", timeout=30)  # the association's summary line
    added = log[before:]
    assert "Invalid value for VR UI" not in added
    assert len(added) < 8 * 1024, f"{len(added)} characters of log for one association:\n{added[:3000]}"
    accepted = next(line for line in added.splitlines() if " accepted, 128 of 128 presentation contexts: " in line)
    assert "... (8086 more characters)" in accepted and "and 122 more abstract syntaxes" in accepted, accepted
