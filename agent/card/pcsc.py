"""PC/SC reader events from pcscd, as a wake-up for the card poller.

Where the PKCS#11 module talks to cards through pcscd (OpenSC and most card middleware on Linux),
pcscd knows first that a card left: ``SCardGetStatusChange`` returns as soon as its reader state
changes, while the poller would only look at its next tick. For most modules this module only
says "something changed, look now"; which card is present is still decided by asking the PKCS#11
module (watcher.CardWatcher.look), so an event source that misses, duplicates or invents events can
delay or add a poll but never make the agent believe in a wrong card. Polling stays as the
backstop. For a module whose every question about a new card costs a probe (OpenSC), the readers
holding a card and their event counts (:attr:`PcscEventSource.cards`) are what the card loop reads
instead (agent/card/readers.py).

PC/SC through pyscard's low-level layer (``smartcard.scard``), which loads the system's PC/SC
library (libpcsclite, winscard.dll, the PCSC framework) and releases the GIL while a call blocks.
The ``SCARD_*`` values below are the PC/SC standard's, the same on every platform (a test checks
them against pyscard's); they are defined here so that this module imports without loading
pyscard (see :func:`pcsc_api`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("agent.card")

PCSCLITE_LIBRARY = "libpcsclite.so.1"  # the name pyscard dlopen()s where pcsc-lite is the PC/SC layer
PNP_NOTIFICATION = "\\\\?PnP?\\Notification"  # the pseudo-reader that changes when readers come or go
SCARD_SCOPE_SYSTEM = 2

SCARD_S_SUCCESS = 0
SCARD_E_CANCELLED = 0x80100002
SCARD_E_UNKNOWN_READER = 0x80100009
SCARD_E_TIMEOUT = 0x8010000A
SCARD_E_NO_SERVICE = 0x8010001D
SCARD_E_SERVICE_STOPPED = 0x8010001E
SCARD_E_NO_READERS_AVAILABLE = 0x8010002E

SCARD_STATE_UNAWARE = 0x0000
SCARD_STATE_CHANGED = 0x0002
SCARD_STATE_UNKNOWN = 0x0004
SCARD_STATE_UNAVAILABLE = 0x0008
SCARD_STATE_EMPTY = 0x0010
SCARD_STATE_PRESENT = 0x0020
SCARD_STATE_EXCLUSIVE = 0x0080

RETRY_SECONDS = 1.0  # after pcscd went away: try to reconnect this often (polling covers the gap)
# Each wait for a change ends after this long: pcscd's answer, a change or none, shows it still
# answers. A pcscd stopped (SIGSTOP) or stuck (in a reader's driver) answers nothing and breaks no
# connection: waited for without end, its last reader states were taken for the present ones, and
# a card pulled meanwhile was vouched for (measured: a new association through the pulled card's
# session 15 s after the pull, with pcscd stopped).
WAIT_SECONDS = 1.0
# No answer from pcscd for this long (a wait, its end and a round trip): it counts as away.
UNANSWERED_SECONDS = 3.0
# A question asked of pcscd once (which readers hold a card) gets its answer within this, or pcscd
# counts as stuck: a call into libpcsclite waits without end for a pcscd that took the connection.
ANSWER_SECONDS = 3.0

# A reader and the state the caller last saw it in, as pyscard's SCardGetStatusChange takes them.
ReaderState = tuple[str, int]


class PcscUnavailable(RuntimeError):
    """No libpcsclite, or no pcscd answering: rely on polling alone. ``remedy``: what an
    administrator does about it."""

    def __init__(self, message: str, remedy: str = "start pcscd: `systemctl enable --now pcscd.socket`") -> None:
        super().__init__(message)
        self.remedy = remedy


def _code(value: int) -> int:
    return value & 0xFFFFFFFF  # LONG is signed (64-bit on Linux); the SCARD_* codes are 32-bit patterns


@functools.cache
def pcsc_api() -> Any:
    """pyscard's ``smartcard.scard``, imported on first use; PcscUnavailable without libpcsclite.

    Where libpcsclite.so.1 cannot be loaded, importing pyscard prints "Failed to dlopen ..." on
    the process's stdout (C printf: it would land in ``card-agent`` output) and every call then
    answers SCARD_E_NO_SERVICE, which reads as "pcscd does not answer". So the library is loaded
    here first, by the same name: a missing pcsc-lite gets its own reason and a clean stdout."""
    if sys.platform not in ("win32", "darwin"):  # Windows and macOS ship their PC/SC layer
        try:
            ctypes.CDLL(PCSCLITE_LIBRARY)
        except OSError as error:
            log.debug("PC/SC: %s", error)
            raise PcscUnavailable("libpcsclite is not installed",
                                  "install it: `apt-get install libpcsclite1`") from None
    from smartcard import scard

    return scard


class PcscContext:
    """One connection to pcscd."""

    def __init__(self) -> None:
        self.scard = pcsc_api()
        rv, handle = self.scard.SCardEstablishContext(SCARD_SCOPE_SYSTEM)
        rv = _code(rv)
        if rv != SCARD_S_SUCCESS:
            raise PcscUnavailable(f"pcscd does not answer (SCardEstablishContext: 0x{rv:08X})")
        self.handle: int = handle

    def readers(self) -> list[str]:
        rv, readers = self.scard.SCardListReaders(self.handle, [])
        rv = _code(rv)
        if rv == SCARD_E_NO_READERS_AVAILABLE:
            return []
        if rv != SCARD_S_SUCCESS:
            raise PcscUnavailable(f"SCardListReaders: 0x{rv:08X}")
        return [str(name) for name in readers]

    def wait(self, states: Sequence[ReaderState], timeout_ms: int | None = None) -> tuple[int, list[int]]:
        """SCardGetStatusChange on ``states`` (no timeout: until a change or :meth:`cancel`).
        Returns the SCARD_* code (as unsigned 32-bit) and the event state of each reader."""
        timeout = self.scard.INFINITE if timeout_ms is None else timeout_ms
        rv, new_states = self.scard.SCardGetStatusChange(self.handle, timeout, list(states))
        return _code(rv), [int(state[1]) for state in new_states]

    def states(self, readers: list[str]) -> dict[str, int]:
        """The current ``SCARD_STATE_*`` flags of each reader, without waiting."""
        if not readers:
            return {}
        rv, events = self.wait([(name, SCARD_STATE_UNAWARE) for name in readers], 0)
        if rv not in (SCARD_S_SUCCESS, SCARD_E_TIMEOUT):
            raise PcscUnavailable(f"SCardGetStatusChange: 0x{rv:08X}")
        return {name: event & 0xFFFF for name, event in zip(readers, events, strict=True)}

    def cancel(self) -> None:
        self.scard.SCardCancel(self.handle)  # wakes a wait() blocked in another thread

    def release(self) -> None:
        self.scard.SCardReleaseContext(self.handle)


class PcscdStuck(PcscUnavailable):
    """pcscd took the connection and did not answer in time: stopped (SIGSTOP), or stuck in a
    reader's driver. Unlike a pcscd that is not there, it holds whoever asks it without end."""


