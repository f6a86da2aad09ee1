"""Messages between the supervisor and a card-session process: JSON over a SOCK_SEQPACKET pair,
with accepted sockets passed along (SCM_RIGHTS), so the card-session process relays them directly."""

from __future__ import annotations

import base64
import json
import re
import socket
from pathlib import Path
from typing import Any

from dicom_card_agent import logline
from dicom_card_agent.config.model import AgentConfig, file_digests, parse_config
from dicom_card_agent.errors import CardAgentError, ConfigError
from dicom_card_agent.sockets import unsent_bytes
from dicom_card_agent.token.discovery import PinState
from dicom_card_agent.token.login import (
    LoginError,
    PinExpiredError,
    PinFinalTryError,
    PinLockedError,
    PinNotInitializedError,
    WrongPinError,
)
from dicom_card_agent.token.secret import Secret, wipe

MAX_MESSAGE = 64 * 1024
# A SOCK_SEQPACKET record cannot exceed the socket's send buffer (net.core.wmem_default, 208 KiB),
# and a receive buffer of 128 KiB or more is mapped and unmapped for every message: a longer message
# goes as a "parts" header (its length) and records of PART bytes, reassembled by receive().
PART = 60 * 1024
# The probe's answer carries every certificate on the token: 24 slots on a PIV card (~2.5 KB each in
# the message), possibly hundreds on an HSM partition. Other messages stay within MAX_MESSAGE.
MAX_CARD_MESSAGE = 16 * 1024 * 1024
# A card session's answers to the supervisor's requests: `status` takes ~700 bytes a tunnel (those a
# reload removed included), over MAX_MESSAGE from about 90 of them.
MAX_ANSWER = 16 * 1024 * 1024
# A report for the audit trail: up to 100 instances (agent/tunnel/transfers.py), each text of it
# clipped at REPORT_TEXT_LIMIT characters; a legitimate batch of long UIDs and Japanese patient
# names is ~70 KB, and a report over MAX_MESSAGE used to end the supervisor's report reader (and
# every later audit record of the card session with it).
MAX_REPORT = 16 * 1024 * 1024
REPORT_TEXT_LIMIT = 64 * 1024  # a C-FIND Identifier in base64 (16 KiB -> 22 K characters) fits
# Escaped in JSON, a control character takes 6 bytes and one outside the BMP 12: the largest report a
# peer can make this build send is ~5 MB (an A-ASSOCIATE-RQ of 1 MiB, 100 instances of long UIDs and
# names: tests/test_report_size.py); ~10.6 MB before the relay clipped the abstract syntaxes.
# One that would not fit MAX_REPORT all the same (another build's relay, a bug) is made to fit
# rather than be dropped by the supervisor with all it says of its association: its texts are cut
# at each of these limits in turn until it fits, then its longest lists are halved (fitted()).
FIT_TEXT_LIMITS = (16 * 1024, 4 * 1024, 1024, 256, 64)
REPORT_ENVELOPE = 1024  # bytes of MAX_REPORT left for what send() puts around the fields (the kind)
# The field of a report made to fit: {"text_limit": N, "left_out": {"instances": M}, "channel": MAX_REPORT}
SHORTENED = "shortened"
# What the supervisor hands its report sink for a report it read and had to drop (over MAX_REPORT, or
# not a report it can read): {"kind": the report's kind (or "unknown"), "why": ...}; an audit failure
# (agent/session/audit.py).
REPORT_DROPPED = "report-dropped"
# What the supervisor hands its report sink when an ending card session says it could not send all
# its reports in the time it had (its final answer's "unsent_associations": the associations whose
# end was not sent yet; "unsent_reports": other reports waiting to be sent; see worker.ReportsDue):
# {"associations": N, "others": M}; an audit failure.
REPORTS_NOT_SENT = "reports-not-sent"
_PARTS = "parts"
PARTS_SECONDS = 5.0  # how long a non-blocking reader waits for the parts that follow a header
MAX_SECRET = 1024
# A message that carries the configuration (probe, start, reload: see config_fields), in base64: a
# configuration file may have up to config.tables.MAX_CONFIG_BYTES.
MAX_CONFIG_MESSAGE = 16 * 1024 * 1024
MAX_FDS = 253  # descriptors in one message (Linux's SCM_MAX_FD): the tunnels' listening sockets at most

# The supervisor's lease on a signed-in card session's lent listeners (agent/tunnel/lent_listeners.py).
# The card loop renews it at most every LEASE_RENEW_SECONDS, with the time its latest look at the
# reader started: the card was there then. The card-session process admits new associations only
# while that look is less than LEASE_SECONDS old. A loop that turns renews it with a look at most
# ~2 s old (a look a second on SoftHSM, one renewal a second), plus up to STATUS_TIMEOUT_SECONDS
# (2 s) of one turn waiting on a status answer; 4 s leaves a margin over that, and bounds what a
# stopped or hung supervisor lets through to 4 s instead of systemd's WatchdogSec= (or forever,
# outside systemd).
LEASE = "lease"
LEASE_SECONDS = 4.0
LEASE_RENEW_SECONDS = 1.0


