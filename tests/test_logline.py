"""One log record, one line: peer-supplied text cannot end a line, forge a record or drive a terminal."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import re
import select
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicom_card_agent import logline
from dicom_card_agent.logline import OneLineFormatter, printable
from dicom_card_agent.session.events import event


@pytest.mark.parametrize("text, shown", [
    ("TESTSCU\nevent=sign-in subject=CN=Mallory", "TESTSCU\\x0aevent=sign-in subject=CN=Mallory"),
    ("a\r\nb", "a\\x0d\\x0ab"),
    ("\x1b[2Jcleared", "\\x1b[2Jcleared"),
    ("tab\tand del\x7f", "tab\\x09and del\\x7f"),
    ("next line\x85, line\u2028, paragraph\u2029", "next line\\x85, line\\u2028, paragraph\\u2029"),
    # A right-to-left override shows "CN=Alice ... gpj.exe" reversed: the bidirectional controls are escaped.
    ("CN=Alice\u202egpj.exe\u202c, pid\u2066 1\u2069\u200f",
     "CN=Alice\\u202egpj.exe\\u202c, pid\\u2066 1\\u2069\\u200f"),
    ("CN=Zoë Müller, O=Klinik", "CN=Zoë Müller, O=Klinik"),  # printable text stays as it is
    ("back\\slash", "back\\slash"),
])
def test_printable_escapes_what_breaks_a_line(text: str, shown: str) -> None:
    assert printable(text) == shown


def _logger() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter("card-agent: %(levelname)s: %(message)s"))
    logger = logging.getLogger(f"test-logline-{id(stream)}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger, stream


def test_a_record_is_one_line_whatever_its_arguments() -> None:
    logger, stream = _logger()
    logger.warning("tunnel %s: %s", "pacs", "association X\nevent=sign-in subject=\"CN=Mallory\" -> PACS")
    assert stream.getvalue() == (
        'card-agent: WARNING: tunnel pacs: association X\\x0aevent=sign-in subject="CN=Mallory" -> PACS\n')


def test_a_traceback_stays_readable_and_every_line_of_it_is_indented() -> None:
    logger, stream = _logger()
    try:
        raise ValueError("peer said\nevent=sign-in")
    except ValueError:
        logger.exception("internal error")
    first, *traceback = stream.getvalue().splitlines()
    assert first == "card-agent: ERROR: internal error"
    assert traceback[0] == "    Traceback (most recent call last):"
    assert traceback[-2:] == ["    ValueError: peer said", "    event=sign-in"]  # indented, so no record
    assert all(line.startswith("    ") for line in traceback)


def test_an_event_value_cannot_forge_another_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.events")
    event("sign-in", subject='CN=Mallory" token="forged', reason="x\ny")
    assert caplog.messages == ['event=sign-in subject="CN=Mallory\\" token=\\"forged" reason="x\\ny"']


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400),
       st.integers(min_value=1, max_value=200), st.integers(min_value=1, max_value=200))
def test_a_text_cut_twice_says_how_many_characters_the_whole_had_after_the_second_cut(
        text: str, first: int, second: int) -> None:
    """A peer's UID cut at 1,024 characters for a card session's report, then at an audit field's
    limit, was said to have "(1027 more characters not recorded)" of its 64 K (a reviewer)."""
    once = logline.cut(text, first)
    twice = logline.cut(once, second, "more characters not recorded")
    hidden = max(0, len(text) - min(first, second, len(text)))
    if hidden == 0:
        assert twice == text
    else:
        assert twice.endswith(f"... ({hidden} more characters not recorded)") or twice.endswith(
            f"... ({hidden} more characters)"), (once, twice)
        assert twice.startswith(text[:min(first, second)])


F_SETPIPE_SZ = 1031  # linux/fcntl.h; Python 3.11's fcntl lacks the name


def one_page_pipe() -> tuple[int, int]:
    """A pipe (read end, write end) that holds one page: full after a few log lines."""
    reader, writer = os.pipe()
    fcntl.fcntl(writer, F_SETPIPE_SZ, 4096)
    return reader, writer


def test_a_pipe_nobody_reads_holds_up_no_logging_thread_and_the_lines_dropped_are_counted() -> None:
    """Logging into a full pipe returns at once; the lines come out in order once it is read, as
    many as the backlog holds, then a warning with the count of those dropped and how long the pipe
    took nothing. A real pipe of one page (F_SETPIPE_SZ), read by nobody until the logging is done."""
    reader, writer = one_page_pipe()
    stream = os.fdopen(writer, "w")
    handler = logline.NeverBlockingHandler(stream)
    handler.setFormatter(OneLineFormatter("card-agent: %(levelname)s: %(message)s"))
    logger = logging.getLogger("test-logline-never-blocking")
    logger.propagate = False
    logger.addHandler(handler)
    total = 2 * logline.BACKLOG_LIMIT // 1000
    started = time.monotonic()
    for number in range(total):
        logger.warning("line %06d %s", number, "x" * 950)
    logging_took = time.monotonic() - started
    time.sleep(1.0)
    output = b""
    os.set_blocking(reader, False)
    deadline = time.monotonic() + 20
    while b"were dropped" not in output and time.monotonic() < deadline:
        try:
            output += os.read(reader, 1 << 20)
        except BlockingIOError:
            time.sleep(0.01)
    handler.close()
    logger.removeHandler(handler)
    stream.close()
    os.close(reader)
    *lines, notice = output.decode().splitlines()
    assert logging_took < 10, logging_took  # a blocking handler waited here for ever
    assert [int(line.split()[3]) for line in lines] == list(range(len(lines)))  # in order, none lost before the cut
    match = re.fullmatch(r"card-agent: WARNING: (\d+) log line\(s\) were dropped: standard error took nothing for "
                         r"(\d+) s \(a terminal stopped with Ctrl-S, which Ctrl-Q lets go on; a pipe or pager nobody "
                         r"reads; a stalled journal\). The agent worked on meanwhile", notice)
    assert match is not None, notice
    assert int(match[1]) == total - len(lines) > 0
    assert int(match[2]) >= 1


# Logs 200 lines of 1000 characters to standard error with the agent's handler, then says so on
# standard output: run with standard error a full pipe nobody reads.
LOG_INTO_STDERR = """
import logging, sys, time
from dicom_card_agent import logline
logline.configure("card-agent")
started = time.monotonic()
for number in range(200):
    logging.getLogger("agent").warning("line %03d %s", number, "x" * 980)
print(f"logged in {time.monotonic() - started:.1f} s", flush=True)
time.sleep(3)
"""


def test_without_proc_the_lines_wait_for_the_writer_thread_and_logging_does_not() -> None:
    """Where /proc cannot give a non-blocking descriptor of standard error's pipe (a mount namespace
    with an empty /proc stands for a sandbox without it), every line goes to the writer thread, and
    the thread that logs still returns at once into a pipe nobody reads; the lines arrive in order."""
    reader, writer = one_page_pipe()
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs none /proc && exec "$@"', "sh", sys.executable, "-c", LOG_INTO_STDERR],
        stdout=subprocess.PIPE, stderr=writer, text=True)
    os.close(writer)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 10)
        said = process.stdout.readline() if ready else "nothing said in 10 s: logging waited for the pipe"
        output = b""
        while chunk := os.read(reader, 1 << 20):
            output += chunk
    finally:
        process.kill()
        process.wait()
        os.close(reader)
    assert said.startswith("logged in 0."), said
    numbers = [int(line.split()[4]) for line in output.decode().splitlines()]
    assert numbers == list(range(200))
