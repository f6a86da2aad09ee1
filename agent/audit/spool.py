"""A durable, ordered on-disk queue of syslog messages waiting for the audit repository.

One file per message, ``<sequence number, 20 digits>.msg``, in a directory only the agent can
read (0700; files 0600). :meth:`Spool.append` writes a temporary file, fsyncs it, renames it into
place and fsyncs the directory, so after it returns the message survives a crash or power loss,
and a crash during it leaves no partial message (a stale ``.tmp`` file is removed on the next
start). The sender reads waiting messages in sequence order (:meth:`Spool.oldest`,
:meth:`Spool.after`), sends them, and :meth:`Spool.remove` unlinks each (and fsyncs the directory)
only once the repository has confirmed it (agent/audit/sinks.py): order is the sequence order,
which survives restarts because the next number is one more than the highest on disk.

A message sent but not yet confirmed when the connection or the agent dies is sent again later:
delivery is at least once. An exclusive ``flock`` on ``.lock`` keeps a second agent (or a second
trail in one process) off the same spool.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import threading
from collections import deque
from pathlib import Path

from dicom_card_agent.audit.errors import AuditSpoolError

log = logging.getLogger("agent.audit")

_NAME = re.compile(r"(\d{20})\.msg")
_LOCK = ".lock"


class Spool:
    """The queue in ``directory`` (created 0700 if missing). Thread-safe; close it when done."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise AuditSpoolError(f"cannot use the audit spool directory {self.directory}: {error.strerror}; "
                                  "check [audit] spool and its permissions") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(self._lock_fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise AuditSpoolError(f"the audit spool {self.directory} is in use by another card-agent; "
                                      "give each agent its own [audit] spool") from None
            raise AuditSpoolError(f"cannot lock the audit spool {self.directory}: {error.strerror}") from None
        self._mutex = threading.Lock()
        self._pending: deque[int] = deque()
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        sequences = []
        for entry in os.scandir(self.directory):
            match = _NAME.fullmatch(entry.name)
            if match:
                sequences.append(int(match.group(1)))
            elif entry.name.endswith(".tmp"):
                os.unlink(entry.path)  # a crash during append(): that message was never accepted
        self._pending.extend(sorted(sequences))
        self._next = (self._pending[-1] + 1) if self._pending else 1
        self._closed = False

    def _path(self, sequence: int) -> Path:
        return self.directory / f"{sequence:020d}.msg"

    def append(self, data: bytes) -> int:
        """Store ``data`` durably at the end of the queue; return its sequence number."""
        with self._mutex:
            self._check_open()
            sequence = self._next
            temporary = self.directory / f"{sequence:020d}.tmp"
            try:
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(temporary, self._path(sequence))
                os.fsync(self._dir_fd)
            except OSError as error:
                try:
                    os.unlink(temporary)
                except OSError:
                    pass
                raise AuditSpoolError(f"cannot write to the audit spool {self.directory}: {error.strerror}") from None
            self._next = sequence + 1
            self._pending.append(sequence)
            return sequence

    def oldest(self) -> tuple[int, bytes] | None:
        """The first waiting message and its sequence number, or ``None`` if none waits. A file
        that cannot be read is set aside as ``.bad`` (and logged), never sent half."""
        while True:
            with self._mutex:
                self._check_open()
                if not self._pending:
                    return None
                sequence = self._pending[0]
                path = self._path(sequence)
                try:
                    return sequence, path.read_bytes()
                except OSError as error:
                    self._pending.popleft()
                    log.error("audit spool: cannot read %s (%s); set aside as .bad, not sent", path, error.strerror)
                    try:
                        os.rename(path, path.with_suffix(".bad"))
                    except OSError:
                        pass

    def after(self, sequence: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` waiting messages numbered above ``sequence``, in order (unreadable ones
        are set aside as :meth:`oldest` does)."""
        found: list[tuple[int, bytes]] = []
        while len(found) < limit:
            with self._mutex:
                self._check_open()
                following = self._following(sequence, limit - len(found))
            if not following:
                return found
            for number in following:
                data = self._read(number)
                if data is not None:
                    found.append((number, data))
                sequence = number
        return found

    def _following(self, sequence: int, limit: int) -> list[int]:
        # The numbers at or below ``sequence`` are the few sent and not yet confirmed, at the
        # front: skipping them keeps this cheap even with a long backlog behind.
        following: list[int] = []
        for number in self._pending:
            if number > sequence:
                following.append(number)
                if len(following) == limit:
                    break
        return following

    def _read(self, sequence: int) -> bytes | None:
        path = self._path(sequence)
        try:
            return path.read_bytes()
        except OSError as error:
            with self._mutex:
                if sequence in self._pending:
                    self._pending.remove(sequence)
            log.error("audit spool: cannot read %s (%s); set aside as .bad, not sent", path, error.strerror)
            try:
                os.rename(path, path.with_suffix(".bad"))
            except OSError:
                pass
            return None

    def remove(self, sequence: int) -> None:
        """Forget a delivered message (any waiting one: RELP confirms each on its own)."""
        with self._mutex:
            self._check_open()
            if sequence not in self._pending:
                raise AuditSpoolError(f"audit spool: message {sequence} is not waiting")
            try:
                os.unlink(self._path(sequence))
                os.fsync(self._dir_fd)
            except FileNotFoundError:
                pass
            except OSError as error:
                raise AuditSpoolError(f"cannot remove a delivered message from the audit spool {self.directory}: "
                                      f"{error.strerror}") from None
            if self._pending[0] == sequence:
                self._pending.popleft()
            else:
                self._pending.remove(sequence)

    def __len__(self) -> int:
        with self._mutex:
            return len(self._pending)

    def _check_open(self) -> None:
        if self._closed:
            raise AuditSpoolError(f"the audit spool {self.directory} is closed")

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            os.close(self._dir_fd)
            os.close(self._lock_fd)  # releases the flock
