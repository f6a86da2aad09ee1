"""The end of a card session, as every connection of it waits for it."""

from __future__ import annotations

import concurrent.futures
import os


class SessionEnd:
    """Tells every relay of a card session, at once, that the session is over.

    A pipe that is written once and never read: every relay polls its read end, so all of them
    wake within the same scheduler tick (a card pulled must close everything within 100 ms)."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        self.reason: str | None = None
        # The same news for what waits on futures (a DNS lookup, a revocation check waiting for its fetch).
        self.future: concurrent.futures.Future[str] = concurrent.futures.Future()

    def signal(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            os.write(self._write_fd, b"x")
            self.future.set_result(reason)

    def is_set(self) -> bool:
        return self.reason is not None

    def error(self) -> SessionEndedError:
        """What a wait cut short by the end raises."""
        return SessionEndedError(f"card session ended: {self.reason}")


class SessionEndedError(OSError):
    """The card session ended while a connection waited for its peer."""