def readers_with_a_card(timeout: float = ANSWER_SECONDS) -> list[str]:
    """The readers holding a card now, as pcscd tells (no card is spoken to); raises
    :class:`PcscUnavailable` when pcscd or libpcsclite is not there, :class:`PcscdStuck` when
    pcscd does not answer within ``timeout`` (the question is then left waiting in a thread of its
    own, which pcscd's answer or the process's end ends)."""
    outcome: list[list[str] | Exception] = []
    answered = threading.Event()

    def ask() -> None:
        try:
            context = PcscContext()
            try:
                states = context.states(context.readers())
            finally:
                context.release()
            outcome.append(list(_cards_in(list(states), list(states.values()))))
        except Exception as error:  # noqa: BLE001 - handed to the caller
            outcome.append(error)
        finally:
            answered.set()

    threading.Thread(target=ask, name="pcscd-question", daemon=True).start()
    if not answered.wait(timeout):
        raise PcscdStuck(f"pcscd does not answer within {timeout:g} s (stopped, or stuck in a reader's driver)",
                         "restart it: `systemctl restart pcscd`")
    result = outcome[0]
    if isinstance(result, Exception):
        raise result
    return result



def held_exclusively(reader: str) -> bool:
    """Whether another program holds the card in ``reader`` for itself (SCARD_SHARE_EXCLUSIVE): then
    nobody else can read it, and a PKCS#11 module shows the reader's slot without a token. False
    when pcscd cannot tell."""
    try:
        context = PcscContext()
    except PcscUnavailable:
        return False
    try:
        return bool(context.states([reader]).get(reader, 0) & SCARD_STATE_EXCLUSIVE)
    except PcscUnavailable:
        return False
    finally:
        context.release()

def card_state_changed(before: int, after: int) -> bool:
    """Did a reader's card come or go (ignoring pcscd's event counter in the upper 16 bits)?"""
    mask = SCARD_STATE_EMPTY | SCARD_STATE_PRESENT | SCARD_STATE_UNAVAILABLE | SCARD_STATE_UNKNOWN
    return (before & mask) != (after & mask) or (before >> 16) != (after >> 16)


def watchable(names: list[str]) -> list[str]:
    """The readers pyscard can wait on: it passes reader names to PC/SC as ASCII and raises
    UnicodeEncodeError for any other, which would end the event thread. A reader left out is
    still seen by the poller, only without the early wake-up."""
    for name in names:
        if not name.isascii():
            log.debug("PC/SC events: reader %a not watched (pyscard passes ASCII reader names only)", name)
    return [name for name in names if name.isascii()]


