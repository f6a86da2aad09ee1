"""PC/SC reader events from pcscd, as a wake-up for the card poller.

Where the PKCS#11 module talks to cards through pcscd (OpenSC and most card middleware on Linux),
pcscd knows first that a card left: ``SCardGetStatusChange`` returns as soon as its reader state
changes, while the poller would only look at its next tick. This module only says "something
changed, look now"; which card is present is still decided by asking the PKCS#11 module
(watcher.CardWatcher.look), so an event source that misses, duplicates or invents events can delay or
add a poll but never make the agent believe in a wrong card. Polling stays as the backstop.

ctypes over libpcsclite (the C client library of pcscd); no pyscard dependency. Types follow
pcsc-lite on Linux: DWORD and LONG are C ``unsigned long``/``long`` (64-bit on x86_64).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger("agent.card")

LIBRARY_NAMES = ("libpcsclite.so.1", "libpcsclite.so")
PNP_NOTIFICATION = "\\\\?PnP?\\Notification"  # the pseudo-reader that changes when readers come or go
MAX_ATR_SIZE = 33
SCARD_SCOPE_SYSTEM = 2
INFINITE = 0xFFFFFFFF

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

RETRY_SECONDS = 1.0  # after pcscd went away: try to reconnect this often (polling covers the gap)


class ReaderState(ctypes.Structure):
    """SCARD_READERSTATE of pcsc-lite (Linux layout: no packing, DWORD = unsigned long)."""

    _fields_ = [
        ("szReader", ctypes.c_char_p),
        ("pvUserData", ctypes.c_void_p),
        ("dwCurrentState", ctypes.c_ulong),
        ("dwEventState", ctypes.c_ulong),
        ("cbAtr", ctypes.c_ulong),
        ("rgbAtr", ctypes.c_ubyte * MAX_ATR_SIZE),
    ]


class PcscUnavailable(RuntimeError):
    """No libpcsclite, or no pcscd answering: rely on polling alone."""


def _code(value: int) -> int:
    return value & 0xFFFFFFFF  # LONG is signed 64-bit; the SCARD_* codes are 32-bit patterns


def load_library() -> ctypes.CDLL:
    for name in (*LIBRARY_NAMES, ctypes.util.find_library("pcsclite")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.SCardEstablishContext.argtypes = [ctypes.c_ulong, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.POINTER(ctypes.c_long)]
        lib.SCardEstablishContext.restype = ctypes.c_long
        lib.SCardReleaseContext.argtypes = [ctypes.c_long]
        lib.SCardReleaseContext.restype = ctypes.c_long
        lib.SCardCancel.argtypes = [ctypes.c_long]
        lib.SCardCancel.restype = ctypes.c_long
        lib.SCardListReaders.argtypes = [ctypes.c_long, ctypes.c_char_p, ctypes.c_char_p,
                                         ctypes.POINTER(ctypes.c_ulong)]
        lib.SCardListReaders.restype = ctypes.c_long
        lib.SCardGetStatusChange.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.POINTER(ReaderState),
                                             ctypes.c_ulong]
        lib.SCardGetStatusChange.restype = ctypes.c_long
        return lib
    raise PcscUnavailable("libpcsclite is not installed")


def split_multistring(raw: bytes) -> list[str]:
    """A PC/SC multi-string (``a\\0b\\0\\0``) as a list."""
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


class PcscContext:
    """One connection to pcscd."""

    def __init__(self, lib: ctypes.CDLL | None = None) -> None:
        self.lib = lib or load_library()
        handle = ctypes.c_long(0)
        rv = _code(self.lib.SCardEstablishContext(SCARD_SCOPE_SYSTEM, None, None, ctypes.byref(handle)))
        if rv != SCARD_S_SUCCESS:
            raise PcscUnavailable(f"pcscd does not answer (SCardEstablishContext: 0x{rv:08X})")
        self.handle = handle.value

    def readers(self) -> list[str]:
        size = ctypes.c_ulong(0)
        rv = _code(self.lib.SCardListReaders(self.handle, None, None, ctypes.byref(size)))
        if rv == SCARD_E_NO_READERS_AVAILABLE:
            return []
        if rv != SCARD_S_SUCCESS:
            raise PcscUnavailable(f"SCardListReaders: 0x{rv:08X}")
        buffer = ctypes.create_string_buffer(size.value)
        rv = _code(self.lib.SCardListReaders(self.handle, None, buffer, ctypes.byref(size)))
        if rv == SCARD_E_NO_READERS_AVAILABLE:  # the reader left between the two calls
            return []
        if rv != SCARD_S_SUCCESS:
            raise PcscUnavailable(f"SCardListReaders: 0x{rv:08X}")
        return split_multistring(buffer.raw[:size.value])

    def wait(self, states: ctypes.Array, timeout_ms: int = INFINITE) -> int:
        """SCardGetStatusChange on ``states``; returns the SCARD_* code (as unsigned 32-bit)."""
        return _code(self.lib.SCardGetStatusChange(self.handle, timeout_ms, states, len(states)))

    def states(self, readers: list[str]) -> dict[str, int]:
        """The current ``SCARD_STATE_*`` flags of each reader, without waiting."""
        if not readers:
            return {}
        encoded = [name.encode() for name in readers]
        states = (ReaderState * len(readers))()
        for state, name in zip(states, encoded, strict=True):
            state.szReader = name
            state.dwCurrentState = SCARD_STATE_UNAWARE
        rv = self.wait(states, 0)
        if rv not in (SCARD_S_SUCCESS, SCARD_E_TIMEOUT):
            raise PcscUnavailable(f"SCardGetStatusChange: 0x{rv:08X}")
        return {name: state.dwEventState & 0xFFFF for name, state in zip(readers, states, strict=True)}

    def cancel(self) -> None:
        self.lib.SCardCancel(self.handle)  # wakes a wait() blocked in another thread

    def release(self) -> None:
        self.lib.SCardReleaseContext(self.handle)


def card_state_changed(before: int, after: int) -> bool:
    """Did a reader's card come or go (ignoring pcscd's event counter in the upper 16 bits)?"""
    mask = SCARD_STATE_EMPTY | SCARD_STATE_PRESENT | SCARD_STATE_UNAVAILABLE | SCARD_STATE_UNKNOWN
    return (before & mask) != (after & mask) or (before >> 16) != (after >> 16)


class PcscEventSource:
    """A thread blocked in ``SCardGetStatusChange`` on every reader (and the PnP pseudo-reader)
    that calls ``on_change`` whenever pcscd reports a card or reader change."""

    def __init__(self, on_change: Callable[[], None], lib: ctypes.CDLL | None = None) -> None:
        self.on_change = on_change
        self._lib = lib
        self._stopping = threading.Event()
        self._context: PcscContext | None = None
        self._context_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pcsc-events", daemon=True)
        self.events = 0  # how many changes were reported (for tests and diagnostics)
        # True while a wait on pcscd is in place, so that a change would be reported; False while
        # pcscd is away (changes may go unreported until it is back, when a change is reported).
        self.live = False
        # The readers holding a card, each with pcscd's count of its card events (the upper 16 bits
        # of its state): a card pulled and another inserted between two looks shows as a new count.
        # Replaced whole, before each change is reported; meaningful only while ``live``.
        self.cards: dict[str, int] = {}

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
        context = PcscContext(self._lib)
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
                self.live = False
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
                self._notify()  # changes may have been missed while disconnected
                break

    def _watch(self, context: PcscContext) -> None:
        """Wait for changes until the reader list changes (return) or pcscd goes away (raise)."""
        names = [PNP_NOTIFICATION, *context.readers()]
        encoded = [name.encode() for name in names]
        states = (ReaderState * len(names))()
        for state, name in zip(states, encoded, strict=True):
            state.szReader = name
            state.dwCurrentState = SCARD_STATE_UNAWARE
        rv = context.wait(states, 0)  # learn the current states without waiting
        if rv not in (SCARD_S_SUCCESS, SCARD_E_TIMEOUT):
            raise PcscUnavailable(f"SCardGetStatusChange: 0x{rv:08X}")
        for state in states:
            state.dwCurrentState = state.dwEventState & ~SCARD_STATE_CHANGED
        self.cards = _cards_in(names[1:], states[1:])
        self.live = True
        while not self._stopping.is_set():
            rv = context.wait(states)
            if rv == SCARD_E_CANCELLED or self._stopping.is_set():
                return
            if rv == SCARD_E_TIMEOUT:
                continue
            if rv in (SCARD_E_UNKNOWN_READER, SCARD_E_NO_READERS_AVAILABLE):
                self._notify()
                return  # a reader went away: list them again
            if rv != SCARD_S_SUCCESS:
                raise PcscUnavailable(f"SCardGetStatusChange: 0x{rv:08X}")
            readers_changed = bool(states[0].dwEventState & SCARD_STATE_CHANGED)
            cards_changed = any(s.dwEventState & SCARD_STATE_CHANGED
                                and card_state_changed(s.dwCurrentState, s.dwEventState) for s in states[1:])
            for state in states:
                state.dwCurrentState = state.dwEventState & ~SCARD_STATE_CHANGED
            self.cards = _cards_in(names[1:], states[1:])
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


def _cards_in(names: list[str], states: Sequence[ReaderState]) -> dict[str, int]:
    """The readers among ``names`` holding a card, with their card-event counts."""
    return {name: state.dwEventState >> 16 for name, state in zip(names, states, strict=True)
            if state.dwEventState & SCARD_STATE_PRESENT}
