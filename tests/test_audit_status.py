"""What `card-agent status` says about an audit trail that cannot be written (a real full tmpfs).

It printed only where the trail goes: events lost on a full disk (``on_failure = "continue"``)
were in the log and the metrics alone, and while ``on_failure = "refuse"`` refused every new
association for lack of reserve space, neither the text nor the JSON said so."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

from agent_runner import running_agent, tunnel
from conftest import ProvisionedPki, run_card_agent
from peers.ports import free_port
from test_audit_failure import fill, small_tmpfs

NOT_IN_FILE = re.compile(r"ERROR: audit: cannot write to the audit file \S+: No space left on device; "
                         r"event \S+ not in the local audit file")


def status(config: Path, test_pki: ProvisionedPki) -> tuple[list[str], dict]:
    """The audit lines of `card-agent status` (the line and the ones indented under it), and its JSON."""
    text = run_card_agent("status", "--config", config, env=test_pki.env(), check=True).stdout.splitlines()
    start = next(n for n, line in enumerate(text) if line.startswith("audit:"))
    end = next((n for n in range(start + 1, len(text)) if not text[n].startswith("  ")), len(text))
    answer = json.loads(run_card_agent("status", "--json", "--config", config, env=test_pki.env(),
                                       check=True).stdout)
    return text[start:end], answer["audit"]


def test_status_counts_the_events_lost_on_a_full_disk(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    config = tmp_path / "agent" / "agent.toml"
    with small_tmpfs(tmp_path / "disk") as disk:
        audit_file = disk / "audit.log"
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())],
                           audit={"file": str(audit_file)}) as agent:
            before, _ = status(config, test_pki)
            filler = fill(disk)
            # Each reload is a Software Configuration alert; the file's last page may still take a
            # line or two, so there are enough to fail for certain, and the log counts them.
            for reloads in range(1, 9):
                agent.process.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 10
                while agent.log().count("SIGHUP: configuration") < reloads and time.monotonic() < deadline:
                    time.sleep(0.05)
            time.sleep(0.5)  # the last alert is written just after its log line
            lost = len(NOT_IN_FILE.findall(agent.log()))
            full, full_json = status(config, test_pki)
            filler.unlink()
    assert before == [f"audit:    to {audit_file}"]
    assert lost >= 1, agent.log()
    assert full == [f"audit:    to {audit_file}",
                    f"  {lost} audit event{'' if lost == 1 else 's'} could not be recorded since start "
                    "(the log says which and why)"], full
    assert full_json["lost"] == lost and full_json["failures"] == lost and full_json["refusing"] is False


def test_status_says_that_new_associations_are_refused_and_why(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    config = tmp_path / "agent" / "agent.toml"
    with small_tmpfs(tmp_path / "disk") as disk:
        audit_file = disk / "audit.log"
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())],
                           audit={"file": str(audit_file), "on_failure": "refuse"}) as agent:
            agent.wait_for_log("event=sign-in ")
            before, before_json = status(config, test_pki)
            filler = fill(disk)
            full, full_json = status(config, test_pki)
            filler.unlink()
            after, after_json = status(config, test_pki)
    reason = (f"the audit trail cannot be written (0 KiB free on the file system of {disk}, less than the "
              "1024 KiB the audit trail keeps in reserve)")
    assert full == [f"audit:    to {audit_file}",
                    f"  new associations are refused: {reason}; [audit] on_failure = \"refuse\": free space there, "
                    "associations are accepted again as soon as the trail can be written"], full
    assert (full_json["refusing"], full_json["refusal"]) == (True, reason), full_json
    assert before == after == [f"audit:    to {audit_file}"], (before, after)
    assert (before_json["refusing"], before_json["refusal"]) == (after_json["refusing"], after_json["refusal"]) \
        == (False, "")
