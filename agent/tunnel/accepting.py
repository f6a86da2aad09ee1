"""Accepting connections in a loop that must never end while the agent runs.

An accept loop that dies leaves the agent "signed in" with every association timing out, so every
error in accepting is logged and the loop goes on. Running out of descriptors (EMFILE, ENFILE) or
kernel memory is the one error that repeats at once: the listener stays readable, so the loop
would spin; it sleeps a short, growing back-off instead, and says so once per burst.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from typing import Callable

BACKOFF_FIRST = 0.1  # seconds after the first failed accept of a burst
BACKOFF_MAX = 1.0  # the back-off doubles up to this
LOG_INTERVAL = 10.0  # seconds: at most one failure line, and one recovery line, per loop in this time
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def is_resource_error(error: BaseException) -> bool:
    """Descriptors or kernel memory ran out (EMFILE, ENFILE, ENOBUFS, ENOMEM)."""
    return getattr(error, "errno", None) in RESOURCE_ERRORS


class AcceptBackoff:
    """Paces an accept loop through errors: a failure line at most every ``LOG_INTERVAL`` (with the
    count of those not told), and a back-off (``BACKOFF_FIRST`` doubling to ``BACKOFF_MAX``) while
    descriptors or memory run short. Used by the loop's one thread only."""

    def __init__(self, logger: logging.Logger, where: str, stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._where = where
        self._stop = stop if stop is not None else threading.Event()
        self._clock = clock
        self._delay = 0.0
        self._failures = 0  # in this burst
        self._untold = 0  # failures since the last line
        self._quiet_until = 0.0
        self._recovery_quiet_until = 0.0

    def accept(self, listener: socket.socket) -> socket.socket | None:
        """The next connection, or None after an error (logged, and waited out if descriptors ran out)."""
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return None  # nothing there after all, or a signal: nothing to report
        except OSError as error:
            self.failed("cannot accept connections", error)
            return None
        return connection

    def failed(self, what: str, error: BaseException) -> None:
        """Accepting, or identifying a connection just accepted, failed with ``error``; ``what``
        says which. Returns after the back-off if descriptors or memory ran out."""
        self._failures += 1
        self._untold += 1
        resource = is_resource_error(error)
        now = self._clock()
        if now >= self._quiet_until:
            self._quiet_until = now + LOG_INTERVAL
            detail = getattr(error, "strerror", None) or str(error)
            more = f" ({self._untold - 1} more since the last such line)" if self._untold > 1 else ""
            if resource:
                self._log.error("%s: %s: %s (%s)%s; backing off %.1f s to %.1f s and going on: are connections "
                                "being held open (a scan, another user's program)?", self._where, what, detail,
                                errno.errorcode.get(getattr(error, "errno", 0) or 0, "?"), more,
                                BACKOFF_FIRST, BACKOFF_MAX)
            else:
                self._log.warning("%s: %s: %s%s; accepting goes on", self._where, what, detail, more)
            self._untold = 0
        if resource:
            self._delay = min(BACKOFF_MAX, self._delay * 2 if self._delay else BACKOFF_FIRST)
            self._stop.wait(self._delay)

    def succeeded(self) -> None:
        """A connection was accepted and identified: a burst of failures, if any, is over."""
        if not self._failures:
            return
        now = self._clock()
        if now >= self._recovery_quiet_until:
            self._recovery_quiet_until = now + LOG_INTERVAL
            self._log.info("%s: accepting connections again after %d failed attempt%s", self._where,
                           self._failures, "s" if self._failures > 1 else "")
        self._failures = 0
        self._delay = 0.0
