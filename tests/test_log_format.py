"""How the agent's log lines start: with their `<N>` syslog priority when standard error is the
journal (JOURNAL_STREAM names it), with a timestamp otherwise. Real agent, SoftHSM identity."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from agent_runner import LOG_TIMESTAMP, start_agent, stop_agent, tunnel, write_config
from conftest import ProvisionedPki, run_card_agent
from peers.ports import free_port


def run_until_ready(test_pki: ProvisionedPki, workdir: Path, journal_stream: str | None) -> str:
    """The whole log of an agent started, made ready, asked to lock (a warning) and stopped."""
    workdir.mkdir()
    config = write_config(workdir / "agent.toml", test_pki, [tunnel("pacs", free_port())])
    log_path = workdir / "agent.log"
    log_path.touch()  # start_agent truncates it: same inode
    stream = os.stat(log_path)
    env = test_pki.env(CARD_PIN="123456")
    env.pop("JOURNAL_STREAM", None)
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream.format(dev=stream.st_dev, ino=stream.st_ino)
    process = start_agent(config, log_path, env)
    try:
        deadline = time.monotonic() + 30
        while "INFO: ready:" not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        run_card_agent("lock", "--config", config, env=env, check=True)
        while "event=sign-out" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        assert stop_agent(process) == 0
    return log_path.read_text()


def test_on_the_journal_every_line_starts_with_its_priority(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    log = run_until_ready(test_pki, tmp_path / "agent", "{dev}:{ino}")
    lines = log.splitlines()
    assert lines and all(re.match(r"<[2-7]>card-agent(\[session\])?: (DEBUG|INFO|WARNING|ERROR|CRITICAL): ", line)
                         for line in lines), log
    assert "<6>card-agent: INFO: ready: 1 tunnel(s) for " in log
    assert "<6>card-agent[session]: INFO: card session ending: lock" in log
    assert not LOG_TIMESTAMP.search(log)  # journald stamps each line itself
    # The level and priority agree, line by line (journalctl -p warning shows WARNING and worse).
    priority = {"DEBUG": "7", "INFO": "6", "WARNING": "4", "ERROR": "3", "CRITICAL": "2"}
    assert all(line[1] == priority[line.split(": ")[1]] for line in lines)


def test_elsewhere_every_line_starts_with_a_timestamp(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    # A JOURNAL_STREAM that is not this stderr (inherited by a process whose stderr went elsewhere).
    log = run_until_ready(test_pki, tmp_path / "agent", "{dev}:1")
    lines = log.splitlines()
    assert lines and all(LOG_TIMESTAMP.match(line) for line in lines), log
    stamps = [time.mktime(time.strptime(line[:19], "%Y-%m-%dT%H:%M:%S")) for line in lines]
    assert abs(stamps[-1] - time.time()) < 60 and stamps == sorted(stamps)
    assert not re.search(r"^<\d>", log, re.MULTILINE)
    assert any(line[30:].startswith("card-agent: INFO: ready: 1 tunnel(s) for ") for line in lines)


def test_a_command_error_on_the_journal_is_priority_3(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    err.touch()
    stream = os.stat(err)
    env = {**test_pki.env(), "JOURNAL_STREAM": f"{stream.st_dev}:{stream.st_ino}"}
    with open(err, "w") as out:
        import subprocess

        from conftest import CARD_AGENT

        code = subprocess.run([CARD_AGENT, "run", "--config", str(tmp_path / "missing.toml")], stderr=out,
                              env=env, stdin=subprocess.DEVNULL, timeout=60).returncode
    assert code == 2
    assert err.read_text().startswith("<3>card-agent: error: ")