def channel_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class MessageTooLargeError(ConnectionError):
    """A message longer than its receiver takes; it was read and dropped. ``head``: its first bytes."""

    def __init__(self, message: str, head: bytes = b"") -> None:
        super().__init__(message)
        self.head = head


def send(channel: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    parts = [data[offset:offset + PART] for offset in range(0, len(data), PART)] if len(data) > PART else []
    if parts:
        data = json.dumps({"type": _PARTS, "length": len(data)}).encode()
    if fds:
        socket.send_fds(channel, [data], fds)
    else:
        channel.sendall(data)
    for part in parts:
        channel.sendall(part)


def send_lease(channel: socket.socket, seen_at: float) -> bool:
    """Renew the lease (see LEASE_SECONDS) on ``channel`` without ever waiting; False when it was not
    sent. ``channel`` must not be given a timeout (a socket with one waits for room before sending):
    the supervisor keeps a copy of its channel for this alone. Nothing is sent while the process has
    not read all that was sent before: a stopped or hung process would otherwise have its channel
    filled with leases, and the next message that must get through ("end") would block the card loop.
    ``seen_at`` is an ``awake_or_asleep()`` value (agent/clock.py: CLOCK_BOOTTIME), which every
    process of the machine reads alike."""
    if unsent_bytes(channel):  # None (not known): sent, as MSG_DONTWAIT keeps the send from waiting
        return False
    data = json.dumps({"type": LEASE, "at": seen_at}).encode()
    try:
        channel.send(data, socket.MSG_DONTWAIT)
    except OSError:  # full (BlockingIOError), or the process is gone, which the card loop notices
        return False
    return True


def send_secret(channel: socket.socket, secret: Secret) -> None:
    """A PIN as one raw message, straight from its buffer (no JSON, no str, no bytes copy)."""
    with secret.view() as view:
        channel.sendmsg([view])


def clipped(value: Any, limit: int = REPORT_TEXT_LIMIT) -> Any:
    """``value`` (a report's fields) with every text longer than ``limit`` cut there and marked: text
    from a peer (a malformed PDU's value in its error, an abstract syntax) is not bounded by DICOM.
    Fields that would not fit one report (MAX_REPORT) even so are cut further: :func:`fitted`."""
    cut = _clipped(value, limit)
    if isinstance(cut, dict) and not _fits(cut):
        return fitted(cut)
    return cut




def _clipped(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return logline.cut(value, limit)
    if isinstance(value, dict):
        return {key: _clipped(item, limit) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clipped(item, limit) for item in value]
    return value


def _fits(fields: dict[str, Any]) -> bool:
    return len(json.dumps(fields)) <= MAX_REPORT - REPORT_ENVELOPE  # ASCII: characters are bytes


def fitted(fields: dict[str, Any]) -> dict[str, Any]:
    """A report's ``fields`` made to fit MAX_REPORT, and saying how (``SHORTENED``): texts cut at the
    first of FIT_TEXT_LIMITS that makes them fit; failing that, at the last, and the longest lists
    halved (their first items kept) until they fit. Fields still too large (a dict of countless
    keys: only a bug makes one) are returned as they are: the supervisor counts their loss."""
    for limit in FIT_TEXT_LIMITS:
        cut = {**_clipped(fields, limit), SHORTENED: {"text_limit": limit, "left_out": {}, "channel": MAX_REPORT}}
        if _fits(cut):
            return cut
    left_out: dict[str, int] = cut[SHORTENED]["left_out"]
    while not _fits(cut):
        lists = [key for key, item in cut.items() if isinstance(item, list) and item]
        if not lists:
            break
        longest = max(lists, key=lambda key: len(cut[key]))
        kept = len(cut[longest]) // 2
        left_out[longest] = left_out.get(longest, 0) + len(cut[longest]) - kept
        cut[longest] = cut[longest][:kept]
    return cut


def kind_of(head: bytes) -> str:
    """The kind of a report from its first bytes (``head`` of :class:`MessageTooLargeError`; send()
    writes the kind first), of letters and hyphens only (safe in a log line); ``unknown`` when they do
    not say."""
    match = re.match(rb'\{"kind": "([a-z-]{1,40})"', head)
    return match[1].decode("ascii") if match else "unknown"


def receive_secret(channel: socket.socket) -> Secret:
    """A message sent by :func:`send_secret`, received into a buffer that is then wiped."""
    buffer = bytearray(MAX_SECRET)
    try:
        length = channel.recv_into(buffer)
        if length == 0:
            raise ConnectionError("the supervisor went away before sending the PIN")
        with memoryview(buffer) as view:
            return Secret(view[:length])
    finally:
        wipe(buffer)


def receive(channel: socket.socket, limit: int = MAX_MESSAGE) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and the descriptors that came with it; ``None`` when the other side is gone.
    Raises :class:`MessageTooLargeError` for a message longer than ``limit`` bytes."""
    message, fds, _ = _receive(channel, limit)
    return message, fds


def receive_sized(channel: socket.socket, limit: int) -> tuple[dict[str, Any] | None, int]:
    """As :func:`receive`, on a channel that carries no descriptors (the reports): the message and
    its length in bytes."""
    message, fds, size = _receive(channel, limit)
    for fd in fds:
        socket.close(fd)
    return message, size


def _receive(channel: socket.socket, limit: int) -> tuple[dict[str, Any] | None, list[int], int]:
    data, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE, MAX_FDS)
    message = json.loads(data) if data else None
    size = len(data)
    if message is not None and message.get("type") == _PARTS:
        size = message["length"]
        try:
            message = _reassemble(channel, size, limit)
        except OSError:
            for fd in fds:
                socket.close(fd)
            raise
    if message is None:
        for fd in fds:
            socket.close(fd)
        return None, [], 0
    return message, fds, size


def _reassemble(channel: socket.socket, length: int, limit: int) -> dict[str, Any] | None:
    """The message whose parts follow; one over ``limit`` is read to its end all the same (so
    that the next receive() finds the next message), then refused."""
    too_large = length > limit
    data = bytearray()
    head = b""  # of a message too large: its first part, which says what it was
    received = 0
    timeout = channel.gettimeout()
    if timeout == 0.0:  # a non-blocking reader: the parts follow their header at once, so wait for them
        channel.settimeout(PARTS_SECONDS)
    try:
        while received < length:
            part = channel.recv(PART)
            if not part:
                return None  # gone mid-message
            received += len(part)
            if not too_large:
                data += part
            elif not head:
                head = part[:256]
    finally:
        channel.settimeout(timeout)
    if too_large:
        raise MessageTooLargeError(f"a message of {length} bytes, over the {limit} this channel takes", head)
    return json.loads(data)


_LOGIN_ERRORS: dict[str, type[CardAgentError]] = {
    cls.__name__: cls for cls in (LoginError, PinLockedError, PinFinalTryError, PinNotInitializedError, PinExpiredError,
                                   ConfigError)
}


def login_error_message(error: CardAgentError) -> dict[str, Any]:
    """A refused login, as the card-session process reports it (no PIN in it: messages never hold one)."""
    state = error.pin_state.value if isinstance(error, WrongPinError) else None
    return {"type": "login-error", "error": type(error).__name__, "message": str(error), "pin_state": state}


def config_fields(config: AgentConfig) -> dict[str, Any]:
    """The configuration the supervisor runs, for a message to the card-session process: the bytes
    it parsed, and the file they came from (links resolved: relative paths are taken from its
    directory). The process parses these (:func:`received_config`) and never reads the file, which
    may hold an edit not reloaded yet, or one a reload refused. With them, what the trusted files
    held as the supervisor read them: the process does not judge a [trust] change by its own reading.
    """
    return {"config": str(config.source), "config_bytes": base64.b64encode(config.raw).decode("ascii"),
            "file_digests": file_digests(config)}


def received_config(message: dict[str, Any]) -> AgentConfig:
    """The configuration a message of :func:`config_fields` carries (ConfigError if it is not one,
    as the supervisor parsed these very bytes: only a bug or another build makes it one)."""
    source = Path(message["config"])
    digests: dict[str, str] = message["file_digests"]
    return parse_config(base64.b64decode(message["config_bytes"]), source, source,
                        digest=lambda path: digests.get(str(path), "") if path is not None else "")


def upgraded_message(running: str, installed: str, running_build: str = "", installed_build: str = "") -> str:
    """What the log, `status` and the sign-in failure say when the card-session process, started
    from the files on disk, is not of the running supervisor's version or build (a package upgrade
    under a running agent): the one thing to do is to restart the agent. The builds are named only
    when the version is the same (0.1.0-1 -> 0.1.0-2, or two builds from main)."""
    if running == installed:
        running, installed = f"{running} (build {running_build})", f"{installed} (build {installed_build})"
    return (f"the agent was upgraded from {running} to {installed} while running: restart it: "
            "systemctl --user restart card-agent")


# What the log, `status` and the sign-in failure say when the card-session process cannot be started
# because the agent's installed files are no longer there (`dpkg -r` or `pip uninstall` under a
# running agent): the running supervisor has its code in memory, a new process has nothing to run.
FILES_GONE = ("the agent's files are gone (the package was removed while it runs?): stop the agent, or "
              "reinstall it and restart it")


def login_error_from(reply: dict[str, Any]) -> CardAgentError:
    if reply.get("error") == WrongPinError.__name__:
        return WrongPinError(reply["message"], PinState(reply["pin_state"]))
    return _LOGIN_ERRORS.get(reply.get("error", ""), LoginError)(reply["message"])
