"""One log record, one line: peer-supplied text cannot end a line, forge a record or drive a terminal."""

from __future__ import annotations

import io
import logging

import pytest

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
