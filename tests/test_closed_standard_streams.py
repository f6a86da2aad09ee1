"""An agent started with its standard streams closed (`>&- 2>&-`; an autostart or cron entry that
starts it so). Its first files took their numbers: the signal handling's pipe became its standard
error, so whatever a library or a process it started wrote there was read as signals, and a byte 2
(SIGINT) stopped the agent; with standard input closed too, the pipe took 0 and 1, and standard
error was a directory. Real agent, SoftHSM identity, real processes."""

from __future__ import annotations

import os
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from agent_runner import CARD_AGENT, agent_status, card_session_pid, stop_agent, tunnel, wait_for, write_config
from conftest import USER_PIN, ProvisionedPki

CLOSING = {"output and error": ">&- 2>&-", "input, output and error": "<&- >&- 2>&-"}


def standard_descriptors(pid: int) -> list[str]:
    return [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)]


@pytest.mark.parametrize("closed", list(CLOSING))
def test_an_agent_started_with_its_standard_streams_closed_takes_nothing_written_there_for_a_signal(
        test_pki: ProvisionedPki, tmp_path: Path, closed: str) -> None:
    workdir = tmp_path / "agent"
    workdir.mkdir()
    audit_file = tmp_path / "audit.log"
    config = write_config(workdir / "agent.toml", test_pki, [tunnel("pacs", 104)], audit={"file": str(audit_file)})
    agent = subprocess.Popen(["sh", "-c", f'exec "$@" {CLOSING[closed]}', "sh", CARD_AGENT, "run", "--config",
                              str(config)], env=test_pki.env(CARD_PIN=USER_PIN), start_new_session=True)
    try:
        wait_for(lambda: b"<EventTypeCode csd-code=\"110122\"" in audit_file.read_bytes()
                 if audit_file.exists() else False, timeout=30)  # the Login: signed in
        # What a library writing to the agent's standard error would send: a byte 2 and a byte 15.
        with open(f"/proc/{agent.pid}/fd/2", "wb", buffering=0) as standard_error:
            standard_error.write(b"\x02\x0f")
        time.sleep(1)
        assert agent.poll() is None
        assert agent_status(workdir, test_pki.env())["state"] == "signed in"
        session = card_session_pid(agent.pid)
        assert session is not None
        assert standard_descriptors(agent.pid) == ["/dev/null"] * 3
        assert standard_descriptors(session) == ["/dev/null"] * 3
    finally:
        stopped_with = stop_agent(agent)  # asserted after: an assert here would hide why the test failed
    assert stopped_with == 0
    stop = ET.fromstring(audit_file.read_bytes().splitlines()[-1]).find("EventIdentification")
    assert stop.findtext("EventOutcomeDescription") == "SIGTERM"
