"""RFC 5424 syslog messages and RFC 5425 octet-counted framing for audit messages: no I/O.

DICOM PS3.15 A.6 / IHE ATNA (ITI-20) send each audit message as one RFC 5424 message over TLS
(RFC 5425): ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG`` with facility authpriv (10),
MSGID ``IHE+RFC-3881`` and as SD ``[meta sequenceId="N"]`` (which names the message: a repository
recognises one delivered twice by HOSTNAME, TIMESTAMP, PROCID and sequenceId); MSG is the XML in UTF-8
and, as RFC 5424 6.4 requires for UTF-8 payloads, starts with the byte order mark (then the XML declaration). On the
connection each message is ``MSG-LEN SP SYSLOG-MSG`` (RFC 5425 4.3, RFC 6587 3.4.1).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

FACILITY_AUTHPRIV = 10
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5
APP_NAME = "card-agent"
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>'
NIL = "-"
MAX_SEQUENCE_ID = 2_147_483_647  # RFC 5424 7.3.1: 1..2147483647, then it starts again at 1
_MAX_FRAME_DIGITS = 10  # MSG-LEN of up to 9,999,999,999 octets; anything longer is garbage
# One message, at most: the XML (at most 63 KiB, agent/audit/messages.py) and a header of under
# 1 KiB (its fields are cut to _HEADER_LIMITS). A quarter of the 256 KiB docs/audit.md has the
# repository take: rsyslog cuts a longer message and reads the rest of it as the messages that
# follow (syslog-TLS), or drops the RELP session for good (imrelp oversizeMode="abort").
MAX_SYSLOG_MESSAGE_BYTES = 64 * 1024
_MESSAGE_START = re.compile(rb"<\d{1,3}>1 ")  # PRI and VERSION (RFC 5424 6.2)

_HEADER_LIMITS = {"hostname": 255, "app_name": 48, "procid": 128, "msgid": 32}
_NOT_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")


class FramingError(ValueError):
    """A byte stream is not RFC 5425 octet-counted syslog."""


def header_field(value: str, name: str) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, cut to its length, or NILVALUE."""
    cleaned = _NOT_PRINTUSASCII.sub("_", value)[:_HEADER_LIMITS[name]]
    return cleaned or NIL


def timestamp(value: datetime) -> str:
    """RFC 5424 TIMESTAMP: RFC 3339 in UTC with milliseconds, e.g. 2024-05-01T10:00:00.123Z."""
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_message(xml: bytes, *, time: datetime, hostname: str, procid: str | int,
                   severity: int = SEVERITY_NOTICE, app_name: str = APP_NAME, msgid: str = MSGID,
                   sequence: int | None = None) -> bytes:
    """One RFC 5424 message carrying ``xml`` (an audit message without XML declaration);
    ``sequence`` becomes the structured data ``[meta sequenceId="N"]`` (RFC 5424 7.3.1), which
    lets a repository recognise a message delivered twice (docs/audit.md)."""
    if not 0 <= severity <= 7:
        raise ValueError(f"syslog severity {severity} is not 0-7")
    if sequence is not None and not 1 <= sequence <= MAX_SEQUENCE_ID:
        raise ValueError(f"meta sequenceId {sequence} is not 1-{MAX_SEQUENCE_ID}")
    header = " ".join([
        f"<{FACILITY_AUTHPRIV * 8 + severity}>1",
        timestamp(time),
        header_field(hostname, "hostname"),
        header_field(app_name, "app_name"),
        header_field(str(procid), "procid"),
        header_field(msgid, "msgid"),
        NIL if sequence is None else f'[meta sequenceId="{sequence}"]',  # STRUCTURED-DATA
    ])
    message = header.encode("ascii") + b" " + BOM + XML_DECLARATION + xml
    if len(message) > MAX_SYSLOG_MESSAGE_BYTES:
        raise ValueError(f"a syslog message of {len(message)} bytes is over the {MAX_SYSLOG_MESSAGE_BYTES} an "
                         "audit repository is sent")
    return message


