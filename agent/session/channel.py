"""Messages between the supervisor and a card-session process: JSON over a SOCK_SEQPACKET pair,
with accepted sockets passed along (SCM_RIGHTS), so the card-session process relays them directly."""

from __future__ import annotations

import json
import socket
from typing import Any

from dicom_card_agent.errors import CardAgentError, ConfigError
from dicom_card_agent.token.discovery import PinState
from dicom_card_agent.token.login import (
    LoginError,
    PinFinalTryError,
    PinLockedError,
    PinNotInitializedError,
    WrongPinError,
)
from dicom_card_agent.token.secret import Secret, wipe

MAX_MESSAGE = 64 * 1024
# The probe's answer carries every certificate on the card (a PIV card has 24 certificate slots,
# ~2.5 KB each in the message), so it may be larger; below the default socket send buffer
# (net.core.wmem_default, 208 KiB), which bounds a SOCK_SEQPACKET message. Only that answer is
# received into a buffer this large: one of 128 KiB or more is mapped and unmapped per message.
MAX_CARD_MESSAGE = 192 * 1024
MAX_SECRET = 1024
MAX_FDS = 253  # descriptors in one message (Linux's SCM_MAX_FD): the tunnels' listening sockets at most


def channel_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(channel: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(channel, [data], fds)
    else:
        channel.sendall(data)


def send_secret(channel: socket.socket, secret: Secret) -> None:
    """A PIN as one raw message, straight from its buffer (no JSON, no str, no bytes copy)."""
    with secret.view() as view:
        channel.sendmsg([view])


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
    """The next message (at most ``limit`` bytes) and the descriptors that came with it; ``None``
    when the other side is gone."""
    data, fds, _, _ = socket.recv_fds(channel, limit, MAX_FDS)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None, []
    return json.loads(data), fds


_LOGIN_ERRORS: dict[str, type[CardAgentError]] = {
    cls.__name__: cls for cls in (LoginError, PinLockedError, PinFinalTryError, PinNotInitializedError, ConfigError)
}


def login_error_message(error: CardAgentError) -> dict[str, Any]:
    """A refused login, as the card-session process reports it (no PIN in it: messages never hold one)."""
    state = error.pin_state.value if isinstance(error, WrongPinError) else None
    return {"type": "login-error", "error": type(error).__name__, "message": str(error), "pin_state": state}


def login_error_from(reply: dict[str, Any]) -> CardAgentError:
    if reply.get("error") == WrongPinError.__name__:
        return WrongPinError(reply["message"], PinState(reply["pin_state"]))
    return _LOGIN_ERRORS.get(reply.get("error", ""), LoginError)(reply["message"])