class PcscEventSource:
    """A thread blocked in ``SCardGetStatusChange`` on every reader (and the PnP pseudo-reader)
    that calls ``on_change`` whenever pcscd reports a card or reader change."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self._stopping = threading.Event()
        self._context: PcscContext | None = None
        self._context_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pcsc-events", daemon=True)
        self.events = 0  # how many changes were reported (for tests and diagnostics)
        # True while a wait on pcscd is in place (see :attr:`live`); False while pcscd is away.
        self._watching = False
        self._answered_at = time.monotonic()  # when pcscd last answered a call of this thread
        # The readers holding a card, each with pcscd's count of its card events (the upper 16 bits
        # of its state): a card pulled and another inserted between two looks shows as a new count.
        # Replaced whole, before each change is reported; meaningful only while ``live``.
        self.cards: dict[str, int] = {}
        # How many times the connection to pcscd was made anew after it broke: each pcscd (restarted,
        # or back after being away) is a new one, whose card-event counts start again and which has
        # invalidated every handle other processes (the card-session process's module) held.
        self.generation = 0

    @property
    def live(self) -> bool:
        """True while a wait on pcscd is in place, so that a change would be reported, and pcscd
        answered within :data:`UNANSWERED_SECONDS`; False while pcscd is away, stopped or stuck
        (changes may go unreported until it is back, when a change is reported)."""
        return self._watching and self.unanswered_for() < UNANSWERED_SECONDS

    def unanswered_for(self) -> float:
        """Seconds since pcscd last answered (a wait's end, with a change or none)."""
        return time.monotonic() - self._answered_at

    def start(self) -> PcscEventSource:
        """Connect to pcscd now (PcscUnavailable if that fails), then watch in the background."""
        self._connect()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._context_lock:
            if self._context is not None:
                self._context.cancel()
        self._thread.join(timeout=2)
        with self._context_lock:
            if self._context is not None:
                self._context.release()
                self._context = None

    def _connect(self) -> PcscContext:
        context = PcscContext()
        with self._context_lock:
            self._context = context
        return context

    def _run(self) -> None:
        assert self._context is not None
        context = self._context
        while not self._stopping.is_set():
            try:
                self._watch(context)
                continue  # the reader list changed: watch the new list at once
            except PcscUnavailable as error:
                self._watching = False
                log.debug("PC/SC events paused: %s", error)
            # pcscd restarted or went away: a new context after a pause (the old one is dead on
            # pcscd's side); polling covers the gap.
            while not self._stopping.wait(RETRY_SECONDS):
                with self._context_lock:
                    if self._context is not None:
                        self._context.release()
                        self._context = None
                try:
                    context = self._connect()
                except PcscUnavailable as error:
                    log.debug("PC/SC events: %s", error)
                    continue
                self.generation += 1
                self._notify()  # changes may have been missed while disconnected
                break

    def _watch(self, context: PcscContext) -> None:
        """Wait for changes until the reader list changes (return) or pcscd goes away (raise)."""
        names = [PNP_NOTIFICATION, *watchable(context.readers())]
        rv, events = context.wait([(name, SCARD_STATE_UNAWARE) for name in names], 0)  # the current states
        if rv not in (SCARD_S_SUCCESS, SCARD_E_TIMEOUT):
            raise PcscUnavailable(f"SCardGetStatusChange: 0x{rv:08X}")
        current = [event & ~SCARD_STATE_CHANGED for event in events]
        self.cards = _cards_in(names[1:], current[1:])
        self._answered_at = time.monotonic()
        self._watching = True
        while not self._stopping.is_set():
            rv, events = context.wait(list(zip(names, current, strict=True)), round(WAIT_SECONDS * 1000))
            self._answered_at = time.monotonic()
            if rv == SCARD_E_CANCELLED or self._stopping.is_set():
                return
            if rv == SCARD_E_TIMEOUT:
                continue
            if rv in (SCARD_E_UNKNOWN_READER, SCARD_E_NO_READERS_AVAILABLE):
                self._notify()
                return  # a reader went away: list them again
            if rv != SCARD_S_SUCCESS:
                raise PcscUnavailable(f"SCardGetStatusChange: 0x{rv:08X}")
            readers_changed = bool(events[0] & SCARD_STATE_CHANGED)
            cards_changed = any(after & SCARD_STATE_CHANGED and card_state_changed(before, after)
                                for before, after in zip(current[1:], events[1:], strict=True))
            current = [event & ~SCARD_STATE_CHANGED for event in events]
            self.cards = _cards_in(names[1:], current[1:])
            if readers_changed or cards_changed:
                self._notify()
            if readers_changed:
                return  # readers were added or removed: list them again

    def _notify(self) -> None:
        self.events += 1
        try:
            self.on_change()
        except Exception:  # noqa: BLE001 - a broken callback must not end the event thread
            log.exception("PC/SC event callback failed")


def _cards_in(names: list[str], states: Sequence[int]) -> dict[str, int]:
    """The readers among ``names`` holding a card, with their card-event counts."""
    return {name: state >> 16 for name, state in zip(names, states, strict=True) if state & SCARD_STATE_PRESENT}
