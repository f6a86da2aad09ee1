"""How the agent's log lines start: with their `<N>` syslog priority when standard error is the
journal (JOURNAL_STREAM names it), with a timestamp otherwise. Real agent, SoftHSM identity."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_runner import (
    LOG_TIMESTAMP,
    associate_rq,
    port_of,
    send_and_close,
    start_agent,
    stop_agent,
    tunnel,
    write_config,
)
from conftest import CARD_AGENT, ProvisionedPki, run_card_agent
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
        code = subprocess.run([CARD_AGENT, "run", "--config", str(tmp_path / "missing.toml")], stderr=out,
                              env=env, stdin=subprocess.DEVNULL, timeout=60).returncode
    assert code == 2
    assert err.read_text().startswith("<3>card-agent: error: ")


JOURNALD = "/lib/systemd/systemd-journald"
JOURNAL_STDOUT = Path("/run/systemd/journal/stdout")


@contextlib.contextmanager
def journald() -> Iterator[None]:
    """The machine's journald, or one started here (it runs without systemd as PID 1) and stopped by
    its PID afterwards."""
    if JOURNAL_STDOUT.exists() and _journal_answers():
        yield
        return
    for program in (JOURNALD, "journalctl", "systemd-cat"):
        if not shutil.which(program) and not Path(program).exists():
            message = f"{program} is missing (Debian package systemd)"
            pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    process = subprocess.Popen([JOURNALD], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not (JOURNAL_STDOUT.exists() and _journal_answers()):
            assert process.poll() is None and time.monotonic() < deadline, "journald did not start"
            time.sleep(0.1)
        yield
    finally:
        process.terminate()
        process.wait(10)


def _journal_answers() -> bool:
    probe = subprocess.run(["systemd-cat", "-t", "card-agent-probe", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


def journal(tag: str, priority: str) -> list[str]:
    return subprocess.run(["journalctl", "--no-pager", "-o", "cat", "-t", tag, "-p", priority], capture_output=True,
                          text=True, timeout=30, check=True).stdout.splitlines()


# Run under systemd-cat as systemd runs a unit: stdout and stderr the journal's stream, and
# JOURNAL_STREAM naming it (Debian 12's systemd-cat does not set it; systemd does).
AS_A_UNIT = ("import os, sys; s = os.fstat(1); os.environ['JOURNAL_STREAM'] = f'{s.st_dev}:{s.st_ino}'; "
             "os.dup2(1, 2); os.execv(sys.argv[1], sys.argv[1:])")


def test_journalctl_by_priority_shows_the_agents_warnings_and_not_its_news(test_pki: ProvisionedPki,
                                                                           tmp_path: Path) -> None:
    """deployment.md's `journalctl ... -p warning`, against a real journald."""
    tag = f"card-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    workdir = tmp_path / "agent"
    workdir.mkdir()
    table = tunnel("pacs", free_port())
    config = write_config(workdir / "agent.toml", test_pki, [table])
    env = test_pki.env(CARD_PIN="123456")
    env.pop("JOURNAL_STREAM", None)
    with journald():
        process = subprocess.Popen(["systemd-cat", "-t", tag, sys.executable, "-c", AS_A_UNIT, CARD_AGENT, "run",
                                    "--config", str(config)], env=env, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not any("INFO: ready:" in line for line in journal(tag, "info")):
                assert process.poll() is None and time.monotonic() < deadline, journal(tag, "debug")
                time.sleep(0.1)
            run_card_agent("lock", "--config", config, env=env, check=True)
            while not any("event=sign-out" in line for line in journal(tag, "info")):
                assert time.monotonic() < deadline, journal(tag, "debug")
                time.sleep(0.1)
            send_and_close(port_of(table), associate_rq())  # locked: refused, a warning
            while not journal(tag, "warning"):
                assert time.monotonic() < deadline, journal(tag, "debug")
                time.sleep(0.1)
        finally:
            assert stop_agent(process) == 0
        everything, warnings = journal(tag, "info"), journal(tag, "warning")
    assert any(line.startswith("card-agent: INFO: ready: 1 tunnel(s) for ") for line in everything), everything
    assert any(": rejected: " in line for line in warnings), warnings
    assert all(re.match(r"card-agent(\[session\])?: (WARNING|ERROR|CRITICAL): ", line) for line in warnings), warnings
    assert [line for line in everything if ": WARNING: " in line or ": ERROR: " in line] == warnings