def message_problem(message: bytes) -> str:
    """Why ``message`` (read back from the spool) must not be sent to the repository, or ``""``:
    empty (RFC 5425 has no frame for it: rsyslog reads ``0 `` as the start of the next message),
    not an RFC 5424 message of ours, or longer than the repository is sure to take whole."""
    if not message:
        return "it is empty"
    if not _MESSAGE_START.match(message):
        return f"it does not start with a syslog header (<PRI>1): {message[:16]!r}"
    if len(message) > MAX_SYSLOG_MESSAGE_BYTES:
        return f"it has {len(message)} bytes, more than the {MAX_SYSLOG_MESSAGE_BYTES} of a message"
    return ""


def frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting: ``MSG-LEN SP SYSLOG-MSG``; MSG-LEN is at least 1 (``ValueError`` if empty)."""
    if not message:
        raise ValueError("RFC 5425 has no frame for an empty syslog message")
    return b"%d " % len(message) + message


class FrameDecoder:
    """Splits a received byte stream into syslog messages (the other side of :func:`frame`)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        messages: list[bytes] = []
        while True:
            space = self._buffer.find(b" ", 0, _MAX_FRAME_DIGITS + 1)
            if space < 0:
                if len(self._buffer) > _MAX_FRAME_DIGITS or not self._buffer.isdigit() and self._buffer:
                    raise FramingError(f"no MSG-LEN at the start of {bytes(self._buffer[:20])!r}")
                return messages
            length_text = bytes(self._buffer[:space])
            if not length_text.isdigit() or length_text.startswith(b"0"):
                raise FramingError(f"MSG-LEN {length_text!r} is not a positive decimal number")
            length = int(length_text)
            if len(self._buffer) < space + 1 + length:
                return messages
            messages.append(bytes(self._buffer[space + 1:space + 1 + length]))
            del self._buffer[:space + 1 + length]

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message still buffered."""
        return len(self._buffer)


def split_frames(data: bytes) -> list[bytes]:
    """All messages of a complete octet-counted stream; :class:`FramingError` if it is not one."""
    decoder = FrameDecoder()
    messages = decoder.feed(data)
    if decoder.pending:
        raise FramingError(f"{decoder.pending} bytes of an incomplete message at the end")
    return messages


@dataclass(frozen=True)
class SyslogMessage:
    """A parsed RFC 5424 message (header fields as text, MSG as bytes)."""

    pri: int
    version: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    msg: bytes

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8

    @property
    def sequence_id(self) -> int | None:
        """``meta sequenceId`` of the structured data, if there is one."""
        match = re.search(r'\[meta(?: [^\]]*)? sequenceId="(\d+)"', self.structured_data)
        return int(match.group(1)) if match else None

    @property
    def xml(self) -> bytes:
        """MSG without the BOM."""
        return self.msg[len(BOM):] if self.msg.startswith(BOM) else self.msg


_HEADER = re.compile(rb"<(\d{1,3})>(\d{1,2}) (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\])(?: (.*))?", re.DOTALL)


def parse_message(data: bytes) -> SyslogMessage:
    """Parse one RFC 5424 message (structured data is kept as text; only NIL or simple elements)."""
    match = _HEADER.fullmatch(data)
    if not match:
        raise ValueError(f"not an RFC 5424 message: {data[:80]!r}")
    pri, version, *fields, structured, msg = match.groups()
    timestamp, hostname, app_name, procid, msgid = (f.decode("ascii") for f in fields)
    return SyslogMessage(int(pri), int(version), timestamp, hostname, app_name, procid, msgid,
                         structured.decode("utf-8"), msg or b"")


def iter_messages(data: bytes) -> Iterator[SyslogMessage]:
    for message in split_frames(data):
        yield parse_message(message)
