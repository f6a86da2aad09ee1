"""Which card is present now, and when to look again.

Polling ``C_GetSlotList(tokenPresent)`` is cheap (microseconds on SoftHSM, ~10 ms on OpenSC with
pcscd) and works with every module; python-pkcs11's ``wait_for_slot_event`` loses the slot id
(design notes, section 2). Every PKCS#11 error while looking counts as "no card": after a removal
modules answer with CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, CKR_SESSION_HANDLE_INVALID or, for
SoftHSM, CKR_GENERAL_ERROR.

Where pcscd runs, its reader events (agent.card.pcsc) cut the wait between two polls short, so a
removal is acted on as soon as pcscd reports it instead of at the next tick; polling stays as the
backstop for modules that do not use pcscd and for events pcscd does not report.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from pkcs11.exceptions import PKCS11Error

from agent.card.pcsc import PcscEventSource, PcscUnavailable
from agent.token.discovery import matching_tokens, present_tokens, token_serial
from agent.token.module import MODULE_CALLS, LoadedModule

log = logging.getLogger("agent.card")

POLL_SECONDS = 0.05  # removal must be observed within 250 ms
# "poll" turns the PC/SC wake-ups off (diagnosis of a misbehaving pcscd, benchmarks).
EVENTS_ENV = "CARD_AGENT_CARD_EVENTS"


@dataclass(frozen=True)
class Card:
    """A token in a slot, identified by label and serial (slot ids are not stable)."""

    label: str
    serial: str

    @property
    def selector(self) -> str:
        return f"pkcs11:token={self.label};serial={self.serial}"

    def __str__(self) -> str:
        return f"{self.label!r} (serial {self.serial})"


class ModuleBusy(Exception):
    """A sign-in is talking to the module: the reader cannot be looked at this time."""


BUSY_WAIT_SECONDS = 0.1  # the card loop must stay free for signals and the session's checks


def present_card(module: LoadedModule, selector: str | None) -> Card | None:
    """The card the configuration accepts (any card when ``selector`` is empty), if one is present.

    Raises :class:`ModuleBusy` when another thread (a sign-in) holds the module for longer than
    :data:`BUSY_WAIT_SECONDS`."""
    if not MODULE_CALLS.try_enter(BUSY_WAIT_SECONDS):
        raise ModuleBusy()
    try:
        tokens = present_tokens(module)
        if selector:
            tokens = matching_tokens(tokens, selector)
        return Card(tokens[0].label, token_serial(tokens[0])) if tokens else None
    except PKCS11Error:
        return None
    finally:
        MODULE_CALLS.__exit__()


class CardEvents:
    """What the card loop sleeps on between two looks at the reader: ``POLL_SECONDS``, cut short by
    a PC/SC event where pcscd answers. Use as a context manager (it owns the PC/SC thread)."""

    def __init__(self, *, use_pcsc: bool | None = None) -> None:
        self._changed = threading.Event()
        self._source: PcscEventSource | None = None
        self.use_pcsc = os.environ.get(EVENTS_ENV, "") != "poll" if use_pcsc is None else use_pcsc
        self.description = f"polling every {POLL_SECONDS * 1000:g} ms"

    @property
    def pcsc(self) -> bool:
        return self._source is not None

    def __enter__(self) -> CardEvents:
        if self.use_pcsc:
            try:
                self._source = PcscEventSource(self._changed.set).start()
                self.description = f"PC/SC events from pcscd, and {self.description}"
            except PcscUnavailable as error:
                self.description += f" (no PC/SC events: {error})"
        else:
            self.description += f" (PC/SC events off: {EVENTS_ENV}=poll)"
        log.info("card events: %s", self.description)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._source is not None:
            self._source.stop()
            self._source = None

    def notify(self) -> None:
        """Look now (what a PC/SC event does)."""
        self._changed.set()

    def wait(self, stop: threading.Event) -> bool:
        """Sleep until the next look at the reader; True when the agent is stopping instead."""
        if stop.is_set():
            return True
        if self._changed.wait(POLL_SECONDS):
            self._changed.clear()  # a change arriving after this is seen by the look that follows
        return stop.is_set()
